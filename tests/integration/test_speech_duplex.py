"""The speech stage with real models, messages in and messages out, no sockets (pipecat's
``run_test`` idea): streaming TTS, spoken questions, wake phrase, barge-in, false interruptions
and echo. Microphone audio is fed in real time where timing matters."""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pytest
import soundfile
from scipy.signal import resample_poly

from omnistream.protocol.config import SpeechConfig
from omnistream.protocol.messages import (
    PREEMPTION_DISCARDED,
    AnswerDelta,
    AnswerDone,
    Ask,
    AudioChunk,
    AudioOut,
    Draft,
    Interrupt,
    Message,
    Transcript,
    UserSpeech,
)
from omnistream.protocol.text import words
from omnistream.speech.asr import Recognizer
from omnistream.speech.speak import PhraseSplitter, Voice
from omnistream.speech.stage import SpeechStage
from omnistream.speech.wer import word_error_rate

from ..util import wait_until
from .test_speech import librivox_clips

ANSWER = "You saw a monarch butterfly at the start. Then the reader said he might have been made amiable."
MIC_RATE = 16000
STEP_S = 0.02  # the client sends 20 ms microphone chunks


@pytest.fixture(scope="module")
def recognizer() -> Recognizer:
    return Recognizer("tiny.en")


@pytest.fixture(scope="module")
def voice() -> Voice:
    return Voice("heart")


@pytest.fixture
def make_harness(recognizer: Recognizer, voice: Voice):
    """``make_harness(**speech_config)``; the stages' worker threads are stopped afterwards."""
    made: list[Harness] = []

    def make(mic_rate: int = MIC_RATE, **config) -> Harness:
        made.append(Harness(recognizer, voice, mic_rate, **config))
        return made[-1]

    yield make
    for harness in made:
        harness.stage.close()


class Harness:
    """Drives a ``SpeechStage`` like the runtime does: ``handle`` then ``tick``; records what it
    publishes with the wall time."""

    def __init__(self, recognizer: Recognizer, voice: Voice, mic_rate: int = MIC_RATE, **config):
        self.out: list[tuple[float, Message]] = []
        self.counters: dict[str, float] = defaultdict(float)
        self.stage = SpeechStage(
            SpeechConfig(**config),
            recognizer,
            voice,
            lambda m: self.out.append((time.monotonic(), m)),
            self.counters,
        )
        self.mic_ts = 0.0
        self.mic_rate = mic_rate
        self.echo: list[np.ndarray] = []  # assistant audio that reaches the microphone

    def send(self, message: Message) -> None:
        self.stage.handle(message)
        self.stage.tick()

    def of(self, kind: type) -> list:
        """What was published of ``kind``; tentative Asks (preemptive generation) left out: the
        Ask that confirms one has the same turn, question and ts (``tentative`` has them)."""
        return [m for _, m in self.out if isinstance(m, kind) and not getattr(m, "tentative", False)]

    def tentative(self) -> list[Ask]:
        return [m for _, m in self.out if isinstance(m, Ask) and m.tentative]

    def mic(self, audio: np.ndarray, realtime: bool = True) -> None:
        """Feed the user's microphone in 20 ms chunks (plus any echo), ticking between chunks."""
        rate = self.mic_rate
        step = int(STEP_S * rate)
        start = time.monotonic()
        for index, offset in enumerate(range(0, len(audio), step)):
            piece = audio[offset : offset + step].astype(np.float32)
            if self.echo:
                leak = np.concatenate(self.echo)
                self.echo = [leak[len(piece) :]] if len(leak) > len(piece) else []
                piece = piece + 0.5 * np.pad(leak[: len(piece)], (0, max(len(piece) - len(leak), 0)))
            self.send(AudioChunk(ts=self.mic_ts, pcm=piece, sample_rate=rate, channel="user"))
            self.mic_ts += len(piece) / rate
            if realtime:
                time.sleep(max(start + (index + 1) * STEP_S - time.monotonic(), 0.0))

    def run_until(self, condition, timeout_s: float = 30.0, silence: bool = True) -> None:
        """Tick (feeding microphone silence in real time) until ``condition()``."""
        if silence:
            every, interval = lambda: self.mic(np.zeros(int(STEP_S * self.mic_rate), np.float32)), 0.0
        else:
            every, interval = self.stage.tick, 0.005
        what = lambda: f"the condition; sent: {[type(m).__name__ for _, m in self.out][-20:]}"  # noqa: E731
        wait_until(condition, timeout_s, what, every=every, interval=interval)

    def audio_of(self, turn: str) -> np.ndarray:
        chunks = [m.pcm for m in self.of(AudioOut) if m.turn == turn and m.pcm is not None]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    def finished(self, turn: str) -> bool:
        return any(m.final for m in self.of(AudioOut) if m.turn == turn)

    def stream_answer(self, turn: str, text: str, delay_s: float = 0.05) -> None:
        """Word-by-word deltas at about LLM speed, then ``AnswerDone``."""
        for seq, word in enumerate(text.split(" ")):
            self.send(AnswerDelta(turn=turn, text=word if seq == 0 else " " + word, seq=seq))
            self.mic(np.zeros(int(delay_s * MIC_RATE), np.float32))
        self.send(AnswerDone(turn=turn, text=text))


def speech_clip(index: int) -> np.ndarray:
    audio, rate = soundfile.read(librivox_clips()[index][0], dtype="float32")
    assert rate == MIC_RATE
    return audio


def test_tts_streams_phrases_before_the_answer_is_done_and_adds_up_to_the_whole_answer(
    recognizer: Recognizer, voice: Voice, make_harness
) -> None:
    h = make_harness()
    h.send(Ask(turn="t1", question="What did you see?", audio_rate=16000))
    h.stream_answer("t1", ANSWER)
    done_wall = time.monotonic()
    h.run_until(lambda: h.finished("t1"), silence=False)
    outs = [(wall, m) for wall, m in h.out if isinstance(m, AudioOut) and m.pcm is not None]
    assert outs[0][0] < done_wall  # the first phrase was heard before the answer was complete
    assert {m.sample_rate for _, m in outs} == {16000}
    assert max(len(m.pcm) for _, m in outs) <= 0.04 * 16000 + 1  # small paced chunks
    assert [m.seq for _, m in outs] == sorted(m.seq for _, m in outs)
    # The same deltas through the stage's splitter: the first words are spoken before the clause ends.
    splitter = PhraseSplitter(first_words=SpeechConfig().first_phrase_words)
    deltas = [word if seq == 0 else " " + word for seq, word in enumerate(ANSWER.split(" "))]
    phrases = [phrase for delta in deltas for phrase in splitter.push(delta)] + splitter.finish()
    assert phrases[0] == "You saw a monarch" and len(phrases) >= 3
    expected = np.concatenate([voice.synthesize(p, 16000) for p in phrases])
    np.testing.assert_array_equal(h.audio_of("t1"), expected)
    assert word_error_rate(ANSWER, recognizer.transcribe(expected)) <= 0.2
    [spoken] = [m for m in h.of(Transcript) if m.speaker == "assistant"]
    assert spoken.text == " ".join(phrases) and spoken.turn == "t1"
    assert spoken.ts - spoken.t0 == pytest.approx(len(expected) / 16000, abs=0.01)
    assert not h.of(Interrupt)


def test_spoken_question_becomes_an_ask_at_the_end_of_the_turn(
    recognizer: Recognizer, voice: Voice, make_harness
) -> None:
    """A question that reads as finished is asked after ``turn_end_s`` of silence: well before
    the utterance would end (``min_silence_s``) and without the grace (made 5 s here to show it)."""
    # A 48 kHz microphone; no preemptive generation: the Ask at the end of the turn is the first.
    h = make_harness(mic_rate=48000, turn_grace_s=5.0, preemptive=False)
    clip = speech_clip(4)  # "he might even have been made amiable himself"
    mic_48k = resample_poly(np.concatenate([np.zeros(8000, np.float32), clip]), 3, 1).astype(np.float32)
    h.mic(mic_48k, realtime=False)
    fed_wall = time.monotonic()
    h.run_until(lambda: h.of(Ask), timeout_s=20)
    [ask] = h.of(Ask)
    ask_wall = next(wall for wall, m in h.out if isinstance(m, Ask))
    assert ask_wall - fed_wall < 4.0  # turn_end_s + ASR, not min_silence_s + 5 s of grace
    final = [m for m in h.of(Transcript) if m.final and m.speaker == "user"]
    assert len(final) == 1 and word_error_rate(librivox_clips()[4][1], final[0].text) <= 0.2
    assert ask.question == final[0].text and ask.ts == final[0].ts
    assert 0.2 < final[0].t0 < 0.8 and 3.0 < final[0].ts < 4.5  # stream times of the speech
    assert ask.audio_rate == 48000  # answers come back at the microphone's rate
    partials = [m for m in h.of(Transcript) if not m.final]
    assert partials and all(m.t0 == final[0].t0 for m in partials)
    assert [m.started for m in h.of(UserSpeech)] == [True, False]
    # Answered, the turn leaves its latency timeline: every mark, in the order things happen.
    h.send(ask)  # the bus brings the stage's own Ask back
    h.stream_answer(ask.turn, ANSWER, delay_s=0.02)
    h.run_until(lambda: h.stage.timelines)
    [timeline] = h.stage.timelines
    order = ["speech_end", "turn_end", "final", "ask", "ask_received", "first_delta", "first_phrase"]
    order += ["first_tts", "first_audio"]
    assert timeline.turn == ask.turn and list(timeline.marks) == sorted(timeline.marks, key=order.index)
    times = [timeline.marks[name] for name in order]
    assert times == sorted(times) and timeline.asr_s is not None and 0 < timeline.asr_s < 5
    first_audio = next(wall for wall, m in h.out if isinstance(m, AudioOut) and m.pcm is not None)
    assert timeline.marks["first_audio"] == pytest.approx(first_audio, abs=0.005)
    spans = timeline.spans()
    assert spans["last speech window -> first AudioOut sent (speech stage + LLM)"] == pytest.approx(
        times[-1] - times[0]
    )


def test_the_question_is_sent_ahead_as_it_is_heard(
    recognizer: Recognizer, voice: Voice, make_harness
) -> None:
    """While the user speaks, partial transcripts go to reasoning as ``Draft``s of the question
    (read ahead), each the start of what is finally asked; none with ``read_ahead`` off."""
    h = make_harness()
    clip = speech_clip(0)  # "and mister john dashwood had then leisure to consider how much ..."
    h.mic(np.concatenate([np.zeros(4000, np.float32), clip]))  # in real time, as a microphone
    h.run_until(lambda: h.of(Ask), timeout_s=20)
    [ask] = h.of(Ask)
    drafts = [(i, m) for i, (_, m) in enumerate(h.out) if isinstance(m, Draft)]
    ask_at = next(i for i, (_, m) in enumerate(h.out) if isinstance(m, Ask))
    assert len(drafts) >= 2 and all(i < ask_at for i, _ in drafts)
    # Whisper revises partials (an early one may miss the first word, the last word or two of
    # each may change): the last draft is the start of what was asked.
    asked, drafted = words(ask.question), words(drafts[-1][1].question)
    assert drafted[:-2] == asked[: len(drafted) - 2], (drafts[-1][1].question, ask.question)
    assert len(drafted) >= len(asked) // 2
    assert len({m.question for _, m in drafts}) == len(drafts)  # each draft says something new
    assert all(m.ts <= ask.ts for _, m in drafts)

    quiet = make_harness(read_ahead=False)
    quiet.mic(np.concatenate([np.zeros(4000, np.float32), clip[: 2 * MIC_RATE]]))
    quiet.run_until(lambda: quiet.of(Transcript), timeout_s=20)
    assert not quiet.of(Draft)


@pytest.mark.parametrize(
    ("clip", "pause_at_s", "pause_s"),
    [
        (3, 2.55, 1.1),  # "had he married a more amiable woman, | he might have been made ..."
        (0, 2.745, 0.4),  # "and mister john dashwood had then leisure | to consider how much ..."
    ],
)
def test_a_pause_mid_sentence_does_not_cut_the_question_short(
    recognizer: Recognizer, voice: Voice, make_harness, clip: int, pause_at_s: float, pause_s: float
) -> None:
    """Real speech with a pause inserted at a quiet point between two words: the question that
    is answered is the whole sentence. A turn judged over at the pause is extended when the user
    goes on: its Ask is interrupted and the whole sentence is asked."""
    h = make_harness()
    audio = speech_clip(clip)
    cut = int(pause_at_s * MIC_RATE)
    h.mic(
        np.concatenate(
            [np.zeros(4000, np.float32), audio[:cut], np.zeros(int(pause_s * MIC_RATE), np.float32)]
        )
    )
    h.mic(audio[cut:])
    h.run_until(lambda: h.of(Ask) and not h.stage.question_pending() and not h.stage.hearing(), timeout_s=20)
    h.mic(np.zeros(MIC_RATE, np.float32))  # nothing more comes
    asks = h.of(Ask)
    assert word_error_rate(librivox_clips()[clip][1], asks[-1].question) <= 0.25, [a.question for a in asks]
    interrupted = {m.turn for m in h.of(Interrupt) if m.reason == "user continued"}
    assert {a.turn for a in asks[:-1]} <= interrupted and asks[-1].turn not in interrupted
    assert h.counters["questions_continued"] == len(asks) - 1


PREEMPTIVE = {"preemptive": True, "early_final_s": 0.1}


def answer_tentatively(h: Harness, ask: Ask, text: str = ANSWER) -> None:
    """What reasoning does with a tentative Ask: the bus brings it back to the stage, the
    answer's pieces come marked tentative."""
    h.send(ask)
    for seq, word in enumerate(text.split(" ")):
        h.send(AnswerDelta(turn=ask.turn, text=word if seq == 0 else " " + word, seq=seq, tentative=True))
    h.send(AnswerDone(turn=ask.turn, text=text, tentative=True))


def test_a_question_is_answered_preemptively_and_heard_only_once_confirmed(
    recognizer: Recognizer, voice: Voice, make_harness
) -> None:
    """Preemptive generation (issue #21): the transcript at the pause (or the final, when the
    turn then waits its grace) is asked at once (tentatively), its answer synthesised while the
    end of the turn is awaited; not one chunk of it is sent before the Ask that confirms it
    (same turn, question and ts), and the confirmed replay of its pieces is not spoken twice."""
    h = make_harness(turn_end_s=0.5, turn_grace_s=1.0, **PREEMPTIVE)  # every turn waits 1.5 s
    h.mic(np.concatenate([np.zeros(8000, np.float32), speech_clip(4)]), realtime=False)
    h.run_until(lambda: h.tentative(), timeout_s=20)
    [tentative] = h.tentative()
    answer_tentatively(h, tentative)
    h.run_until(lambda: h.of(Ask), timeout_s=20)
    [ask] = h.of(Ask)
    assert (ask.turn, ask.question, ask.ts) == (tentative.turn, tentative.question, tentative.ts)
    [final] = [m for m in h.of(Transcript) if m.final and m.speaker == "user"]
    assert ask.question == final.text and ask.ts == final.ts
    confirmed_at = next(i for i, (_, m) in enumerate(h.out) if isinstance(m, Ask) and not m.tentative)
    sent = [i for i, (_, m) in enumerate(h.out) if isinstance(m, AudioOut) and m.turn == ask.turn]
    assert not sent or sent[0] > confirmed_at  # held until confirmed
    h.send(ask)  # the confirmation comes back over the bus; reasoning sends the pieces again
    for seq, word in enumerate(ANSWER.split(" ")):
        h.send(AnswerDelta(turn=ask.turn, text=word if seq == 0 else " " + word, seq=seq))
    h.send(AnswerDone(turn=ask.turn, text=ANSWER))
    h.run_until(lambda: h.finished(ask.turn), timeout_s=30)
    [spoken] = [m for m in h.of(Transcript) if m.speaker == "assistant"]
    assert words(spoken.text) == words(ANSWER)  # once, not twice
    assert h.counters["preemptions"] == 1 and h.counters["preemptions_confirmed"] == 1
    assert not h.counters["preemptions_discarded"] and not h.of(Interrupt)
    [timeline] = h.stage.timelines  # its first phrase was synthesised before the confirmation
    marks = timeline.marks
    assert marks["ask"] < marks["first_tts"] < marks["confirmed"] <= marks["first_audio"], marks


def test_a_preemptive_answer_is_discarded_when_the_user_goes_on(
    recognizer: Recognizer, voice: Voice, make_harness
) -> None:
    """The user pauses mid-sentence (1.1 s; the turn waits min_silence_s + 1.5 s of grace), is
    asked tentatively at the pause, and goes on: that answer is dropped unheard (an Interrupt
    with reason PREEMPTION_DISCARDED), the whole sentence is asked, and its own tentative
    answer is the one confirmed."""
    h = make_harness(turn_end_s=0.5, turn_grace_s=1.5, **PREEMPTIVE)  # no text signal
    audio, cut = speech_clip(3), int(2.55 * MIC_RATE)  # "had he married a more amiable woman, | he ..."
    h.mic(np.concatenate([np.zeros(4000, np.float32), audio[:cut]]))
    h.run_until(lambda: h.tentative(), timeout_s=20)
    first = h.tentative()[-1]  # asked at the pause
    answer_tentatively(h, first)
    h.mic(np.zeros(int(1.1 * MIC_RATE) - 2000, np.float32))
    h.mic(audio[cut:])
    h.run_until(lambda: h.of(Ask), timeout_s=20)
    [ask] = h.of(Ask)
    assert word_error_rate(librivox_clips()[3][1], ask.question) <= 0.25, ask.question
    assert ask.turn != first.turn and ask.turn == h.tentative()[-1].turn
    # (A pause between two words may have been asked tentatively too, and dropped.)
    dropped = [m.turn for m in h.of(Interrupt)]
    assert first.turn in dropped and {m.reason for m in h.of(Interrupt)} == {PREEMPTION_DISCARDED}
    assert not [m for m in h.of(AudioOut) if m.turn in dropped]  # not a chunk, not a flush
    assert not [m for m in h.of(Transcript) if m.speaker == "assistant"]
    assert h.counters["preemptions_discarded"] == len(dropped) and h.counters["preemptions_confirmed"] == 1


def test_wake_phrase_gates_questions(recognizer: Recognizer, voice: Voice, make_harness) -> None:
    h = make_harness(wake_phrase="computer", turn_grace_s=0.0)
    for text in ("What is on the table?", "Computer, what is on the table?"):
        finals = len([m for m in h.of(Transcript) if m.final])
        h.mic(np.concatenate([voice.synthesize(text, 16000), np.zeros(16000, np.float32)]), realtime=False)
        h.run_until(lambda n=finals: len([m for m in h.of(Transcript) if m.final]) > n)
    h.run_until(lambda: h.of(Ask), timeout_s=5)
    [ask] = h.of(Ask)
    assert words(ask.question) == ["what", "is", "on", "the", "table"], (
        ask.question,
        [m.text for m in h.of(Transcript)],
    )
    assert [words(m.text)[0] for m in h.of(Transcript) if m.final] == ["what", "computer"]


def start_speaking(h: Harness, turn: str) -> float:
    """Ask, stream the whole answer, and let it play for a while; returns the wall time."""
    h.send(Ask(turn=turn, question="What did you see?", audio_rate=16000))
    h.stream_answer(turn, ANSWER, delay_s=0.02)
    h.run_until(lambda: len(h.audio_of(turn)) > 1.0 * 16000)
    return time.monotonic()


def test_user_speech_interrupts_stops_audio_and_memory_keeps_what_was_said(
    recognizer: Recognizer, voice: Voice, make_harness
) -> None:
    h = make_harness()
    start_speaking(h, "t2")
    h.mic(
        np.concatenate([speech_clip(1), np.zeros(16000, np.float32)])
    )  # "he was not an ill disposed young man"
    h.run_until(lambda: h.finished("t2") and any(m.final for m in h.of(Transcript) if m.speaker == "user"))
    [started] = [(wall, m) for wall, m in h.out if isinstance(m, UserSpeech) and m.started]
    sent_after = [
        m for wall, m in h.out if isinstance(m, AudioOut) and m.pcm is not None and wall > started[0]
    ]
    assert sent_after == []  # not one audio chunk once the VAD heard the user
    flushes = [m for m in h.of(AudioOut) if m.flush]
    assert flushes and flushes[-1].final
    [interrupt] = h.of(Interrupt)
    assert interrupt.turn == "t2" and interrupt.reason == "barge-in"
    [spoken] = [m for m in h.of(Transcript) if m.speaker == "assistant"]
    assert ANSWER.startswith(spoken.text) and 2 <= len(spoken.text.split()) < len(ANSWER.split())
    heard_s = len(h.audio_of("t2")) / 16000
    assert spoken.ts - spoken.t0 <= heard_s + 0.01
    [user] = [m for m in h.of(Transcript) if m.speaker == "user" and m.final]
    assert word_error_rate(librivox_clips()[1][1], user.text) <= 0.3, user.text
    assert h.counters["false_interruptions"] == 0


def test_a_short_noise_pauses_then_resumes_the_answer(
    recognizer: Recognizer, voice: Voice, make_harness
) -> None:
    h = make_harness()
    start_speaking(h, "t3")
    cough = speech_clip(1)[int(0.45 * 16000) : int(0.6 * 16000)]  # 150 ms of voice: no word
    h.mic(np.concatenate([cough, np.zeros(16000, np.float32)]))
    h.run_until(lambda: h.finished("t3"), timeout_s=30)
    assert h.counters["barge_in_pauses"] == 1 and h.counters["false_interruptions"] == 1
    assert not h.of(Interrupt) and not h.of(Ask)
    [spoken] = [m for m in h.of(Transcript) if m.speaker == "assistant"]
    assert spoken.text == ANSWER
    final = [m for m in h.of(AudioOut) if m.final]
    assert len(final) == 1 and not final[0].flush


def test_the_assistants_own_voice_in_the_microphone_does_not_interrupt(
    recognizer: Recognizer, voice: Voice, make_harness
) -> None:
    h = make_harness()
    h.send(Ask(turn="t4", question="What did you see?", audio_rate=16000))
    h.stream_answer("t4", ANSWER, delay_s=0.02)
    sent = 0

    def echo_back() -> None:  # whatever the stage sends comes back into the microphone
        nonlocal sent
        audio = h.audio_of("t4")
        h.echo.append(audio[sent:])
        sent = len(audio)
        h.mic(np.zeros(int(STEP_S * MIC_RATE), np.float32))

    wait_until(lambda: h.finished("t4"), 40, "the answer to finish", every=echo_back, interval=0)
    assert h.counters["echo_ignored"] >= 1
    assert not h.of(Interrupt) and not h.of(Ask)
    [spoken] = [m for m in h.of(Transcript) if m.speaker == "assistant"]
    assert spoken.text == ANSWER


@pytest.mark.parametrize(
    ("heard", "echo"),
    [
        ("the animal on the screen is a", True),  # the assistant's own words, in order
        ("he was not an ill dispose young man", True),  # with an ASR slip
        ("butterfly", True),
        ("What animal is on the screen?", False),  # the user asks about the same thing
        ("stop, what about the budget?", False),
    ],
)
def test_echo_is_the_assistants_words_in_its_order(heard: str, echo: bool) -> None:
    from omnistream.speech.duplex import is_echo

    spoken = "The animal on the screen is a butterfly. He was not an ill-disposed young man."
    assert is_echo(heard, spoken) is echo
