"""Drive any stage in-process, as the runtime's loop does (protocol/runtime.py), without sockets.

``run_stage(stage, messages)`` hands the stage each message (``handle``), calls ``tick`` after
each delivery and while it says more work is ready, and returns what the stage emitted, in
order. A stage built to the contract takes an ``emit`` callable (and optionally a ``clock`` and
a ``waiting`` callable); the harness puts its own in their place while it runs and puts the
stage's back after.

- ``Ticks(n)`` among the messages: n turns of the loop before the next message arrives (a
  message that comes while a backlog is being worked through);
- ``Advance(s)``: the clock moves on ``s`` seconds;
- ``respond``: memory, in-process: called with each message emitted ``to=MEMORY``, it returns
  the replies (handed to the stage as ``MemoryReply`` on the next turn); none answer without it;
- ``until``: stop as soon as it returns True for what was emitted so far.

When the messages are all delivered the loop runs until the stage has been idle (``tick``
returned nothing ready) for ``settle_s`` of the fake clock, which moves ``idle_s`` per idle turn
(so requests that time out do, in a few hundred cheap turns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from omnistream.protocol.messages import Message
from omnistream.protocol.runtime import BUS, MemoryReply, To


class FakeClock:
    """A monotonic clock that moves only when told (``advance``) or by the harness when idle."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Ticks:
    n: int = 1


@dataclass(frozen=True)
class Advance:
    seconds: float


@dataclass
class Emitted:
    message: Message
    to: To


class StageRun(list):
    """What the stage emitted (messages, in order); ``sent`` has where each went, and ``ticks``
    how many turns of the loop had run when it was emitted."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[Emitted] = []
        self.ticks: list[int] = []

    def of(self, kind: type) -> list:
        return [m for m in self if isinstance(m, kind)]


def run_stage(
    stage,
    messages: Iterable[Message | Ticks | Advance] = (),
    clock: FakeClock | None = None,
    *,
    respond: Callable[[Message], Iterable[Message] | None] | None = None,
    until: Callable[[StageRun], bool] | None = None,
    settle_s: float = 30.0,
    idle_s: float = 0.05,
    max_turns: int = 200_000,
) -> StageRun:
    clock = clock or FakeClock()
    inputs = list(messages)
    out = StageRun()
    replies: list[MemoryReply] = []
    turns = 0

    def emit(message: Message, to: To = BUS) -> bool:
        out.append(message)
        out.sent.append(Emitted(message, to))
        out.ticks.append(turns)
        if to.channel == "memory" and respond is not None:
            replies.extend(MemoryReply(reply) for reply in respond(message) or ())
        return True

    def waiting() -> bool:
        return any(isinstance(m, Message) for m in inputs[:1])

    saved = {name: getattr(stage, name) for name in ("emit", "clock", "waiting") if hasattr(stage, name)}
    stage.emit = emit
    if "clock" in saved:
        stage.clock = clock
    if "waiting" in saved:
        stage.waiting = waiting
    try:
        idle_since = clock()
        while turns < max_turns:
            turns += 1
            delivered = False
            batch, replies[:] = list(replies), []
            for reply in batch:
                stage.handle(reply)
                delivered = True
            while inputs:  # what arrived by this turn: messages up to the next Ticks
                head = inputs[0]
                if isinstance(head, Ticks):
                    if head.n <= 0:
                        inputs.pop(0)
                        continue
                    inputs[0] = Ticks(head.n - 1)
                    break
                inputs.pop(0)
                if isinstance(head, Advance):
                    clock.advance(head.seconds)
                    continue
                stage.handle(head)
                delivered = True
            tick = getattr(stage, "tick", None)
            busy = bool(tick()) if tick is not None else False
            if until is not None and until(out):
                break
            if busy or delivered or replies or inputs:
                idle_since = clock()
                continue
            clock.advance(idle_s)
            if clock() - idle_since >= settle_s:
                break
    finally:
        for name, value in saved.items():
            setattr(stage, name, value)
    return out
