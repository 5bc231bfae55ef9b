"""Ctrl-C loses nothing that was already seen or heard: the ordered, draining shutdown.

Real processes. ``omnistream up`` (gateway, perception, memory) is fed the bundled recording as a
client would feed it, and is stopped with SIGINT (Ctrl-C) in the middle of a scene: the open clip
(14 s .. the stop) must reach memory's disk before the stages exit, so a restart on the same data
finds it. Then memory's backlog: records published just before the stop are all stored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq

from omnistream.app.client import Client
from omnistream.app.launcher import Launcher
from omnistream.app.replay import DEFAULT_SAMPLE
from omnistream.perception.sources import AUDIO_RATE, MediaReader
from omnistream.protocol.messages import Record, Transcript
from omnistream.protocol.sockets import Addresses, make_socket, recv, send

from ..conftest import make_config, pid_alive
from ..util import wait_until

STAGES = ("gateway", "perception", "memory")
STOP_AT_S = 24.0  # the sample's second scene runs 14.0 .. 27.9 s: this stops inside it
SPEED = 3.0


def up(data_dir: Path, run_dir: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMNISTREAM__PATHS__DATA_DIR": str(data_dir),
        "OMNISTREAM__STAGES": json.dumps(list(STAGES)),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "omnistream.app.cli", "up", "--json", "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    rows = json.loads(process.stdout.readline())
    assert {r["stage"] for r in rows} == {"bus", *STAGES}
    return process


def feed(client: Client, until_s: float, speed: float) -> float:
    """Push the recording's frames and sound paced at ``speed`` x real time up to ``until_s``."""
    start = time.monotonic()
    last = 0.0
    for event in MediaReader(DEFAULT_SAMPLE, max_fps=10):
        if event.ts > until_s:
            break
        time.sleep(max(start + event.ts / speed - time.monotonic(), 0.0))
        if event.kind == "video":
            client.push_frame(event.data, event.ts)
            last = event.ts
        else:
            client.push_audio(event.data, AUDIO_RATE, event.ts, channel="scene")
    return last


def test_ctrl_c_in_the_middle_of_a_scene_keeps_the_open_clip(short_tmp: Path) -> None:
    data_dir = short_tmp / "data"
    process = up(data_dir, short_tmp / "run")
    pids = []
    try:
        with Client.connect(short_tmp / "run") as client:
            pids = [s.pid for name, s in client.status().stages.items() if name in STAGES]
            last = feed(client, STOP_AT_S, SPEED)
        stop_started = time.monotonic()
        process.send_signal(signal.SIGINT)  # Ctrl-C, right after the last frame went out
        assert process.wait(timeout=60) == 0
        shutdown_s = time.monotonic() - stop_started
    finally:
        if process.poll() is None:
            process.kill()
    assert pids and not any(pid_alive(pid) for pid in pids)
    print(f"shutdown took {shutdown_s:.2f} s")
    assert shutdown_s < 30

    config = make_config(short_tmp, STAGES)
    launcher = Launcher(config, short_tmp / "run2")
    started = time.monotonic()
    launcher.start()
    print(f"restart took {time.monotonic() - started:.2f} s")
    try:
        with Client.connect(launcher.run_dir) as client:
            clips = client.history(kinds=["clip"]).items
    finally:
        launcher.shutdown()
    assert clips, "no clip at all"
    newest = clips[-1]
    # The scene that was open at Ctrl-C: from its cut (14 s) to (about) the last frame pushed.
    assert newest.t0 <= 15.0 and newest.t1 >= last - 1.5, [(c.t0, c.t1) for c in clips]


def test_memory_stores_its_backlog_before_it_stops(short_tmp: Path) -> None:
    config = make_config(short_tmp, ("gateway", "memory"))
    launcher = Launcher(config, short_tmp / "run")
    launcher.start()
    count = 150
    try:
        addresses = Addresses.load(launcher.run_dir)
        ctx = zmq.Context.instance()
        pub = make_socket(ctx, zmq.PUB)
        pub.connect(addresses.bus_in)
        sub = make_socket(ctx, zmq.SUB)
        sub.connect(addresses.bus_out)
        sub.setsockopt(zmq.SUBSCRIBE, b"Record")
        try:

            def probe() -> None:
                send(pub, Transcript(session="probe", t0=0, ts=0.1, text="probe"))
                launcher.step(timeout_ms=10)

            # the bus carries our messages (slow joiner): a probe is stored
            wait_until(lambda: sub.poll(200), 30, "memory to acknowledge the probe", every=probe, interval=0)
            assert isinstance(recv(sub)[1], Record)
            for i in range(count):  # faster than memory embeds and stores them
                send(pub, Transcript(session="backlog", t0=i, ts=i + 0.5, text=f"sentence number {i}"))
            time.sleep(0.2)  # in the bus and memory's socket, not yet stored
        finally:
            pub.close(linger=1000)
            sub.close(linger=0)
    finally:
        launcher.shutdown()

    again = Launcher(config, short_tmp / "run2")
    again.start()
    try:
        with Client.connect(again.run_dir, session="backlog") as client:
            stored = client.history(kinds=["transcript"], limit=1000).items
    finally:
        again.shutdown()
    assert len(stored) == count, f"{len(stored)} of {count} stored"
