"""The loop every stage process runs: bus sockets, READY, stats, priority dispatch, shutdown.

A stage is an object with ``handle(message)`` (and optionally ``tick()``, ``close()``); the
runtime owns the sockets and calls it from one thread. System messages (``Interrupt``,
``UserSpeech``, ``Shutdown``) are dispatched before data received in the same poll. Media
topics arrive on their own SUB socket with a small high-water mark and only the newest
message per topic is kept, so a slow stage drops frames instead of growing a queue. An
``Ask`` still waiting when an ``Interrupt`` for its turn arrives is dropped.

Stopping (SIGTERM or a ``Shutdown``) loses nothing already received: the stage stops taking
requests on its extra sockets, goes on handling what the bus brought (every message of the batch
in hand, then what is still queued, until the sockets have been quiet for ``DRAIN_QUIET_S`` or
``launcher.drain_s`` passed), calls ``stop()`` (a final flush) and gives its last messages up to
``FLUSH_LINGER_S`` to leave before the process exits. The launcher stops the stages in the order
data flows through them, so each one drains what the previous one flushed.

The stage contract: a stage is a class built from its configuration and an ``emit`` callable
(``emit(message, to=BUS)``: the bus, memory's ROUTER, the gateway's clients), with
``handle(message)``, ``tick()`` and ``close()``, and no sockets. Long work (a prefill over a
backlog, an answer's decode) is a state machine the stage advances one bounded step per
``tick``, which returns True while more work is ready: the loop then polls without waiting and
hands the stage what arrived before its next step, never from inside a handler. A request to
memory is emitted ``to=MEMORY`` (``connect_memory``); its reply comes back to ``handle`` as a
``MemoryReply``, like any message. tests/harness.py drives any stage the same way in-process.

Heartbeat: ``Stats`` go out every ``launcher.stats_every_s`` from the loop and from every
``poll``, which the launcher watches for hung stages.

Bounds and failures: one ``poll`` takes at most ``bus.poll_max_messages`` messages and
``bus.poll_max_bytes`` bytes (at least one message) from each socket; the rest stay queued in the
socket, ``bus.hwm`` messages deep (media: ``bus.frame_hwm``), for the next one. A handler that raises, whether
``stage.handle`` or an extra socket's reader (a ROUTER serving requests), is logged with what it
was handling, counted in ``handler_errors`` and answered with an ``Error`` ``stage_error`` on the
bus; the stage keeps running.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import zmq

from omnistream.protocol.codec import ProtocolError, decode
from omnistream.protocol.config import Config, read_config
from omnistream.protocol.logs import setup_logging
from omnistream.protocol.messages import (
    SYSTEM_TYPES,
    Ask,
    Error,
    Interrupt,
    Message,
    Ready,
    Shutdown,
    Stats,
)
from omnistream.protocol.routes import media_topics
from omnistream.protocol.sockets import Addresses, make_socket, read_bounded, send

log = logging.getLogger("omnistream.runtime")

MEDIA_TOPICS = media_topics()
MAX_CANCELLED = 1000
DRAIN_QUIET_S = 0.3  # stopping: this long without a message, and what was sent before is in
FLUSH_LINGER_S = 2.0  # stopping: the most the last messages (a final clip) may take to leave


@dataclass(frozen=True)
class To:
    """Where an emitted message goes: ``BUS`` (the bus, or the media bus for media topics),
    ``MEMORY`` (memory's ROUTER: a request whose reply comes back as a ``MemoryReply``),
    ``CLIENTS`` (the gateway's PUB to every client) or ``client(identity)`` (one peer's DEALER,
    through the stage's own ROUTER: a client of the gateway, a stage asking memory)."""

    channel: str
    identity: bytes = b""


BUS, MEMORY, CLIENTS = To("bus"), To("memory"), To("clients")


def client(identity: bytes) -> To:
    return To("client", identity)


@dataclass(frozen=True)
class MemoryReply:
    """A reply from memory's ROUTER to a request the stage emitted ``to=MEMORY`` (kept apart
    from the bus's messages of the same types)."""

    message: Message

    @property
    def session(self) -> str:
        return getattr(self.message, "session", "default")


Emit = Callable[..., bool]  # emit(message, to=BUS) -> whether it was handed to its socket


class Stage(Protocol):
    name: str

    def handle(self, message: Message) -> None: ...


class Runtime:
    """Bus connection and main loop for one stage process."""

    def __init__(self, name: str, run_dir: Path, config: Config | None = None):
        setup_logging("INFO")
        os.umask(0o077)  # whatever a stage writes (session data, spilled KV, logs) is owner-only
        self.name = name
        self.run_dir = Path(run_dir)
        self.config = config or read_config(self.run_dir / "config.json")
        self.addresses = Addresses.load(self.run_dir)
        if self.config.kernels.backend != "auto":
            from omnistream.kernels import ops

            ops.set_backend(self.config.kernels.backend)
        self.ctx = zmq.Context.instance()
        # What the stage sends goes through a context of its own, so that stopping can wait for
        # its last messages (terminating that context) without touching anyone else's sockets.
        self._out_ctx = zmq.Context()
        limit = self.config.bus.max_message_bytes
        self.pub = make_socket(self._out_ctx, zmq.PUB, hwm=self.config.bus.hwm, max_message_bytes=limit)
        self.pub.connect(self.addresses.bus_in)
        self.media_pub = make_socket(
            self._out_ctx, zmq.PUB, hwm=self.config.bus.frame_hwm, max_message_bytes=limit
        )
        self.media_pub.connect(self.addresses.media_in)
        self.sub = make_socket(self.ctx, zmq.SUB, hwm=self.config.bus.hwm, max_message_bytes=limit)
        self.sub.connect(self.addresses.bus_out)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"Shutdown")
        self.media_sub: zmq.Socket | None = None
        self.control = make_socket(self._out_ctx, zmq.PUSH, hwm=100)
        self.control.connect(self.addresses.control)
        self.poller = zmq.Poller()
        self.poller.register(self.sub, zmq.POLLIN)
        self.extra: dict[zmq.Socket, Callable[[zmq.Socket], None]] = {}
        self.memory: zmq.Socket | None = None  # connect_memory
        # Channels beyond the bus and memory (the gateway's client sockets): channel -> sender
        self.outlets: dict[str, Callable[[Message, To], bool]] = {}
        self.counters: dict[str, float] = defaultdict(float)
        self.running = True
        self.draining = False
        self._last_stats = 0.0
        self._last_counters: dict[str, float] = {}
        self._pending: list[Message] = []
        self._cancelled: OrderedDict[tuple[str, str], None] = OrderedDict()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.running = False

    # -- wiring ------------------------------------------------------------------------------

    def subscribe(self, *types: type[Message]) -> None:
        for message_type in types:
            topic = message_type.__name__.encode()
            if topic in MEDIA_TOPICS:
                if self.media_sub is None:
                    self.media_sub = make_socket(
                        self.ctx,
                        zmq.SUB,
                        hwm=self.config.bus.frame_hwm,
                        max_message_bytes=self.config.bus.max_message_bytes,
                    )
                    self.media_sub.connect(self.addresses.media_out)
                    self.poller.register(self.media_sub, zmq.POLLIN)
                self.media_sub.setsockopt(zmq.SUBSCRIBE, topic)
            else:
                self.sub.setsockopt(zmq.SUBSCRIBE, topic)

    def add_socket(self, sock: zmq.Socket, on_readable: Callable[[zmq.Socket], None]) -> None:
        self.poller.register(sock, zmq.POLLIN)
        self.extra[sock] = on_readable

    def publish(self, message: Message) -> None:
        sock = self.media_pub if type(message).__name__.encode() in MEDIA_TOPICS else self.pub
        try:
            send(sock, message, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.counters["dropped_out"] += 1

    def connect_memory(self) -> None:
        """A DEALER to memory's ROUTER: what the stage emits ``to=MEMORY`` goes there, and the
        replies come back to the stage as ``MemoryReply`` (handled like any message)."""
        self.memory = make_socket(
            self.ctx, zmq.DEALER, hwm=1000, max_message_bytes=self.config.bus.max_message_bytes
        )
        self.memory.connect(self.addresses.memory)
        self.poller.register(self.memory, zmq.POLLIN)

    def emit(self, message: Message, to: To = BUS) -> bool:
        """Send what a stage emits where ``to`` says; False when it could not be handed to its
        socket (a full queue: counted in ``dropped_out``)."""
        if to.channel == "bus":
            before = self.counters.get("dropped_out", 0.0)
            self.publish(message)
            return self.counters.get("dropped_out", 0.0) == before
        if to.channel == "memory":
            if self.memory is None:
                raise RuntimeError(f"{self.name}: emit to memory without connect_memory()")
            try:
                send(self.memory, message, flags=zmq.NOBLOCK)
            except zmq.Again:
                self.counters["memory_busy"] += 1
                return False
            return True
        outlet = self.outlets.get(to.channel)
        if outlet is None:
            raise RuntimeError(f"{self.name}: nothing sends on channel {to.channel!r}")
        return outlet(message, to)

    def ready(self) -> None:
        send(self.control, Ready(stage=self.name, pid=os.getpid()))
        log.info("ready", extra={"stage": self.name})

    # -- receiving ---------------------------------------------------------------------------

    def _drain(self, sock: zmq.Socket, latest_only: bool) -> list[Message]:
        """At most ``bus.poll_max_messages`` messages and ``bus.poll_max_bytes`` bytes (at least
        one message) from ``sock`` (``read_bounded``); the rest wait in the socket."""
        got: dict[str, Message] = {}
        ordered: list[Message] = []

        def take(frames: list[zmq.Frame]) -> None:
            try:
                message = decode(frames)
            except ProtocolError as exc:
                self.counters["rejected"] += 1
                self.publish(Error(code=exc.code, message=f"{self.name}: {exc}"))
                return
            if latest_only:
                if type(message).__name__ in got:
                    self.counters["dropped_in"] += 1
                got[type(message).__name__] = message
            else:
                ordered.append(message)

        bus = self.config.bus
        if read_bounded(sock, take, bus.poll_max_messages, bus.poll_max_bytes):
            self.counters["poll_byte_limit"] += 1
        return ordered + list(got.values())

    def poll(self, timeout_s: float = 0.0) -> list[Message | MemoryReply]:
        """Receive what is waiting (system messages first). Runs extra sockets' handlers."""
        events = dict(self.poller.poll(int(timeout_s * 1000)))
        messages: list[Message] = []
        if self.sub in events:
            messages += self._drain(self.sub, latest_only=False)
        if self.media_sub is not None and self.media_sub in events:
            messages += self._drain(self.media_sub, latest_only=True)
        replies: list[MemoryReply] = []
        if self.memory is not None and self.memory in events:
            replies = [MemoryReply(m) for m in self._drain(self.memory, latest_only=False)]
        for sock, on_readable in self.extra.items():
            if sock in events and not self.draining:
                try:
                    on_readable(sock)
                except Exception as exc:  # a bad request must not kill the stage
                    self.handler_failed(getattr(on_readable, "__qualname__", "socket reader"), exc)
        interrupted = False
        for message in messages:
            if isinstance(message, Shutdown):
                self.running = False
            elif isinstance(message, Interrupt) and message.turn:
                interrupted = True
                self._cancelled[(message.session, message.turn)] = None
                while len(self._cancelled) > MAX_CANCELLED:
                    self._cancelled.popitem(last=False)
        messages.sort(key=lambda m: not isinstance(m, SYSTEM_TYPES))
        self._pending += messages
        self._pending += replies
        if interrupted:
            kept = [m for m in self._pending if not self.cancelled(m)]
            self.counters["asks_cancelled"] += len(self._pending) - len(kept)
            self._pending = kept
        self.maybe_publish_stats()
        return [*messages, *replies]

    def handler_failed(self, what: str, exc: Exception, session: str = "default") -> None:
        """A handler raised while handling ``what`` (a message type or a socket reader): log it,
        count it (``handler_errors``) and say so on the bus (``Error`` ``stage_error``)."""
        log.error(
            "handler failed on %s: %s: %s",
            what,
            type(exc).__name__,
            exc,
            exc_info=exc,
            extra={"stage": self.name, "handling": what},
        )
        self.counters["handler_errors"] += 1
        self.publish(
            Error(
                code="stage_error",
                message=f"{self.name}: {what}: {type(exc).__name__}: {str(exc)[:500]}",
                session=session,
            )
        )

    def cancelled(self, message: Message) -> bool:
        """An ``Ask`` interrupted before it was handled (its client gave up, or the gateway ended
        it): dropped, so a stage never works through a backlog of stale questions."""
        return isinstance(message, Ask) and (message.session, message.turn) in self._cancelled

    def take_pending(self) -> list[Message]:
        pending, self._pending = self._pending, []
        return pending

    def waiting(self, *types: type[Message]) -> bool:
        """Whether a message of ``types`` (or a shutdown) has arrived and waits to be handled:
        what is waiting is received into the queue, no handler runs. For work a stage cannot
        cut into steps (a synopsis), to give way to a question."""
        self.poll(0)
        return not self.running or any(isinstance(m, types) for m in self._pending)

    # -- stats and loop ----------------------------------------------------------------------

    def stats_message(self, state: str = "running") -> Stats:
        now = time.monotonic()
        elapsed = max(now - self._last_stats, 1e-6) if self._last_stats else 0.0
        rates = {
            key: (value - self._last_counters.get(key, 0.0)) / elapsed
            for key, value in self.counters.items()
            if elapsed
        }
        self._last_stats, self._last_counters = now, dict(self.counters)
        return Stats(stage=self.name, pid=os.getpid(), counters=dict(self.counters), rates=rates, state=state)

    def maybe_publish_stats(self) -> None:
        if time.monotonic() - self._last_stats >= self.config.launcher.stats_every_s:
            self.publish(self.stats_message())

    def _handle_pending(self, stage: Stage, deadline: float | None = None) -> None:
        """Hand every message taken so far to ``stage.handle`` (all of them: a ``Shutdown`` in
        the batch ends the loop after them, not before); with ``deadline``, what is left when it
        passes is dropped and counted (``dropped_at_stop``)."""
        pending = self.take_pending()
        for index, message in enumerate(pending):
            if deadline is not None and time.monotonic() > deadline:
                self.counters["dropped_at_stop"] += len(pending) - index
                log.warning("stopping: %d messages left unhandled", len(pending) - index)
                return
            if self.cancelled(message):  # interrupted while it waited in this batch
                self.counters["asks_cancelled"] += 1
                continue
            try:
                stage.handle(message)
            except ProtocolError as exc:
                self.publish(Error(code=exc.code, message=f"{self.name}: {exc}", session=message.session))
            except Exception as exc:  # a bad message must not kill the stage
                self.handler_failed(type(message).__name__, exc, session=message.session)

    def run(self, stage: Stage, tick: Callable[[], bool | None] | None = None, poll_s: float = 0.05) -> None:
        """Dispatch messages to ``stage.handle`` until SIGTERM or a ``Shutdown``, calling ``tick``
        after each batch (while it returns True, more work is ready: the next poll does not
        wait); then drain (``drain``), call ``stage.close()`` (or ``stop()``) while the sockets
        are still open, and close them, leaving the last messages time to go out."""
        self.ready()
        busy = False
        while self.running:
            self.poll(0 if busy else poll_s)
            self._handle_pending(stage)
            busy = bool(tick()) if tick is not None else False
            self.maybe_publish_stats()
        self.drain(stage, tick, poll_s)
        stop = getattr(stage, "close", None) or getattr(stage, "stop", None)
        if stop is not None:
            stop()
        self.publish(self.stats_message(state="stopped"))
        self.close(linger_s=FLUSH_LINGER_S)

    def drain(
        self, stage: Stage, tick: Callable[[], bool | None] | None = None, poll_s: float = 0.05
    ) -> None:
        """Stopping: no more requests from the extra sockets; handle what the bus brought (and
        ``tick``, so queued work such as frames already taken gets done) until nothing arrived
        for ``DRAIN_QUIET_S``, at most ``launcher.drain_s``."""
        self.draining = True
        for sock in self.extra:
            self.poller.unregister(sock)
        start = time.monotonic()
        deadline = start + max(self.config.launcher.drain_s, 0.0)
        quiet_since = start
        while True:
            self._handle_pending(stage, deadline)
            if tick is not None:
                try:
                    tick()
                except Exception as exc:  # the final flush still happens
                    self.handler_failed("tick", exc)
                    break
            self.maybe_publish_stats()
            now = time.monotonic()
            if now >= deadline or now - quiet_since >= DRAIN_QUIET_S:
                break
            if self.poll(min(poll_s, DRAIN_QUIET_S / 3)):
                quiet_since = time.monotonic()
        log.info(
            "drained",
            extra={"stage": self.name, "drain_s": round(time.monotonic() - start, 3)},
        )

    def close(self, linger_s: float = 0.0) -> None:
        """Close every socket; with ``linger_s``, wait up to that long for what was published
        last (the final flush, the stopped ``Stats``) to be delivered to the bus."""
        outgoing: Iterable[zmq.Socket | None] = (self.pub, self.media_pub, self.control)
        incoming: Iterable[zmq.Socket | None] = (self.sub, self.media_sub, self.memory, *self.extra)
        for sock in incoming:
            if sock is not None:
                sock.close(linger=0)
        for sock in outgoing:
            if sock is not None:
                sock.close(linger=int(linger_s * 1000))
        # Terminating the outgoing context returns once what was sent is delivered (or the
        # linger is up); bounded twice over, it runs aside.
        flusher = threading.Thread(target=self._out_ctx.term, name="flush", daemon=True)
        flusher.start()
        flusher.join(linger_s + 0.5)
