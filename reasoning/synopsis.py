"""L3 synopsis: a short running summary of each session, rewritten by the LLM while it is idle.

After ``synopsis_every_records`` new records, or ``synopsis_every_s`` stream seconds with at
least one new record, the reasoner rewrites the session's synopsis from the previous one and the
newest records (at most ``synopsis_input_chars`` of them), and publishes it as a ``Synopsis``.
Memory stores it and acknowledges it with a ``Record`` of kind "synopsis"; an unacknowledged
synopsis is sent again. Questions come first: writing stops as soon as ``should_stop`` says an
``Ask`` is waiting (between prefill chunks and between tokens) and is retried later.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from omnistream.protocol.config import MemoryConfig
from omnistream.protocol.messages import MemoryItem, Record, Synopsis
from omnistream.reasoning.engine import LLMEngine
from omnistream.reasoning.prompt import clock, format_item

log = logging.getLogger("omnistream.reasoning.synopsis")

SYNOPSIS_SYSTEM = (
    "You keep the running summary of a live video stream for an assistant's memory. "
    "You get the summary so far and the newest records (what was on screen and what was said, "
    "with stream times). Write the new summary of the whole stream: at most three short "
    "sentences, plain text, the main things seen and said with their stream times (mm:ss). "
    "Use only the records; do not invent."
)
PREFILL_CHUNK_TOKENS = 64  # prefill in chunks so that a question can stop it between chunks
ACK_TIMEOUT_S = 10.0  # memory did not acknowledge a synopsis within this (wall) time: send it again
MAX_SYNOPSIS_CHARS = 800


@dataclass
class SessionDigest:
    """The synopsis state of one session."""

    text: str = ""  # the latest synopsis, "" before the first
    covered_ts: float = float("-inf")  # stream time the latest synopsis covers up to
    t0: float | None = None  # start of the first record seen
    new: list[MemoryItem] = field(default_factory=list)  # records since, newest last (text-bounded)
    new_count: int = 0
    last_ts: float = 0.0  # end of the newest record
    last_item_id: int = 0
    pending: Synopsis | None = None  # sent, not yet acknowledged
    sent_at: float = 0.0


def clean(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip().strip('"')
    return text[:MAX_SYNOPSIS_CHARS]


class Synopsizer:
    def __init__(self, engine: LLMEngine, config: MemoryConfig):
        self.engine = engine
        self.config = config
        self.sessions: dict[str, SessionDigest] = {}

    def digest(self, session: str) -> SessionDigest:
        return self.sessions.setdefault(session, SessionDigest())

    # -- what the reasoner sees --------------------------------------------------------------------

    def seed(self, session: str, synopsis: MemoryItem) -> None:
        """Start from a synopsis memory already holds (the reasoner restarted)."""
        digest = self.digest(session)
        if synopsis.t1 >= digest.covered_ts:
            digest.text, digest.covered_ts = synopsis.text, synopsis.t1
            digest.t0 = synopsis.t0 if digest.t0 is None else min(digest.t0, synopsis.t0)
            digest.new = [item for item in digest.new if item.t1 > synopsis.t1]
            digest.new_count = len(digest.new)

    def observe(self, session: str, item: MemoryItem) -> None:
        """A new clip or transcript of ``session``."""
        digest = self.digest(session)
        if item.kind not in ("clip", "transcript") or item.t1 <= digest.covered_ts:
            return
        digest.t0 = item.t0 if digest.t0 is None else min(digest.t0, item.t0)
        digest.new.append(item)
        digest.new_count += 1
        digest.last_ts = max(digest.last_ts, item.t1)
        digest.last_item_id = max(digest.last_item_id, item.item_id)
        while sum(len(i.text) for i in digest.new) > self.config.synopsis_input_chars and len(digest.new) > 1:
            digest.new.pop(0)

    def acknowledge(self, record: Record) -> None:
        digest = self.sessions.get(record.session)
        if digest is not None and digest.pending is not None and digest.pending.text == record.text:
            digest.pending = None

    # -- writing -----------------------------------------------------------------------------------

    def due(self) -> list[str]:
        """Sessions whose synopsis should be rewritten now."""
        every_n, every_s = self.config.synopsis_every_records, self.config.synopsis_every_s
        if every_n <= 0 and every_s <= 0:
            return []
        since = lambda d: d.last_ts - max(d.covered_ts, d.t0 if d.t0 is not None else d.last_ts)  # noqa: E731
        return [
            name
            for name, d in self.sessions.items()
            if d.new_count
            and ((every_n > 0 and d.new_count >= every_n) or (every_s > 0 and since(d) >= every_s))
        ]

    def prompt(self, digest: SessionDigest) -> str:
        so_far = (
            f"Summary so far (up to {clock(digest.covered_ts)}): {digest.text}"
            if digest.text
            else ("Summary so far: (nothing yet)")
        )
        records = "\n".join(format_item(item) for item in digest.new)
        return f"{so_far}\n\nNewest records:\n{records}\n\nThe summary of the whole stream up to {clock(digest.last_ts)}:"

    def write(self, session: str, should_stop: Callable[[], bool]) -> Synopsis | None:
        """Rewrite the synopsis of ``session`` (None if ``should_stop`` cut it short)."""
        from transformers import DynamicCache

        digest = self.digest(session)
        new_count, last_ts, last_item_id = digest.new_count, digest.last_ts, digest.last_item_id
        ids = self.engine.chat_ids(SYNOPSIS_SYSTEM, self.prompt(digest))
        cache = DynamicCache()
        started = time.monotonic()
        position = 0
        while ids.shape[1] - position > 1:
            if should_stop():
                return None
            end = min(position + PREFILL_CHUNK_TOKENS, ids.shape[1] - 1)
            self.engine.forward(ids[:, position:end], cache, position)
            position = end
        pieces = list(
            self.engine.stream(ids[:, position:], self.config.synopsis_max_tokens, should_stop, cache)
        )
        if should_stop():
            return None
        text = clean("".join(pieces))
        if not text:
            return None
        digest.text, digest.covered_ts = text, last_ts
        digest.new = [item for item in digest.new if item.t1 > last_ts]
        digest.new_count -= new_count
        synopsis = Synopsis(
            ts=last_ts, session=session, text=text, t0=digest.t0 or 0.0, through_item_id=last_item_id
        )
        digest.pending, digest.sent_at = synopsis, time.monotonic()
        log.info(
            "synopsis written",
            extra={"session": session, "records": new_count, "seconds": round(time.monotonic() - started, 2)},
        )
        return synopsis

    def unacknowledged(self, now: float) -> list[Synopsis]:
        """Synopses memory has not acknowledged for ``ACK_TIMEOUT_S`` (they are due again)."""
        late = []
        for digest in self.sessions.values():
            if digest.pending is not None and now - digest.sent_at >= ACK_TIMEOUT_S:
                digest.sent_at = now
                late.append(digest.pending)
        return late
