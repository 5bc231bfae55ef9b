"""Full-duplex bookkeeping: paced playout of the assistant's voice, echo and wake-phrase checks.

``Playout`` holds one answer's synthesised audio and sends it in small chunks paced to real time,
a little ahead of the client's playback (``lead_s``), so stopping sending stops the voice within
``lead_s`` and the client has almost nothing queued to drop. It knows how much the client has
played, so a cut answer is remembered as the words actually spoken. ``SpokenTurn``,
``Utterance`` and ``PendingQuestion`` are the speech stage's per-answer, per-user-utterance and
end-of-turn state (a ``PendingQuestion`` stays after it is asked: the user may go on with it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from difflib import SequenceMatcher

import numpy as np

from omnistream.protocol.messages import Ask
from omnistream.protocol.text import words
from omnistream.speech.hypothesis import StreamingTranscriber
from omnistream.speech.speak import PhraseSplitter
from omnistream.speech.turns import Timeline


@dataclass
class Playout:
    """Streaming state of one spoken answer. Positions are samples at ``rate`` Hz; wall times are
    ``time.monotonic()`` seconds. The buffer only grows; ``take`` returns copies."""

    rate: int
    chunk_s: float = 0.04
    lead_s: float = 0.12
    buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    phrases: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, text)
    sent: int = 0
    paused: bool = False
    _anchor_pos: int = 0
    _anchor_wall: float = 0.0
    _started: bool = False

    def add(self, text: str, audio: np.ndarray) -> None:
        """Append one phrase: float32 (N,) at ``rate`` Hz."""
        start = len(self.buffer)
        self.buffer = np.concatenate([self.buffer, audio.astype(np.float32, copy=False)])
        self.phrases.append((start, len(self.buffer), text))

    def played(self, now: float) -> int:
        """Samples the client has played by ``now`` (it cannot play what was not sent)."""
        if not self._started:
            return 0
        if self.paused:
            return self.sent
        return min(self.sent, self._anchor_pos + int((now - self._anchor_wall) * self.rate))

    def take(self, now: float) -> list[np.ndarray]:
        """Chunks due by ``now``: enough to keep ``lead_s`` ahead of playback."""
        if self.paused or self.sent >= len(self.buffer):
            return []
        if not self._started or self.played(now) >= self.sent:
            # First audio, or the client ran dry waiting for synthesis: playback restarts now.
            self._started = True
            self._anchor_pos, self._anchor_wall = self.sent, now
        limit = min(len(self.buffer), self.played(now) + int(self.lead_s * self.rate))
        step = max(int(self.chunk_s * self.rate), 1)
        chunks = []
        while self.sent < limit:
            end = min(self.sent + step, len(self.buffer))
            chunks.append(self.buffer[self.sent : end].copy())
            self.sent = end
        return chunks

    def pause(self, now: float) -> None:
        """Stop sending; the client drops what it queued, so sending resumes from what it played."""
        if not self.paused:
            self.sent = self.played(now)
            self.paused = True

    def resume(self, now: float) -> None:
        if self.paused:
            self.paused = False
            self._anchor_pos, self._anchor_wall = self.sent, now

    @property
    def all_sent(self) -> bool:
        return self.sent >= len(self.buffer)

    def spoken_text(self, upto: int) -> str:
        """The words heard up to sample ``upto``; a cut phrase keeps the share of its words that
        corresponds to the share of its audio played."""
        spoken = []
        for start, end, text in self.phrases:
            if end <= upto:
                spoken.append(text)
            elif start < upto:
                phrase_words = text.split()
                keep = int(len(phrase_words) * (upto - start) / max(end - start, 1))
                spoken += phrase_words[:keep]
        return " ".join(spoken)


def is_echo(heard: str, spoken: str, min_overlap: float = 0.6) -> bool:
    """True when most words of ``heard`` (a user transcript) are the assistant's own words in its
    own order: its voice leaking into the microphone rather than the user. An echo reproduces
    runs of consecutive words; a user who asks about the same thing shares words but not runs
    ("what animal is on the screen?" against "the animal on the screen is a butterfly" has one
    run, "on the screen", half its words). Runs count from two words (one for a heard text of
    one or two words). A heard word matches a spoken one closely enough (``difflib`` ratio >=
    0.75) to survive ASR slips ("disposed" / "dispose")."""
    heard_words = words(heard)
    spoken_words = words(spoken)
    if not heard_words or not spoken_words:
        return False
    vocabulary = set(spoken_words)

    def as_spoken(word: str) -> str:
        if word in vocabulary:
            return word
        best = max(vocabulary, key=lambda other: SequenceMatcher(None, word, other).ratio())
        return best if SequenceMatcher(None, word, best).ratio() >= 0.75 else word

    heard_words = [as_spoken(word) for word in heard_words]
    min_run = 2 if len(heard_words) >= 3 else 1
    blocks = SequenceMatcher(None, heard_words, spoken_words, autojunk=False).get_matching_blocks()
    covered = sum(block.size for block in blocks if block.size >= min_run)
    return covered / len(heard_words) >= min_overlap


def after_wake_phrase(text: str, wake_phrase: str) -> str | None:
    """The question that follows ``wake_phrase`` in ``text`` ("hey omni, what is that?" with
    "omni" -> "what is that?"), or None when the wake phrase is absent."""
    wake = words(wake_phrase)
    tokens = text.split()
    normalised = [" ".join(words(token)) for token in tokens]
    for start in range(len(tokens) - len(wake) + 1):
        if normalised[start : start + len(wake)] == wake:
            return " ".join(tokens[start + len(wake) :]).lstrip(",.:;!? ")
    return None


@dataclass
class SpokenTurn:
    ask: Ask
    playout: Playout
    splitter: PhraseSplitter = field(default_factory=PhraseSplitter)
    text: str = ""  # answer text received so far
    submitted: int = 0  # phrases handed to TTS
    synthesized: int = 0
    answer_done: bool = False
    seq: int = 0
    t0: float | None = None  # stream time of the first audio sent
    heard_by: tuple[str, int] | None = None  # the user utterance that may be barging in
    echo_heard: bool = False  # its own voice reached the microphone: confirm barge-ins by words
    cancelled: bool = False  # read by the TTS thread: skip this turn's queued phrases
    held: bool = False  # a tentative Ask's answer: synthesised, not sent until confirmed
    tentative_pieces: int = 0  # tentative AnswerDeltas received: their confirmed replays are skipped
    timeline: Timeline = field(default_factory=lambda: Timeline(""))


@dataclass
class Utterance:
    t0: float
    transcriber: StreamingTranscriber
    timeline: Timeline = field(default_factory=lambda: Timeline(""))
    ended: bool = False
    end_ts: float | None = None
    echo: bool = False
    early_samples: int = -2  # length of the audio transcribed speculatively at a pause
    early_text: str | None = None
    final_samples: int = -3
    continues: PendingQuestion | None = None  # the question this utterance may be going on with
    drafted: str = ""  # the question last sent as a Draft
    partial_question: str = ""  # the question the latest partial transcript makes
    early_ts: float = 0.0  # stream time of the end of the audio transcribed speculatively
    voiced_ts: float = 0.0  # stream time of the end of the final's audio: the question's ts


@dataclass
class PendingQuestion:
    text: str
    t0: float
    t1: float
    deadline: float  # monotonic seconds
    timeline: Timeline = field(default_factory=lambda: Timeline(""))
    turn: str = ""  # the Ask's turn, once asked


@dataclass
class Preemption:
    """A question asked tentatively (``Ask.tentative``) before the end of its turn: confirmed
    when the turn ends with the same question and ts, else discarded."""

    key: tuple[str, int]  # the user utterance whose speculative transcript it is
    question: str
    ts: float
    turn: str
    timeline: Timeline
