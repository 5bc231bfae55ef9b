"""Text helpers shared by the stages."""

from __future__ import annotations

import re


def words(text: str) -> list[str]:
    """Lower-case words without punctuation: what transcripts are compared on."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())
