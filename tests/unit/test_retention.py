"""Issue #18 item 11: disk use is bounded and a full disk loses nothing.

Retention (``retention.*``) deletes whole sessions (records, watches, spilled KV), the least
recently active first: past ``max_age_days``, or while the data exceeds ``max_bytes``; never a
session active within ``keep_recent_s``. ``omnistream sessions`` lists sessions with their
sizes and deletes one (refusing a live one unless ``--force``). A write to a full database
raises a clear ``StoreFull`` and everything stored before stays.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from omnistream.app import cli
from omnistream.memory.retention import apply_retention, kv_dir_name, usage
from omnistream.memory.stage import MemoryStage
from omnistream.memory.store import MemoryStore, StoreFull
from omnistream.protocol.config import MemoryConfig, RetentionConfig
from omnistream.protocol.messages import (
    DeleteSession,
    HistoryRequest,
    Message,
    Record,
    Transcript,
    Watch,
)

from .test_memory_and_reasoning import FakeEmbedder

DAY = 86400.0


def stage_in(data_dir: Path, published: list[Message], **retention) -> MemoryStage:
    data_dir.mkdir(parents=True, exist_ok=True)
    return MemoryStage(
        MemoryConfig(),
        MemoryStore(data_dir / "memory.sqlite", FakeEmbedder.dim),
        FakeEmbedder(),  # type: ignore[arg-type]
        published.append,
        data_dir=data_dir,
        retention=RetentionConfig(**retention),
    )


def spill(data_dir: Path, session: str, nbytes: int, fingerprint: str = "fp1") -> Path:
    """A spilled KV block file of ``session``, where reasoning writes them."""
    path = data_dir / "kv" / fingerprint / kv_dir_name(session)
    path.mkdir(parents=True, exist_ok=True)
    (path / "block-00000001.safetensors").write_bytes(os.urandom(nbytes))
    return path


def test_kv_directory_names_are_reasonings() -> None:
    from omnistream.reasoning.answer import session_dir_name

    for name in ("default", "kitchen", "../etc", "a/b", "é" * 80, "web-1234", ".."):
        assert kv_dir_name(name) == session_dir_name(name)


def test_retention_deletes_old_then_least_recent_sessions_but_never_an_active_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    published: list[Message] = []
    stage = stage_in(data, published, max_age_days=30, max_bytes=3_000_000, keep_recent_s=3600)
    for session in ("old", "mid", "recent", "live"):
        for i in range(5):
            stage.handle(
                Transcript(session=session, t0=10.0 * i, ts=10.0 * i + 5, text=f"{session} line {i}")
            )
    stage.on_watch(Watch(session="old", watch_id="w", condition="a person enters"))
    now = time.time()
    ages = {"old": 40 * DAY, "mid": 3 * DAY, "recent": 2 * DAY, "live": 0.0}
    for session, age in ages.items():
        stage.store.db.execute("UPDATE items SET wall = ? WHERE session = ?", (now - age, session))
    stage.active.clear()  # as after a restart: only the stored times say who is active
    stage.touch("live")
    kv = {session: spill(data, session, 1_000_000) for session in ages}
    orphan = spill(data, "deleted long ago", 500_000, fingerprint="fp0")
    os.utime(orphan, (now - 40 * DAY, now - 40 * DAY))
    os.utime(orphan / "block-00000001.safetensors", (now - 40 * DAY, now - 40 * DAY))
    before = {u.session: u for u in usage(stage.store, data)}
    assert before["old"].records == 5 and before["old"].kv_bytes == 1_000_000
    assert before["old"].first_ts == 0.0 and before["old"].last_ts == 45.0

    published.clear()
    stage.tick()  # retention at start
    # "old" is past 30 days; 3 MB of KV is over budget (3 MB + the database): "mid", the least
    # recently active of the rest, goes; "recent" then fits; "live" is never a candidate.
    assert sorted(stage.store.sessions()) == ["live", "recent"]
    assert [m.session for m in published if isinstance(m, DeleteSession)] == ["old", "mid"]
    assert not kv["old"].exists() and not kv["mid"].exists() and not orphan.exists()
    assert kv["recent"].exists() and kv["live"].exists()
    assert stage.store.watches("old") == []
    assert stage.counters["sessions_deleted"] == 2 and stage.counters["retention_over_budget"] == 0

    # Over budget with only active sessions left: nothing more is deleted, and it is counted.
    deleted, over = apply_retention(
        stage.store, data, RetentionConfig(max_bytes=100_000, keep_recent_s=3 * DAY), dict(stage.active)
    )
    assert deleted == [] and over
    assert sorted(stage.store.sessions()) == ["live", "recent"]
    stage.store.close()


def test_a_full_database_gives_a_clear_error_and_loses_nothing(tmp_path: Path) -> None:
    """A real full database: SQLite limited to a few pages (PRAGMA max_page_count), as a full
    disk makes it fail ("database or disk is full")."""
    data = tmp_path / "data"
    published: list[Message] = []
    stage = stage_in(data, published)
    pages = stage.store.db.execute("PRAGMA page_count").fetchone()[0]
    stage.store.db.execute(f"PRAGMA max_page_count = {pages + 8}")
    error = None
    for i in range(1000):
        try:
            stage.handle(Transcript(session="s", t0=float(i), ts=i + 0.5, text=f"line {i} " + "x" * 400))
        except StoreFull as exc:
            error = exc
            break
    assert error is not None, "the database never filled up"
    assert isinstance(error.__cause__, sqlite3.OperationalError) and "full" in str(error.__cause__)
    message = str(error)
    assert str(data / "memory.sqlite") in message and "MB free" in message, message
    assert "retention.max_bytes" in message and "everything stored before is kept" in message
    assert stage.counters["store_full"] == 1
    stored = [m for m in published if isinstance(m, Record)]
    assert len(stored) >= 3  # every record announced before the failure ...
    history = stage.history(HistoryRequest(session="s", request_id="h"))
    assert [item.item_id for item in history.items] == [r.item_id for r in stored]  # ... is there
    # Reopened from disk (a restart), all of it is still there.
    stage.store.close()
    again = MemoryStore(data / "memory.sqlite", FakeEmbedder.dim)
    assert again.count("s") == len(stored)
    again.add("s", "transcript", 2000.0, 2001.0, "after space was freed", FakeEmbedder().embed(["a"])[0])
    assert again.count("s") == len(stored) + 1
    again.close()


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    return int(exited.value.code or 0), capsys.readouterr().out


def test_sessions_command_lists_and_deletes_without_a_running_system(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("OMNISTREAM_RUN_DIR", str(tmp_path / "no-system"))
    data = tmp_path / "data"
    stage = stage_in(data, [])
    for session in ("a", "b"):
        for i in range(3):
            stage.handle(Transcript(session=session, t0=10.0 * i, ts=10.0 * i + 5, text=f"{session} {i}"))
    stage.store.close()
    kv = spill(data, "a", 2_000_000)
    config = ["--set", f"paths.data_dir={data}", "--json"]
    code, out = run_cli(["sessions", *config], capsys)
    assert code == 0
    listed = {row["session"]: row for row in json.loads(out)}
    assert set(listed) == {"a", "b"}
    assert listed["a"]["records"] == 3 and listed["a"]["kv_bytes"] == 2_000_000
    assert listed["a"]["bytes"] > 2_000_000 and listed["a"]["last_ts"] == 25.0
    code, out = run_cli(["sessions", "delete", "a", *config], capsys)
    assert code == 0 and json.loads(out) == {"deleted": "a"}
    assert not kv.exists()
    code, out = run_cli(["sessions", *config], capsys)
    assert [row["session"] for row in json.loads(out)] == ["b"]
