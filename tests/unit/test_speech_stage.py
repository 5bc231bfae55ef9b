"""The speech stage through the stage harness (tests/harness.py): no sockets, no processes, no
whisper and no voice (issue #19 item 1).

What runs here needs no audio (no VAD, no transcription): answers for a stage that speaks
nothing, messages about turns and sessions it does not know, a question that waits for the end of
its turn and goes out from ``tick`` when it is due, and closing sessions. The recognizer is
absent (``None``): nothing here is ever handed to it.
"""

from __future__ import annotations

from omnistream.protocol.config import SpeechConfig
from omnistream.protocol.messages import AnswerDelta, AnswerDone, Ask, Interrupt
from omnistream.speech.duplex import PendingQuestion
from omnistream.speech.stage import SessionState, SpeechStage
from omnistream.speech.turns import Timeline

from ..harness import FakeClock, run_stage


def speech(**overrides) -> SpeechStage:
    """A stage with no recognizer (nothing here is transcribed) and no voice (nothing spoken);
    ``emit`` and ``clock`` are the harness's while it runs."""
    return SpeechStage(SpeechConfig(tts_enabled=False, **overrides), None, None, lambda m: True)  # type: ignore[arg-type]


def test_answers_for_turns_it_does_not_speak_emit_nothing_and_keep_no_state() -> None:
    stage = speech()
    ask = Ask(ts=3.0, session="s", turn="t1", question="what is on the table?", speak=False)
    run = run_stage(
        stage,
        [
            ask,
            AnswerDelta(ts=3.0, session="s", turn="t1", seq=0, text="A red mug. "),
            AnswerDone(ts=3.0, session="s", turn="t1", text="A red mug."),
            # Turns and sessions it never heard of: ignored, not an error.
            AnswerDelta(ts=3.0, session="other", turn="nope", seq=0, text="Hello."),
            AnswerDone(ts=3.0, session="other", turn="nope", text="Hello."),
            Interrupt(ts=3.0, session="other", turn="nope", reason="barge-in"),
        ],
    )
    assert list(run) == []  # no AudioOut, no assistant Transcript, no Error
    assert stage.turns == {} and dict(stage.sessions) == {}
    assert stage.counters["answers_spoken"] == 0 and stage.counters["asks"] == 0


def test_a_question_waiting_for_the_end_of_its_turn_is_asked_by_tick_when_due() -> None:
    clock = FakeClock()
    stage = speech()
    state = stage.sessions.setdefault("s", SessionState(user_rate=24000))
    deadline = clock() + 0.6
    state.pending = PendingQuestion("what did I just say?", 1.0, 2.5, deadline, Timeline(""))
    assert stage.question_pending()

    run = run_stage(stage, [], clock=clock, until=lambda out: bool(out.of(Ask)))

    [ask] = run.of(Ask)
    assert list(run) == [ask]
    assert (ask.session, ask.question, ask.ts, ask.audio_rate) == ("s", "what did I just say?", 2.5, 24000)
    assert ask.turn and not ask.tentative
    assert deadline <= clock() < deadline + 0.1  # asked at its deadline, not before, not much after
    assert not stage.question_pending() and state.asked is not None and state.asked.turn == ask.turn
    assert state.ask_timeline is not None and state.ask_timeline.marks["ask"] == clock()
    assert stage.counters["asks"] == 1


def test_closing_a_session_forgets_it_unless_a_question_of_it_is_still_to_be_asked() -> None:
    clock = FakeClock()
    stage = speech()
    stage.sessions["idle"] = SessionState(user_rate=16000)
    waiting = stage.sessions.setdefault("asking", SessionState(user_rate=16000))
    waiting.pending = PendingQuestion("and the blue one?", 4.0, 5.0, clock() + 0.3, Timeline(""))

    stage.close_session("idle")
    stage.close_session("asking")

    assert list(stage.sessions) == ["asking"] and stage.counters["sessions_closed"] == 2
    run = run_stage(stage, [], clock=clock)  # the closed session's question still goes out
    [ask] = list(run)
    assert isinstance(ask, Ask) and (ask.session, ask.question, ask.ts) == (
        "asking",
        "and the blue one?",
        5.0,
    )
    assert not stage.question_pending() and stage.live == []
    # Messages for the forgotten session create no state; a later question of it starts afresh.
    assert list(run_stage(stage, [Interrupt(ts=6.0, session="idle", turn="", reason="stop")])) == []
    assert "idle" not in stage.sessions
