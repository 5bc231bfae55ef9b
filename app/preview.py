"""The demo page's preview of what perception saw: a frame scaled down, with the boxes and labels
of the objects detected on it (``Percept.boxes``, normalised to the frame), drawn with OpenCV.

``draw_detections`` is pure: RGB uint8 (H, W, 3) in, a new RGB image ``width`` pixels wide out.
Each class gets its own box colour (the same one every time); the label above the box is the
class, its colour name and the detector's score ("cup, red 0.87").
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Sequence

import cv2
import numpy as np

from omnistream.protocol.messages import Box

PREVIEW_WIDTH = 320
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.4
LINE = 2  # box outline, pixels
TEXT_RGB = (255, 255, 255)
# Saturated, mutually distinct RGB colours; a class picks one by a stable hash of its name.
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (240, 50, 230),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
    (0, 0, 128),
)


def box_colour(label: str) -> tuple[int, int, int]:
    """The RGB colour boxes of class ``label`` are drawn in (stable across runs)."""
    return PALETTE[zlib.crc32(label.encode()) % len(PALETTE)]


def box_caption(box: Box) -> str:
    """ "cup, red 0.87"; "person 0.91" when no colour was named."""
    name = f"{box.label}, {box.colour}" if box.colour else box.label
    return f"{name} {box.score:.2f}" if box.score else name


def scaled(frame: np.ndarray, width: int = PREVIEW_WIDTH) -> np.ndarray:
    """A copy of RGB ``frame`` ``width`` pixels wide (aspect kept; never enlarged)."""
    image = np.ascontiguousarray(frame[..., :3], np.uint8)
    height, original = image.shape[:2]
    if original <= width:
        return image.copy()
    size = (width, max(round(height * width / original), 1))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def box_pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """A normalised box in pixels of a ``width`` x ``height`` image, clipped to it."""
    x0, x1 = (int(round(min(max(v, 0.0), 1.0) * (width - 1))) for v in (box.x0, box.x1))
    y0, y1 = (int(round(min(max(v, 0.0), 1.0) * (height - 1))) for v in (box.y0, box.y1))
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def draw_detections(frame: np.ndarray, boxes: Sequence[Box], width: int = PREVIEW_WIDTH) -> np.ndarray:
    """``frame`` scaled to ``width`` px wide with each box outlined in its class colour and its
    caption on a filled tab above it (inside the box when the box touches the top edge)."""
    image = scaled(frame, width)
    height, width = image.shape[:2]
    for box in boxes:
        colour = box_colour(box.label)
        x0, y0, x1, y1 = box_pixels(box, width, height)
        cv2.rectangle(image, (x0, y0), (x1, y1), colour, LINE)
        caption = box_caption(box)
        (text_w, text_h), baseline = cv2.getTextSize(caption, FONT, FONT_SCALE, 1)
        tab_h = text_h + baseline + 2
        top = y0 - tab_h if y0 - tab_h >= 0 else y0  # above the box, or inside it at the top
        left = min(x0, max(width - text_w - 2, 0))
        cv2.rectangle(image, (left, top), (left + text_w + 2, top + tab_h), colour, cv2.FILLED)
        cv2.putText(image, caption, (left + 1, top + text_h + 1), FONT, FONT_SCALE, TEXT_RGB, 1, cv2.LINE_AA)
    return image


def jpeg_data_uri(image: np.ndarray, quality: int = 80) -> str:
    """An RGB image as a ``data:image/jpeg;base64,...`` URI (shown inline: no file is written)."""
    ok, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise ValueError(f"cannot encode a {image.shape} image as JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")
