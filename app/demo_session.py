"""One browser session of the demo page: its own omnistream session, client and event state.

The page's handlers run on Gradio's worker threads, so requests go through ``Client`` under a
lock, and one reader thread per session owns the event socket: it files answers, spoken audio,
transcripts, alerts and stage stats of this session where the page's timer can render them.
Stream time (``ts``) is seconds since the session started, for camera, microphone and a replayed
recording alike.

What perception saw: the session keeps a small copy of the last frames it sent; a ``Percept``
names the stream time of the frame its object boxes were detected on (``boxes_ts``, or its own
``ts`` when objects are not detected), and that frame with those boxes becomes ``seen`` (the page's
preview). The tracker's ``Sighting`` events (appeared, left, people present) are kept newest first.

Spoken answers: every ``AudioOut`` of the session (typed and spoken questions alike) is also
filed, in order, as a ``SpeechItem`` (``speech``, counted by ``speech_count``); the page's player
feed (``demo.on_speech``) waits on ``wait_for_speech`` and sends them to the browser as they come.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile

from omnistream.app.client import Client, ClientError
from omnistream.app.client_core import fit_frame
from omnistream.app.preview import scaled
from omnistream.protocol.messages import (
    Alert,
    AnswerDelta,
    AnswerDone,
    AudioOut,
    Box,
    Error,
    History,
    MemoryRecord,
    Message,
    Percept,
    Sighting,
    Stats,
    Transcript,
)
from omnistream.protocol.text import clock

log = logging.getLogger("omnistream.demo")

MAX_TURNS_SHOWN = 20
MAX_SIGHTINGS_KEPT = 50
FRAMES_KEPT = 40  # sent frames kept (small copies) to pair with percepts: 20 s of camera at 2 fps
SAME_FRAME_S = 1e-3  # a percept's stream time and the sent frame's are the same float
SPEECH_KEPT = 4096  # AudioOut chunks (about 40 ms each) kept for a player that fell behind


@dataclass
class Turn:
    """One question and its answer as it streams (text deltas, spoken audio chunks)."""

    turn: str
    question: str
    asked_ts: float
    spoken_question: bool = False
    text: str = ""
    done: AnswerDone | None = None
    audio: list[np.ndarray] = field(default_factory=list)
    audio_rate: int = 24000
    audio_final: bool = False
    flushed: bool = False  # its speech was cut (barge-in): what was queued was dropped


@dataclass
class SpeechItem:
    """One ``AudioOut`` of the session, for the page's player: a chunk to play (``pcm``), and/or
    ``flush`` (drop what is queued of ``turn``) and ``final`` (the turn's speech is over)."""

    turn: str
    pcm: np.ndarray | None
    sample_rate: int
    flush: bool
    final: bool


@dataclass
class Seen:
    """A frame of this session that perception analysed (the session's small copy) and the object
    boxes detected on it (normalised to the frame; empty: none found, or objects are off)."""

    ts: float
    frame: np.ndarray
    boxes: list[Box]


def wav_bytes(pcm: np.ndarray, sample_rate: int) -> bytes:
    """float32 (N,) -> a 16-bit WAV file in memory (what Gradio's streaming audio output plays)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(pcm, np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


class DemoSession:
    """Connection and live state of one browser tab; ``close()`` when the tab goes away."""

    def __init__(self, run_dir: Path, timeout_s: float = 30.0):
        self.session = f"web-{uuid.uuid4().hex[:8]}"
        self.client = Client.connect(run_dir, session=self.session, timeout_s=timeout_s)
        self.lock = threading.Lock()  # guards the client's request socket
        self.changed = threading.Condition()
        self.started = time.monotonic()
        self.turns: dict[str, Turn] = {}
        self.alerts: deque[str] = deque(maxlen=50)
        self.watches: dict[str, str] = {}
        self.heard: deque[Transcript] = deque(maxlen=20)
        self.stats: dict[str, Stats] = {}
        self.errors: deque[str] = deque(maxlen=5)
        self.timeline: list[MemoryRecord] = []  # the records shown in the page's timeline, in order
        self.sent_frames: deque[tuple[float, np.ndarray]] = deque(maxlen=FRAMES_KEPT)  # (ts, small copy)
        self.seen: Seen | None = None  # the newest analysed frame with its boxes
        self.seen_version = 0  # bumped whenever ``seen`` changes
        self.sightings: deque[Sighting] = deque(maxlen=MAX_SIGHTINGS_KEPT)  # newest first
        self.sightings_received = 0
        self.speech: deque[SpeechItem] = deque(maxlen=SPEECH_KEPT)
        self.speech_count = 0  # SpeechItems filed so far (the deque keeps the newest)
        self.live_view_shown = (0, 0)  # (seen_version, sightings_received) the page last rendered
        self.frames_sent = 0
        self.audio_sent_s = 0.0
        self.audio_chunks = 0
        self.recording: threading.Thread | None = None
        self.stop_recording = threading.Event()
        self.running = True
        self.reader = threading.Thread(target=self._read_events, name=f"demo-{self.session}", daemon=True)
        self.reader.start()
        log.info("demo session opened", extra={"session": self.session})

    def __deepcopy__(self, _memo: dict) -> DemoSession:
        """Gradio deep-copies state values; a live connection is shared, never copied."""
        return self

    def now(self) -> float:
        return time.monotonic() - self.started

    def close(self) -> None:
        self.running = False
        self.stop_recording.set()
        self.reader.join(timeout=2)
        with self.lock:
            self.client.close()
        log.info("demo session closed", extra={"session": self.session})

    # -- events ---------------------------------------------------------------------------------

    def _read_events(self) -> None:
        while self.running:
            events = self.client.poll_events(0.1)
            if events:
                with self.changed:
                    for event in events:
                        self._file(event)
                    self.changed.notify_all()

    def _file(self, event: Message) -> None:
        if isinstance(event, Stats):
            self.stats[event.stage] = event
            return
        if event.session != self.session:
            return
        if isinstance(event, AnswerDelta | AnswerDone | AudioOut):
            turn = self.turns.get(event.turn)
            if turn is None:  # a question the speech stage asked from the microphone: its words
                said = [t for t in self.heard if t.speaker == "user"]  # are the last user utterance
                question = said[-1].text if said else "(spoken question)"
                turn = self.turns[event.turn] = Turn(event.turn, question, event.ts, True)
            if isinstance(event, AnswerDelta):
                turn.text += event.text
            elif isinstance(event, AnswerDone):
                turn.done = event
            else:
                pcm = None
                if event.pcm is not None and len(event.pcm):
                    pcm = np.asarray(event.pcm, np.float32)
                    turn.audio.append(pcm)
                    turn.audio_rate = event.sample_rate
                # a flush without final is a pause (the user may only have coughed): more may come
                turn.flushed = turn.flushed or (event.flush and event.final)
                turn.audio_final = turn.audio_final or event.final
                self.speech.append(SpeechItem(event.turn, pcm, event.sample_rate, event.flush, event.final))
                self.speech_count += 1
        elif isinstance(event, Percept):
            self._pair(event)
        elif isinstance(event, Sighting):
            self.sightings.appendleft(event)
            self.sightings_received += 1
        elif isinstance(event, Transcript) and event.final:
            self.heard.append(event)
        elif isinstance(event, Error):
            self.errors.append(f"[{event.code}] {event.message}")
        elif isinstance(event, Alert):
            name = self.watches.get(event.watch_id, "watch")
            self.alerts.appendleft(f"{clock(event.ts)} **{name}**: {event.text}")

    def _pair(self, percept: Percept) -> None:
        """Make the frame the percept's boxes were detected on (or the percept's own frame when
        it has no detections) with those boxes what was ``seen``, if this session still has it."""
        detected = percept.boxes_ts is not None
        ts = percept.boxes_ts if detected else percept.ts
        if self.seen is not None and abs(self.seen.ts - ts) <= SAME_FRAME_S:
            return  # percepts repeat the newest detections until the next one
        frame = self.sent_frame(ts)
        if frame is not None:
            self.seen = Seen(ts, frame, list(percept.boxes) if detected else [])
            self.seen_version += 1

    def sent_frame(self, ts: float) -> np.ndarray | None:
        """The small copy of the frame this session sent at stream time ``ts``, if still kept."""
        with self.changed:
            for sent_ts, frame in reversed(self.sent_frames):
                if abs(sent_ts - ts) <= SAME_FRAME_S:
                    return frame
        return None

    # -- requests -------------------------------------------------------------------------------

    def push_frame(self, rgb: np.ndarray, ts: float | None = None) -> None:
        """Send an RGB uint8 (H, W, 3) frame at stream time ``ts`` (default: now)."""
        image = fit_frame(np.ascontiguousarray(rgb, np.uint8))  # a camera over the gateway's limits
        small = scaled(image)
        with self.lock:
            ts = self.now() if ts is None else ts
            with self.changed:  # kept before it is sent: its percept may come back at once
                self.sent_frames.append((ts, small))
            if self.client.push_frame(image, ts=ts, index=self.frames_sent):
                self.frames_sent += 1

    def push_audio(
        self, pcm: np.ndarray, sample_rate: int, channel: str = "user", ts: float | None = None
    ) -> None:
        """Send mono PCM (float32 or int16 (N,)) at ``sample_rate`` Hz."""
        with self.lock:
            if self.client.push_audio(pcm, sample_rate, ts=self.now() if ts is None else ts, channel=channel):
                self.audio_sent_s += len(pcm) / sample_rate
                self.audio_chunks += 1

    def ask(self, question: str) -> Turn:
        """Send a typed question; raises ``ClientError`` with the gateway's reason if refused."""
        ts = self.now()
        with self.lock:
            turn_id = self.client.send_ask(question, ts, speak=True)
        with self.changed:
            return self.turns.setdefault(turn_id, Turn(turn_id, question, ts))

    def watch(self, condition: str) -> str:
        with self.lock:
            watch_id = self.client.watch(condition, ts=self.now())
        self.watches[watch_id] = condition
        return watch_id

    def interrupt(self) -> None:
        with self.lock:
            self.client.interrupt(ts=self.now())

    def history(self) -> History:
        with self.lock:
            return self.client.history(0.0, self.now() + 1.0)

    def stream_recording(self, path: Path, max_fps: float = 10.0) -> None:
        """Replay a recording into this session (instead of the camera), paced in real time."""
        from omnistream.perception.sources import AUDIO_RATE, MediaReader

        self.stop_recording.set()
        if self.recording is not None:
            self.recording.join(timeout=2)
        reader = MediaReader(path, max_fps=max_fps)  # raises MediaError naming a bad file
        self.stop_recording = stop = threading.Event()
        offset = self.now()

        def play() -> None:
            start = time.monotonic()
            for item in reader:
                wait = start + item.ts - time.monotonic()
                if stop.wait(max(wait, 0.0)) or not self.running:
                    return
                if item.kind == "video":
                    self.push_frame(item.data, ts=offset + item.ts)
                else:
                    self.push_audio(item.data, AUDIO_RATE, channel="scene", ts=offset + item.ts)

        self.recording = threading.Thread(target=play, name=f"replay-{self.session}", daemon=True)
        self.recording.start()

    def wait_for_change(self, timeout_s: float) -> None:
        with self.changed:
            self.changed.wait(timeout_s)

    def wait_for_speech(self, seen: int, timeout_s: float) -> tuple[int, list[SpeechItem]]:
        """The speech items filed after the first ``seen`` (waiting up to ``timeout_s`` for one):
        (the new count, the items still kept of those)."""
        with self.changed:
            self.changed.wait_for(lambda: self.speech_count > seen or not self.running, timeout_s)
            count = self.speech_count
            new = min(count - seen, len(self.speech))
            return count, list(self.speech)[len(self.speech) - new :] if new > 0 else []


def safe(call, default=None):
    """Run a request for the page; a refused or unanswered one becomes a logged, shown error."""
    try:
        return call()
    except ClientError as exc:
        log.warning("request failed: %s", exc)
        return default
