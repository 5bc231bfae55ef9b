"""Word error rate, the measure of every transcription figure (tests, ``omnistream bench``)."""

from __future__ import annotations

from collections.abc import Sequence

from omnistream.protocol.text import words


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Substitutions + deletions + insertions that turn ``a`` into ``b`` (Levenshtein): over words
    for a word error rate, over characters for phonemes."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, by edit distance over words."""
    ref = words(reference)
    return edit_distance(ref, words(hypothesis)) / max(len(ref), 1)
