"""Poses: the geometry on made-up keypoints (standing, sitting, an arm raised, an object held)
(MoveNet on OpenCV's sample photos through the object detector and the detector worker:
tests/integration/test_pose_models.py)."""

from __future__ import annotations

import numpy as np

from omnistream.perception.objects import ObjectSighting
from omnistream.perception.pose import (
    INDEX,
    Keypoints,
    held_objects,
    pose_words,
    posture,
    raised_arms,
)
from omnistream.perception.tracks import Tracker
from omnistream.protocol.labels import classes_in

# A person standing facing the camera, arms hanging, in frame pixels (y grows downwards); the
# torso (shoulders to hips) is 90 pixels.
STANDING = {
    "nose": (100, 40), "left_eye": (105, 35), "right_eye": (95, 35), "left_ear": (110, 38),
    "right_ear": (90, 38), "left_shoulder": (120, 70), "right_shoulder": (80, 70),
    "left_elbow": (125, 110), "right_elbow": (75, 110), "left_wrist": (128, 145),
    "right_wrist": (72, 145), "left_hip": (112, 160), "right_hip": (88, 160),
    "left_knee": (112, 230), "right_knee": (88, 230), "left_ankle": (112, 300),
    "right_ankle": (88, 300),
}  # fmt: skip
PERSON_BOX = (60, 20, 140, 310)


def keypoints(points: dict[str, tuple[float, float]], low: tuple[str, ...] = (), **moved) -> Keypoints:
    """Keypoints at ``points`` (overridden by ``moved``), score 0.9, except ``low`` at 0.1."""
    xy = np.zeros((17, 2), np.float32)
    score = np.full(17, 0.9, np.float32)
    for name, point in {**points, **moved}.items():
        xy[INDEX[name]] = point
    for name in low:
        score[INDEX[name]] = 0.1
    return Keypoints(xy, score)


def sighting(label: str, box: tuple[int, int, int, int], colour: str = "", position: str = "centre"):
    return ObjectSighting(label, 0.9, box, (640, 480), position, colour)


# --- geometry on made-up keypoints ---------------------------------------------------------------


def test_a_straight_body_stands_and_nothing_is_said_without_its_legs() -> None:
    assert posture(keypoints(STANDING)) == "standing"
    assert raised_arms(keypoints(STANDING)) == 0
    # Legs unseen (low scores): neither standing nor sitting.
    legs = ("left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
    assert posture(keypoints(STANDING, low=legs)) == ""
    # Knees seen but no ankle: not enough for "standing".
    assert posture(keypoints(STANDING, low=("left_ankle", "right_ankle"))) == ""
    # A knee bent sharply backwards (a step, a kick): not standing.
    assert posture(keypoints(STANDING, left_ankle=(150, 250))) == ""
    # Lying down (torso horizontal): no posture at all.
    lying = {name: (y, x) for name, (x, y) in STANDING.items()}
    assert posture(keypoints(lying)) == ""


def test_sitting_seen_from_the_side_and_from_the_front() -> None:
    side = dict(STANDING)
    side.update(
        left_shoulder=(100, 70), right_shoulder=(100, 70), left_hip=(100, 160), right_hip=(100, 160),
        left_knee=(170, 165), right_knee=(168, 168), left_ankle=(172, 240), right_ankle=(170, 242),
    )  # fmt: skip
    assert posture(keypoints(side)) == "sitting"
    # Feet under a table (ankles unseen): the level thighs still tell it.
    assert posture(keypoints(side, low=("left_ankle", "right_ankle"))) == "sitting"
    front = dict(STANDING)
    front.update(left_knee=(114, 178), right_knee=(86, 178), left_ankle=(114, 250), right_ankle=(86, 250))
    assert posture(keypoints(front)) == "sitting"
    # A lunge: one thigh level, the other straight down: neither.
    assert posture(keypoints(side, right_knee=(100, 230), right_ankle=(100, 300))) == ""
    # A level thigh with the shin stretched out sideways (a kick): not sitting.
    assert posture(keypoints(side, low=("right_hip", "right_knee"), left_ankle=(250, 175))) == ""


def test_an_arm_is_raised_only_when_the_wrist_is_well_above_shoulder_and_head() -> None:
    one = keypoints(STANDING, left_elbow=(128, 40), left_wrist=(130, 5))
    assert raised_arms(one) == 1 and "raising an arm" in pose_words(one)
    both = keypoints(
        STANDING, left_elbow=(128, 40), left_wrist=(130, 5), right_elbow=(72, 40), right_wrist=(70, 5)
    )
    assert raised_arms(both) == 2 and "raising both arms" in pose_words(both)
    # An arm stretched out sideways, the hand a little above the shoulder but below the head.
    assert raised_arms(keypoints(STANDING, left_elbow=(160, 68), left_wrist=(200, 58))) == 0
    # Above the shoulder by a third of the torso but below the nose (an arm out, bent up a little).
    assert raised_arms(keypoints(STANDING, left_elbow=(160, 60), left_wrist=(175, 42))) == 0
    # Wrist above the shoulder but hardly (a hand at the chin).
    assert raised_arms(keypoints(STANDING, left_wrist=(110, 55))) == 0
    # The raised wrist not seen for sure: nothing said.
    assert raised_arms(keypoints(STANDING, low=("left_wrist",), left_wrist=(130, 5))) == 0


def test_an_object_at_a_hand_is_held_and_one_elsewhere_is_not() -> None:
    kp = keypoints(STANDING)
    cup = sighting("cup", (120, 135, 145, 165), "red")  # around the left wrist
    ball = sighting("sports ball", (85, 285, 115, 310), "yellow")  # at the feet
    assert [thing for _, thing in held_objects(kp, PERSON_BOX, [cup, ball])] == [cup]
    assert pose_words(kp, [cup]) == ("standing", "holding a red cup")
    assert pose_words(kp, [sighting("apple", (60, 135, 80, 155))]) == ("standing", "holding an apple")
    # Just beyond the wrist along the forearm (the hand): still held.
    phone = sighting("cell phone", (125, 158, 140, 175))
    assert [thing for _, thing in held_objects(kp, PERSON_BOX, [phone])] == [phone]
    # A TV or a table at the hand, an object bigger than the person, or an unseen wrist: not held.
    assert held_objects(kp, PERSON_BOX, [sighting("tv", (120, 135, 145, 165))]) == []
    assert held_objects(kp, PERSON_BOX, [sighting("umbrella", (0, 0, 300, 400))]) == []
    unseen = keypoints(STANDING, low=("left_wrist", "left_elbow"))
    assert held_objects(unseen, PERSON_BOX, [cup]) == []


def test_pose_words_ride_in_the_description_and_leave_the_tracker_alone() -> None:
    plain = sighting("person", (100, 50, 300, 470), "blue", "left, near")
    posed = ObjectSighting(*[getattr(plain, f) for f in ("label", "score", "box", "frame_size", "position", "colour")],
                           pose=("standing", "raising an arm", "holding a yellow ball"))  # fmt: skip
    assert (
        posed.describe()
        == "person in a blue shirt (left, near, standing, raising an arm, holding a yellow ball)"
    )
    assert plain.describe() == "person in a blue shirt (left, near)"
    assert classes_in(posed.describe()) == ["person", "sports ball"]
    tracker = Tracker(min_hits=2)
    events = tracker.update(0.0, [plain]) + tracker.update(0.5, [posed])
    assert [t.name for t in tracker.in_view()] == ["person 1"]
    assert [e.text for e in events] == ["person 1 (in a blue shirt) entered at 00:00, on the left, near"]
