"""Cut a stream of encoded frames into clips at scene changes or a maximum length.

A scene change is ``cut_frames`` consecutive frames whose cosine distance to the running mean
of the open clip exceeds ``cut_distance`` (hysteresis: one odd frame does not cut). The new clip
starts at the first of those frames. Each clip carries its mean-pooled features, its top labels
over all its frames, its mean motion, and a one-line description (``describe``) that memory
stores; people and text seen are added by the stage once the keyframe detectors have finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from omnistream.perception.encoder import ClassName
from omnistream.protocol.messages import Clip, Label


@dataclass
class _OpenClip:
    clip_id: int
    t0: float
    t1: float
    feature_sum: np.ndarray
    prob_sum: np.ndarray
    n_frames: int = 0
    motion_sum: float = 0.0

    def add(self, ts: float, features: np.ndarray, probs: np.ndarray, motion: float = 0.0) -> None:
        self.t1 = ts
        self.feature_sum += features
        self.prob_sum += probs
        self.motion_sum += motion
        self.n_frames += 1

    def mean_features(self) -> np.ndarray:
        mean = self.feature_sum / max(self.n_frames, 1)
        return (mean / max(float(np.linalg.norm(mean)), 1e-8)).astype(np.float32)


def top_labels(probs: np.ndarray, classes: list[ClassName], k: int, min_score: float) -> list[Label]:
    """The ``k`` most probable classes above ``min_score`` (at least the best one; none without classes)."""
    if not len(probs):
        return []
    order = np.argsort(probs)[::-1][:k]
    labels = [
        Label(name=classes[i].label(), score=round(float(probs[i]), 3), category=classes[i].category)
        for i in order
        if probs[i] >= min_score
    ]
    return labels or [Label(name=classes[order[0]].label(), score=round(float(probs[order[0]]), 3))]


# Mean absolute difference of grey thumbnails per frame (see detectors.motion_between).
MOTION_WORDS = ((0.06, "lots of motion"), (0.015, "some motion"), (0.0, "still"))


def motion_word(motion: float) -> str:
    return next(word for threshold, word in MOTION_WORDS if motion >= threshold)


def describe(
    labels: list[Label],
    people: Sequence[str] = (),
    text_seen: Sequence[str] = (),
    motion: float | None = None,
    objects: Sequence[str] = (),
    colours: str = "",
) -> str:
    """'seen: monarch (butterfly), ...; objects: 2 people: person in a blue shirt (left), red cup
    (right); mostly green in the middle; people: person 1 (new); text: "SUDOKU"; still'."""
    parts = ["seen: " + ", ".join(label.name for label in labels)] if labels else []
    if objects:
        parts.append("objects: " + ", ".join(objects))
    if colours:  # no colon: memory's scene timeline looks up things, not colours (scene_words)
        parts.append(f"mostly {colours} in the middle")
    if people:
        parts.append("people: " + ", ".join(people))
    if text_seen:
        parts.append("text: " + ", ".join(f'"{text}"' for text in text_seen))
    if motion is not None:
        parts.append(motion_word(motion))
    return "; ".join(parts)


@dataclass
class ClipSegmenter:
    classes: list[ClassName]
    cut_distance: float = 0.25
    cut_frames: int = 2
    max_clip_s: float = 20.0
    top_k: int = 5
    min_score: float = 0.08
    session: str = "default"
    _open: _OpenClip | None = None
    _candidates: list[tuple[float, np.ndarray, np.ndarray, float]] = field(default_factory=list)
    _next_id: int = 1

    @property
    def current_clip_id(self) -> int:
        return self._open.clip_id if self._open else self._next_id

    def _start(self, ts: float, features: np.ndarray, probs: np.ndarray, motion: float = 0.0) -> None:
        self._open = _OpenClip(self._next_id, ts, ts, np.zeros_like(features), np.zeros_like(probs))
        self._next_id += 1
        self._open.add(ts, features, probs, motion)

    def push(self, ts: float, features: np.ndarray, probs: np.ndarray, motion: float = 0.0) -> list[Clip]:
        """Add one frame (features L2-normalised (D,), class probs (C,), motion in [0, 1]);
        return the clips closed by it."""
        if self._open is None:
            self._start(ts, features, probs, motion)
            return []
        closed: list[Clip] = []
        distance = 1.0 - float(features @ self._open.mean_features())
        if distance > self.cut_distance:
            self._candidates.append((ts, features, probs, motion))
            if len(self._candidates) >= self.cut_frames:
                closed.append(self.close())
                for candidate in self._candidates:
                    if self._open is None:
                        self._start(*candidate)
                    else:
                        self._open.add(*candidate)
                self._candidates.clear()
            return closed
        for candidate in self._candidates:  # a blip, not a scene change: keep it in this clip
            self._open.add(*candidate)
        self._candidates.clear()
        self._open.add(ts, features, probs, motion)
        if self._open.t1 - self._open.t0 >= self.max_clip_s:
            closed.append(self.close())
        return closed

    def close(self) -> Clip:
        """Close the open clip (end of stream or forced); raises if none is open."""
        if self._open is None:
            raise RuntimeError("no open clip")
        clip, self._open = self._open, None
        probs = clip.prob_sum / max(clip.n_frames, 1)
        labels = top_labels(probs, self.classes, self.top_k, self.min_score)
        motion = clip.motion_sum / max(clip.n_frames, 1)
        return Clip(
            ts=clip.t1,
            t0=clip.t0,
            session=self.session,
            clip_id=clip.clip_id,
            features=clip.mean_features(),
            labels=labels,
            motion=round(motion, 4),
            description=describe(labels, motion=motion),
            n_frames=clip.n_frames,
        )

    def has_open_clip(self) -> bool:
        return self._open is not None
