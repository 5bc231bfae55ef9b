"""Text helpers shared by the stages."""

from __future__ import annotations

import re


def words(text: str) -> list[str]:
    """Lower-case words without punctuation: what transcripts are compared on."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def content_words(text: str) -> list[str]:
    """Lower-case words without stop words, plural 's' removed, numbers as digits: what an
    answer and a choice, or a question and a record, are matched on."""
    out = []
    for word in words(text):
        value = number(word)
        if value is not None:
            out.append(str(value))
        elif word not in STOP_WORDS:
            out.append(stem(word))
    return out


def clock(seconds: float) -> str:
    """Stream time as mm:ss (h:mm:ss past an hour), as answers cite it."""
    total = max(int(round(seconds)), 0)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


NUMBER_WORDS = {
    "none": 0, "nobody": 0, "zero": 0, "one": 1, "once": 1, "single": 1, "two": 2,
    "twice": 2, "three": 3, "thrice": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "twenty": 20,
    "thirty": 30, "forty": 40, "fifty": 50, "hundred": 100,
}  # fmt: skip
_STOP = """a an the and or of in on at to for with by from is are was were be been it its this that
these those there here what which who whom how did do does has have had i you he she they we my
your his her their our me him them us as so than then just only very some any all about into onto
over under up down out screen seen shown picture image stream"""
STOP_WORDS = frozenset(_STOP.split())


def stem(word: str) -> str:
    """A plural's singular, roughly: "oranges" -> "orange", "glasses" -> "glass"."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def number(word: str) -> int | None:
    """A number written in digits or as a word ("two", "twice"), else None."""
    if word.isdigit():
        return int(word)
    return NUMBER_WORDS.get(word)
