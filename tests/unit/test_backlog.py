"""A question asked while records are still being ingested (issue #20 item 6): the reasoning stage
through the stage harness (tests/harness.py), the tiny 2-layer Qwen2 and an in-process memory.

A backlog longer than ``reasoning.backlog_tokens`` is not prefilled before the answer: the answer
reads the most related and newest of its retrieved records as text (after the KV's memory, so
they are in its prompt and its context), and the backlog that ended before the question is
prefilled right after the answer, before the next question. A short backlog is prefilled first.
"""

from __future__ import annotations

from pathlib import Path

from omnistream.protocol.messages import AnswerDelta, AnswerDone, Ask, MemoryRecord
from omnistream.reasoning.prompt import backlog_records, format_item

from ..harness import Ticks, run_stage
from .test_memory_and_reasoning import word_engine  # noqa: F401
from .test_reasoning_stage import in_process_memory, kv_ids, reasoning, responder, transcripts


def spoken(item_id: int, t0: float, t1: float, text: str) -> MemoryRecord:
    return MemoryRecord(kind="transcript", t0=t0, t1=t1, text=text, item_id=item_id)


def test_backlog_records_are_the_most_related_then_the_newest_within_the_budget() -> None:
    items = [spoken(i, 4.0 * i, 4.0 * i + 3, f"line number {i} about nothing") for i in range(1, 30)]
    items[3] = spoken(4, 16.0, 19.0, "the red kettle boiled over on the stove")
    count = len  # a token per character: each line is 45-60
    picked = backlog_records("What boiled over on the stove?", items, 120.0, 130, count)
    assert [r.item_id for r in picked] == [4, 29]  # the related line, then the newest, in time order
    assert sum(count(format_item(r) + "\n") for r in picked) <= 130
    assert backlog_records("What boiled over?", items, 120.0, 0, count) == []
    assert [r.item_id for r in backlog_records("Anything?", items, 120.0, 200, count)] == [27, 28, 29]


def test_a_question_after_a_long_backlog_gets_its_first_token_before_the_backlog_is_prefilled(
    word_engine,  # noqa: F811
    short_tmp: Path,
    monkeypatch,
) -> None:
    memory, published = in_process_memory(short_tmp)
    records = transcripts(memory, published, "s", [(4.0 * i, 4.0 * i + 3) for i in range(40)])
    stage = reasoning(word_engine, short_tmp, backlog_tokens=128)
    respond = responder(memory)
    prompts: list[str] = []
    forward = word_engine.forward

    def recording(ids, cache, start, *args, **kwargs):
        prompts.append(word_engine.tokenizer.decode(ids[0]))
        return forward(ids, cache, start, *args, **kwargs)

    monkeypatch.setattr(word_engine, "forward", recording)
    # 40 records arrive at once, 25 of them (~450 tokens) ended before the question, two loop
    # turns later; a second question comes with it.
    asks = [Ask(ts=100.0, session="s", turn=f"q{i}", question="what about the kettle?") for i in (1, 2)]
    run = run_stage(
        stage, [*records, Ticks(2), *asks], respond=respond, until=lambda out: bool(out.of(AnswerDelta))
    )
    before = [r for r in records if r.ts <= 100.0]
    # The first token came with the backlog not prefilled into the session's KV (at most the
    # step the loop took before the question came) ...
    held = kv_ids(stage, "s")
    assert len(held) <= 8 and held == [r.item_id for r in records[: len(held)]]
    assert stage.counters["backlogs_deferred"] == 1 and stage.counters["records_before_answer"] == 0
    # ... and the newest records before the question were read as text, in its prompt.
    read = stage.answerer.last_backlog
    assert 2 <= len(read) < len(before)
    assert read[-1].item_id == before[-1].item_id and all(r.t1 <= 100.0 for r in read)
    assert any(f"kettle line at {read[-1].t0:.0f} seconds" in p for p in prompts)
    run2 = run_stage(stage, [], respond=respond, until=lambda out: len(out.of(AnswerDone)) == 2)
    done1, done2 = run.of(AnswerDone) + run2.of(AnswerDone)
    assert not done1.error and not done2.error
    assert done1.context and done1.context[-1][1] >= before[-1].ts  # the backlog read is in its context
    # Right after the first answer (before the second), the records that ended before it were
    # prefilled: the second question found no backlog to defer and read them from the KV.
    assert stage.counters["backlogs_deferred"] == 1
    assert kv_ids(stage, "s")[: len(before)] == [r.item_id for r in before]
    assert done2.context[0][0] == 0.0 and done2.context[-1][1] >= 99.0
    run_stage(stage, [], respond=respond)
    assert kv_ids(stage, "s") == [r.item_id for r in records]  # every record, once, in order
    assert not stage.queued_records


def test_a_short_backlog_is_prefilled_first_and_zero_never_defers(word_engine, short_tmp: Path) -> None:  # noqa: F811
    memory, published = in_process_memory(short_tmp)
    records = transcripts(memory, published, "s", [(4.0 * i, 4.0 * i + 3) for i in range(40)])
    respond = responder(memory)
    for limit, ts, deferred in ((128, 11.5, 0), (0, 100.0, 0), (128, 100.0, 1)):
        stage = reasoning(word_engine, short_tmp / f"{limit}-{ts}", backlog_tokens=limit)
        ask = Ask(ts=ts, session="s", turn="q1", question="what about the kettle?")
        run = run_stage(
            stage, [*records, Ticks(2), ask], respond=respond, until=lambda out: bool(out.of(AnswerDone))
        )
        assert not run.of(AnswerDone)[0].error
        assert stage.counters["backlogs_deferred"] == deferred, (limit, ts)
        if not deferred:
            ended = [r.item_id for r in records if r.ts <= ts]
            assert kv_ids(stage, "s")[: len(ended)] == ended  # in the KV before the answer
            assert stage.answerer.last_backlog == []


def test_related_records_can_be_switched_off(word_engine, short_tmp: Path) -> None:  # noqa: F811
    memory, published = in_process_memory(short_tmp)
    records = transcripts(memory, published, "s", [(4.0 * i, 4.0 * i + 3) for i in range(6)])
    respond = responder(memory)
    for on in (True, False):
        stage = reasoning(word_engine, short_tmp, related_records=on)
        ask = Ask(ts=30.0, session="s", turn="q1", question="What did the voice say about the kettle line?")
        run_stage(
            stage, [*records, Ticks(2), ask], respond=respond, until=lambda out: bool(out.of(AnswerDone))
        )
        assert bool(stage.answerer.related) == on
