"""What perception saw, on the demo page: object boxes drawn on the analysed frame (``app.preview``),
the boxes on the wire, the gateway's one percept per detection, and the tracker's events as the
page's timeline. The perception stage and the gateway relaying to a demo session, with the real
parts: tests/integration/test_demo_preview.py."""

from __future__ import annotations

import base64

import cv2
import msgspec
import numpy as np

from omnistream.app.demo import event_rows, render_preview
from omnistream.app.preview import (
    FONT,
    FONT_SCALE,
    PREVIEW_WIDTH,
    box_caption,
    box_colour,
    draw_detections,
    jpeg_data_uri,
)
from omnistream.perception.objects import ObjectSighting
from omnistream.perception.tracks import Tracker
from omnistream.protocol.codec import decode, encode
from omnistream.protocol.messages import Box, Percept, Sighting

GREY = (128, 128, 128)


def grey_frame(width: int = 640, height: int = 480) -> np.ndarray:
    return np.full((height, width, 3), GREY, np.uint8)


def white_pixels(region: np.ndarray) -> np.ndarray:
    """(row, column) of the near-white pixels (caption text) of an RGB region."""
    return np.argwhere((region > 200).all(axis=2))


# -- drawing ------------------------------------------------------------------------------------------


def test_boxes_are_outlined_in_their_class_colour_with_the_caption_above() -> None:
    frame = grey_frame()
    cup = Box("cup", 0.25, 0.5, 0.75, 0.9, 0.87, "red")
    image = draw_detections(frame, [cup])
    assert image.shape == (240, PREVIEW_WIDTH, 3) and image.dtype == np.uint8
    assert (frame == GREY).all(), "the caller's frame was drawn on"
    colour = box_colour("cup")
    x0, y0, x1, y1 = round(0.25 * 319), round(0.5 * 239), round(0.75 * 319), round(0.9 * 239)
    # the outline: all four edges in the class colour
    for x, y in [(x0, 170), (x1, 170), (160, y0), (160, y1)]:
        assert tuple(image[y, x]) == colour, (x, y, image[y, x])
    # inside and outside the box the frame is untouched
    for x, y in [(160, 170), (x0 + 5, y1 - 5), (x0 - 5, 170), (x1 + 5, 170), (160, y1 + 5), (5, 5)]:
        assert tuple(image[y, x]) == GREY, (x, y, image[y, x])
    # the caption: white text on a tab of the box colour just above the box, as wide as the text
    caption = box_caption(cup)
    assert caption == "cup, red 0.87"
    (text_w, text_h), baseline = cv2.getTextSize(caption, FONT, FONT_SCALE, 1)
    tab = image[y0 - text_h - baseline - 2 : y0, x0 : x0 + text_w + 3]
    assert (tab == colour).all(axis=2).mean() > 0.5
    text = white_pixels(tab)
    assert len(text) > 30
    assert text[:, 1].max() - text[:, 1].min() >= text_w - 6  # spans the whole caption
    assert len(white_pixels(image)) == len(text), "caption pixels outside the tab"


def test_a_longer_caption_draws_more_text_and_a_box_at_the_top_keeps_it_inside() -> None:
    short = draw_detections(grey_frame(), [Box("cup", 0.25, 0.5, 0.75, 0.9)])
    long = draw_detections(grey_frame(), [Box("cup", 0.25, 0.5, 0.75, 0.9, 0.87, "blue and white")])
    assert len(white_pixels(long)) > 1.5 * len(white_pixels(short)) > 0
    top = draw_detections(grey_frame(), [Box("person", 0.1, 0.0, 0.4, 0.6, 0.9)])
    text = white_pixels(top)
    assert len(text) > 20 and text[:, 0].min() >= 0 and text[:, 0].max() < 20  # the tab at the top
    assert tuple(top[100, round(0.1 * 319)]) == box_colour("person")


def test_no_boxes_is_the_scaled_frame_and_boxes_are_clipped_to_it() -> None:
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[:, 320:] = 255
    plain = draw_detections(frame, [])
    assert plain.shape == (240, 320, 3) and plain[:, :150].max() == 0 and plain[:, 170:].min() == 255
    small = np.full((60, 80, 3), GREY, np.uint8)  # never enlarged
    beyond = draw_detections(small, [Box("tv", -0.5, -0.5, 1.5, 1.5)])
    assert beyond.shape == (60, 80, 3)
    assert tuple(beyond[30, 79]) == box_colour("tv") and tuple(beyond[59, 40]) == box_colour("tv")


def test_the_preview_is_an_inline_jpeg_of_the_drawn_frame() -> None:
    image = draw_detections(grey_frame(), [Box("cup", 0.25, 0.5, 0.75, 0.9)])
    uri = jpeg_data_uri(image)
    assert uri.startswith("data:image/jpeg;base64,")
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(uri.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    decoded = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    assert decoded.shape == image.shape
    assert np.abs(decoded.astype(int) - image.astype(int)).mean() < 4
    assert render_preview(None).startswith("<p>")


# -- the tracker's events as the page's timeline ---------------------------------------------------------


def sightings_of_a_visit() -> list[Sighting]:
    """A person walks in at 00:40 and a cup appears at 00:41 (its colour named "red"); the person
    leaves at 01:05, the cup stays; perception's tracker makes the events, as the stage publishes
    them."""
    tracker = Tracker(min_hits=2, max_missed_s=2.0, count_stable_s=1.0)
    person = ObjectSighting("person", 0.9, (10, 40, 200, 470), (640, 480), "left, near", "blue")
    cup = ObjectSighting("cup", 0.8, (400, 300, 460, 380), (640, 480), "right", "red")
    events = []
    for step in range(0, 61):
        ts = 40.0 + step * 0.5
        seen = ([person] if ts <= 65.0 else []) + ([cup] if ts >= 41.0 else [])
        events += tracker.update(ts, seen)
    return [
        Sighting(
            ts=e.ts, t0=e.t0, label=e.label, event=e.kind, text=e.text, track_id=e.track_id, count=e.count
        )  # type: ignore[arg-type]
        for e in events
    ]


def test_timeline_rows_say_when_what_happened_newest_first() -> None:
    sightings = sightings_of_a_visit()
    assert [s.event for s in sightings] == ["appeared", "appeared", "left", "count"]
    rows = event_rows(reversed(sightings))  # the session keeps them newest first
    assert rows == [
        ["00:40–01:05", "people present", "1 person present 00:40-01:05"],
        ["01:05", "left", rows[1][2]],
        ["00:41", "appeared", rows[2][2]],
        ["00:40", "entered", rows[3][2]],
    ]
    assert rows[1][2].startswith("person 1 (in a blue shirt) last seen at 01:05, on the left")
    assert rows[2][2].startswith("red cup 1 appeared at 00:41, on the right")
    assert rows[3][2].startswith("person 1 (in a blue shirt) entered at 00:40, on the left")
    assert event_rows([]) == [["", "", "nothing has appeared yet"]]


def test_percept_boxes_survive_the_wire_and_old_percepts_still_decode() -> None:
    percept = Percept(
        ts=2.0,
        features=np.ones(4, np.float32),
        boxes=[Box("cup", 0.25, 0.5, 0.75, 0.9, 0.87, "red")],
        boxes_ts=1.5,
    )
    again = decode(encode(percept))
    assert again.boxes == percept.boxes and again.boxes_ts == 1.5
    header = msgspec.msgpack.decode(encode(percept)[1])
    assert header["boxes"] == [["cup", 0.25, 0.5, 0.75, 0.9, 0.87, "red"]]  # array-encoded, like Label
    old = decode(encode(Percept(ts=2.0, features=np.ones(4, np.float32))))
    assert old.boxes == [] and old.boxes_ts is None
    assert "boxes" not in msgspec.msgpack.decode(encode(Percept(features=np.ones(4, np.float32)))[1])


def test_the_gateway_relays_one_percept_per_detection_without_features() -> None:
    from collections import OrderedDict

    from omnistream.app.gateway import CLIENT_PERCEPT_S, client_percept

    relayed: OrderedDict = OrderedDict()
    features = np.ones(1280, np.float32)
    first = client_percept(relayed, Percept(ts=1.0, features=features, boxes_ts=0.5), now=10.0)
    assert first is not None and first.features.size == 0 and first.boxes_ts == 0.5
    # The same detection repeated on the next encoded frames: not relayed again for a while.
    assert client_percept(relayed, Percept(ts=1.05, features=features, boxes_ts=0.5), now=10.05) is None
    again = client_percept(
        relayed, Percept(ts=2.0, features=features, boxes_ts=0.5), now=10.0 + CLIENT_PERCEPT_S
    )
    assert again is not None and again.ts == 2.0
    # A new detection goes out at once; another session has its own pace.
    assert client_percept(relayed, Percept(ts=2.1, features=features, boxes_ts=1.0), now=11.1) is not None
    other = Percept(session="other", ts=2.1, features=features)
    assert client_percept(relayed, other, now=11.1) is not None
    assert client_percept(relayed, other, now=11.2) is None
