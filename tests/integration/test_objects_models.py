"""The default COCO object detector on real photos and a video: classes, boxes, colours.
(Colour names, tracking and memory's timeline: tests/unit/test_objects.py.)
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from omnistream.perception.objects import (
    ObjectDetector,
    colour_name,
)

from ..unit.test_objects import rgb

pytestmark = pytest.mark.slow  # the real default detector model

EPISODE = Path(__file__).resolve().parents[2] / "docs" / "episodes" / "objects" / "episode.mp4"


@pytest.fixture(scope="module")
def detector() -> ObjectDetector:
    return ObjectDetector(min_score=0.5)


def test_detector_finds_the_footballer_and_his_ball(detector: ObjectDetector) -> None:
    found = detector.detect(rgb("messi5.jpg"))
    labels = [s.label for s in found]
    assert labels[:2] == ["person", "sports ball"], found
    person, ball = found[0], found[1]
    assert person.score > 0.9 and ball.score > 0.9
    # The ball is at his feet: inside the lower part of the person's box.
    assert person.box[0] <= ball.box[0] and ball.box[3] <= person.box[3] + 5
    assert ball.describe().endswith("ball (centre)")


def test_detector_finds_oranges_and_nothing_on_a_blank_frame(detector: ObjectDetector) -> None:
    found = detector.detect(rgb("fruits.jpg"))
    assert found and found[0].label == "orange" and found[0].score > 0.9
    assert "orange" in found[0].colour
    assert detector.detect(np.full((240, 320, 3), 128, np.uint8)) == []


def test_opencv_samples_colours(detector: ObjectDetector) -> None:
    """Real photos (opencv-doc): the apple is orange-red, the orange wedge orange, the mandrill's
    nose red; the footballer's striped shirt blue and red, his ball yellow (the detector's boxes)."""
    apple, fruits, baboon = (rgb(name) for name in ("apple.jpg", "fruits.jpg", "baboon.jpg"))
    assert colour_name(apple[170:340, 170:340]) == "orange-red"
    assert colour_name(fruits[160:320, 170:340]).startswith("orange")
    assert colour_name(baboon[250:330, 200:310]) == "red"
    person, ball = detector.detect(rgb("messi5.jpg"))[:2]
    assert person.colour.startswith("blue") and ball.colour == "yellow" and ball.name() == "yellow ball"


def test_a_striped_shirt_in_a_stream_is_two_colours(detector: ObjectDetector) -> None:
    """The footballer as the objects episode's H.264 stream shows him (640x360, at 5 s): his
    shirt of blue and red stripes is named by both colours."""
    capture = cv2.VideoCapture(str(EPISODE))
    capture.set(cv2.CAP_PROP_POS_MSEC, 5000)
    ok, frame = capture.read()
    capture.release()
    assert ok, f"{EPISODE} unreadable"
    person = detector.detect(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))[0]
    assert person.label == "person" and person.name() == "person in a blue and red shirt", person
