"""The hypothesis buffer of streaming ASR (ufal/whisper_streaming's LocalAgreement-2).

``StreamingTranscriber`` has whisper_streaming's shape (``insert_audio`` / ``process_iter`` /
``finish``): partials commit only the words two successive hypotheses agree on; the final is one
whisper pass over the whole utterance, so streaming and batch give the same final text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from omnistream.protocol.text import words
from omnistream.speech.asr import Recognizer


@dataclass
class StreamingTranscriber:
    """Streaming ASR state for one utterance. Only the thread that owns it may call it.

    ``process_iter`` returns (committed, tentative): committed words never change afterwards
    (the longest prefix on which the last two hypotheses agree); tentative is the rest of the
    newest hypothesis. ``finish`` returns the final text of the whole utterance.
    """

    recognizer: Recognizer
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    committed: list[str] = field(default_factory=list)
    _previous: list[str] = field(default_factory=list)

    def insert_audio(self, chunk: np.ndarray) -> None:
        """float32 (N,) 16 kHz, appended to the utterance."""
        self.audio = np.concatenate([self.audio, chunk.astype(np.float32, copy=False)])

    def process_iter(self) -> tuple[str, str]:
        hypothesis = self.recognizer.transcribe(self.audio).split()
        agreed = 0
        for new, old in zip(hypothesis, self._previous, strict=False):
            if words(new) != words(old):
                break
            agreed += 1
        if agreed > len(self.committed):
            self.committed = hypothesis[:agreed]
        self._previous = hypothesis
        return " ".join(self.committed), " ".join(hypothesis[len(self.committed) :])

    def finish(self) -> str:
        return self.recognizer.transcribe(self.audio)
