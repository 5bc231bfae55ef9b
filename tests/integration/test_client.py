"""Client and AsyncClient against a real launcher, bus and gateway process (no models needed).

What a user sees: status of the running stages, watches accepted, events streaming, bad
requests refused with the reason, and both clients carrying on after the gateway is SIGKILLed
and restarted by the launcher.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from omnistream.app.async_client import AsyncClient
from omnistream.app.client import Client, ClientError
from omnistream.app.launcher import Launcher
from omnistream.protocol.messages import Stats

from ..conftest import make_config


class Supervised:
    """A launcher supervised from a background thread, as `omnistream up` would."""

    def __init__(self, launcher: Launcher):
        self.launcher = launcher
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.launcher.step(timeout_ms=50)

    def kill_gateway(self) -> int:
        old_pid = self.launcher.children["gateway"].pid
        os.kill(old_pid, signal.SIGKILL)
        return old_pid


@pytest.fixture
def system(short_tmp: Path, request):
    # memory too: it stores a watch before the gateway acknowledges it
    stages = getattr(request, "param", ("gateway", "memory"))
    launcher = Launcher(make_config(short_tmp, stages), short_tmp / "run")
    launcher.start()
    supervised = Supervised(launcher)
    supervised.thread.start()
    yield supervised
    supervised.stop.set()
    supervised.thread.join()
    launcher.shutdown()


def test_status_watch_and_events(system: Supervised) -> None:
    with Client.connect(system.launcher.run_dir, timeout_s=10) as client:
        status = client.status()
        watch_id = client.watch("tell me when a person enters")
        stats = [e for e in client.subscribe(Stats, timeout_s=2.5) if isinstance(e, Stats)]
        assert client.push_frame(np.zeros((8, 8, 3), np.uint8), ts=0.5)
        assert client.push_audio(np.zeros(1600, np.float32), 16000, ts=0.5)
    assert status.stages["gateway"].pid == system.launcher.children["gateway"].pid
    assert len(watch_id) == 32
    assert {s.stage for s in stats} >= {"gateway", "launcher"}


@pytest.mark.parametrize("system", [("gateway",)], indirect=True)
def test_bad_requests_are_refused_with_the_reason(system: Supervised) -> None:
    from omnistream.app.gateway import HISTORY_TIMEOUT_S

    # The client waits longer than the gateway waits for memory, so the gateway's reason arrives.
    with Client.connect(system.launcher.run_dir, timeout_s=HISTORY_TIMEOUT_S + 10) as client:
        with pytest.raises(ClientError, match=r"refused Ask: \[invalid\] Ask.question must have 1..2000"):
            list(client.ask("   "))
        with pytest.raises(ClientError, match=r"refused HistoryRequest: \[invalid\].*t0 <= t1"):
            client.history(t0=10.0, t1=5.0)
        with pytest.raises(ClientError, match=r"\[unavailable\] memory did not answer"):
            client.history(0.0, 30.0)  # no memory stage in this system
        assert client.status().stages["gateway"].counters["rejected"] >= 2


def test_sync_client_carries_on_after_gateway_restart(system: Supervised) -> None:
    with Client.connect(system.launcher.run_dir, timeout_s=30) as client:
        before = client.status().stages["gateway"].pid
        old_pid = system.kill_gateway()
        assert before == old_pid
        # sent while the gateway is down: retried until the restarted gateway answers
        after = client.status().stages["gateway"].pid
        assert after != old_pid and after == system.launcher.children["gateway"].pid
        fresh = [e for e in client.subscribe(Stats, timeout_s=3) if isinstance(e, Stats) and e.pid == after]
        assert fresh, "no events from the restarted gateway"
        assert client.watch("a dog appears")


def test_async_client_mirrors_the_sync_client(system: Supervised) -> None:
    async def scenario() -> None:
        async with await AsyncClient.connect(system.launcher.run_dir, timeout_s=30) as client:
            first, second = await asyncio.gather(client.status(), client.status())
            assert first.stages["gateway"].pid == second.stages["gateway"].pid
            assert len(await client.watch("a cat appears")) == 32
            assert client.push_frame(np.zeros((4, 4, 3), np.uint8), ts=1.0)
            with pytest.raises(ClientError, match=r"\[invalid\] Ask.question"):
                async for _ in client.ask(""):
                    pass
            stages = {e.stage async for e in client.subscribe(Stats, timeout_s=2.5) if isinstance(e, Stats)}
            assert {"gateway", "launcher"} <= stages
            old_pid = system.kill_gateway()
            started = time.monotonic()
            status = await client.status()
            assert status.stages["gateway"].pid not in (0, old_pid)
            assert time.monotonic() - started < 30

    asyncio.run(scenario())


def test_connect_to_nothing_names_the_problem(short_tmp: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no omnistream running"):
        Client.connect(short_tmp)
