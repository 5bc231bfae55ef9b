"""The whole system under stress, shared by the chaos, fault-injection and flood tests: every stage
with the real models and the fast LLM, supervised by a thread, and the bundled recording looped
into it by a client."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omnistream.app.client import Client
from omnistream.app.launcher import Launcher
from omnistream.app.models import prepare_llm_cache
from omnistream.app.replay import DEFAULT_SAMPLE
from omnistream.perception.sources import AUDIO_RATE, MediaReader
from omnistream.protocol.config import Config

from ..conftest import make_config, pid_alive

STAGES = ("gateway", "perception", "memory", "reasoning", "speech")
FAST = {
    "reasoning.model": "qwen2.5-coder-0.5b",
    "reasoning.max_new_tokens": 16,
    "launcher.restart_backoff_s": 0.2,
    "perception.max_fps": 2.0,  # leave the LLM some of a small machine's CPU
}


class Supervisor(threading.Thread):
    """Steps the launcher (restarts, READYs) on its own thread; the test only reads pids."""

    def __init__(self, launcher: Launcher):
        super().__init__(daemon=True)
        self.launcher, self.stop = launcher, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.launcher.step(timeout_ms=50)


@contextmanager
def whole_system(root: Path, name: str, **overrides) -> Iterator[tuple[Config, Launcher]]:
    """Every stage (``FAST`` settings, then ``overrides``), run in ``/tmp/os-NAME-PID`` and
    supervised by a thread; shut down at the end, when no stage process may outlive it."""
    config = make_config(root, STAGES, **{**FAST, **overrides})
    prepare_llm_cache(config, progress=False)
    launcher = Launcher(config, Path("/tmp") / f"os-{name}-{os.getpid()}")
    launcher.start()
    supervisor = Supervisor(launcher)
    supervisor.start()
    pids: list[int] = []
    try:
        yield config, launcher
        pids = [c.pid for c in launcher.children.values()]
    finally:
        supervisor.stop.set()
        supervisor.join(10)
        launcher.shutdown()
    assert not any(pid_alive(pid) for pid in pids), "a stage outlived the shutdown"


class Replay(threading.Thread):
    """The bundled recording, looped at 2x real time (stream time keeps increasing). With
    ``status_at_end`` the client asks for the status once stopped (it must have reconnected by
    itself after a gateway restart)."""

    def __init__(self, run_dir: Path, status_at_end: bool = False):
        super().__init__(daemon=True)
        self.run_dir, self.stop, self.status_at_end = run_dir, threading.Event(), status_at_end
        self.sent = self.dropped = 0
        self.events = list(MediaReader(DEFAULT_SAMPLE, max_fps=5))
        self.length = max(e.ts for e in self.events) + 0.5
        self.reconnected_status = None

    def run(self) -> None:
        with Client.connect(self.run_dir, timeout_s=60) as client:
            self.stream(client)
            if self.status_at_end:
                self.reconnected_status = client.status()

    def stream(self, client: Client) -> None:
        loop, start = 0, time.monotonic()
        while True:
            for event in self.events:
                ts = loop * self.length + event.ts
                while time.monotonic() < start + ts / 2.0:
                    if self.stop.is_set():
                        return
                    client.poll_events(0.01)  # keep the event queue short
                if event.kind == "video":
                    ok = client.push_frame(event.data, ts)
                else:
                    ok = client.push_audio(event.data, AUDIO_RATE, ts, channel="scene")
                self.sent += ok
                self.dropped += not ok
            loop += 1
