"""`omnistream bench soak [--minutes N]`: an accelerated, looped replay; is memory use flat?

Starts the whole system (the fast LLM) on a fresh data directory, streams the bundled sample
(``app/assets/sample.mkv``, or ``OMNISTREAM_SOAK_MEDIA``) in a loop with stream time increasing,
``speed`` x faster than real time, asks a question at minute 1 and then every 5 stream minutes (every other one
spoken), and every few seconds samples each process's resident memory (RSS, from /proc) and the
session's disk use. Reports, per process, RSS after warm-up (the baseline), at the end, its peak
and its slope over the second half (MB per stream hour; flat is about 0), the same for the data
directory, the questions answered, and the whole curve (JSON, and a markdown table).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

DEFAULT_MINUTES = 60.0
QUICK_MINUTES = 2.0
DEFAULT_SPEED = 8.0
SAMPLE_EVERY_S = 5.0
QUESTION_EVERY_MIN = 5.0  # stream minutes between questions
WARMUP_FRACTION = 0.1  # the baseline is taken after this share of the stream (at least 1 minute)
QUESTIONS = (
    "What is on screen right now?",
    "What did the reader say most recently?",
    "Which word was written on screen, and when?",
)

_last: dict = {}


def disk_mb(path: Path) -> float:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total / (1 << 20)


def slope_per_hour(stream_s: list[float], values: list[float]) -> float:
    """Least-squares slope in units per stream hour (nan with fewer than 3 points)."""
    pairs = [(s, v) for s, v in zip(stream_s, values, strict=True) if np.isfinite(v)]
    if len(pairs) < 3:
        return float("nan")
    x, y = np.array(pairs).T
    if np.ptp(x) == 0:
        return float("nan")
    return float(np.polyfit(x / 3600.0, y, 1)[0])


class _Supervisor(threading.Thread):
    def __init__(self, launcher):
        super().__init__(daemon=True)
        self.launcher, self.stop = launcher, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.launcher.step(timeout_ms=100)


def soak(
    minutes: float,
    speed: float = DEFAULT_SPEED,
    progress: Callable[[str], None] = lambda text: None,
    media: Path | None = None,
    model: str = "qwen2.5-coder-0.5b",
    sample_every_s: float | None = None,
) -> dict:
    """Run the soak; returns {"samples": [...], "questions": [...], "minutes", "speed", ...}."""
    from omnistream.app.client import Client, ClientError
    from omnistream.app.launcher import BUDGETED_STAGES, Launcher, rss_mb
    from omnistream.app.models import prepare_llm_cache
    from omnistream.app.replay import DEFAULT_SAMPLE
    from omnistream.perception.sources import AUDIO_RATE, MediaReader
    from omnistream.protocol.config import load_config

    if minutes <= 0 or speed <= 0:
        raise ValueError(f"soak needs minutes > 0 and speed > 0, got {minutes} and {speed}")
    media = Path(media or os.environ.get("OMNISTREAM_SOAK_MEDIA") or DEFAULT_SAMPLE)
    events = list(MediaReader(media, max_fps=5))
    if not events:
        raise ValueError(f"{media} holds no frames or audio")
    loop_s = max(e.ts for e in events) + 0.5
    root = Path(tempfile.mkdtemp(prefix="os-soak-", dir="/tmp"))
    config = load_config(
        None,
        {
            "paths.data_dir": str(root / "data"),
            "session": "soak",
            "reasoning.model": model,
            "reasoning.max_new_tokens": 32,
        },
    )
    prepare_llm_cache(config, progress=False)
    launcher = Launcher(config, root / "run")
    progress(f"soak: starting the system ({media.name}, {minutes:g} stream minutes at {speed:g}x)")
    launcher.start()
    supervisor = _Supervisor(launcher)
    supervisor.start()
    samples: list[dict] = []
    questions: list[dict] = []
    total_s = minutes * 60.0
    if sample_every_s is None:  # about 40 samples or more, at most every SAMPLE_EVERY_S
        sample_every_s = min(SAMPLE_EVERY_S, max(0.5, total_s / speed / 40))
    try:
        with Client.connect(launcher.run_dir, session="soak", timeout_s=60) as client:
            start = time.monotonic()
            next_sample = start
            next_question_ts = 60.0  # then every QUESTION_EVERY_MIN
            pending: dict[str, dict] = {}
            stream_s = 0.0
            loop = 0
            while stream_s < total_s:
                for event in events:
                    stream_s = loop * loop_s + event.ts
                    if stream_s >= total_s:
                        break
                    while True:
                        now = time.monotonic()
                        if now >= next_sample:
                            sample = {
                                "wall_s": round(now - start, 1),
                                "stream_min": round(stream_s / 60.0, 2),
                                "rss_mb": {
                                    c.name: round(rss_mb(c.pid), 1) for c in launcher.children.values()
                                },
                                "disk_mb": round(disk_mb(config.data_dir), 2),
                                "restarts": sum(c.restarts for c in launcher.children.values()),
                            }
                            budgeted = [sample["rss_mb"].get(name, 0.0) for name in BUDGETED_STAGES]
                            sample["rss_mb"]["memory+reasoning"] = round(sum(budgeted), 1)
                            sample["rss_mb"]["total"] = round(
                                sum(sample["rss_mb"][c.name] for c in launcher.children.values()), 1
                            )
                            samples.append(sample)
                            progress(
                                f"soak: {stream_s / 60:.1f}/{minutes:g} stream min, RSS total "
                                f"{sample['rss_mb']['total']:.0f} MB, disk {sample['disk_mb']:.1f} MB, "
                                f"{sum(1 for q in questions if q['ok'])}/{len(questions)} answered"
                            )
                            next_sample = now + sample_every_s
                        wait = start + stream_s / speed - now
                        for message in client.poll_events(max(min(wait, 0.05), 0.0)):
                            turn = getattr(message, "turn", "")
                            if type(message).__name__ == "AnswerDone" and turn in pending:
                                record = pending.pop(turn)
                                record.update(
                                    ok=not message.error and bool(message.text.strip()),
                                    error=message.error,
                                    seconds=round(time.monotonic() - record.pop("sent"), 2),
                                )
                                questions.append(record)
                        if wait <= 0:
                            break
                    if event.kind == "video":
                        client.push_frame(event.data, stream_s)
                    else:
                        client.push_audio(event.data, AUDIO_RATE, stream_s, channel="scene")
                    if stream_s >= next_question_ts:
                        question = QUESTIONS[len(questions) % len(QUESTIONS)]
                        speak = len(questions) % 2 == 0
                        try:
                            turn = client.send_ask(question, ts=stream_s, speak=speak)
                            pending[turn] = {"stream_min": round(stream_s / 60, 2), "sent": time.monotonic()}
                        except ClientError as exc:
                            questions.append(
                                {"stream_min": round(stream_s / 60, 2), "ok": False, "error": str(exc)}
                            )
                        next_question_ts += 60.0 * QUESTION_EVERY_MIN
                loop += 1
            deadline = time.monotonic() + 120
            while pending and time.monotonic() < deadline:
                for message in client.poll_events(0.1):
                    turn = getattr(message, "turn", "")
                    if type(message).__name__ == "AnswerDone" and turn in pending:
                        record = pending.pop(turn)
                        record.update(
                            ok=not message.error and bool(message.text.strip()), error=message.error
                        )
                        record.pop("sent")
                        questions.append(record)
            for record in pending.values():
                record.pop("sent", None)
                questions.append({**record, "ok": False, "error": "no AnswerDone within 120 s of the end"})
            status = client.status()
        wall_s = time.monotonic() - start
    finally:
        supervisor.stop.set()
        supervisor.join(10)
        launcher.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    counters = {name: dict(s.counters) for name, s in status.stages.items()}
    limits = config.limits.rss_mb  # each process's RSS bound (checked by tests/integration/test_soak.py)
    return {
        "ram_budget_mb": config.launcher.ram_budget_mb,
        "rss_limits_mb": {name: getattr(limits, name) for name in limits.__struct_fields__},
        "model": model,
        "minutes": minutes,
        "speed": speed,
        "media": str(media),
        "wall_s": round(wall_s, 1),
        "samples": samples,
        "questions": questions,
        "counters": counters,
    }


def summarise(result: dict) -> list[dict]:
    samples = result["samples"]
    if len(samples) < 2:
        raise ValueError("the soak took too few samples; run it longer")
    minutes = result["minutes"]
    warm_min = max(1.0, WARMUP_FRACTION * minutes) if minutes > 1.5 else minutes / 3
    warm = next((s for s in samples if s["stream_min"] >= warm_min), samples[-1])
    half = [s for s in samples if s["stream_min"] >= minutes / 2] or samples[-2:]
    end = samples[-1]
    rows = []
    for name in end["rss_mb"]:
        series = [s["rss_mb"].get(name, float("nan")) for s in samples]
        rows.append(
            {
                "name": f"RSS {name} at the end ({end['stream_min']:.0f} stream min)",
                "value": end["rss_mb"][name],
                "unit": "MB",
                "baseline": warm["rss_mb"].get(name),
                "baseline_name": f"after warm-up ({warm['stream_min']:.1f} stream min)",
                "peak": max(v for v in series if np.isfinite(v)) if any(np.isfinite(series)) else None,
                "slope_mb_per_stream_hour": round(
                    slope_per_hour(
                        [s["stream_min"] * 60 for s in half], [s["rss_mb"].get(name, np.nan) for s in half]
                    ),
                    1,
                ),
            }
        )
        rows.append(
            {
                "name": f"RSS {name} slope over the second half",
                "value": rows[-1]["slope_mb_per_stream_hour"],
                "unit": "MB per stream hour",
            }
        )
    budget = result.get("ram_budget_mb")
    peak = max(s["rss_mb"].get("memory+reasoning", float("nan")) for s in samples)
    if budget:
        rows.append(
            {
                "name": f"peak RSS memory + reasoning ({result.get('model', '')}) within the RAM budget",
                "value": "yes" if peak <= budget else "no",
                "unit": "",
                "peak_mb": peak,
                "budget_mb": budget,
            }
        )
    for name, limit in result.get("rss_limits_mb", {}).items():
        series = [s["rss_mb"].get(name, float("nan")) for s in samples]
        stage_peak = max((v for v in series if np.isfinite(v)), default=float("nan"))
        if limit:
            rows.append(
                {
                    "name": f"peak RSS {name} within limits.rss_mb.{name}",
                    "value": "yes" if stage_peak <= limit else "no",
                    "unit": "",
                    "peak_mb": stage_peak,
                    "limit_mb": limit,
                }
            )
    rows.append(
        {
            "name": "session data on disk at the end",
            "value": end["disk_mb"],
            "unit": "MB",
            "baseline": warm["disk_mb"],
            "baseline_name": f"after warm-up ({warm['stream_min']:.1f} stream min)",
        }
    )
    rows.append(
        {
            "name": "session data growth over the second half",
            "value": round(
                slope_per_hour([s["stream_min"] * 60 for s in half], [s["disk_mb"] for s in half]), 2
            ),
            "unit": "MB per stream hour",
        }
    )
    questions = result["questions"]
    answered = [q for q in questions if q.get("ok")]
    rows.append({"name": "questions answered", "value": len(answered), "unit": f"of {len(questions)}"})
    if answered:
        rows.append(
            {
                "name": "answer time (median)",
                "value": float(np.median([q["seconds"] for q in answered if "seconds" in q] or [np.nan])),
                "unit": "s",
            }
        )
    rows.append({"name": "stage restarts", "value": end["restarts"], "unit": ""})
    perception = result["counters"].get("perception", {})
    gateway = result["counters"].get("gateway", {})
    rows.append(
        {
            "name": "frames dropped by policy (perception)",
            "value": perception.get("frames_dropped", 0.0),
            "unit": f"of {perception.get('frames_received', 0.0):.0f} received",
        }
    )
    rows.append(
        {
            "name": "audio dropped by the rate limit (gateway)",
            "value": gateway.get("audio_dropped_s", 0.0),
            "unit": "s",
        }
    )
    rows.append(
        {
            "name": "wall time",
            "value": result["wall_s"],
            "unit": f"s for {minutes:g} stream min at {result['speed']:g}x",
        }
    )
    return rows


def curve_markdown(result: dict, max_rows: int = 30) -> str:
    samples = result["samples"]
    step = max(1, len(samples) // max_rows)
    picked = samples[::step]
    if picked[-1] is not samples[-1]:
        picked.append(samples[-1])
    names = list(samples[-1]["rss_mb"])
    lines = [
        "RSS curve (MB) and session data on disk:",
        "",
        "| stream min | wall s | " + " | ".join(names) + " | disk MB | restarts |",
        "|---" * (len(names) + 4) + "|",
    ]
    for s in picked:
        rss = " | ".join(f"{s['rss_mb'].get(n, float('nan')):.0f}" for n in names)
        lines.append(
            f"| {s['stream_min']:.1f} | {s['wall_s']:.0f} | {rss} | {s['disk_mb']:.2f} | {s['restarts']} |"
        )
    return "\n".join(lines)


def run(quick: bool, progress: Callable[[str], None], minutes: float | None = None) -> list[dict]:
    """The bench suite entry point (``omnistream bench soak [--minutes N] [--quick]``)."""
    minutes = minutes if minutes is not None else (QUICK_MINUTES if quick else DEFAULT_MINUTES)
    speed = float(os.environ.get("OMNISTREAM_SOAK_SPEED", DEFAULT_SPEED))
    result = soak(minutes, speed=speed, progress=progress)
    _last.clear()
    _last.update(
        curve=result["samples"],
        questions=result["questions"],
        counters=result["counters"],
        rss_limits_mb=result["rss_limits_mb"],
        markdown=curve_markdown(result),
    )
    return summarise(result)


def report_extra() -> dict:
    """Added to the suite's entry in bench.json (the curve) and bench.md (its table)."""
    return dict(_last)
