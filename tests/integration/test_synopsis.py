"""The L3 synopsis with the real fast LLM and the real memory stage (MiniLM, SQLite).

Records go into memory; the reasoner's synopsizer writes a synopsis from them; memory stores and
acknowledges it; a later question's context starts with it. The tiers are made so small that
the question's context holds nothing else about the start of the stream: the answer has to come
from the synopsis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from omnistream.memory.embedder import TextEmbedder
from omnistream.memory.stage import MemoryStage
from omnistream.memory.store import MemoryStore
from omnistream.protocol.config import MemoryConfig, load_config
from omnistream.protocol.messages import Ask, Clip, Label, MemoryRecord, Record, Retrieve, Transcript
from omnistream.reasoning.answer import Answerer
from omnistream.reasoning.llm.engine import LLMEngine
from omnistream.reasoning.llm.prepare import prepare_llm
from omnistream.reasoning.prompt import memory_log
from omnistream.reasoning.synopsis import Synopsizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    # float32 weights: with the CPU default (int8) the 0.5B's one-sentence summary of these four
    # records leaves out the second transcript ("Linux is a kernel"), which the checks below need.
    return LLMEngine(prepare_llm("qwen2.5-coder-0.5b", load_config().cache_dir), "float32", 2)


def clip(clip_id: int, t0: float, t1: float, description: str) -> Clip:
    features = np.zeros(8, np.float32)
    features[clip_id % 8] = 1.0
    return Clip(
        clip_id=clip_id, t0=t0, ts=t1, features=features, labels=[Label("x", 0.5)], description=description
    )


ANIMAL_WORDS = ("butterfl", "monarch", "admiral", "ringlet")


def items_of(records: list[Record]) -> list[MemoryRecord]:
    return [
        MemoryRecord(kind=r.kind, t0=r.t0, t1=r.ts, text=r.text, speaker=r.speaker, item_id=r.item_id)
        for r in records
    ]


def test_synopsis_from_real_records_is_stored_and_answers_a_later_question(
    engine: LLMEngine, tmp_path: Path
) -> None:
    # L1 holds one record and L2 none: everything older than the newest record is archived, and
    # the question below asks for no archive hits and no recent window.
    config = MemoryConfig(
        synopsis_every_records=4, synopsis_max_chars=160, l1_items=1, l2_items=0, return_all_below=0
    )
    published: list = []
    memory = MemoryStage(config, MemoryStore(tmp_path / "m.sqlite", 384), TextEmbedder(), published.append)
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
    for item in items_of(records):
        synopsizer.observe("default", item)
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
    assert synopsis.text.startswith("From 00:00 to 00:22, the stream showed"), synopsis.text
    assert any(word in synopsis.text.lower() for word in ANIMAL_WORDS), synopsis.text
    assert "kernel" in synopsis.text.lower(), synopsis.text
    assert synopsizer.due() == []
    memory.handle(synopsis)
    ack = published[-1]
    assert isinstance(ack, Record) and ack.kind == "synopsis" and ack.text == synopsis.text
    synopsizer.acknowledge(ack)
    assert synopsizer.unacknowledged(now=1e12) == []

    reply = memory.retrieve(Retrieve(ts=30, request_id="q", query="What was on screen?", top_k=0, recent_s=0))
    assert [item.kind for item in reply.items] == ["synopsis"]  # nothing else tells what was seen
    assert reply.items[0].text == synopsis.text
    assert memory_log(reply.items) == f"[summary of the stream up to 00:22] {synopsis.text}"
    ask = Ask(turn="t", question="What did the voice say Linux is?", ts=30, mode="reprefill")
    answer = "".join(
        piece for piece, _ in Answerer(engine).answer(ask, reply.items, 40, lambda: False)
    ).lower()
    assert "kernel" in answer, answer

    # Four more records: a second sentence, and the synopsis outgrows 160 characters, so its two
    # sentences are summed up into one covering the whole stream.
    published.clear()
    for message in (
        clip(3, 22, 30, "seen: teapot (kitchenware)"),
        Transcript(t0=24, ts=28, text="The tea is ready.", speaker="scene"),
        clip(4, 30, 40, "seen: coffee mug (kitchenware)"),
        Transcript(t0=32, ts=36, text="Coffee, please.", speaker="scene"),
    ):
        memory.handle(message)
    for item in items_of([m for m in published if isinstance(m, Record)]):
        synopsizer.observe("default", item)
    second = synopsizer.write("default", lambda: False)
    assert second is not None and second.ts == 40
    assert second.text.startswith("From 00:00 to 00:40, the stream showed"), second.text
    assert len(synopsizer.digest("default").sentences) == 1
    memory.handle(second)
    latest = memory.retrieve(Retrieve(ts=45, request_id="q2", query="What happened?", top_k=0, recent_s=0))
    assert latest.items[0].text == second.text
