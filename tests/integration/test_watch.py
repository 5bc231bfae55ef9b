"""Watches with the real fast LLM: a standing condition fires on a matching record only."""

from __future__ import annotations

import pytest

from omnistream.protocol.config import load_config
from omnistream.protocol.messages import MemoryRecord, Watch
from omnistream.reasoning.llm.engine import LLMEngine
from omnistream.reasoning.llm.prepare import prepare_llm
from omnistream.reasoning.watch import WatchList

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def watches() -> WatchList:
    config = load_config()
    return WatchList(LLMEngine(prepare_llm("qwen2.5-coder-0.5b", config.cache_dir), "auto", 2))


def item(item_id: int, kind: str, text: str, t: float) -> MemoryRecord:
    return MemoryRecord(kind=kind, t0=t, t1=t + 5, text=text, item_id=item_id, speaker="scene")


def test_watch_fires_on_the_matching_record_only(watches: WatchList) -> None:
    watches.add(Watch(session="s", watch_id="w1", condition="a butterfly appears on screen"))
    assert watches.check("s", item(1, "clip", "seen: crossword puzzle (puzzle), space bar", 30)) == []
    alerts = watches.check("s", item(2, "clip", "seen: monarch (butterfly), admiral, ringlet", 90))
    assert [a.watch_id for a in alerts] == ["w1"]
    assert "monarch" in alerts[0].text and alerts[0].ts == 95 and alerts[0].session == "s"
    assert watches.check("other-session", item(3, "clip", "seen: monarch (butterfly)", 100)) == []


def test_bad_watches_are_refused(watches: WatchList) -> None:
    with pytest.raises(ValueError, match="Watch.condition"):
        watches.add(Watch(session="s", watch_id="w2", condition="  "))
    with pytest.raises(ValueError, match="Watch.condition"):
        watches.add(Watch(session="s", watch_id="w3", condition="x" * 501))
