"""L3 synopsis: a short running summary of each session, written by the LLM while it is idle.

After ``synopsis_every_records`` new records, or ``synopsis_every_s`` stream seconds with at
least one new record, the reasoner sums the newest records (at most ``synopsis_input_chars`` of
them) up in one sentence, "From 01:10 to 03:20, the stream showed ...", and appends it to the
session's synopsis. When the synopsis grows past ``synopsis_max_chars``, its two oldest
sentences are summed up into one the same way (a small pyramid of its own). A small model
rewrites a summary poorly (the 0.5B copied the old one and dropped the new records) but sums up
a handful of lines well, which is why the synopsis grows by sentences.

It is published as a ``Synopsis``; memory stores it and acknowledges it with a ``Record`` of
kind "synopsis"; an unacknowledged synopsis is sent again. Questions come first: writing stops
as soon as ``should_stop`` says an ``Ask`` is waiting (between prefill chunks and between
tokens), leaves the state as it was, and is retried later.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from omnistream.protocol.config import MemoryConfig
from omnistream.protocol.messages import MemoryRecord, Record, Synopsis
from omnistream.reasoning.llm.engine import LLMEngine
from omnistream.reasoning.prompt import clock, format_item

log = logging.getLogger("omnistream.reasoning.synopsis")

SYNOPSIS_SYSTEM = (
    "You summarise a live video stream for an assistant's memory. Reply with the summary only: "
    "plain prose about what was seen and said. Do not copy the records line by line; do not "
    "invent anything."
)
PREFILL_CHUNK_TOKENS = 64  # prefill in chunks so that a question can stop it between chunks
ACK_TIMEOUT_S = 10.0  # memory did not acknowledge a synopsis within this (wall) time: send it again
MAX_SENTENCE_CHARS = 400
CLOCK = r"(?:\d+:)?\d{2}:\d{2}"
SENTENCE = re.compile(rf"From ({CLOCK}) to ({CLOCK}), ")


def seconds(text: str) -> float:
    """'01:02:05' or '02:05' -> seconds."""
    total = 0
    for part in text.split(":"):
        total = total * 60 + int(part)
    return float(total)


@dataclass(frozen=True)
class Sentence:
    t0: float
    t1: float
    text: str  # "From 00:00 to 00:22, the stream showed ..."


def split_sentences(text: str) -> list[Sentence]:
    """A stored synopsis back into its sentences (by their "From mm:ss to mm:ss, " openings)."""
    marks = list(SENTENCE.finditer(text))
    if not marks:
        return [Sentence(0.0, 0.0, text.strip())] if text.strip() else []
    ends = [m.start() for m in marks[1:]] + [len(text)]
    return [
        Sentence(seconds(m.group(1)), seconds(m.group(2)), text[m.start() : end].strip())
        for m, end in zip(marks, ends, strict=True)
    ]


@dataclass
class SessionDigest:
    """The synopsis state of one session."""

    sentences: list[Sentence] = field(default_factory=list)
    covered_ts: float = float("-inf")  # stream time the synopsis covers up to
    t0: float | None = None  # start of the first record seen
    new: list[MemoryRecord] = field(default_factory=list)  # records since, newest last (text-bounded)
    new_count: int = 0
    last_ts: float = 0.0  # end of the newest record
    last_item_id: int = 0
    pending: Synopsis | None = None  # sent, not yet acknowledged
    sent_at: float = 0.0

    @property
    def text(self) -> str:
        return " ".join(sentence.text for sentence in self.sentences)


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()[:MAX_SENTENCE_CHARS]


class Synopsizer:
    def __init__(self, engine: LLMEngine, config: MemoryConfig):
        self.engine = engine
        self.config = config
        self.sessions: dict[str, SessionDigest] = {}

    def digest(self, session: str) -> SessionDigest:
        return self.sessions.setdefault(session, SessionDigest())

    # -- what the reasoner sees --------------------------------------------------------------------

    def seed(self, session: str, synopsis: MemoryRecord) -> None:
        """Start from a synopsis memory already holds (the reasoner restarted)."""
        digest = self.digest(session)
        if synopsis.t1 >= digest.covered_ts:
            digest.sentences, digest.covered_ts = split_sentences(synopsis.text), synopsis.t1
            digest.t0 = synopsis.t0 if digest.t0 is None else min(digest.t0, synopsis.t0)
            digest.new = [item for item in digest.new if item.t1 > synopsis.t1]
            digest.new_count = len(digest.new)

    def observe(self, session: str, item: MemoryRecord) -> None:
        """A new clip or transcript of ``session``."""
        digest = self.digest(session)
        if item.kind not in ("clip", "transcript", "sighting") or item.t1 <= digest.covered_ts:
            return
        if item.item_id and item.item_id <= digest.last_item_id:
            return  # already seen (a session's history streamed again)
        digest.t0 = item.t0 if digest.t0 is None else min(digest.t0, item.t0)
        digest.new.append(item)
        digest.new_count += 1
        digest.last_ts = max(digest.last_ts, item.t1)
        digest.last_item_id = max(digest.last_item_id, item.item_id)
        while sum(len(i.text) for i in digest.new) > self.config.synopsis_input_chars and len(digest.new) > 1:
            digest.new.pop(0)

    def forget(self, session: str) -> None:
        """Drop the session's digest (the reasoner unloaded it); ``seed`` and ``observe`` rebuild
        it from memory's history when the session comes back."""
        self.sessions.pop(session, None)

    def acknowledge(self, record: Record) -> None:
        digest = self.sessions.get(record.session)
        if digest is not None and digest.pending is not None and digest.pending.text == record.text:
            digest.pending = None

    # -- writing -----------------------------------------------------------------------------------

    def due(self) -> list[str]:
        """Sessions whose synopsis should be extended now."""
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

    @staticmethod
    def request(lines: list[str], t0: float, t1: float, what: str) -> tuple[str, str]:
        """(user message, start of the reply) asking for one sentence about ``lines``."""
        span = f"from {clock(t0)} to {clock(t1)}"
        body = "\n".join(lines)
        return (
            f"{what} {span}:\n{body}\n\nSummarise these in one sentence.",
            f"From {clock(t0)} to {clock(t1)}, the stream showed",
        )

    def _sentence(self, lines: list[str], t0: float, t1: float, what: str, should_stop) -> Sentence | None:
        """One sentence about ``lines`` from the LLM (None if ``should_stop`` cut it short)."""
        from transformers import DynamicCache

        user, opening = self.request(lines, t0, t1, what)
        ids = self.engine.chat_ids(SYNOPSIS_SYSTEM, user, opening)
        cache = DynamicCache()
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
        return Sentence(t0, t1, clean(opening + "".join(pieces)))

    def write(self, session: str, should_stop: Callable[[], bool]) -> Synopsis | None:
        """Extend the synopsis of ``session`` (None, and nothing changed, if ``should_stop`` cut it
        short)."""
        digest = self.digest(session)
        started = time.monotonic()
        new_count, last_ts, last_item_id = digest.new_count, digest.last_ts, digest.last_item_id
        lines = [format_item(item) for item in digest.new]
        first = min(item.t0 for item in digest.new)
        sentence = self._sentence(lines, max(first, 0.0), last_ts, "Records of the stream", should_stop)
        if sentence is None:
            return None
        sentences = [*digest.sentences, sentence]
        while (
            len(" ".join(s.text for s in sentences)) > self.config.synopsis_max_chars and len(sentences) > 1
        ):
            older, newer = sentences[0], sentences[1]
            merged = self._sentence(
                [older.text, newer.text], older.t0, newer.t1, "Summary of the stream", should_stop
            )
            if merged is None:
                return None
            sentences[:2] = [merged]
        digest.sentences, digest.covered_ts = sentences, last_ts
        digest.new = [item for item in digest.new if item.t1 > last_ts]
        digest.new_count -= new_count
        synopsis = Synopsis(
            ts=last_ts, session=session, text=digest.text, t0=digest.t0 or 0.0, through_item_id=last_item_id
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
