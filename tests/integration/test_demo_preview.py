"""What perception saw, on the demo page, with the real parts (tests/unit/test_demo_preview.py has
the drawing and the wire): the perception stage's percepts carry the boxes of its newest
detection (real encoder and detector), and the gateway process relays them to a demo session that
pairs them with the frame it sent, with the tracker's events as the page's timeline."""

from __future__ import annotations

import base64
import time
from collections import defaultdict
from pathlib import Path

import cv2
import msgspec
import numpy as np
import pytest
import zmq

from omnistream.app.demo import on_live_view
from omnistream.app.demo_session import DemoSession
from omnistream.app.preview import draw_detections
from omnistream.perception.encoder import load_encoder
from omnistream.perception.stage import PerceptionStage, build_detectors
from omnistream.protocol.config import PerceptionConfig
from omnistream.protocol.messages import Box, Percept, VideoFrame
from omnistream.protocol.sockets import make_socket, send

from ..unit.test_demo_preview import sightings_of_a_visit
from ..util import wait_until

ORANGE_JPG = Path("/usr/share/doc/opencv-doc/examples/data/orange.jpg")


# -- perception: percepts carry the boxes of the newest detection ---------------------------------------


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("efficientnet-lite0")


def test_percepts_carry_the_newest_detections_and_the_frame_they_were_made_on(encoder) -> None:
    out: list = []
    config = PerceptionConfig(max_fps=0.0, faces=False, ocr=False, objects_fps=2.0)
    stage = PerceptionStage(
        config, encoder, out.append, defaultdict(float), detectors=build_detectors(config)
    )
    orange = cv2.cvtColor(cv2.imread(str(ORANGE_JPG)), cv2.COLOR_BGR2RGB)
    try:
        stage.handle(VideoFrame(ts=0.0, image=orange, index=0))
        stage.tick()
        wait_until(lambda: stage.counters["detections"], 60, "the detector to finish", every=stage.tick)
        stage.handle(VideoFrame(ts=0.1, image=orange, index=1))  # not due for objects (2 per s)
        stage.tick()
    finally:
        stage.detectors.close()
    first, second = (m for m in out if isinstance(m, Percept))
    assert (first.boxes, first.boxes_ts) == ([], None)  # published before its detection came
    assert second.ts == 0.1 and second.boxes_ts == 0.0  # the detection was made on frame 0
    (box,) = second.boxes
    assert box.label == "orange" and box.score >= 0.5 and box.colour.startswith("orange")
    assert 0.0 <= box.x0 < 0.5 < box.x1 <= 1.0 and 0.0 <= box.y0 < 0.5 < box.y1 <= 1.0
    assert (box.x1 - box.x0) * (box.y1 - box.y0) > 0.3  # "near": it fills the picture
    assert second.objects == ["orange (centre, near)"]


# -- the demo session: percepts and sightings relayed by the gateway ---------------------------------------


def solid(rgb: tuple[int, int, int]) -> np.ndarray:
    return np.full((480, 640, 3), rgb, np.uint8)


def test_the_session_shows_the_analysed_frame_with_its_boxes_and_the_tracker_events(gateway_only) -> None:
    session = DemoSession(gateway_only.run_dir)
    bus = make_socket(zmq.Context.instance(), zmq.PUB)
    bus.connect(gateway_only.addresses.bus_in)
    red, green, blue = (200, 30, 30), (30, 200, 30), (30, 30, 200)
    try:
        for ts, colour in [(1.0, red), (1.5, green), (2.0, blue)]:
            session.push_frame(solid(colour), ts=ts)
        assert session.frames_sent == 3
        cup = Box("cup", 0.25, 0.5, 0.75, 0.9, 0.87, "red")
        features = np.ones(4, np.float32) / 2
        mine = Percept(session=session.session, ts=2.0, features=features, boxes=[cup], boxes_ts=1.5)
        others = Percept(session="someone-else", ts=2.0, features=features, boxes=[], boxes_ts=1.0)
        sightings = [msgspec.structs.replace(s, session=session.session) for s in sightings_of_a_visit()]
        assert on_live_view(session) == ({"__type__": "update"}, {"__type__": "update"})  # nothing yet

        def send_percepts() -> None:  # re-sent until the bus subscription has reached this publisher
            send(bus, others)
            send(bus, mine)
            session.wait_for_change(0.3)

        wait_until(
            lambda: session.seen is not None, 20, "the percept relayed", every=send_percepts, interval=0
        )
        for sighting in sightings:
            send(bus, sighting)
        wait_until(
            lambda: session.sightings_received >= len(sightings),
            20,
            "the sightings relayed",
            every=lambda: session.wait_for_change(0.3),
            interval=0,
        )
        send(bus, mine)  # a repeat (the next percept before a new detection) changes nothing
        time.sleep(0.3)
        seen = session.seen
        assert seen.ts == 1.5 and seen.boxes == [cup] and session.seen_version == 1
        assert seen.frame.shape == (240, 320, 3) and tuple(seen.frame[120, 160]) == green
        assert [s.event for s in session.sightings] == [
            "count",
            "left",
            "appeared",
            "appeared",
        ]  # newest first

        preview, rows = on_live_view(session)
        assert (
            "perception at <b>00:02</b>: cup, red 0.87" in preview
        )  # 1.5 s, rounded as everywhere (protocol.text.clock)
        uri = preview.split('src="', 1)[1].split('"', 1)[0]
        image = cv2.imdecode(
            np.frombuffer(base64.b64decode(uri.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR
        )
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(int)
        assert np.abs(image[170, 160] - green).max() < 12  # the green frame (1.5 s), not the newest
        assert np.abs(image - draw_detections(solid(green), [cup])).mean() < 4  # with its box
        assert [row[:2] for row in rows] == [
            ["00:40–01:05", "people present"],
            ["01:05", "left"],
            ["00:41", "appeared"],
            ["00:40", "entered"],
        ]
        assert on_live_view(session) == ({"__type__": "update"}, {"__type__": "update"})  # unchanged

        # objects off: a percept without detections shows its own frame, with no boxes
        plain = Percept(session=session.session, ts=2.0, features=features)
        wait_until(
            lambda: session.seen.ts == 2.0,
            10,
            "the plain percept relayed",
            every=lambda: (send(bus, plain), session.wait_for_change(0.3)),
            interval=0,
        )
        assert session.seen.boxes == [] and tuple(session.seen.frame[0, 0]) == blue
        preview, rows = on_live_view(session)
        assert "perception at <b>00:02</b>: no objects detected" in preview
        assert rows == {"__type__": "update"}
    finally:
        bus.close(linger=0)
        session.close()
