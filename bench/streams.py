"""`omnistream bench streams`: how many concurrent camera streams one machine keeps up with.

For 1, 2, 4 and 8 streams (``--quick``: 1 and 2, shorter) the whole system is started on a
fresh data directory with perception reading N 640x480 streams itself (``perception.sources``),
each a real recording paced in real time and looped: OpenCV's vtest.avi (pedestrians; from
opencv-doc, which scripts/install.sh installs), scaled to 640x480 at ``FPS`` frames/s
(``OMNISTREAM_STREAMS_MEDIA`` names another file). After a warm-up it measures, over a window:

- encoded frames/s per stream (``Percept``s on the bus; the input is ``FPS``),
- frame -> percept and frame -> record latency p95 (a record: memory's stored clip or sighting,
  on its way to reasoning; the frame's arrival is known from its percept's ``latency_s``),
- reasoning's backlog (records memory sent minus records reasoning streamed into its KV memory),
- first-token p95 of a question on stream 1 while the others run,
- RSS and CPU (cores, all threads) of each stage.

A count "keeps up" when every stream is encoded at >= ``MIN_FPS`` frames/s and its records reach
reasoning within ``MAX_RECORD_P95_S`` (p95) with no growing backlog; the first count that does not
is reported with the stage that saturates (the busiest process, and the symptom seen).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

STREAM_COUNTS = (1, 2, 4, 8)
QUICK_COUNTS = (1, 2)
FPS = 15.0
SIZE = (640, 480)
WARMUP_S, WINDOW_S = 20.0, 60.0
QUICK_WARMUP_S, QUICK_WINDOW_S = 10.0, 20.0
QUESTION = "What is on screen right now?"
MIN_FPS = 2.0  # below this per stream, scene cuts and object tracks get coarse (objects_fps = 2)
MAX_RECORD_P95_S = 10.0
STREAMED = ("clip", "transcript")  # the records reasoning prefills (reasoning/answer.py STREAMED_KINDS)
MEDIA = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
MODEL = "qwen2.5-coder-0.5b"  # the fast LLM (as bench soak); OMNISTREAM_STREAMS_MODEL names another

_last: dict = {}


def make_stream_file(source: Path, out: Path, fps: float = FPS, size: tuple[int, int] = SIZE) -> Path:
    """``source`` scaled to ``size`` and re-timed to ``fps`` (every frame kept), as H.264 in MKV."""
    import av
    import cv2

    with av.open(str(source)) as src, av.open(str(out), "w") as dst:
        stream = dst.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for index, frame in enumerate(src.decode(video=0)):
            image = cv2.resize(frame.to_ndarray(format="rgb24"), size, interpolation=cv2.INTER_AREA)
            encoded = av.VideoFrame.from_ndarray(image, format="rgb24")
            encoded.pts = index
            for packet in stream.encode(encoded):
                dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), seconds; nan when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return float("nan")


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95)) if values else float("nan")


class BusTap(threading.Thread):
    """Reads percepts, records and stats off the bus, with the wall time each arrived."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        import zmq

        from omnistream.protocol.sockets import make_socket

        self.sock = make_socket(zmq.Context.instance(), zmq.SUB, hwm=100_000)
        self.sock.connect(address)
        for topic in (b"Percept", b"Record", b"Stats"):
            self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.percepts: list[tuple[float, str, float, float]] = []  # wall, session, ts, latency_s
        self.records: list[tuple[float, str, float, str]] = []  # wall, session, ts, kind
        self.stats: dict[str, dict[str, float]] = {}

    def run(self) -> None:
        from omnistream.protocol.codec import ProtocolError
        from omnistream.protocol.messages import Percept, Record, Stats
        from omnistream.protocol.sockets import recv

        while not self.stop.is_set():
            if not self.sock.poll(100):
                continue
            try:
                _, message = recv(self.sock)
            except ProtocolError:
                continue
            now = time.monotonic()
            with self.lock:
                if isinstance(message, Percept):
                    self.percepts.append((now, message.session, message.ts, message.latency_s or 0.0))
                elif isinstance(message, Record):
                    self.records.append((now, message.session, message.ts, message.kind))
                elif isinstance(message, Stats):
                    self.stats[message.stage] = dict(message.counters)

    def close(self) -> None:
        self.stop.set()
        self.join(2)
        self.sock.close(0)


def measure(n: int, media: Path, warmup_s: float, window_s: float, progress: Callable[[str], None]) -> dict:
    """Run the system with ``n`` streams of ``media``; the figures of one count."""
    from omnistream.app.client import Client, ClientError
    from omnistream.app.launcher import Launcher, rss_mb
    from omnistream.app.models import prepare_llm_cache
    from omnistream.protocol.config import load_config

    root = Path(tempfile.mkdtemp(prefix="os-streams-", dir="/tmp"))
    config = load_config(
        None,
        {
            "paths.data_dir": str(root / "data"),
            "session": "cam",
            "perception.sources": [f"cam{i + 1}={media}" for i in range(n)],
            "perception.source_loop": True,
            "reasoning.model": os.environ.get("OMNISTREAM_STREAMS_MODEL", MODEL),
            "reasoning.max_new_tokens": 16,
            "reasoning.sessions_in_ram": max(n, 4),  # every stream's KV stays loaded
            "memory.sessions_in_ram": max(n, 8),
        },
    )
    prepare_llm_cache(config, progress=False)
    launcher = Launcher(config, root / "run")
    progress(f"bench streams: {n} stream(s): starting the system")
    launcher.start()
    supervisor = launcher.supervise_in_thread()
    tap = BusTap(launcher.addresses.bus_out)
    tap.start()
    try:
        time.sleep(warmup_s)
        pids = {c.name: c.pid for c in launcher.children.values()}
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        with tap.lock:
            streamed0 = tap.stats.get("reasoning", {}).get("records_streamed", 0.0)
            detections0 = tap.stats.get("perception", {}).get("detections", 0.0)
        start = time.monotonic()
        first_tokens: list[float] = []
        unanswered = 0
        with Client.connect(launcher.run_dir, session="cam1", timeout_s=60) as client:
            while time.monotonic() - start < window_s:
                sent = time.monotonic()
                first = None
                with tap.lock:  # asked at the stream's present (what is known by then is answered from)
                    now_ts = max((p[2] for p in tap.percepts if p[1] == "cam1"), default=0.0)
                try:
                    for _piece in client.ask(QUESTION, ts=now_ts, timeout_s=120):
                        first = first or time.monotonic() - sent
                except ClientError as exc:  # no answer in time: counted, the run goes on
                    progress(f"bench streams: {n} stream(s): a question failed: {exc}")
                    unanswered += 1
                if first is not None:
                    first_tokens.append(first)
                time.sleep(max(0.0, min(5.0, window_s - (time.monotonic() - start))))
        end = time.monotonic()
        seconds = end - start
        cpu = {name: (cpu_seconds(pid) - cpu0[name]) / seconds for name, pid in pids.items()}
        rss = {c.name: round(rss_mb(c.pid)) for c in launcher.children.values()}
        time.sleep(1.0)  # the last Stats
        with tap.lock:
            percepts = [p for p in tap.percepts if start <= p[0] < end]
            offsets: dict[str, list[tuple[float, float]]] = defaultdict(
                list
            )  # session: (ts, wall at arrival)
            for wall, session, ts, latency in tap.percepts:
                offsets[session].append((ts, wall - latency))
            records = [r for r in tap.records if start <= r[0] < end and r[3] != "synopsis"]
            # reasoning streams clips and transcripts into its KV memory (sightings stay in memory's)
            sent_total = sum(1 for r in tap.records if r[0] < end and r[3] in STREAMED)
            streamed = tap.stats.get("reasoning", {}).get("records_streamed", 0.0)
            perception_counters = dict(tap.stats.get("perception", {}))
        restarts = sum(c.restarts for c in launcher.children.values())
    finally:
        tap.close()
        supervisor.stop()
        shutil.rmtree(root, ignore_errors=True)
    per_stream = defaultdict(int)
    for _wall, session, _ts, _lat in percepts:
        per_stream[session] += 1
    fps = [per_stream.get(f"cam{i + 1}", 0) / seconds for i in range(n)]
    record_latency = []
    for wall, session, ts, _kind in records:
        pairs = offsets.get(session)
        if not pairs:
            continue
        # the frame at stream time ts arrived at ts + (arrival - ts) of the nearest percept
        nearest = min(pairs, key=lambda pair: abs(pair[0] - ts))
        record_latency.append(wall - (nearest[1] + (ts - nearest[0])))
    backlog = sent_total - streamed
    figures = {
        "streams": n,
        "seconds": round(seconds, 1),
        "fps_per_stream_mean": round(float(np.mean(fps)), 2),
        "fps_per_stream_min": round(float(np.min(fps)), 2),
        "percept_latency_p95_s": round(p95([p[3] for p in percepts]), 3),
        "record_latency_p95_s": round(p95(record_latency), 2),
        "records_per_s": round(len(records) / seconds, 2),
        "reasoning_backlog": int(backlog),
        "reasoning_backlog_at_start": int(
            sum(1 for r in tap.records if r[0] < start and r[3] in STREAMED) - streamed0
        ),
        "clips_per_s": round(sum(1 for r in records if r[3] == "clip") / seconds, 3),
        "sightings_per_s": round(sum(1 for r in records if r[3] == "sighting") / seconds, 3),
        "first_token_p95_s": round(p95(first_tokens), 2),
        "questions": len(first_tokens),
        "unanswered": unanswered,
        "frames_dropped": perception_counters.get("frames_dropped", 0.0),
        # objects (+ poses, hands) run on sampled frames at objects_fps per stream, on one thread
        "detections_per_s_per_stream": round(
            (perception_counters.get("detections", 0.0) - detections0) / seconds / n, 2
        ),
        "cpu_cores": {name: round(value, 2) for name, value in cpu.items()},
        "rss_mb": rss,
        "restarts": restarts,
        "load_1min": round(os.getloadavg()[0], 2),
    }
    busiest = max((name for name in cpu if name != "bus"), key=lambda name: cpu[name])
    symptoms = []
    if figures["fps_per_stream_min"] < MIN_FPS:
        symptoms.append(f"a stream encoded at {figures['fps_per_stream_min']} frames/s (< {MIN_FPS})")
    if not figures["record_latency_p95_s"] <= MAX_RECORD_P95_S:
        symptoms.append(f"records reach reasoning after {figures['record_latency_p95_s']} s p95")
    if unanswered:
        symptoms.append(f"{unanswered} question(s) not answered within 120 s")
    if figures["detections_per_s_per_stream"] < 1.0:  # half of perception.objects_fps
        symptoms.append(
            f"detectors at {figures['detections_per_s_per_stream']} frames/s per stream (objects_fps 2)"
        )
    if backlog > max(5, figures["reasoning_backlog_at_start"] + 2):
        symptoms.append(f"reasoning {backlog} records behind (growing)")
    figures["keeps_up"] = not symptoms
    figures["saturated"] = (
        "" if not symptoms else f"{busiest} ({cpu[busiest]:.2f} cores): " + "; ".join(symptoms)
    )
    progress(
        f"bench streams: {n} stream(s): {figures['fps_per_stream_mean']} frames/s per stream, record p95 "
        f"{figures['record_latency_p95_s']} s, first token p95 {figures['first_token_p95_s']} s, "
        f"{'keeps up' if figures['keeps_up'] else 'falls behind: ' + figures['saturated']}"
    )
    return figures


def run(quick: bool = False, progress: Callable[[str], None] = print) -> list[dict]:
    source = Path(os.environ.get("OMNISTREAM_STREAMS_MEDIA") or MEDIA)
    if not source.exists():
        raise FileNotFoundError(
            f"{source} is missing: run scripts/install.sh (opencv-doc) or set OMNISTREAM_STREAMS_MEDIA"
        )
    work = Path(tempfile.mkdtemp(prefix="os-streams-media-", dir="/tmp"))
    try:
        media = make_stream_file(source, work / "stream.mkv")
        counts = QUICK_COUNTS if quick else STREAM_COUNTS
        warmup, window = (QUICK_WARMUP_S, QUICK_WINDOW_S) if quick else (WARMUP_S, WINDOW_S)
        curve = [measure(n, media, warmup, window, progress) for n in counts]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _last["curve"] = curve
    limit = next((c for c in curve if not c["keeps_up"]), None)
    _last["limit"] = (
        {"streams": limit["streams"], "saturated": limit["saturated"]} if limit else {"streams": None}
    )
    rows = []
    for c in curve:
        n = c["streams"]
        rows += [
            {
                "name": f"{n} streams: encoded frames/s per stream (mean)",
                "value": c["fps_per_stream_mean"],
                "unit": "frames/s",
                "baseline_name": "input",
                "baseline": FPS,
            },
            {
                "name": f"{n} streams: frame -> record latency p95",
                "value": c["record_latency_p95_s"],
                "unit": "s",
            },
            {
                "name": f"{n} streams: first token p95 (stream 1)",
                "value": c["first_token_p95_s"],
                "unit": "s",
            },
            {"name": f"{n} streams: RSS all stages", "value": sum(c["rss_mb"].values()), "unit": "MB"},
        ]
    return rows


def report_extra() -> dict:
    curve = _last.get("curve", [])
    lines = [
        f"Streams: vtest.avi at {SIZE[0]}x{SIZE[1]}, {FPS:g} frames/s in, real time, looped.",
        "",
        "| streams | frames/s per stream (min) | detections/s per stream | percept p95 s | record p95 s | clips / sightings per s | reasoning backlog (start) | "
        "first token p95 s | CPU cores perception / memory / reasoning / gateway | RSS MB perception / memory / "
        "reasoning / speech / gateway | load | keeps up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in curve:
        cpu, rss = c["cpu_cores"], c["rss_mb"]
        lines.append(
            f"| {c['streams']} | {c['fps_per_stream_mean']} ({c['fps_per_stream_min']}) | "
            f"{c['detections_per_s_per_stream']} | "
            f"{c['percept_latency_p95_s']} | {c['record_latency_p95_s']} | "
            f"{c.get('clips_per_s', '-')} / {c.get('sightings_per_s', '-')} | "
            f"{c['reasoning_backlog']} ({c['reasoning_backlog_at_start']}) | {c['first_token_p95_s']} ({c['questions']} q) | "
            + " / ".join(str(cpu.get(s, "-")) for s in ("perception", "memory", "reasoning", "gateway"))
            + " | "
            + " / ".join(
                str(rss.get(s, "-")) for s in ("perception", "memory", "reasoning", "speech", "gateway")
            )
            + f" | {c['load_1min']} | {'yes' if c['keeps_up'] else 'no: ' + c['saturated']} |"
        )
    return {"curve": curve, "limit": _last.get("limit", {}), "markdown": "\n".join(lines)}
