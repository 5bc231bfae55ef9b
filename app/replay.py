"""Replay a recording as if it were live, ask questions at given stream times, collect answers.

Frames and audio are pushed through the gateway paced at ``speed`` x real time (0 = as fast as
possible); each question is sent when the stream reaches its time, while the stream goes on.
Stream times start at ``start_ts`` (``session_end``: where a resumed session stopped), so a
recording replayed into a session that already holds memories continues its timeline.
Answers stream back as text deltas; their spoken audio is gathered per turn and can be saved
as WAV.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile

from omnistream.app.client import Client, ClientError
from omnistream.app.client_core import fit_frame
from omnistream.perception.sources import AUDIO_RATE, MediaReader
from omnistream.protocol.messages import AnswerDelta, AnswerDone, AudioOut, Message

DEFAULT_SAMPLE = Path(__file__).parent / "assets" / "sample.mkv"


@dataclass
class ScheduledAsk:
    at_s: float
    question: str
    choices: list[str] = field(default_factory=list)
    mode: str = "full"
    tag: str = ""  # the caller's name for this question (e.g. an eval question id)


@dataclass
class Answer:
    ask: ScheduledAsk
    turn: str = ""
    sent_wall: float = 0.0
    first_delta_wall: float = 0.0
    text: str = ""
    done: AnswerDone | None = None
    audio: list[np.ndarray] = field(default_factory=list)
    audio_rate: int = 24000
    first_audio_wall: float = 0.0
    audio_final: bool = False

    def save_wav(self, path: Path) -> Path:
        pcm = np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)
        soundfile.write(str(path), pcm, self.audio_rate, subtype="PCM_16")
        return path

    @property
    def finished(self) -> bool:
        return self.done is not None and (self.audio_final or not self.audio or bool(self.done.error))


def session_end(client: Client) -> float:
    """Stream time at which the client's session stops so far: the end of its newest record."""
    newest = client.history(limit=1, newest=True).items
    return newest[-1].t1 if newest else 0.0


class Replayer:
    def __init__(
        self,
        client: Client,
        on_delta: Callable[[Answer, str], None] | None = None,
        speak: bool = True,
    ):
        self.client = client
        self.on_delta = on_delta or (lambda answer, text: None)
        self.speak = speak
        self.answers: dict[str, Answer] = {}

    def _dispatch(self, events: list[Message]) -> None:
        for event in events:
            answer = self.answers.get(getattr(event, "turn", ""))
            if answer is None:
                continue
            if isinstance(event, AnswerDelta):
                if not answer.first_delta_wall:
                    answer.first_delta_wall = time.monotonic()
                answer.text += event.text
                self.on_delta(answer, event.text)
            elif isinstance(event, AnswerDone):
                answer.done = event
            elif isinstance(event, AudioOut):
                if event.pcm is not None and len(event.pcm):
                    if not answer.first_audio_wall:
                        answer.first_audio_wall = time.monotonic()
                    answer.audio.append(np.asarray(event.pcm, np.float32))
                    answer.audio_rate = event.sample_rate
                # A flush without final is a pause (barge-in being checked): the answer may resume.
                answer.audio_final = answer.audio_final or event.final

    def _wait_until(self, wall: float) -> None:
        while True:
            remaining = wall - time.monotonic()
            self._dispatch(self.client.poll_events(max(min(remaining, 0.05), 0.0)))
            if remaining <= 0:
                return

    def try_ask(self, scheduled: ScheduledAsk, start_ts: float = 0.0) -> Answer | None:
        """``ask``, or None when the gateway is busy (too many questions waiting): retry later."""
        try:
            return self.ask(scheduled, start_ts)
        except ClientError as exc:
            if exc.code != "busy":
                raise
            return None

    def ask(self, scheduled: ScheduledAsk, start_ts: float = 0.0) -> Answer:
        answer = Answer(ask=scheduled, sent_wall=time.monotonic())
        answer.turn = self.client.send_ask(
            scheduled.question,
            start_ts + scheduled.at_s,
            scheduled.choices,
            speak=self.speak,
            mode=scheduled.mode,
        )
        self.answers[answer.turn] = answer
        return answer

    def run(
        self,
        path: Path,
        asks: list[ScheduledAsk],
        speed: float = 1.0,
        max_fps: float = 10.0,
        answer_timeout_s: float = 300.0,
        progress: Callable[[float, float], None] | None = None,
        start_ts: float = 0.0,
    ) -> list[Answer]:
        """Stream ``path`` with its time 0 at stream time ``start_ts``; returns the answers in the
        order of ``asks`` (whose ``at_s`` count from the start of the file)."""
        reader = MediaReader(path, max_fps=max_fps)
        pending = sorted(asks, key=lambda a: a.at_s)
        answers: list[Answer] = []
        start = time.monotonic()
        last_ts = 0.0
        for event in reader:
            while pending and pending[0].at_s <= event.ts:
                answer = self.try_ask(pending[0], start_ts)
                if answer is None:  # busy: the question goes out on a later frame, at its own time
                    break
                answers.append(answer)
                pending.pop(0)
            if speed > 0:
                self._wait_until(start + event.ts / speed)
            else:
                self._dispatch(self.client.poll_events(0))
            if event.kind == "video":
                # A frame over the gateway's limits (an 8K recording) is scaled down to fit them.
                self.client.push_frame(fit_frame(event.data), start_ts + event.ts)
            else:
                self.client.push_audio(event.data, AUDIO_RATE, start_ts + event.ts, channel="scene")
            last_ts = event.ts
            if progress is not None:
                progress(event.ts, reader.duration_s)
        # Asked after the end of the recording, or held back while the gateway was busy: each
        # keeps its own stream time (a question about 02:21 is still about 02:21 when it gets
        # through; memory answers it with what was known then), capped at the recording's end.
        # The system may take long over a backlog: it fails only after ``answer_timeout_s``
        # without progress (no question accepted, no answer finished).
        progress_at, done = time.monotonic(), sum(a.finished for a in answers)

        def stalled() -> bool:
            nonlocal progress_at, done
            finished = sum(a.finished for a in answers)
            if finished > done:
                progress_at, done = time.monotonic(), finished
            return time.monotonic() - progress_at > answer_timeout_s

        for scheduled in pending:
            scheduled = dataclasses.replace(scheduled, at_s=min(scheduled.at_s, last_ts))
            while (answer := self.try_ask(scheduled, start_ts)) is None:
                if stalled():
                    raise ClientError(
                        f"gateway stayed busy for {answer_timeout_s:.0f} s with no answer finished; "
                        f"{scheduled.question!r} was never accepted",
                        "busy",
                    )
                self._dispatch(self.client.poll_events(0.5))
            answers.append(answer)
            progress_at = time.monotonic()
        while not all(a.finished for a in answers) and not stalled():
            self._dispatch(self.client.poll_events(0.1))
        return answers
