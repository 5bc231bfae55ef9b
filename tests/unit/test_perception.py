"""Clip segmentation on exact synthetic features, ImageNet names, the media reader (the real encoder
on frames of the bundled sample: tests/integration/test_perception_models.py)."""

from __future__ import annotations

import numpy as np
import pytest

from omnistream.app.replay import DEFAULT_SAMPLE
from omnistream.perception.clips import ClipSegmenter, top_labels
from omnistream.perception.encoder import ClassName, imagenet_classes
from omnistream.perception.sources import MediaError, MediaReader

CLASSES = [ClassName(f"class{i}", "thing" if i % 2 else "") for i in range(4)]


def unit(index: int, dim: int = 8) -> np.ndarray:
    vector = np.zeros(dim, np.float32)
    vector[index] = 1.0
    return vector


def probs(index: int) -> np.ndarray:
    p = np.full(4, 0.05, np.float32)
    p[index] = 0.85
    return p


def feed(segmenter: ClipSegmenter, scenes: list[int], fps: float = 1.0):
    closed = []
    for i, scene in enumerate(scenes):
        closed += segmenter.push(i / fps, unit(scene), probs(scene % 4))
    return closed


def test_scene_change_cuts_after_consecutive_distant_frames() -> None:
    segmenter = ClipSegmenter(CLASSES, cut_distance=0.5, cut_frames=2, max_clip_s=100)
    closed = feed(segmenter, [0, 0, 0, 1, 1, 1])
    assert [(c.clip_id, c.t0, c.ts, c.n_frames) for c in closed] == [(1, 0.0, 2.0, 3)]
    assert closed[0].labels[0].name == "class0"
    last = segmenter.close()
    assert (last.clip_id, last.t0, last.ts, last.n_frames) == (2, 3.0, 5.0, 3)
    assert last.labels[0].name == "class1 (thing)"
    np.testing.assert_allclose(last.features, unit(1), atol=1e-6)


def test_single_odd_frame_does_not_cut() -> None:
    segmenter = ClipSegmenter(CLASSES, cut_distance=0.5, cut_frames=2, max_clip_s=100)
    assert feed(segmenter, [0, 0, 2, 0, 0]) == []
    clip = segmenter.close()
    assert clip.n_frames == 5 and clip.clip_id == 1


def test_max_length_cuts_a_static_scene() -> None:
    segmenter = ClipSegmenter(CLASSES, cut_distance=0.5, max_clip_s=3.0)
    closed = feed(segmenter, [0] * 9)
    assert [(c.t0, c.ts) for c in closed] == [(0.0, 3.0), (4.0, 7.0)]
    assert [c.clip_id for c in closed] == [1, 2]


def test_top_labels_keep_at_least_the_best() -> None:
    p = np.array([0.01, 0.02, 0.03, 0.04], np.float32)
    assert [label.name for label in top_labels(p, CLASSES, k=3, min_score=0.5)] == ["class3 (thing)"]


def test_imagenet_names_carry_plain_categories() -> None:
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert classes[323].label() == "monarch (butterfly)"
    assert classes[950].label() == "orange (fruit)"
    assert classes[151].label() == "Chihuahua (dog)"


def test_media_reader_interleaves_video_and_audio_in_time_order() -> None:
    reader = MediaReader(DEFAULT_SAMPLE, max_fps=5)
    events = list(reader)
    assert reader.duration_s == pytest.approx(30.0, abs=0.2)
    times = [e.ts for e in events]
    assert times == sorted(times)
    video = [e for e in events if e.kind == "video"]
    audio = [e for e in events if e.kind == "audio"]
    assert len(video) == pytest.approx(150, abs=2)
    assert video[0].data.shape == (360, 640, 3) and video[0].data.dtype == np.uint8
    assert sum(len(e.data) for e in audio) / 16000 == pytest.approx(30.0, abs=0.1)


def test_corrupt_media_is_reported_by_name(short_tmp) -> None:
    bogus = short_tmp / "not-a-video.mp4"
    bogus.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(MediaError, match="not-a-video.mp4"):
        MediaReader(bogus)
    truncated = short_tmp / "truncated.mkv"
    truncated.write_bytes(DEFAULT_SAMPLE.read_bytes()[:200_000])
    events = []
    try:
        events.extend(MediaReader(truncated))
    except MediaError as exc:
        assert "truncated.mkv" in str(exc)
    assert len(events) > 0
    assert max(e.ts for e in events) < 30.0
