"""A named session's memory survives SIGKILL of the memory process and a restart of the system.

Real processes (gateway and memory, with MiniLM) under the launcher. Clips, transcripts and a
synopsis are published on the bus as perception, speech and reasoning publish them; memory
stores and acknowledges each, and consolidates them on tiny tier budgets. Then memory is
SIGKILLed and restarted by the launcher, and later the whole system is stopped and started again
with ``omnistream up --session kitchen``: every clip, transcript, event and the synopsis come
back, and the resumed session goes on storing where it stopped. (The synopsis written by the
real LLM is tested in tests/integration/test_synopsis.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from omnistream.app.client import Client
from omnistream.app.launcher import Launcher
from omnistream.app.replay import session_end
from omnistream.protocol.messages import Clip, Label, Message, Record, Synopsis, Transcript
from omnistream.protocol.sockets import Addresses, make_socket, recv, send

from ..conftest import make_config, pid_alive
from ..util import wait_until

pytestmark = pytest.mark.slow  # three starts of the memory process (MiniLM), ~25 s on 2 idle cores

SESSION = "kitchen"
STAGES = ("gateway", "memory")
TIERS = {"memory.l1_items": 3, "memory.l2_items": 2}


def clip(clip_id: int, t0: float, t1: float, description: str) -> Clip:
    features = np.zeros(8, np.float32)
    features[clip_id % 8] = 1.0
    return Clip(
        session=SESSION,
        clip_id=clip_id,
        t0=t0,
        ts=t1,
        features=features,
        labels=[Label("x", 0.5)],
        description=description,
    )


def speech(t0: float, t1: float, text: str) -> Transcript:
    return Transcript(session=SESSION, t0=t0, ts=t1, text=text, speaker="scene")


FIRST = [
    clip(1, 0, 10, "seen: monarch (butterfly), admiral (butterfly)"),
    speech(2, 6, "He might even have been made amiable himself."),
    clip(2, 10, 20, "seen: crossword puzzle (puzzle); text seen: Linux"),
    speech(12, 16, "Linux is a kernel."),
    clip(3, 20, 30, "seen: teapot (kitchenware)"),
    speech(22, 26, "The tea is ready."),
    Synopsis(
        session=SESSION,
        ts=30,
        t0=0,
        text="A butterfly photo at 00:00, the word Linux at 00:10, then a teapot; tea was ready at 00:22.",
        through_item_id=8,
    ),
]
AFTER_RESTART = [clip(4, 30, 40, "seen: coffee mug (kitchenware)"), speech(31, 35, "Coffee, please.")]


class Bus:
    """Publishes stage messages on the bus and watches memory's ``Record`` acknowledgements."""

    def __init__(self, run_dir: Path):
        addresses = Addresses.load(run_dir)
        ctx = zmq.Context.instance()
        self.pub = make_socket(ctx, zmq.PUB)
        self.pub.connect(addresses.bus_in)
        self.sub = make_socket(ctx, zmq.SUB)
        self.sub.connect(addresses.bus_out)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"Record")

    def records(self, timeout_s: float) -> list[Record]:
        got, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sub.poll(50):
                message = recv(self.sub)[1]
                if isinstance(message, Record):
                    got.append(message)
        return got

    def store(self, messages: list[Message], launcher: Launcher | None = None) -> list[Record]:
        """Publish ``messages`` once the bus carries them (slow joiner) and wait for their records."""
        probe = Transcript(session="probe", t0=0, ts=0.1, text="probe")
        wait_until(
            lambda: any(r.session == "probe" for r in self.records(0.3)),
            30,
            "memory to acknowledge the probe",
            every=lambda: send(self.pub, probe),
            interval=0,
        )
        for message in messages:
            send(self.pub, message)
        acked: list[Record] = []
        mine = lambda: [r for r in acked if r.session == SESSION]  # noqa: E731

        def take() -> None:
            acked.extend(self.records(0.2))
            if launcher is not None:
                launcher.step(timeout_ms=10)

        wait_until(
            lambda: len(mine()) >= len(messages),
            30,
            lambda: f"every record; acknowledged: {acked}",
            every=take,
            interval=0,
        )
        return mine()

    def close(self) -> None:
        self.pub.close(linger=0)
        self.sub.close(linger=0)


def acknowledged_as(message: Message) -> tuple[str, str]:
    if isinstance(message, Clip):
        return ("clip", message.description)
    if isinstance(message, Transcript):
        return ("transcript", message.text)
    assert isinstance(message, Synopsis)
    return ("synopsis", message.text)


def remembered(client: Client) -> dict[str, list[tuple]]:
    """Everything memory holds for the session, by kind, as comparable tuples."""
    out = {}
    for kind in ("clip", "transcript", "event", "synopsis"):
        items = client.history(kinds=[kind]).items
        out[kind] = [(i.item_id, i.t0, i.t1, i.text, i.members) for i in items]
    return out


def test_named_session_survives_sigkill_of_memory_and_a_whole_restart(short_tmp: Path) -> None:
    config = make_config(short_tmp, STAGES, session=SESSION, **TIERS)
    launcher = Launcher(config, short_tmp / "run")
    launcher.start()
    bus = Bus(launcher.run_dir)
    try:
        records = bus.store(FIRST, launcher)
        assert [(r.kind, r.text) for r in records] == [acknowledged_as(m) for m in FIRST]
        with Client.connect(launcher.run_dir, session=SESSION) as client:
            before = remembered(client)
        assert [c[3] for c in before["clip"]] == [m.description for m in FIRST if isinstance(m, Clip)]
        assert len(before["transcript"]) == 3
        # Six records on L1 = 3, L2 = 2: merges happened, and events keep their members' words.
        assert len(before["event"]) >= 2 and all(len(event[4]) >= 2 for event in before["event"])
        spoken = {item[0]: item[3] for item in before["transcript"]}
        for event in before["event"]:
            for member in event[4]:
                assert member not in spoken or f'"{spoken[member]}"' in event[3], event
        assert [s[3] for s in before["synopsis"]] == [FIRST[-1].text]

        memory = launcher.children["memory"]
        old_pid = memory.pid
        os.kill(old_pid, signal.SIGKILL)
        wait_until(
            lambda: memory.ready and memory.pid != old_pid,
            120,
            lambda: f"memory back: {launcher.status_rows()}",
            every=lambda: launcher.step(timeout_ms=100),
            interval=0,
        )
        assert not pid_alive(old_pid)
        with Client.connect(launcher.run_dir, session=SESSION) as client:
            assert remembered(client) == before
    finally:
        bus.close()
        launcher.shutdown()

    # The whole system again, from the command line, with the same session name and data.
    env = {
        **os.environ,
        "OMNISTREAM__PATHS__DATA_DIR": config.paths.data_dir,
        "OMNISTREAM__STAGES": json.dumps(list(STAGES)),
        **{f"OMNISTREAM__{key.upper().replace('.', '__')}": str(value) for key, value in TIERS.items()},
    }
    run_dir = short_tmp / "run2"
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "omnistream.app.cli",
            "up",
            "--json",
            "--session",
            SESSION,
            "--run-dir",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        rows = json.loads(up.stdout.readline())
        assert {r["stage"] for r in rows} == {"bus", *STAGES}
        assert json.loads((run_dir / "config.json").read_text())["session"] == SESSION
        with Client.connect(run_dir, session=SESSION) as client:
            assert remembered(client) == before
            bus = Bus(run_dir)
            try:
                later = bus.store(AFTER_RESTART)
            finally:
                bus.close()
            assert min(r.item_id for r in later) > max(i[0] for kind in before.values() for i in kind)
            assert session_end(client) == 40  # where `omnistream replay --session kitchen` would go on
            after = remembered(client)
        assert after["clip"][:3] == before["clip"] and after["clip"][3][3] == AFTER_RESTART[0].description
        assert after["synopsis"] == before["synopsis"]
        # Consolidation went on from the reloaded tiers: the new records merged with the old.
        assert len(after["event"]) > len(before["event"])
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
