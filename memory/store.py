"""Durable memory records: SQLite for every record, an in-RAM vector index for the working set.

Every clip, transcript, consolidated event and synopsis is a row in ``items``, committed before
it is acknowledged (WAL mode: a SIGKILL of the memory process loses nothing stored). Rows are
never deleted; their ``tier`` says where they stand in the pyramid: "L1" (clips and
transcripts at full detail), "L2" (events), "L3" (synopses), or "archive" (left the working set;
``parent`` is the event that absorbed it, 0 if none). A consolidation step (an event stored and
its sources archived) is one transaction, so a crash leaves either the state before or after.

RAM stays bounded by the tier budgets: the in-RAM index of a session holds only its L1 and L2 rows
(rebuilt from their stored embeddings when the session is loaded); the archive is searched on
disk, a fixed-size chunk of stored vectors at a time. Both are exact inner-product searches in
numpy: FAISS's flat index measured no faster at these sizes (0.6 ms for 10k 384-d vectors, one
thread, either way; BENCHMARKS.md), so it is not a dependency.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnistream.memory.tiers import TierRecord


class VectorIndex:
    """Unit vectors with integer ids; exact inner-product search over all of them."""

    def __init__(self, dim: int):
        self.ids = np.empty(0, np.int64)
        self.vectors = np.empty((0, dim), np.float32)

    @property
    def ntotal(self) -> int:
        return len(self.ids)

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.vectors = np.concatenate([self.vectors, np.asarray(vectors, np.float32)])
        self.ids = np.concatenate([self.ids, np.asarray(ids, np.int64)])

    def remove_ids(self, ids: np.ndarray) -> None:
        keep = ~np.isin(self.ids, ids)
        self.ids, self.vectors = self.ids[keep], self.vectors[keep]

    def scores(self, query: np.ndarray) -> dict[int, float]:
        """Every id with its inner product with ``query`` (dim,)."""
        return dict(zip(self.ids.tolist(), (self.vectors @ query).tolist(), strict=True))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest ``scores``, best first."""
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top], kind="stable")]


SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    session TEXT NOT NULL,
    kind TEXT NOT NULL,
    t0 REAL NOT NULL,
    t1 REAL NOT NULL,
    text TEXT NOT NULL,
    speaker TEXT NOT NULL DEFAULT '',
    embedding BLOB NOT NULL,
    features BLOB,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS items_session_time ON items(session, t1);
CREATE TABLE IF NOT EXISTS watches (
    session TEXT NOT NULL,
    watch_id TEXT NOT NULL,
    condition TEXT NOT NULL,
    ts REAL NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (session, watch_id)
);
"""
# Columns added after the first release: older databases are migrated in place.
ADDED_COLUMNS = {
    "tier": "TEXT NOT NULL DEFAULT 'L1'",
    "parent": "INTEGER NOT NULL DEFAULT 0",
    # wall-clock time (time.time()) the row was stored: retention's age of a session (rows of
    # databases older than the column count from the migration)
    "wall": "REAL NOT NULL DEFAULT 0",
}
LEAF_KINDS = ("clip", "transcript", "sighting")
WORKING_TIERS = ("L1", "L2")
DEFAULT_TIER = {"clip": "L1", "transcript": "L1", "sighting": "L1", "event": "L2", "synopsis": "L3"}
ARCHIVE_CHUNK_ROWS = 2048  # vectors read from disk per step of an archive search
COLUMNS = "id, session, kind, t0, t1, text, speaker, meta, tier, parent"


@dataclass(frozen=True)
class StoredRecord:
    id: int
    session: str
    kind: str
    t0: float
    t1: float
    text: str
    speaker: str
    meta: dict
    tier: str = "L1"
    parent: int = 0

    @property
    def members(self) -> list[int]:
        """Ids of the clips and transcripts an event covers (empty for other kinds)."""
        return [int(part[0]) for part in self.meta.get("parts", [])]


def _blob(vector: np.ndarray | None) -> bytes | None:
    return None if vector is None else np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def _vector(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32).copy()


@dataclass(frozen=True)
class SessionSink:
    """The ``tiers.TierSink`` of one session: consolidation steps go to the store."""

    store: MemoryStore
    session: str

    def save_event(self, event: TierRecord, sources: list[int]) -> int:
        return self.store.save_event(self.session, event, sources)

    def archive(self, item_id: int) -> None:
        self.store.archive(self.session, item_id)


class StoreFull(RuntimeError):
    """A write failed because the database or its disk is full. Nothing stored before is lost
    (the failed write's transaction is rolled back); the message names the file and free space."""


def full_error(path: Path, exc: sqlite3.OperationalError) -> StoreFull | None:
    """A ``StoreFull`` naming ``path`` and its free space for a 'database or disk is full' (or
    ENOSPC) failure, else None."""
    text = str(exc).lower()
    if "full" not in text and "no space" not in text:
        return None
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = -1
    return StoreFull(
        f"memory store {path} is full ({exc}; {free / 1e6:.1f} MB free on its disk): the new record "
        "was not stored, everything stored before is kept. Free disk space, or lower "
        "retention.max_bytes / retention.max_age_days (omnistream sessions lists what is kept)"
    )


class MemoryStore:
    def __init__(self, path: Path, dim: int):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self.dim = dim
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        os.chmod(path, 0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        present = {row[1] for row in self.db.execute("PRAGMA table_info(items)")}
        for name, declaration in ADDED_COLUMNS.items():
            if name not in present:
                self.db.execute(f"ALTER TABLE items ADD COLUMN {name} {declaration}")
                if name == "wall":  # rows stored before: their age counts from now
                    self.db.execute("UPDATE items SET wall = ?", (time.time(),))
        self.db.execute("CREATE INDEX IF NOT EXISTS items_session_tier ON items(session, tier)")
        self.indexes: dict[str, VectorIndex] = {}

    # -- the in-RAM index of the working set -------------------------------------------------------

    def _index(self, session: str) -> VectorIndex:
        index = self.indexes.get(session)
        if index is None:
            index = VectorIndex(self.dim)
            rows = self.db.execute(
                "SELECT id, embedding FROM items WHERE session = ? AND tier IN ('L1', 'L2')", (session,)
            ).fetchall()
            if rows:
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                vectors = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
                index.add_with_ids(vectors, ids)
            self.indexes[session] = index
        return index

    def unload(self, session: str) -> None:
        """Drop a session's in-RAM index (it is rebuilt from disk when needed again)."""
        self.indexes.pop(session, None)

    def working_set_size(self, session: str) -> int:
        return int(self._index(session).ntotal)

    # -- writing -----------------------------------------------------------------------------------

    def write(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        """Execute a write; a full database or disk raises ``StoreFull`` (a clear message naming
        the file and the free space) instead of sqlite's bare error."""
        try:
            return self.db.execute(sql, params)
        except sqlite3.OperationalError as exc:
            full = full_error(self.path, exc)
            if full is None:
                raise
            raise full from exc

    def _insert(
        self,
        session: str,
        kind: str,
        t0: float,
        t1: float,
        text: str,
        vector: np.ndarray,
        speaker: str,
        features: np.ndarray | None,
        meta: dict | None,
        tier: str,
    ) -> int:
        cursor = self.write(
            "INSERT INTO items (session, kind, t0, t1, text, speaker, embedding, features, meta, tier, wall)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                session,
                kind,
                float(t0),
                float(t1),
                text,
                speaker,
                vector.tobytes(),
                _blob(features),
                json.dumps(meta or {}),
                tier,
                time.time(),
            ),
        )
        assert cursor.lastrowid is not None  # an INSERT always sets it
        return cursor.lastrowid

    def _checked(self, embedding: np.ndarray) -> np.ndarray:
        vector = np.ascontiguousarray(embedding, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.dim:
            raise ValueError(f"embedding has {vector.shape[0]} dims, store expects {self.dim}")
        return vector

    def add(
        self,
        session: str,
        kind: str,
        t0: float,
        t1: float,
        text: str,
        embedding: np.ndarray,
        speaker: str = "",
        features: np.ndarray | None = None,
        meta: dict | None = None,
    ) -> int:
        """Store one record durably; ``embedding``: float32 (dim,), unit length. Clips and
        transcripts enter L1, events L2, synopses L3."""
        vector = self._checked(embedding)
        tier = DEFAULT_TIER.get(kind, "L1")
        item_id = self._insert(session, kind, t0, t1, text, vector, speaker, features, meta, tier)
        if tier in WORKING_TIERS and session in self.indexes:
            self.indexes[session].add_with_ids(vector[None, :], np.array([item_id], dtype=np.int64))
        return item_id

    def sink(self, session: str) -> SessionSink:
        return SessionSink(self, session)

    def save_event(self, session: str, event: TierRecord, sources: list[int]) -> int:
        """Store ``event`` in L2 and archive its ``sources`` under it, in one transaction."""
        vector = self._checked(event.embedding)
        meta = {
            "parts": [part.to_json() for part in event.parts],
            "merged": sources,
            "weight": event.feature_weight,
        }
        self.db.execute("BEGIN IMMEDIATE")
        try:
            item_id = self._insert(
                session, "event", event.t0, event.t1, event.text, vector, "", event.features, meta, "L2"
            )
            marks = ",".join("?" * len(sources))
            self.write(
                f"UPDATE items SET tier = 'archive', parent = ? WHERE id IN ({marks})", (item_id, *sources)
            )
            self.write("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        if session in self.indexes:
            index = self.indexes[session]
            index.remove_ids(np.array(sources, dtype=np.int64))
            index.add_with_ids(vector[None, :], np.array([item_id], dtype=np.int64))
        return item_id

    def archive(self, session: str, item_id: int) -> None:
        """Move one record out of the working set (it stays on disk and searchable)."""
        self.write("UPDATE items SET tier = 'archive' WHERE id = ?", (item_id,))
        if session in self.indexes:
            self.indexes[session].remove_ids(np.array([item_id], dtype=np.int64))

    # -- reading -----------------------------------------------------------------------------------

    @staticmethod
    def _item(row: tuple) -> StoredRecord:
        """A ``StoredRecord`` from the first columns of a row selected with ``COLUMNS``."""
        return StoredRecord(
            row[0], row[1], row[2], row[3], row[4], row[5], row[6], json.loads(row[7]), row[8], row[9]
        )

    def _items(self, where: str, params: tuple) -> list[StoredRecord]:
        order = "" if "ORDER BY" in where else " ORDER BY t0, id"
        rows = self.db.execute(f"SELECT {COLUMNS} FROM items WHERE {where}{order}", params).fetchall()
        return [self._item(row) for row in rows]

    def count(self, session: str, kinds: tuple[str, ...] = LEAF_KINDS) -> int:
        marks = ",".join("?" * len(kinds))
        return int(
            self.db.execute(
                f"SELECT COUNT(*) FROM items WHERE session = ? AND kind IN ({marks})", (session, *kinds)
            ).fetchone()[0]
        )

    def between(
        self,
        session: str,
        t_from: float,
        t_to: float,
        kinds: tuple[str, ...] = LEAF_KINDS,
        limit: int = -1,
        newest: bool = False,
    ) -> list[StoredRecord]:
        """Records of ``kinds`` that overlap [t_from, t_to]: the first ``limit`` in time order, or
        with ``newest`` the ``limit`` that end last, the last-ending first."""
        marks = ",".join("?" * len(kinds))
        order = "t1 DESC, id DESC" if newest else "t0, id"
        return self._items(
            f"session = ? AND t1 >= ? AND t0 <= ? AND kind IN ({marks}) ORDER BY {order} LIMIT {int(limit)}",
            (session, t_from, t_to, *kinds),
        )

    def after(self, session: str, after_id: int, kinds: tuple[str, ...], limit: int) -> list[StoredRecord]:
        """The first ``limit`` records of ``kinds`` with ids above ``after_id``, in id order (a
        session's history page by page)."""
        marks = ",".join("?" * len(kinds))
        return self._items(
            f"session = ? AND id > ? AND kind IN ({marks}) ORDER BY id LIMIT {int(limit)}",
            (session, after_id, *kinds),
        )

    def sightings(self, session: str, label: str, until_ts: float) -> list[StoredRecord]:
        """The tracker's records about COCO class ``label`` up to ``until_ts``, in time order."""
        return self._items(
            "session = ? AND kind = 'sighting' AND json_extract(meta, '$.label') = ? AND t0 <= ? "
            "ORDER BY t0, id LIMIT -1",
            (session, label, until_ts),
        )

    def tier_rows(
        self, session: str, tier: str
    ) -> Iterator[tuple[StoredRecord, np.ndarray, np.ndarray | None]]:
        """(item, embedding, features) of every row of ``tier``, in time order."""
        cursor = self.db.execute(
            f"SELECT {COLUMNS}, embedding, features FROM items WHERE session = ? AND tier = ? ORDER BY t0, id",
            (session, tier),
        )
        for row in cursor:
            yield self._item(row), np.frombuffer(row[10], dtype=np.float32).copy(), _vector(row[11])

    def latest(self, session: str, kind: str, until_ts: float) -> StoredRecord | None:
        """The last stored record of ``kind`` that ends by ``until_ts``."""
        row = self.db.execute(
            f"SELECT {COLUMNS} FROM items WHERE session = ? AND kind = ? AND t1 <= ? ORDER BY id DESC LIMIT 1",
            (session, kind, until_ts),
        ).fetchone()
        return None if row is None else self._item(row)

    def latest_end(self, session: str) -> float:
        """End of the session's newest clip or transcript (0 for an empty session)."""
        row = self.db.execute(
            "SELECT MAX(t1) FROM items WHERE session = ? AND kind IN ('clip', 'transcript')", (session,)
        ).fetchone()
        return float(row[0] or 0.0)

    def _archive_scores(self, session: str, query: np.ndarray, k: int, until_ts: float) -> dict[int, float]:
        """The ``k`` archived records closest to ``query`` (1, dim), read from disk chunk by chunk."""
        best: dict[int, float] = {}
        cursor = self.db.execute(
            "SELECT id, embedding FROM items WHERE session = ? AND tier = 'archive' AND t0 <= ?",
            (session, until_ts),
        )
        while rows := cursor.fetchmany(ARCHIVE_CHUNK_ROWS):
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(
                len(rows), self.dim
            )
            scores = vectors @ query[0]
            for at in top_k(scores, k).tolist():
                best[int(rows[at][0])] = float(scores[at])
            best = dict(sorted(best.items(), key=lambda kv: -kv[1])[:k])
        return best

    def search(
        self, session: str, query: np.ndarray, top_k: int, until_ts: float, archive_only: bool = False
    ) -> list[tuple[StoredRecord, float]]:
        """The ``top_k`` records most similar to ``query`` (float32 (dim,)) that began by
        ``until_ts``: the working set through its in-RAM index, the archive from disk."""
        if top_k <= 0:
            return []
        vector = np.ascontiguousarray(query, np.float32).reshape(1, -1)
        found: dict[int, float] = {}
        index = self._index(session)
        if index.ntotal and not archive_only:
            found = index.scores(vector[0])
        found.update(self._archive_scores(session, vector, top_k, until_ts))
        if not found:
            return []
        marks = ",".join("?" * len(found))
        items = self._items(f"id IN ({marks}) AND t0 <= ?", (*found, until_ts))
        ranked = sorted(items, key=lambda item: (-found[item.id], item.id))[:top_k]
        return [(item, found[item.id]) for item in ranked]

    def similarities(self, session: str, query: np.ndarray, ids: list[int]) -> dict[int, float]:
        """The text similarity (dot product of unit embeddings) of ``query`` (float32 (dim,)) with
        each of the session's records ``ids``."""
        scores: dict[int, float] = {}
        vector = np.ascontiguousarray(query, np.float32).reshape(-1)
        for start in range(0, len(ids), ARCHIVE_CHUNK_ROWS):
            chunk = ids[start : start + ARCHIVE_CHUNK_ROWS]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT id, embedding FROM items WHERE session = ? AND id IN ({marks})", (session, *chunk)
            ).fetchall()
            for item_id, blob in rows:
                scores[int(item_id)] = float(np.frombuffer(blob, dtype=np.float32) @ vector)
        return scores

    def features(self, session: str, kind: str = "clip") -> Iterator[tuple[float, np.ndarray]]:
        """(t0, features float32 (D,)) of every record of ``kind`` that has features, in time order
        (streamed from disk)."""
        cursor = self.db.execute(
            "SELECT t0, features FROM items WHERE session = ? AND kind = ? AND features IS NOT NULL ORDER BY t0, id",
            (session, kind),
        )
        for t0, blob in cursor:
            yield t0, np.frombuffer(blob, dtype=np.float32)

    # -- watches (standing questions; reasoning loads a session's on first contact) ---------------

    def save_watch(self, session: str, watch_id: str, condition: str, ts: float) -> None:
        """Store (or replace) a watch durably."""
        self.write(
            "INSERT INTO watches (session, watch_id, condition, ts, created) VALUES (?,?,?,?,?)"
            " ON CONFLICT (session, watch_id) DO UPDATE SET condition = excluded.condition, ts = excluded.ts",
            (session, watch_id, condition, float(ts), time.time()),
        )

    def delete_watch(self, session: str, watch_id: str) -> bool:
        cursor = self.db.execute(
            "DELETE FROM watches WHERE session = ? AND watch_id = ?", (session, watch_id)
        )
        return cursor.rowcount > 0

    def watches(self, session: str) -> list[tuple[str, str, float]]:
        """(watch_id, condition, ts) of the session's watches, oldest first."""
        rows = self.db.execute(
            "SELECT watch_id, condition, ts FROM watches WHERE session = ? ORDER BY created, rowid",
            (session,),
        )
        return [(r[0], r[1], float(r[2])) for r in rows]

    def sessions(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT session FROM items").fetchall()]

    # -- retention (memory/retention.py) -------------------------------------------------------------

    def session_stats(self) -> list[tuple[str, float, float, int, int, float]]:
        """(session, first t0, last t1, records, bytes of their rows, wall time of the newest)
        for every session with records."""
        rows = self.db.execute(
            "SELECT session, MIN(t0), MAX(t1), COUNT(*), SUM(length(text) + length(embedding)"
            " + IFNULL(length(features), 0) + length(meta) + length(speaker) + 64), MAX(wall)"
            " FROM items GROUP BY session"
        ).fetchall()
        return [(r[0], float(r[1]), float(r[2]), int(r[3]), int(r[4]), float(r[5])) for r in rows]

    def delete_session(self, session: str) -> int:
        """Delete every record and watch of ``session`` in one transaction; the rows deleted."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            deleted = self.db.execute("DELETE FROM items WHERE session = ?", (session,)).rowcount
            self.db.execute("DELETE FROM watches WHERE session = ?", (session,))
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.unload(session)
        return deleted

    def used_bytes(self) -> int:
        """Bytes of the database's pages in use (deleted rows' pages are free and reused, so the
        file does not shrink, but it does not grow until they are used up)."""
        page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def close(self) -> None:
        self.db.close()
