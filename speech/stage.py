"""Speech process: owns the user's audio channel in both directions (full duplex).

Listening: ``AudioChunk`` -> 16 kHz -> VAD (on the loop's thread, every 32 ms window) -> ASR (a
worker thread) -> partial and final ``Transcript``s and ``UserSpeech`` events. A final user
utterance, once ``turn_grace_s`` passes with no more speech, becomes an ``Ask`` (always, or only
after ``wake_phrase``). Speaking: ``AnswerDelta`` phrases -> TTS (another worker) -> ``AudioOut``
chunks paced to real time at the rate the ``Ask`` asked for; what was heard is recorded as an
assistant ``Transcript``.

Barge-in, in two steps (LiveKit's false-interruption handling): the moment the VAD hears the
user, the assistant's audio stops and the client is told to drop what it queued; as soon as ASR
finds words that are not the assistant's own voice, ``Interrupt`` stops reasoning and the answer
ends, remembered as far as it was heard. No words (a cough) or an echo of the answer resumes it.
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from omnistream.protocol.config import SpeechConfig
from omnistream.protocol.messages import (
    AnswerDelta,
    AnswerDone,
    Ask,
    AudioChunk,
    AudioOut,
    Error,
    Interrupt,
    Message,
    Transcript,
    UserSpeech,
)
from omnistream.protocol.runtime import Runtime
from omnistream.speech.duplex import (
    PendingQuestion,
    Playout,
    SpokenTurn,
    Utterance,
    after_wake_phrase,
    is_echo,
)
from omnistream.speech.listen import (
    Listener,
    ListenEvent,
    Recognizer,
    StreamingTranscriber,
    VoiceActivity,
    words,
)
from omnistream.speech.speak import Voice
from omnistream.speech.workers import Worker

log = logging.getLogger("omnistream.speech")

ECHO_TAIL_S = 2.0  # the room may still carry the answer's last words after it ends
ECHO_MIN_WORDS = 3  # with echo about, a partial barges in only with this many unmatched words
USER_FINAL, USER_PARTIAL, SCENE = 0, 1, 2  # ASR priorities


class SpeechStage:
    name = "speech"

    def __init__(
        self,
        config: SpeechConfig,
        recognizer: Recognizer,
        voice: Voice | None,
        publish: Callable[[Message], None],
        counters: dict[str, float],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.recognizer = recognizer
        self.voice = voice
        self.publish = publish
        self.counters = counters
        self.clock = clock
        self.asr = Worker("speech-asr")
        self.tts = Worker("speech-tts") if voice is not None else None
        self.listeners: dict[tuple[str, str], Listener] = {}
        self.turns: dict[str, SpokenTurn] = {}
        self.utterances: dict[tuple[str, int], Utterance] = {}
        self.pending: dict[str, PendingQuestion] = {}
        self.user_rate: dict[str, int] = {}
        self.stream_ts: dict[str, float] = {}
        self.echo_tail: dict[str, tuple[str, float]] = {}

    def handle(self, message: Message) -> None:
        if isinstance(message, AudioChunk):
            self.on_audio(message)
        elif isinstance(message, Ask):
            self.on_ask(message)
        elif isinstance(message, AnswerDelta):
            turn = self.turns.get(message.turn)
            if turn is not None:
                turn.text += message.text
                for phrase in turn.splitter.push(message.text):
                    self._synthesize(turn, phrase)
        elif isinstance(message, AnswerDone):
            turn = self.turns.get(message.turn)
            if turn is not None:
                for phrase in turn.splitter.finish():
                    self._synthesize(turn, phrase)
                turn.answer_done = True
        elif isinstance(message, Interrupt):
            for turn in list(self.turns.values()):
                if turn.ask.session == message.session and message.turn in ("", turn.ask.turn):
                    self._end_turn(turn, cut=True)

    def tick(self) -> None:
        """Collect worker results, send due audio, ask pending questions. Called every loop pass."""
        now = self.clock()
        for tag, result, error in self.asr.results():
            self._on_asr(tag, result, error)
        if self.tts is not None:
            for (turn_id, phrase), audio, error in self.tts.results():
                turn = self.turns.get(turn_id)
                if turn is None:
                    continue
                turn.synthesized += 1
                if error is not None:
                    self.publish(
                        Error(code="tts_failed", message=f"speech: {error}", session=turn.ask.session)
                    )
                else:
                    turn.playout.add(phrase, audio)
        for turn in list(self.turns.values()):
            self._send_audio(turn, now)
        for session, pending in list(self.pending.items()):
            if now >= pending.deadline and not self._user_busy(session):
                del self.pending[session]
                self.publish(
                    Ask(
                        ts=pending.t1,
                        session=session,
                        turn=uuid.uuid4().hex,
                        question=pending.text,
                        audio_rate=self.user_rate.get(session, 0),
                    )
                )
                self.counters["asks"] += 1

    # -- listening ---------------------------------------------------------------------------

    def _listener(self, session: str, channel: str) -> Listener:
        key = (session, channel)
        if key not in self.listeners:
            user = channel == "user"
            self.listeners[key] = Listener(
                vad=VoiceActivity(),
                threshold=self.config.vad_threshold,
                min_silence_s=self.config.min_silence_s,
                min_speech_s=self.config.min_speech_s,
                max_utterance_s=self.config.max_utterance_s,
                first_partial_s=self.config.first_partial_s if user else 0.0,
                partial_every_s=self.config.partial_every_s,
            )
        return self.listeners[key]

    def on_audio(self, chunk: AudioChunk) -> None:
        self.counters["audio_chunks"] += 1
        listener = self._listener(chunk.session, chunk.channel)
        if chunk.channel == "user":
            self.user_rate[chunk.session] = chunk.sample_rate
        events = listener.push(chunk.pcm, chunk.sample_rate, chunk.ts)
        self.stream_ts[chunk.session] = max(self.stream_ts.get(chunk.session, 0.0), listener.stream_ts)
        for event in events:
            if chunk.channel == "user":
                self._on_user_event(chunk.session, event)
            elif event.kind == "ended" and event.audio is not None:
                audio = event.audio
                self.asr.submit(
                    ("scene", chunk.session, event.t0, event.t1),
                    lambda a=audio: self.recognizer.transcribe(a),
                    SCENE,
                )

    def _on_user_event(self, session: str, event: ListenEvent) -> None:
        key = (session, event.utterance)
        if event.kind == "started":
            self.publish(UserSpeech(ts=event.t0, session=session, started=True))
            self.utterances[key] = Utterance(event.t0, StreamingTranscriber(self.recognizer))
            now = self.clock()
            for turn in self.turns.values():
                if turn.ask.session == session and turn.heard_by is None:
                    self._hear(turn, key, now)
            return
        utterance = self.utterances.get(key)
        if utterance is None:
            return
        if event.kind == "partial":
            audio, transcriber = event.audio, utterance.transcriber

            def partial() -> tuple[str, str]:
                transcriber.insert_audio(audio[len(transcriber.audio) :])
                return transcriber.process_iter()

            self.asr.submit(("partial", key, event.t1), partial, USER_PARTIAL, skip=lambda: utterance.ended)
            return
        assert event.audio is not None or event.kind == "ended"
        samples = -1 if event.audio is None else len(event.audio)
        if event.kind == "pause":  # transcribe now what the final will be if the user is done
            utterance.early_samples, utterance.early_text = samples, None
            self._submit_final(key, event.audio, skip=lambda: utterance.early_samples != samples)
            return
        utterance.ended, utterance.end_ts, utterance.final_samples = True, event.t1, samples
        self.publish(UserSpeech(ts=event.t1, session=session, started=False))
        if event.audio is None:
            self._on_user_final(key, event.t1, "")
        elif samples != utterance.early_samples:
            self._submit_final(key, event.audio)
        elif utterance.early_text is not None:
            self._on_user_final(key, event.t1, utterance.early_text)
        # else: the speculative pass is running on exactly this audio; its result is the final

    def _submit_final(self, key: tuple[str, int], audio, skip=lambda: False) -> None:
        self.asr.submit(
            ("final", key, len(audio)), lambda: self.recognizer.transcribe(audio), USER_FINAL, skip
        )

    def _on_asr(self, tag: tuple, result, error: BaseException | None) -> None:
        kind = tag[0]
        if error is not None:
            self.publish(Error(code="asr_failed", message=f"speech: {type(error).__name__}: {error}"))
            result = ("", "") if kind == "partial" else ""
        if kind == "scene":
            _, session, t0, t1 = tag
            if result:
                self.counters["utterances_scene"] += 1
                self.publish(Transcript(ts=t1, t0=t0, session=session, text=result, speaker="scene"))
        elif kind == "partial":
            self._on_user_partial(tag[1], tag[2], " ".join(part for part in result if part))
        else:
            _, key, samples = tag
            utterance = self.utterances.get(key)
            if utterance is None:
                return
            if utterance.ended:
                if samples == utterance.final_samples and utterance.end_ts is not None:
                    self._on_user_final(key, utterance.end_ts, result)
            elif samples == utterance.early_samples:
                utterance.early_text = result

    def _on_user_partial(self, key: tuple[str, int], t1: float, text: str) -> None:
        utterance = self.utterances.get(key)
        if utterance is None or utterance.echo or not text:
            return
        if self._is_echo(key[0], text):
            if len(words(text)) >= 2:  # one common word ("he") is not evidence either way
                self._on_echo(key, utterance)
            return
        echoing = any(t.heard_by == key and t.echo_heard for t in self.turns.values())
        if echoing and len(words(text)) < ECHO_MIN_WORDS:
            return  # a word or two misheard from our own voice ("Simon" for "monarch"): wait
        self.publish(
            Transcript(ts=t1, t0=utterance.t0, session=key[0], text=text, final=False, speaker="user")
        )
        self._barge_in(key)

    def _on_user_final(self, key: tuple[str, int], t1: float, text: str) -> None:
        session = key[0]
        utterance = self.utterances.pop(key, None)
        if utterance is None:
            return
        if not text:
            self.counters["utterances_empty"] += 1
            self._resume(key)
            return
        if utterance.echo or self._is_echo(session, text):
            self._on_echo(key, utterance)
            return
        self.counters["utterances"] += 1
        self.publish(Transcript(ts=t1, t0=utterance.t0, session=session, text=text, speaker="user"))
        self._barge_in(key)
        if not self.config.ask_on_user_speech:
            return
        pending = self.pending.get(session)
        deadline = self.clock() + self.config.turn_grace_s
        if pending is not None:  # the user went on within the grace period: one question
            pending.text, pending.t1, pending.deadline = f"{pending.text} {text}", t1, deadline
            return
        question = after_wake_phrase(text, self.config.wake_phrase) if self.config.wake_phrase else text
        if question:
            self.pending[session] = PendingQuestion(question, utterance.t0, t1, deadline)

    def _user_busy(self, session: str) -> bool:
        listener = self.listeners.get((session, "user"))
        return (listener is not None and listener.in_speech) or any(k[0] == session for k in self.utterances)

    def _is_echo(self, session: str, heard: str) -> bool:
        spoken = [
            turn.text for turn in self.turns.values() if turn.ask.session == session and turn.t0 is not None
        ]
        tail, until = self.echo_tail.get(session, ("", 0.0))
        if self.clock() < until:
            spoken.append(tail)
        return bool(spoken) and is_echo(heard, " ".join(spoken), self.config.echo_overlap)

    # -- barge-in ------------------------------------------------------------------------------

    def _hear(self, turn: SpokenTurn, key: tuple[str, int], now: float) -> None:
        """The user may be barging in: go quiet at once, unless this answer's own voice has been
        heard in the microphone (then pausing at every echo would stutter: words decide)."""
        turn.heard_by = key
        if turn.echo_heard:
            return
        turn.playout.pause(now)
        if turn.seq:
            self.publish(self._audio_out(turn, flush=True))
        self.counters["barge_in_pauses"] += 1

    def _resume(self, key: tuple[str, int]) -> None:
        """A false interruption (no words, or our own voice): the answer goes on where it was cut."""
        now = self.clock()
        for turn in self.turns.values():
            if turn.heard_by == key:
                turn.heard_by = None
                if turn.playout.paused:
                    turn.playout.resume(now)
                    self.counters["false_interruptions"] += 1

    def _on_echo(self, key: tuple[str, int], utterance: Utterance) -> None:
        utterance.echo = True
        self.counters["echo_ignored"] += 1
        for turn in self.turns.values():
            if turn.heard_by == key:
                turn.echo_heard = True
        self._resume(key)

    def _barge_in(self, key: tuple[str, int]) -> None:
        for turn in [t for t in self.turns.values() if t.heard_by == key]:
            self.publish(
                Interrupt(
                    ts=self.stream_ts.get(key[0], 0.0), session=key[0], turn=turn.ask.turn, reason="barge-in"
                )
            )
            self.counters["barge_ins"] += 1
            self._end_turn(turn, cut=True)

    # -- speaking -------------------------------------------------------------------------------

    def on_ask(self, ask: Ask) -> None:
        for turn in [t for t in self.turns.values() if t.ask.session == ask.session]:
            self.publish(Interrupt(ts=ask.ts, session=ask.session, turn=turn.ask.turn, reason="new question"))
            self._end_turn(turn, cut=True)
        if not ask.speak or self.voice is None:
            return
        rate = ask.audio_rate or self.voice.sample_rate
        playout = Playout(rate, self.config.output_chunk_s, self.config.output_lead_s)
        self.turns[ask.turn] = SpokenTurn(ask=ask, playout=playout)

    def _synthesize(self, turn: SpokenTurn, phrase: str) -> None:
        assert self.tts is not None and self.voice is not None
        voice, rate = self.voice, turn.playout.rate
        turn.submitted += 1
        self.tts.submit(
            (turn.ask.turn, phrase), lambda: voice.synthesize(phrase, rate), skip=lambda: turn.cancelled
        )

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
        for chunk in turn.playout.take(now):
            if turn.t0 is None:
                turn.t0 = self.stream_ts.get(turn.ask.session, turn.ask.ts)
            self.publish(self._audio_out(turn, chunk))
            self.counters["audio_out_chunks"] += 1
        finished = turn.answer_done and turn.synthesized == turn.submitted and turn.playout.all_sent
        if finished and not turn.playout.paused:
            self._end_turn(turn, cut=False)

    def _end_turn(self, turn: SpokenTurn, cut: bool) -> None:
        """Final ``AudioOut`` (with ``flush`` when cut) and the assistant transcript of what was heard."""
        self.turns.pop(turn.ask.turn, None)
        turn.cancelled = True
        now = self.clock()
        heard = turn.playout.played(now) if cut else len(turn.playout.buffer)
        self.publish(self._audio_out(turn, flush=cut, final=True))
        text = turn.playout.spoken_text(heard)
        if not text:
            return
        t0 = turn.t0 if turn.t0 is not None else turn.ask.ts
        self.publish(
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

    def stop(self) -> None:
        for (session, channel), listener in self.listeners.items():
            for event in listener.flush():
                if channel == "user":
                    self._on_user_event(session, event)
        self.asr.stop()
        if self.tts is not None:
            self.tts.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnistream-speech")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    runtime = Runtime("speech", args.run_dir)
    config = runtime.config.speech
    recognizer = Recognizer(config.asr_model, threads=config.threads)
    voice = Voice(config.tts_voice, threads=config.threads) if config.tts_enabled else None
    stage = SpeechStage(config, recognizer, voice, runtime.publish, runtime.counters)
    runtime.subscribe(AudioChunk, Ask, AnswerDelta, AnswerDone, Interrupt)
    # A short poll keeps the paced audio on time (40 ms chunks) and barge-in within one pass.
    runtime.run(stage, tick=stage.tick, poll_s=0.01)


if __name__ == "__main__":
    main()
