"""Model preparation (`omnistream models`): build the LLM cache, then load every default model once.

Runs automatically before the stages start; everything comes from installed registry packages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from omnistream.protocol.config import Config


@dataclass
class ModelCheck:
    role: str
    model: str
    seconds: float
    detail: str


class ProgressBars:
    """tqdm bars keyed by step name, for ``prepare_llm``'s progress callback."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bars: dict[str, tqdm] = {}

    def __call__(self, step: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(step)
        if bar is None:
            scale = total > 10_000
            bar = self.bars[step] = tqdm(
                total=total, desc=step, unit="B" if scale else "step", unit_scale=scale, leave=True
            )
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def prepare_llm_cache(config: Config, progress: bool = True, every_packaged: bool = False):
    """Prepare the configured LLM (and with ``every_packaged`` the fast one too): reassemble,
    convert, and build the native kernels, plus the int8 cache of each model the engine will
    run as int8 ("gguf", the 1.5B's default on a CPU, runs the reassembled GGUF as it is)."""
    from omnistream.reasoning.llm import formats
    from omnistream.reasoning.llm.prepare import PACKAGED_MODELS, prepare_llm

    names = [config.reasoning.model, *(PACKAGED_MODELS if every_packaged else ())]
    bars = ProgressBars(progress)
    try:
        dirs = [prepare_llm(name, config.cache_dir, progress=bars) for name in dict.fromkeys(names)]
    finally:
        bars.close()
    chosen = {model_dir: formats.choose(config.reasoning.dtype, model_dir).format for model_dir in dirs}
    if any(fmt in ("gguf", "int8") for fmt in chosen.values()):
        from omnistream.kernels import cpu

        cpu.build()  # the kernels, compiled once (float32 runs where they cannot)
    for model_dir, fmt in chosen.items():
        if fmt != "int8":  # "gguf" runs the reassembled GGUF's blocks as they are: no cache
            continue
        if progress and not (formats.int8_cache(model_dir) / "int8.json").exists():
            print(f"quantizing {model_dir.name} to int8 (once)", flush=True)
        formats.prepare_int8(model_dir)
    return dirs[0]


def _check_encoder(config: Config) -> str:
    from omnistream.perception.encoder import load_encoder

    encoder = load_encoder(config.perception.encoder)
    features, probs = encoder.encode([np.zeros((240, 320, 3), np.uint8)])
    return f"{features.shape[1]}-d features, {probs.shape[1]} classes"


def _check_objects(config: Config) -> str:
    from omnistream.perception.objects import ObjectDetector

    if config.perception.objects_fps <= 0:
        return "off (perception.objects_fps = 0)"
    detector = ObjectDetector()
    return f"{len(detector.detect(np.zeros((240, 320, 3), np.uint8)))} objects on a black frame"


def _check_embedder(_config: Config) -> str:
    from omnistream.memory.embedder import TextEmbedder

    return f"{TextEmbedder().embed(['hello']).shape[1]}-d text vectors"


def _check_vad(_config: Config) -> str:
    from omnistream.speech.vad import VoiceActivity

    return f"p(speech | silence) = {VoiceActivity().probability(np.zeros(512, np.float32)):.2f}"


def _check_asr(config: Config) -> str:
    from omnistream.speech.asr import Recognizer

    Recognizer(config.speech.asr_model)
    return "loaded"


def _check_tts(config: Config) -> str:
    from omnistream.speech.speak import Voice

    voice = Voice(config.speech.tts_voice)
    return f"{len(voice.synthesize('Ready.')) / voice.sample_rate:.2f} s of audio for 'Ready.'"


def _tts_name(voice: str) -> str:
    """The configured voice only: the Piper one (an optional extra) is checked when it is chosen."""
    if voice.startswith("piper:"):
        name, _, phonemiser = voice.removeprefix("piper:").partition(":")
        if phonemiser == "hibari":
            return f"Piper {name} (optional voice, hibari's G2P)"
        return f"Piper {name} (optional extra, GPL espeak-ng phonemiser)"
    return f"hibari ({voice})"


def _check_llm(config: Config) -> str:
    from omnistream.reasoning.llm.engine import LLMEngine

    engine = LLMEngine(
        prepare_llm_cache(config, progress=False), config.reasoning.dtype, config.reasoning.threads
    )
    reply = "".join(
        engine.stream(engine.chat_ids("Answer in one word.", "What colour is the sky on a clear day?"), 4)
    )
    return f"says {reply.strip()!r}"


def check_models(config: Config, on_result: Callable[[ModelCheck], None] | None = None) -> list[ModelCheck]:
    """Load every default model once and run it on a tiny input; raises on the first failure."""
    checks = [
        ("frame encoder", config.perception.encoder, _check_encoder),
        ("objects", "SSD-MobileNet-v2 COCO", _check_objects),
        ("text embedding", config.memory.embedder, _check_embedder),
        ("VAD", "silero-vad (ONNX)", _check_vad),
        ("ASR", f"faster-whisper {config.speech.asr_model}", _check_asr),
        ("TTS", _tts_name(config.speech.tts_voice), _check_tts),
        ("LLM", config.reasoning.model, _check_llm),
    ]
    results = []
    for role, name, check in checks:
        start = time.monotonic()
        detail = check(config)
        result = ModelCheck(role, name, round(time.monotonic() - start, 2), detail)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
