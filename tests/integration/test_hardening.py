"""Hardening against absurd requests (issue #18, items 3 and 4), through real gateway and memory
processes: a history request's kinds are bounded at the gateway and taken once each by memory,
and audio and frames are budgeted per client connection, not only per session.
(The in-process half: tests/unit/test_hardening.py.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq

from omnistream.app.launcher import Launcher
from omnistream.protocol.messages import (
    AudioChunk,
    Clip,
    Error,
    History,
    HistoryRequest,
    Status,
    StatusRequest,
    VideoFrame,
)
from omnistream.protocol.sockets import make_socket, send

from ..conftest import make_config
from ..unit.test_hardening import dealer, request


def test_history_request_with_40000_kinds_is_refused_and_memory_keeps_answering(
    gateway_and_memory: Launcher,
) -> None:
    launcher = gateway_and_memory
    bus = make_socket(zmq.Context.instance(), zmq.PUB)
    bus.connect(launcher.addresses.bus_in)
    client = dealer(launcher.addresses.gateway)
    direct = dealer(launcher.addresses.memory)  # as the gateway talks to memory, bypassing its checks
    try:
        clip = Clip(session="k", ts=9.0, t0=0.0, clip_id=1, features=np.ones(64, np.float32) / 8.0)
        clip = msgspec.structs.replace(clip, description="a red cup")
        time.sleep(0.5)  # let the subscription reach the new publisher
        send(bus, clip)
        deadline = time.monotonic() + 30
        while not request(client, HistoryRequest(session="k", request_id="first"), "first").items:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "memory did not store the clip"
            time.sleep(0.2)
        many = ["clip"] * 40_000
        refused = request(client, HistoryRequest(session="k", request_id="many", kinds=many), "many")
        assert isinstance(refused, Error) and refused.code == "invalid", refused
        assert "kinds" in refused.message and "at most 5" in refused.message, refused.message
        # A 45 MB chunk gets a clear Error too (and nothing of it reaches the bus).
        chunk = AudioChunk(pcm=np.zeros(192_000 * 59, np.float32), sample_rate=192_000)
        send(client, chunk)
        status = request(client, StatusRequest(request_id="st"), "st")
        assert isinstance(status, Status) and status.stages["gateway"].counters.get("in_AudioChunk", 0) == 0
        # Memory itself takes each kind once and bounds the limit (one SQL variable per kind).
        absurd = HistoryRequest(session="k", request_id="direct", kinds=many, limit=2**63 - 1)
        answered = request(direct, absurd, "direct")
        assert isinstance(answered, History) and answered.items, answered
        assert all(i.text.startswith("a red cup") for i in answered.items)
        again = request(client, HistoryRequest(session="k", request_id="after", kinds=["clip"]), "after")
        assert isinstance(again, History) and [i.kind for i in again.items] == ["clip"]
    finally:
        for sock in (bus, client, direct):
            sock.close(linger=0)
    for name in ("gateway", "memory"):
        child = launcher.children[name]
        assert child.alive() and child.restarts == 0, name


@pytest.fixture
def budget_gateway(short_tmp: Path) -> Iterator[Launcher]:
    overrides = {
        "gateway.client_audio_speed": 2.0,
        "gateway.client_audio_burst_s": 5.0,
        "gateway.client_max_fps": 5.0,
        "gateway.client_frame_burst": 5.0,
        "gateway.sessions_per_client": 1000,  # a new name per chunk here: the budgets are tested
    }
    launcher = Launcher(make_config(short_tmp, ("gateway",), **overrides), short_tmp / "run")
    launcher.start()
    yield launcher
    launcher.shutdown()


def test_new_session_names_do_not_bypass_the_connections_budget(budget_gateway: Launcher) -> None:
    """Each chunk and frame under a new session name (whose own budget is full): the
    connection's budget still holds audio to 5 s + 2x and frames to 5 + 5/s."""
    sock = dealer(budget_gateway.addresses.gateway)
    try:
        assert isinstance(request(sock, StatusRequest(request_id="before"), "before"), Status)
        start = time.monotonic()
        chunk = np.zeros(1600, np.float32)  # 0.1 s
        frame = np.zeros((8, 8, 3), np.uint8)
        for i in range(300):  # 30 s of audio and 300 frames in about 1.5 s
            send(sock, AudioChunk(session=f"s{i}", pcm=chunk, ts=i * 0.1))
            send(sock, VideoFrame(session=f"v{i}", image=frame, ts=i * 0.1))
            time.sleep(0.005)
        status = request(sock, StatusRequest(request_id="after"), "after")  # after all 600, in order
        span = time.monotonic() - start
        assert isinstance(status, Status)
        counters = status.stages["gateway"].counters
        accepted_s = counters.get("in_AudioChunk", 0) * 0.1
        assert accepted_s + counters.get("audio_dropped_s", 0) == pytest.approx(30.0, abs=0.05)
        assert accepted_s <= 5.0 + 2.0 * span + 0.11, (accepted_s, span)
        frames = counters.get("in_VideoFrame", 0)
        assert frames + counters.get("frames_dropped_rate", 0) == 300
        assert frames <= 5 + 5.0 * span + 1, (frames, span)
        # Another connection has its own budget.
        other = dealer(budget_gateway.addresses.gateway)
        try:
            send(other, AudioChunk(session="fresh", pcm=chunk))
            status = request(other, StatusRequest(request_id="other"), "other")
            assert status.stages["gateway"].counters["in_AudioChunk"] == counters["in_AudioChunk"] + 1  # type: ignore[union-attr]
        finally:
            other.close(linger=0)
    finally:
        sock.close(linger=0)
