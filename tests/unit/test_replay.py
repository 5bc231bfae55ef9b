"""The replayer's schedule: questions go out at their stream time while the recording plays,
and one held back by a busy gateway keeps its own time."""

from __future__ import annotations

import time

from omnistream.app.client import ClientError
from omnistream.app.replay import DEFAULT_SAMPLE, Replayer, ScheduledAsk
from omnistream.perception.sources import MediaReader
from omnistream.protocol.messages import AnswerDone


class BusyGateway:
    """A gateway stand-in that refuses every question until the recording has been sent and the
    replayer waited once, then answers each at once: what a slow reasoner behind a full gateway
    looks like to the replayer."""

    def __init__(self, end_ts: float):
        self.end_ts, self.last_frame_ts, self.waited = end_ts, 0.0, False
        self.asked: list[tuple[str, float]] = []
        self.events: list = []

    def send_ask(self, question, ts, choices=None, speak=True, mode="full") -> str:
        if not self.waited:
            raise ClientError("too many questions are waiting", "busy")
        turn = f"t{len(self.asked)}"
        self.asked.append((question, ts))
        self.events.append(AnswerDone(ts=ts, turn=turn, text="ok"))
        return turn

    def push_frame(self, image, ts, index=0) -> bool:
        self.last_frame_ts = max(self.last_frame_ts, ts)
        return True

    def push_audio(self, pcm, rate, ts, channel="scene") -> bool:
        return True

    def poll_events(self, timeout_s: float = 0.0) -> list:
        # The replayer waits (a timeout) only once the recording is sent and a question is refused.
        self.waited = self.waited or (timeout_s > 0 and self.last_frame_ts >= self.end_ts - 1.0)
        events, self.events = self.events, []
        return events


def test_a_question_held_back_by_a_busy_gateway_keeps_its_stream_time() -> None:
    end = MediaReader(DEFAULT_SAMPLE, max_fps=2).duration_s
    gateway = BusyGateway(end)
    asks = [ScheduledAsk(2.0, "early?"), ScheduledAsk(10.0, "middle?"), ScheduledAsk(end + 30.0, "after?")]
    answers = Replayer(gateway, speak=False).run(DEFAULT_SAMPLE, asks, speed=0, max_fps=2)
    assert all(a.done is not None for a in answers)
    times = dict(gateway.asked)
    assert times["early?"] == 2.0 and times["middle?"] == 10.0  # not moved to the end
    assert end - 1.0 <= times["after?"] <= end  # after the recording: its end


class SlowGateway(BusyGateway):
    """After the recording, accepts one question every 0.6 s (and answers it at once)."""

    def __init__(self, end_ts: float):
        super().__init__(end_ts)
        self.accepted_at = 0.0

    def send_ask(self, question, ts, choices=None, speak=True, mode="full") -> str:
        if not self.waited or time.monotonic() - self.accepted_at < 0.6:
            raise ClientError("too many questions are waiting", "busy")
        self.accepted_at = time.monotonic()
        return super().send_ask(question, ts, choices, speak, mode)


def test_a_long_backlog_that_makes_progress_is_waited_for() -> None:
    """Four questions that get through one by one over ~2.5 s, each well within the 1.5 s without
    progress the replayer allows: all answered (a fixed deadline gave up on the backlog)."""
    end = MediaReader(DEFAULT_SAMPLE, max_fps=2).duration_s
    gateway = SlowGateway(end)
    asks = [ScheduledAsk(2.0 + i, f"q{i}?") for i in range(4)]
    answers = Replayer(gateway, speak=False).run(
        DEFAULT_SAMPLE, asks, speed=0, max_fps=2, answer_timeout_s=1.5
    )
    assert [a.done is not None for a in answers] == [True] * 4
    assert [q for q, _ in gateway.asked] == ["q0?", "q1?", "q2?", "q3?"]
