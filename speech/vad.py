"""Voice activity: 16 kHz audio -> Silero VAD -> utterances, for one audio channel.

``Listener`` is the streaming VAD state of one channel (the user's microphone or the stream's
sound track): ``push(pcm, sample_rate, ts)`` returns events (speech started, utterance audio so
far for a partial transcript, a pause, utterance ended with its voiced audio). It never runs ASR
itself, so the caller can keep VAD on its own thread while ASR runs elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from omnistream.speech.resample import SAMPLE_RATE, StreamResampler, to_mono_float

VAD_WINDOW = 512  # samples at 16 kHz (32 ms), what Silero VAD expects
STEP_S = VAD_WINDOW / SAMPLE_RATE
PRE_ROLL_S = 0.3  # audio kept before the VAD fires: whisper mishears clipped onsets
TAIL_WINDOWS = 3  # non-speech windows (96 ms) kept after the last speech window of an utterance
# After this much silence the utterance is transcribed speculatively: if no speech follows, that
# is already the final (the same samples as at the end), so the end-of-turn wait hides the ASR.
EARLY_FINAL_S = 0.2


class VoiceActivity:
    """Silero VAD (ONNX): speech probability per 512-sample window, state kept across calls."""

    def __init__(self):
        from silero_vad import load_silero_vad

        self.model = load_silero_vad(onnx=True)

    def reset(self) -> None:
        self.model.reset_states()

    def probability(self, window: np.ndarray) -> float:
        import torch

        return float(self.model(torch.from_numpy(window), SAMPLE_RATE))


@dataclass
class ListenEvent:
    """``kind``: "started" (VAD fired; ``t0`` includes the pre-roll), "partial" (``audio`` is the
    utterance so far), "pause" (``pause_s`` of silence: ``audio`` is what "ended" will carry
    if no speech follows), "ended" (``audio`` is the voiced utterance, None when too short to be
    speech). Times are stream seconds; ``audio`` is float32 (N,) at 16 kHz, owned by the event."""

    kind: str
    t0: float
    t1: float
    utterance: int
    audio: np.ndarray | None = None


@dataclass
class Listener:
    """VAD segmentation of one channel. Times are stream seconds of the pushed samples.

    Partial events come ``first_partial_s`` after the onset, then every ``partial_every_s``
    (0: no partials); a "pause" event after ``pause_s`` of non-speech. An utterance ends after
    ``min_silence_s`` of non-speech, at ``max_utterance_s``, or when ``cut()``.
    """

    vad: VoiceActivity
    threshold: float = 0.5
    min_silence_s: float = 0.5
    min_speech_s: float = 0.25
    max_utterance_s: float = 20.0
    first_partial_s: float = 0.0
    partial_every_s: float = 1.0
    pause_s: float = EARLY_FINAL_S
    _resampler: StreamResampler | None = None
    _pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _origin_ts: float | None = None  # stream time of 16 kHz sample 0
    _examined: int = 0  # 16 kHz samples the VAD has seen
    _input_s: float = 0.0  # seconds of input pushed
    _pre_roll: list[np.ndarray] = field(default_factory=list)
    _speech: list[np.ndarray] = field(default_factory=list)
    _speech_t0: float = 0.0
    _silence_s: float = 0.0
    _voiced_windows: int = 0  # windows up to the last speech window
    _onset_window: int = 0  # index of the window where the VAD fired (after the pre-roll)
    _next_partial_s: float = 0.0
    _utterances: int = 0
    in_speech: bool = False

    def push(self, pcm: np.ndarray, sample_rate: int, ts: float) -> list[ListenEvent]:
        """Any chunk size, rate or format (see ``to_mono_float``); ``ts``: stream time of pcm[0].

        Times follow the sample count; a chunk whose ``ts`` is over a second away from where the
        samples say it should be (the stream jumped or paused) moves the clock to it."""
        audio = to_mono_float(pcm, sample_rate)
        if self._resampler is None or self._resampler.sample_rate != sample_rate:
            self._resampler = StreamResampler(sample_rate)
        if self._origin_ts is None:
            self._origin_ts = ts
        elif abs(ts - (self._origin_ts + self._input_s)) > 1.0:
            self._origin_ts = ts - self._input_s
        self._input_s += len(audio) / sample_rate
        self._pending = np.concatenate([self._pending, self._resampler.push(audio)])
        events: list[ListenEvent] = []
        while len(self._pending) >= VAD_WINDOW:
            window, self._pending = self._pending[:VAD_WINDOW], self._pending[VAD_WINDOW:]
            window_ts = self.stream_ts
            self._examined += VAD_WINDOW
            events += self._step(window, window_ts)
        return events

    @property
    def stream_ts(self) -> float:
        """Stream time of the first sample not yet examined by the VAD."""
        return (self._origin_ts or 0.0) + self._examined / SAMPLE_RATE

    def _step(self, window: np.ndarray, ts: float) -> list[ListenEvent]:
        speech = self.vad.probability(window) >= self.threshold
        if not self.in_speech:
            self._pre_roll.append(window)
            del self._pre_roll[: -int(PRE_ROLL_S / STEP_S) or None]
            if not speech:
                return []
            self.in_speech = True
            self._utterances += 1
            self._speech = list(self._pre_roll)
            self._speech_t0 = ts - (len(self._pre_roll) - 1) * STEP_S
            self._silence_s = 0.0
            self._voiced_windows = len(self._speech)
            self._onset_window = len(self._speech) - 1
            self._next_partial_s = self.first_partial_s or self.partial_every_s
            return [ListenEvent("started", self._speech_t0, ts, self._utterances)]
        self._speech.append(window)
        self._silence_s = 0.0 if speech else self._silence_s + STEP_S
        if speech:
            self._voiced_windows = len(self._speech)
        end_ts = ts + STEP_S
        heard_s = end_ts - self._speech_t0 - PRE_ROLL_S
        if self._silence_s >= self.min_silence_s or heard_s >= self.max_utterance_s:
            return [self._finish(end_ts)]
        silent_windows = len(self._speech) - self._voiced_windows
        if silent_windows == max(round(self.pause_s / STEP_S), 1) and self._voiced() is not None:
            return [ListenEvent("pause", self._speech_t0, end_ts, self._utterances, self._voiced())]
        if self.first_partial_s and heard_s >= self._next_partial_s and not silent_windows:
            self._next_partial_s = heard_s + self.partial_every_s
            return [
                ListenEvent(
                    "partial", self._speech_t0, end_ts, self._utterances, np.concatenate(self._speech)
                )
            ]
        return []

    def _voiced(self) -> np.ndarray | None:
        """The utterance up to its last speech window plus a short tail; None when the VAD heard
        speech for less than ``min_speech_s`` (onset to last speech window): a cough, a click."""
        if (self._voiced_windows - self._onset_window) * STEP_S < self.min_speech_s:
            return None
        return np.concatenate(self._speech[: self._voiced_windows + TAIL_WINDOWS])

    def _finish(self, end_ts: float) -> ListenEvent:
        voiced = self._voiced()
        self.in_speech = False
        self._speech, self._pre_roll = [], []
        return ListenEvent("ended", self._speech_t0, end_ts, self._utterances, voiced)

    @property
    def utterance(self) -> int:
        """Number of the utterance in progress (or of the last one)."""
        return self._utterances

    @property
    def silence_s(self) -> float:
        """Seconds of non-speech since the last speech window of the utterance in progress."""
        return self._silence_s if self.in_speech else 0.0

    def cut(self) -> list[ListenEvent]:
        """End the utterance in progress now (the user's turn is judged over before
        ``min_silence_s``): its "ended" event, whose audio is the last "pause" event's when no
        speech came since. Speech after this starts a new utterance."""
        if not self.in_speech:
            return []
        return [self._finish(self.stream_ts)]

    def flush(self) -> list[ListenEvent]:
        """End of stream: finish an utterance in progress."""
        return self.cut()
