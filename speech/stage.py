"""Speech process: owns the user's audio channel in both directions.

Listening: ``AudioChunk`` -> VAD -> ASR -> ``Transcript`` (scene or user) and ``UserSpeech``;
a final user utterance becomes an ``Ask``. Speaking: ``AnswerDelta`` phrases -> TTS ->
``AudioOut``; the spoken text is recorded as an assistant ``Transcript``. User speech while the
assistant is speaking sends ``Interrupt`` and flushes the audio.
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from omnistream.protocol.config import SpeechConfig
from omnistream.protocol.messages import (
    AnswerDelta,
    AnswerDone,
    Ask,
    AudioChunk,
    AudioOut,
    Interrupt,
    Message,
    Transcript,
    UserSpeech,
)
from omnistream.protocol.runtime import Runtime
from omnistream.speech.listen import Listener, ListenEvent, Recognizer, VoiceActivity
from omnistream.speech.speak import PhraseSplitter, Voice

log = logging.getLogger("omnistream.speech")


@dataclass
class SpokenTurn:
    ask: Ask
    splitter: PhraseSplitter = field(default_factory=PhraseSplitter)
    seq: int = 0
    spoken: list[str] = field(default_factory=list)
    audio_end_wall: float = 0.0  # when the client finishes playing what was sent (estimate)


class SpeechStage:
    name = "speech"

    def __init__(self, config: SpeechConfig, recognizer: Recognizer, voice: Voice | None, publish, counters):
        self.config = config
        self.recognizer = recognizer
        self.voice = voice
        self.publish = publish
        self.counters = counters
        self.listeners: dict[tuple[str, str], Listener] = {}
        self.turns: dict[str, SpokenTurn] = {}

    def handle(self, message: Message) -> None:
        if isinstance(message, AudioChunk):
            self.on_audio(message)
        elif isinstance(message, Ask):
            if message.speak and self.voice is not None:
                self.turns[message.turn] = SpokenTurn(ask=message)
        elif isinstance(message, AnswerDelta):
            turn = self.turns.get(message.turn)
            if turn is not None:
                for phrase in turn.splitter.push(message.text):
                    self._say(turn, phrase)
        elif isinstance(message, AnswerDone):
            turn = self.turns.pop(message.turn, None)
            if turn is not None:
                for phrase in turn.splitter.finish():
                    self._say(turn, phrase)
                self._end_turn(turn, final=True)
        elif isinstance(message, Interrupt):
            for turn_id in [t for t in self.turns if message.turn in ("", t)]:
                self._end_turn(self.turns.pop(turn_id), final=False)

    # -- listening ---------------------------------------------------------------------------

    def _listener(self, session: str, channel: str) -> Listener:
        key = (session, channel)
        if key not in self.listeners:
            self.listeners[key] = Listener(
                vad=VoiceActivity(),
                recognizer=self.recognizer,
                threshold=self.config.vad_threshold,
                min_silence_s=self.config.min_silence_s,
                min_speech_s=self.config.min_speech_s,
                max_utterance_s=self.config.max_utterance_s,
                partial_every_s=self.config.partial_every_s if channel == "user" else 0.0,
            )
        return self.listeners[key]

    def on_audio(self, chunk: AudioChunk) -> None:
        self.counters["audio_chunks"] += 1
        listener = self._listener(chunk.session, chunk.channel)
        for event in listener.push(chunk.pcm, chunk.sample_rate, chunk.ts):
            self._on_listen_event(chunk.session, chunk.channel, event)

    def _on_listen_event(self, session: str, channel: str, event: ListenEvent) -> None:
        speaker = "user" if channel == "user" else "scene"
        if event.kind == "started":
            if channel == "user":
                self.publish(UserSpeech(ts=event.t0, session=session, started=True))
                speaking = [t for t in self.turns.values() if t.ask.session == session]
                for turn in speaking:
                    self.publish(
                        Interrupt(ts=event.t0, session=session, turn=turn.ask.turn, reason="barge-in")
                    )
            return
        if event.kind == "partial":
            self.publish(
                Transcript(
                    ts=event.t1, t0=event.t0, session=session, text=event.text, final=False, speaker=speaker
                )
            )
            return
        if channel == "user":
            self.publish(UserSpeech(ts=event.t1, session=session, started=False))
        if not event.text:
            self.counters["utterances_empty"] += 1
            return
        self.counters["utterances"] += 1
        self.publish(
            Transcript(
                ts=event.t1, t0=event.t0, session=session, text=event.text, final=True, speaker=speaker
            )
        )
        if channel == "user" and self.config.ask_on_user_speech:
            self.publish(Ask(ts=event.t1, session=session, turn=uuid.uuid4().hex, question=event.text))

    # -- speaking -------------------------------------------------------------------------------

    def _say(self, turn: SpokenTurn, phrase: str) -> None:
        assert self.voice is not None
        audio = self.voice.synthesize(phrase)
        now = time.monotonic()
        turn.audio_end_wall = max(turn.audio_end_wall, now) + len(audio) / self.voice.sample_rate
        self.publish(
            AudioOut(
                ts=turn.ask.ts,
                session=turn.ask.session,
                turn=turn.ask.turn,
                pcm=audio,
                sample_rate=self.voice.sample_rate,
                seq=turn.seq,
            )
        )
        turn.seq += 1
        turn.spoken.append(phrase)
        self.counters["phrases_spoken"] += 1

    def _end_turn(self, turn: SpokenTurn, final: bool) -> None:
        ask = turn.ask
        self.publish(
            AudioOut(
                ts=ask.ts, session=ask.session, turn=ask.turn, seq=turn.seq, flush=not final, final=final
            )
        )
        if turn.spoken:
            self.publish(
                Transcript(
                    ts=ask.ts,
                    t0=ask.ts,
                    session=ask.session,
                    text=" ".join(turn.spoken),
                    speaker="assistant",
                    turn=ask.turn,
                )
            )

    def stop(self) -> None:
        for (session, channel), listener in self.listeners.items():
            for event in listener.flush():
                self._on_listen_event(session, channel, event)


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
    runtime.run(stage)


if __name__ == "__main__":
    main()
