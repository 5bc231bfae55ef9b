"""Watches: standing questions ("tell me when a person enters") checked against each new record.

Every record memory stores (a clip description or a transcript) is put to the LLM with each of
its session's watch conditions as a yes/no question; the answer is the likelier of the two
tokens, so no text is parsed. A small model leans towards "yes", so each watch is calibrated
when it is registered: its yes-minus-no margin on a few neutral observations sets the bar a
record must clear by ``MARGIN_OVER_NEUTRAL``. A watch fires once per record that satisfies it.

Watches are stored by memory (checked there before they are acknowledged); reasoning loads a
session's watches on its first contact with the session (after a restart too) and drops them
from RAM when it unloads the session.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnistream.protocol.messages import (
    WATCH_CONDITION_CHARS,
    WATCHES_PER_SESSION,
    Alert,
    MemoryRecord,
    Watch,
)
from omnistream.reasoning.llm.cache import BufferedCache
from omnistream.reasoning.llm.engine import LLMEngine
from omnistream.reasoning.prompt import format_item

WATCH_SYSTEM = (
    "You monitor a live video stream for the user. You are given one new observation from the "
    "stream and a condition the user asked to be told about. Answer yes if the observation "
    "shows that the condition is met, otherwise no. Answer with one word: yes or no."
)
MAX_WATCHES_PER_SESSION = WATCHES_PER_SESSION  # memory checks both before it stores a watch
MARGIN_OVER_NEUTRAL = 0.4
NEUTRAL_OBSERVATIONS = (
    MemoryRecord(kind="clip", t0=0, t1=5, text="seen: wall (structure), window (framework), door"),
    MemoryRecord(kind="clip", t0=0, t1=5, text="seen: jersey (shirt), analog clock (clock)"),
    MemoryRecord(kind="transcript", t0=0, t1=5, text="Okay, let us continue.", speaker="scene"),
)
MAX_CONDITION_CHARS = WATCH_CONDITION_CHARS


@dataclass
class StandingWatch:
    watch: Watch
    threshold: float
    fired: int = 0


class WatchList:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.watches: dict[str, dict[str, StandingWatch]] = {}
        self.yes_no = [self._token(" yes", "yes"), self._token(" no", "no")]

    def _token(self, *candidates: str) -> int:
        for text in candidates:
            ids = self.engine.tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) == 1:
                return ids[0]
        raise ValueError(f"no single-token spelling among {candidates}")

    def add(self, watch: Watch) -> None:
        """Register (or replace) a watch; raises ValueError for an empty, huge or excess one."""
        condition = watch.condition.strip()
        if not condition or len(condition) > MAX_CONDITION_CHARS:
            raise ValueError(
                f"Watch.condition must have 1..{MAX_CONDITION_CHARS} characters, got {len(condition)}"
            )
        session = self.watches.setdefault(watch.session, {})
        known = session.get(watch.watch_id)
        if known is not None and known.watch.condition == condition:
            return  # already registered (loaded from memory, then announced): calibrated once
        if watch.watch_id not in session and len(session) >= MAX_WATCHES_PER_SESSION:
            raise ValueError(f"session {watch.session!r} already has {MAX_WATCHES_PER_SESSION} watches")
        neutral = max(self.margin(condition, item) for item in NEUTRAL_OBSERVATIONS)
        session[watch.watch_id] = StandingWatch(watch, threshold=max(neutral, 0.0) + MARGIN_OVER_NEUTRAL)

    def remove(self, session: str, watch_id: str) -> None:
        watches = self.watches.get(session, {})
        watches.pop(watch_id, None)
        if not watches:
            self.watches.pop(session, None)

    def forget(self, session: str) -> None:
        """Drop the session's watches from RAM (they stay in memory's store and are loaded again
        on the next contact with the session)."""
        self.watches.pop(session, None)

    @torch.inference_mode()
    def margin(self, condition: str, item: MemoryRecord) -> float:
        """logit(yes) - logit(no) for 'does this observation meet the condition?'."""
        user = f"Observation: {format_item(item)}\nCondition: {condition}\nIs the condition met?"
        logits = self.engine.forward(self.engine.chat_ids(WATCH_SYSTEM, user), BufferedCache(), 0)[0]
        return float(logits[self.yes_no[0]] - logits[self.yes_no[1]])

    def check(self, session: str, item: MemoryRecord) -> list[Alert]:
        """Alerts for the watches of ``session`` that ``item`` satisfies."""
        alerts = []
        for standing in self.watches.get(session, {}).values():
            if self.margin(standing.watch.condition, item) > standing.threshold:
                standing.fired += 1
                alerts.append(
                    Alert(
                        ts=item.t1,
                        session=session,
                        watch_id=standing.watch.watch_id,
                        text=f"{standing.watch.condition}: {format_item(item)}",
                    )
                )
        return alerts
