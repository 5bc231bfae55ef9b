"""The memory pyramid's consolidation: L1 clips and transcripts merge upward into L2 events.

Each level is a time-ordered list with a fixed budget (VideoChat-Online's pyramid memory bank):
- L1 holds clips and transcripts at full detail. When it holds more than its budget, the two
  *adjacent* entries with the highest similarity merge into one L2 event and leave L1.
- L2 holds events. When it holds more than its budget, its most similar adjacent pair merges
  into one larger event, provided the merged text stays within ``event_max_chars``; when no pair
  fits, the oldest event leaves L2 for the archive.
Nothing is deleted: entries that leave a level stay on disk in the archive, searchable.

Similarity of two entries: the cosine of their text embeddings, averaged with the cosine of
their visual features when both have them. Ties go to the oldest pair. An event's embedding (and
features) is the mean of its two halves' unit vectors weighted by how many records each covers,
and its text keeps every part with its stream time: clip descriptions once each (a repeat adds
its time span to the first), transcripts verbatim.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from omnistream.protocol.text import clock

REPEAT_MARK = re.compile(r" \(same scene as at [^)]*\)$")
SPEAKERS = {"user": "the user said", "assistant": "you said"}


def unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


@dataclass(frozen=True)
class MemberRecord:
    """One clip or transcript inside an entry. ``text``: a clip's description without its repeat
    mark, or a transcript verbatim."""

    item_id: int
    kind: str
    t0: float
    t1: float
    text: str
    speaker: str = ""

    def to_json(self) -> list:
        return [self.item_id, self.kind, self.t0, self.t1, self.text, self.speaker]

    @classmethod
    def from_json(cls, row: list) -> MemberRecord:
        return cls(int(row[0]), str(row[1]), float(row[2]), float(row[3]), str(row[4]), str(row[5]))


@dataclass
class TierRecord:
    """A record in L1 or L2. ``embedding``: float32 (dim,), unit; ``features``: float32 (D,),
    unit, or None (transcripts). ``weight``: how many parts its means are taken over."""

    item_id: int
    kind: str  # "clip", "transcript" or "event"
    t0: float
    t1: float
    text: str
    embedding: np.ndarray
    features: np.ndarray | None = None
    parts: list[MemberRecord] = field(default_factory=list)
    speaker: str = ""
    feature_weight: int = 1  # parts that had features

    @property
    def members(self) -> list[int]:
        return [part.item_id for part in self.parts]

    @property
    def order(self) -> tuple[float, int]:
        return (self.t0, self.item_id)


def leaf(
    item_id: int,
    kind: str,
    t0: float,
    t1: float,
    text: str,
    embedding: np.ndarray,
    features: np.ndarray | None = None,
    speaker: str = "",
    base_text: str | None = None,
) -> TierRecord:
    """An L1 entry for one stored clip or transcript (``base_text``: a clip's description
    without its repeat mark; derived from ``text`` when not given)."""
    part_text = (
        base_text if base_text is not None else (REPEAT_MARK.sub("", text) if kind == "clip" else text)
    )
    return TierRecord(
        item_id=item_id,
        kind=kind,
        t0=t0,
        t1=t1,
        text=text,
        embedding=unit(embedding),
        features=None if features is None else unit(features),
        parts=[MemberRecord(item_id, kind, t0, t1, part_text, speaker)],
        speaker=speaker,
        feature_weight=0 if features is None else 1,
    )


def similarity(a: TierRecord, b: TierRecord) -> float:
    text = float(a.embedding @ b.embedding)
    if a.features is None or b.features is None or a.features.shape != b.features.shape:
        return text
    return (text + float(a.features @ b.features)) / 2.0


def render(parts: list[MemberRecord]) -> str:
    """The text of an event: its parts in time order, each with its stream time."""
    pieces: list[list] = []  # [description, spans] for clips, [text] for transcripts
    by_description: dict[str, list] = {}
    for part in sorted(parts, key=lambda p: (p.t0, p.item_id)):
        span = f"{clock(part.t0)}-{clock(part.t1)}"
        if part.kind == "clip":
            description = part.text.removeprefix("seen: ")
            if description in by_description:
                by_description[description][1].append(span)
                continue
            piece = [description, [span]]
            by_description[description] = piece
            pieces.append(piece)
        elif part.kind == "sighting":
            pieces.append([part.text])
        else:
            who = SPEAKERS.get(part.speaker, "a voice said")
            pieces.append([f'{clock(part.t0)} {who}: "{part.text}"'])
    return "; ".join(f"{', '.join(p[1])} on screen: {p[0]}" if len(p) == 2 else p[0] for p in pieces)


def _weighted_mean(a: np.ndarray, wa: int, b: np.ndarray, wb: int) -> np.ndarray:
    return unit((a * wa + b * wb) / max(wa + wb, 1))


def merge(a: TierRecord, b: TierRecord) -> TierRecord:
    """One event covering ``a`` and ``b`` (item_id 0 until it is stored)."""
    parts = sorted(a.parts + b.parts, key=lambda p: (p.t0, p.item_id))
    if a.features is not None and b.features is not None and a.features.shape == b.features.shape:
        features: np.ndarray | None = _weighted_mean(
            a.features, a.feature_weight, b.features, b.feature_weight
        )
    else:
        features = a.features if a.features is not None else b.features
    return TierRecord(
        item_id=0,
        kind="event",
        t0=min(a.t0, b.t0),
        t1=max(a.t1, b.t1),
        text=render(parts),
        embedding=_weighted_mean(a.embedding, len(a.parts), b.embedding, len(b.parts)),
        features=features,
        parts=parts,
        feature_weight=a.feature_weight + b.feature_weight,
    )


def most_similar_pair(
    entries: list[TierRecord], allowed: Callable[[TierRecord, TierRecord], bool] | None = None
) -> int | None:
    """Index i of the adjacent pair (i, i+1) with the highest similarity (the oldest on ties)."""
    best, best_score = None, -np.inf
    for i in range(len(entries) - 1):
        if allowed is not None and not allowed(entries[i], entries[i + 1]):
            continue
        score = similarity(entries[i], entries[i + 1])
        if score > best_score:
            best, best_score = i, score
    return best


class TierSink(Protocol):
    """Where consolidation steps are made durable (``MemoryStore.sink(session)``)."""

    def save_event(self, event: TierRecord, sources: list[int]) -> int: ...  # returns the event's id

    def archive(self, item_id: int) -> None: ...


@dataclass
class Pyramid:
    """L1 and L2 of one session. Every step is persisted through ``sink`` before the lists
    change, so a crash between steps leaves the disk in a state this class reloads from."""

    l1_budget: int
    l2_budget: int
    event_max_chars: int
    sink: TierSink
    l1: list[TierRecord] = field(default_factory=list)
    l2: list[TierRecord] = field(default_factory=list)
    merges: int = 0  # consolidation steps so far (for stats)
    archived: int = 0

    @staticmethod
    def _insert(level: list[TierRecord], entry: TierRecord) -> None:
        index = len(level)
        while index > 0 and level[index - 1].order > entry.order:
            index -= 1
        level.insert(index, entry)

    def load(self, l1: list[TierRecord], l2: list[TierRecord]) -> None:
        """Restore the levels from disk and finish any consolidation a crash left undone."""
        self.l1 = sorted(l1, key=lambda e: e.order)
        self.l2 = sorted(l2, key=lambda e: e.order)
        self.consolidate()

    def add(self, entry: TierRecord) -> None:
        self._insert(self.l1, entry)
        self.consolidate()

    def consolidate(self) -> None:
        while len(self.l1) > max(self.l1_budget, 1):
            self._merge(self.l1, most_similar_pair(self.l1) or 0)
        while len(self.l2) > self.l2_budget:
            fits = lambda a, b: len(render(a.parts + b.parts)) <= self.event_max_chars  # noqa: E731
            pair = most_similar_pair(self.l2, fits)
            if pair is None:
                oldest = self.l2[0]
                self.sink.archive(oldest.item_id)
                self.l2.pop(0)
                self.archived += 1
            else:
                self._merge(self.l2, pair)

    def _merge(self, level: list[TierRecord], index: int) -> None:
        first, second = level[index], level[index + 1]
        event = merge(first, second)
        event = replace(event, item_id=self.sink.save_event(event, [first.item_id, second.item_id]))
        del level[index : index + 2]
        self._insert(self.l2, event)
        self.merges += 1

    def entries(self) -> list[TierRecord]:
        return sorted(self.l1 + self.l2, key=lambda e: e.order)
