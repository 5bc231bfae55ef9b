"""What memory holds in RAM for one session, and conversions between stored rows, tier
entries and ``MemoryRecord``s."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from omnistream.memory.store import StoredRecord
from omnistream.memory.tiers import MemberRecord, Pyramid, TierRecord, leaf
from omnistream.protocol.messages import MemoryRecord, Percept

SAME_SCENE_SIMILARITY = 0.85  # dot product of pooled clip features that marks a repeated scene


@dataclass
class Scene:
    first_t0: float
    features: np.ndarray  # float32 (D,), the first clip's pooled features
    count: int = 1
    last_t0: float = 0.0


class Scenes:
    """Distinct scenes of a session, for "same scene as at 00:40; 3rd time" marks.

    At most ``capacity`` are kept (the least recently seen is forgotten), so RAM stays bounded.
    """

    def __init__(self, capacity: int):
        self.capacity = max(capacity, 1)
        self.scenes: list[Scene] = []

    def observe(self, t0: float, features: np.ndarray) -> tuple[float, int] | None:
        """Record a clip; returns (first time, occurrence) of the earlier scene it repeats."""
        matching = [
            scene
            for scene in self.scenes
            if scene.features.shape == features.shape  # another encoder's features never match
            and float(scene.features @ features) >= SAME_SCENE_SIMILARITY
        ]
        if matching:
            scene = min(matching, key=lambda sc: sc.first_t0)
            scene.count += 1
            scene.last_t0 = t0
            return scene.first_t0, scene.count
        self.scenes.append(Scene(t0, np.array(features, np.float32), last_t0=t0))
        if len(self.scenes) > self.capacity:
            self.scenes.remove(min(self.scenes, key=lambda sc: sc.last_t0))
        return None


@dataclass
class SessionMemory:
    """What memory holds in RAM for one session: L0, the L1/L2 working set, the scene marks."""

    pyramid: Pyramid
    scenes: Scenes
    sensory: deque[Percept] = field(default_factory=deque)
    seen: deque[Percept] = field(default_factory=deque)  # light percepts, one a second (seen_history_s)


def stored_entry(item: StoredRecord, embedding: np.ndarray, features: np.ndarray | None) -> TierRecord:
    """The tier entry of a stored row (a clip, a transcript or an event)."""
    if item.kind != "event":
        base = item.meta.get("base")
        return leaf(item.id, item.kind, item.t0, item.t1, item.text, embedding, features, item.speaker, base)
    return TierRecord(
        item_id=item.id,
        kind="event",
        t0=item.t0,
        t1=item.t1,
        text=item.text,
        embedding=embedding,
        features=features,
        parts=[MemberRecord.from_json(row) for row in item.meta.get("parts", [])],
        feature_weight=int(item.meta.get("weight", 0)),
    )


def memory_item(item: StoredRecord | TierRecord, score: float = 0.0) -> MemoryRecord:
    item_id = item.id if isinstance(item, StoredRecord) else item.item_id
    return MemoryRecord(
        kind=item.kind,  # type: ignore[arg-type]
        t0=item.t0,
        t1=item.t1,
        text=item.text,
        score=score,
        speaker=item.speaker,
        item_id=item_id,
        members=item.members if item.kind == "event" else [],
    )
