"""Turn retrieved memory into the prompt: a timestamped log, the current time, the question."""

from __future__ import annotations

from omnistream.protocol.messages import MemoryItem
from omnistream.protocol.text import clock

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


def format_item(item: MemoryItem) -> str:
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
        return "\n".join([line, *(f"[timeline] {fact}" for fact in item.facts)])
    if item.kind == "sighting":
        return f"[{span}] {item.text}"
    return f"[{span}] on screen: {item.text.removeprefix('seen: ')}"


def memory_log(items: list[MemoryItem]) -> str:
    return "\n".join(format_item(item) for item in items) or "(nothing seen or heard yet)"


KEPT_KINDS = ("now", "synopsis")  # never dropped to fit a budget


def fit_items(items: list[MemoryItem], budget_tokens: int, count_tokens) -> list[MemoryItem]:
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
