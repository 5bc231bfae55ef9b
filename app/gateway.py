"""Gateway process: the one door for clients.

Clients send requests to a ROUTER (``Ask``, ``VideoFrame``, ``AudioChunk``, ``Interrupt``,
``Watch``, ``StatusRequest``, ``HistoryRequest``) and subscribe to a PUB that re-publishes what
they need from the bus (answers, audio, transcripts, clips, alerts, stats, errors). ``Ask`` and
``Watch`` are acknowledged with an ``Ack``; a ``HistoryRequest`` is forwarded to memory's ROUTER
and its ``History`` relayed back (an ``Error`` with code ``unavailable`` if memory does not answer
in time). A malformed request is answered with an ``Error`` naming the problem and the gateway
keeps serving.
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from pathlib import Path

import msgspec
import zmq

from omnistream.protocol.codec import ProtocolError, decode
from omnistream.protocol.messages import (
    Ack,
    Alert,
    AnswerDelta,
    AnswerDone,
    Ask,
    AudioChunk,
    AudioOut,
    Clip,
    Error,
    History,
    HistoryRequest,
    Interrupt,
    Message,
    Stats,
    Status,
    StatusRequest,
    Transcript,
    UserSpeech,
    VideoFrame,
    Watch,
)
from omnistream.protocol.runtime import Runtime
from omnistream.protocol.sockets import make_socket, recv, send

log = logging.getLogger("omnistream.gateway")

CLIENT_REQUESTS = (Ask, VideoFrame, AudioChunk, Interrupt, Watch, StatusRequest, HistoryRequest)
FORWARDED_TO_CLIENTS = (
    AnswerDelta,
    AnswerDone,
    AudioOut,
    Alert,
    Transcript,
    Clip,
    Stats,
    Error,
    UserSpeech,
    Interrupt,
)
MAX_QUESTION_CHARS = 2000
MAX_HISTORY_ITEMS = 5000
HISTORY_TIMEOUT_S = 10.0


class GatewayStage:
    name = "gateway"

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        limit = runtime.config.bus.max_message_bytes
        self.router = make_socket(runtime.ctx, zmq.ROUTER, hwm=1000, max_message_bytes=limit)
        self.router.bind(runtime.addresses.gateway)
        self.client_pub = make_socket(runtime.ctx, zmq.PUB, hwm=10000, max_message_bytes=limit)
        self.client_pub.bind(runtime.addresses.gateway_pub)
        self.stats: dict[str, Stats] = {}
        self.memory = make_socket(runtime.ctx, zmq.DEALER, hwm=1000, max_message_bytes=limit)
        self.memory.connect(runtime.addresses.memory)
        # gateway-side id -> (client identity, client's request_id, deadline)
        self.history_pending: dict[str, tuple[bytes, str, float]] = {}
        runtime.add_socket(self.router, self.on_client)
        runtime.add_socket(self.memory, self.on_memory)
        runtime.subscribe(*FORWARDED_TO_CLIENTS)

    def handle(self, message: Message) -> None:
        if isinstance(message, Stats):
            self.stats[message.stage] = message
        try:
            send(self.client_pub, message, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.runtime.counters["client_dropped"] += 1

    def on_client(self, sock: zmq.Socket) -> None:
        counters = self.runtime.counters
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = frames[0].bytes
            try:
                message = decode(frames[1:], max_message_bytes=self.runtime.config.bus.max_message_bytes)
            except ProtocolError as exc:
                counters["rejected"] += 1
                send(sock, exc.to_error(), prefix=[identity])
                continue
            if isinstance(message, HistoryRequest):
                reply = self.forward_history(identity, message)
            else:
                reply = self.on_request(message)
            if reply is not None:
                send(sock, reply, prefix=[identity])

    def on_request(self, message: Message) -> Message | None:
        counters = self.runtime.counters
        if not isinstance(message, CLIENT_REQUESTS):
            counters["rejected"] += 1
            return Error(code="unsupported", message=f"clients may not send {type(message).__name__}")
        if isinstance(message, StatusRequest):
            self.stats["gateway"] = self.runtime.stats_message()
            return Status(request_id=message.request_id, stages=dict(self.stats))
        if isinstance(message, Ask) and not 0 < len(message.question.strip()) <= MAX_QUESTION_CHARS:
            counters["rejected"] += 1
            return Error(
                code="invalid",
                message=f"Ask.question must have 1..{MAX_QUESTION_CHARS} characters, got {len(message.question)}",
                request_id=message.turn,
            )
        counters[f"in_{type(message).__name__}"] += 1
        self.runtime.publish(message)
        if isinstance(message, Ask):
            return Ack(ts=message.ts, session=message.session, request_id=message.turn)
        if isinstance(message, Watch):
            return Ack(ts=message.ts, session=message.session, request_id=message.watch_id)
        return None

    def forward_history(self, identity: bytes, request: HistoryRequest) -> Message | None:
        """Send ``request`` on to memory under a gateway-side id; the reply comes in ``on_memory``."""
        if not (request.t0 <= request.t1 and 0 < request.limit <= MAX_HISTORY_ITEMS):
            self.runtime.counters["rejected"] += 1
            return Error(
                code="invalid",
                message=f"HistoryRequest needs t0 <= t1 and 1 <= limit <= {MAX_HISTORY_ITEMS}, "
                f"got t0={request.t0}, t1={request.t1}, limit={request.limit}",
                request_id=request.request_id,
            )
        forward_id = uuid.uuid4().hex
        self.history_pending[forward_id] = (
            identity,
            request.request_id,
            time.monotonic() + HISTORY_TIMEOUT_S,
        )
        self.runtime.counters["in_HistoryRequest"] += 1
        send(self.memory, msgspec.structs.replace(request, request_id=forward_id))
        return None

    def on_memory(self, sock: zmq.Socket) -> None:
        while True:
            try:
                _, reply = recv(sock, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except ProtocolError as exc:
                log.warning("bad reply from memory: %s", exc)
                continue
            if not isinstance(reply, History | Error):
                continue
            pending = self.history_pending.pop(reply.request_id, None)
            if pending is None:  # answered after its deadline
                continue
            identity, client_request_id, _ = pending
            send(self.router, msgspec.structs.replace(reply, request_id=client_request_id), prefix=[identity])

    def tick(self) -> None:
        """Tell clients whose history request memory left unanswered (memory down or restarting)."""
        now = time.monotonic()
        for forward_id, (identity, client_request_id, deadline) in list(self.history_pending.items()):
            if now >= deadline:
                del self.history_pending[forward_id]
                error = Error(
                    code="unavailable",
                    message=f"memory did not answer the history request within {HISTORY_TIMEOUT_S:.0f} s",
                    request_id=client_request_id,
                )
                send(self.router, error, prefix=[identity])

    def stop(self) -> None:
        self.router.close(linger=0)
        self.client_pub.close(linger=0)
        self.memory.close(linger=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnistream-gateway")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    runtime = Runtime("gateway", args.run_dir)
    stage = GatewayStage(runtime)
    runtime.run(stage, tick=stage.tick)


if __name__ == "__main__":
    main()
