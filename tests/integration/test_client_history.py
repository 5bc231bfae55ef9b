"""History queries by stream-time range: client -> gateway -> memory process -> SQLite and back.

Records reach memory the way perception and speech deliver them: ``Clip`` and final
``Transcript`` messages published on the real bus. Memory is a real process with its real text
embedder.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from omnistream.app.async_client import AsyncClient
from omnistream.app.client import Client
from omnistream.app.launcher import Launcher
from omnistream.protocol.messages import Clip, Transcript
from omnistream.protocol.sockets import make_socket, send

from ..conftest import make_config
from ..util import wait_until

SESSION = "kitchen"


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(64).astype(np.float32)
    return vector / np.linalg.norm(vector)


RECORDS = [
    Clip(session=SESSION, ts=9.5, t0=0.0, clip_id=1, features=unit(1), description="monarch butterfly photo"),
    Transcript(
        session=SESSION,
        ts=6.0,
        t0=2.0,
        text="He might even have been made amiable himself.",
        speaker="scene",
    ),
    Clip(session=SESSION, ts=30.0, t0=9.5, clip_id=2, features=unit(2), description="handwritten word"),
    Transcript(session="elsewhere", ts=5.0, t0=1.0, text="another session's words", speaker="user"),
]


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    root = Path(tmp_path_factory.mktemp("hist"))
    run_dir = Path("/tmp") / f"os-hist-{time.monotonic_ns() % 10**8}"
    launcher = Launcher(make_config(root, ("gateway", "memory")), run_dir)
    launcher.start()
    bus = make_socket(zmq.Context.instance(), zmq.PUB)
    bus.connect(launcher.addresses.bus_in)
    time.sleep(0.5)  # let the subscription reach the new publisher before publishing
    for record in RECORDS:
        send(bus, record)
    with Client.connect(run_dir, session=SESSION, timeout_s=20) as client:
        wait_until(lambda: len(client.history().items) >= 3, 30, "memory to store the records", interval=0.2)
    yield launcher
    bus.close(linger=0)
    launcher.shutdown()


def test_history_returns_the_sessions_records_in_time_order(system: Launcher) -> None:
    with Client.connect(system.run_dir, session=SESSION, timeout_s=20) as client:
        history = client.history(0.0, 60.0)
    assert [(i.kind, i.t0, i.t1) for i in history.items] == [
        ("clip", 0.0, 9.5),
        ("transcript", 2.0, 6.0),
        ("clip", 9.5, 30.0),
    ]
    assert history.items[0].text.startswith("monarch butterfly photo")
    assert history.items[1].text == "He might even have been made amiable himself."
    assert history.items[1].speaker == "scene"
    assert len({i.item_id for i in history.items}) == 3 and not history.truncated


def test_history_filters_by_range_kind_and_limit(system: Launcher) -> None:
    with Client.connect(system.run_dir, session=SESSION, timeout_s=20) as client:
        late = client.history(20.0, 25.0)
        words = client.history(kinds=["transcript"])
        first = client.history(limit=1)
    assert [i.text for i in late.items] == ["handwritten word"]
    assert [i.kind for i in words.items] == ["transcript"]
    assert len(first.items) == 1 and first.truncated


def test_async_history_and_sessions_are_separate(system: Launcher) -> None:
    async def query() -> tuple[list[str], list[str]]:
        async with await AsyncClient.connect(system.run_dir, session="elsewhere", timeout_s=20) as other:
            theirs = [i.text for i in (await other.history()).items]
        async with await AsyncClient.connect(system.run_dir, session="nobody", timeout_s=20) as empty:
            nothing = [i.text for i in (await empty.history()).items]
        return theirs, nothing

    theirs, nothing = asyncio.run(query())
    assert theirs == ["another session's words"]
    assert nothing == []
