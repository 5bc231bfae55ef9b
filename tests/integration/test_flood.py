"""Flood: the real system (real models, the fast LLM) replaying the bundled recording while
clients flood the gateway for FLOOD_S seconds with history requests, audio chunks, frames and new
session names on new connections, as fast as their sockets take them.

Afterwards every stage is up (the same process, or restarted and ready), memory answers a history
request, a question is answered, and each process's peak resident memory, sampled with psutil
every SAMPLE_S through the whole run, stayed within its ``limits.rss_mb``.

Prints the peaks and what each flooder sent, the figures BENCHMARKS.md quotes.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zmq

from omnistream.app.client import Client
from omnistream.app.launcher import Launcher
from omnistream.protocol.config import Config
from omnistream.protocol.messages import AudioChunk, HistoryRequest, VideoFrame
from omnistream.protocol.sockets import make_socket, recv, send

from ..util import wait_until
from .whole_system import Replay, whole_system

# Slow and long: in the extended set (bash scripts/test.sh --extended), not the default suite.
pytestmark = [pytest.mark.slow, pytest.mark.extended]

FLOOD_S = float(os.environ.get("OMNISTREAM_FLOOD_S", "25"))
SAMPLE_S = 0.25
STAGES = ("bus", "gateway", "perception", "memory", "reasoning", "speech")


class RssSampler(threading.Thread):
    """Every process's RSS (psutil) every SAMPLE_S; the peak per stage, whatever its pid."""

    def __init__(self, launcher: Launcher):
        super().__init__(daemon=True)
        self.launcher, self.stop = launcher, threading.Event()
        self.peak_mb: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for name, child in list(self.launcher.children.items()):
                try:
                    rss = psutil.Process(child.pid).memory_info().rss / (1 << 20)
                except (psutil.NoSuchProcess, psutil.ZombieProcess, ValueError):
                    continue
                self.peak_mb[name] = max(self.peak_mb[name], rss)
            self.samples += 1
            self.stop.wait(SAMPLE_S)


class Flooder(threading.Thread):
    """One kind of flood on its own DEALER (a shallow queue: what the socket does not take now is
    counted as refused, not buffered here), reading whatever comes back."""

    def __init__(self, run_dir: Path, kind: str, until: float):
        super().__init__(daemon=True)
        self.run_dir, self.kind, self.until = run_dir, kind, until
        self.sent = self.refused = self.replies = self.connections = 0
        self.errors: dict[str, int] = {}
        from omnistream.protocol.sockets import Addresses

        self.addresses = Addresses.load(run_dir)
        self.frame = np.random.default_rng(0).integers(0, 255, (720, 1280, 3), dtype=np.uint8)
        self.audio = (np.random.default_rng(1).standard_normal(48_000) * 0.1).astype(np.float32)

    def dealer(self) -> zmq.Socket:
        sock = make_socket(zmq.Context.instance(), zmq.DEALER, hwm=16)
        sock.connect(self.addresses.gateway)
        self.connections += 1
        return sock

    def read(self, sock: zmq.Socket) -> None:
        while True:
            try:
                _, reply = recv(sock, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self.replies += 1
            code = getattr(reply, "code", "")
            if code:
                self.errors[code] = self.errors.get(code, 0) + 1

    def put(self, sock: zmq.Socket, message) -> None:
        try:
            send(sock, message, flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            self.refused += 1
            time.sleep(0.001)

    def run(self) -> None:
        sock = self.dealer()
        i = 0
        try:
            while time.monotonic() < self.until:
                i += 1
                if self.kind == "history":
                    self.put(sock, HistoryRequest(request_id=f"h{i}", limit=5000))
                elif self.kind == "audio":  # 1 s of 48 kHz, a new session name every 8 chunks
                    self.put(sock, AudioChunk(session=f"a{i // 8}", pcm=self.audio, sample_rate=48_000, ts=i))
                elif self.kind == "frames":
                    self.put(sock, VideoFrame(session=f"f{i % 4}", image=self.frame, ts=i / 30))
                elif self.kind == "sessions":  # a new connection every 20 names
                    if i % 20 == 0:
                        self.read(sock)
                        sock.close(linger=0)
                        sock = self.dealer()
                    self.put(
                        sock, AudioChunk(session=f"s{i}", pcm=self.audio[:1600], sample_rate=16_000, ts=0.0)
                    )
                    self.put(sock, HistoryRequest(request_id=f"sh{i}", session=f"s{i}", limit=10))
                self.read(sock)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                self.read(sock)
                time.sleep(0.05)
        finally:
            sock.close(linger=0)


def test_flood_leaves_every_stage_up_and_within_its_rss_limit(tmp_path_factory) -> None:
    with whole_system(Path(tmp_path_factory.mktemp("flood")), "flood") as (config, launcher):
        run_the_flood(config, launcher)


def run_the_flood(config: Config, launcher: Launcher) -> None:
    run_dir = launcher.run_dir
    sampler = RssSampler(launcher)
    sampler.start()
    replay = Replay(run_dir)
    try:
        before = {name: child.pid for name, child in launcher.children.items()}
        replay.start()
        time.sleep(10.0)  # some records to page through
        start = time.monotonic()
        flooders = [
            Flooder(run_dir, kind, start + FLOOD_S) for kind in ("history", "audio", "frames", "sessions")
        ]
        for flooder in flooders:
            flooder.start()
        for flooder in flooders:
            flooder.join(FLOOD_S + 30)
            assert not flooder.is_alive(), f"{flooder.kind} flooder hung"
        flood_s = time.monotonic() - start
        replay.stop.set()
        replay.join(30)
        # Every stage up: the same process, or restarted and ready again.
        wait_until(
            lambda: all(c.ready and c.alive() for c in launcher.children.values()),
            120,
            lambda: f"every stage up: {launcher.status_rows()}",
            interval=0.2,
        )
        with Client.connect(run_dir, timeout_s=60) as client:
            history = client.history(limit=5000)
            recover_start = time.monotonic()
            answer = "".join(client.ask("What is on screen?", speak=False, timeout_s=240))
            answer_s = time.monotonic() - recover_start
            status = client.status()
        sampler.stop.set()
        sampler.join(5)
        restarted = {n: c.restarts for n, c in launcher.children.items() if c.pid != before[n]}
        figures = {
            "flood_s": round(flood_s, 1),
            "sent": {f.kind: f.sent for f in flooders},
            "refused_by_socket": {f.kind: f.refused for f in flooders},
            "replies": {f.kind: f.replies for f in flooders},
            "errors": {f.kind: f.errors for f in flooders},
            "connections": sum(f.connections for f in flooders),
            "peak_rss_mb": {n: round(v) for n, v in sampler.peak_mb.items()},
            "limits_mb": {n: getattr(config.limits.rss_mb, n) for n in STAGES},
            "restarted": restarted,
            "answer_after_flood_s": round(answer_s, 1),
            "gateway": {
                k: v
                for k, v in status.stages["gateway"].counters.items()
                if "drop" in k or "refus" in k or "busy" in k or "rejected" in k
            },
        }
        print(f"flood: {figures}")
        assert answer.strip(), client.last_done
        assert history.items, "memory recorded nothing of the replay"
        assert all(f.sent > 0 for f in flooders), figures
        assert sampler.samples > FLOOD_S / SAMPLE_S / 2, sampler.samples
        for name in STAGES:
            limit = getattr(config.limits.rss_mb, name)
            assert 0 < sampler.peak_mb[name] <= limit, (
                f"{name}: peak {sampler.peak_mb[name]:.0f} MB > {limit} MB"
            )
        # A flood is refused or dropped, not survived by dying: no stage restarted.
        assert not restarted, figures
        # The flood did reach the bounds: new names beyond sessions_per_client were refused, and
        # history requests beyond gateway.max_pending_history were answered busy.
        assert figures["gateway"].get("sessions_refused", 0) > 0, figures
        assert figures["gateway"].get("history_busy", 0) > 0, figures
    finally:
        replay.stop.set()
        sampler.stop.set()
