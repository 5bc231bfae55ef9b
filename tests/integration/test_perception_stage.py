"""The perception stage with the default encoder and detectors, messages in and messages out (no
sockets): pushed frames, clips and scene cuts, detectors in clips, tracks, a file source, bounded
live sessions. (Sampling, the media receiver, sources, the stage on a tiny encoder:
tests/unit/test_perception_stage.py, test_perception_contract.py.)
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import av
import numpy as np
import pytest

from omnistream.app.replay import DEFAULT_SAMPLE
from omnistream.perception.encoder import load_encoder
from omnistream.perception.sources import MediaReader
from omnistream.perception.stage import PerceptionStage, build_detectors
from omnistream.protocol.config import PerceptionConfig
from omnistream.protocol.messages import AudioChunk, Clip, Error, Percept, VideoFrame

from ..unit.test_perception_stage import OPENCV_DATA

pytestmark = pytest.mark.slow  # the real default models (EfficientNet-Lite0, detectors)

REPO = Path(__file__).resolve().parents[2]
DEV_EPISODE = REPO / ".." / "shared" / "eval" / "dev"


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
