"""Synchronous Python client for the gateway (``AsyncClient`` in ``async_client`` is its asyncio twin).

    from omnistream.app.client import Client
    with Client.connect() as client:            # the run directory of `omnistream up`
        for delta in client.ask("What is on screen?"):
            print(delta, end="", flush=True)

Requests go over a DEALER socket to the gateway's ROUTER; events (answer deltas, audio,
transcripts, clips, alerts, stats, errors) arrive on a SUB socket. The wire protocol is in
``docs/protocol.md``.

Gateway restarts: both sockets reconnect by themselves. The DEALER only queues on a live
connection (``ZMQ_IMMEDIATE``), so while the gateway is away frames and audio are dropped
(counted in ``frames_dropped`` / ``audio_dropped``) and requests are retried until their
timeout; status and history requests are also re-sent when a reply does not come (a request
lost with the old connection), since repeating them is harmless. An answer whose end the
restarted gateway could not relay fails with a ``ClientError`` after ``LOST_AFTER_S`` of silence
(never a hang).

A gateway served beyond loopback needs CURVE keys: ``keys_dir`` (default
``$OMNISTREAM_KEYS_DIR`` or ``~/.config/omnistream/keys``) with ``server.key`` and this client's
``client.key_secret`` (``omnistream keys``); ``Client.connect(endpoint="tcp://HOST:PORT")``
reaches a gateway on another machine.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zmq

from omnistream.app.client_core import (
    LOST_AFTER_S,
    AnswerTurn,
    ClientCore,
    ClientError,
    Request,
    default_keys_dir,
    gateway_addresses,
)
from omnistream.app.client_core import default_run_dir as default_run_dir  # re-exported
from omnistream.protocol.codec import ProtocolError
from omnistream.protocol.messages import History, Message, Stats, Status
from omnistream.protocol.security import SecurityError, load_client_keys, make_curve_client
from omnistream.protocol.sockets import Addresses, make_socket, recv, send

MAX_KEPT_EVENTS = 10_000


def client_sockets(
    ctx: zmq.Context, addresses: Addresses, keys_dir: Path | None = None, key_name: str = "client"
) -> tuple[zmq.Socket, zmq.Socket]:
    """The DEALER (requests) and SUB (every event) a client needs, connected (with CURVE when
    the gateway is served beyond loopback; raises ``ClientError`` if the keys are missing)."""
    keys = None
    if addresses.curve:
        try:
            keys = load_client_keys(Path(keys_dir or default_keys_dir()), key_name)
        except SecurityError as exc:
            raise ClientError(f"the gateway at {addresses.gateway} requires CURVE keys: {exc}") from None
    dealer = make_socket(ctx, zmq.DEALER, hwm=64, IMMEDIATE=1, RECONNECT_IVL=100, RECONNECT_IVL_MAX=1000)
    sub = make_socket(ctx, zmq.SUB, hwm=10000, RECONNECT_IVL=100, RECONNECT_IVL_MAX=1000)
    if keys is not None:
        make_curve_client(dealer, keys)
        make_curve_client(sub, keys)
    dealer.connect(addresses.gateway)
    sub.connect(addresses.gateway_pub)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    return dealer, sub


def _close_sockets(*sockets: zmq.Socket) -> None:
    for sock in sockets:
        sock.close(linger=0)


class Client(ClientCore):
    """Blocking client. Not thread-safe: use one per thread (or ``AsyncClient``)."""

    def __init__(
        self,
        addresses: Addresses,
        session: str = "default",
        timeout_s: float = 30.0,
        keys_dir: Path | None = None,
        key_name: str = "client",
    ):
        super().__init__(addresses, session, timeout_s)
        self.ctx: zmq.Context = zmq.Context.instance()
        self.dealer, self.sub = client_sockets(self.ctx, addresses, keys_dir, key_name)
        self._finalizer = weakref.finalize(self, _close_sockets, self.dealer, self.sub)
        self.events: deque[Message] = deque(maxlen=MAX_KEPT_EVENTS)

    @classmethod
    def connect(
        cls,
        run_dir: Path | None = None,
        session: str = "default",
        timeout_s: float = 30.0,
        *,
        endpoint: str | None = None,
        keys_dir: Path | None = None,
        key_name: str = "client",
    ) -> Client:
        """Connect to the system of ``run_dir`` (this machine), or to the gateway at ``endpoint``
        (``tcp://HOST:PORT``, another machine: CURVE keys from ``keys_dir``)."""
        addresses = gateway_addresses(run_dir, endpoint, keys_dir)
        client = cls(addresses, session=session, timeout_s=timeout_s, keys_dir=keys_dir, key_name=key_name)
        try:
            client.wait_connected()
        except ClientError:
            client.close()
            raise
        return client

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self._finalizer()

    # -- plumbing ------------------------------------------------------------------------------

    def _send_until(self, message: Message, deadline: float) -> None:
        """Send without blocking, retrying while there is no live connection (gateway away)."""
        while True:
            try:
                send(self.dealer, message, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise self._unreachable() from None
                time.sleep(0.05)

    def _request(self, request: Request) -> Message:
        self._send_until(request.message, request.deadline)
        request.sent()
        while request.remaining() > 0:
            if request.resend_due():
                self._send_until(request.message, request.deadline)
                request.sent()
            if not self.dealer.poll(100):
                continue
            try:
                _, reply = recv(self.dealer)
            except ProtocolError:
                continue
            if request.answered_by(reply):
                return request.result(reply)
        raise request.no_reply()

    def poll_events(self, timeout_s: float = 0.0) -> list[Message]:
        """Events received so far (waits up to ``timeout_s`` for the first)."""
        got = list(self.events)
        self.events.clear()
        if got or not self.sub.poll(int(timeout_s * 1000)):
            return got
        while True:
            try:
                _, message = recv(self.sub, flags=zmq.NOBLOCK)
            except zmq.Again:
                return got
            except ProtocolError:
                continue
            self._note_event(message)
            got.append(message)

    def subscribe(self, *types: type[Message], timeout_s: float | None = None) -> Iterator[Message]:
        """Yield events of ``types`` (all types if none) as they arrive, for ``timeout_s`` seconds
        (forever if None). Events of other types are discarded."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while deadline is None or time.monotonic() < deadline:
            wait = 0.1 if deadline is None else max(min(deadline - time.monotonic(), 0.1), 0.0)
            for event in self.poll_events(wait):
                if not types or isinstance(event, types):
                    yield event

    def wait_connected(self) -> Status:
        """Block until the gateway answers a status request and its event stream is flowing."""
        status = self.status()
        deadline = time.monotonic() + self.timeout_s
        kept: list[Message] = []
        try:
            while time.monotonic() < deadline:
                events = self.poll_events(0.2)
                kept += events
                if any(isinstance(e, Stats) for e in events):
                    return status
            raise ClientError("connected to the gateway but its event stream is silent")
        finally:
            self.events.extend(kept)

    # -- API ---------------------------------------------------------------------------------------

    def status(self) -> Status:
        """Latest ``Stats`` of every stage, as the gateway last saw them."""
        return self._status_reply(self._request(self._status_request()))

    def history(
        self,
        t0: float = 0.0,
        t1: float = 1e12,
        kinds: list[str] | None = None,
        limit: int = 500,
        newest: bool = False,
    ) -> History:
        """What memory recorded in this session over stream times [t0, t1] (clips and transcripts
        unless ``kinds`` says otherwise): the first ``limit`` records, or the last with ``newest``."""
        reply = self._request(self._history_request(t0, t1, kinds, limit, newest))
        assert isinstance(reply, History)
        return reply

    def push_frame(self, image: np.ndarray, ts: float, index: int = 0) -> bool:
        """Send one RGB uint8 (H, W, 3) frame; returns False if it was dropped (gateway busy or away)."""
        try:
            send(self.dealer, self._frame(image, ts, index), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.frames_dropped += 1
            return False

    def push_audio(self, pcm: np.ndarray, sample_rate: int, ts: float, channel: str = "user") -> bool:
        """Send mono PCM (float32 or int16 (N,)); returns False if dropped (gateway away)."""
        try:
            send(self.dealer, self._audio(pcm, sample_rate, ts, channel), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.audio_dropped += 1
            return False

    def send_ask(
        self,
        question: str,
        ts: float,
        choices: list[str] | None = None,
        speak: bool = True,
        mode: str = "full",
    ) -> str:
        """Send a question; returns its turn id once the gateway accepted it. ``mode`` other than
        "full" selects an evaluation baseline (see ``Ask``)."""
        request = self._ask_request(question, ts, choices, speak, mode)
        self._request(request)
        return request.request_id

    def watch(self, condition: str, ts: float = 0.0) -> str:
        """Register a standing question; ``Alert``s with the returned watch id arrive as events."""
        request = self._watch_request(condition, ts)
        self._request(request)
        return request.request_id

    def interrupt(self, turn: str = "", ts: float = 0.0) -> None:
        """Stop answering (and speaking) ``turn``, or whatever is being answered."""
        self._send_until(self._interrupt(turn, ts), time.monotonic() + self.timeout_s)

    def ask(
        self,
        question: str,
        ts: float = 0.0,
        choices: list[str] | None = None,
        speak: bool = False,
        timeout_s: float = 300.0,
    ) -> Iterator[str]:
        """Stream the answer's text deltas; ``self.last_done`` holds the ``AnswerDone``."""
        turn = self.send_ask(question, ts, choices, speak)
        answer = AnswerTurn(self, turn, timeout_s, LOST_AFTER_S)
        others: list[Message] = []
        try:
            while answer.remaining() > 0:
                answer.check_lost()
                for event in self.poll_events(0.1):
                    text = answer.take(event)
                    if answer.finished:
                        return
                    if text is None:
                        others.append(event)
                    else:
                        yield text
            raise answer.too_late()
        finally:
            self.events.extend(others)
