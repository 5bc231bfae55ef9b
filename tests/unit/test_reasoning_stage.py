"""The reasoning stage through the stage harness (tests/harness.py): no sockets, no processes, the
tiny 2-layer Qwen2 and an in-process memory stage answering its requests.

Issue #19 item 1 and issue #20 item 6: record prefill is work the loop advances in bounded steps,
a question that arrives during a backlog is answered before the rest of it is prefilled (with
the records that ended before it in its context), an interrupt is seen between two decode steps
and ends the answer with exactly one ``AnswerDone``, every record meets the watches once, and a
memory that does not answer ends the question with an ``AnswerDone`` naming the problem.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from omnistream.memory.stage import MemoryStage
from omnistream.memory.store import MemoryStore
from omnistream.protocol.config import MemoryConfig, ReasoningConfig
from omnistream.protocol.messages import (
    Alert,
    AnswerDelta,
    AnswerDone,
    Ask,
    Interrupt,
    Message,
    Record,
    Retrieve,
    Transcript,
    Watch,
    WatchesRequest,
)
from omnistream.reasoning import stage as stage_module
from omnistream.reasoning import watch as watch_module
from omnistream.reasoning.stage import ReasoningStage

from ..harness import FakeClock, Ticks, run_stage
from .test_memory_and_reasoning import FakeEmbedder, word_engine  # noqa: F401


def in_process_memory(tmp_path: Path) -> tuple[MemoryStage, list[Message]]:
    published: list[Message] = []
    store = MemoryStore(tmp_path / "m.sqlite", FakeEmbedder.dim)
    memory = MemoryStage(MemoryConfig(), store, FakeEmbedder(), published.append)  # type: ignore[arg-type]
    return memory, published


def responder(memory: MemoryStage):
    """Memory's replies, in-process (what its ROUTER answers)."""

    def respond(request: Message) -> list[Message]:
        if isinstance(request, WatchesRequest):
            return [memory.stored_watches(request)]
        assert isinstance(request, Retrieve), request
        return [memory.retrieve(request)]

    return respond


def reasoning(engine, tmp_path: Path, **overrides) -> ReasoningStage:
    config = ReasoningConfig(**{"window_tokens": 4096, "max_new_tokens": 12, **overrides})
    return ReasoningStage(
        config,
        engine,
        lambda message, to=None: True,
        memory_config=MemoryConfig(synopsis_every_records=0, synopsis_every_s=0),
        spill_root=None,
    )


def transcripts(memory: MemoryStage, published: list[Message], session: str, spans) -> list[Record]:
    for t0, t1 in spans:
        memory.handle(Transcript(session=session, t0=t0, ts=t1, text=f"the kettle line at {t0:.0f} seconds"))
    return [m for m in published if isinstance(m, Record) and m.session == session]


def kv_ids(stage: ReasoningStage, session: str) -> list[int]:
    kv = stage.answerer.sessions[session].kv
    return [b.item_id for b in kv.evicted] + [b.item_id for b in kv.window]


def test_a_question_during_a_backlog_is_answered_before_the_rest_of_it_is_prefilled(
    word_engine,  # noqa: F811
    short_tmp: Path,
) -> None:
    memory, published = in_process_memory(short_tmp)
    records = transcripts(memory, published, "s", [(4.0 * i, 4.0 * i + 3) for i in range(40)])
    stage = reasoning(word_engine, short_tmp)
    respond = responder(memory)
    # The backlog: 40 records (of which 6 ended before the question) arrive at once; the
    # question comes two loop turns later.
    ask = Ask(ts=23.5, session="s", turn="q1", question="what about the kettle?")
    run = run_stage(
        stage,
        [*records, Ticks(2), ask],
        respond=respond,
        until=lambda out: bool(out.of(AnswerDone)),
    )
    [done] = run.of(AnswerDone)
    assert not done.error, done
    assert run.of(AnswerDelta) and done.first_token_s >= 0
    held = kv_ids(stage, "s")
    # Answered with the records that ended before the question in its KV and its context ...
    assert held[:6] == [r.item_id for r in records[:6]]
    assert done.context and done.context[0][0] == 0.0 and done.context[-1][1] >= 23.0
    # ... and most of the backlog still waiting: it comes after the answer.
    queued = stage.queued_records.get("s", [])
    assert len(queued) >= 20, len(queued)
    assert len(held) + len(queued) == 40
    run_stage(stage, [], respond=respond)
    assert kv_ids(stage, "s") == [r.item_id for r in records]  # every record, once, in order
    assert not stage.queued_records


def test_prefill_goes_in_bounded_steps(word_engine, short_tmp: Path) -> None:  # noqa: F811
    memory, published = in_process_memory(short_tmp)
    records = transcripts(memory, published, "s", [(4.0 * i, 4.0 * i + 3) for i in range(24)])
    stage = reasoning(word_engine, short_tmp)
    run_stage(stage, records, respond=responder(memory), until=lambda out: "s" in stage.loaded_sessions)
    steps = 0
    while stage.queued_records:
        before = len(stage.queued_records["s"])
        assert stage.tick() is True
        taken = before - len(stage.queued_records.get("s", []))
        assert 1 <= taken <= 8, taken  # ~PREFILL_STEP_TOKENS at a time
        steps += 1
    assert steps >= 3
    assert stage.tick() is False  # idle
    assert kv_ids(stage, "s") == [r.item_id for r in records]


def test_an_interrupt_between_decode_steps_stops_the_answer_with_one_answer_done(
    word_engine,  # noqa: F811
    short_tmp: Path,
) -> None:
    memory, published = in_process_memory(short_tmp)
    records = transcripts(memory, published, "s", [(0.0, 3.0), (4.0, 7.0)])
    stage = reasoning(word_engine, short_tmp, max_new_tokens=64)
    respond = responder(memory)
    run_stage(stage, records, respond=respond)
    # The tiny model never stops by itself: without the interrupt it would write 64 tokens.
    stage.engine.eos_ids = set()
    ask = Ask(ts=8.0, session="s", turn="q1", question="what about the kettle?")
    run = run_stage(stage, [ask], respond=respond, until=lambda out: len(out.of(AnswerDelta)) >= 2)
    run2 = run_stage(stage, [Interrupt(session="s", turn="q1", reason="barge-in")], respond=respond)
    deltas = run.of(AnswerDelta) + run2.of(AnswerDelta)
    [done] = run2.of(AnswerDone)
    assert done.error == "interrupted" and done.turn == "q1"
    assert 2 <= len(deltas) <= 3, deltas  # at most the step in hand when it came
    assert not run.of(AnswerDone)
    # An interrupt for a question not started yet drops it (no answer at all).
    asks = [Ask(ts=8.0, session="s", turn=f"q{i}", question="what about the kettle?") for i in (2, 3)]
    run3 = run_stage(
        stage,
        [asks[0], asks[1], Interrupt(session="s", turn="q3")],
        respond=respond,
        until=lambda out: bool(out.of(AnswerDone)),
    )
    run_stage(stage, [Interrupt(session="s", turn="q2")], respond=respond)
    assert [d.turn for d in run3.of(AnswerDone)] in ([], ["q2"])
    assert all(d.turn != "q3" for d in run3.of(AnswerDelta))


def test_every_record_meets_the_watches_once(word_engine, short_tmp: Path, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setattr(watch_module, "MARGIN_OVER_NEUTRAL", -1.0)  # every record meets it
    memory, published = in_process_memory(short_tmp)
    records = transcripts(memory, published, "s", [(4.0 * i, 4.0 * i + 3) for i in range(12)])
    stage = reasoning(word_engine, short_tmp)
    respond = responder(memory)
    watch = Watch(session="s", watch_id="w1", condition="tell me when the kettle boils")
    ask = Ask(ts=20.0, session="s", turn="q1", question="what about the kettle?")
    # A question in the middle of the backlog prefills part of it first (and its retrieval
    # returns records already queued): still one alert per record.
    run = run_stage(stage, [watch, *records[:8], Ticks(1), ask, *records[8:]], respond=respond)
    alerts = run.of(Alert)
    assert len(run.of(AnswerDone)) == 1
    assert sorted(a.ts for a in alerts) == sorted(r.ts for r in records), alerts
    run_stage(stage, [records[3]], respond=respond)  # a record seen again: not checked again
    assert stage.watched_upto["s"] == records[-1].item_id


def test_memory_that_does_not_answer_ends_the_question_with_the_error(word_engine, short_tmp: Path) -> None:  # noqa: F811
    stage = reasoning(word_engine, short_tmp)
    clock = FakeClock()
    ask = Ask(ts=5.0, session="s", turn="q1", question="what about the kettle?")
    run = run_stage(stage, [ask], clock, respond=None)
    [done] = run.of(AnswerDone)
    assert "memory did not answer" in done.error and "2 attempts" in done.error, done.error
    assert not run.of(AnswerDelta)
    requests = [sent for sent in run.sent if sent.to.channel == "memory"]
    assert requests and all(isinstance(s.message, WatchesRequest | Retrieve) for s in requests)
    # Sent twice each, MEMORY_TIMEOUT_S apart, then given up: about 2 x 10 s of the fake clock.
    assert clock() - 1000.0 >= 2 * stage_module.MEMORY_TIMEOUT_S
    # Memory refusing the question says so too.
    memory, _ = in_process_memory(short_tmp)
    from omnistream.protocol.messages import Error

    def refuse(request: Message) -> list[Message]:
        if isinstance(request, Retrieve) and request.page_size == 0:
            return [Error(code="invalid", message="no such session", request_id=request.request_id)]
        return responder(memory)(request)

    run = run_stage(stage, [Ask(ts=5.0, session="t", turn="q2", question="and now?")], respond=refuse)
    [done] = run.of(AnswerDone)
    assert "memory refused the request: no such session" in done.error


@pytest.mark.parametrize("bad", ["", "x" * 2001])
def test_an_invalid_question_is_answered_with_the_reason(word_engine, short_tmp: Path, bad: str) -> None:  # noqa: F811
    stage = reasoning(word_engine, short_tmp)
    run = run_stage(stage, [Ask(ts=1.0, session="s", turn="q", question=bad)])
    [done] = run.of(AnswerDone)
    assert "Ask.question must be 1..2000 characters" in done.error
    assert not [s for s in run.sent if s.to.channel == "memory"]
