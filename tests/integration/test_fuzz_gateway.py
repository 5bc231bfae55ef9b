"""Hostile and broken input against real processes: a live gateway keeps serving through 20k
fuzzed messages (the mutations of tests/unit/test_fuzz.py) and refuses absurd but well-formed
requests with errors that name the problem; ``omnistream replay`` of a corrupt file exits with a
clear error before it starts anything."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq

from omnistream.app.launcher import Launcher
from omnistream.protocol.messages import (
    Ask,
    AudioChunk,
    Error,
    HistoryRequest,
    Status,
    StatusRequest,
    VideoFrame,
    Watch,
)
from omnistream.protocol.sockets import Addresses, make_socket, recv, send

from ..conftest import launched
from ..unit.test_fuzz import SEED, corpus, mutate
from ..util import wait_until


@pytest.fixture
def gateway(short_tmp: Path):
    yield from launched(short_tmp, ("gateway",), **{"bus.max_message_bytes": 4 << 20})


def _request(sock: zmq.Socket, message, timeout_ms: int = 10_000):
    send(sock, message)
    wanted = getattr(message, "request_id", getattr(message, "turn", None))

    def reply():
        got = recv(sock)[1] if sock.poll(100) else None
        return got if getattr(got, "request_id", None) == wanted else None

    return wait_until(reply, timeout_ms / 1000, f"a reply to {message}", interval=0)


def test_live_gateway_keeps_serving_through_fuzzed_and_absurd_input(gateway: Launcher) -> None:
    addresses = Addresses.load(gateway.run_dir)
    sock = make_socket(zmq.Context.instance(), zmq.DEALER, hwm=100_000)
    sock.connect(addresses.gateway)
    rng = random.Random(SEED + 1)
    base = corpus()
    try:
        assert isinstance(_request(sock, StatusRequest(request_id="before")), Status)
        for sent in range(1, 20_001):
            frames = [f for f in mutate(rng.choice(base), rng) if len(f) < 1 << 20] or [b""]
            sock.send_multipart(frames)
            if sent % 500 == 0:
                gateway.step(timeout_ms=0)
                while sock.poll(0):
                    sock.recv_multipart()
        # Absurd but well-formed requests: each refused with an Error naming the problem.
        cases = [
            (AudioChunk(pcm=np.zeros(16, np.float32), sample_rate=1), "sample_rate"),
            (AudioChunk(pcm=np.zeros(16, np.float32), sample_rate=2**31 - 1), "sample_rate"),
            (AudioChunk(pcm=np.zeros((4, 4), np.float32)), "AudioChunk.pcm"),
            (AudioChunk(pcm=np.zeros(4, np.float64)), "AudioChunk.pcm"),
            (AudioChunk(pcm=np.array([np.nan], np.float32)), "NaN"),
            (AudioChunk(pcm=np.zeros(8000 * 61, np.int16), sample_rate=8000), "at most 60 s"),
            (VideoFrame(image=np.zeros((4, 4, 4), np.uint8)), "VideoFrame.image"),
            (VideoFrame(image=np.zeros((4, 4, 3), np.float32)), "VideoFrame.image"),
            (VideoFrame(image=np.zeros((0, 4, 3), np.uint8)), "sides"),
            (VideoFrame(image=np.zeros((1, 9000, 3), np.uint8)), "sides"),
            (VideoFrame(image=np.zeros((2, 2, 3), np.uint8), ts=float("nan")), "ts must be a finite"),
            (Ask(turn="q1", question="x" * 2001), "Ask.question"),
            (Ask(turn="q2", question="   \n\t "), "Ask.question"),
            (Ask(turn="q3", question="what\x00is this"), "control character U+0000"),
            (Ask(turn="q4", question="ok", choices=["c"] * 27), "Ask.choices"),
            (Ask(turn="q5", question="ok", audio_rate=3), "audio_rate"),
            (Ask(turn="t" * 500, question="ok"), "Ask.turn"),
            (Ask(turn="q6", question="ok", session="../../etc"), "session"),
            (Ask(turn="q7", question="ok", session="x" * 200), "session"),
            (Watch(watch_id="w", condition="y" * 3000), "Watch.condition"),
            (HistoryRequest(request_id="h", t0=5.0, t1=1.0), "t0 <= t1"),
            (HistoryRequest(request_id="h2", limit=10**9), "limit"),
        ]
        for message, needle in cases:
            send(sock, message)

            def error(needle=needle):
                got = recv(sock)[1] if sock.poll(100) else None
                return got if isinstance(got, Error) and needle in got.message else None

            reply = wait_until(error, 10, f"an Error naming {needle!r} for {message}", interval=0)
            assert reply.code == "invalid", (message, needle)
        # Odd but acceptable text is accepted (bounded, not mangled).
        ack = _request(sock, Ask(turn="odd", question="¿Qué es esto? 🦋 e\u0301 \u202eabc", speak=False))
        assert ack.request_id == "odd" and not isinstance(ack, Error)
        after = _request(sock, StatusRequest(request_id="after"))
        assert isinstance(after, Status)
        counters = after.stages["gateway"].counters
        assert counters["rejected"] > 5000, counters
    finally:
        sock.close(linger=0)
    child = gateway.children["gateway"]
    assert child.alive() and child.restarts == 0


def test_replay_of_a_corrupt_file_exits_with_a_clear_error(tmp_path: Path, short_tmp: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\xff" * 300)
    env = {**os.environ, "OMNISTREAM__PATHS__DATA_DIR": str(short_tmp / "data")}
    result = subprocess.run(
        [sys.executable, "-m", "omnistream.app.cli", "replay", str(bad), "--run-dir", str(short_tmp / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert "broken.mp4" in result.stderr
    assert not (short_tmp / "run" / "addresses.json").exists()  # nothing was started
