"""Speaking: answer text arrives in deltas; whole phrases are synthesised as soon as they end.

``PhraseSplitter`` turns a stream of text deltas into phrases (sentence or clause ends), so the
first audio comes before the answer is complete. ``Voice`` wraps hibari (Kokoro-distilled,
voice "heart", 24 kHz) and resamples to the client's rate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from scipy.signal import resample_poly

# A phrase ends at sentence punctuation, or at a comma/semicolon once it is long enough to sound
# natural on its own. The first phrase of an answer may be a shorter clause: it is what the user
# waits for, and the LLM needs a second or more to reach the end of a sentence.
SENTENCE_END = re.compile(r"[.!?\n]+[\"')\]]*\s")
CLAUSE_END = re.compile(r"[,;:]\s")
MIN_CLAUSE_CHARS = 40
MIN_FIRST_CLAUSE_CHARS = 16


@dataclass
class PhraseSplitter:
    """Streaming state: text deltas in, complete phrases out; ``finish`` returns the rest."""

    buffer: str = ""
    phrases_out: list[str] = field(default_factory=list)

    def push(self, delta: str) -> list[str]:
        self.buffer += delta
        phrases = []
        while True:
            match = SENTENCE_END.search(self.buffer)
            min_chars = MIN_FIRST_CLAUSE_CHARS if not (self.phrases_out or phrases) else MIN_CLAUSE_CHARS
            if match is None and len(self.buffer) >= min_chars:
                match = CLAUSE_END.search(self.buffer, min_chars // 2)
            if match is None:
                break
            phrase, self.buffer = self.buffer[: match.end()].strip(), self.buffer[match.end() :]
            if phrase:
                phrases.append(phrase)
        self.phrases_out += phrases
        return phrases

    def finish(self) -> list[str]:
        rest, self.buffer = self.buffer.strip(), ""
        if rest:
            self.phrases_out.append(rest)
            return [rest]
        return []


class Voice:
    def __init__(self, voice: str = "heart", threads: int = 1):
        from hibari import SAMPLE_RATE, Hibari

        if voice != "heart":
            raise ValueError(f"TTS voice {voice!r} is not packaged (only 'heart' ships offline)")
        self.tts = Hibari(threads=threads)
        self.sample_rate = int(SAMPLE_RATE)
        self.tts("Ready.", seed=0)  # the first call is ten times slower: pay it before the first answer

    def synthesize(self, text: str, sample_rate: int | None = None) -> np.ndarray:
        """text -> float32 (N,) in [-1, 1] at ``sample_rate`` (default: the voice's 24 kHz)."""
        audio = np.asarray(self.tts(text, seed=0), dtype=np.float32).reshape(-1)
        if sample_rate and sample_rate != self.sample_rate:
            ratio = Fraction(sample_rate, self.sample_rate)
            audio = resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)
        return audio
