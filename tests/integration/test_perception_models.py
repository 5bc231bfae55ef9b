"""The default encoder, text reader and face detector on real media: Debian opencv-doc images, the
bundled sample, the mixed episode and the Megamind video. (The encoder interface on a tiny CLIP,
the face registry, motion: tests/unit/test_perception_models.py.)
"""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from omnistream.app.replay import DEFAULT_SAMPLE
from omnistream.perception.clips import top_labels
from omnistream.perception.detectors import (
    FaceDetector,
    TextReader,
)
from omnistream.perception.encoder import load_encoder
from omnistream.perception.sources import MediaReader

from ..unit.test_perception_models import OPENCV_DATA, image

pytestmark = pytest.mark.slow  # the real default models (EfficientNet-Lite0, RapidOCR, dlib faces)


def video_frames(name: str, every: int) -> list[np.ndarray]:
    with av.open(str(OPENCV_DATA / name)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    return frames[::every]


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("efficientnet-lite0")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("butterfly.jpg", "monarch (butterfly)"),
        ("orange.jpg", "orange (fruit)"),
        ("squirrel_cls.jpg", "fox squirrel"),
        ("board.jpg", "modem (equipment)"),
        ("messi5.jpg", "soccer ball"),
    ],
)
def test_efficientnet_names_known_images(encoder, name: str, expected: str) -> None:
    features, probs = encoder.encode([image(name)])
    assert features.shape == (1, 1280)
    labels = top_labels(probs[0], encoder.classes, k=3, min_score=0.0)
    assert labels[0].name == expected, labels


def test_batched_encoding_equals_one_by_one(encoder) -> None:
    frames = [image("orange.jpg"), image("board.jpg")[:, :512]]
    frames = [cv2.resize(f, (320, 240)) for f in frames]
    batch_features, batch_probs = encoder.encode(frames)
    for i, frame in enumerate(frames):
        features, probs = encoder.encode([frame])
        np.testing.assert_allclose(batch_features[i], features[0], atol=1e-4)
        np.testing.assert_allclose(batch_probs[i], probs[0], atol=1e-5)


def test_ocr_reads_known_text_images() -> None:
    reader = TextReader()
    assert "SUDOKU" in reader.read(image("sudoku.png"))
    assert [line.lower() for line in reader.read(image("LinuxLogo.jpg"))] == ["linux"]
    assert reader.read(image("orange.jpg")) == []


def test_ocr_reads_small_print_in_a_small_frame() -> None:
    """The BASMATI rice box in docs/episodes/mixed at 00:49 (a 640x360 frame): found once the
    frame is upscaled to 800 px for detection, missed at its own size."""
    video = Path(__file__).resolve().parents[2] / "docs" / "episodes" / "mixed" / "episode.mp4"
    with av.open(str(video)) as container:
        frame = next(
            f.to_ndarray(format="rgb24")
            for f in container.decode(container.streams.video[0])
            if float(f.pts * f.time_base) >= 49.0
        )
    assert frame.shape == (360, 640, 3)
    assert "BASMATI" in TextReader().read(frame)
    assert "BASMATI" not in TextReader(max_side=640).read(frame)


# Who is largest on screen in every 10th frame of Megamind.avi (checked by eye): the woman in
# purple (frames 10-90, again 160-190), the man with glasses (100-150, again 200-260); a man in
# the background shows as a small second face in 10-90.
WOMAN, BACKGROUND_MAN, GLASSES_MAN = "woman", "background man", "glasses man"


MEGAMIND_LARGEST = [None] + [WOMAN] * 9 + [GLASSES_MAN] * 6 + [WOMAN] * 4 + [GLASSES_MAN] * 7


def test_person_ids_are_stable_across_the_megamind_clip() -> None:
    detector = FaceDetector()
    frames = video_frames("Megamind.avi", every=10)
    assert len(frames) == len(MEGAMIND_LARGEST)
    ids: dict[str, set[int]] = {}
    for index, (frame, who) in enumerate(zip(frames, MEGAMIND_LARGEST, strict=True)):
        sightings = detector.detect(frame, ts=index * 10 / 25)
        assert bool(sightings) == (who is not None), index
        if sightings:
            ids.setdefault(who, set()).add(sightings[0].person_id)
        for extra in sightings[1:]:
            ids.setdefault(BACKGROUND_MAN, set()).add(extra.person_id)
    # One id per character all along (the woman comes back after the man's close-ups), no merges.
    assert ids == {WOMAN: {1}, BACKGROUND_MAN: {2}, GLASSES_MAN: {3}}
    woman = detector.registry.people[0]
    assert woman.first_seen == pytest.approx(0.4) and woman.last_seen == pytest.approx(7.6)


def sample_frames(times: list[float]) -> list[np.ndarray]:
    wanted, frames = sorted(times), []
    for event in MediaReader(DEFAULT_SAMPLE):
        if event.kind == "video" and wanted and event.ts >= wanted[0]:
            frames.append(event.data)
            wanted.pop(0)
    return frames


def test_real_encoder_names_the_butterfly_of_the_sample() -> None:
    from omnistream.perception.encoder import load_encoder

    encoder = load_encoder("efficientnet-lite0")
    butterfly, linux = sample_frames([5.0, 20.0])
    features, p = encoder.encode([butterfly, linux])
    assert features.shape == (2, 1280) and p.shape == (2, 1000)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    labels = [label.name for label in top_labels(p[0], encoder.classes, 3, 0.05)]
    assert any("butterfly" in name for name in labels), labels
    assert float(features[0] @ features[1]) < 0.8  # different scenes are far apart
