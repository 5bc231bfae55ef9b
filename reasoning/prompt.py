"""Turn retrieved memory into the prompt: a timestamped log, the current time, the question."""

from __future__ import annotations

import math
import re

import msgspec

from omnistream.protocol.labels import SYNONYMS
from omnistream.protocol.messages import MemoryRecord
from omnistream.protocol.text import clock, content_words, number, words

SYSTEM_PROMPT = (
    "You are omnistream, an assistant that watches a live video stream and listens to its sound. "
    "Below is your memory of the stream, with stream times: one line per scene you saw (objects "
    "and people a detector found, with colour and position, labels from an image classifier, "
    "best guess first, and text read on screen), per sentence you heard, and a timeline of when "
    "things appeared and left. "
    "Answer the user's question in one short sentence that gives what was asked: the thing, the "
    "name, the number (in words), or the exact words heard or read, in quotes. "
    "Give a stream time, for example 'at 02:14', only when the question asks when. "
    "Never repeat the question. "
    "If the memory does not tell, say you did not see or hear it."
)

CHOICE_LETTERS = ("A", "B", "C", "D", "E", "F")


def format_item(item: MemoryRecord) -> str:
    """One memory line. An "event" (records merged by memory) already lists each of its parts
    with its own time; a "synopsis" summarises the whole stream up to its end time."""
    span = f"{clock(item.t0)}-{clock(item.t1)}"
    if item.kind == "synopsis":
        return f"[summary of the stream up to {clock(item.t1)}] {item.text}"
    if item.kind == "event":
        return f"[{span}] {item.text}"
    if item.kind == "transcript":
        who = {"user": "the user said", "assistant": "you said"}.get(item.speaker, "a voice said")
        return f'[{span}] {who}: "{item.text}"'
    if item.kind == "now":
        line = f"[now, {clock(item.t1)}] on screen right now: {item.text.removeprefix('seen: ')}"
        return "\n".join([line, *(f"[timeline] {fact}" for fact in bounded_facts(item.facts))])
    if item.kind == "sighting":
        return f"[{span}] {item.text}"
    return f"[{span}] on screen: {item.text.removeprefix('seen: ')}"


TIMELINE_FACT_CHARS = 240  # one timeline fact (a thing's appearances, looks, scenes), ~60 tokens
TIMELINE_CHARS = 720  # all of them, ~180 tokens: read after memory, before the first token


def bounded_facts(facts: list[str]) -> list[str]:
    """The "now" record's timeline facts within ``TIMELINE_CHARS``, each within
    ``TIMELINE_FACT_CHARS`` (cut at a clause, marked "..."). Memory lists a fact per thing the
    question names, and a question naming many (colours, "black-and-white") gave 130-460 tokens
    of them, read before the answer's first token. The things come first in memory's order (the
    detector's classes, then scene words); the order-of-appearance lines, which answer "which
    first", are always kept; the first fact may take twice the length of the others (a count
    of people in the scenes the question names comes after the looks)."""
    kept, used = [], 0
    order = [fact for fact in facts if fact.startswith("in order of ")]
    for fact in facts:
        if fact in order:
            continue
        limit = TIMELINE_FACT_CHARS * (1 if kept else 2)  # the first (what the question asks of) longer
        if len(fact) > limit:
            cut = fact[:limit]
            at = max(cut.rfind("; "), cut.rfind(", "))
            fact = (cut[:at] if at > limit // 2 else cut).rstrip(" ,;") + " ..."
        if kept and used + len(fact) > TIMELINE_CHARS:
            break
        kept.append(fact)
        used += len(fact)
    return kept + [
        fact if len(fact) <= 2 * TIMELINE_FACT_CHARS else fact[: 2 * TIMELINE_FACT_CHARS] + " ..."
        for fact in order
    ]


def memory_log(items: list[MemoryRecord]) -> str:
    return "\n".join(format_item(item) for item in items) or "(nothing seen or heard yet)"


KEPT_KINDS = ("now", "synopsis")  # never dropped to fit a budget


def fit_items(items: list[MemoryRecord], budget_tokens: int, count_tokens) -> list[MemoryRecord]:
    """Drop the least relevant then oldest records until the log fits ``budget_tokens`` (what is
    on screen now and the synopsis stay)."""
    kept = list(items)
    while kept and count_tokens(memory_log(kept)) > budget_tokens:
        droppable = [i for i, item in enumerate(kept) if item.kind not in KEPT_KINDS]
        if not droppable:
            break
        victim = min(droppable, key=lambda i: (kept[i].score, kept[i].t0))
        kept.pop(victim)
    return kept


# -- the records a question is about ----------------------------------------------------------
# A small model answers from a line next to the question far better than from one 2000 tokens
# back in its context (it restated the question instead: "A voice named a playing card while the
# monkey was on screen."). The suffix repeats the few records most related to the question
# (``related_records``): by the words they share with it (rare words weigh more; label synonyms
# and longer forms count: "footballer" finds a "soccer ball"), by what memory's text embedding
# scored (``MemoryRecord.score``), by kind (a question about what a voice said wants what was
# heard), and by the time the question names ("about forty seconds ago", "at the start",
# "while the sweets were on screen").

_HEARD = """voice voices said say says saying heard hear reader read spoke speak speaker spoken named
name mentioned announced sentence told tell called words word narrator sang"""
_SEEN = """shown show shows seen see saw screen photo picture image appeared appear video painting
scene looked look visible colour color wearing holding"""
SPEECH_CUES = frozenset(_HEARD.split())
VISUAL_CUES = frozenset(_SEEN.split())
# Words that ask about time or the stream, not about a thing to look for.
NOT_CONTENT = frozenset(
    content_words(
        """ago minute minutes second seconds hour earlier later before after first last start
        beginning end very near far right now about roughly more less much many kind thing things
        happen happened time times so far again moment while current currently recently most
        separate which what where when who how voice said say says heard hear reader read spoke
        named mentioned sentence word words shown show photo picture image video"""
    )
)
_SPAN = r"(a couple of|a few|an?|\d+(?:\.\d+)?|[a-z]+(?:[- ][a-z]+)?)"
AGO = re.compile(
    r"\b(?:(about|around|roughly|some|nearly|almost|over|more than|less than|under|within)\s+)?"
    + _SPAN
    + r"\s+(second|minute|hour)s?(\s+and a half)?\s+ago\b"
)
ABOUT_NOW = re.compile(
    r"\b(?:right now|on screen now|currently|at the moment|at this moment|now on screen)\b"
)
AT_START = re.compile(r"\b(?:at|near|from|in|since) the (?:very )?(?:start|beginning)\b")
WHILE = re.compile(r"\bwhile\b([^,.?]+)")
ANCHOR_MIN = 0.8  # how related the scene "after the X" names must be (a shared colour is not)
NEXT_TO = re.compile(r"\b(?:immediately |right |just |directly |straight )?(after|before)\b([^,.?]+)")
UNIT_S = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
RELATED_LINES = 3  # records repeated next to the question
RELATED_MIN = 0.35  # ... each at least this related (see ``relatedness``)
RELATED_BASE_MIN = 0.2  # words (and embedding) a record must share with the question
EMBEDDING_WEIGHT = 1.5  # memory's text similarity above the median, next to the shared words
RELATED_LINE_CHARS = 240


def _amount(span: str) -> float | None:
    span = span.strip()
    if span in ("a", "an"):
        return 1.0
    if span == "a couple of":
        return 2.0
    if span == "a few":
        return 3.0
    try:
        return float(span)
    except ValueError:
        pass
    total = 0
    for part in re.split(r"[- ]", span):
        value = number(part)
        if value is None:
            return None
        total += value
    return float(total)


def time_window(question: str, now: float) -> tuple[float, float] | None:
    """The stream-time window a question points at, if it names one: "about forty seconds ago"
    (around now - 40 s), "more than two minutes ago" (before now - 120 s), "at the start"."""
    lowered = question.lower()
    match = AGO.search(lowered)
    if match:
        qualifier, span, unit, half = match.groups()
        amount = _amount(span)
        if amount is not None:
            back = (amount + (0.5 if half else 0.0)) * UNIT_S[unit]
            at = now - back
            if qualifier in ("over", "more than"):
                return (0.0, at + 10.0)
            if qualifier in ("less than", "under", "within"):
                return (at, now)
            slack = max(15.0, 0.4 * back)
            return (max(at - slack, 0.0), min(at + slack, now))
    if AT_START.search(lowered):
        return (0.0, max(30.0, 0.1 * now))
    return None


def _alternates(term: str) -> list[tuple[str, float]]:
    """A question's word and the label words it stands for (``labels.SYNONYMS``, a longer form
    too: "a footballer" is near a "ball"), the stand-ins at half credit."""
    found = [(term, 1.0)]
    for word, label in SYNONYMS.items():
        if term == word or (len(word) >= 5 and term.startswith(word)):
            found += [(extra, 0.5) for extra in content_words(label) if extra != term]
    return found


def _names(term: str, said: set[str]) -> bool:
    """A record's words name ``term``: the same word, or a longer form of it ("football" in
    "footballer", at least 5 letters shared)."""
    if term in said:
        return True
    return len(term) >= 5 and any(len(w) >= 5 and (w.startswith(term) or term.startswith(w)) for w in said)


def relatedness(question: str, items: list[MemoryRecord], now: float) -> list[float]:
    """How related each record is to ``question`` (about 0..2; see the comment above)."""
    if not items:
        return []
    asked = words(question)
    wants_speech = any(w in SPEECH_CUES for w in asked)
    wants_sight = any(w in VISUAL_CUES for w in asked)
    plain = AT_START.sub(" ", AGO.sub(" ", question.lower()))  # "ten seconds ago" names no "10"
    # Numbers count things in the question ("which of these three") more often than they name one.
    terms = {
        w: _alternates(w)
        for w in dict.fromkeys(content_words(plain))
        if w not in NOT_CONTENT and not w.isdigit()
    }
    said = [set(content_words(item.text)) for item in items]
    # Rarer words weigh more: a word every record has tells nothing.
    idf = {t: math.log(1.0 + len(items) / (1 + sum(_names(t, s) for s in said))) for t in terms}
    total = sum(idf.values()) or 1.0
    window = time_window(question, now)
    lexical = [
        sum(idf[t] * max((c for w, c in terms[t] if _names(w, s)), default=0.0) for t in terms) / total
        for s in said
    ]
    # "while the sweets were on screen": records at the time of the scenes that name them.
    during: list[tuple[float, float]] = []
    match = WHILE.search(question.lower())
    if match:
        scene = set(content_words(match.group(1))) - NOT_CONTENT
        during = [
            (item.t0, item.t1)
            for item, s in zip(items, said, strict=True)
            if item.kind in ("clip", "event") and scene and any(_names(t, s) for t in scene)
        ]
    # Memory's text similarity, above what a record typically scores for this question (every
    # record shares the question's style: MiniLM gives them all 0.2-0.4).
    typical = sorted(item.score for item in items)[len(items) // 2]
    scores: list[float] = []
    kept: list[int] = []  # indices of the records that qualified
    timed_only: list[bool] = []  # ... only by being heard at the time the question names
    for item, lex in zip(items, lexical, strict=True):
        base = lex + EMBEDDING_WEIGHT * max(item.score - typical, 0.0)
        heard = item.kind == "transcript"
        inside = window is not None and item.t1 >= window[0] and item.t0 <= window[1]
        said_then = during and heard and any(item.t1 >= t0 and item.t0 <= t1 for t0, t1 in during)
        # A record must share something with the question, or be what a voice said at the
        # time it names (only while no record shares anything): the bonuses only order them.
        outside = window is not None and not inside  # the time it names is generous already
        # A question about what was said wants a scene only when it names it clearly.
        needed = RELATED_BASE_MIN * (2 if wants_speech and not wants_sight and not heard else 1)
        matched = base >= needed or bool(said_then)
        if outside or not (matched or (wants_speech and heard and inside)):
            scores.append(0.0)
            continue
        score = base
        if (wants_speech and heard) or (wants_sight and not wants_speech and not heard):
            score += 0.25
        if inside:  # nearer the middle of the time it names first ("about six minutes ago")
            middle, half = (window[0] + window[1]) / 2, max((window[1] - window[0]) / 2, 1.0)
            off = abs((item.t0 + item.t1) / 2 - middle) / half
            score += 0.35 + 0.1 * max(1.0 - off, 0.0)
        if said_then:
            score += 0.5
        scores.append(score)
        timed_only.append(not matched)
        kept.append(len(scores) - 1)
    if any(not only for only in timed_only):
        for index, only in zip(kept, timed_only, strict=True):
            if only:
                scores[index] = 0.0
    return scores


def related_records(
    question: str, items: list[MemoryRecord], now: float, limit: int = RELATED_LINES
) -> list[MemoryRecord]:
    """The records (clips, transcripts, events) most related to ``question``, in time order:
    at most ``limit``, each scoring at least RELATED_MIN and at least half the best."""
    if ABOUT_NOW.search(question.lower()) and time_window(question, now) is None:
        return []  # what is on screen now is in the "now" record; past scenes would mislead
    candidates = [item for item in items if item.kind in ("clip", "transcript", "event")]
    neighbour = _next_to(question, candidates, now)
    if neighbour is not None:  # "what was shown right after the X": the X, then what came next
        return neighbour
    scores = relatedness(question, candidates, now)
    ranked = sorted(range(len(candidates)), key=lambda i: -scores[i])
    if not ranked or scores[ranked[0]] < RELATED_MIN:
        return []
    best = scores[ranked[0]]
    kept = [i for i in ranked[:limit] if scores[i] >= max(RELATED_MIN, 0.5 * best)]
    return [candidates[i] for i in sorted(kept, key=lambda i: (candidates[i].t0, candidates[i].item_id))]


def backlog_records(
    question: str, items: list[MemoryRecord], now: float, budget_tokens: int, count_tokens
) -> list[MemoryRecord]:
    """Of the records a question's KV does not hold yet (its session's backlog, not prefilled
    before the answer so the first token comes in time), those read as text instead: the most
    related to ``question`` (``relatedness``, at least RELATED_MIN) and the newest in turn, then
    the newest, while their lines fit ``budget_tokens`` (``count_tokens(line)``); in time order."""
    candidates = [item for item in items if item.kind in ("clip", "transcript", "event")]
    if not candidates or budget_tokens <= 0:
        return []
    scores = relatedness(question, candidates, now)
    related = sorted(
        (i for i in range(len(candidates)) if scores[i] >= RELATED_MIN), key=lambda i: -scores[i]
    )
    newest = sorted(range(len(candidates)), key=lambda i: (-candidates[i].t1, -candidates[i].item_id))
    # Taken in turn: the question may be about what was just seen or heard, or about a record
    # its words name.
    turns = [i for pair in zip(related, newest[: len(related)], strict=True) for i in pair]
    kept: list[int] = []
    left = budget_tokens
    for i in dict.fromkeys(turns + newest):
        cost = count_tokens(format_item(candidates[i]) + "\n")
        if cost <= left:
            kept.append(i)
            left -= cost
    return [candidates[i] for i in sorted(kept, key=lambda i: (candidates[i].t0, candidates[i].item_id))]


def _next_to(question: str, items: list[MemoryRecord], now: float) -> list[MemoryRecord] | None:
    """For "what was shown (immediately) after / before the X": the scene that names the X
    best and the scene next to it, marked as such; None for other questions."""
    match = NEXT_TO.search(question.lower())
    if not match or not any(w in VISUAL_CUES for w in words(question[: match.start()])):
        return None
    clips = sorted((item for item in items if item.kind == "clip"), key=lambda c: (c.t0, c.item_id))
    scores = relatedness(match.group(2), clips, now)
    if not clips or max(scores) < ANCHOR_MIN:  # a scene it clearly names, or none
        return None
    at = max(range(len(clips)), key=lambda i: (scores[i], -clips[i].t0))
    step = 1 if match.group(1) == "after" else -1
    if not 0 <= at + step < len(clips):
        return None
    anchor, other = clips[at], clips[at + step]
    mark = f" (shown right {match.group(1)} the scene at {clock(anchor.t0)})"
    other = msgspec.structs.replace(other, text=other.text + mark)
    return sorted([anchor, other], key=lambda c: c.t0)


def related_lines(related: list[MemoryRecord], items: list[MemoryRecord], question: str = "") -> list[str]:
    """``related_records`` as memory lines, a transcript with what was on screen as it was said
    (the clip of ``items`` it falls in) and, for a question that quotes it with a gap ("made
    still more ... what?"), the words that fill the gap."""
    clips = [item for item in items if item.kind == "clip"]
    lines = []
    for item in related:
        line = format_item(item)
        if len(line) > RELATED_LINE_CHARS:
            line = line[: RELATED_LINE_CHARS - 3] + "..."
        if item.kind == "transcript":
            middle = (item.t0 + item.t1) / 2
            scene = next((c for c in clips if c.t0 - 0.5 <= middle <= c.t1 + 0.5), None)
            # Only for "while X was on screen": else the 1.5B answered with the scene's labels
            # ("Mr. Dashwood had a monastery, a bell cote and a castle").
            if scene is not None and WHILE.search(question.lower()):
                shown = scene.text.removeprefix("seen: ").split(";")[0]
                line += f" (on screen then: {shown})"
            filler = gap_filler(question, item.text) if question else None
            if filler:
                line += f' (the words in the gap of the question: "{filler}")'
        lines.append(line)
    return lines


GAP = re.compile(r"\.\.\.|\u2026|_{2,}")
ASKING = frozenset(["what", "which", "who", "whom", "how", "why", "when", "where"])
GAP_CONTEXT = 4  # words of the question matched on each side of its gap
GAP_MAX_WORDS = 5  # most words a gap is filled with


def gap_filler(question: str, heard: str) -> str | None:
    """The words of ``heard`` that fill the gap of a question quoting it: "rather ... is to be
    ill disposed" or "he might even have been made what himself?" against "... made amiable
    himself" -> "amiable". The gap is "..." (or "what" inside a quote, "made what himself"); the
    words before it must be found in ``heard`` (at least two, or one of 5 letters), then those
    after it, if the question goes on; None when the question has no gap or does not quote."""
    if GAP.search(question):
        asked = words(GAP.sub(" qqgapqq ", question))
    else:  # "made what himself": a question word after a quoted word
        asked = words(question)
        spots = [i for i, w in enumerate(asked) if w == "what" and i > 0 and asked[i - 1] not in ASKING]
        if not spots:
            return None
        asked[spots[-1]] = "qqgapqq"
    at = asked.index("qqgapqq")
    before = asked[max(0, at - GAP_CONTEXT) : at]
    after: list[str] = []
    for word in asked[at + 1 : at + 1 + GAP_CONTEXT]:
        if word in ASKING:
            break
        after.append(word)
    said = words(heard)
    for size in range(len(before), 0, -1):  # the longest end of the words before the gap
        tail = before[-size:]
        if size == 1 and len(tail[0]) < 5:
            break
        starts = [i + size for i in range(len(said) - size + 1) if said[i : i + size] == tail]
        if not starts:
            continue
        start = starts[-1]
        if not after:
            filled = said[start : start + GAP_MAX_WORDS]
            return " ".join(filled) or None
        for end in range(start + 1, min(start + GAP_MAX_WORDS, len(said)) + 1):
            if said[end : end + len(after)] == after or (end < len(said) and said[end] == after[0]):
                return " ".join(said[start:end])
        return None
    return None
