"""Memory process: the pyramid memory of each session, and retrieval for questions.

Tiers (budgets in ``MemoryConfig``; README "Memory tiers"):
- L0 sensory: the percepts of the last ``sensory_s`` seconds (at most ``sensory_max``), in RAM only;
  they say what is on screen now.
- L1: clips and final transcripts at full detail; L2: events merged from the most similar
  adjacent L1 records (``memory.tiers``); L3: the latest synopsis, written by reasoning.
- Archive: everything that left L1/L2, on disk and searched there.
Every record is committed to SQLite before it is announced (``Record``), so nothing
acknowledged is lost when the process is killed; the tiers are reloaded from disk.

Layout (the stage contract, protocol/runtime.py): ``MemoryStage`` holds no socket. Bus messages
come to its ``handle``; a request read from memory's ROUTER comes as a ``Request`` (who sent it,
its frames), decoded and checked by the stage and answered with ``emit(reply,
to=client(identity))``; what it announces goes out with ``emit(message)`` (the bus). ``main``
binds the ROUTER, reads it bounded (``read_bounded``) and lends the runtime the channel replies
take.

Bus in: ``Clip``, final ``Transcript``, ``Percept``, ``Synopsis``, ``Ask`` (snapshot). ROUTER in:
``Retrieve`` from reasoning, answered with ``Retrieved``: the synopsis first, then in time order
the working set (L2 events, L1 records), the archive records closest to the question, the
records of the recent window, and last what is on screen now (or, with ``page_size``, a page of
the session's history in id order: a reasoner rebuilding its KV); ``HistoryRequest`` from the
gateway, answered with ``History``; ``Watch`` from the gateway, checked and stored (table
``watches``) before its ``Ack``, then passed to reasoning on the bus; ``WatchesRequest`` from
reasoning (a session's stored watches, after a restart), answered with ``Watches``;
``DeleteSession`` (``omnistream sessions delete``), answered with ``Ack`` or ``Error``.

Retention (``retention.*``, ``memory.retention``): every ``retention.every_s`` whole sessions
past their age or beyond the byte budget are deleted (records, watches, spilled KV), and
reasoning is told (``DeleteSession`` on the bus). A write to a full database or disk raises
``StoreFull`` (naming the file and the free space; reported as an ``Error``): nothing stored
before is lost and the stage goes on.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import zmq

from omnistream.memory.embedder import TextEmbedder
from omnistream.memory.retention import apply_retention, delete_session
from omnistream.memory.session import Scenes, SessionMemory, memory_item, stored_entry
from omnistream.memory.store import LEAF_KINDS, MemoryStore, StoreFull
from omnistream.memory.tiers import Pyramid, TierRecord, leaf
from omnistream.protocol.codec import ProtocolError, decode
from omnistream.protocol.config import MemoryConfig, RetentionConfig
from omnistream.protocol.labels import classes_in, spoken
from omnistream.protocol.messages import (
    WATCH_CONDITION_CHARS,
    WATCHES_PER_SESSION,
    Ack,
    Ask,
    Clip,
    DeleteSession,
    Error,
    History,
    HistoryRequest,
    MemoryRecord,
    Message,
    Percept,
    Record,
    Retrieve,
    Retrieved,
    Sighting,
    Synopsis,
    Transcript,
    Watch,
    Watches,
    WatchesRequest,
)
from omnistream.protocol.routes import subscriptions
from omnistream.protocol.runtime import BUS, Emit, Runtime, To, client
from omnistream.protocol.sockets import make_socket, read_bounded, send
from omnistream.protocol.text import clock, content_words

log = logging.getLogger("omnistream.memory")

MAX_QUERY_CHARS = 2000
LIVE_S = 600.0  # a session with a message this recently is live: `omnistream sessions delete` refuses it
MAX_ACTIVE = 10_000  # sessions whose last activity is remembered (retention keeps recent ones)
MAX_SNAPSHOTS = 256
KNOWN_SLACK_S = 1.0  # a record ending this soon after a question's time was known when it was asked
SEEN_EVERY_S = 1.0  # the light percept history keeps one percept a second
# A history page (``Retrieve.page_size``): what a reasoner streams into its KV and seeds its
# synopsis from, at most this many records and this many encoded bytes (decoders refuse
# headers over 1 MiB: a whole long session in one reply would be refused).
HISTORY_KINDS = ("clip", "transcript", "synopsis")
MAX_HISTORY_PAGE = 2000
HISTORY_PAGE_BYTES = 256 << 10


# Words of a question that name no thing to look up in the scenes (content_words forms).
_NOT_THINGS = """time separate appeared appear first last many much earlier before after photo
photograph show see saw right now left kind word printed thing colour color minute second ago far
voice said say sentence spoke mentioned heard hear happened seen immediately start end later again
moment current"""
TIMELINE_IGNORE = frozenset(_NOT_THINGS.split())
TIMELINE_TERMS = 4  # things of a question looked up in the scenes
TIMELINE_CLIPS = 2000  # the newest clips a scene timeline reads
TIMELINE_LABELS = 3  # a clip names what its best 3 classifier labels, objects and text name
TIMELINE_LISTED = 4  # appearances listed one by one; beyond, the first and the last
# "on screen" names no TV: phrases about the picture itself are cut before looking for things.
ON_SCREEN = re.compile(r"\b(?:on|off|onto) (?:the )?screen\b", re.IGNORECASE)
# A question about what came last wants the order of last appearances too.
LATEST = re.compile(r"\b(?:most recent(?:ly)?|latest|last)\b", re.IGNORECASE)
WHERE = re.compile(r"\bwhere\b", re.IGNORECASE)
WHEN = re.compile(r"\b(?:when|how long ago|what time)\b", re.IGNORECASE)
SCENE_SUMMARY_CHARS = 120
# A question about the most people at once over the stream (not about one scene of it).
MOST_AT_ONCE = re.compile(
    r"\b(?:most|at once|at the same time|at one time|maximum|largest|biggest|busiest)\b", re.IGNORECASE
)
NAMED_SCENES = 3  # scenes a question names whose people counts its timeline gives
# Words of a question that name people or the picture itself, not which scene it is about.
_PEOPLE_WORDS = """person people man men woman women someone anyone somebody child kid boy girl guy lady
player many picture image scene photo number roughly exactly about around there"""
# Colour words name no thing in the scenes ("white on screen 3 separate times" was the white
# phone, car and shirt of three scenes); "orange" is a fruit too and stays.
_COLOURS = "red pink purple blue cyan green yellow brown black grey gray white dark light bright"
COLOUR_WORDS = frozenset(_COLOURS.split())


def known(item, until_ts: float) -> bool:
    """Whether a record (``t1``: its end) was complete when a question at ``until_ts`` was asked.
    A question answered late (it waited behind others) must not see what came after it."""
    return item.t1 <= until_ts + KNOWN_SLACK_S


def scene_words(description: str) -> set[str]:
    """What a clip's description names: its best classifier labels, the objects and people
    found, the text read (content words), not its motion."""
    named: list[str] = []
    for part in description.split("; "):
        if part.startswith("seen: "):
            named += part.removeprefix("seen: ").split(", ")[:TIMELINE_LABELS]
        elif ":" in part:  # objects: ..., people: ..., text: "..."
            named.append(part.split(":", 1)[1])
    return set(content_words(" ".join(named)))


def scene_summary(description: str) -> str:
    """A clip's description cut short to say which scene it was: its best two classifier labels
    and the start of what the detectors found."""
    parts = description.split("; ")
    labels = parts[0].removeprefix("seen: ").split(", ")[:2] if parts[0].startswith("seen: ") else []
    found = [part for part in parts[1:] if ":" in part][:1]
    text = "; ".join([", ".join(labels), *found]) if labels else "; ".join(found)
    return text if len(text) <= SCENE_SUMMARY_CHARS else text[: SCENE_SUMMARY_CHARS - 3] + "..."


def look(row) -> str:
    """How a tracker's "appeared" record saw the thing: "yellow ball", "person (in a red shirt)"."""
    named = row.text.split(" appeared at ")[0].split(" entered at ")[0].split()
    return " ".join(w for w in named if not w.isdigit())


def appearances(clips: list, named_by: list[set[str]], term: str) -> list[list[float]]:
    """[t0, t1] of each run of consecutive clips (time order) whose description names ``term``
    (``named_by``: each clip's ``scene_words``)."""
    runs: list[list[float]] = []
    previous = False
    for clip, words in zip(clips, named_by, strict=True):
        named = term in words
        if named and previous:
            runs[-1][1] = clip.t1
        elif named:
            runs.append([clip.t0, clip.t1])
        previous = named
    return runs


def ago(seconds: float) -> str:
    """How long ago, as people say it: "just now", "about 40 seconds ago", "about a minute ago",
    "about 3 minutes ago", "about an hour ago" (answers to "when" questions often want this)."""
    if seconds < 10:
        return "just now"
    if seconds < 55:
        return f"about {int(round(seconds / 10.0)) * 10} seconds ago"
    minutes = int(round(seconds / 60.0))
    if minutes < 2:
        return "about a minute ago"
    if minutes < 60:
        return f"about {minutes} minutes ago"
    hours = int(round(minutes / 60.0))
    return "about an hour ago" if hours < 2 else f"about {hours} hours ago"


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclass
class Request:
    """A request as memory's ROUTER read it: the sender's ``identity`` (where the reply goes) and
    the message's ``frames`` (decoded and checked by the stage)."""

    identity: bytes
    frames: list = field(default_factory=list)
    session: str = "default"


def no_emit(message: Message, to: To = BUS) -> bool:
    return True


class MemoryStage:
    """Memory's logic without sockets: built from its configuration, the store, the text
    embedder and an ``emit`` callable (``emit(message)``: the bus; ``to=client(identity)``: the
    reply to a ``Request``)."""

    name = "memory"

    def __init__(
        self,
        config: MemoryConfig,
        store: MemoryStore,
        embedder: TextEmbedder,
        emit: Emit = no_emit,
        counters: dict[str, float] | None = None,
        *,
        data_dir: Path | None = None,
        retention: RetentionConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.store = store
        self.embedder = embedder
        self.emit = emit
        self.counters: dict[str, float] = counters if counters is not None else defaultdict(float)
        self.clock = clock
        # Retrieval results taken when each question arrived (the moment the user asked).
        self.snapshots: OrderedDict[str, Retrieved] = OrderedDict()
        self.sessions: OrderedDict[str, SessionMemory] = OrderedDict()
        # Retention (memory/retention.py): what is kept on disk under data_dir, applied in tick.
        self.data_dir = data_dir if data_dir is not None else store.path.parent
        self.retention = retention or RetentionConfig()
        self.active: OrderedDict[str, float] = OrderedDict()  # session -> wall time of its last message
        self.retention_at = 0.0  # monotonic time retention was last applied

    # -- sessions --------------------------------------------------------------------------------

    def session(self, name: str) -> SessionMemory:
        """The session's in-RAM tiers, loaded from disk on first use; the least recently used
        session beyond ``sessions_in_ram`` is unloaded (its records stay on disk)."""
        state = self.sessions.get(name)
        if state is not None:
            self.sessions.move_to_end(name)
            return state
        pyramid = Pyramid(
            self.config.l1_items, self.config.l2_items, self.config.event_max_chars, self.store.sink(name)
        )
        pyramid.load(
            [stored_entry(*row) for row in self.store.tier_rows(name, "L1")],
            [stored_entry(*row) for row in self.store.tier_rows(name, "L2")],
        )
        scenes = Scenes(self.config.scene_prototypes)
        for t0, features in self.store.features(name):
            scenes.observe(t0, features)
        state = self.sessions[name] = SessionMemory(pyramid, scenes)
        while len(self.sessions) > max(self.config.sessions_in_ram, 1):
            unloaded, _ = self.sessions.popitem(last=False)
            self.store.unload(unloaded)
        return state

    def _consolidate(self, state: SessionMemory, entry: TierRecord) -> None:
        merges, archived = state.pyramid.merges, state.pyramid.archived
        state.pyramid.add(entry)
        self.counters["merges"] += state.pyramid.merges - merges
        self.counters["archived"] += state.pyramid.archived - archived

    # -- bus messages ----------------------------------------------------------------------------

    def handle(self, message: Message | Request) -> None:
        if isinstance(message, Request):
            self.serve(message.identity, message.frames)
            return
        self.touch(message.session)
        try:
            self._handle(message)
        except StoreFull:
            self.counters["store_full"] += 1
            self.retention_at = 0.0  # apply retention at the next idle moment: it may free room
            raise  # logged and reported (Error stage_error) by the runtime; the stage goes on

    def touch(self, session: str) -> None:
        self.active[session] = time.time()
        self.active.move_to_end(session)
        while len(self.active) > MAX_ACTIVE:
            self.active.popitem(last=False)

    def _handle(self, message: Message) -> None:
        if isinstance(message, Ask):
            if message.turn not in self.snapshots:  # else: the confirmation of a tentative Ask
                self.snapshot(message)
        elif isinstance(message, Clip):
            self.on_clip(message)
        elif isinstance(message, Transcript) and message.final and message.text.strip():
            self.on_transcript(message)
        elif isinstance(message, Sighting) and message.text.strip():
            self.on_sighting(message)
        elif isinstance(message, Synopsis) and message.text.strip():
            self.on_synopsis(message)
        elif isinstance(message, Percept):
            state = self.session(message.session)
            window = state.sensory
            window.append(message)
            while window and (
                window[0].ts < message.ts - self.config.sensory_s or len(window) > self.config.sensory_max
            ):
                window.popleft()
            if not state.seen or message.ts - state.seen[-1].ts >= SEEN_EVERY_S:
                state.seen.append(msgspec.structs.replace(message, features=np.zeros(0, np.float32)))
            while state.seen and state.seen[0].ts < message.ts - self.config.seen_history_s:
                state.seen.popleft()

    def _store(
        self,
        session: str,
        kind: str,
        t0: float,
        t1: float,
        text: str,
        *,
        speaker: str = "",
        features: np.ndarray | None = None,
        meta: dict | None = None,
        base_text: str | None = None,
    ) -> None:
        """Store one perceived record durably, announce it (``Record``), add it to the tiers."""
        state = self.session(session)
        embedding = self.embedder.embed([text])[0]
        item_id = self.store.add(
            session, kind, t0, t1, text, embedding, speaker=speaker, features=features, meta=meta
        )
        self.counters[f"{kind}s_stored"] += 1
        self.emit(
            Record(ts=t1, session=session, item_id=item_id, kind=kind, t0=t0, text=text, speaker=speaker)  # type: ignore[arg-type]
        )
        self._consolidate(
            state, leaf(item_id, kind, t0, t1, text, embedding, features, speaker, base_text=base_text)
        )

    def on_clip(self, clip: Clip) -> None:
        state = self.session(clip.session)
        features = np.asarray(clip.features, np.float32)
        earlier = state.scenes.observe(clip.t0, features)
        text = clip.description
        if earlier:
            text += f" (same scene as at {clock(earlier[0])}; {ordinal(earlier[1])} time)"
        meta = {"clip_id": clip.clip_id, "occurrence": earlier[1] if earlier else 1, "base": clip.description}
        self._store(
            clip.session,
            "clip",
            clip.t0,
            clip.ts,
            text,
            features=features,
            meta=meta,
            base_text=clip.description,
        )

    def on_transcript(self, transcript: Transcript) -> None:
        self._store(
            transcript.session,
            "transcript",
            transcript.t0,
            transcript.ts,
            transcript.text.strip(),
            speaker=transcript.speaker,
        )

    def on_sighting(self, sighting: Sighting) -> None:
        """Store a tracker event (an object or person appearing, leaving, people present) as a
        record of kind "sighting", retrievable by text and time like clips and transcripts."""
        meta = {
            "label": sighting.label,
            "event": sighting.event,
            "track": sighting.track_id,
            "count": sighting.count,
        }
        self._store(sighting.session, "sighting", sighting.t0, sighting.ts, sighting.text.strip(), meta=meta)

    def timeline(self, session: str, query: str, until_ts: float, in_view: list[str]) -> list[str]:
        """For each thing the question names (COCO classes, by everyday words too): how many
        separate times it appeared, when first, and where it was last seen or that it is in view
        now; for people, the most present at once; then the other things it names that scenes
        named (classifier labels, text read: ``scene_timeline``), and the order in which they
        all first appeared. Computed here, not left to the model."""
        query = ON_SCREEN.sub(" ", query)
        facts, firsts, lasts = [], [], []
        told: set[str] = set()  # words of the classes the tracker's timeline told of
        for label in classes_in(query)[:3]:
            rows = [row for row in self.store.sightings(session, label, until_ts) if known(row, until_ts)]
            if not rows:
                continue
            name = spoken(label)
            appeared = [r for r in rows if r.meta.get("event") == "appeared"]
            ended = [r for r in rows if r.meta.get("event") in ("left", "gone")]
            fact = f"{name}: appeared {len(appeared)} separate time{'s' if len(appeared) != 1 else ''}"
            if appeared:
                fact += f", first at {clock(appeared[0].t0)}"
                if len(appeared) > 1:
                    fact += f", last appeared at {clock(appeared[-1].t0)}"
            now = any(line.split(" (")[0].endswith(name) or label in line for line in in_view)
            if now:
                fact += "; in view now"
            elif ended:
                fact += f"; {ended[-1].text}"
                fact += f" ({ago(until_ts - ended[-1].t1)})" if WHEN.search(query) else ""
            looks: dict[str, list[str]] = {}  # each way it looked (colour, shirt), with its times
            for row in appeared:
                looks.setdefault(look(row), []).append(clock(row.t0))
            if len(looks) > 1:
                fact += "; seen as " + ", ".join(
                    f"{seen} ({', '.join(times[:TIMELINE_LISTED])}{', ...' if len(times) > TIMELINE_LISTED else ''})"
                    for seen, times in list(looks.items())[:TIMELINE_LISTED]
                )
                if label != "person":
                    fact += self.looks_named(session, query, until_ts, label, appeared)
            if appeared and not now and WHERE.search(query):  # where: in which scene
                scene = self.store.between(session, appeared[-1].t0, appeared[-1].t0, ("clip",), 1)
                if scene:
                    fact += f"; the scene it was last in: {scene_summary(scene[0].meta.get('base', scene[0].text))}"
            if label == "person":  # in the scenes the question names; the most at once if asked
                fact += self.people_counts(session, query, until_ts, rows, in_view)
            facts.append(fact)
            if appeared:
                firsts.append((appeared[0].t0, name))
                lasts.append((appeared[-1].t0, name))
            told.update(content_words(label))
            if label == "person":  # "people", "man", "picture": the count above, not a thing in scenes
                told.update(content_words(_PEOPLE_WORDS))
        scene_facts, scene_firsts, scene_lasts = self.scene_timeline(session, query, until_ts, told)
        facts += scene_facts
        firsts += scene_firsts
        lasts += scene_lasts
        if len(firsts) > 1:
            order = ", ".join(f"{name} ({clock(t0)})" for t0, name in sorted(firsts, key=lambda f: f[0]))
            facts.append(f"in order of first appearance: {order}")
        if len(lasts) > 1 and LATEST.search(query):
            order = ", ".join(f"{name} ({clock(t0)})" for t0, name in sorted(lasts, key=lambda f: f[0]))
            facts.append(f"in order of last appearance, the most recent last: {order}")
        return facts

    def people_counts(self, session: str, query: str, until_ts: float, rows: list, in_view: list[str]) -> str:
        """How many people were in view at once (the tracker's count intervals): in the scenes
        the question names by their words ("the picture of the man in a white shirt": the clip
        that found a person in a white shirt), and over the whole stream only when it asks for
        the most at once. A session's maximum answered "how many people were in the picture
        where a man held a clock" with the street camera's crowd."""
        spans = [(int(r.meta.get("count", 0)), r.t0, r.t1) for r in rows if r.meta.get("event") == "count"]
        now = sum(1 for line in in_view if line.startswith("person"))
        if MOST_AT_ONCE.search(query):
            most = max([(n, clock(t0), clock(t1)) for n, t0, t1 in spans] + [(now, "now", "")])
            return f"; at most {most[0]} at once ({'-'.join(filter(None, most[1:]))})" if most[0] else ""
        if not spans:
            return ""

        def counts(clip) -> tuple[int, int] | None:
            inside = [n for n, t0, t1 in spans if t0 < clip.t1 and t1 > clip.t0]
            return (min(inside), max(inside)) if inside else None

        named = self.named_scenes(session, query, until_ts, spans[0][1], _PEOPLE_WORDS, counts)
        if not named:
            return ""
        return "; in view at once in the scenes the question names: " + ", ".join(
            f"{low if low == high else f'{low}-{high}'} {'person' if high == 1 else 'people'} "
            f"({clock(clip.t0)}-{clock(clip.t1)}: {scene_summary(clip.meta.get('base', clip.text))})"
            for clip, (low, high) in named
        )

    def named_scenes(
        self, session: str, query: str, until_ts: float, t_from: float, not_scene: str, keep: Callable
    ) -> list[tuple]:
        """The scenes (clips from ``t_from``) a question names by the words of their
        descriptions, besides ``not_scene``'s words (the thing asked about): (clip, what
        ``keep(clip)`` says of it) for those sharing the most words with it (at least one),
        where ``keep`` says something (not None); the latest ``NAMED_SCENES``, in time order."""
        ignore = TIMELINE_IGNORE | set(content_words(not_scene))
        terms = {w for w in content_words(query) if len(w) > 2 and not w.isdigit() and w not in ignore}
        if not terms:
            return []
        named = []
        for clip in self.store.between(session, t_from, until_ts, ("clip",)):
            score = len(terms & set(content_words(clip.meta.get("base", clip.text))))
            kept = keep(clip) if score and known(clip, until_ts) else None
            if kept is not None:
                named.append((score, clip, kept))
        best = max((score for score, _, _ in named), default=0)
        return [(clip, kept) for score, clip, kept in named if score == best][-NAMED_SCENES:]

    def looks_named(self, session: str, query: str, until_ts: float, label: str, appeared: list) -> str:
        """How a thing seen in several looks (a yellow ball in one scene, white in another) looked
        in the scenes the question names by other words ("the ball next to the man in a red
        shirt"): the last-seen record alone named the other scene's look."""

        def looks(clip) -> list[str] | None:
            seen = [look(row) for row in appeared if clip.t0 - 1.0 <= row.t0 <= clip.t1]
            return list(dict.fromkeys(seen)) or None

        named = self.named_scenes(session, query, until_ts, appeared[0].t0, f"{label} {spoken(label)}", looks)
        if not named:
            return ""
        return "; in the scenes the question names: " + ", ".join(
            f"{' and '.join(seen)} ({clock(clip.t0)}-{clock(clip.t1)})" for clip, seen in named
        )

    def scene_timeline(
        self, session: str, query: str, until_ts: float, skip: set[str]
    ) -> tuple[list[str], list[tuple[float, str]], list[tuple[float, str]]]:
        """The things ``query`` names that clip descriptions name too (classifier labels, objects,
        text read on screen): each one's separate appearances (runs of consecutive clips) with
        their times; and (first time, thing), (start of the last appearance, thing) for the order
        of appearance."""
        terms = [
            w
            for w in dict.fromkeys(content_words(query))
            if len(w) > 2 and not w.isdigit() and w not in TIMELINE_IGNORE | COLOUR_WORDS and w not in skip
        ]
        if not terms:
            return [], [], []
        clips = self.store.between(session, float("-inf"), until_ts, ("clip",), TIMELINE_CLIPS, newest=True)
        clips = [clip for clip in clips if known(clip, until_ts)]
        if not clips:
            return [], [], []
        clips.sort(key=lambda clip: (clip.t0, clip.id))
        named_by = [scene_words(clip.meta.get("base", clip.text)) for clip in clips]  # once, not per term
        found: dict[tuple, list[str]] = {}  # words of the question named by the same clips: one thing
        for term in terms:
            runs = appearances(clips, named_by, term)
            if runs and (tuple(map(tuple, runs)) in found or len(found) < TIMELINE_TERMS):
                found.setdefault(tuple(map(tuple, runs)), []).append(term)
        facts, firsts, lasts = [], [], []
        for key, names in found.items():
            runs, name = [list(run) for run in key], " ".join(names)
            spans = [f"{clock(t0)}-{clock(t1)}" for t0, t1 in runs]
            if len(spans) > TIMELINE_LISTED:
                spans = [f"first {spans[0]}", f"last {spans[-1]}"]
            times = "time" if len(runs) == 1 else "separate times"
            now = "; on screen now" if runs[-1][1] >= clips[-1].t1 else ""
            if not now and WHEN.search(query):
                now = f"; last {ago(until_ts - runs[-1][1])}"
            facts.append(f"{name} on screen {len(runs)} {times} ({', '.join(spans)}){now}")
            firsts.append((runs[0][0], name))
            lasts.append((runs[-1][0], name))
        return facts, firsts, lasts

    def on_synopsis(self, synopsis: Synopsis) -> None:
        """Store the session's new synopsis (L3) and acknowledge it; a repeat is acknowledged again."""
        text = synopsis.text.strip()
        latest = self.store.latest(synopsis.session, "synopsis", float("inf"))
        if latest is not None and latest.text == text and latest.t1 == synopsis.ts:
            item_id = latest.id
        else:
            item_id = self.store.add(
                synopsis.session,
                "synopsis",
                synopsis.t0,
                synopsis.ts,
                text,
                self.embedder.embed([text])[0],
                meta={"through_item_id": synopsis.through_item_id},
            )
            self.counters["synopses_stored"] += 1
        self.emit(
            Record(
                ts=synopsis.ts,
                session=synopsis.session,
                item_id=item_id,
                kind="synopsis",
                t0=synopsis.t0,
                text=text,
            )
        )

    # -- retrieval -------------------------------------------------------------------------------

    def now_item(self, session: str, until_ts: float, query: str = "") -> MemoryRecord | None:
        """What is on screen at ``until_ts``: labels of the latest percepts (sensory tier), with the
        objects, people and text the detectors last found in the scene, and the timeline facts of
        the things ``query`` names."""
        state = self.session(session)
        window = [p for p in state.sensory if p.ts <= until_ts + 0.5]
        if not window:  # asked a while ago (answered late): what was on screen then
            window = [p for p in state.seen if until_ts - self.config.sensory_s <= p.ts <= until_ts + 0.5]
        if not window:
            return None
        recent = window[-3:]
        scores: dict[str, float] = {}
        for percept in recent:
            for label in percept.labels:
                scores[label.name] = scores.get(label.name, 0.0) + label.score / len(recent)
        names = [name for name, _ in sorted(scores.items(), key=lambda kv: -kv[1])[:4]]
        text = "seen: " + ", ".join(names)
        latest = recent[-1]  # percepts carry the scene's latest detections (keyframes)
        if latest.objects:
            people = sum(1 for line in latest.objects if line.startswith("person"))
            text += "; objects: " + ", ".join(latest.objects)
            text += f"; {people} {'person' if people == 1 else 'people'} in view"
        if latest.faces:
            text += "; people: " + ", ".join(latest.faces)
        if latest.text_seen:
            text += "; text: " + ", ".join(f'"{line}"' for line in latest.text_seen)
        facts = self.timeline(session, query, until_ts, latest.objects) if query else []
        return MemoryRecord(kind="now", t0=recent[0].ts, t1=recent[-1].ts, text=text, facts=facts)

    def snapshot(self, ask: Ask) -> None:
        request = Retrieve(
            ts=ask.ts, session=ask.session, request_id=ask.turn, query=ask.question[:MAX_QUERY_CHARS]
        )
        self.snapshots[ask.turn] = self.retrieve(request)
        while len(self.snapshots) > MAX_SNAPSHOTS:
            self.snapshots.popitem(last=False)

    def stream_now(self, session: str) -> float:
        """The latest stream time memory knows for ``session`` (its newest record or percept)."""
        window = self.session(session).sensory
        return max(self.store.latest_end(session), window[-1].ts if window else 0.0)

    def _tiered(self, request: Retrieve, query: np.ndarray) -> dict[int, MemoryRecord]:
        """The working set, the closest archive records and the recent window, without repeats:
        an archived record inside a chosen event is left out, and so is an event whose every
        member is chosen on its own. ``query``: the question's text embedding."""
        session, until = request.session, request.ts
        chosen = {
            entry.item_id: memory_item(entry, float(entry.embedding @ query))
            for entry in self.session(session).pyramid.entries()
            if known(entry, until)
        }
        for item in self.store.between(session, until - request.recent_s, until):
            if known(item, until):
                chosen.setdefault(item.id, memory_item(item))
        covered = {member for item in chosen.values() for member in item.members}
        for item, score in self.store.search(session, query, request.top_k, until, archive_only=True):
            if (
                known(item, until)
                and item.id not in chosen
                and item.id not in covered
                and not (item.members and set(item.members) <= covered)
            ):
                chosen[item.id] = memory_item(item, score)
                covered.update(item.members)
        return {
            item_id: item
            for item_id, item in chosen.items()
            if not (item.members and all(member in chosen for member in item.members))
        }

    def history_page(self, request: Retrieve) -> Retrieved:
        """A page of the session's history (``Retrieve.page_size`` > 0): records of
        HISTORY_KINDS with ids above ``after_id`` in id order, at most ``page_size`` (capped at
        MAX_HISTORY_PAGE) and HISTORY_PAGE_BYTES encoded (always at least one); ``more`` when
        records follow."""
        limit = min(request.page_size, MAX_HISTORY_PAGE)
        rows = self.store.after(request.session, request.after_id, HISTORY_KINDS, limit + 1)
        items: list[MemoryRecord] = []
        size = 0
        for row in rows[:limit]:
            item = memory_item(row)
            size += len(msgspec.msgpack.encode(item))
            if items and size > HISTORY_PAGE_BYTES:
                break
            items.append(item)
        self.counters["history_pages"] += 1
        return Retrieved(
            ts=request.ts,
            session=request.session,
            request_id=request.request_id,
            items=items,
            more=len(rows) > len(items),
        )

    def retrieve(self, request: Retrieve) -> Retrieved:
        if request.page_size > 0:
            return self.history_page(request)
        snapshot = self.snapshots.pop(request.turn, None) if request.turn else None
        if snapshot is not None:
            return Retrieved(
                ts=snapshot.ts, session=snapshot.session, request_id=request.request_id, items=snapshot.items
            )
        if len(request.query) > MAX_QUERY_CHARS:
            raise ProtocolError(
                "too_large", f"Retrieve.query has {len(request.query)} chars, limit {MAX_QUERY_CHARS}"
            )
        if request.ts <= 0:  # a question without a stream time is about now (e.g. `omnistream ask`)
            request = msgspec.structs.replace(request, ts=self.stream_now(request.session))
        session, until = request.session, request.ts
        query = self.embedder.embed([request.query])[0]
        if self.store.count(session) <= self.config.return_all_below:
            chosen = {
                item.id: memory_item(item)
                for item in self.store.between(session, float("-inf"), until)
                if known(item, until)
            }
        else:
            chosen = self._tiered(request, query)
        # Every record with its text similarity to the question (those of the recent window and
        # of a short session too): the reasoner repeats the closest next to the question
        # (reasoning.prompt.related_records).
        scores = self.store.similarities(session, query, list(chosen))
        items = sorted(
            (
                msgspec.structs.replace(item, score=scores.get(item_id, item.score))
                for item_id, item in chosen.items()
            ),
            key=lambda item: (item.t0, item.item_id),
        )
        synopsis = self.store.latest(session, "synopsis", until)
        if synopsis is not None:
            items.insert(0, memory_item(synopsis, 1.0))
        now = self.now_item(session, until, request.query)
        if now is not None:
            items.append(now)
        self.counters["retrievals"] += 1
        return Retrieved(ts=request.ts, session=session, request_id=request.request_id, items=items)

    def history(self, request: HistoryRequest) -> History:
        """Stored records of the session overlapping [t0, t1], oldest first (client history queries).

        The gateway bounds requests; here too, kinds are each taken once (one SQL variable each)
        and must be record kinds, and ``limit`` is 1..5000."""
        kinds = tuple(dict.fromkeys(request.kinds)) or LEAF_KINDS
        unknown = [
            kind for kind in kinds if kind not in ("clip", "transcript", "sighting", "event", "synopsis")
        ]
        if unknown:
            raise ProtocolError("invalid", f"HistoryRequest.kinds: unknown record kinds {unknown[:5]}")
        limit = min(max(request.limit, 1), 5000)
        items = self.store.between(
            request.session, request.t0, request.t1, kinds, limit=limit + 1, newest=request.newest
        )
        self.counters["history_requests"] += 1
        kept = items[:limit]
        if request.newest:
            kept.sort(key=lambda item: (item.t0, item.id))
        return History(
            ts=request.ts,
            session=request.session,
            request_id=request.request_id,
            items=[memory_item(item) for item in kept],
            truncated=len(items) > limit,
        )

    def on_watch(self, watch: Watch) -> Message:
        """Check a watch and store it (or remove it: ``cancel``), then pass it to reasoning on the
        bus: an ``Ack`` once it is stored, an ``Error`` ``invalid`` naming why it was refused."""
        condition = watch.condition.strip()
        session, watch_id = watch.session, watch.watch_id
        if watch.cancel:
            removed = self.store.delete_watch(session, watch_id)
            self.counters["watches_cancelled"] += removed
            self.emit(watch)
            return Ack(ts=watch.ts, session=session, request_id=watch_id)
        reason = None
        if not watch_id.strip():
            reason = "Watch.watch_id must not be empty"
        elif not 0 < len(condition) <= WATCH_CONDITION_CHARS:
            reason = f"Watch.condition must have 1..{WATCH_CONDITION_CHARS} characters, got {len(condition)}"
        else:
            stored = [row[0] for row in self.store.watches(session)]
            if watch_id not in stored and len(stored) >= WATCHES_PER_SESSION:
                reason = (
                    f"session {session!r} already has {len(stored)} watches (at most "
                    f"{WATCHES_PER_SESSION}); cancel one first"
                )
        if reason is not None:
            self.counters["watches_refused"] += 1
            return Error(code="invalid", message=reason, request_id=watch_id, session=session)
        self.store.save_watch(session, watch_id, condition, watch.ts)
        self.counters["watches_stored"] += 1
        self.emit(msgspec.structs.replace(watch, condition=condition))
        return Ack(ts=watch.ts, session=session, request_id=watch_id)

    def stored_watches(self, request: WatchesRequest) -> Watches:
        watches = [
            Watch(ts=ts, session=request.session, watch_id=watch_id, condition=condition)
            for watch_id, condition, ts in self.store.watches(request.session)
        ]
        return Watches(session=request.session, request_id=request.request_id, watches=watches)

    # -- retention and deletion --------------------------------------------------------------------

    def tick(self) -> bool:
        """Apply the retention policy every ``retention.every_s`` (and at start). Nothing is left
        waiting for a next step: False."""
        now = self.clock()
        if self.retention_at and now - self.retention_at < self.retention.every_s:
            return False
        self.retention_at = now
        try:
            deleted, over = apply_retention(self.store, self.data_dir, self.retention, dict(self.active))
        except Exception as exc:  # a disk error here must not stop the stage; tried again later
            log.error("retention failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self.counters["retention_errors"] += 1
            return False
        for session in deleted:
            self.forget(session)
        self.counters["sessions_deleted"] += len(deleted)
        self.counters["retention_over_budget"] += over
        return False

    def forget(self, session: str) -> None:
        """A session was deleted from disk: drop what memory holds of it, tell reasoning."""
        self.sessions.pop(session, None)
        self.active.pop(session, None)
        for turn in [t for t, snapshot in self.snapshots.items() if snapshot.session == session]:
            del self.snapshots[turn]
        self.emit(DeleteSession(session=session))

    def delete(self, request: DeleteSession) -> Message:
        """``omnistream sessions delete``: refused for a live session (a message within LIVE_S)
        unless ``force``."""
        session = request.session
        idle = time.time() - self.active.get(session, 0.0)
        if idle < LIVE_S and not request.force:
            return Error(
                code="live",
                message=f"session {session!r} is live (its last message came {idle:.0f} s ago); "
                "stop its stream first, or force the deletion",
                request_id=request.request_id,
                session=session,
            )
        records = delete_session(self.store, self.data_dir, session)
        self.forget(session)
        self.counters["sessions_deleted"] += 1
        log.info("session deleted", extra={"session": session, "records": records})
        return Ack(ts=request.ts, session=session, request_id=request.request_id)

    def serve(self, identity: bytes, frames: list) -> None:
        """Answer one request read from the ROUTER (``emit(reply, to=client(identity))``): a
        malformed one with an ``Error`` naming the problem (counted in ``rejected``), one that
        fails with an ``Error`` ``stage_error``; either way memory keeps serving and nothing
        stored is touched."""
        message: Message | None = None
        try:
            message = decode(frames)
        except ProtocolError as exc:
            self.counters["rejected"] += 1
            log.warning("rejected request: %s", exc)
            self.emit(exc.to_error(), client(identity))
            return
        request_id = getattr(message, "request_id", "") or getattr(message, "watch_id", "")
        try:
            if isinstance(message, HistoryRequest):
                reply: Message = self.history(message)
            elif isinstance(message, Watch):
                reply = self.on_watch(message)
            elif isinstance(message, WatchesRequest):
                reply = self.stored_watches(message)
            elif isinstance(message, DeleteSession):
                reply = self.delete(message)
            elif not isinstance(message, Retrieve):
                reply = Error(
                    code="unsupported",
                    message=f"memory does not serve {type(message).__name__}",
                    request_id=request_id,
                    session=message.session,
                )
            else:
                reply = self.retrieve(message)
        except ProtocolError as exc:
            reply = exc.to_error(request_id=request_id)
        except Exception as exc:  # a failed request is answered; memory keeps serving
            log.exception(
                "request failed: %s", type(message).__name__, extra={"handling": type(message).__name__}
            )
            self.counters["handler_errors"] += 1
            reply = Error(
                code="stage_error",
                message=f"memory: {type(message).__name__}: {type(exc).__name__}: {str(exc)[:500]}",
                request_id=request_id,
                session=getattr(message, "session", "default"),
            )
        self.emit(reply, client(identity))

    def close(self) -> None:
        self.store.close()


def serve_router(stage: MemoryStage, sock: zmq.Socket, max_messages: int, max_bytes: int) -> bool:
    """Read at most ``max_messages`` requests and ``max_bytes`` bytes from memory's ROUTER
    (``read_bounded``: the rest wait in the socket) and hand each to the stage as a ``Request``;
    True when the byte bound stopped it."""
    return read_bounded(
        sock, lambda frames: stage.handle(Request(frames[0].bytes, frames[1:])), max_messages, max_bytes
    )


def router_outlet(sock: zmq.Socket) -> Callable[[Message, To], bool]:
    """The channel replies take: ``emit(reply, to=client(identity))`` -> that sender's DEALER."""

    def send_reply(message: Message, to: To) -> bool:
        send(sock, message, prefix=[to.identity])
        return True

    return send_reply


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnistream-memory")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    runtime = Runtime("memory", args.run_dir)
    config = runtime.config
    embedder = TextEmbedder(threads=1)
    store = MemoryStore(config.data_dir / "memory.sqlite", embedder.dim)
    stage = MemoryStage(
        config.memory,
        store,
        embedder,
        runtime.emit,
        runtime.counters,
        data_dir=config.data_dir,
        retention=config.retention,
    )
    router = make_socket(runtime.ctx, zmq.ROUTER, max_message_bytes=1 << 20)
    router.bind(runtime.addresses.memory)
    runtime.outlets["client"] = router_outlet(router)
    bus = config.bus

    def on_router(sock: zmq.Socket) -> None:
        if serve_router(stage, sock, bus.poll_max_messages, bus.poll_max_bytes):
            runtime.counters["poll_byte_limit"] += 1

    runtime.add_socket(router, on_router)
    runtime.subscribe(*subscriptions("memory"))
    runtime.run(stage, tick=stage.tick)


if __name__ == "__main__":
    main()
