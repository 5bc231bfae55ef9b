"""asyncio client for the gateway: the same operations as ``Client``, awaitable.

    from omnistream.app.async_client import AsyncClient
    async with await AsyncClient.connect() as client:
        async for delta in client.ask("What is on screen?"):
            print(delta, end="", flush=True)

One background task reads the SUB socket and fans every event out to the queues of whoever
listens (each ``ask`` and each ``subscribe``), so several questions can stream at once; another
reads the DEALER and resolves the future of the request each reply names. Reconnection after a
gateway restart behaves as in ``Client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import zmq
import zmq.asyncio

from omnistream.app.client import _close_sockets, client_sockets
from omnistream.app.client_core import (
    LOST_AFTER_S,
    AnswerTurn,
    ClientCore,
    ClientError,
    Request,
    gateway_addresses,
    reply_owner,
)
from omnistream.protocol.codec import ProtocolError, decode, encode
from omnistream.protocol.messages import History, Message, Stats, Status
from omnistream.protocol.sockets import Addresses

LISTENER_QUEUE = 10_000


class AsyncClient(ClientCore):
    """Awaitable client; create it inside a running event loop (``await AsyncClient.connect()``)."""

    def __init__(
        self,
        addresses: Addresses,
        session: str = "default",
        timeout_s: float = 30.0,
        keys_dir: Path | None = None,
        key_name: str = "client",
    ):
        super().__init__(addresses, session, timeout_s)
        self.ctx = zmq.asyncio.Context.instance()
        self.dealer, self.sub = client_sockets(self.ctx, addresses, keys_dir, key_name)
        self._finalizer = weakref.finalize(self, _close_sockets, self.dealer, self.sub)
        self._waiting: dict[str, asyncio.Future[Message]] = {}
        self._listeners: set[asyncio.Queue[Message]] = set()
        self._tasks = [
            asyncio.get_running_loop().create_task(self._read_events()),
            asyncio.get_running_loop().create_task(self._read_replies()),
        ]

    @classmethod
    async def connect(
        cls,
        run_dir: Path | None = None,
        session: str = "default",
        timeout_s: float = 30.0,
        *,
        endpoint: str | None = None,
        keys_dir: Path | None = None,
        key_name: str = "client",
    ) -> AsyncClient:
        addresses = gateway_addresses(run_dir, endpoint, keys_dir)
        client = cls(addresses, session=session, timeout_s=timeout_s, keys_dir=keys_dir, key_name=key_name)
        try:
            await client.wait_connected()
        except ClientError:
            await client.close()
            raise
        return client

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._finalizer()

    # -- background readers --------------------------------------------------------------------

    async def _read_events(self) -> None:
        while True:
            try:
                event = await self._recv(self.sub)
            except ProtocolError:
                continue
            self._note_event(event)
            for queue in self._listeners:
                if queue.full():  # a listener that stopped reading loses its oldest event
                    queue.get_nowait()
                queue.put_nowait(event)

    async def _read_replies(self) -> None:
        while True:
            try:
                reply = await self._recv(self.dealer)
            except ProtocolError:
                continue
            owner = reply_owner(reply, self._waiting)
            future = None if owner is None else self._waiting[owner]
            if future is not None and not future.done():
                future.set_result(reply)

    @staticmethod
    async def _recv(sock: zmq.asyncio.Socket) -> Message:
        return decode(await sock.recv_multipart(copy=False))

    # -- plumbing ------------------------------------------------------------------------------

    async def _send_until(self, message: Message, deadline: float) -> None:
        while True:
            try:
                self._send_now(message)
                return
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise self._unreachable() from None
                await asyncio.sleep(0.05)

    async def _request(self, request: Request) -> Message:
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[request.request_id] = future
        try:
            await self._send_until(request.message, request.deadline)
            while True:
                if request.remaining() <= 0:
                    raise request.no_reply()
                done, _ = await asyncio.wait({future}, timeout=request.next_wait())
                if done:
                    break
                await self._send_until(request.message, request.deadline)
        finally:
            self._waiting.pop(request.request_id, None)
        return request.result(future.result())

    def _send_now(self, message: Message) -> None:
        """Send without waiting; raises ``zmq.Again`` when there is no live connection. (The asyncio
        socket reports a non-blocking failure in the returned, already finished future.)"""
        future = self.dealer.send_multipart(encode(message), flags=zmq.NOBLOCK, copy=False)
        error = future.exception()
        if error is not None:
            raise error

    def _listen(self) -> asyncio.Queue[Message]:
        queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=LISTENER_QUEUE)
        self._listeners.add(queue)
        return queue

    async def subscribe(
        self, *types: type[Message], timeout_s: float | None = None
    ) -> AsyncIterator[Message]:
        """Yield events of ``types`` (all if none) as they arrive, for ``timeout_s`` (None: forever)."""
        queue = self._listen()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    event = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    return
                if not types or isinstance(event, types):
                    yield event
        finally:
            self._listeners.discard(queue)

    async def wait_connected(self) -> Status:
        """Return once the gateway answers a status request and its event stream is flowing."""
        queue = self._listen()
        try:
            status = await self.status()
            deadline = time.monotonic() + self.timeout_s
            while time.monotonic() < deadline:
                try:
                    event = await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0.01))
                except TimeoutError:
                    break
                if isinstance(event, Stats):
                    return status
            raise ClientError("connected to the gateway but its event stream is silent")
        finally:
            self._listeners.discard(queue)

    # -- API ---------------------------------------------------------------------------------------

    async def status(self) -> Status:
        return self._status_reply(await self._request(self._status_request()))

    async def history(
        self,
        t0: float = 0.0,
        t1: float = 1e12,
        kinds: list[str] | None = None,
        limit: int = 500,
        newest: bool = False,
    ) -> History:
        """What memory recorded in this session over stream times [t0, t1] (clips and transcripts
        unless ``kinds`` says otherwise): the first ``limit`` records, or the last with ``newest``."""
        reply = await self._request(self._history_request(t0, t1, kinds, limit, newest))
        assert isinstance(reply, History)
        return reply

    def push_frame(self, image: np.ndarray, ts: float, index: int = 0) -> bool:
        """Send one RGB uint8 (H, W, 3) frame without waiting; False if dropped."""
        try:
            self._send_now(self._frame(image, ts, index))
            return True
        except zmq.Again:
            self.frames_dropped += 1
            return False

    def push_audio(self, pcm: np.ndarray, sample_rate: int, ts: float, channel: str = "user") -> bool:
        """Send mono PCM (float32 or int16 (N,)) without waiting; False if dropped."""
        try:
            self._send_now(self._audio(pcm, sample_rate, ts, channel))
            return True
        except zmq.Again:
            self.audio_dropped += 1
            return False

    async def send_ask(
        self, question: str, ts: float, choices: list[str] | None = None, speak: bool = True
    ) -> str:
        request = self._ask_request(question, ts, choices, speak)
        await self._request(request)
        return request.request_id

    async def watch(self, condition: str, ts: float = 0.0) -> str:
        """Register a standing question; its ``Alert``s (same watch id) arrive as events."""
        request = self._watch_request(condition, ts)
        await self._request(request)
        return request.request_id

    async def interrupt(self, turn: str = "", ts: float = 0.0) -> None:
        await self._send_until(self._interrupt(turn, ts), time.monotonic() + self.timeout_s)

    async def ask(
        self,
        question: str,
        ts: float = 0.0,
        choices: list[str] | None = None,
        speak: bool = False,
        timeout_s: float = 300.0,
    ) -> AsyncIterator[str]:
        """Yield the answer's text deltas as they stream; ``self.last_done`` holds the ``AnswerDone``."""
        queue = self._listen()  # listen before asking: the first delta may come at once
        try:
            turn = await self.send_ask(question, ts, choices, speak)
            answer = AnswerTurn(self, turn, timeout_s, LOST_AFTER_S)
            while True:
                answer.check_lost()
                try:
                    event = await asyncio.wait_for(queue.get(), max(min(answer.remaining(), 1.0), 0.0))
                except TimeoutError:
                    if answer.remaining() > 0:
                        continue
                    raise answer.too_late() from None
                text = answer.take(event)
                if answer.finished:
                    return
                if text is not None:
                    yield text
        finally:
            self._listeners.discard(queue)
