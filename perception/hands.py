"""Hands: where they are, what they show (an open hand, pointing, a thumbs up, a fist, a V sign)
and what they hold; from 21 hand landmarks.

The models are MediaPipe's own, the ``.tflite`` files of the ``mediapipe`` 0.10 wheel
(``mediapipe/modules/palm_detection/palm_detection_lite.tflite`` and
``hand_landmark/hand_landmark_lite.tflite``, Apache-2.0; the package itself is never imported), run
by LiteRT as the pose model is. The pipeline is MediaPipe's hand tracking, written out:

1. Palm detection on the whole frame (letterboxed to 192x192; an SSD with 2016 fixed anchors, one
   box and seven palm keypoints each, then non-maximum suppression). A palm's hand region is a
   square 2.6 times the palm's size, shifted half a palm towards the fingers and turned so that
   the wrist -> middle finger direction points up.
2. Where the palm detector finds nothing but a person's wrist was seen (MoveNet keypoints, people
   too far for the palm detector), the region comes from the forearm: centred beyond the wrist
   along elbow -> wrist, about a forearm long, turned the same way.
3. Hand landmarks in each region (224x224 crop): 21 points (wrist, four per finger) and a
   hand-presence score; regions whose score is low are dropped.

Gestures are plain geometry on the landmarks (angles at the finger joints, distances from the
wrist), so they hold at any size and rotation; nothing is said when unsure. An object "held" is a
detected object (not a person, not furniture) whose box meets the hand's landmark box.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from omnistream.perception.objects import ObjectSighting, package_dir, position_words
from omnistream.perception.pose import NOT_HELD, Keypoints, article, describe_people, litert

log = logging.getLogger("omnistream.perception")

PALM_SIZE = 192
HAND_SIZE = 224
FINGERS = {
    "index": (5, 6, 7, 8),
    "middle": (9, 10, 11, 12),
    "ring": (13, 14, 15, 16),
    "pinky": (17, 18, 19, 20),
}
THUMB = (1, 2, 3, 4)
WRIST = 0


def _palm_anchors() -> np.ndarray:
    """MediaPipe's palm anchors ((x, y) centres, 0..1): 4 layers, strides 8, 16, 16, 16, two
    anchors a cell per layer (aspect ratio 1 and the interpolated scale), fixed size; layers of
    the same stride share cells."""
    strides = (8, 16, 16, 16)
    anchors: list[tuple[float, float]] = []
    layer = 0
    while layer < len(strides):
        per_cell = 0
        last = layer
        while last < len(strides) and strides[last] == strides[layer]:
            per_cell += 2
            last += 1
        cells = math.ceil(PALM_SIZE / strides[layer])
        for y in range(cells):
            for x in range(cells):
                anchors += [((x + 0.5) / cells, (y + 0.5) / cells)] * per_cell
        layer = last
    return np.array(anchors, np.float32)


ANCHORS = _palm_anchors()  # (2016, 2)


@dataclass(frozen=True)
class Region:
    """A square hand region in frame pixels: centre, side, and the unit vector (image
    coordinates, y down) from the wrist towards the fingers."""

    centre: tuple[float, float]
    side: float
    up: tuple[float, float]

    def to_frame(self, size: int) -> np.ndarray:
        """The 2x3 affine map from crop pixels (``size`` x ``size``) to frame pixels."""
        ux, uy = self.up
        right = np.array([-uy, ux]) * self.side / size  # crop x axis, in frame pixels per crop pixel
        down = np.array([-ux, -uy]) * self.side / size  # crop y axis (away from the fingers)
        centre = np.array(self.centre)
        origin = centre - right * size / 2 - down * size / 2
        return np.array([[right[0], down[0], origin[0]], [right[1], down[1], origin[1]]], np.float32)

    def crop(self, image: np.ndarray, size: int) -> np.ndarray:
        return cv2.warpAffine(
            image,
            self.to_frame(size),
            (size, size),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderValue=(0, 0, 0),
        )


def _unit(vector: np.ndarray) -> tuple[float, float] | None:
    norm = float(np.linalg.norm(vector))
    return None if norm < 1e-6 else (float(vector[0] / norm), float(vector[1] / norm))


def _angle(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
    """The angle at ``b`` (degrees): 180 is straight."""
    u, v = a - b, c - b
    cos = float(np.dot(u, v) / max(float(np.linalg.norm(u) * np.linalg.norm(v)), 1e-6))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def finger_states(points: np.ndarray) -> dict[str, str]:
    """ "extended", "curled" or "" (unsure) for the thumb and the four fingers of 21 landmarks
    ((21, 3) pixels: x, y and a depth in about the same scale)."""
    wrist = points[WRIST]
    states = {}
    for name, (mcp, pip, dip, tip) in FINGERS.items():
        bend_pip = _angle(points[mcp], points[pip], points[dip])
        bend_dip = _angle(points[pip], points[dip], points[tip])
        reach_tip = np.linalg.norm(points[tip] - wrist)
        reach_pip = np.linalg.norm(points[pip] - wrist)
        if bend_pip > 150 and bend_dip > 130 and reach_tip > 1.15 * reach_pip:
            states[name] = "extended"
        elif bend_pip < 120 or reach_tip < reach_pip:
            states[name] = "curled"
        else:
            states[name] = ""
    cmc, mcp, ip, tip = THUMB
    palm = float(np.linalg.norm(points[FINGERS["middle"][0]] - wrist))  # wrist to the middle finger's base
    straight = (
        _angle(points[cmc], points[mcp], points[ip]) > 130
        and _angle(points[mcp], points[ip], points[tip]) > 140
    )
    reach = float(np.linalg.norm(points[tip] - points[FINGERS["index"][0]]))  # from the index finger's base
    if straight and reach > 0.5 * palm:
        states["thumb"] = "extended"
    elif reach < 0.35 * palm:
        states["thumb"] = "curled"
    else:
        states["thumb"] = ""
    return states


def gesture(points: np.ndarray) -> str:
    """ "an open hand", "pointing", "a thumbs up", "a thumbs down", "a fist", "a V sign" or ""."""
    states = finger_states(points)
    four = [states[name] for name in FINGERS]
    if all(s == "extended" for s in four):
        return "an open hand"
    if (
        states["index"] == "extended"
        and states["middle"] == "extended"
        and states["ring"] == "curled" == states["pinky"]
    ):
        return "a V sign"
    if states["index"] == "extended" and all(states[n] == "curled" for n in ("middle", "ring", "pinky")):
        return "pointing"
    if all(s == "curled" for s in four):
        if states["thumb"] == "extended":
            thumb = points[THUMB[3], :2] - points[THUMB[1], :2]
            length = float(np.linalg.norm(thumb))
            if length > 0 and thumb[1] < -0.6 * length:
                return "a thumbs up"
            if length > 0 and thumb[1] > 0.6 * length:
                return "a thumbs down"
            return ""
        if states["thumb"] == "curled":
            return "a fist"
    return ""


GESTURE_WORDS = {
    "an open hand": "showing an open hand",
    "pointing": "pointing",
    "a thumbs up": "giving a thumbs up",
    "a thumbs down": "giving a thumbs down",
    "a fist": "making a fist",
    "a V sign": "making a V sign",
}


@dataclass(frozen=True)
class Hand:
    """One hand: its 21 landmarks in frame pixels ((21, 3): x, y, depth), the presence score,
    the gesture it shows ("" when none is sure) and its landmark box."""

    points: np.ndarray
    score: float
    gesture: str

    @property
    def box(self) -> tuple[int, int, int, int]:
        x1, y1 = self.points[:, :2].min(axis=0)
        x2, y2 = self.points[:, :2].max(axis=0)
        return int(x1), int(y1), int(math.ceil(x2)), int(math.ceil(y2))

    @property
    def centre(self) -> np.ndarray:
        return self.points[:, :2].mean(axis=0)


def held_by(hand: Hand, objects: list[ObjectSighting], margin: float = 0.15) -> list[ObjectSighting]:
    """The objects this hand holds, nearest first: a holdable object (not a person, not furniture,
    not much larger than the hand's reach) whose box meets the hand's landmark box widened by
    ``margin`` of its size."""
    x1, y1, x2, y2 = hand.box
    w, h = x2 - x1, y2 - y1
    hx1, hy1, hx2, hy2 = x1 - margin * w, y1 - margin * h, x2 + margin * w, y2 + margin * h
    reach = max(w, h) * 6
    found = []
    for thing in objects:
        if thing.label in NOT_HELD or thing.label == "hand":
            continue
        ox1, oy1, ox2, oy2 = thing.box
        if max(ox2 - ox1, oy2 - oy1) > reach:
            continue
        if ox1 <= hx2 and hx1 <= ox2 and oy1 <= hy2 and hy1 <= oy2:
            centre = np.array([(ox1 + ox2) / 2, (oy1 + oy2) / 2])
            found.append((float(np.linalg.norm(centre - hand.centre)), thing))
    return [thing for _, thing in sorted(found, key=lambda pair: pair[0])]


class HandReader:
    """Palm detection and hand landmarks (MediaPipe's lite models on LiteRT). ``find`` returns a
    frame's hands; ``regions_from_pose`` adds hand regions from people's wrists."""

    def __init__(
        self,
        threads: int = 1,
        max_hands: int = 4,
        palm_score: float = 0.5,
        presence: float = 0.5,
        min_side: int = 40,
    ):
        modules = package_dir("mediapipe", "mediapipe==0.10.21", "hand landmarks") / "modules"
        palm = modules / "palm_detection" / "palm_detection_lite.tflite"
        landmark = modules / "hand_landmark" / "hand_landmark_lite.tflite"
        self._palm = litert(palm, threads, "mediapipe 0.10", "hand landmarks")
        self._hand = litert(landmark, threads, "mediapipe 0.10", "hand landmarks")
        self._palm_in = self._palm.get_input_details()[0]["index"]
        outputs = sorted(self._palm.get_output_details(), key=lambda d: -int(d["shape"][-1]))
        self._palm_boxes, self._palm_scores = outputs[0]["index"], outputs[1]["index"]
        self._hand_in = self._hand.get_input_details()[0]["index"]
        hand_out = {d["name"]: d["index"] for d in self._hand.get_output_details()}
        self._hand_points, self._hand_presence = hand_out["Identity"], hand_out["Identity_1"]
        self.max_hands = max_hands
        self.palm_score = palm_score
        self.presence = presence
        self.min_side = min_side

    # --- palms ------------------------------------------------------------------------------

    def palms(self, image: np.ndarray) -> list[tuple[float, Region]]:
        """(score, hand region) for each palm found in a uint8 (H, W, 3) RGB frame, best first."""
        height, width = image.shape[:2]
        scale = PALM_SIZE / max(height, width)
        resized = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))))
        pad_x, pad_y = (PALM_SIZE - resized.shape[1]) // 2, (PALM_SIZE - resized.shape[0]) // 2
        board = np.zeros((PALM_SIZE, PALM_SIZE, 3), np.float32)
        board[pad_y : pad_y + resized.shape[0], pad_x : pad_x + resized.shape[1]] = resized / 255.0
        self._palm.set_tensor(self._palm_in, board[None])
        self._palm.invoke()
        raw = self._palm.get_tensor(self._palm_boxes)[0]  # (2016, 18)
        logits = self._palm.get_tensor(self._palm_scores)[0, :, 0]
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -100, 100)))
        keep = np.flatnonzero(scores >= self.palm_score)
        if keep.size == 0:
            return []
        # Decode to 192-pixel board coordinates, then to frame pixels.
        centres = raw[keep, :2] + ANCHORS[keep] * PALM_SIZE
        sizes = raw[keep, 2:4]
        points = raw[keep, 4:].reshape(-1, 7, 2) + ANCHORS[keep][:, None, :] * PALM_SIZE
        offset = np.array([pad_x, pad_y], np.float32)
        centres = (centres - offset) / scale
        sizes = sizes / scale
        points = (points - offset) / scale
        boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
        chosen = cv2.dnn.NMSBoxes(
            [[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])] for b in boxes],
            [float(scores[i]) for i in keep],
            self.palm_score,
            0.3,
        )
        out = []
        for j in np.array(chosen).reshape(-1)[: self.max_hands]:
            up = _unit(points[j, 2] - points[j, 0])  # wrist -> middle finger's base
            if up is None:
                continue
            side = 2.6 * float(max(sizes[j]))
            # half a palm towards the fingers (MediaPipe's shift_y -0.5 of the rotated box)
            centre = centres[j] + 0.5 * float(sizes[j][1]) * np.array(up)
            out.append((float(scores[keep[j]]), Region((float(centre[0]), float(centre[1])), side, up)))
        return out

    @staticmethod
    def regions_from_pose(kp: Keypoints) -> list[Region]:
        """Hand regions beyond each seen wrist along its forearm (elbow -> wrist)."""
        out = []
        for side in ("left", "right"):
            wrist, elbow = kp.get(f"{side}_wrist"), kp.get(f"{side}_elbow")
            if wrist is None or elbow is None:
                continue
            forearm = wrist - elbow
            up = _unit(forearm)
            if up is None:
                continue
            length = float(np.linalg.norm(forearm))
            centre = wrist + 0.45 * forearm
            out.append(Region((float(centre[0]), float(centre[1])), 1.2 * length, up))
        return out

    # --- landmarks --------------------------------------------------------------------------

    def landmarks(self, image: np.ndarray, region: Region) -> Hand | None:
        """The hand in ``region``, or None when the model sees no hand there."""
        crop = region.crop(image, HAND_SIZE).astype(np.float32) / 255.0
        self._hand.set_tensor(self._hand_in, crop[None])
        self._hand.invoke()
        presence = float(self._hand.get_tensor(self._hand_presence).reshape(-1)[0])
        if not 0.0 <= presence <= 1.0:  # a logit in some releases
            presence = 1.0 / (1.0 + math.exp(-max(-100.0, min(100.0, presence))))
        if presence < self.presence:
            return None
        raw = self._hand.get_tensor(self._hand_points).reshape(21, 3)
        warp = region.to_frame(HAND_SIZE)
        xy = raw[:, :2] @ warp[:, :2].T + warp[:, 2]
        depth = raw[:, 2:] * region.side / HAND_SIZE
        points = np.concatenate([xy, depth], axis=1).astype(np.float32)
        return Hand(points=points, score=presence, gesture=gesture(points))

    def find(self, image: np.ndarray, poses: list[Keypoints] = ()) -> list[Hand]:
        """The hands in a frame: from palms, then from people's wrists where no palm was found."""
        regions = [region for _, region in self.palms(image)]
        for kp in poses:
            for region in self.regions_from_pose(kp):
                if all(
                    np.hypot(region.centre[0] - r.centre[0], region.centre[1] - r.centre[1]) > r.side / 2
                    for r in regions
                ):
                    regions.append(region)
        hands: list[Hand] = []
        for region in regions:
            if region.side < self.min_side or len(hands) >= self.max_hands:
                continue
            hand = self.landmarks(image, region)
            if hand is not None and all(_overlap(hand.box, other.box) < 0.5 for other in hands):
                hands.append(hand)
        return hands


def _covered(box: tuple[int, int, int, int], by: tuple[int, int, int, int]) -> float:
    """The share of ``box``'s area inside ``by``."""
    w = min(box[2], by[2]) - max(box[0], by[0])
    h = min(box[3], by[3]) - max(box[1], by[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / max((box[2] - box[0]) * (box[3] - box[1]), 1)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / max(smaller, 1)


def _owner(hand: Hand, sightings: list[ObjectSighting]) -> int | None:
    """The person whose box (widened by a tenth) holds the hand's centre; the smallest such."""
    x, y = hand.centre
    best: tuple[int, int] | None = None
    for i, person in enumerate(sightings):
        if person.label != "person":
            continue
        x1, y1, x2, y2 = person.box
        mx, my = 0.1 * (x2 - x1), 0.1 * (y2 - y1)
        if x1 - mx <= x <= x2 + mx and y1 - my <= y <= y2 + my:
            area = (x2 - x1) * (y2 - y1)
            if best is None or area < best[0]:
                best = (area, i)
    return None if best is None else best[1]


# A hand with no person around it is a close-up in front of the camera: one smaller than this
# share of the frame (a "far" thing) is most likely a palm the detector saw in something else.
LOOSE_HAND_MIN = 0.01


def annotate(
    sightings: list[ObjectSighting],
    poses: dict[int, Keypoints],
    hands: list[Hand],
    frame_size: tuple[int, int],
    area: tuple[int, int, int, int] | None = None,
) -> list[ObjectSighting]:
    """One frame's detections with what the people do (``describe_people``) and their hands: a
    hand's gesture and the object it holds go to the person it belongs to; a hand with no person
    around it (a close-up in front of a webcam) becomes a "hand" detection of its own, with its
    position, gesture and what it holds."""
    # A "person" that is only this hand (the object detector calls a close-up hand or arm a
    # person): the hand covers most of its box and no torso was seen in it.
    mistaken = {
        i
        for i, s in enumerate(sightings)
        if s.label == "person"
        and (i not in poses or poses[i].torso() is None)
        and any(_covered(s.box, hand.box) > 0.6 for hand in hands)
    }
    if mistaken:
        sightings = [s for i, s in enumerate(sightings) if i not in mistaken]
        poses = {i - sum(j < i for j in mistaken): kp for i, kp in poses.items() if i not in mistaken}
    objects = [s for s in sightings if s.label != "person"]
    held: dict[int, list[ObjectSighting]] = {}
    extra: dict[int, list[str]] = {}
    loose: list[tuple[Hand, list[ObjectSighting]]] = []
    used: set[int] = set()
    for hand in hands:
        things = [t for t in held_by(hand, objects) if id(t) not in used][:1]
        used |= {id(t) for t in things}
        owner = _owner(hand, sightings)
        if owner is None:
            loose.append((hand, things))
            continue
        held.setdefault(owner, []).extend(things)
        if hand.gesture:  # where the hand is, as the viewer sees it: "showing an open hand on the right"
            side = position_words(hand.box, *frame_size, area).split(",")[0]
            where = "in the centre" if side == "centre" else f"on the {side}"
            extra.setdefault(owner, []).append(f"{GESTURE_WORDS[hand.gesture]} {where}")
    out = describe_people(sightings, poses, held, extra)
    width, height = frame_size
    for hand, things in loose:
        x1, y1, x2, y2 = hand.box
        box = (max(0, x1), max(0, y1), min(width, x2), min(height, y2))
        if (box[2] - box[0]) * (box[3] - box[1]) < LOOSE_HAND_MIN * width * height:
            continue  # a tiny hand with nobody around it: a palm seen in a bus front or a sign
        words = [GESTURE_WORDS[hand.gesture]] if hand.gesture else []
        words += [f"holding {article(thing.name())}" for thing in things]
        out.append(
            ObjectSighting(
                label="hand",
                score=round(hand.score, 2),
                box=box,
                frame_size=(width, height),
                position=position_words(box, width, height, area),
                colour="",
                pose=tuple(words),
            )
        )
    return out
