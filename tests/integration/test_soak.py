"""The soak bench, short: `omnistream bench soak` through the suite registry, 1.5 stream minutes
at 8x with real models. The hour-long run is `omnistream bench soak --minutes 60`.

The bounds are checked from the samples themselves, not from the report's own verdicts: every
process's RSS within its ``limits.rss_mb`` at every sample, memory + reasoning within
``launcher.ram_budget_mb``, every question answered without an error, no handler error or
rejected message in any stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from omnistream.bench import available_suites, markdown, run_suites, write_report
from omnistream.protocol.config import load_config

# Slow and long: in the extended set (bash scripts/test.sh --extended), not the default suite.
pytestmark = [pytest.mark.slow, pytest.mark.extended]

STAGES = {"bus", "gateway", "perception", "memory", "reasoning", "speech"}


def test_short_soak_samples_every_process_and_stays_flat(tmp_path: Path) -> None:
    assert "soak" not in available_suites()  # an hour: only when named
    lines: list[str] = []
    report = run_suites(["soak"], quick=True, progress=lines.append, minutes=1.5)
    suite = report["suites"]["soak"]
    curve = suite["curve"]
    assert len(curve) >= 4, curve
    assert any("stream min, RSS total" in line for line in lines)
    for sample in curve:
        assert set(sample["rss_mb"]) == STAGES | {"total", "memory+reasoning"}
        assert all(math.isfinite(v) and v > 5 for v in sample["rss_mb"].values()), sample
        assert sample["rss_mb"]["memory+reasoning"] == pytest.approx(
            sample["rss_mb"]["memory"] + sample["rss_mb"]["reasoning"], abs=0.2
        )
    assert curve[-1]["stream_min"] >= 1.4 and curve[-1]["restarts"] == 0
    assert curve[-1]["disk_mb"] > 0  # the session's SQLite memory
    rows = {row["name"]: row for row in suite["rows"]}
    reasoning = next(r for n, r in rows.items() if n.startswith("RSS reasoning at the end"))
    assert reasoning["baseline"] > 100 and reasoning["value"] > 100
    # Flat enough over a short run: no process grew by more than half (plus 64 MB) after warm-up.
    for name, row in rows.items():
        if name.startswith("RSS ") and "at the end" in name:
            assert row["value"] <= 1.5 * row["baseline"] + 64, row
    # RSS bounds, from the curve itself (not the report's verdict): every sample of every
    # process within its limits.rss_mb, memory + reasoning within launcher.ram_budget_mb.
    defaults = load_config(None)
    limits = {name: getattr(defaults.limits.rss_mb, name) for name in STAGES}
    assert suite["rss_limits_mb"] == limits
    for sample in curve:
        over = {n: (sample["rss_mb"][n], limit) for n, limit in limits.items() if sample["rss_mb"][n] > limit}
        assert not over, (sample["stream_min"], over)
        assert sample["rss_mb"]["memory+reasoning"] <= defaults.launcher.ram_budget_mb, sample
    # Zero errors: the question at minute 1 answered, with no error; no stage failed a handler
    # or rejected a message.
    assert suite["questions"], "no question was asked"
    for question in suite["questions"]:
        assert question["ok"] and not question["error"], question
    for stage, counters in suite["counters"].items():
        assert counters.get("handler_errors", 0) == 0 and counters.get("rejected", 0) == 0, (stage, counters)
    assert set(suite["counters"]) >= STAGES - {"bus"}, suite["counters"].keys()
    [budget] = [row for name, row in rows.items() if "within the RAM budget" in name]
    assert budget["value"] == "yes" and budget["budget_mb"] == defaults.launcher.ram_budget_mb, budget
    json_path, md_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["suites"]["soak"]["curve"] == curve
    text = md_path.read_text()
    assert "RSS curve (MB)" in text and "| stream min |" in text and text == markdown(report)
