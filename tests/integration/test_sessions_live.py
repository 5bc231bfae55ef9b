"""``omnistream sessions delete`` through a running memory process (tests/unit/test_retention.py
has retention and the command without a system): a live session is refused unless ``--force``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import zmq

from omnistream.app import cli
from omnistream.app.launcher import Launcher
from omnistream.protocol.messages import Transcript
from omnistream.protocol.sockets import make_socket, send

from ..conftest import make_config
from ..unit.test_retention import run_cli
from ..util import wait_until


def test_sessions_delete_through_a_running_memory_refuses_a_live_session(
    short_tmp: Path, capsys, monkeypatch
) -> None:
    config = make_config(short_tmp, ("memory",))
    launcher = Launcher(config, short_tmp / "run")
    launcher.start()
    try:
        bus = make_socket(zmq.Context.instance(), zmq.PUB)
        bus.connect(launcher.addresses.bus_in)
        time.sleep(0.5)
        send(bus, Transcript(session="live", t0=0.0, ts=4.0, text="the kettle is on"))
        args = ["--set", f"paths.data_dir={short_tmp / 'data'}", "--run-dir", str(short_tmp / "run")]

        def listed() -> list[str]:
            return [row["session"] for row in json.loads(run_cli(["sessions", *args, "--json"], capsys)[1])]

        wait_until(lambda: listed() == ["live"], 20, "memory to store the live session", interval=0.2)
        with pytest.raises(SystemExit) as exited:
            cli.main(["sessions", "delete", "live", *args])
        assert exited.value.code == cli.EXIT_FAILURE  # live: refused, with the reason
        assert "is live" in capsys.readouterr().err
        code, out = run_cli(["sessions", *args, "--json"], capsys)
        assert [row["session"] for row in json.loads(out)] == ["live"]
        code, _ = run_cli(["sessions", "delete", "live", "--force", *args], capsys)
        assert code == 0
        code, out = run_cli(["sessions", *args, "--json"], capsys)
        assert json.loads(out) == []
        bus.close(linger=0)
        assert launcher.children["memory"].alive() and launcher.children["memory"].restarts == 0
    finally:
        launcher.shutdown()
