"""End of the user's turn, and where the time goes from there to the assistant's first audio.

``reads_finished`` is the end-of-turn signal besides silence (a text-only stand-in for the
turn-detector models of LiveKit Agents and pipecat's smart-turn): whisper punctuates, so a
transcript that ends a sentence and not on a word that needs a continuation ("and", "the") is
taken as a finished turn after a short silence (``turn_end_s``); anything else waits for the
full ``min_silence_s`` plus ``turn_grace_s``. A turn judged over too early costs little: when the
user goes on within ``continue_s`` before hearing the answer, that answer is interrupted and the
next question is asked with both parts.

``Timeline`` collects the latency marks of one spoken turn (monotonic seconds), from the VAD's
last speech window to the first ``AudioOut``; ``Timeline.spans`` names the pieces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from omnistream.speech.speak import DANGLING

# Words after which a speaker is not done even if whisper put a full stop there.
CONTINUATION = DANGLING | frozenset(
    ["because", "if", "when", "while", "where", "until", "unless", "um", "uh", "er", "like"]
)
SENTENCE_DONE = re.compile(r"[.?!][\"')\]]*$")

# (span name, from mark, to mark), in the order they happen.
SPANS = (
    ("end-of-turn wait (silence after the last speech window)", "speech_end", "turn_end"),
    ("final ASR beyond the end-of-turn wait", "turn_end", "final"),
    ("final transcript -> Ask (grace)", "final", "ask"),
    ("Ask -> first AnswerDelta (LLM first token)", "ask", "first_delta"),
    ("first AnswerDelta -> first phrase complete (LLM)", "first_delta", "first_phrase"),
    ("first phrase -> its audio synthesised (TTS)", "first_phrase", "first_tts"),
    ("synthesised -> first AudioOut sent", "first_tts", "first_audio"),
    ("last speech window -> first AudioOut sent (speech stage + LLM)", "speech_end", "first_audio"),
)

USER_MARKS = ("speech_end", "turn_end", "final")


def reads_finished(text: str) -> bool:
    """True when ``text`` reads as a complete turn: it ends a sentence (. ? !) and its last word
    does not ask for more ("... and.", "... the.")."""
    text = text.strip()
    if not SENTENCE_DONE.search(text) or text.endswith(".."):
        return False
    last = re.findall(r"[a-z']+", text.lower())
    return bool(last) and last[-1] not in CONTINUATION


@dataclass
class Timeline:
    """Latency marks of one user turn and its spoken answer. A mark is set once (the first time)."""

    turn: str
    marks: dict[str, float] = field(default_factory=dict)
    asr_s: float | None = None  # compute time of the final transcription

    def mark(self, name: str, at: float) -> None:
        self.marks.setdefault(name, at)

    def forget_answer(self) -> None:
        """Drop the marks of an answer discarded (a tentative Ask's): those of the user's turn stay."""
        self.marks = {name: at for name, at in self.marks.items() if name in USER_MARKS}

    def spans(self) -> dict[str, float]:
        """Seconds between the marks present, by span name (see ``SPANS``)."""
        return {
            name: self.marks[end] - self.marks[start]
            for name, start, end in SPANS
            if start in self.marks and end in self.marks
        }
