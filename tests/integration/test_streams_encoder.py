"""Several streams on one machine with the default encoder: two files read at once are encoded in
turn, each as its own session; pushed streams of different sizes are each encoded. (Fair sampling
and the sources list: tests/unit/test_streams.py.)
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pytest

from omnistream.app.replay import DEFAULT_SAMPLE
from omnistream.perception.encoder import load_encoder
from omnistream.perception.stage import PerceptionStage
from omnistream.protocol.config import load_config
from omnistream.protocol.messages import AudioChunk, Percept, VideoFrame

pytestmark = pytest.mark.slow  # the real default encoder (EfficientNet-Lite0)


def test_two_files_read_at_once_are_encoded_in_turn_each_as_its_own_session() -> None:
    encoder = load_encoder("efficientnet-lite0")
    out: list = []
    config = load_config(
        None,
        {
            "perception.sources": ["left=" + str(DEFAULT_SAMPLE), "right=" + str(DEFAULT_SAMPLE)],
            "perception.source_realtime": False,
            "perception.sample_fps": 1.0,
            "perception.batch_size": 2,
            "perception.objects_fps": 0.0,
            "perception.ocr": False,
        },
    )
    stage = PerceptionStage(config.perception, encoder, out.append, defaultdict(float))
    sources = [stage.start_source(spec, session) for session, spec in config.source_sessions()]
    deadline = time.monotonic() + 120
    while (not all(s.finished.is_set() for s in sources) or len(stage.slot)) and time.monotonic() < deadline:
        stage.tick()
        time.sleep(0.002)
    stage.tick()
    stage.stop()
    percepts = [m for m in out if isinstance(m, Percept)]
    by_session = defaultdict(list)
    for percept in percepts:
        by_session[percept.session].append(percept.ts)
    assert set(by_session) == {"left", "right"}
    # the same 30 s recording at 1 frame per stream second: the same frames for each session
    assert by_session["left"] == by_session["right"] and len(by_session["left"]) >= 25
    # in turn: neither stream ran ahead of the other by more than a batch
    order = [p.session for p in percepts]
    for n in range(1, len(order) + 1):
        assert abs(order[:n].count("left") - order[:n].count("right")) <= 2
    sound = {m.session for m in out if isinstance(m, AudioChunk)}
    assert sound == {"left", "right"}  # each file's sound track goes out as its own session's
    with pytest.raises(ValueError, match="already reads a source for session 'left'"):
        stage.start_source(str(DEFAULT_SAMPLE), "left")


def test_pushed_streams_of_different_sizes_are_each_encoded() -> None:
    out: list = []
    config = load_config(None, {"perception.objects_fps": 0.0, "perception.ocr": False})
    stage = PerceptionStage(
        config.perception, load_encoder("efficientnet-lite0"), out.append, defaultdict(float)
    )
    rng = np.random.default_rng(0)
    for index, (session, shape) in enumerate([("a", (48, 64, 3)), ("b", (60, 80, 3)), ("c", (48, 64, 3))]):
        image = rng.integers(0, 255, shape, dtype=np.uint8)
        stage.handle(VideoFrame(ts=1.0, image=image, index=index, session=session))
    stage.tick()  # one batch taken from the three streams, encoded as two (one per frame size)
    assert sorted(m.session for m in out if isinstance(m, Percept)) == ["a", "b", "c"]
    stage.stop()
