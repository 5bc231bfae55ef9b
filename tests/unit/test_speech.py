"""Speech pieces: resampling and validation, VAD + ASR on real speech, phrase splitting, TTS."""

from __future__ import annotations

import numpy as np
import pytest

from omnistream.app.replay import DEFAULT_SAMPLE
from omnistream.perception.sources import MediaReader
from omnistream.speech.listen import Listener, Recognizer, VoiceActivity, to_mono_16k
from omnistream.speech.speak import PhraseSplitter, Voice


@pytest.fixture(scope="module")
def recognizer() -> Recognizer:
    return Recognizer("tiny.en")


@pytest.fixture(scope="module")
def sample_audio() -> np.ndarray:
    return np.concatenate([e.data for e in MediaReader(DEFAULT_SAMPLE) if e.kind == "audio"])


def test_to_mono_16k_converts_rates_formats_and_channels() -> None:
    tone_48k = np.sin(2 * np.pi * 440 * np.arange(48000) / 48000).astype(np.float32)
    out = to_mono_16k(tone_48k, 48000)
    assert out.dtype == np.float32 and len(out) == 16000
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(int(np.argmax(spectrum)) - 440) <= 1  # 1 Hz bins over one second
    stereo_int16 = np.stack([np.full(441, 16384, np.int16), np.zeros(441, np.int16)], axis=1)
    mono = to_mono_16k(stereo_int16, 44100)
    assert len(mono) == 160 and abs(float(np.median(mono)) - 0.25) < 0.01


@pytest.mark.parametrize(
    ("pcm", "rate", "message"),
    [
        (np.zeros(100, np.float32), 1000, "sample_rate 1000 Hz"),
        (np.zeros((2, 2, 2), np.float32), 16000, "shape"),
        (np.zeros(10, np.uint8), 16000, "int16 or float"),
        (np.array([0.0, np.nan], np.float32), 16000, "NaN"),
    ],
)
def test_bad_audio_is_rejected_with_a_clear_error(pcm, rate, message) -> None:
    with pytest.raises(ValueError, match=message):
        to_mono_16k(pcm, rate)


def run_listener(listener: Listener, audio: np.ndarray, chunk: int, rate: int = 16000):
    events = []
    for start in range(0, len(audio), chunk):
        events += listener.push(audio[start : start + chunk], rate, start / rate)
    return events + listener.flush()


def test_listener_transcribes_real_speech_with_stream_times(
    recognizer: Recognizer, sample_audio: np.ndarray
) -> None:
    events = run_listener(Listener(VoiceActivity(), recognizer), sample_audio, 1600)
    finals = [e for e in events if e.kind == "final" and e.text]
    assert len(finals) == 1
    assert "might even have been made" in finals[0].text.lower()
    assert 2.0 < finals[0].t0 < 3.5 and 5.5 < finals[0].t1 < 7.5
    assert [e.kind for e in events][:1] == ["started"]


def test_listener_partials_while_speaking(recognizer: Recognizer, sample_audio: np.ndarray) -> None:
    events = run_listener(
        Listener(VoiceActivity(), recognizer, partial_every_s=1.0), sample_audio[: 8 * 16000], 4000
    )
    partials = [e for e in events if e.kind == "partial"]
    assert len(partials) >= 2
    assert all(p.t0 == partials[0].t0 for p in partials)
    assert "he" in partials[0].text.lower()


def test_listener_result_does_not_depend_on_chunk_size(
    recognizer: Recognizer, sample_audio: np.ndarray
) -> None:
    speech = sample_audio[: 8 * 16000]
    texts = {
        chunk: [
            e.text
            for e in run_listener(Listener(VoiceActivity(), recognizer), speech, chunk)
            if e.kind == "final"
        ]
        for chunk in (320, 1600, 7777)
    }
    assert texts[320] == texts[1600] == texts[7777]


def test_silence_and_noise_give_no_transcript(recognizer: Recognizer) -> None:
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(16000 * 3) * 0.001).astype(np.float32)
    events = run_listener(Listener(VoiceActivity(), recognizer), noise, 1600)
    assert [e for e in events if e.text] == []


def test_phrase_splitter_emits_complete_phrases_as_they_end() -> None:
    splitter = PhraseSplitter()
    assert splitter.push("You saw a monarch") == []
    assert splitter.push(" butterfly at 00:05. The reader") == ["You saw a monarch butterfly at 00:05."]
    assert splitter.push(" said he might have been made amiable, which is a long clause, and more") == [
        "The reader said he might have been made amiable,",
    ]
    assert splitter.push(" than forty characters") == ["which is a long clause,"]
    assert splitter.finish() == ["and more than forty characters"]
    assert splitter.finish() == []
    assert " ".join(splitter.phrases_out).startswith("You saw a monarch butterfly at 00:05. The reader said")


def test_tts_speaks_each_phrase_and_resamples() -> None:
    voice = Voice("heart")
    audio = voice.synthesize("The butterfly was shown at one minute.")
    assert voice.sample_rate == 24000 and audio.dtype == np.float32
    assert 1.0 < len(audio) / 24000 < 6.0
    assert float(np.sqrt(np.mean(audio**2))) > 0.01
    audio_16k = voice.synthesize("The butterfly was shown at one minute.", sample_rate=16000)
    assert abs(len(audio_16k) - len(audio) * 2 / 3) <= 2
    with pytest.raises(ValueError, match="not packaged"):
        Voice("fenrir")


def test_tts_round_trip_through_asr(recognizer: Recognizer) -> None:
    """What we say is what a listener hears: synthesise, then transcribe."""
    voice = Voice("heart")
    speech = to_mono_16k(voice.synthesize("The orange is on the table."), voice.sample_rate)
    assert "orange" in recognizer.transcribe(speech).lower()
