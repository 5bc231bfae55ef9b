"""The speaking side of the speech stage: answers in, paced ``AudioOut`` out, stoppable at once.

``Speaker`` owns one ``SpokenTurn`` per answer being spoken: ``AnswerDelta`` text is cut into
phrases, each phrase is synthesised on the TTS worker as soon as it ends, and the audio is sent
in small chunks paced to real time (``Playout``). Barge-in acts here: ``hear`` pauses every
answer of a session the moment the VAD hears the user, ``resume`` lets a false interruption
go on, ``cut`` ends the answers a user utterance interrupted. An ended answer is emitted as an
assistant ``Transcript`` of what the client actually played.

Each turn carries latency marks (monotonic seconds; see ``turns.Timeline``): the first
``AnswerDelta``, the first phrase handed to TTS, its audio back, and the first ``AudioOut``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from omnistream.protocol.config import SpeechConfig
from omnistream.protocol.messages import (
    AnswerDelta,
    AnswerDone,
    Ask,
    AudioOut,
    Error,
    Interrupt,
    Message,
    Transcript,
)
from omnistream.speech.duplex import Playout, SpokenTurn, is_echo
from omnistream.speech.speak import PhraseSplitter, Voice
from omnistream.speech.turns import Timeline
from omnistream.speech.workers import Worker

log = logging.getLogger("omnistream.speech")

ECHO_TAIL_S = 2.0  # the room may still carry the answer's last words after it ends

Key = tuple[str, int]  # (session, user utterance number)


class Speaker:
    def __init__(
        self,
        config: SpeechConfig,
        voice: Voice | None,
        emit: Callable[[Message], object],
        counters: dict[str, float],
        clock: Callable[[], float] = time.monotonic,
        on_timeline: Callable[[Timeline], None] = lambda timeline: None,
    ):
        self.config = config
        self.voice = voice
        self.emit = emit
        self.counters = counters
        self.clock = clock
        self.on_timeline = on_timeline
        self.tts = Worker("speech-tts") if voice is not None else None
        self.turns: dict[str, SpokenTurn] = {}
        self.echo_tail: dict[str, tuple[str, float]] = {}
        self.stream_ts: dict[str, float] = {}  # the latest microphone stream time per session

    # -- answers in ----------------------------------------------------------------------------

    def start(self, ask: Ask, timeline: Timeline | None = None) -> None:
        """A new question: the session's answers still speaking are interrupted. A tentative one
        (preemptive generation) is synthesised but held, and interrupts nothing, until ``confirm``."""
        if not ask.tentative:
            self._interrupt_others(ask)
        if not ask.speak or self.voice is None:
            return
        rate = ask.audio_rate or self.voice.sample_rate
        playout = Playout(rate, self.config.output_chunk_s, self.config.output_lead_s)
        splitter = PhraseSplitter(first_words=self.config.first_phrase_words)
        turn = SpokenTurn(ask=ask, playout=playout, splitter=splitter, held=ask.tentative)
        turn.timeline = timeline or Timeline(ask.turn)
        turn.timeline.mark("ask_received", self.clock())
        self.turns[ask.turn] = turn

    def _interrupt_others(self, ask: Ask) -> None:
        for turn in [
            t for t in self.turns.values() if t.ask.session == ask.session and t.ask.turn != ask.turn
        ]:
            self.emit(Interrupt(ts=ask.ts, session=ask.session, turn=turn.ask.turn, reason="new question"))
            self.end(turn, cut=True)

    def confirm(self, ask: Ask) -> bool:
        """The tentative answer of ``ask``'s turn is confirmed: its audio may go out. False when
        no such answer is held (then ``ask`` is a question like any other)."""
        turn = self.turns.get(ask.turn)
        if turn is None or not turn.held:
            return False
        self._interrupt_others(ask)
        turn.ask, turn.held = ask, False
        return True

    def discard(self, turn_id: str) -> None:
        """Drop a tentative answer: nothing of it was sent."""
        turn = self.turns.get(turn_id)
        if turn is not None and turn.held:
            self.end(turn, cut=True)

    def delta(self, message: AnswerDelta) -> None:
        turn = self.turns.get(message.turn)
        if turn is None:
            return
        if message.tentative:
            turn.tentative_pieces = max(turn.tentative_pieces, message.seq + 1)
        elif message.seq < turn.tentative_pieces:
            return  # a piece received tentatively, sent again for the clients at confirmation
        turn.timeline.mark("first_delta", self.clock())
        turn.text += message.text
        for phrase in turn.splitter.push(message.text):
            self._synthesize(turn, phrase)

    def done(self, message: AnswerDone) -> None:
        turn = self.turns.get(message.turn)
        if turn is not None and not turn.answer_done:
            for phrase in turn.splitter.finish():
                self._synthesize(turn, phrase)
            turn.answer_done = True

    def interrupt(self, message: Interrupt) -> None:
        for turn in list(self.turns.values()):
            if turn.ask.session == message.session and message.turn in ("", turn.ask.turn):
                self.end(turn, cut=True)

    def _synthesize(self, turn: SpokenTurn, phrase: str) -> None:
        assert self.tts is not None and self.voice is not None
        voice, rate = self.voice, turn.playout.rate
        turn.timeline.mark("first_phrase", self.clock())
        turn.submitted += 1
        self.tts.submit(
            (turn.ask.turn, phrase), lambda: voice.synthesize(phrase, rate), skip=lambda: turn.cancelled
        )

    # -- audio out -----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Collect synthesised phrases and send the audio that is due."""
        if self.tts is not None:
            for (turn_id, phrase), audio, error in self.tts.results():
                turn = self.turns.get(turn_id)
                if turn is None:
                    continue
                turn.synthesized += 1
                turn.timeline.mark("first_tts", now)
                if error is not None:
                    self.emit(Error(code="tts_failed", message=f"speech: {error}", session=turn.ask.session))
                else:
                    turn.playout.add(phrase, audio)
        for turn in list(self.turns.values()):
            self._send_audio(turn, now)

    def _audio_out(
        self, turn: SpokenTurn, pcm: np.ndarray | None = None, flush=False, final=False
    ) -> AudioOut:
        message = AudioOut(
            ts=turn.ask.ts,
            session=turn.ask.session,
            turn=turn.ask.turn,
            pcm=pcm,
            sample_rate=turn.playout.rate,
            seq=turn.seq,
            flush=flush,
            final=final,
        )
        turn.seq += 1
        return message

    def _send_audio(self, turn: SpokenTurn, now: float) -> None:
        if turn.held:
            return
        for chunk in turn.playout.take(now):
            if turn.t0 is None:
                turn.t0 = self.stream_ts.get(turn.ask.session, turn.ask.ts)
            self.emit(self._audio_out(turn, chunk))
            self.counters["audio_out_chunks"] += 1
            if "first_audio" not in turn.timeline.marks:
                turn.timeline.mark("first_audio", self.clock())
                self.on_timeline(turn.timeline)
        finished = turn.answer_done and turn.synthesized == turn.submitted and turn.playout.all_sent
        if finished and not turn.playout.paused:
            self.end(turn, cut=False)

    def end(self, turn: SpokenTurn, cut: bool) -> None:
        """Final ``AudioOut`` (with ``flush`` when cut) and the assistant transcript of what was heard."""
        self.turns.pop(turn.ask.turn, None)
        turn.cancelled = True
        if turn.held:  # a tentative answer: clients never heard of it
            return
        now = self.clock()
        heard = turn.playout.played(now) if cut else len(turn.playout.buffer)
        self.emit(self._audio_out(turn, flush=cut, final=True))
        text = turn.playout.spoken_text(heard)
        if not text:
            return
        t0 = turn.t0 if turn.t0 is not None else turn.ask.ts
        self.emit(
            Transcript(
                ts=t0 + heard / turn.playout.rate,
                t0=t0,
                session=turn.ask.session,
                text=text,
                speaker="assistant",
                turn=turn.ask.turn,
            )
        )
        self.echo_tail[turn.ask.session] = (turn.text, now + ECHO_TAIL_S)
        self.counters["answers_cut" if cut else "answers_spoken"] += 1

    # -- barge-in ------------------------------------------------------------------------------

    def is_echo(self, session: str, heard: str) -> bool:
        """``heard`` is mostly words this session's assistant is saying or just said."""
        spoken = [t.text for t in self.turns.values() if t.ask.session == session and t.t0 is not None]
        tail, until = self.echo_tail.get(session, ("", 0.0))
        if self.clock() < until:
            spoken.append(tail)
        return bool(spoken) and is_echo(heard, " ".join(spoken), self.config.echo_overlap)

    def hear(self, key: Key) -> None:
        """The user may be barging in: go quiet at once, unless an answer's own voice has been
        heard in the microphone (then pausing at every echo would stutter: words decide)."""
        now = self.clock()
        for turn in self.turns.values():
            if turn.ask.session != key[0] or turn.heard_by is not None or turn.held:
                continue
            turn.heard_by = key
            if turn.echo_heard:
                continue
            turn.playout.pause(now)
            if turn.seq:
                self.emit(self._audio_out(turn, flush=True))
            self.counters["barge_in_pauses"] += 1

    def echoing(self, key: Key) -> bool:
        return any(t.heard_by == key and t.echo_heard for t in self.turns.values())

    def resume(self, key: Key, echo: bool = False) -> None:
        """A false interruption (no words, or our own voice when ``echo``): the answers go on
        where they were cut."""
        now = self.clock()
        for turn in self.turns.values():
            if turn.heard_by == key:
                turn.heard_by = None
                turn.echo_heard = turn.echo_heard or echo
                if turn.playout.paused:
                    turn.playout.resume(now)
                    self.counters["false_interruptions"] += 1

    def cut(self, key: Key) -> None:
        """The user utterance ``key`` has words: interrupt the answers it was talking over."""
        for turn in [t for t in self.turns.values() if t.heard_by == key]:
            ts = self.stream_ts.get(key[0], 0.0)
            self.emit(Interrupt(ts=ts, session=key[0], turn=turn.ask.turn, reason="barge-in"))
            self.counters["barge_ins"] += 1
            self.end(turn, cut=True)

    def stop(self) -> None:
        if self.tts is not None:
            self.tts.stop()
