"""Several streams on one machine: a session per source, sampled fairly by one encoder."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict

import numpy as np
import pytest

from omnistream.app.cli import _overrides, build_parser
from omnistream.perception.sampling import FairSlot, SampledFrame
from omnistream.protocol.config import Config, load_config


def frame(session: str, index: int) -> SampledFrame:
    return SampledFrame(np.zeros((8, 8, 3), np.uint8), ts=index / 30, index=index, session=session)


# -- fair sampling ----------------------------------------------------------------------------------


def test_streams_are_served_in_turn_whatever_their_rates() -> None:
    slot = FairSlot()
    served: Counter[str] = Counter()
    for step in range(300):
        # "fast" offers 10 frames per step, "slow" one every 3rd step, "mid" one each step
        for i in range(10):
            slot.put(frame("fast", step * 10 + i))
        if step % 3 == 0:
            slot.put(frame("slow", step))
        slot.put(frame("mid", step))
        served.update(f.session for f in slot.take(1))
    # one encode per step: the slow stream gets every frame it offers, the other two share the rest
    assert served["slow"] == 100
    assert abs(served["fast"] - served["mid"]) <= 1 and served["fast"] + served["mid"] == 200
    assert slot.dropped > 0  # the fast stream's frames beyond its newest were dropped, not queued


def test_a_batch_spans_the_waiting_streams_and_the_first_served_rotates() -> None:
    slot = FairSlot()
    for session in ("a", "b", "c"):
        slot.add(session, capacity=4, block=True)
        for index in range(4):
            slot.put(frame(session, index))
    first = slot.take(4)
    assert [f.session for f in first] == ["a", "b", "c", "a"]
    second = slot.take(4)
    assert [f.session for f in second] == ["b", "c", "a", "b"]  # "a" went first last time
    # each stream's own frames stay in order and none is lost (blocking slots)
    rest = slot.take(100)
    by_session = defaultdict(list)
    for f in first + second + rest:
        by_session[f.session].append(f.index)
    assert dict(by_session) == {s: [0, 1, 2, 3] for s in "abc"} and slot.dropped == 0


def test_a_blocking_stream_waits_while_a_live_one_keeps_its_newest() -> None:
    slot = FairSlot()
    slot.add("file", capacity=2, block=True)
    writer = threading.Thread(target=lambda: [slot.put(frame("file", i)) for i in range(6)])
    writer.start()
    for index in range(5):
        slot.put(frame("pushed", index))
    time.sleep(0.1)
    assert len(slot) == 3  # two file frames (the reader waits) + the pushed stream's newest
    taken = slot.take(3)
    assert [(f.session, f.index) for f in taken] == [("file", 0), ("pushed", 4), ("file", 1)]
    got = []
    while len(got) < 4:
        slot.wait(1.0)
        got += [f.index for f in slot.take(2)]
    writer.join()
    assert got == [2, 3, 4, 5]
    assert "pushed" not in slot.sessions  # an unregistered empty slot is forgotten
    assert slot.dropped == 4
    slot.close()
    assert not slot.put(frame("pushed", 9))


# -- a session per source -----------------------------------------------------------------------------


def test_each_source_gets_its_own_session() -> None:
    one = load_config(None, {"session": "shop", "perception.source": "camera:0"})
    assert one.source_sessions() == [("shop", "camera:0")]
    several = load_config(
        None,
        {
            "session": "shop",
            "perception.source": "camera:0",
            "perception.sources": ["rtsp://u:p@cam/live?token=x=y", "door=/videos/door.mp4"],
        },
    )
    assert several.source_sessions() == [
        ("shop-1", "camera:0"),
        ("shop-2", "rtsp://u:p@cam/live?token=x=y"),  # not "NAME=": the part before '=' is no name
        ("door", "/videos/door.mp4"),
    ]
    assert Config().source_sessions() == []
    twice = load_config(None, {"perception.sources": ["a=x.mp4", "a=y.mp4"]})
    with pytest.raises(ValueError, match="session 'a' twice"):
        twice.source_sessions()


def test_source_repeated_on_the_command_line_is_the_sources_list() -> None:
    parser = build_parser()
    args = parser.parse_args(["up", "--source", "camera:0", "--source", "rtsp://cam/1", "--source", "f.mp4"])
    config = load_config(None, _overrides(args))
    assert config.source_sessions() == [
        ("default-1", "camera:0"),
        ("default-2", "rtsp://cam/1"),
        ("default-3", "f.mp4"),
    ]
    single = load_config(None, _overrides(parser.parse_args(["up", "--source", "camera:0"])))
    assert single.perception.source == "camera:0" and single.source_sessions() == [("default", "camera:0")]
