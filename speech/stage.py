"""Speech process: owns the user's audio channel in both directions (full duplex).

Listening: ``AudioChunk`` -> 16 kHz -> VAD (on the loop's thread, every 32 ms window) -> ASR (a
worker thread) -> partial and final ``Transcript``s and ``UserSpeech`` events. At a pause in the
user's speech the utterance is transcribed at once; if that transcript reads as a finished turn
and the silence reaches ``turn_end_s``, the turn is over and the ``Ask`` goes out. Otherwise
the utterance ends after ``min_silence_s`` and is asked ``turn_grace_s`` later (always, or only
after ``wake_phrase``). The user going on right after an ``Ask`` extends that question. While
the user speaks, each partial transcript (and the one at a pause, when the turn waits longer)
goes to reasoning as a ``Draft`` of the question (``read_ahead``), so the LLM has read most of
it when the turn ends.
Speaking (``speaking.Speaker``): ``AnswerDelta`` phrases -> TTS -> ``AudioOut`` chunks paced to
real time at the rate the ``Ask`` asked for; what was heard is recorded as an assistant
``Transcript``.

Barge-in, in two steps (LiveKit's false-interruption handling): the moment the VAD hears the
user, the assistant's audio stops and the client is told to drop what it queued; as soon as ASR
finds words that are not the assistant's own voice, ``Interrupt`` stops reasoning and the answer
ends, remembered as far as it was heard. No words (a cough) or an echo of the answer resumes it.

Every spoken answer to a user's question leaves a ``turns.Timeline`` of latency marks, logged and
kept in ``timelines`` (``omnistream bench speech`` reports them).
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path

from omnistream.protocol.config import SpeechConfig
from omnistream.protocol.messages import (
    AnswerDelta,
    AnswerDone,
    Ask,
    AudioChunk,
    Draft,
    Error,
    Interrupt,
    Message,
    Transcript,
    UserSpeech,
)
from omnistream.protocol.routes import subscriptions
from omnistream.protocol.runtime import Runtime
from omnistream.speech.duplex import PendingQuestion, Utterance, after_wake_phrase
from omnistream.speech.listen import (
    Listener,
    ListenEvent,
    Recognizer,
    StreamingTranscriber,
    VoiceActivity,
    words,
)
from omnistream.speech.speak import Voice
from omnistream.speech.speaking import Speaker
from omnistream.speech.turns import Timeline, reads_finished
from omnistream.speech.workers import Worker

log = logging.getLogger("omnistream.speech")

ECHO_MIN_WORDS = 3  # with echo about, a partial barges in only with this many unmatched words
USER_PARTIAL, SCENE = 1, 2  # ASR priorities on the shared worker
UNHEARD_S = 0.5  # an answer played for less than this has not been heard: the user may go on


def timed(run: Callable[[], str]) -> tuple[str, float]:
    start = time.perf_counter()
    return run(), time.perf_counter() - start


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
        self.publish = publish
        self.counters = counters
        self.clock = clock
        self.asr = Worker("speech-asr")  # partials and the scene's sound track
        # A user's final transcript is what the answer waits for: its own thread, so it never
        # queues behind a partial already running (whisper passes cannot be stopped midway).
        self.asr_final = Worker("speech-asr-final")
        self.speaker = Speaker(config, voice, publish, counters, clock, self._on_timeline)
        self.listeners: dict[tuple[str, str], Listener] = {}
        # Sessions listened to, least recently heard first; beyond ``live_sessions`` the first
        # is closed (``close_session``).
        self.live: OrderedDict[str, None] = OrderedDict()
        self.utterances: dict[tuple[str, int], Utterance] = {}
        self.pending: dict[str, PendingQuestion] = {}  # questions waiting for the end of the turn
        self.asked: dict[str, PendingQuestion] = {}  # the last question asked, per session
        self.timeline_of: dict[str, Timeline] = {}  # by turn, until its Ask comes back
        self.timelines: deque[Timeline] = deque(maxlen=256)
        self.user_rate: dict[str, int] = {}

    @property
    def turns(self):
        return self.speaker.turns

    def handle(self, message: Message) -> None:
        if isinstance(message, AudioChunk):
            self.on_audio(message)
        elif isinstance(message, Ask):
            self.speaker.start(message, self.timeline_of.pop(message.turn, None))
        elif isinstance(message, AnswerDelta):
            self.speaker.delta(message)
        elif isinstance(message, AnswerDone):
            self.speaker.done(message)
        elif isinstance(message, Interrupt):
            self.speaker.interrupt(message)

    def tick(self) -> None:
        """Collect worker results, send due audio, end turns, ask. Called every loop pass."""
        now = self.clock()
        for tag, result, error in self.asr_final.results() + self.asr.results():
            self._on_asr(tag, result, error)
        self.speaker.tick(now)
        for key, utterance in list(self.utterances.items()):
            if self._turn_over_early(key, utterance):
                for event in self.listeners[(key[0], "user")].cut():
                    self._on_user_event(key[0], event)
        now = self.clock()  # a question that became due in this pass goes out in this pass
        for session, pending in list(self.pending.items()):
            if now >= pending.deadline and not self._user_busy(session):
                del self.pending[session]
                pending.turn, pending.deadline = uuid.uuid4().hex, now
                pending.timeline.turn = pending.turn
                pending.timeline.mark("ask", now)
                self.timeline_of[pending.turn] = pending.timeline
                for stale in list(self.timeline_of)[:-32]:  # Asks that never came back
                    del self.timeline_of[stale]
                self.asked[session] = pending
                rate = self.user_rate.get(session, 0)
                self.publish(
                    Ask(
                        ts=pending.t1,
                        session=session,
                        turn=pending.turn,
                        question=pending.text,
                        audio_rate=rate,
                    )
                )
                self.counters["asks"] += 1

    def _on_timeline(self, timeline: Timeline) -> None:
        if "ask" not in timeline.marks:
            return  # a question typed by a client: no user speech to measure from
        self.timelines.append(timeline)
        spans = {name: round(seconds * 1000) for name, seconds in timeline.spans().items()}
        log.info("turn latency (ms)", extra={"turn": timeline.turn, "spans": spans})

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
        self._touch(chunk.session)
        listener = self._listener(chunk.session, chunk.channel)
        if chunk.channel == "user":
            self.user_rate[chunk.session] = chunk.sample_rate
        events = listener.push(chunk.pcm, chunk.sample_rate, chunk.ts)
        stream_ts = self.speaker.stream_ts
        stream_ts[chunk.session] = max(stream_ts.get(chunk.session, 0.0), listener.stream_ts)
        self._on_events(chunk.session, chunk.channel, events)

    def _on_events(self, session: str, channel: str, events: list[ListenEvent]) -> None:
        for event in events:
            if channel == "user":
                self._on_user_event(session, event)
            elif event.kind == "ended" and event.audio is not None:
                audio = event.audio
                self.asr.submit(
                    ("scene", session, event.t0, event.t1),
                    lambda a=audio: self.recognizer.transcribe(a),
                    SCENE,
                )

    def _touch(self, session: str) -> None:
        """``session`` is heard now; the least recently heard beyond ``live_sessions`` closes."""
        if session in self.live:
            self.live.move_to_end(session)
            return
        while len(self.live) >= max(self.config.live_sessions, 1):
            self.close_session(next(iter(self.live)))
        self.live[session] = None

    def close_session(self, session: str) -> None:
        """Stop listening to ``session``: an utterance in progress on any of its channels ends
        now (transcribed, and a user's asked, as at any end of speech) and its VAD state is
        dropped. Audio of it later starts afresh."""
        self.live.pop(session, None)
        for key in [key for key in self.listeners if key[0] == session]:
            self._on_events(session, key[1], self.listeners[key].flush())
            del self.listeners[key]
        self.counters["sessions_closed"] += 1

    def _on_user_event(self, session: str, event: ListenEvent) -> None:
        key = (session, event.utterance)
        now = self.clock()
        if event.kind == "started":
            self.publish(UserSpeech(ts=event.t0, session=session, started=True))
            utterance = Utterance(event.t0, StreamingTranscriber(self.recognizer))
            self.utterances[key] = utterance
            asked = self.asked.get(session)
            if asked is not None and now - asked.deadline <= self.config.continue_s:
                turn = self.speaker.turns.get(asked.turn)
                if turn is None or turn.playout.played(now) < UNHEARD_S * turn.playout.rate:
                    utterance.continues = asked  # the user is going on with that question
            self.speaker.hear(key)
            return
        utterance = self.utterances.get(key)
        if utterance is None:
            return
        if event.kind == "partial":
            audio, transcriber = event.audio, utterance.transcriber

            def partial() -> tuple[str, str]:
                transcriber.insert_audio(audio[len(transcriber.audio) :])
                return transcriber.process_iter()

            listener = self.listeners[(session, "user")]
            # A partial still queued when the user has paused is stale: the final comes first.
            skip = lambda: utterance.ended or listener.silence_s >= listener.pause_s  # noqa: E731
            self.asr.submit(("partial", key, event.t1), partial, USER_PARTIAL, skip=skip)
            return
        assert event.audio is not None or event.kind == "ended"
        samples = -1 if event.audio is None else len(event.audio)
        timeline = utterance.timeline
        if event.kind == "pause":  # transcribe now what the final will be if the user is done
            utterance.early_samples, utterance.early_text = samples, None
            timeline.marks["speech_end"] = now - self.listeners[(session, "user")].pause_s
            self._submit_final(key, event.audio, skip=lambda: utterance.early_samples != samples)
            return
        utterance.ended, utterance.end_ts, utterance.final_samples = True, event.t1, samples
        timeline.mark("speech_end", now)
        timeline.mark("turn_end", now)
        self.publish(UserSpeech(ts=event.t1, session=session, started=False))
        if event.audio is None:
            self._on_user_final(key, event.t1, "")
        elif samples != utterance.early_samples:
            self._submit_final(key, event.audio)
        elif utterance.early_text is not None:
            self._on_user_final(key, event.t1, utterance.early_text)
        # else: the speculative pass is running on exactly this audio; its result is the final

    def _turn_over_early(self, key: tuple[str, int], utterance: Utterance) -> bool:
        """The transcript at the pause reads as a finished turn and the silence (stream time) has
        lasted ``turn_end_s``, with no speech since."""
        if utterance.ended or not self._ends_soon(utterance.early_text or ""):
            return False
        listener = self.listeners.get((key[0], "user"))
        if listener is None or listener.utterance != key[1]:
            return False
        return listener.silence_s >= max(self.config.turn_end_s, listener.pause_s)

    def _ends_soon(self, text: str) -> bool:
        """A turn with this transcript at a pause ends after ``turn_end_s`` of silence."""
        return self._text_ends_turns() and reads_finished(text)

    def _text_ends_turns(self) -> bool:
        """``turn_end_s`` >= ``min_silence_s`` turns the transcript signal off: every utterance
        then waits ``min_silence_s`` + ``turn_grace_s`` (the behaviour before it existed)."""
        return self.config.turn_end_s < self.config.min_silence_s

    def _submit_final(self, key: tuple[str, int], audio, skip=lambda: False) -> None:
        run = lambda: timed(lambda: self.recognizer.transcribe(audio))  # noqa: E731
        self.asr_final.submit(("final", key, len(audio)), run, 0, skip)

    def _on_asr(self, tag: tuple, result, error: BaseException | None) -> None:
        kind = tag[0]
        if error is not None:
            self.publish(Error(code="asr_failed", message=f"speech: {type(error).__name__}: {error}"))
            result = {"partial": ("", ""), "final": ("", 0.0)}.get(kind, "")
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
            text, utterance.timeline.asr_s = result
            if utterance.ended:
                if samples == utterance.final_samples and utterance.end_ts is not None:
                    self._on_user_final(key, utterance.end_ts, text)
            elif samples == utterance.early_samples:
                utterance.early_text = text
                # A turn that waits longer is read ahead. (One about to end gets its Ask within
                # turn_end_s: a Draft just before it would cost reasoning one more pass.)
                listener = self.listeners.get((key[0], "user"))
                if not self._ends_soon(text) and listener is not None:
                    self._draft(key, listener.stream_ts, text)

    def _on_user_partial(self, key: tuple[str, int], t1: float, text: str) -> None:
        utterance = self.utterances.get(key)
        if utterance is None or utterance.echo or not text:
            return
        if self.speaker.is_echo(key[0], text):
            if len(words(text)) >= 2:  # one common word ("he") is not evidence either way
                self._on_echo(key, utterance)
            return
        if self.speaker.echoing(key) and len(words(text)) < ECHO_MIN_WORDS:
            return  # a word or two misheard from our own voice ("Simon" for "monarch"): wait
        self.publish(
            Transcript(ts=t1, t0=utterance.t0, session=key[0], text=text, final=False, speaker="user")
        )
        self.speaker.cut(key)
        self._draft(key, t1, text)

    def _draft(self, key: tuple[str, int], t1: float, text: str) -> None:
        """Send what the question will be if the user stops now (as ``_on_user_final`` would
        ask it) to reasoning, to be read ahead."""
        utterance = self.utterances.get(key)
        if not (self.config.read_ahead and self.config.ask_on_user_speech and text) or utterance is None:
            return
        session = key[0]
        if utterance.echo or self.speaker.is_echo(session, text):
            return
        question = self._question(session, utterance, text)
        if question and question != utterance.drafted:
            utterance.drafted = question
            self.publish(Draft(ts=t1, session=session, question=question))
            self.counters["drafts"] += 1

    def _on_user_final(self, key: tuple[str, int], t1: float, text: str) -> None:
        session = key[0]
        utterance = self.utterances.pop(key, None)
        if utterance is None:
            return
        now = self.clock()
        utterance.timeline.mark("final", now)
        if not text:
            self.counters["utterances_empty"] += 1
            self.speaker.resume(key)
            return
        if utterance.echo or self.speaker.is_echo(session, text):
            self._on_echo(key, utterance)
            return
        self.counters["utterances"] += 1
        self.publish(Transcript(ts=t1, t0=utterance.t0, session=session, text=text, speaker="user"))
        gone_on = self._gone_on(session, utterance)
        if gone_on is not None and gone_on.turn not in self.speaker.turns:  # not spoken: tell reasoning
            self.publish(Interrupt(ts=t1, session=session, turn=gone_on.turn, reason="user continued"))
        self.speaker.cut(key)
        if not self.config.ask_on_user_speech:
            return
        deadline = now if self._ends_soon(text) else now + self.config.turn_grace_s
        question = self._question(session, utterance, text)
        pending = self.pending.get(session)
        if pending is not None:  # the user went on before the question was asked: one question
            pending.text, pending.t1, pending.deadline = question, t1, deadline
            return
        t0 = utterance.t0
        if gone_on is not None:  # the turn was judged over too early: ask the whole question
            self.counters["questions_continued"] += 1
            del self.asked[session]
            t0 = gone_on.t0
        if question:
            self.pending[session] = PendingQuestion(question, t0, t1, deadline, utterance.timeline)

    def _gone_on(self, session: str, utterance: Utterance) -> PendingQuestion | None:
        """The question just asked that ``utterance`` goes on with, if any."""
        return utterance.continues if self.asked.get(session) is utterance.continues else None

    def _question(self, session: str, utterance: Utterance, text: str) -> str:
        """The question ``text`` (a transcript of ``utterance``) makes if the turn ends now: joined
        to the session's question not yet asked, or to the one it goes on with, else what follows
        the wake phrase ("" without it), else ``text``."""
        pending, gone_on = self.pending.get(session), self._gone_on(session, utterance)
        if pending is not None:
            return f"{pending.text} {text}"
        if gone_on is not None:
            return f"{gone_on.text} {text}"
        if self.config.wake_phrase:
            return after_wake_phrase(text, self.config.wake_phrase) or ""
        return text

    def _user_busy(self, session: str) -> bool:
        listener = self.listeners.get((session, "user"))
        return (listener is not None and listener.in_speech) or any(k[0] == session for k in self.utterances)

    def _on_echo(self, key: tuple[str, int], utterance: Utterance) -> None:
        utterance.echo = True
        self.counters["echo_ignored"] += 1
        self.speaker.resume(key, echo=True)

    def stop(self) -> None:
        for (session, channel), listener in self.listeners.items():
            for event in listener.flush():
                if channel == "user":
                    self._on_user_event(session, event)
        self.asr.stop()
        self.asr_final.stop()
        self.speaker.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnistream-speech")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    runtime = Runtime("speech", args.run_dir)
    config = runtime.config.speech
    recognizer = Recognizer(config.asr_model, threads=config.threads, window=config.asr_window)
    voice = Voice(config.tts_voice, threads=config.threads) if config.tts_enabled else None
    stage = SpeechStage(config, recognizer, voice, runtime.publish, runtime.counters)
    runtime.subscribe(*subscriptions("speech"))
    # A short poll keeps the paced audio on time (40 ms chunks) and barge-in within one pass.
    runtime.run(stage, tick=stage.tick, poll_s=0.01)


if __name__ == "__main__":
    main()
