"""Synchronous Python client for the gateway.

    from omnistream.app.client import Client
    with Client.connect() as client:            # the run directory of `omnistream up`
        for delta in client.ask("What is on screen?"):
            print(delta, end="", flush=True)

Requests go over a DEALER socket to the gateway's ROUTER; events (answer deltas, audio,
transcripts, clips, stats, errors) arrive on a SUB socket. Frames are sent without blocking and
dropped when the gateway is slower than the source (counted in ``frames_dropped``).
"""

from __future__ import annotations

import os
import time
import uuid
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
    Interrupt,
    Message,
    Stats,
    Status,
    StatusRequest,
    VideoFrame,
)
from omnistream.protocol.sockets import Addresses, make_socket, recv, send


class ClientError(RuntimeError):
    pass


def default_run_dir() -> Path:
    env = os.environ.get("OMNISTREAM_RUN_DIR")
    return Path(env) if env else Path.home() / ".local" / "share" / "omnistream" / "run"


class Client:
    def __init__(self, addresses: Addresses, session: str = "default", timeout_s: float = 30.0):
        self.addresses = addresses
        self.session = session
        self.timeout_s = timeout_s
        self.ctx = zmq.Context.instance()
        self.dealer = make_socket(self.ctx, zmq.DEALER, hwm=64)
        self.dealer.connect(addresses.gateway)
        self.sub = make_socket(self.ctx, zmq.SUB, hwm=10000)
        self.sub.connect(addresses.gateway_pub)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.events: deque[Message] = deque()
        self.frames_dropped = 0
        self.last_done: AnswerDone | None = None

    @classmethod
    def connect(
        cls, run_dir: Path | None = None, session: str = "default", timeout_s: float = 30.0
    ) -> Client:
        client = cls(Addresses.load(run_dir or default_run_dir()), session=session, timeout_s=timeout_s)
        client.wait_connected()
        return client

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self.dealer.close(linger=0)
        self.sub.close(linger=0)

    # -- plumbing ------------------------------------------------------------------------------

    def _request(self, message: Message, expect: type[Message], request_id: str) -> Message:
        send(self.dealer, message)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if not self.dealer.poll(100):
                continue
            _, reply = recv(self.dealer)
            if isinstance(reply, Error) and reply.request_id in ("", request_id):
                raise ClientError(f"gateway refused {type(message).__name__}: [{reply.code}] {reply.message}")
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
            got.append(message)

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
        request_id = uuid.uuid4().hex
        reply = self._request(StatusRequest(request_id=request_id), Status, request_id)
        assert isinstance(reply, Status)
        return reply

    def push_frame(self, image: np.ndarray, ts: float, index: int = 0) -> bool:
        """Send one RGB uint8 (H, W, 3) frame; returns False if it was dropped (gateway busy)."""
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

    def push_audio(self, pcm: np.ndarray, sample_rate: int, ts: float, channel: str = "user") -> None:
        send(
            self.dealer,
            AudioChunk(ts=ts, session=self.session, pcm=pcm, sample_rate=sample_rate, channel=channel),
        )

    def send_ask(self, question: str, ts: float, choices: list[str] | None = None, speak: bool = True) -> str:
        """Send a question; returns its turn id once the gateway accepted it."""
        turn = uuid.uuid4().hex
        ask = Ask(
            ts=ts, session=self.session, turn=turn, question=question, choices=choices or [], speak=speak
        )
        self._request(ask, Ack, turn)
        return turn

    def interrupt(self, turn: str = "", ts: float = 0.0) -> None:
        send(self.dealer, Interrupt(ts=ts, session=self.session, turn=turn, reason="client"))

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
        try:
            while time.monotonic() < deadline:
                for event in self.poll_events(0.1):
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
