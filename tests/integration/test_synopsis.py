"""The L3 synopsis with the real fast LLM and the real memory stage (MiniLM, SQLite).

Records go into memory; the reasoner's synopsizer writes a synopsis from them; memory stores and
acknowledges it; a later question's context starts with it. The tiers are made so small that
the question's context holds nothing else about the start of the stream: the answer has to come
from the synopsis.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from omnistream.memory.embedder import TextEmbedder
from omnistream.memory.stage import MemoryStage
from omnistream.memory.store import MemoryStore
from omnistream.protocol.config import MemoryConfig, load_config
from omnistream.protocol.messages import Ask, Clip, Label, MemoryItem, Record, Retrieve, Transcript
from omnistream.reasoning.answer import Answerer
from omnistream.reasoning.engine import LLMEngine
from omnistream.reasoning.prepare import prepare_llm
from omnistream.reasoning.prompt import memory_log
from omnistream.reasoning.synopsis import Synopsizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(prepare_llm("qwen2.5-coder-0.5b", load_config().cache_dir), "auto", 2)


def clip(clip_id: int, t0: float, t1: float, description: str) -> Clip:
    features = np.zeros(8, np.float32)
    features[clip_id % 8] = 1.0
    return Clip(
        clip_id=clip_id, t0=t0, ts=t1, features=features, labels=[Label("x", 0.5)], description=description
    )


def test_synopsis_from_real_records_is_stored_and_answers_a_later_question(
    engine: LLMEngine, tmp_path: Path
) -> None:
    # L1 holds one record and L2 none: everything older than the newest record is archived, and
    # the question below asks for no archive hits and no recent window.
    config = MemoryConfig(synopsis_every_records=4, l1_items=1, l2_items=0, return_all_below=0)
    published: list = []
    memory = MemoryStage(
        config, MemoryStore(tmp_path / "m.sqlite", 384), TextEmbedder(), defaultdict(float), published.append
    )
    synopsizer = Synopsizer(engine, config)
    for message in (
        clip(1, 0, 14, "seen: monarch (butterfly), admiral (butterfly), ringlet (butterfly)"),
        Transcript(t0=3, ts=8, text="He might even have been made amiable himself.", speaker="scene"),
        clip(2, 14, 22, "seen: crossword puzzle (puzzle); text seen: Linux"),
        Transcript(t0=15, ts=20, text="Linux is a kernel.", speaker="scene"),
    ):
        memory.handle(message)
    records = [m for m in published if isinstance(m, Record)]
    assert [r.kind for r in records] == ["clip", "transcript", "clip", "transcript"]
    for record in records:
        synopsizer.observe(
            "default",
            MemoryItem(
                kind=record.kind,
                t0=record.t0,
                t1=record.ts,
                text=record.text,
                speaker=record.speaker,
                item_id=record.item_id,
            ),
        )
    assert synopsizer.due() == ["default"]

    calls = 0

    def question_arrives_during_prefill() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 3

    assert synopsizer.write("default", question_arrives_during_prefill) is None  # a question goes first
    assert synopsizer.due() == ["default"] and synopsizer.digest("default").text == ""

    synopsis = synopsizer.write("default", lambda: False)
    assert synopsis is not None and synopsis.ts == 22 and synopsis.through_item_id == records[-1].item_id
    assert "butterfl" in synopsis.text.lower(), synopsis.text
    assert synopsizer.due() == []
    memory.handle(synopsis)
    ack = published[-1]
    assert isinstance(ack, Record) and ack.kind == "synopsis" and ack.text == synopsis.text
    synopsizer.acknowledge(ack)
    assert synopsizer.unacknowledged(now=1e12) == []

    reply = memory.retrieve(
        Retrieve(ts=30, request_id="q", query="Which animal was shown?", top_k=0, recent_s=0)
    )
    assert reply.items[0].kind == "synopsis" and reply.items[0].text == synopsis.text
    assert "butterfl" not in " ".join(
        item.text.lower() for item in reply.items[1:]
    )  # only the synopsis tells
    assert memory_log(reply.items).splitlines()[0] == f"[summary of the stream up to 00:22] {synopsis.text}"

    ask = Ask(turn="t", question="Which animal was on screen?", ts=30, mode="reprefill")
    answer = "".join(piece for piece, _ in Answerer(engine).answer(ask, reply.items, 40, lambda: False))
    assert "butterfl" in answer.lower(), answer
