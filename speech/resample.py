"""Any-rate, any-format PCM -> float32 mono at 16 kHz, what the VAD and whisper take.

``to_mono_16k`` converts a whole recording; ``StreamResampler`` converts a stream chunk by chunk
with the same output whatever the chunk sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from scipy.signal import resample_poly

from omnistream.speech.rates import sample_rate_problem

SAMPLE_RATE = 16000
MIN_RATE, MAX_RATE = 4000, 192000


def to_mono_float(pcm: np.ndarray, sample_rate: int) -> np.ndarray:
    """Validate and mix down: PCM (N,) or (N, C), int16 or float -> float32 (N,) in [-1, 1]."""
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise ValueError(f"AudioChunk.sample_rate {sample_rate} Hz outside {MIN_RATE}..{MAX_RATE} Hz")
    problem = sample_rate_problem(sample_rate)
    if problem:
        raise ValueError(f"AudioChunk.{problem}")
    audio = np.asarray(pcm)
    if audio.ndim not in (1, 2):
        raise ValueError(f"AudioChunk.pcm must be (N,) or (N, channels), got shape {audio.shape}")
    if audio.dtype == np.int16:
        audio = audio.astype(np.float32) / 32768.0
    elif audio.dtype.kind == "f":
        audio = audio.astype(np.float32)
    else:
        raise ValueError(f"AudioChunk.pcm must be int16 or float, got {audio.dtype}")
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if not np.all(np.isfinite(audio)):
        raise ValueError("AudioChunk.pcm contains NaN or infinite samples")
    return np.clip(audio, -1.0, 1.0)


def to_mono_16k(pcm: np.ndarray, sample_rate: int) -> np.ndarray:
    """A whole recording: PCM (N,) or (N, C), int16 or float -> float32 (M,) at 16 kHz in [-1, 1]."""
    audio = to_mono_float(pcm, sample_rate)
    if sample_rate != SAMPLE_RATE:
        ratio = Fraction(SAMPLE_RATE, sample_rate)
        audio = resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)
    return audio


@dataclass
class StreamResampler:
    """Chunked resampling to 16 kHz whose output does not depend on the chunk sizes.

    ``resample_poly`` on each chunk would zero-pad every chunk edge (a click each time). Here the
    input is kept from a position that is a multiple of ``down`` (so output samples fall on the
    grid of a one-call resample) with enough context for the FIR filter, and only output samples
    whose filter support is complete are returned. The output lags the input by about
    10 * max(up, down) / up input samples (under 2 ms).
    """

    sample_rate: int
    _kept: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _kept_start: int = 0  # input index of _kept[0], a multiple of down
    _emitted: int = 0  # output samples returned so far

    def push(self, audio: np.ndarray) -> np.ndarray:
        """float32 (N,) at ``sample_rate`` -> float32 (M,) at 16 kHz."""
        if self.sample_rate == SAMPLE_RATE:
            return audio
        ratio = Fraction(SAMPLE_RATE, self.sample_rate)
        up, down = ratio.numerator, ratio.denominator
        context = 10 * max(up, down) // up + 1  # resample_poly's filter half-length, input samples
        self._kept = np.concatenate([self._kept, audio])
        available = self._kept_start + len(self._kept)
        ready = max((available - context) * up // down, self._emitted)
        if ready == self._emitted:
            return np.zeros(0, np.float32)
        out = resample_poly(self._kept, up, down)
        first = self._kept_start * up // down
        result = out[self._emitted - first : ready - first].astype(np.float32)
        self._emitted = ready
        # Keep the input that output samples from ``ready`` on still need, from a multiple of down.
        keep_from = max((ready * down // up - context) // down * down, self._kept_start)
        self._kept = self._kept[keep_from - self._kept_start :]
        self._kept_start = keep_from
        return result
