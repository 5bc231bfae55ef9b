"""`omnistream bench [SUITE ...]`: run benchmark suites, write JSON and a markdown table.

A suite is a module with ``run(quick: bool, progress: Callable[[str], None]) -> list[dict]``; each
row is one measurement with at least ``name`` (what was measured), ``value``, ``unit`` and, where
one exists, ``baseline`` and ``baseline_name`` measured in the same run. Each suite is a module of
this package (``SUITES``); no stage imports them, so stages stay independent of each other.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

SUITES = {
    "kernels": "omnistream.bench.kernels",
    "perception": "omnistream.bench.perception",
    "speech": "omnistream.bench.speech",
    "llm": "omnistream.bench.llm",
    "memory": "omnistream.bench.memory",
    "soak": "omnistream.bench.soak",
    "browser": "omnistream.bench.browser",  # the demo page's round trip in headless Chromium (when named)
    "voice": "omnistream.bench.voice",  # the TTS voices side by side (runs when named)
    "streams": "omnistream.bench.streams",  # 1, 2, 4, 8 concurrent camera streams (runs when named)
}
DEFAULT_SUITES = ("kernels", "perception", "speech", "llm", "memory")  # soak runs only when named (an hour)


def machine() -> dict:
    import torch

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(
                (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), ""
            )
        info["cpu"] = model or info["cpu"]
    except OSError:
        pass
    return info


def available_suites() -> list[str]:
    found = []
    for name, module in SUITES.items():
        if name not in DEFAULT_SUITES:
            continue
        try:
            if importlib.util.find_spec(module) is not None:
                found.append(name)
        except ModuleNotFoundError:
            continue
    return found


def run_suites(
    names: list[str], quick: bool, progress: Callable[[str], None], minutes: float | None = None
) -> dict:
    """``minutes`` goes to the suites that take it (the soak's stream minutes)."""
    report = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "quick": quick,
        "suites": {},
    }
    for name in names:
        if name not in SUITES:
            raise ValueError(f"unknown bench suite {name!r} (known: {', '.join(SUITES)})")
        module = importlib.import_module(SUITES[name])
        start = time.monotonic()
        progress(f"bench {name}: running")
        kwargs = {}
        if minutes is not None and "minutes" in inspect.signature(module.run).parameters:
            kwargs["minutes"] = minutes
        rows = module.run(quick=quick, progress=progress, **kwargs)
        report["suites"][name] = {"seconds": round(time.monotonic() - start, 1), "rows": rows}
        extra = getattr(module, "report_extra", None)
        if extra is not None:
            report["suites"][name].update(extra())
    return report


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; torch {m['torch']}; {report['started']}",
        "",
    ]
    for name, suite in report["suites"].items():
        lines += [
            f"### {name} ({suite['seconds']} s)",
            "",
            "| measurement | value | unit | baseline | baseline value |",
            "|---|---|---|---|---|",
        ]
        for row in suite["rows"]:
            lines.append(
                f"| {row['name']} | {_fmt(row.get('value'))} | {row.get('unit', '')} | "
                f"{row.get('baseline_name', '')} | {_fmt(row.get('baseline'))} |"
            )
        lines.append("")
        if suite.get("markdown"):
            lines += [suite["markdown"], ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "bench.json"
    md_path = out_dir / "bench.md"
    json_path.write_text(json.dumps(report, indent=1))
    md_path.write_text(markdown(report))
    return json_path, md_path
