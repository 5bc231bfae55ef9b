"""Speech process: owns the user's audio channel in both directions (full duplex).

Listening: ``AudioChunk`` -> 16 kHz -> VAD (on the loop's thread, every 32 ms window) -> ASR (a
worker thread) -> partial and final ``Transcript``s and ``UserSpeech`` events. At a pause in the
user's speech the utterance is transcribed at once; if that transcript reads as a finished turn
and the silence reaches ``turn_end_s``, the turn is over and the ``Ask`` goes out. Otherwise
the utterance ends after ``min_silence_s`` and is asked ``turn_grace_s`` later (always, or only
after ``wake_phrase``). The user going on right after an ``Ask`` extends that question. While
the user speaks, each partial transcript (and the one at a pause, when the turn waits longer)
goes to reasoning as a ``Draft`` of the question (``read_ahead``), so the LLM has read most of
it when the turn ends. Preemptive generation (``preemptive``): the transcript at the pause is
asked at once as a tentative ``Ask``, in parallel with the end-of-turn wait; its answer is
synthesised but held until the turn ends with the same question and ts (an ``Ask`` of the same
turn confirms it), and discarded (``Interrupt``, reason PREEMPTION_DISCARDED) if the user goes on
or the final transcript differs. Clients see only confirmed answers.
Speaking (``speaking.Speaker``): ``AnswerDelta`` phrases -> TTS -> ``AudioOut`` chunks paced to
real time at the rate the ``Ask`` asked for; what was heard is recorded as an assistant
``Transcript``.

Barge-in, in two steps (LiveKit's false-interruption handling): the moment the VAD hears the
user, the assistant's audio stops and the client is told to drop what it queued; as soon as ASR
finds words that are not the assistant's own voice, ``Interrupt`` stops reasoning and the answer
ends, remembered as far as it was heard. No words (a cough) or an echo of the answer resumes it.

What the stage keeps per session (VAD per channel, the user's utterances being transcribed, the
question waiting for the end of the turn, the last one asked) is one ``SessionState``.

Every spoken answer to a user's question leaves a ``turns.Timeline`` of latency marks, logged and
kept in ``timelines`` (``omnistream bench speech`` reports them).
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omnistream.protocol.config import SpeechConfig
from omnistream.protocol.messages import (
    PREEMPTION_DISCARDED,
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
from omnistream.protocol.runtime import Emit, Runtime
from omnistream.protocol.text import words
from omnistream.speech.asr import Recognizer
from omnistream.speech.duplex import PendingQuestion, Preemption, Utterance, after_wake_phrase
from omnistream.speech.hypothesis import StreamingTranscriber
from omnistream.speech.resample import SAMPLE_RATE
from omnistream.speech.speak import Voice
from omnistream.speech.speaking import Speaker
from omnistream.speech.turns import Timeline, reads_finished
from omnistream.speech.vad import EARLY_FINAL_S, Listener, ListenEvent, VoiceActivity
from omnistream.speech.workers import Worker

log = logging.getLogger("omnistream.speech")

ECHO_MIN_WORDS = 3  # with echo about, a partial barges in only with this many unmatched words
USER_PARTIAL, SCENE = 1, 2  # ASR priorities on the shared worker
UNHEARD_S = 0.5  # an answer played for less than this has not been heard: the user may go on


Key = tuple[str, int]  # a user utterance: (session, the listener's utterance number)


def timed(run: Callable[[], str]) -> tuple[str, float]:
    start = time.perf_counter()
    return run(), time.perf_counter() - start


@dataclass
class SessionState:
    """Everything the stage keeps about one session's turn taking."""

    listeners: dict[str, Listener] = field(default_factory=dict)  # by channel; none: not listened to
    utterances: dict[int, Utterance] = field(default_factory=dict)  # the user's, until final
    pending: PendingQuestion | None = None  # a question waiting for the end of the turn
    asked: PendingQuestion | None = None  # the last question asked: the user may go on with it
    ask_timeline: Timeline | None = None  # the asked question's marks, until its Ask comes back
    preempted: Preemption | None = None  # asked tentatively, the end of its turn not confirmed yet
    user_rate: int = 0  # the microphone's sample rate, what the answer is spoken at


class SpeechStage:
    """Speech's logic without sockets: built from its configuration, the recognizer, the voice
    (None: nothing is spoken) and an ``emit`` callable (``emit(message)``: the bus)."""

    name = "speech"

    def __init__(
        self,
        config: SpeechConfig,
        recognizer: Recognizer,
        voice: Voice | None,
        emit: Emit,
        counters: dict[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.recognizer = recognizer
        self.emit = emit
        self.counters: dict[str, float] = counters if counters is not None else defaultdict(float)
        self.clock = clock
        self.asr = Worker("speech-asr")  # partials and the scene's sound track
        # A user's final transcript is what the answer waits for: its own thread, so it never
        # queues behind a partial already running (whisper passes cannot be stopped midway).
        self.asr_final = Worker("speech-asr-final")
        # Through the stage's own emit and clock, so that what replaces them (tests/harness.py)
        # reaches the speaker too.
        self.speaker = Speaker(
            config,
            voice,
            lambda message: self.emit(message),
            self.counters,
            lambda: self.clock(),
            self._on_timeline,
        )
        # Least recently heard first; beyond ``live_sessions`` sessions listened to, the first of
        # them is closed (``close_session``).
        self.sessions: OrderedDict[str, SessionState] = OrderedDict()
        self.timelines: deque[Timeline] = deque(maxlen=256)
        self.discarded: deque[str] = deque(maxlen=64)  # tentative turns dropped: ignore their Ask

    @property
    def turns(self):
        return self.speaker.turns

    @property
    def live(self) -> list[str]:
        """Sessions listened to, least recently heard first."""
        return [session for session, state in self.sessions.items() if state.listeners]

    def hearing(self) -> bool:
        """A user utterance is still heard or transcribed (its final transcript not handled)."""
        return any(state.utterances for state in self.sessions.values())

    def question_pending(self) -> bool:
        """A question waits for the end of its turn to be asked."""
        return any(state.pending is not None for state in self.sessions.values())

    def _utterance(self, key: Key) -> Utterance | None:
        state = self.sessions.get(key[0])
        return None if state is None else state.utterances.get(key[1])

    def _user_listener(self, session: str) -> Listener | None:
        state = self.sessions.get(session)
        return None if state is None else state.listeners.get("user")

    def handle(self, message: Message) -> None:
        if isinstance(message, AudioChunk):
            self.on_audio(message)
        elif isinstance(message, Ask):
            state, timeline = self.sessions.get(message.session), None
            if message.tentative and message.turn in self.discarded:
                return  # discarded before it came back over the bus
            if not message.tentative and self.speaker.confirm(message):
                if (
                    state is not None
                    and state.ask_timeline is not None
                    and state.ask_timeline.turn == message.turn
                ):
                    state.ask_timeline = None
                return
            if (
                state is not None
                and state.ask_timeline is not None
                and state.ask_timeline.turn == message.turn
            ):
                timeline, state.ask_timeline = state.ask_timeline, None
            self.speaker.start(message, timeline)
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
        for session, state in list(self.sessions.items()):
            for number, utterance in list(state.utterances.items()):
                if self._turn_over_early((session, number), utterance):
                    for event in state.listeners["user"].cut():
                        self._on_user_event(session, event)
        now = self.clock()  # a question that became due in this pass goes out in this pass
        for session, state in list(self.sessions.items()):
            if state.preempted is not None and self._spoke_since(session, state.preempted):
                self._discard(session)
            pending = state.pending
            if pending is not None and now >= pending.deadline and not self._user_busy(session):
                state.pending = None
                pre, state.preempted = state.preempted, None
                confirmed = pre is not None and (pre.question, pre.ts) == (pending.text, pending.t1)
                if pre is not None and not confirmed:
                    state.preempted = pre
                    self._discard(session)
                pending.turn, pending.deadline = uuid.uuid4().hex, now
                if confirmed:  # the tentative Ask's answer, held until now, may be heard
                    pending.turn, pending.timeline = pre.turn, pre.timeline
                    pending.timeline.mark("confirmed", now)
                    self.counters["preemptions_confirmed"] += 1
                pending.timeline.turn = pending.turn
                pending.timeline.mark("ask", now)
                state.asked, state.ask_timeline = pending, pending.timeline
                self.emit(
                    Ask(
                        ts=pending.t1,
                        session=session,
                        turn=pending.turn,
                        question=pending.text,
                        audio_rate=state.user_rate,
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

    def _listener(self, state: SessionState, channel: str) -> Listener:
        if channel not in state.listeners:
            user = channel == "user"
            state.listeners[channel] = Listener(
                vad=VoiceActivity(),
                threshold=self.config.vad_threshold,
                pause_s=self.config.early_final_s if user else EARLY_FINAL_S,
                min_silence_s=self.config.min_silence_s,
                min_speech_s=self.config.min_speech_s,
                max_utterance_s=self.config.max_utterance_s,
                first_partial_s=self.config.first_partial_s if user else 0.0,
                partial_every_s=self.config.partial_every_s,
            )
        return state.listeners[channel]

    def on_audio(self, chunk: AudioChunk) -> None:
        self.counters["audio_chunks"] += 1
        state = self._touch(chunk.session)
        listener = self._listener(state, chunk.channel)
        if chunk.channel == "user":
            state.user_rate = chunk.sample_rate
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

    def _touch(self, session: str) -> SessionState:
        """``session`` is heard now; the least recently heard beyond ``live_sessions`` closes."""
        state = self.sessions.get(session)
        if state is None or not state.listeners:
            live = self.live
            while len(live) >= max(self.config.live_sessions, 1):
                self.close_session(live.pop(0))
            state = self.sessions.setdefault(session, SessionState())
        self.sessions.move_to_end(session)
        return state

    def close_session(self, session: str) -> None:
        """Stop listening to ``session``: an utterance in progress on any of its channels ends
        now (transcribed, and a user's asked, as at any end of speech) and its VAD state is
        dropped; with nothing left in flight the session is forgotten. Audio of it later starts
        afresh."""
        state = self.sessions.get(session)
        for channel in list(state.listeners) if state is not None else []:
            self._on_events(session, channel, state.listeners[channel].flush())
            del state.listeners[channel]
        if state is not None and state.preempted is not None:
            self._discard(session)
        if state is not None and not state.utterances and state.pending is None:
            del self.sessions[session]
        self.counters["sessions_closed"] += 1

    def _on_user_event(self, session: str, event: ListenEvent) -> None:
        key, state = (session, event.utterance), self.sessions[session]
        now = self.clock()
        if event.kind == "started":
            self.emit(UserSpeech(ts=event.t0, session=session, started=True))
            utterance = Utterance(event.t0, StreamingTranscriber(self.recognizer))
            state.utterances[event.utterance] = utterance
            asked = state.asked
            if state.preempted is not None:  # the user goes on: the turn was not over
                self._discard(session)
            if asked is not None and now - asked.deadline <= self.config.continue_s:
                turn = self.speaker.turns.get(asked.turn)
                if turn is None or turn.playout.played(now) < UNHEARD_S * turn.playout.rate:
                    utterance.continues = asked  # the user is going on with that question
            self.speaker.hear(key)
            return
        utterance = state.utterances.get(event.utterance)
        if utterance is None:
            return
        if event.kind == "partial":
            audio, transcriber = event.audio, utterance.transcriber

            def partial() -> tuple[str, str]:
                transcriber.insert_audio(audio[len(transcriber.audio) :])
                return transcriber.process_iter()

            listener = state.listeners["user"]
            # A partial still queued when the user has paused is stale: the final comes first.
            skip = lambda: utterance.ended or listener.silence_s >= listener.pause_s  # noqa: E731
            self.asr.submit(("partial", key, event.t1), partial, USER_PARTIAL, skip=skip)
            return
        assert event.audio is not None or event.kind == "ended"
        samples = -1 if event.audio is None else len(event.audio)
        timeline = utterance.timeline
        if event.kind == "pause":  # transcribe now what the final will be if the user is done
            utterance.early_samples, utterance.early_text = samples, None
            utterance.early_ts = event.t0 + samples / SAMPLE_RATE
            if state.preempted is not None:  # spoke again since that question was asked
                self._discard(session)
            timeline.marks["speech_end"] = now - state.listeners["user"].pause_s
            self._submit_final(key, event.audio, skip=lambda: utterance.early_samples != samples)
            return
        utterance.ended, utterance.end_ts, utterance.final_samples = True, event.t1, samples
        # The question's stream time: the end of its audio, the same whenever the turn ends.
        utterance.voiced_ts = event.t1 if event.audio is None else event.t0 + samples / SAMPLE_RATE
        timeline.mark("speech_end", now)
        timeline.mark("turn_end", now)
        self.emit(UserSpeech(ts=event.t1, session=session, started=False))
        if event.audio is None:
            self._on_user_final(key, event.t1, "")
        elif samples != utterance.early_samples:
            self._submit_final(key, event.audio)
        elif utterance.early_text is not None:
            self._on_user_final(key, event.t1, utterance.early_text)
        # else: the speculative pass is running on exactly this audio; its result is the final

    def _turn_over_early(self, key: Key, utterance: Utterance) -> bool:
        """The transcript at the pause reads as a finished turn and the silence (stream time) has
        lasted ``turn_end_s``, with no speech since."""
        if utterance.ended or not self._ends_soon(utterance.early_text or ""):
            return False
        listener = self._user_listener(key[0])
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

    def _submit_final(self, key: Key, audio, skip=lambda: False) -> None:
        run = lambda: timed(lambda: self.recognizer.transcribe(audio))  # noqa: E731
        self.asr_final.submit(("final", key, len(audio)), run, 0, skip)

    def _on_asr(self, tag: tuple, result, error: BaseException | None) -> None:
        kind = tag[0]
        if error is not None:
            self.emit(Error(code="asr_failed", message=f"speech: {type(error).__name__}: {error}"))
            result = {"partial": ("", ""), "final": ("", 0.0)}.get(kind, "")
        if kind == "scene":
            _, session, t0, t1 = tag
            if result:
                self.counters["utterances_scene"] += 1
                self.emit(Transcript(ts=t1, t0=t0, session=session, text=result, speaker="scene"))
        elif kind == "partial":
            self._on_user_partial(tag[1], tag[2], " ".join(part for part in result if part))
        else:
            _, key, samples = tag
            utterance = self._utterance(key)
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
                listener = self._user_listener(key[0])
                if not self._ends_soon(text) and listener is not None:
                    self._draft(key, listener.stream_ts, text)
                self._preempt(key, utterance, text)

    def _on_user_partial(self, key: Key, t1: float, text: str) -> None:
        utterance = self._utterance(key)
        if utterance is None or utterance.echo or not text:
            return
        if self.speaker.is_echo(key[0], text):
            if len(words(text)) >= 2:  # one common word ("he") is not evidence either way
                self._on_echo(key, utterance)
            return
        if self.speaker.echoing(key) and len(words(text)) < ECHO_MIN_WORDS:
            return  # a word or two misheard from our own voice ("Simon" for "monarch"): wait
        self.emit(Transcript(ts=t1, t0=utterance.t0, session=key[0], text=text, final=False, speaker="user"))
        self.speaker.cut(key)
        self._draft(key, t1, text)
        utterance.partial_question = self._question(key[0], utterance, text)

    def _draft(self, key: Key, t1: float, text: str) -> None:
        """Send what the question will be if the user stops now (as ``_on_user_final`` would
        ask it) to reasoning, to be read ahead."""
        utterance = self._utterance(key)
        if not (self.config.read_ahead and self.config.ask_on_user_speech and text) or utterance is None:
            return
        session = key[0]
        if utterance.echo or self.speaker.is_echo(session, text):
            return
        question = self._question(session, utterance, text)
        if question and question != utterance.drafted:
            utterance.drafted = question
            self.emit(Draft(ts=t1, session=session, question=question))
            self.counters["drafts"] += 1

    def _preempt(self, key: Key, utterance: Utterance, text: str) -> None:
        """Preemptive generation: ``text``, the speculative transcript at a pause, is what the
        final will be if the user is done; ask its question now (tentative), while the end of the
        turn is awaited. Its answer is synthesised but held until the turn ends with the same
        question (``tick``), and discarded if the user goes on or the question changes."""
        session, state = key[0], self.sessions.get(key[0])
        if not (self.config.preemptive and self.config.ask_on_user_speech and text) or state is None:
            return
        listener = self._user_listener(session)
        if listener is None or listener.utterance != key[1] or not listener.in_speech:
            return
        if listener.silence_s < listener.pause_s:
            return  # the user spoke again while it was transcribed
        if utterance.echo or self.speaker.is_echo(session, text):
            return
        question = self._question(session, utterance, text)
        self._ask_tentatively(key, question, utterance.early_ts, utterance.timeline)

    def _ask_tentatively(self, key: Key, question: str, ts: float, timeline: Timeline) -> None:
        """Send ``question`` (stream time ``ts``) as a tentative Ask, in place of the session's
        tentative question if that was another."""
        session, state = key[0], self.sessions.get(key[0])
        if not (self.config.preemptive and self.config.ask_on_user_speech and question) or state is None:
            return
        pre = state.preempted
        if pre is not None and (pre.question, pre.ts) == (question, ts):
            return
        if pre is not None:
            self._discard(session)
        state.preempted = Preemption(key, question, ts, uuid.uuid4().hex, timeline)
        timeline.turn = state.preempted.turn
        timeline.mark("ask", self.clock())
        state.ask_timeline = timeline
        self.emit(
            Ask(
                ts=ts,
                session=session,
                turn=state.preempted.turn,
                question=question,
                audio_rate=state.user_rate,
                tentative=True,
            )
        )
        self.counters["preemptions"] += 1

    def _spoke_since(self, session: str, pre: Preemption) -> bool:
        """The user spoke again in the utterance ``pre`` was asked from (no "started" event:
        the same utterance goes on)."""
        listener = self._user_listener(session)
        return (
            listener is not None
            and listener.in_speech
            and listener.utterance == pre.key[1]
            and listener.silence_s < listener.pause_s
        )

    def _discard(self, session: str) -> None:
        """Drop the session's tentative question: reasoning stops answering it, its held audio
        goes, nothing of it reached a client."""
        state = self.sessions[session]
        pre, state.preempted = state.preempted, None
        if pre is None:
            return
        self.emit(Interrupt(ts=pre.ts, session=session, turn=pre.turn, reason=PREEMPTION_DISCARDED))
        self.discarded.append(pre.turn)
        self.speaker.discard(pre.turn)
        pre.timeline.forget_answer()
        if state.ask_timeline is pre.timeline:
            state.ask_timeline = None
        self.counters["preemptions_discarded"] += 1

    def _on_user_final(self, key: Key, t1: float, text: str) -> None:
        session, state = key[0], self.sessions.get(key[0])
        utterance = None if state is None else state.utterances.pop(key[1], None)
        if state is None or utterance is None:
            return
        now = self.clock()
        # The stream time of the words (and of the question they make): the end of their audio,
        # the same whenever the turn is judged over.
        t1 = utterance.voiced_ts or t1
        utterance.timeline.mark("final", now)
        preempted = state.preempted
        if preempted is not None and preempted.key == key and not text:
            self._discard(session)
        if not text:
            self.counters["utterances_empty"] += 1
            self.speaker.resume(key)
            return
        if utterance.echo or self.speaker.is_echo(session, text):
            if state.preempted is not None:
                self._discard(session)
            self._on_echo(key, utterance)
            return
        self.counters["utterances"] += 1
        self.emit(Transcript(ts=t1, t0=utterance.t0, session=session, text=text, speaker="user"))
        gone_on = self._gone_on(session, utterance)
        if gone_on is not None and gone_on.turn not in self.speaker.turns:  # not spoken: tell reasoning
            self.emit(Interrupt(ts=t1, session=session, turn=gone_on.turn, reason="user continued"))
        self.speaker.cut(key)
        if not self.config.ask_on_user_speech:
            return
        deadline = now if self._ends_soon(text) else now + self.config.turn_grace_s
        question = self._question(session, utterance, text)
        if utterance.partial_question:  # would an answer to the latest partial have been right?
            self.counters["finals_after_partial"] += 1
            self.counters["finals_same_as_partial"] += int(question == utterance.partial_question)
        pre = state.preempted
        if pre is not None and (pre.question, pre.ts) != (question, t1):
            self._discard(session)  # the final transcript is not what was answered: ask again
        if deadline > now:  # the end of the turn is awaited: answer meanwhile (preemptive)
            self._ask_tentatively(key, question, t1, utterance.timeline)
        pending = state.pending
        if pending is not None:  # the user went on before the question was asked: one question
            pending.text, pending.t1, pending.deadline = question, t1, deadline
            return
        t0 = utterance.t0
        if gone_on is not None:  # the turn was judged over too early: ask the whole question
            self.counters["questions_continued"] += 1
            state.asked = None
            t0 = gone_on.t0
        if question:
            state.pending = PendingQuestion(question, t0, t1, deadline, utterance.timeline)

    def _gone_on(self, session: str, utterance: Utterance) -> PendingQuestion | None:
        """The question just asked that ``utterance`` goes on with, if any."""
        state = self.sessions.get(session)
        asked = None if state is None else state.asked
        return utterance.continues if asked is utterance.continues else None

    def _question(self, session: str, utterance: Utterance, text: str) -> str:
        """The question ``text`` (a transcript of ``utterance``) makes if the turn ends now: joined
        to the session's question not yet asked, or to the one it goes on with, else what follows
        the wake phrase ("" without it), else ``text``."""
        state = self.sessions.get(session)
        pending = None if state is None else state.pending
        gone_on = self._gone_on(session, utterance)
        if pending is not None:
            return f"{pending.text} {text}"
        if gone_on is not None:
            return f"{gone_on.text} {text}"
        if self.config.wake_phrase:
            return after_wake_phrase(text, self.config.wake_phrase) or ""
        return text

    def _user_busy(self, session: str) -> bool:
        listener, state = self._user_listener(session), self.sessions.get(session)
        return (listener is not None and listener.in_speech) or bool(state and state.utterances)

    def _on_echo(self, key: Key, utterance: Utterance) -> None:
        utterance.echo = True
        self.counters["echo_ignored"] += 1
        self.speaker.resume(key, echo=True)

    def close(self) -> None:
        """End what is heard now (a user's utterance is asked, as at any end of speech) and stop
        the ASR and TTS workers."""
        for session, state in list(self.sessions.items()):
            for channel, listener in list(state.listeners.items()):
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
    stage = SpeechStage(config, recognizer, voice, runtime.emit, runtime.counters)
    runtime.subscribe(*subscriptions("speech"))
    # A short poll keeps the paced audio on time (40 ms chunks) and barge-in within one pass.
    runtime.run(stage, tick=stage.tick, poll_s=0.01)


if __name__ == "__main__":
    main()
