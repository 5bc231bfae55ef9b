"""Durable memory records: SQLite for records, FAISS for their text vectors.

Every clip and transcript is a row in ``items`` (committed before it is acknowledged, WAL mode,
so a SIGKILL of the memory process loses nothing stored). The FAISS index is derived data:
rebuilt from the rows' embeddings at start-up, one index per session.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

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
"""


@dataclass(frozen=True)
class Item:
    id: int
    session: str
    kind: str
    t0: float
    t1: float
    text: str
    speaker: str
    meta: dict


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
        self.indexes: dict[str, faiss.IndexIDMap2] = {}

    def _index(self, session: str) -> faiss.IndexIDMap2:
        index = self.indexes.get(session)
        if index is None:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            rows = self.db.execute("SELECT id, embedding FROM items WHERE session = ?", (session,)).fetchall()
            if rows:
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                vectors = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
                index.add_with_ids(vectors, ids)
            self.indexes[session] = index
        return index

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
        """Store one record durably; ``embedding``: float32 (dim,), unit length."""
        vector = np.ascontiguousarray(embedding, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.dim:
            raise ValueError(f"embedding has {vector.shape[0]} dims, store expects {self.dim}")
        cursor = self.db.execute(
            "INSERT INTO items (session, kind, t0, t1, text, speaker, embedding, features, meta) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                session,
                kind,
                float(t0),
                float(t1),
                text,
                speaker,
                vector.tobytes(),
                None if features is None else np.ascontiguousarray(features, dtype=np.float32).tobytes(),
                json.dumps(meta or {}),
            ),
        )
        item_id = int(cursor.lastrowid)
        self._index(session).add_with_ids(vector[None, :], np.array([item_id], dtype=np.int64))
        return item_id

    def _items(self, where: str, params: tuple) -> list[Item]:
        rows = self.db.execute(
            f"SELECT id, session, kind, t0, t1, text, speaker, meta FROM items WHERE {where} ORDER BY t0, id",
            params,
        ).fetchall()
        return [Item(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7])) for r in rows]

    def count(self, session: str) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM items WHERE session = ?", (session,)).fetchone()[0])

    def between(self, session: str, t_from: float, t_to: float) -> list[Item]:
        """Records that overlap [t_from, t_to], in time order."""
        return self._items("session = ? AND t1 >= ? AND t0 <= ?", (session, t_from, t_to))

    def search(
        self, session: str, query: np.ndarray, top_k: int, until_ts: float
    ) -> list[tuple[Item, float]]:
        """The ``top_k`` records most similar to ``query`` (float32 (dim,)) that began by ``until_ts``."""
        index = self._index(session)
        if index.ntotal == 0 or top_k <= 0:
            return []
        scores, ids = index.search(np.asarray(query, np.float32).reshape(1, -1), min(index.ntotal, top_k * 4))
        found = {i: float(s) for i, s in zip(ids[0].tolist(), scores[0].tolist(), strict=True) if i >= 0}
        if not found:
            return []
        marks = ",".join("?" * len(found))
        items = self._items(f"id IN ({marks}) AND t0 <= ?", (*found, until_ts))
        ranked = sorted(items, key=lambda item: -found[item.id])[:top_k]
        return [(item, found[item.id]) for item in ranked]

    def features(self, session: str, kind: str = "clip") -> list[tuple[float, np.ndarray]]:
        """(t0, features float32 (D,)) of every record of ``kind`` that has features, in time order."""
        rows = self.db.execute(
            "SELECT t0, features FROM items WHERE session = ? AND kind = ? AND features IS NOT NULL ORDER BY t0, id",
            (session, kind),
        ).fetchall()
        return [(r[0], np.frombuffer(r[1], dtype=np.float32)) for r in rows]

    def sessions(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT session FROM items").fetchall()]

    def close(self) -> None:
        self.db.close()
