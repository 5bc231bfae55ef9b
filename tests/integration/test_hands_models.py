"""Hands on real photos with the default hand models (palm detector and landmarks) and the object
detector. (The landmark geometry and what a hand holds: tests/unit/test_hands.py.)
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from omnistream.perception.hands import (
    HandReader,
    finger_states,
)
from omnistream.protocol.config import PerceptionConfig

pytestmark = pytest.mark.slow  # the real default detector models


HAND_PHOTO = Path("/usr/share/doc/opencv-doc/opencv4/html/handSrc.jpg")  # an open hand (opencv-doc)


SAMPLES = Path("/usr/share/doc/opencv-doc/examples/data")


def rgb(path: Path) -> np.ndarray:
    if not path.exists():
        pytest.skip(f"{path} is missing (the Debian package opencv-doc; scripts/install.sh installs it)")
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def reader() -> HandReader:
    try:
        return HandReader()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(f"hand models unavailable: {exc}")


def test_an_open_hand_in_a_photo(reader: HandReader) -> None:
    image = rgb(HAND_PHOTO)
    hands = reader.find(image)
    assert len(hands) == 1
    hand = hands[0]
    assert hand.score > 0.9 and hand.gesture == "an open hand"
    assert all(state == "extended" for state in finger_states(hand.points).values())
    # the fingertips lie right of the palm (the hand points right in this photo)
    assert hand.points[[8, 12, 16, 20], 0].min() > hand.points[[5, 9, 13, 17], 0].max()


@pytest.mark.parametrize("turn", [cv2.ROTATE_90_CLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_COUNTERCLOCKWISE])
def test_the_hand_is_found_turned(reader: HandReader, turn: int) -> None:
    hands = reader.find(cv2.rotate(rgb(HAND_PHOTO), turn))
    assert [hand.gesture for hand in hands] == ["an open hand"]


def test_no_hands_in_a_fruit_bowl(reader: HandReader) -> None:
    assert reader.find(rgb(SAMPLES / "fruits.jpg")) == []


def test_detectors_describe_a_hand_in_a_photo() -> None:
    from omnistream.perception.stage import build_detectors

    worker = build_detectors(PerceptionConfig(faces=False, ocr=False))
    if worker is None or worker.hands is None or worker.objects is None:
        pytest.skip("object or hand models unavailable")
    try:
        worker.submit(rgb(HAND_PHOTO), 1.0, "s")
        assert worker.wait_idle(30)
        [found] = worker.results()
        assert [s.describe() for s in found.objects or []] == ["hand (centre, near, showing an open hand)"]
    finally:
        worker.close()
    assert build_detectors(PerceptionConfig(faces=False, ocr=False, hands=False)).hands is None
