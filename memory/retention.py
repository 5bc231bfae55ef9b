"""What is kept on disk, per session, and what goes: the retention policy and `omnistream sessions`.

A session's data on disk: its records in memory's SQLite (``items`` rows and its watches) and
the KV blocks reasoning spilled for it under ``data_dir/kv/<model fingerprint>/<session dir>``
(``reasoning.answer.session_dir_name``, copied here as ``kv_dir_name``: the memory process does
not import torch; tests check that both agree). Retention (``retention.*``, applied by memory)
deletes whole sessions, the least recently active first:

- a session with no new record for ``max_age_days`` is deleted;
- while records and spilled KV together exceed ``max_bytes``, the least recently active session
  is deleted;
- a session active within ``keep_recent_s`` (a new record, or any message memory handled for it)
  is never deleted; when the active sessions alone exceed ``max_bytes`` it is said (a warning,
  counter ``retention_over_budget``) and nothing else is deleted;
- spilled KV of no known session (its records deleted while reasoning was away, another
  model's) is deleted once it is ``max_age_days`` old.

Stage logs are rotated by the launcher (``launcher.log_max_bytes``, ``log_backups``), not here.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from omnistream.memory.store import MemoryStore
from omnistream.protocol.config import RetentionConfig

log = logging.getLogger("omnistream.memory")

KV_DIR = "kv"
DAY_S = 86400.0


def kv_dir_name(session: str) -> str:
    """The directory of a session's spilled KV: ``reasoning.answer.session_dir_name``."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", session)[:48]
    return f"{readable}-{hashlib.sha256(session.encode()).hexdigest()[:12]}"


def kv_dirs(data_dir: Path, session: str) -> list[Path]:
    """The session's spilled-KV directories (one per model fingerprint that spilled for it)."""
    root = data_dir / KV_DIR
    if not root.is_dir():
        return []
    name = kv_dir_name(session)
    return sorted(path for path in (fp / name for fp in root.iterdir() if fp.is_dir()) if path.is_dir())


def tree_bytes(path: Path) -> int:
    total = 0
    for child in path.rglob("*") if path.is_dir() else ():
        try:
            if child.is_file():
                total += child.stat().st_size
        except OSError:  # deleted meanwhile
            pass
    return total


@dataclass(frozen=True)
class SessionUsage:
    session: str
    first_ts: float  # stream time of its first record (seconds)
    last_ts: float  # ... and the end of its last
    records: int
    record_bytes: int  # about what its rows take in the database
    kv_bytes: int  # its spilled KV files
    last_active: float  # wall clock (time.time()) of its newest record

    @property
    def bytes(self) -> int:
        return self.record_bytes + self.kv_bytes


def usage(store: MemoryStore, data_dir: Path) -> list[SessionUsage]:
    """Every session with records, the least recently active first."""
    found = [
        SessionUsage(
            session,
            first,
            last,
            records,
            record_bytes,
            sum(map(tree_bytes, kv_dirs(data_dir, session))),
            wall,
        )
        for session, first, last, records, record_bytes, wall in store.session_stats()
    ]
    return sorted(found, key=lambda u: (u.last_active, u.session))


def disk_bytes(store: MemoryStore, data_dir: Path) -> int:
    """What retention counts: the database's pages in use and every spilled KV file."""
    return store.used_bytes() + tree_bytes(data_dir / KV_DIR)


def delete_session(store: MemoryStore, data_dir: Path, session: str) -> int:
    """Delete the session's records, watches and spilled KV; the records deleted."""
    deleted = store.delete_session(session)
    for path in kv_dirs(data_dir, session):
        shutil.rmtree(path, ignore_errors=True)
    return deleted


def delete_orphan_kv(data_dir: Path, known: set[str], older_than: float) -> list[Path]:
    """Spilled-KV directories of no session in ``known`` not written since ``older_than``."""
    root = data_dir / KV_DIR
    names = {kv_dir_name(session) for session in known}
    removed = []
    for path in sorted(root.glob("*/*")) if root.is_dir() else []:
        if path.is_dir() and path.name not in names:
            try:
                newest = max([path.stat().st_mtime, *(c.stat().st_mtime for c in path.iterdir())])
            except OSError:
                continue
            if newest < older_than:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def apply_retention(
    store: MemoryStore,
    data_dir: Path,
    config: RetentionConfig,
    active: dict[str, float] | None = None,
    now: float | None = None,
) -> tuple[list[str], bool]:
    """Delete what ``config`` does not keep: the sessions deleted, and whether the sessions kept
    (all active) still exceed ``max_bytes``. ``active``: session -> wall
    time of the last message memory handled for it (those within ``keep_recent_s`` are kept)."""
    now = time.time() if now is None else now
    active = active or {}
    sessions = usage(store, data_dir)

    def protected(u: SessionUsage) -> bool:
        last = max(u.last_active, active.get(u.session, 0.0))
        return now - last < config.keep_recent_s

    deleted: list[str] = []
    kept: list[SessionUsage] = []
    for u in sessions:
        if config.max_age_days > 0 and not protected(u) and now - u.last_active > config.max_age_days * DAY_S:
            delete_session(store, data_dir, u.session)
            deleted.append(u.session)
        else:
            kept.append(u)
    if config.max_age_days > 0:
        delete_orphan_kv(data_dir, {u.session for u in kept}, now - config.max_age_days * DAY_S)
    over = False
    if config.max_bytes > 0:
        total = disk_bytes(store, data_dir)
        for u in kept:  # least recently active first
            if total <= config.max_bytes:
                break
            if protected(u):
                continue
            delete_session(store, data_dir, u.session)
            deleted.append(u.session)
            total = disk_bytes(store, data_dir)
        over = total > config.max_bytes
        if over:
            log.warning(
                "over retention.max_bytes with only active sessions left",
                extra={"bytes": total, "max_bytes": config.max_bytes},
            )
    if deleted:
        log.info("retention deleted sessions", extra={"sessions": deleted[:20], "count": len(deleted)})
    return deleted, over
