"""A watch through the real gateway and memory processes (tests/unit/test_watch_persist.py has the
stages in-process): the Ack comes once memory stored the watch, a refused one gets the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnistream.app.client import Client, ClientError
from omnistream.app.launcher import Launcher
from omnistream.memory.store import MemoryStore

from ..unit.test_memory_and_reasoning import FakeEmbedder
from ..unit.test_watch_persist import CONDITION


def test_the_gateway_acknowledges_a_watch_only_once_memory_stored_it(
    gateway_and_memory: Launcher, short_tmp: Path
) -> None:
    """Real processes: an accepted watch is in memory's database when its Ack arrives; a refused
    one gets the reason instead of an Ack (before: an Ack for both)."""
    with Client.connect(gateway_and_memory.run_dir, session="kitchen", timeout_s=15) as client:
        watch_id = client.watch(CONDITION)
        with pytest.raises(ClientError, match=r"\[invalid\] Watch.condition must have at most 500"):
            client.watch("x" * 600)
    store = MemoryStore(short_tmp / "data" / "memory.sqlite", FakeEmbedder.dim)
    try:
        assert store.watches("kitchen") == [(watch_id, CONDITION, 0.0)]
    finally:
        store.close()
