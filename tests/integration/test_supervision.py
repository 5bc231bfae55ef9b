"""One supervisor for every entry point: ``running_system`` (replay, eval, demo) restarts a stage
that dies and, by its heartbeat, one that hangs; a second system never opens the same data.

Real processes (the bus and the gateway: seconds).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omnistream.app.client import Client, ClientError
from omnistream.app.launcher import Launcher, LaunchError, live_run_dir, main_thread_cpu
from omnistream.app.system import running_system

from ..conftest import make_config, pid_alive


def gateway_pid(run_dir: Path) -> int:
    with Client.connect(run_dir, timeout_s=5) as client:
        return client.status().stages["gateway"].pid


def wait_for_new_gateway(run_dir: Path, old_pid: int, timeout_s: float) -> tuple[int, float]:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            pid = gateway_pid(run_dir)
        except ClientError:
            pid = old_pid
        if pid != old_pid:
            return pid, time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"no new gateway after {timeout_s} s (still pid {old_pid})")


def test_running_system_restarts_a_killed_stage_and_a_hung_one(short_tmp: Path) -> None:
    config = make_config(short_tmp, ("gateway",), **{"launcher.heartbeat_timeout_s": 3.0})
    with running_system(config, short_tmp / "run", quiet=True) as run_dir:
        first = gateway_pid(run_dir)
        os.kill(first, signal.SIGKILL)
        second, dead_s = wait_for_new_gateway(run_dir, first, 30)
        print(f"dead gateway replaced in {dead_s:.2f} s")
        # Alive but hung: stopped, it publishes no Stats; the heartbeat finds it.
        os.kill(second, signal.SIGSTOP)
        try:
            third, hung_s = wait_for_new_gateway(run_dir, second, 30)
        finally:
            if pid_alive(second):
                os.kill(second, signal.SIGCONT)
        print(f"hung gateway replaced in {hung_s:.2f} s")
        assert hung_s >= 2.0  # not before its heartbeat timeout
        assert not pid_alive(second)
        # A live, idle stage beats: it is not killed.
        time.sleep(5)
        assert gateway_pid(run_dir) == third
    assert not pid_alive(third)
    assert not (short_tmp / "run" / "addresses.json").exists()


def test_heartbeat_tells_a_busy_main_thread_from_a_blocked_or_stopped_one() -> None:
    """What the launcher reads of a silent stage: a computing main thread's CPU time moves (it is
    left alone), a blocked one's does not, a stopped one is in state T."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)
        busy_0, idle_0 = main_thread_cpu(busy.pid), main_thread_cpu(idle.pid)
        time.sleep(1.0)
        busy_1, idle_1 = main_thread_cpu(busy.pid), main_thread_cpu(idle.pid)
        assert busy_1[1] > busy_0[1] and busy_1[0] == "R"
        assert idle_1[1] == idle_0[1] and idle_1[0] == "S"
        os.kill(idle.pid, signal.SIGSTOP)
        time.sleep(0.2)
        assert main_thread_cpu(idle.pid)[0] in ("T", "t")
    finally:
        for process in (busy, idle):
            process.kill()
            process.wait()
    assert main_thread_cpu(busy.pid) is None


def test_a_second_system_on_the_same_data_is_refused_and_found(short_tmp: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMNISTREAM_RUN_DIR", str(short_tmp / "nothing-here"))
    config = make_config(short_tmp, ("gateway",))
    assert live_run_dir(config, None) is None
    launcher = Launcher(config, short_tmp / "run")
    launcher.start()
    try:
        with pytest.raises(LaunchError, match="in use by the system running in"):
            Launcher(config, short_tmp / "run2").start()
        # Without a run directory, a command attaches to the system holding its data.
        assert live_run_dir(config, None) == (short_tmp / "run").resolve()
        with running_system(config, None, quiet=True) as run_dir:
            assert run_dir == (short_tmp / "run").resolve()
    finally:
        launcher.shutdown()
    assert live_run_dir(config, None) is None
    again = Launcher(config, short_tmp / "run2")  # stopped: the data is free again
    again.start()
    again.shutdown()
