"""Hands: gestures from landmark geometry, what a hand holds, and how hands join a frame's
detections (MediaPipe's palm and landmark models on a real photo: tests/integration/test_hands_models.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from omnistream.perception.hands import (
    ANCHORS,
    Hand,
    annotate,
    gesture,
    held_by,
)
from omnistream.perception.objects import ObjectSighting

# --- landmark geometry -----------------------------------------------------------------------


def synthetic_hand(fingers: str, thumb: str, turn_deg: float = 0.0) -> np.ndarray:
    """21 landmarks of a hand whose fingers point right (+x) from a wrist at the origin: each of
    index, middle, ring, pinky "e"xtended or "c"urled (``fingers``, 4 letters); the thumb
    "out" (sideways, straight), "up" or "down" (straight, vertical) or "in" (folded on the palm);
    the whole hand then turned by ``turn_deg``."""
    points = np.zeros((21, 3), np.float32)
    for k, (state, y) in enumerate(zip(fingers, (-30, -10, 10, 30), strict=True)):
        base = 5 + 4 * k
        points[base] = (80, y, 0)
        if state == "e":
            points[base + 1 : base + 4] = [(110, y, 0), (130, y, 0), (145, y, 0)]
        else:  # folded back towards the palm
            points[base + 1 : base + 4] = [(105, y, 0), (90, y, 0), (75, y, 0)]
    points[1] = (20, -20, 0)
    if thumb == "out":
        points[2:5] = [(45, -45, 0), (65, -65, 0), (80, -80, 0)]
    elif thumb == "up":
        points[2:5] = [(40, -40, 0), (45, -70, 0), (48, -95, 0)]
    elif thumb == "down":
        points[1:5] = [(20, 20, 0), (40, 40, 0), (45, 70, 0), (48, 95, 0)]
    else:  # in: across the palm, its tip at the index finger's base
        points[2:5] = [(40, -35, 0), (60, -30, 0), (75, -28, 0)]
    angle = math.radians(turn_deg)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], np.float32)
    points[:, :2] = points[:, :2] @ rotation.T + 300
    return points


@pytest.mark.parametrize(
    ("fingers", "thumb", "expected"),
    [
        ("eeee", "out", "an open hand"),
        ("eeee", "in", "an open hand"),
        ("eccc", "in", "pointing"),
        ("eecc", "in", "a V sign"),
        ("cccc", "in", "a fist"),
        ("cccc", "up", "a thumbs up"),
        ("cccc", "down", "a thumbs down"),
        ("ecce", "in", ""),  # no gesture we name
    ],
)
def test_gestures_from_landmark_geometry(fingers: str, thumb: str, expected: str) -> None:
    assert gesture(synthetic_hand(fingers, thumb)) == expected


@pytest.mark.parametrize("turn", [-90.0, 35.0, 180.0])
def test_gestures_hold_at_any_rotation(turn: float) -> None:
    """Finger states use joint angles and distances from the wrist, not image directions
    (a thumbs up is the exception: it means the thumb points up in the image)."""
    for fingers, thumb, expected in [
        ("eeee", "out", "an open hand"),
        ("eccc", "in", "pointing"),
        ("cccc", "in", "a fist"),
    ]:
        assert gesture(synthetic_hand(fingers, thumb, turn)) == expected
    assert gesture(synthetic_hand("cccc", "up", 180.0)) != "a thumbs up"


def test_palm_anchors_are_mediapipes() -> None:
    """2016 anchors: a 24x24 grid (stride 8) with 2 a cell, then 12x12 (stride 16) with 6."""
    assert ANCHORS.shape == (2016, 2)
    assert np.allclose(ANCHORS[0], (0.5 / 24, 0.5 / 24)) and np.allclose(ANCHORS[1], ANCHORS[0])
    assert np.allclose(ANCHORS[1152], (0.5 / 12, 0.5 / 12)) and np.allclose(ANCHORS[1157], ANCHORS[1152])
    assert np.allclose(ANCHORS[-1], (11.5 / 12, 11.5 / 12))


# --- the models on a real photo --------------------------------------------------------------


# --- holding and joining the detections ------------------------------------------------------


def sighting(label: str, box: tuple[int, int, int, int], colour: str = "", size=(640, 480)) -> ObjectSighting:
    return ObjectSighting(label, 0.9, box, size, "centre", colour)


def hand_at(box: tuple[int, int, int, int], gesture_name: str = "") -> Hand:
    x1, y1, x2, y2 = box
    points = np.zeros((21, 3), np.float32)
    points[:, 0] = np.linspace(x1, x2, 21)
    points[:, 1] = np.linspace(y1, y2, 21)
    return Hand(points=points, score=0.95, gesture=gesture_name)


def test_a_hand_holds_what_its_box_meets() -> None:
    hand = hand_at((100, 100, 160, 170))
    cup = sighting("cup", (150, 120, 200, 180), "red")
    far_phone = sighting("cell phone", (400, 100, 440, 160))
    table = sighting("dining table", (0, 150, 640, 480))
    assert held_by(hand, [far_phone, table, cup]) == [cup]


def test_hands_join_their_person_or_stand_alone() -> None:
    person = sighting("person", (50, 40, 300, 470), "blue")
    cup = sighting("cup", (150, 120, 200, 180), "red")
    phone = sighting("cell phone", (520, 300, 560, 360), "black")
    hands = [hand_at((100, 100, 160, 170), "a thumbs up"), hand_at((500, 280, 560, 350), "pointing")]
    out = annotate([person, cup, phone], {}, hands, (640, 480))
    assert (
        out[0].describe()
        == "person in a blue shirt (centre, holding a red cup, giving a thumbs up on the left)"
    )
    loose = [s for s in out if s.label == "hand"]
    assert len(loose) == 1 and loose[0].pose == ("pointing", "holding a black phone")
    assert loose[0].position.startswith("right")


def test_a_close_up_hand_taken_for_a_person_is_a_hand() -> None:
    """The COCO detector calls a hand filling the frame a person; with no torso seen and the
    hand covering the box, the detection becomes the hand."""
    person = sighting("person", (0, 20, 530, 450), "grey")
    out = annotate([person], {}, [hand_at((0, 24, 526, 442), "an open hand")], (640, 480))
    assert [s.describe().split(" (")[0] for s in out] == ["hand"]
    assert out[0].pose == ("showing an open hand",)
