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

import os
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zmq

from omnistream.protocol.codec import ProtocolError
from omnistream.protocol.messages import (
    Ack,
    AnswerDelta,
    AnswerDone,
    Ask,
    AudioChunk,
    Error,
    History,
    HistoryRequest,
    Interrupt,
    Message,
    Stats,
    Status,
    StatusRequest,
    VideoFrame,
    Watch,
)
from omnistream.protocol.security import SecurityError, load_client_keys, make_curve_client
from omnistream.protocol.sockets import Addresses, make_socket, recv, send

RESEND_EVERY_S = 2.0
MAX_KEPT_EVENTS = 10_000
LOST_AFTER_S = 30.0  # after a gateway restart, silence on a turn for this long means it was lost


class ClientError(RuntimeError):
    """The gateway refused a request, did not answer in time, or an answer failed. ``code`` is
    the gateway's error code when it refused (``busy``: retry later), else ""."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


def default_run_dir() -> Path:
    env = os.environ.get("OMNISTREAM_RUN_DIR")
    return Path(env) if env else Path.home() / ".local" / "share" / "omnistream" / "run"


def default_keys_dir() -> Path:
    env = os.environ.get("OMNISTREAM_KEYS_DIR")
    return Path(env) if env else Path.home() / ".config" / "omnistream" / "keys"


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


def refusal(request: Message, error: Error) -> ClientError:
    return ClientError(
        f"gateway refused {type(request).__name__}: [{error.code}] {error.message}", error.code
    )


def history_request(
    session: str, t0: float, t1: float, kinds: list[str] | None, limit: int, newest: bool = False
) -> HistoryRequest:
    return HistoryRequest(
        session=session,
        request_id=uuid.uuid4().hex,
        t0=t0,
        t1=t1,
        kinds=list(kinds or []),  # type: ignore[arg-type]  # msgspec validates the kinds
        limit=limit,
        newest=newest,
    )


class Client:
    """Blocking client. Not thread-safe: use one per thread (or ``AsyncClient``)."""

    def __init__(
        self,
        addresses: Addresses,
        session: str = "default",
        timeout_s: float = 30.0,
        keys_dir: Path | None = None,
        key_name: str = "client",
    ):
        self.addresses = addresses
        self.session = session
        self.timeout_s = timeout_s
        self.ctx: zmq.Context = zmq.Context.instance()
        self.dealer, self.sub = client_sockets(self.ctx, addresses, keys_dir, key_name)
        self._finalizer = weakref.finalize(self, _close_sockets, self.dealer, self.sub)
        self.events: deque[Message] = deque(maxlen=MAX_KEPT_EVENTS)
        self.frames_dropped = 0
        self.audio_dropped = 0
        self.last_done: AnswerDone | None = None
        self.gateway_pid = 0  # from the gateway's Stats; a change means it restarted
        self.gateway_restarted_at = 0.0

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
        addresses = (
            Addresses.remote(endpoint, curve=keys_dir is not None or None)
            if endpoint
            else Addresses.load(run_dir or default_run_dir())
        )
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
                    raise ClientError(
                        f"gateway at {self.addresses.gateway} unreachable for {self.timeout_s:.0f} s"
                    ) from None
                time.sleep(0.05)

    def _request(self, message: Message, expect: type[Message], request_id: str, resend: bool) -> Message:
        deadline = time.monotonic() + self.timeout_s
        self._send_until(message, deadline)
        sent_at = time.monotonic()
        while time.monotonic() < deadline:
            if resend and time.monotonic() - sent_at > RESEND_EVERY_S:
                self._send_until(message, deadline)
                sent_at = time.monotonic()
            if not self.dealer.poll(100):
                continue
            try:
                _, reply = recv(self.dealer)
            except ProtocolError:
                continue
            if isinstance(reply, Error) and reply.request_id in ("", request_id):
                raise refusal(message, reply)
            if isinstance(reply, expect) and getattr(reply, "request_id", "") == request_id:
                return reply
        raise ClientError(f"no reply from the gateway within {self.timeout_s:.0f} s")

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
            if isinstance(message, Stats) and message.stage == "gateway":
                self._note_gateway_pid(message)
            got.append(message)

    def _note_gateway_pid(self, stats: Stats | None) -> None:
        if stats is None or stats.state != "running" or not stats.pid:
            return
        if self.gateway_pid and stats.pid != self.gateway_pid:
            self.gateway_restarted_at = time.monotonic()
        self.gateway_pid = stats.pid

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
        request_id = uuid.uuid4().hex
        reply = self._request(StatusRequest(request_id=request_id), Status, request_id, resend=True)
        assert isinstance(reply, Status)
        self._note_gateway_pid(reply.stages.get("gateway"))
        return reply

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
        request = history_request(self.session, t0, t1, kinds, limit, newest)
        reply = self._request(request, History, request.request_id, resend=True)
        assert isinstance(reply, History)
        return reply

    def push_frame(self, image: np.ndarray, ts: float, index: int = 0) -> bool:
        """Send one RGB uint8 (H, W, 3) frame; returns False if it was dropped (gateway busy or away)."""
        try:
            send(
                self.dealer,
                VideoFrame(ts=ts, session=self.session, image=image, index=index),
                flags=zmq.NOBLOCK,
            )
            return True
        except zmq.Again:
            self.frames_dropped += 1
            return False

    def push_audio(self, pcm: np.ndarray, sample_rate: int, ts: float, channel: str = "user") -> bool:
        """Send mono PCM (float32 or int16 (N,)); returns False if dropped (gateway away)."""
        chunk = AudioChunk(ts=ts, session=self.session, pcm=pcm, sample_rate=sample_rate, channel=channel)  # type: ignore[arg-type]
        try:
            send(self.dealer, chunk, flags=zmq.NOBLOCK)
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
        turn = uuid.uuid4().hex
        ask = Ask(
            ts=ts,
            session=self.session,
            turn=turn,
            question=question,
            choices=choices or [],
            speak=speak,
            mode=mode,
        )
        self._request(ask, Ack, turn, resend=False)
        return turn

    def watch(self, condition: str, ts: float = 0.0) -> str:
        """Register a standing question; ``Alert``s with the returned watch id arrive as events."""
        watch_id = uuid.uuid4().hex
        self._request(
            Watch(ts=ts, session=self.session, watch_id=watch_id, condition=condition),
            Ack,
            watch_id,
            resend=False,
        )
        return watch_id

    def interrupt(self, turn: str = "", ts: float = 0.0) -> None:
        """Stop answering (and speaking) ``turn``, or whatever is being answered."""
        self._send_until(
            Interrupt(ts=ts, session=self.session, turn=turn, reason="client"),
            time.monotonic() + self.timeout_s,
        )

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
        deadline = time.monotonic() + timeout_s
        others: list[Message] = []
        restarts_seen = self.gateway_restarted_at
        heard = time.monotonic()
        try:
            while time.monotonic() < deadline:
                if (
                    self.gateway_restarted_at != restarts_seen
                    and time.monotonic() - max(heard, self.gateway_restarted_at) > LOST_AFTER_S
                ):
                    raise ClientError(
                        f"the gateway restarted while answering and nothing more came for {LOST_AFTER_S:.0f} s; ask again"
                    )
                for event in self.poll_events(0.1):
                    if isinstance(event, AnswerDelta | AnswerDone) and event.turn == turn:
                        heard = time.monotonic()
                    if isinstance(event, AnswerDelta) and event.turn == turn:
                        yield event.text
                    elif isinstance(event, AnswerDone) and event.turn == turn:
                        self.last_done = event
                        if event.error:
                            raise ClientError(f"answer failed: {event.error}")
                        return
                    else:
                        others.append(event)
            raise ClientError(f"no complete answer within {timeout_s:.0f} s")
        finally:
            self.events.extend(others)
