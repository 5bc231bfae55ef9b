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


class FairSlot:
    """One ``FrameSlot`` per session, taken round-robin: several streams share one encoder fairly.

    Each stream (a source the stage reads, or a session whose frames clients push) has its own
    slot, so a fast stream never overwrites a slow one's frame, and ``take`` deals frames out one
    per waiting stream in turn, starting after the stream served first last time: with N streams
    waiting and a batch of B, each gets B / N frames of the batch (a batch encodes several
    streams at once). A registered stream (``add``) keeps its slot's mode (``block``: a file read
    as fast as possible loses nothing); any other session gets a latest-wins slot of one frame,
    dropped once empty (pushed sessions come and go).
    """

    def __init__(self, capacity: int = 1):
        self.default_capacity = capacity  # an unregistered session's slot: latest wins
        self._slots: dict[str, FrameSlot] = {}
        self._registered: set[str] = set()
        self._order: deque[str] = deque()  # next session to serve first
        self._lock = threading.RLock()
        self._gone_dropped = 0  # frames dropped by slots of sessions since forgotten
        self._wake = threading.Condition(self._lock)
        self.closed = False

    def add(self, session: str, capacity: int = 1, block: bool = False) -> FrameSlot:
        """Register a stream with its own slot mode (before its first frame)."""
        with self._lock:
            slot = self._slots[session] = FrameSlot(capacity, block)
            self._registered.add(session)
            if session not in self._order:
                self._order.append(session)
            return slot

    def put(self, frame: SampledFrame, timeout_s: float | None = None) -> bool:
        """Offer a frame to its session's slot (see ``FrameSlot.put``)."""
        with self._wake:
            if self.closed:
                return False
            slot = self._slots.get(frame.session)
            if slot is None:
                slot = self._slots[frame.session] = FrameSlot(self.default_capacity)
                self._order.append(frame.session)
            if not slot.block:  # under the lock: ``take`` may forget an empty unregistered slot
                accepted = slot.put(frame)
                self._wake.notify_all()
                return accepted
        accepted = slot.put(frame, timeout_s)  # a registered blocking slot (never forgotten)
        if accepted:
            with self._wake:
                self._wake.notify_all()
        return accepted

    def take(self, max_frames: int = 1) -> list[SampledFrame]:
        """Up to ``max_frames`` frames, one per waiting stream in turn (each stream's oldest
        first); the stream served first this time is served last next time. Never waits."""
        taken: list[SampledFrame] = []
        with self._lock:
            order = list(self._order)
            first_served = None
            while len(taken) < max_frames:
                progressed = False
                for session in order:
                    if len(taken) >= max_frames:
                        break
                    got = self._slots[session].take(1)
                    if got:
                        taken += got
                        progressed = True
                        first_served = first_served or session
                if not progressed:
                    break
            if first_served is not None:
                self._order.remove(first_served)
                self._order.append(first_served)  # served first now: last next time
            for session in [s for s in self._slots if s not in self._registered]:
                slot = self._slots[session]
                if not len(slot):  # a pushed session's empty slot: forgotten until its next frame
                    self._gone_dropped += slot.dropped
                    del self._slots[session]
                    self._order.remove(session)
        return taken

    def wait(self, timeout_s: float) -> bool:
        with self._wake:
            return self._wake.wait_for(lambda: self.closed or len(self) > 0, timeout_s)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(slot) for slot in self._slots.values())

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._gone_dropped + sum(slot.dropped for slot in self._slots.values())

    @property
    def sessions(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def close(self) -> None:
        with self._wake:
            self.closed = True
            slots = list(self._slots.values())
            self._wake.notify_all()
        for slot in slots:
            slot.close()
