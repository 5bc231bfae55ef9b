"""Text helpers shared by the stages."""

from __future__ import annotations

import re


def words(text: str) -> list[str]:
    """Lower-case words without punctuation: what transcripts are compared on."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def clock(seconds: float) -> str:
    """Stream time as mm:ss (h:mm:ss past an hour), as answers cite it."""
    total = max(int(round(seconds)), 0)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
