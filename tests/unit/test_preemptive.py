"""Preemptive generation (issue #21 item 2), through the stage harness: no sockets, no processes,
the tiny 2-layer Qwen2.

The speech stage asks a spoken question tentatively (``Ask.tentative``) before the end of the
user's turn is confirmed. Reasoning answers it with pieces marked tentative (for the speech stage
only: the gateway does not relay them); an ``Ask`` of the same turn without the flag confirms it
(the pieces are sent again, unmarked, with the same ``seq``), an ``Interrupt`` with reason
PREEMPTION_DISCARDED drops it without a trace for clients. The answer a client gets is the one the
same question gets without preemption, token for token. (The speech stage's side, hold and
release of the audio, needs whisper, the VAD and the voice: tests/integration/test_speech_duplex.py.)
"""

from __future__ import annotations

from pathlib import Path

from omnistream.protocol.messages import (
    PREEMPTION_DISCARDED,
    AnswerDelta,
    AnswerDone,
    Ask,
    Interrupt,
    Message,
)
from omnistream.reasoning.stage import ReasoningStage

from ..harness import run_stage
from .test_gateway_stage import gateway, on, replies_to, request
from .test_memory_and_reasoning import word_engine  # noqa: F401
from .test_reasoning_stage import in_process_memory, reasoning, responder, transcripts

QUESTION = "what about the kettle?"


def answered(run: list[Message], turn: str) -> tuple[list[tuple[int, str]], AnswerDone | None]:
    """What a client would get for ``turn``: the unmarked pieces (seq, text) and end."""
    pieces = [
        (m.seq, m.text) for m in run if isinstance(m, AnswerDelta) and m.turn == turn and not m.tentative
    ]
    done = [m for m in run if isinstance(m, AnswerDone) and m.turn == turn and not m.tentative]
    assert len(done) <= 1, done
    return pieces, done[0] if done else None


def fresh(word_engine, tmp: Path) -> tuple[ReasoningStage, object]:  # noqa: F811
    memory, published = in_process_memory(tmp)
    records = transcripts(memory, published, "s", [(0.0, 3.0), (4.0, 7.0)])
    stage = reasoning(word_engine, tmp, max_new_tokens=16)
    respond = responder(memory)
    run_stage(stage, records, respond=respond)
    return stage, respond


def test_a_confirmed_tentative_answer_is_the_answer_without_preemption_token_for_token(
    word_engine,  # noqa: F811
    short_tmp: Path,
) -> None:
    # Without preemption.
    stage, respond = fresh(word_engine, short_tmp / "plain")
    plain = run_stage(stage, [Ask(ts=8.0, session="s", turn="q", question=QUESTION)], respond=respond)
    want_pieces, want_done = answered(plain, "q")
    assert len(want_pieces) >= 4 and want_done is not None and not want_done.error
    assert not any(getattr(m, "tentative", False) for m in plain)

    # Confirmed after the tentative answer ended: nothing unmarked before, all of it after.
    stage, respond = fresh(word_engine, short_tmp / "late")
    ask = Ask(ts=8.0, session="s", turn="q", question=QUESTION, tentative=True)
    early = run_stage(stage, [ask], respond=respond)
    assert answered(early, "q") == ([], None)
    held = [m for m in early if isinstance(m, AnswerDelta)]
    assert held and all(m.tentative for m in held)
    assert [(m.seq, m.text) for m in held] == want_pieces  # what speech synthesises meanwhile
    confirmed = run_stage(stage, [Ask(ts=8.0, session="s", turn="q", question=QUESTION)], respond=respond)
    pieces, done = answered(confirmed, "q")
    assert pieces == want_pieces
    assert done is not None and done.text == want_done.text and done.context == want_done.context
    assert not stage.unconfirmed and stage.counters["asks_confirmed"] == 1

    # Confirmed while it is being written: the pieces so far again, then the rest, unmarked.
    stage, respond = fresh(word_engine, short_tmp / "mid")
    first = run_stage(stage, [ask], respond=respond, until=lambda out: len(out.of(AnswerDelta)) >= 2)
    assert answered(first, "q") == ([], None)
    rest = run_stage(stage, [Ask(ts=8.0, session="s", turn="q", question=QUESTION)], respond=respond)
    pieces, done = answered(rest, "q")
    assert pieces == want_pieces and done is not None and done.text == want_done.text


def test_a_discarded_tentative_answer_leaves_nothing_for_clients(word_engine, short_tmp: Path) -> None:  # noqa: F811
    stage, respond = fresh(word_engine, short_tmp)
    stage.engine.eos_ids = set()  # the tiny model never stops by itself
    ask = Ask(ts=8.0, session="s", turn="t", question="what about the", tentative=True)
    run = run_stage(stage, [ask], respond=respond, until=lambda out: len(out.of(AnswerDelta)) >= 2)
    run2 = run_stage(
        stage,
        [
            Interrupt(session="s", turn="t", reason=PREEMPTION_DISCARDED),
            Ask(ts=9.0, session="s", turn="q", question=QUESTION),  # asked again, the final words
        ],
        respond=respond,
    )
    assert answered(run + run2, "t") == ([], None)
    ends = [m for m in run2 if isinstance(m, AnswerDone) and m.turn == "t"]
    assert [(e.tentative, e.error) for e in ends] == [(True, "interrupted")]
    pieces, done = answered(run2, "q")
    assert pieces and done is not None and not done.error
    assert not stage.unconfirmed
    # A tentative answer that ended, then discarded: a late confirmation finds nothing held.
    run3 = run_stage(
        stage, [Ask(ts=9.5, session="s", turn="u", question=QUESTION, tentative=True)], respond=respond
    )
    assert "u" in stage.unconfirmed and answered(run3, "u") == ([], None)
    run_stage(stage, [Interrupt(session="s", turn="u", reason=PREEMPTION_DISCARDED)], respond=respond)
    assert "u" not in stage.unconfirmed


def test_the_gateway_relays_no_tentative_answer_and_refuses_a_tentative_ask(tmp_path: Path) -> None:
    stage = gateway(tmp_path)
    run = run_stage(
        stage,
        [
            AnswerDelta(session="s", turn="t", text="A cup", seq=0, tentative=True),
            AnswerDone(session="s", turn="t", text="A cup.", tentative=True),
            Interrupt(session="s", turn="d", reason=PREEMPTION_DISCARDED),
            AnswerDelta(session="s", turn="t", text="A cup", seq=0),
            AnswerDone(session="s", turn="t", text="A cup."),
            request(Ask(session="s", turn="x", question="what is this?", tentative=True)),
        ],
    )
    relayed = on(run, "clients")
    assert [(type(m), m.tentative) for m in relayed] == [(AnswerDelta, False), (AnswerDone, False)]
    [refused] = replies_to(run, b"alice")
    assert "tentative" in refused.message and not on(run, "bus")
