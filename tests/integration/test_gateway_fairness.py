"""Issue #18 item 10: history requests never block the gateway, and one client cannot starve
another. Real gateway (and memory) processes, real sockets.

History requests are forwarded to memory without blocking, at most
``gateway.max_pending_history`` at once (beyond: ``Error`` ``busy`` at once), each reply matched
back to the client that asked; requests are served round robin across clients.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from omnistream.app.launcher import Launcher
from omnistream.protocol.messages import (
    Clip,
    Error,
    History,
    HistoryRequest,
    Message,
    Status,
    StatusRequest,
)
from omnistream.protocol.sockets import make_socket, recv, send

from ..conftest import make_config

FLOOD = 2500


def dealer(endpoint: str) -> zmq.Socket:
    sock = make_socket(zmq.Context.instance(), zmq.DEALER, hwm=100_000)
    sock.connect(endpoint)
    return sock


def ask(sock: zmq.Socket, message: Message, timeout_s: float) -> Message | None:
    """Send ``message``; its reply (by ``request_id``; others are skipped), None if none came."""
    send(sock, message)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(50):
            reply = recv(sock)[1]
            if getattr(reply, "request_id", None) == message.request_id:  # type: ignore[attr-defined]
                return reply
    return None


@pytest.fixture
def gateway_only(short_tmp: Path) -> Iterator[Launcher]:
    """A gateway whose memory is not running: every history request waits for it."""
    config = make_config(short_tmp, ("gateway",), **{"gateway.max_pending_history": 64})
    launcher = Launcher(config, short_tmp / "run")
    launcher.start()
    yield launcher
    launcher.shutdown()


def test_a_flood_of_history_requests_does_not_freeze_the_gateway(gateway_only: Launcher) -> None:
    """2500 history requests while memory is away (before the fix the gateway's send to memory
    blocked after ~1000 and no other client was served again): a second client's status comes
    back at once, the flood beyond the pending bound is refused with ``busy``, the rest end
    with ``unavailable`` after the timeout."""
    flood = dealer(gateway_only.addresses.gateway)
    other = dealer(gateway_only.addresses.gateway)
    try:
        assert isinstance(ask(other, StatusRequest(request_id="warm"), 10), Status)
        for i in range(FLOOD):
            send(flood, HistoryRequest(session="s", request_id=f"h{i}"))
        time.sleep(0.5)  # the flood is in the gateway's socket before the other client asks
        start = time.monotonic()
        reply = ask(other, StatusRequest(request_id="during"), 5)
        waited = time.monotonic() - start
        assert isinstance(reply, Status), f"no status within 5 s during the flood ({reply})"
        assert waited < 2.0, waited
        counters = reply.stages["gateway"].counters
        assert counters.get("history_busy", 0) >= FLOOD - 64 - 1000  # refused, not queued
        # The flooding client got a reply for every request: busy now, unavailable later.
        replies: dict[str, Error] = {}
        deadline = time.monotonic() + 30
        while len(replies) < FLOOD and time.monotonic() < deadline:
            if flood.poll(100):
                message = recv(flood)[1]
                assert isinstance(message, Error), message
                replies[message.request_id] = message
        assert len(replies) == FLOOD
        codes = [m.code for m in replies.values()]
        assert codes.count("unavailable") == 64, codes.count("unavailable")
        assert codes.count("busy") == FLOOD - 64
        busy = next(m for m in replies.values() if m.code == "busy")
        assert "gateway.max_pending_history = 64" in busy.message, busy.message
    finally:
        flood.close(linger=0)
        other.close(linger=0)
    assert gateway_only.children["gateway"].alive() and gateway_only.children["gateway"].restarts == 0


def test_history_replies_go_to_the_client_that_asked_and_a_stalled_memory_blocks_nothing(
    gateway_and_memory: Launcher,
) -> None:
    launcher = gateway_and_memory
    bus = make_socket(zmq.Context.instance(), zmq.PUB)
    bus.connect(launcher.addresses.bus_in)
    one, two = dealer(launcher.addresses.gateway), dealer(launcher.addresses.gateway)
    try:
        time.sleep(0.5)  # the subscriptions reach the new publisher
        for session, text in (("a", "a red cup"), ("b", "a blue kettle")):
            clip = Clip(session=session, ts=9.0, t0=0.0, clip_id=1, features=np.ones(64, np.float32) / 8.0)
            clip.description = text
            send(bus, clip)
        deadline = time.monotonic() + 30
        while True:
            reply = ask(two, HistoryRequest(session="b", request_id="p"), 5)
            if isinstance(reply, History) and reply.items:
                break
            assert time.monotonic() < deadline, "memory did not store the clip"
            time.sleep(0.2)
        # Both clients use the same request ids: each gets its own session's records (within the
        # pending bound of 256).
        for i in range(120):
            send(one, HistoryRequest(session="a", request_id=f"r{i}"))
            send(two, HistoryRequest(session="b", request_id=f"r{i}"))
        for sock, text in ((one, "a red cup"), (two, "a blue kettle")):
            got: dict[str, Message] = {}
            deadline = time.monotonic() + 30
            while len(got) < 120 and time.monotonic() < deadline:
                if sock.poll(100):
                    message = recv(sock)[1]
                    got[message.request_id] = message  # type: ignore[attr-defined]
            assert len(got) == 120
            wrong = [
                m for m in got.values() if not isinstance(m, History) or [i.text for i in m.items] != [text]
            ]
            assert not wrong, wrong[:2]
        # A stalled memory: history requests wait (bounded), status is still served at once.
        memory_pid = launcher.children["memory"].process.pid
        os.kill(memory_pid, signal.SIGSTOP)
        try:
            for i in range(2500):
                send(one, HistoryRequest(session="a", request_id=f"x{i}"))
            time.sleep(0.3)
            start = time.monotonic()
            reply = ask(two, StatusRequest(request_id="st"), 5)
            assert isinstance(reply, Status) and time.monotonic() - start < 2.0
        finally:
            os.kill(memory_pid, signal.SIGCONT)
    finally:
        for sock in (bus, one, two):
            sock.close(linger=0)
