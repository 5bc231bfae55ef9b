"""Which of a question's choices does an open answer support?

Multiple choice is answered from the model's own short open answer (``Answerer.choose`` with
"answer" scoring): the choice the answer's words name is picked, so the letter agrees with what
the assistant would say. Words shared by several choices count less (every choice of "how many
people" says "people"); number words and digits are one vocabulary ("two" = "2"); a choice
"between two and ten" is supported by any number in that range. When no choice is clearly
supported (the answer paraphrases, or says it did not see), the caller scores the choices by
likelihood instead.
"""

from __future__ import annotations

import re

from omnistream.protocol.text import content_words, number, words

NOT_SEEN = re.compile(
    r"\b(did not|didn't|do not|don't|cannot|can't|could not|couldn't|no record|not sure|unclear|"
    r"not (?:seen|heard|shown|visible|mentioned))\b",
    re.IGNORECASE,
)
BETWEEN = re.compile(r"\bbetween (\w+) and (\w+)\b")
SUPPORT_MIN = 0.5  # share of a choice's (weighted) words the answer must name
SUPPORT_MARGIN = 0.2  # ... and by how much it must beat the next choice
SUPPORT_ALONE = 0.3  # ... or this much, when the answer names nothing of any other choice


def _ranges(text: str) -> list[tuple[int, int]]:
    spans = []
    for low, high in BETWEEN.findall(text.lower()):
        a, b = number(low), number(high)
        if a is not None and b is not None:
            spans.append((min(a, b), max(a, b)))
    return spans


def support(answer: str, choices: list[str]) -> list[float]:
    """For each choice, the weighted share of its words that ``answer`` names (0..1); a word in
    k of the choices weighs 1/k. A number in the answer inside a choice's "between X and Y"
    supports that choice fully."""
    said = set(content_words(answer))
    numbers = {int(w) for w in said if w.isdigit()}
    words = [set(content_words(choice)) for choice in choices]
    scores = []
    for choice, mine in zip(choices, words, strict=True):
        if any(low <= n <= high for low, high in _ranges(choice) for n in numbers):
            scores.append(1.0)
            continue
        weight = {w: 1.0 / sum(w in other for other in words) for w in mine}
        total = sum(weight.values())
        scores.append(sum(v for w, v in weight.items() if w in said) / total if total else 0.0)
    return scores


def _head_of_compound(answer: str, choices: list[str], tied: list[int]) -> int | None:
    """Of choices the answer supports equally, the one named by the last word of a compound
    ("a fox squirrel": a squirrel, not a fox; "a soccer ball": a ball), when each is named by
    one word and those words stand side by side in the answer; else None."""
    said = [content_words(word) for word in words(answer)]  # by position, stop words empty
    positions = []
    for index in tied:
        mine = set(content_words(choices[index]))
        at = [i for i, forms in enumerate(said) if forms and forms[0] in mine]
        if len(mine) != 1 or len(at) != 1:
            return None
        positions.append((at[0], index))
    positions.sort()
    if any(b[0] - a[0] != 1 for a, b in zip(positions, positions[1:], strict=False)):
        return None
    return positions[-1][1]


def supported_choice(answer: str, choices: list[str]) -> int | None:
    """The index of the one choice ``answer`` clearly supports, or None (no such choice, a tie,
    or an answer that says it did not see or hear). A choice only partly named (one word of
    "red and blue stripes") is picked when the answer names nothing of any other choice; of
    choices named in one compound ("fox squirrel") the last word's is picked."""
    if not answer.strip() or NOT_SEEN.search(answer) or not choices:
        return None
    scores = support(answer, choices)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    best = order[0]
    runner_up = scores[order[1]] if len(order) > 1 else 0.0
    if scores[best] >= SUPPORT_MIN and scores[best] - runner_up >= SUPPORT_MARGIN:
        return best
    if scores[best] >= SUPPORT_ALONE and runner_up == 0.0:
        return best
    tied = [i for i in order if scores[i] >= SUPPORT_MIN and scores[best] - scores[i] < SUPPORT_MARGIN]
    if len(tied) > 1:
        return _head_of_compound(answer, choices, tied)
    return None
