"""Frame sampling with backpressure: a latest-wins slot and an encode-rate limiter.

A live source (camera, URL, frames pushed by clients) must never queue stale frames: its
``FrameSlot`` holds one frame and a newer frame replaces it (the replaced one is counted as
dropped). A file read as fast as possible must not lose frames instead: its slot holds up to a
batch and ``put`` blocks the reader until the encoder takes them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SampledFrame:
    """One frame waiting for the encoder. ``image``: uint8 (H, W, 3) RGB, owned by the slot."""

    image: np.ndarray
    ts: float  # stream time (seconds)
    index: int = 0
    session: str = "default"
    source: str = ""
    arrived: float = field(default_factory=time.monotonic)  # wall clock (monotonic s) at arrival


class FrameSlot:
    """Thread-safe hand-over from sources to the encoder.

    ``capacity=1, block=False``: latest wins (live). ``block=True``: ``put`` waits for room
    (lossless, for files read as fast as possible).
    """

    def __init__(self, capacity: int = 1, block: bool = False):
        if capacity < 1:
            raise ValueError(f"FrameSlot capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.block = block
        self._frames: deque[SampledFrame] = deque()
        self._cond = threading.Condition()
        self.put_count = 0
        self.dropped = 0
        self.closed = False

    def put(self, frame: SampledFrame, timeout_s: float | None = None) -> bool:
        """Offer a frame; returns False if it was not accepted (slot closed or wait timed out)."""
        with self._cond:
            if self.block and not self._cond.wait_for(
                lambda: self.closed or len(self._frames) < self.capacity, timeout_s
            ):
                return False
            if self.closed:
                return False
            while len(self._frames) >= self.capacity:
                self._frames.popleft()
                self.dropped += 1
            self._frames.append(frame)
            self.put_count += 1
            self._cond.notify_all()
            return True

    def take(self, max_frames: int = 1) -> list[SampledFrame]:
        """Up to ``max_frames`` waiting frames, oldest first; never waits."""
        with self._cond:
            taken = [self._frames.popleft() for _ in range(min(max_frames, len(self._frames)))]
            if taken:
                self._cond.notify_all()
            return taken

    def wait(self, timeout_s: float) -> bool:
        """Wait until a frame is waiting (True) or the timeout passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._frames) or self.closed, timeout_s)

    def __len__(self) -> int:
        with self._cond:
            return len(self._frames)

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class RateLimiter:
    """Admit at most ``max_fps`` frames per second on average (0 = no cap).

    Slots are scheduled one period apart rather than measured from the last admitted frame, so a
    30 fps input capped at 15 fps admits every other frame even with jittery arrival times
    (measuring gaps would skip a frame that arrives a millisecond early and fall to 10 fps).
    """

    def __init__(self, max_fps: float):
        self.period = 1.0 / max_fps if max_fps > 0 else 0.0
        self._next_due = -float("inf")

    def admit(self, now: float) -> bool:
        """``now``: seconds on any monotonic clock (wall or stream time)."""
        if not self.period:
            return True
        if now < self._next_due - 0.25 * self.period:
            return False
        # More than a period late (a pause): restart the schedule instead of bursting to catch up.
        base = self._next_due if now - self._next_due < self.period else now
        self._next_due = base + self.period
        return True
