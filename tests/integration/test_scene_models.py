"""The default detectors on frames of the scenes episode (issue #17): left and right of a photo
shown inside black bars, no hand found in a bus front, the black cat on the right."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from omnistream.perception.detectors import DetectorWorker
from omnistream.perception.hands import HandReader
from omnistream.perception.objects import ObjectDetector
from omnistream.perception.pose import PoseEstimator

pytestmark = pytest.mark.slow  # the real default detector, pose and hand models

EPISODE = Path(__file__).resolve().parents[2] / "docs" / "episodes" / "scenes" / "episode.mp4"


def frame(at_s: float) -> np.ndarray:
    video = cv2.VideoCapture(str(EPISODE))
    video.set(cv2.CAP_PROP_POS_MSEC, at_s * 1000)
    ok, image = video.read()
    assert ok, f"cannot read {EPISODE} at {at_s} s"
    return np.ascontiguousarray(image[:, :, ::-1])


@pytest.fixture(scope="module")
def worker():
    worker = DetectorWorker(None, None, ObjectDetector(min_score=0.5), PoseEstimator(), HandReader())
    yield worker
    worker.close()


def detect(worker: DetectorWorker, image: np.ndarray) -> list[str]:
    worker.submit(image, 0.0, "s")
    assert worker.wait_idle(60.0)
    [found] = worker.results()
    return [sighting.describe() for sighting in found.objects or []]


def test_the_phone_at_the_left_of_a_photo_shown_inside_black_bars(worker: DetectorWorker) -> None:
    # The breakfast table (1032 x 829) fills x 96-544 of the 640 x 360 frame; the phone lies at
    # the left of the picture (of the whole screen: its middle third).
    found = detect(worker, frame(5.0))
    phones = [line for line in found if "phone" in line]
    assert phones and phones[0].endswith("phone (left)"), found


def test_no_hand_in_a_bus_front_and_the_cat_on_the_right(worker: DetectorWorker) -> None:
    bus = detect(worker, frame(20.0))  # the red double-decker
    assert any(line.startswith("red") and "bus" in line for line in bus), bus
    assert not any(line.startswith("hand") for line in bus), bus
    cat = detect(worker, frame(88.0))
    assert "black cat (right)" in cat, cat
