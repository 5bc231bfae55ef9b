"""`omnistream replay` without --run-dir or --session: it attaches to the system already running
on its data (no second system on the same files) and streams into a session of its own, so two
replays never interleave on one timeline. Real processes (gateway, perception, memory)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from omnistream.app.cli import main
from omnistream.app.client import Client
from omnistream.app.launcher import Launcher

from ..conftest import make_config

STAGES = ("gateway", "perception", "memory")


def replay(capsys, *argv: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", "--speed", "10", "--no-speech", "--json", *argv])
    assert exit_info.value.code == 0
    return json.loads(capsys.readouterr().out)


def clips(run_dir: Path, session: str, at_least: int = 0, timeout_s: float = 20.0) -> list:
    deadline = time.monotonic() + timeout_s
    with Client.connect(run_dir, session=session) as client:
        while True:
            items = client.history(kinds=["clip"]).items
            if len(items) >= max(at_least, 1) or time.monotonic() > deadline:
                return items
            time.sleep(0.5)


def test_replays_attach_to_the_running_system_each_in_a_new_session(
    short_tmp: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("OMNISTREAM_RUN_DIR", str(short_tmp / "no-system-here"))
    monkeypatch.setenv("OMNISTREAM__PATHS__DATA_DIR", str(short_tmp / "data"))
    monkeypatch.setenv("OMNISTREAM__STAGES", json.dumps(list(STAGES)))
    launcher = Launcher(make_config(short_tmp, STAGES), short_tmp / "run")
    launcher.start()
    supervisor = launcher.supervise_in_thread()
    try:
        first = replay(capsys)
        second = replay(capsys)
        time.sleep(4)  # perception closes an idle stream's clip after 3 s
        assert not clips(launcher.run_dir, "default", timeout_s=0), "a replay wrote into 'default'"
        assert first["run_dir"] == second["run_dir"] == str((short_tmp / "run").resolve())
        assert first["session"] != second["session"] and "default" not in (
            first["session"],
            second["session"],
        )
        assert first["start_ts"] == second["start_ts"] == 0.0
        one, two = clips(launcher.run_dir, first["session"], 3), clips(launcher.run_dir, second["session"], 3)
        # Each replay's own timeline, from 0 to the recording's end (30 s), not one after the other.
        for got in (one, two):
            assert got and got[0].t0 < 1.0 and 25.0 < got[-1].t1 < 31.0, [(c.t0, c.t1) for c in got]
        # A named session continues where it stopped.
        third = replay(capsys, "--session", first["session"])
        assert third["session"] == first["session"] and third["start_ts"] == pytest.approx(one[-1].t1)
    finally:
        supervisor.stop()
