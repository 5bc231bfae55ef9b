"""Launcher and gateway as real processes: READY, restart after SIGKILL, clean shutdown, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import zmq

from omnistream.app.client import Client, ClientError
from omnistream.app.launcher import Launcher, LaunchError
from omnistream.protocol.messages import Ask, Error, Status, StatusRequest
from omnistream.protocol.sockets import Addresses, make_socket, recv, send

from ..conftest import make_config, pid_alive
from ..util import wait_until


def supervise_until(launcher: Launcher, condition, timeout_s: float = 30.0) -> None:
    wait_until(
        condition,
        timeout_s,
        lambda: f"the condition; stages: {launcher.status_rows()}",
        every=lambda: launcher.step(timeout_ms=100),
        interval=0,
    )


@pytest.fixture
def gateway_only(short_tmp: Path):
    events: list[str] = []
    launcher = Launcher(make_config(short_tmp, ("gateway",)), short_tmp / "run", on_event=events.append)
    launcher.start()
    yield launcher, events
    launcher.shutdown()


def test_start_waits_for_ready_and_status_reports_stages(gateway_only) -> None:
    launcher, events = gateway_only
    rows = {row["stage"]: row for row in launcher.status_rows()}
    assert set(rows) == {"bus", "gateway"}
    assert all(row["state"] == "ready" and row["pid"] > 0 for row in rows.values())
    assert f"gateway ready (pid {rows['gateway']['pid']})" in events
    supervise_until(launcher, lambda: True)
    with Client.connect(launcher.run_dir, timeout_s=10) as client:
        launcher.step()
        status = client.status()
    assert "gateway" in status.stages
    assert status.stages["gateway"].pid == rows["gateway"]["pid"]


def test_killed_stage_is_restarted_with_backoff_and_serves_again(gateway_only) -> None:
    launcher, events = gateway_only
    child = launcher.children["gateway"]
    old_pid = child.pid
    os.kill(old_pid, signal.SIGKILL)
    supervise_until(launcher, lambda: child.restarts == 1 and child.ready and child.pid != old_pid)
    assert any("gateway exited (code -9)" in e and "restart #1" in e for e in events)
    assert not pid_alive(old_pid)
    with Client.connect(launcher.run_dir, timeout_s=10) as client:
        assert isinstance(client.status(), Status)
    # A second quick failure doubles the backoff.
    os.kill(child.pid, signal.SIGKILL)
    supervise_until(launcher, lambda: child.restarts == 2 and child.ready)
    assert child.backoff_s == pytest.approx(2 * launcher.config.launcher.restart_backoff_s)


def test_shutdown_leaves_no_process_behind(short_tmp: Path) -> None:
    launcher = Launcher(make_config(short_tmp, ("gateway",)), short_tmp / "run")
    launcher.start()
    pids = [c.pid for c in launcher.children.values()]
    assert all(pid_alive(pid) for pid in pids)
    launcher.shutdown()
    assert not any(pid_alive(pid) for pid in pids)
    assert not (short_tmp / "run" / "addresses.json").exists()


def test_cli_up_stops_cleanly_on_sigterm_and_status_works(short_tmp: Path) -> None:
    run_dir = short_tmp / "run"
    env = {
        **os.environ,
        "OMNISTREAM__PATHS__DATA_DIR": str(short_tmp / "data"),
        "OMNISTREAM__STAGES": '["gateway"]',
    }
    cli = [sys.executable, "-m", "omnistream.app.cli"]
    up = subprocess.Popen(
        [*cli, "up", "--json", "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        rows = json.loads(up.stdout.readline())
        assert {r["stage"] for r in rows} == {"bus", "gateway"}
        status = subprocess.run(
            [*cli, "status", "--json", "--run-dir", str(run_dir)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert "gateway" in json.loads(status.stdout)
        pids = [r["pid"] for r in rows]
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=30) == 0
        assert not any(pid_alive(pid) for pid in pids)
    finally:
        up.kill()
    missing = subprocess.run(
        [*cli, "status", "--run-dir", str(run_dir)], capture_output=True, text=True, env=env, timeout=60
    )
    assert missing.returncode == 3 and "omnistream up" in missing.stderr


def test_sigkilled_launcher_takes_its_children_along(short_tmp: Path) -> None:
    env = {
        **os.environ,
        "OMNISTREAM__PATHS__DATA_DIR": str(short_tmp / "data"),
        "OMNISTREAM__STAGES": '["gateway"]',
    }
    up = subprocess.Popen(
        [sys.executable, "-m", "omnistream.app.cli", "up", "--json", "--run-dir", str(short_tmp / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    pids = [r["pid"] for r in json.loads(up.stdout.readline())]
    up.kill()
    up.wait()
    wait_until(
        lambda: not any(pid_alive(pid) for pid in pids), 15, "every stage process to exit", interval=0.1
    )


def test_gateway_rejects_bad_requests_and_keeps_serving(gateway_only) -> None:
    launcher, _ = gateway_only
    addresses = Addresses.load(launcher.run_dir)
    sock = make_socket(zmq.Context.instance(), zmq.DEALER)
    sock.connect(addresses.gateway)
    try:

        def reply_to(frames: list[bytes]):
            sock.send_multipart(frames)
            assert sock.poll(10_000), "gateway did not answer"
            return recv(sock)[1]

        bad_type = reply_to([b"Ask", msgspec.msgpack.encode({"type": "Ask", "turn": 5, "question": "hi"})])
        assert isinstance(bad_type, Error) and bad_type.code == "invalid" and "$.turn" in bad_type.message
        unknown = reply_to(
            [b"Ask", msgspec.msgpack.encode({"type": "Ask", "turn": "t", "question": "hi", "x": 1})]
        )
        assert isinstance(unknown, Error) and "unknown field `x`" in unknown.message
        garbage = reply_to([b"\xff", b"\xc1"])
        assert isinstance(garbage, Error) and garbage.code == "malformed"
        not_for_clients = reply_to([b"Status", msgspec.msgpack.encode({"type": "Status"})])
        assert isinstance(not_for_clients, Error) and not_for_clients.code == "unsupported"
        send(sock, Ask(turn="t1", question=""))
        assert sock.poll(10_000)
        empty = recv(sock)[1]
        assert isinstance(empty, Error) and "Ask.question" in empty.message
        send(sock, StatusRequest(request_id="after"))
        assert sock.poll(10_000)
        assert isinstance(recv(sock)[1], Status)
    finally:
        sock.close(linger=0)
    assert launcher.children["gateway"].restarts == 0


def test_client_reports_refused_questions(gateway_only) -> None:
    launcher, _ = gateway_only
    with (
        Client.connect(launcher.run_dir, timeout_s=10) as client,
        pytest.raises(ClientError, match="Ask.question"),
    ):
        client.send_ask("x" * 5000, ts=0.0)


def test_unknown_stage_and_second_launcher_are_refused(short_tmp: Path, gateway_only) -> None:
    with pytest.raises(LaunchError, match="unknown stage 'vision'"):
        Launcher(make_config(short_tmp / "other", ("vision",)), short_tmp / "other-run")
    launcher, _ = gateway_only
    env = {
        **os.environ,
        "OMNISTREAM__PATHS__DATA_DIR": str(short_tmp / "data"),
        "OMNISTREAM__STAGES": '["gateway"]',
    }
    second = subprocess.run(
        [sys.executable, "-m", "omnistream.app.cli", "up", "--run-dir", str(launcher.run_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert second.returncode == 1 and "already running" in second.stderr
    assert launcher.children["gateway"].alive()
