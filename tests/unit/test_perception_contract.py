"""The perception stage through the stage harness (tests/harness.py): no sockets, no processes; the
frame encoder is a tiny randomly initialised SigLIP vision tower (the real ``VisionTowerEncoder``
path, as a local encoder directory is loaded), on a fake clock.

Issue #19 item 1: perception is built from its configuration, its encoder and an ``emit``
callable; frames come to ``handle``; ``tick`` encodes one batch; a ``Percept`` goes out per
encoded frame and a ``Clip`` when the scene closes (here: the stream pauses for
``IDLE_CLOSE_S`` on the stage's clock).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from omnistream.perception.encoder import load_encoder
from omnistream.perception.stage import IDLE_CLOSE_S, PerceptionStage
from omnistream.protocol.config import PerceptionConfig
from omnistream.protocol.messages import Clip, Percept, VideoFrame
from omnistream.protocol.runtime import BUS

from ..harness import Advance, FakeClock, Ticks, run_stage

TINY = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def tower(tmp_path_factory) -> Path:
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tower")
    SiglipVisionModel(SiglipVisionConfig(**TINY, image_size=32, patch_size=8)).save_pretrained(path)
    return path


def frames(count: int, session: str = "default", every_s: float = 0.5) -> list:
    """One scene: the same picture with a little sensor noise in each frame."""
    rng = np.random.default_rng(7)
    scene = rng.integers(0, 250, (48, 64, 3), dtype=np.uint8)
    out: list = []
    for index in range(count):
        image = scene + rng.integers(0, 5, scene.shape, dtype=np.uint8)
        out += [
            VideoFrame(ts=index * every_s, image=image, index=index, session=session),
            Advance(every_s),
            Ticks(1),
        ]
    return out


def test_frames_become_a_percept_each_and_a_clip_when_the_stream_pauses(tower: Path) -> None:
    encoder = load_encoder(str(tower))
    stage = PerceptionStage(PerceptionConfig(max_fps=20.0, objects_fps=0.0, ocr=False), encoder)
    clock = FakeClock()
    run = run_stage(stage, frames(3), clock=clock)
    assert all(sent.to == BUS for sent in run.sent)
    percepts = run.of(Percept)
    assert [(p.ts, p.frame_index, p.session) for p in percepts] == [
        (0.0, 0, "default"),
        (0.5, 1, "default"),
        (1.0, 2, "default"),
    ]
    for percept in percepts:
        assert percept.features.shape == (encoder.feature_dim,)
        assert abs(float(np.linalg.norm(percept.features)) - 1.0) < 1e-4
        assert percept.labels == [] and percept.clip_id == percepts[0].clip_id  # a tower names no classes
    # Nothing came for IDLE_CLOSE_S on the stage's clock: the open clip is closed and published,
    # after its percepts, spanning their stream times.
    (clip,) = run.of(Clip)
    assert run.index(clip) == len(run) - 1
    assert (clip.t0, clip.ts, clip.clip_id, clip.session) == (0.0, 1.0, percepts[0].clip_id, "default")
    assert clip.features.shape == (encoder.feature_dim,) and clip.description
    assert stage.counters["frames_encoded"] == 3 and stage.counters["clips"] == 1
    assert clock() - 1000.0 >= 1.5 + IDLE_CLOSE_S


def test_the_newest_frame_wins_and_a_bad_frame_is_refused_by_name(tower: Path) -> None:
    stage = PerceptionStage(PerceptionConfig(objects_fps=0.0, ocr=False), load_encoder(str(tower)))
    burst = [m for m in frames(4) if isinstance(m, VideoFrame)]  # all arrive before the next step
    run = run_stage(stage, burst, settle_s=1.0)
    assert [p.frame_index for p in run.of(Percept)] == [3]
    assert stage.counters["frames_dropped"] == 3 and stage.counters["frames_received"] == 4
    grey = VideoFrame(ts=9.0, image=np.zeros((48, 64), np.uint8), index=9)
    with pytest.raises(ValueError, match=r"VideoFrame.image must be uint8 \(H, W, 3\).*\(48, 64\)"):
        stage.handle(grey)  # the runtime answers it with an Error stage_error and goes on
    after = run_stage(stage, frames(1), settle_s=1.0)
    assert [p.frame_index for p in after.of(Percept)] == [0]
    stage.close()
