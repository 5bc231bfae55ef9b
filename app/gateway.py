"""Gateway process: the one door for clients.

Clients send requests to a ROUTER (``Ask``, ``VideoFrame``, ``AudioChunk``, ``Interrupt``,
``Watch``, ``StatusRequest``) and subscribe to a PUB that re-publishes what they need from the
bus (answers, audio, transcripts, clips, alerts, stats, errors). A malformed request is answered
with an ``Error`` naming the problem and the gateway keeps serving.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

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
from omnistream.protocol.sockets import make_socket, send

log = logging.getLogger("omnistream.gateway")

CLIENT_REQUESTS = (Ask, VideoFrame, AudioChunk, Interrupt, Watch, StatusRequest)
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
        runtime.add_socket(self.router, self.on_client)
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
        return None

    def stop(self) -> None:
        self.router.close(linger=0)
        self.client_pub.close(linger=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnistream-gateway")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    runtime = Runtime("gateway", args.run_dir)
    stage = GatewayStage(runtime)
    runtime.run(stage)


if __name__ == "__main__":
    main()
