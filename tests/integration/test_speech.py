"""Speech pieces: resampling and validation, VAD + ASR on real speech, phrase splitting, TTS."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile
from scipy.signal import resample_poly

from omnistream.app.replay import DEFAULT_SAMPLE
from omnistream.perception.sources import MediaReader
from omnistream.protocol.text import words
from omnistream.speech.asr import Recognizer, looped
from omnistream.speech.hypothesis import StreamingTranscriber
from omnistream.speech.resample import StreamResampler, to_mono_16k
from omnistream.speech.speak import PhraseSplitter, Voice
from omnistream.speech.vad import Listener, VoiceActivity
from omnistream.speech.wer import word_error_rate

from ..util import wait_until


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


LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")  # Debian pocketsphinx-testdata


def librivox_clips() -> list[tuple[str, str]]:
    """(wav path, reference text) for the five LibriVox clips of pocketsphinx-testdata."""
    clips = []
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        match = re.fullmatch(r"<s> (.*) </s> \((.*)\)", line.strip())
        assert match is not None, line
        clips.append((str(LIBRIVOX / f"{match.group(2)}.wav"), match.group(1)))
    return clips


def run_listener(
    listener: Listener, recognizer: Recognizer, audio: np.ndarray, chunk: int, rate: int = 16000
):
    """Feed ``audio`` in ``chunk``-sample pieces; return events with the finals transcribed, as
    (kind, t0, t1, text)."""
    events = []
    for start in range(0, len(audio), chunk):
        events += listener.push(audio[start : start + chunk], rate, start / rate)
    out = []
    for event in events + listener.flush():
        text = recognizer.transcribe(event.audio) if event.kind == "ended" and event.audio is not None else ""
        out.append((event.kind, event.t0, event.t1, text))
    return out


def test_listener_transcribes_real_speech_with_stream_times(
    recognizer: Recognizer, sample_audio: np.ndarray
) -> None:
    events = run_listener(Listener(VoiceActivity()), recognizer, sample_audio, 1600)
    finals = [e for e in events if e[0] == "ended" and e[3]]
    assert len(finals) == 1
    _, t0, t1, text = finals[0]
    assert "might even have been made" in text.lower()
    assert 2.0 < t0 < 3.5 and 5.5 < t1 < 7.5
    assert [e[0] for e in events][:1] == ["started"]


def test_streaming_partials_commit_only_stable_words(
    recognizer: Recognizer, sample_audio: np.ndarray
) -> None:
    listener = Listener(VoiceActivity(), first_partial_s=0.3, partial_every_s=0.5)
    transcriber = StreamingTranscriber(recognizer)
    committed_history, partial_t0s = [], set()
    speech = sample_audio[: 8 * 16000]
    final = None
    for start in range(0, len(speech), 4000):
        for event in listener.push(speech[start : start + 4000], 16000, start / 16000):
            if event.kind == "partial":
                transcriber.insert_audio(event.audio[len(transcriber.audio) :])
                committed, _tentative = transcriber.process_iter()
                committed_history.append(committed)
                partial_t0s.add(event.t0)
            elif event.kind == "ended":
                final = recognizer.transcribe(event.audio)
    assert len(committed_history) >= 4 and len(partial_t0s) == 1
    # Committed text only grows: a word once committed is never taken back.
    for earlier, later in zip(committed_history, committed_history[1:], strict=False):
        assert later.startswith(earlier)
    assert committed_history[-1], committed_history
    assert final is not None and final.lower().startswith(committed_history[-1].lower().rstrip(".,"))
    assert transcriber.finish() and "amiable" in transcriber.finish().lower()


@pytest.mark.parametrize("rate", [16000, 44100])
def test_streaming_equals_batch_for_any_chunk_size(recognizer: Recognizer, rate: int) -> None:
    """An utterance fed in chunks of several sizes (and at another rate) gives exactly the final
    transcript of one call, which is the transcript of the whole clip."""
    path, reference = librivox_clips()[4]
    audio, clip_rate = soundfile.read(path, dtype="float32")
    assert clip_rate == 16000
    batch = recognizer.transcribe(audio)
    assert word_error_rate(reference, batch) <= 0.1, batch
    if rate != 16000:
        audio = resample_poly(audio, rate, 16000).astype(np.float32)
    padded = np.concatenate([np.zeros(rate // 2, np.float32), audio, np.zeros(rate, np.float32)])
    finals = {}
    for chunk in (len(padded), 320, 1600, 7777):
        events = run_listener(Listener(VoiceActivity()), recognizer, padded, chunk, rate)
        finals[chunk] = [
            (round(t0, 3), round(t1, 3), text) for kind, t0, t1, text in events if kind == "ended"
        ]
    assert len(finals[len(padded)]) == 1
    assert all(found == finals[len(padded)] for found in finals.values()), finals
    assert word_error_rate(batch, finals[320][0][2]) <= 0.1, (batch, finals[320])


def test_stream_resampler_matches_one_call_resampling() -> None:
    rng = np.random.default_rng(1)
    signal = (rng.standard_normal(44100) * 0.1).astype(np.float32)
    whole = to_mono_16k(signal, 44100)
    for chunk in (1, 441, 1000, 44100):
        resampler = StreamResampler(44100)
        fed = signal if chunk > 1 else signal[:4410]  # sample by sample: 0.1 s is enough (and fast)
        out = np.concatenate([resampler.push(fed[i : i + chunk]) for i in range(0, len(fed), chunk)])
        expected = len(fed) * 16000 // 44100
        assert expected - 20 <= len(out) <= expected  # the filter's look-ahead is held back
        np.testing.assert_array_equal(out, whole[: len(out)])


def test_librivox_transcripts_within_word_error_bound(recognizer: Recognizer) -> None:
    errors = words_total = 0
    for path, reference in librivox_clips():
        audio, rate = soundfile.read(path, dtype="float32")
        events = run_listener(Listener(VoiceActivity()), recognizer, audio, 1234, rate)
        hypothesis = " ".join(e[3] for e in events if e[0] == "ended")
        wer = word_error_rate(reference, hypothesis)
        assert wer <= 0.35, (reference, hypothesis)
        errors += wer * len(reference.split())
        words_total += len(reference.split())
    assert errors / words_total <= 0.12


def test_word_error_rate_counts_edits() -> None:
    assert word_error_rate("he was not an ill disposed man", "He was not an ill-disposed man.") == 0.0
    assert word_error_rate("a b c d", "a x c") == pytest.approx(0.5)  # one substitution, one deletion
    assert word_error_rate("a b", "a b c d") == pytest.approx(1.0)


def test_silence_and_noise_give_no_transcript(recognizer: Recognizer) -> None:
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(16000 * 3) * 0.001).astype(np.float32)
    events = run_listener(Listener(VoiceActivity()), recognizer, noise, 1600)
    assert [e for e in events if e[3]] == []


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


def test_pause_event_carries_exactly_the_final_audio(sample_audio: np.ndarray) -> None:
    """The speculative transcription at a pause is of the very samples the end brings."""
    listener = Listener(VoiceActivity())
    events = []
    speech = sample_audio[: 8 * 16000]
    for start in range(0, len(speech), 1600):
        events += listener.push(speech[start : start + 1600], 16000, start / 16000)
    events += listener.flush()
    pauses = [e for e in events if e.kind == "pause"]
    [ended] = [e for e in events if e.kind == "ended" and e.audio is not None]
    assert pauses and pauses[-1].utterance == ended.utterance
    np.testing.assert_array_equal(pauses[-1].audio, ended.audio)
    assert [e.kind for e in events].index("pause") > [e.kind for e in events].index("started")


def test_first_phrase_is_spoken_after_a_few_words_not_on_a_dangling_one() -> None:
    splitter = PhraseSplitter(first_words=4)
    out = [
        splitter.push(d) for d in ["You", " saw", " a", " monarch", " butterfly", " at", " 00:05.", " Then"]
    ]
    assert out[4] == ["You saw a monarch"]  # "monarch" is complete once the next word begins
    assert sum(out, []) == ["You saw a monarch", "butterfly at 00:05."]
    splitter = PhraseSplitter(first_words=4)
    phrases = [
        p
        for d in ["The", "reader", "said", "that", "the", "butterfly", "was", "orange.", ""]
        for p in splitter.push(d + " ")
    ]
    assert phrases[0] == "The reader said that the butterfly"  # not "... said that" nor "... that the"
    splitter = PhraseSplitter(first_words=0)  # the clause-only splitter waits for punctuation
    assert splitter.push("You saw a monarch butterfly ") == []


def test_reads_finished_is_the_text_end_of_turn_signal() -> None:
    from omnistream.speech.turns import reads_finished

    for finished in ("What is on the table?", "He might even have been made amiable himself.", "Stop!"):
        assert reads_finished(finished), finished
    for going_on in (
        "Had he married a more",
        "Tell me about the.",
        "I went there and.",
        "Well, so...",
        "Hi,",
        "",
    ):
        assert not reads_finished(going_on), going_on


def test_short_whisper_window_matches_the_30_s_window(
    recognizer: Recognizer, sample_audio: np.ndarray
) -> None:
    """The encoder on the utterance's own length transcribes like faster-whisper's 30 s window,
    and a pass that loops ("he was not he was not ...") falls back to that window."""
    full = Recognizer("tiny.en", window="full")
    assert recognizer.window == "short"
    errors = words_total = 0
    for path, reference in librivox_clips()[1:3]:
        audio, _ = soundfile.read(path, dtype="float32")
        short_text, full_text = recognizer.transcribe(audio), full.transcribe(audio)
        assert word_error_rate(full_text, short_text) <= 0.3, (short_text, full_text)
        errors += word_error_rate(reference, short_text) * len(reference.split())
        words_total += len(reference.split())
    assert errors / words_total <= 0.15
    audio, _ = soundfile.read(librivox_clips()[1][0], dtype="float32")
    cut = recognizer.transcribe(audio[: int(1.1 * 16000)])  # "he was not" looped in the short window
    assert 1 <= len(words(cut)) <= 5 and word_error_rate("he was not", cut) <= 0.34, cut


def test_cut_ends_the_utterance_with_the_pause_audio(sample_audio: np.ndarray) -> None:
    """A turn judged over early ends the utterance at once, with the audio the pause carried."""
    listener = Listener(VoiceActivity())
    speech = sample_audio[: 8 * 16000]
    events = []
    for start in range(0, len(speech), 1600):
        events += listener.push(speech[start : start + 1600], 16000, start / 16000)
        if events and events[-1].kind == "pause":
            break
    assert listener.in_speech and listener.silence_s >= 0.19
    [ended] = listener.cut()
    assert ended.kind == "ended" and ended.utterance == events[-1].utterance
    np.testing.assert_array_equal(ended.audio, events[-1].audio)
    assert not listener.in_speech and listener.cut() == []


def test_whisper_loops_are_recognised() -> None:
    assert looped("He was not. He was not. He was not. He was not. He was not.")
    assert looped("he was not he was not he was not")
    assert looped("the the the the the the the the the")
    assert looped("Computer, what is on the table. Computer, what is on the table. Computer, what is on the")
    assert not looped("What is on the table? Is it on the table?")
    assert not looped("He was not an ill-disposed young man, as he was not.")
    assert not looped("What is on the table? Computer, what is on the table?")


def test_live_sessions_are_bounded_and_a_closed_ones_utterance_is_finished(
    recognizer: Recognizer, sample_audio: np.ndarray
) -> None:
    """Issue #18 item 2: a loop of ``AudioChunk(session=f"s{i}")`` holds at most
    ``speech.live_sessions`` sessions' VAD state; the least recently heard is closed, and what its
    user was saying then ends there: transcribed and asked, as at any end of speech."""
    from collections import defaultdict

    from omnistream.protocol.config import SpeechConfig
    from omnistream.protocol.messages import Ask, AudioChunk, Transcript
    from omnistream.speech.stage import SpeechStage

    out: list = []
    counters: dict[str, float] = defaultdict(float)
    stage = SpeechStage(
        SpeechConfig(live_sessions=3, tts_enabled=False), recognizer, None, out.append, counters
    )
    try:
        speech = sample_audio[: 5 * 16000]  # stops mid-sentence ("He might even have been ...")
        for start in range(0, len(speech), 1600):
            stage.handle(
                AudioChunk(session="talk", ts=start / 16000, pcm=speech[start : start + 1600], channel="user")
            )
            stage.tick()
        assert stage.sessions["talk"].listeners["user"].in_speech
        silence = np.zeros(1600, np.float32)
        for i in range(50):
            for channel in ("user", "scene"):
                for k in range(3):
                    stage.handle(AudioChunk(session=f"s{i}", ts=k * 0.1, pcm=silence, channel=channel))
                    stage.tick()
            # Three listened to, and "talk" (no longer listened to) until its question goes out.
            assert len(stage.live) <= 3 and len(stage.sessions) <= 4
        assert list(stage.live) == ["s47", "s48", "s49"] and counters["sessions_closed"] == 48
        wait_until(
            lambda: any(isinstance(m, Ask) for m in out), 60, "the Ask", every=stage.tick, interval=0.02
        )
        [said] = [m for m in out if isinstance(m, Transcript) and m.final and m.session == "talk"]
        [ask] = [m for m in out if isinstance(m, Ask)]
        assert "might" in said.text.lower() and said.t0 > 1.5 and said.ts == pytest.approx(5.0, abs=0.1)
        assert ask.session == "talk" and ask.question == said.text
        assert "talk" not in stage.live and not stage.sessions["talk"].listeners
    finally:
        stage.close()
