"""`omnistream bench perception`: the real perception process fed a live 640x480 30 fps stream.

The launcher starts the bus, the gateway and the perception stage as separate processes (the
other stages idle, i.e. not started); a client pushes frames of the dev episode (or the bundled
sample), resized to 640x480, through the gateway at 30 frames/s of wall clock, and a subscriber
on the bus receives the ``Percept``s. Frame-to-percept latency is measured from the moment the
client sends a frame to the moment its percept arrives (same process, same clock). Runs with
the detectors off, with COCO objects at ``objects_fps`` without and with poses and hands, and
with objects plus faces + OCR on keyframes. Baselines: the encoder alone (batch 1 and 4,
224x224), the object detector alone, and the whole detector frame (objects + pose + hands) alone
on opencv-doc's hand close-up and two-person photos, same machine, same run.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import psutil
import zmq

INPUT_FPS = 30.0
INPUT_SIZE = (640, 480)  # width, height
EPISODE = Path(__file__).resolve().parents[1] / ".." / "shared" / "eval" / "dev" / "episode.mp4"
WARMUP_S = 2.0


def input_frames(seconds: float, start_s: float = 10.0) -> list[np.ndarray]:
    """Frames of the dev episode from ``start_s`` (faces at 14-30 s, text at 30-44 s), at the
    input rate, 640x480 RGB. Falls back to the bundled sample when the episode is absent."""
    from omnistream.app.replay import DEFAULT_SAMPLE
    from omnistream.perception.sources import MediaReader

    path = EPISODE if EPISODE.exists() else DEFAULT_SAMPLE
    frames: list[np.ndarray] = []
    next_ts = start_s if path == EPISODE else 0.0
    for event in MediaReader(path):
        if event.kind != "video" or event.ts + 1e-6 < next_ts:
            continue
        # Repeat the frame until the next one is due: a 10 fps recording becomes a 30 fps stream.
        while event.ts + 1e-6 >= next_ts and len(frames) < seconds * INPUT_FPS:
            frames.append(cv2.resize(event.data, INPUT_SIZE, interpolation=cv2.INTER_LINEAR))
            next_ts += 1.0 / INPUT_FPS
        if len(frames) >= seconds * INPUT_FPS:
            break
    return frames


def encoder_alone(batch: int, seconds: float) -> tuple[float, float]:
    """(frames/s, CPU ms per frame) of EfficientNet-Lite0 on 224x224 inputs (1 thread),
    preprocessing excluded. CPU time is the fairer baseline on a machine shared with others."""
    import torch

    from omnistream.perception.efficientnet_lite import load_efficientnet_lite0

    torch.set_num_threads(1)
    model = load_efficientnet_lite0()
    pixels = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model(pixels)
        count, start, cpu_start = 0, time.monotonic(), time.process_time()
        while time.monotonic() - start < seconds:
            model(pixels)
            count += batch
    return count / (time.monotonic() - start), (time.process_time() - cpu_start) / count * 1000


MODES = {  # tag -> config overrides
    "detectors off": {"perception.faces": False, "perception.ocr": False, "perception.objects_fps": 0.0},
    "objects at 2 fps, no pose or hands": {
        "perception.faces": False,
        "perception.ocr": False,
        "perception.objects_fps": 2.0,
        "perception.pose": False,
        "perception.hands": False,
    },
    "objects + pose + hands at 2 fps": {
        "perception.faces": False,
        "perception.ocr": False,
        "perception.objects_fps": 2.0,
    },
    "objects at 2 fps + faces+OCR on keyframes": {
        "perception.faces": True,
        "perception.ocr": True,
        "perception.objects_fps": 2.0,
    },
}


def detector_alone(frames: list[np.ndarray], count: int) -> float:
    """CPU ms per frame of the object detector alone (1 thread), on 640x480 frames."""
    from omnistream.perception.objects import ObjectDetector

    detector = ObjectDetector(threads=1)
    detector.detect(frames[0])  # warm up
    start = time.process_time()
    for image in frames[:count]:
        detector.detect(image)
    return (time.process_time() - start) / max(min(count, len(frames)), 1) * 1000


def detectors_alone(image: np.ndarray, count: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per frame of the whole detector frame as the stage runs it (objects,
    the people's poses, hands: palms, landmarks, gestures, holds; 1 thread) on ``image``."""
    from omnistream.perception.detectors import DetectorWorker
    from omnistream.perception.hands import HandReader
    from omnistream.perception.objects import ObjectDetector
    from omnistream.perception.pose import PoseEstimator

    worker = DetectorWorker(
        None, None, ObjectDetector(threads=1), PoseEstimator(threads=1), HandReader(threads=1)
    )
    try:
        worker.submit(image, 0.0, "bench")  # warm up
        worker.wait_idle(30)
        worker.results()
        cpu, wall = time.process_time(), time.monotonic()
        for index in range(count):
            worker.submit(image, float(index), "bench")
            worker.wait_idle(30)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        assert len(worker.results()) == count
    finally:
        worker.close()
    return cpu / count * 1000, wall / count * 1000


HAND_PHOTO = Path("/usr/share/doc/opencv-doc/opencv4/html/handSrc.jpg")  # opencv-doc: an open hand
PEOPLE_PHOTO = Path("/usr/share/doc/opencv-doc/examples/data/basketball1.png")  # two men, a ball


def run_live(frames: list[np.ndarray], overrides: dict, tag: str, progress: Callable[[str], None]) -> dict:
    """Push ``frames`` at 30 fps through a real gateway -> bus -> perception; measure."""
    from omnistream.app.client import Client
    from omnistream.app.launcher import Launcher
    from omnistream.protocol.config import load_config
    from omnistream.protocol.messages import Percept, Stats
    from omnistream.protocol.sockets import make_socket, recv

    root = Path(tempfile.mkdtemp(prefix="os-bench-", dir="/tmp"))
    overrides = {"paths.data_dir": str(root / "data"), "stages": ["gateway", "perception"], **overrides}
    launcher = Launcher(load_config(None, overrides), root / "run")
    launcher.start()
    processes = {name: psutil.Process(child.pid) for name, child in launcher.children.items()}
    cpu_before = {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}
    sent_at: dict[int, float] = {}
    latencies: list[tuple[float, float]] = []  # (sent wall, latency s)
    last_stats: Stats | None = None
    ctx: zmq.Context = zmq.Context.instance()
    sub = make_socket(ctx, zmq.SUB, hwm=100_000)
    try:
        assert launcher.addresses is not None
        sub.connect(launcher.addresses.bus_out)
        sub.setsockopt(zmq.SUBSCRIBE, b"Percept")
        sub.setsockopt(zmq.SUBSCRIBE, b"Stats")
        with Client.connect(root / "run") as client:
            time.sleep(0.5)  # let the subscription reach the bus
            start = time.monotonic()
            for index, image in enumerate(frames, start=1):
                due = start + (index - 1) / INPUT_FPS
                while True:  # receive while waiting for the next frame's time
                    remaining = due - time.monotonic()
                    if sub.poll(max(int(remaining * 1000), 0)):
                        _, message = recv(sub)
                        now = time.monotonic()
                        if isinstance(message, Percept) and message.frame_index in sent_at:
                            latencies.append(
                                (sent_at[message.frame_index], now - sent_at[message.frame_index])
                            )
                        elif isinstance(message, Stats) and message.stage == "perception":
                            last_stats = message
                    elif remaining <= 0:
                        break
                sent_at[index] = time.monotonic()
                client.push_frame(image, ts=(index - 1) / INPUT_FPS, index=index)
            end = time.monotonic()
            cpu = {name: sum(p.cpu_times()[:2]) - cpu_before[name] for name, p in processes.items()}
            while time.monotonic() - end < 1.5:  # the last percepts and a final Stats
                if sub.poll(100):
                    _, message = recv(sub)
                    if isinstance(message, Percept) and message.frame_index in sent_at:
                        latencies.append(
                            (sent_at[message.frame_index], time.monotonic() - sent_at[message.frame_index])
                        )
                    elif isinstance(message, Stats) and message.stage == "perception":
                        last_stats = message
    finally:
        sub.close(linger=0)
        launcher.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    measured = [(t, lat) for t, lat in latencies if t - start >= WARMUP_S]
    span = max(end - start - WARMUP_S, 1e-6)
    values = np.array([lat for _, lat in measured]) if measured else np.zeros(1)
    third = max(len(values) // 3, 1)
    counters = last_stats.counters if last_stats else {}
    received = counters.get("frames_received", 0.0)
    progress(f"bench perception: {tag}: {len(measured) / span:.1f} frames/s")
    return {
        "encode_fps": len(measured) / span,
        "p50_ms": float(np.percentile(values, 50) * 1000),
        "p95_ms": float(np.percentile(values, 95) * 1000),
        "drift_ms": float((np.median(values[-third:]) - np.median(values[:third])) * 1000),
        "dropped_ratio": counters.get("frames_dropped", 0.0) / received if received else float("nan"),
        "sent": len(frames),
        "keyframes": counters.get("keyframes", 0.0),
        "faces_seen": counters.get("faces_seen", 0.0),
        "object_frames": counters.get("object_frames", 0.0) + counters.get("keyframes", 0.0),
        "objects_seen": counters.get("objects_seen", 0.0),
        "sightings": counters.get("sightings", 0.0),
        "detector_s": counters.get("detector_s", 0.0),
        "detections": counters.get("detections", 0.0),
        # CPU seconds per wall second (cores busy) of each process: load-independent cost.
        "cores": {name: used / (end - start) for name, used in cpu.items()},
    }


def run(quick: bool, progress: Callable[[str], None]) -> list[dict]:
    seconds = 10.0 if quick else 30.0
    progress(f"bench perception: preparing {seconds:.0f} s of 640x480 frames")
    frames = input_frames(seconds)
    alone1, alone1_cpu_ms = encoder_alone(1, 2.0 if quick else 5.0)
    alone4, _ = encoder_alone(4, 2.0 if quick else 5.0)
    rows = [
        {
            "name": "EfficientNet-Lite0 alone, batch 4, 224x224",
            "value": round(alone4, 1),
            "unit": "frames/s",
            "baseline_name": "batch 1",
            "baseline": round(alone1, 1),
        },
    ]
    try:
        detector_ms: float | None = detector_alone(frames, 10 if quick else 30)
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        progress(f"bench perception: no object detector ({exc})")
        detector_ms = None
    if detector_ms is not None:
        rows.append(
            {
                "name": "SSD-MobileNet-v2 COCO alone, 640x480, CPU per frame",
                "value": round(detector_ms, 1),
                "unit": "ms",
                "baseline_name": "EfficientNet-Lite0 alone, batch 1, CPU per frame",
                "baseline": round(alone1_cpu_ms, 1),
            }
        )
    for what, path in (("an open hand close-up", HAND_PHOTO), ("two people", PEOPLE_PHOTO)):
        if detector_ms is None or not path.exists():
            continue
        try:
            image = cv2.resize(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), INPUT_SIZE)
            cpu_ms, wall_ms = detectors_alone(image, 5 if quick else 15)
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            progress(f"bench perception: no pose or hand models ({exc})")
            break
        rows.append(
            {
                "name": f"objects + pose + hands alone, 640x480 ({what}), CPU per frame",
                "value": round(cpu_ms, 1),
                "unit": "ms",
                "baseline_name": "SSD-MobileNet-v2 COCO alone, CPU per frame",
                "baseline": round(detector_ms, 1),
            }
        )
        rows.append(
            {
                "name": f"objects + pose + hands alone, 640x480 ({what}), wall per frame",
                "value": round(wall_ms, 1),
                "unit": "ms",
            }
        )
    for tag, overrides in MODES.items():
        if detector_ms is None and "objects" in tag:
            continue
        detectors = tag != "detectors off"
        result = run_live(frames, overrides, tag, progress)
        rows += [
            {
                "name": f"sustained encode rate, 640x480 @ 30 fps input, {tag}",
                "value": round(result["encode_fps"], 2),
                "unit": "frames/s",
                "baseline_name": "EfficientNet-Lite0 alone, batch 1",
                "baseline": round(alone1, 1),
            },
            {
                "name": f"frame-to-percept latency p50, {tag}",
                "value": round(result["p50_ms"], 1),
                "unit": "ms",
            },
            {
                "name": f"frame-to-percept latency p95, {tag}",
                "value": round(result["p95_ms"], 1),
                "unit": "ms",
            },
            {
                "name": f"latency drift last third - first third (queue growth), {tag}",
                "value": round(result["drift_ms"], 1),
                "unit": "ms",
            },
            {
                "name": f"dropped-frame ratio, {tag}",
                "value": round(result["dropped_ratio"], 3),
                "unit": "fraction",
                "baseline_name": "frames sent",
                "baseline": result["sent"],
            },
        ]
        rows.append(
            {
                "name": f"perception process CPU per encoded frame, {tag}",
                "value": round(result["cores"]["perception"] / max(result["encode_fps"], 1e-6) * 1000, 1),
                "unit": "ms",
                "baseline_name": "EfficientNet-Lite0 alone, batch 1, CPU per frame",
                "baseline": round(alone1_cpu_ms, 1),
            }
        )
        for name, cores in sorted(result["cores"].items()):
            rows.append(
                {"name": f"CPU used by the {name} process, {tag}", "value": round(cores, 3), "unit": "cores"}
            )
        if detectors:
            rows.append(
                {
                    "name": f"frames run through the detectors, {tag}",
                    "value": result["object_frames"],
                    "unit": "frames",
                    "baseline_name": "objects found",
                    "baseline": result["objects_seen"],
                }
            )
            rows.append(
                {
                    "name": f"detector time per detected frame (wall, its own thread), {tag}",
                    "value": round(result["detector_s"] / max(result["detections"], 1) * 1000, 1),
                    "unit": "ms",
                }
            )
    return rows
