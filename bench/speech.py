"""`omnistream bench speech`: ASR speed and accuracy, turn-taking and barge-in latencies.

Rows (see ``bench/__init__.py`` for the format):
- ASR real-time factor and WER of faster-whisper on the LibriVox clips of Debian's
  pocketsphinx-testdata (baseline: the same clips fed through the streaming path, partials included);
- end of the user's speech -> ``Ask`` (VAD silence + final ASR + grace), ``AnswerDelta`` of a first
  phrase -> first ``AudioOut`` (TTS), and end of speech -> first audio with an instant answer:
  the speech stage's own share of the response time (the LLM's first phrase comes on top);
- barge-in over >= 20 trials while an answer plays: VAD firing -> audio stopped (flush sent, last
  chunk), user speech onset -> audio stopped, onset -> ``Interrupt`` (words confirmed);
- false interruptions (150 ms of voice, no word) that resumed the answer.
The stage runs in this process with the real models and microphone audio fed in real time.
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile

from omnistream.bench import speech_turns
from omnistream.protocol.config import SpeechConfig
from omnistream.protocol.messages import (
    AnswerDelta,
    AnswerDone,
    Ask,
    AudioChunk,
    AudioOut,
    Interrupt,
    Message,
    UserSpeech,
)
from omnistream.speech.asr import Recognizer
from omnistream.speech.hypothesis import StreamingTranscriber
from omnistream.speech.speak import Voice
from omnistream.speech.stage import SpeechStage
from omnistream.speech.wer import word_error_rate

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
# Scripted answer; shares no content words with the LibriVox clips that talk over it (a clip that
# repeats the answer's words is, rightly, taken for the assistant's own echo).
ANSWER = "A monarch butterfly sat on a purple flower near the window, then flew toward the garden."
RATE = 16000
STEP_S = 0.02


def librivox() -> list[tuple[np.ndarray, str]]:
    clips = []
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        match = re.fullmatch(r"<s> (.*) </s> \((.*)\)", line.strip())
        if match:
            audio, rate = soundfile.read(LIBRIVOX / f"{match.group(2)}.wav", dtype="float32")
            assert rate == RATE
            clips.append((audio, match.group(1)))
    return clips


def voiced_span(audio: np.ndarray, threshold: float = 0.02) -> tuple[int, int]:
    """First and last sample of the 10 ms frames whose RMS exceeds ``threshold``: the true onset
    and end of speech in a clip."""
    frames = audio[: len(audio) // 160 * 160].reshape(-1, 160)
    loud = np.flatnonzero(np.sqrt((frames**2).mean(axis=1)) > threshold)
    return int(loud[0]) * 160, int(loud[-1] + 1) * 160


def percentile_rows(name: str, values: list[float], unit: str = "ms") -> list[dict]:
    array = np.asarray(values) * 1000.0
    return [
        {"name": f"{name} p50", "value": float(np.percentile(array, 50)), "unit": unit, "n": len(values)},
        {"name": f"{name} p95", "value": float(np.percentile(array, 95)), "unit": unit, "n": len(values)},
    ]


class Driver:
    """Runs a ``SpeechStage`` like the runtime loop; records (wall time, message) published."""

    def __init__(self, recognizer: Recognizer, voice: Voice, config: SpeechConfig):
        self.out: list[tuple[float, Message]] = []
        self.counters: dict[str, float] = defaultdict(float)
        self.stage = SpeechStage(config, recognizer, voice, self._publish, self.counters)
        self.mic_ts = 0.0
        self.pump: Callable[[], None] = lambda: None  # feeds answer pieces (speech_turns)
        self.sent_words: dict[str, int] = {}
        self.llm_done: set[str] = set()

    def _publish(self, message: Message) -> None:
        self.out.append((time.monotonic(), message))
        if isinstance(message, Ask):  # the bus would bring our own Ask back
            self.stage.handle(message)

    def mic(self, audio: np.ndarray) -> list[float]:
        """Feed 20 ms chunks in real time; returns the wall time each chunk was fed."""
        step = int(STEP_S * RATE)
        start = time.monotonic()
        walls = []
        for index, offset in enumerate(range(0, len(audio), step)):
            walls.append(time.monotonic())
            chunk = AudioChunk(
                ts=self.mic_ts, pcm=audio[offset : offset + step], sample_rate=RATE, channel="user"
            )
            self.stage.handle(chunk)
            self.pump()
            self.stage.tick()
            self.mic_ts += step / RATE
            time.sleep(max(start + (index + 1) * STEP_S - time.monotonic(), 0.0))
        return walls

    def silence_until(self, condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("speech bench: the stage did not respond in time")
            self.mic(np.zeros(int(STEP_S * RATE), np.float32))

    def first(
        self, kind: type, after: float, where: Callable[[Message], bool] = lambda m: True
    ) -> float | None:
        return next(
            (wall for wall, m in self.out if wall >= after and isinstance(m, kind) and where(m)), None
        )

    def answer(self, turn: str, text: str = ANSWER) -> None:
        self.stage.handle(AnswerDelta(turn=turn, text=text))
        self.stage.handle(AnswerDone(turn=turn, text=text))

    def finished(self, turn: str) -> bool:
        return any(isinstance(m, AudioOut) and m.turn == turn and m.final for _, m in self.out)


def asr_rows(recognizer: Recognizer, full: Recognizer, clips: list[tuple[np.ndarray, str]]) -> list[dict]:
    """Real-time factor, time per utterance and WER of the final pass, whisper's encoder on the
    utterance's length (baseline: faster-whisper's 30 s window); and the streaming cost."""
    audio_s = sum(len(a) for a, _ in clips) / RATE
    words = sum(len(reference.split()) for _, reference in clips)
    passes = {}
    for name, model in (("short", recognizer), ("full", full)):
        times, hypotheses = [], []
        for audio, _ in clips:
            start = time.monotonic()
            hypotheses.append(model.transcribe(audio))
            times.append(time.monotonic() - start)
        errors = sum(
            word_error_rate(ref, hyp) * len(ref.split())
            for (_, ref), hyp in zip(clips, hypotheses, strict=True)
        )
        passes[name] = (sum(times) / audio_s, float(np.median(times)) * 1000, errors / words)
    # Streaming: a partial every second of audio (LocalAgreement), then the final pass.
    start = time.monotonic()
    for audio, _ in clips:
        transcriber = StreamingTranscriber(recognizer)
        for end in range(RATE, len(audio), RATE):
            transcriber.insert_audio(audio[len(transcriber.audio) : end])
            transcriber.process_iter()
        transcriber.insert_audio(audio[len(transcriber.audio) :])
        transcriber.finish()
    streaming_s = time.monotonic() - start
    short, full_window = passes["short"], passes["full"]
    baseline = "whisper's 30 s window (faster-whisper)"
    return [
        {
            "name": "ASR tiny.en real-time factor, final pass, encoder on the utterance's length",
            "value": short[0],
            "unit": "x",
            "baseline_name": baseline,
            "baseline": full_window[0],
        },
        {
            "name": f"ASR tiny.en final pass per utterance ({len(clips)} LibriVox clips, 2.6-7.1 s) p50",
            "value": short[1],
            "unit": "ms",
            "baseline_name": baseline,
            "baseline": full_window[1],
        },
        {
            "name": "ASR tiny.en real-time factor, streaming (a partial every 1 s + final)",
            "value": streaming_s / audio_s,
            "unit": "x",
            "baseline_name": "final pass only",
            "baseline": short[0],
        },
        {
            "name": f"ASR tiny.en WER, LibriVox ({len(clips)} clips, {words} words)",
            "value": short[2],
            "unit": "ratio",
            "baseline_name": baseline,
            "baseline": full_window[2],
        },
    ]


def captured_at(walls: list[float], sample: int) -> float:
    """Wall time a microphone captured ``sample``: chunks are fed when they are complete, so the
    chunk holding it started 20 ms before it was fed."""
    step = int(STEP_S * RATE)
    return walls[sample // step] - STEP_S + (sample % step) / RATE


def barge_in_rows(
    driver: Driver, clips: list[tuple[np.ndarray, str]], trials: int, progress: Callable[[str], None]
) -> list[dict]:
    vad_to_stop, vad_to_last, onset_to_stop, onset_to_interrupt = [], [], [], []
    rng = np.random.default_rng(0)
    for trial in range(trials):
        turn = f"barge-{trial}"
        driver.stage.handle(Ask(turn=turn, question="What did you see?", audio_rate=RATE))
        driver.answer(turn)
        barge_at = time.monotonic() + rng.uniform(0.4, 1.2)  # somewhere in the first phrase
        driver.silence_until(lambda at=barge_at: time.monotonic() > at)
        audio, _ = clips[trial % len(clips)]
        onset, _ = voiced_span(audio)
        speech = audio[max(onset - RATE // 10, 0) :]  # 100 ms before the onset, then the words
        walls = driver.mic(speech[: int(1.5 * RATE)])
        onset_wall = captured_at(walls, min(onset, RATE // 10))
        driver.silence_until(lambda t=turn: driver.finished(t) and not driver.stage.hearing())
        vad = driver.first(UserSpeech, onset_wall - 0.2, lambda m: m.started)
        stop = driver.first(AudioOut, onset_wall - 0.2, lambda m, t=turn: m.turn == t and m.flush)
        interrupt = driver.first(Interrupt, onset_wall - 0.2, lambda m, t=turn: m.turn == t)
        last_audio = max(
            w for w, m in driver.out if isinstance(m, AudioOut) and m.turn == turn and m.pcm is not None
        )
        if vad is None or stop is None or interrupt is None:
            progress(f"speech: barge-in trial {trial} did not interrupt")
            continue
        vad_to_stop.append(stop - vad)
        vad_to_last.append(max(last_audio - vad, 0.0))
        onset_to_stop.append(max(last_audio, stop) - onset_wall)
        onset_to_interrupt.append(interrupt - onset_wall)
    return (
        [
            {
                "name": "barge-in trials that interrupted the answer",
                "value": len(vad_to_stop),
                "unit": f"of {trials}",
            }
        ]
        + percentile_rows("barge-in: VAD fires -> flush sent", vad_to_stop)
        + percentile_rows("barge-in: VAD fires -> last assistant audio chunk sent", vad_to_last)
        + percentile_rows("barge-in: user speech onset -> assistant audio stopped", onset_to_stop)
        + percentile_rows("barge-in: user speech onset -> Interrupt (words heard)", onset_to_interrupt)
    )


def false_interruption_rows(driver: Driver, clips: list[tuple[np.ndarray, str]], trials: int) -> list[dict]:
    heard = resumed = 0
    for trial in range(trials):
        turn = f"noise-{trial}"
        driver.stage.handle(Ask(turn=turn, question="What did you see?", audio_rate=RATE))
        driver.answer(turn)
        before = dict(driver.counters)
        noise_at = time.monotonic() + 0.6
        driver.silence_until(lambda at=noise_at: time.monotonic() > at)
        audio, _ = clips[trial % len(clips)]
        onset, _ = voiced_span(audio)
        driver.mic(audio[onset : onset + int(0.15 * RATE)])
        driver.silence_until(lambda t=turn: driver.finished(t) and not driver.stage.hearing())
        paused = driver.counters["barge_in_pauses"] - before.get("barge_in_pauses", 0)
        resumes = driver.counters["false_interruptions"] - before.get("false_interruptions", 0)
        spoken = any(
            isinstance(m, AudioOut) and m.turn == turn and m.final and not m.flush for _, m in driver.out
        )
        heard += int(paused > 0)
        resumed += int(paused > 0 and resumes > 0 and spoken)
    return [
        {
            "name": "false interruptions (150 ms of voice) the VAD heard",
            "value": heard,
            "unit": f"of {trials}",
        },
        {"name": "... of which the answer resumed", "value": resumed, "unit": f"of {heard}"},
    ]


def response_rows(
    recognizer: Recognizer,
    full: Recognizer,
    voice: Voice,
    clips: list[tuple[np.ndarray, str]],
    trials: int,
    llm: speech_turns.LLM | None,
    progress: Callable[[str], None],
) -> list[dict]:
    """End of the user's question -> first assistant audio, broken down, for the current
    settings and (baseline) the settings before, with a scripted answer and with the LLM."""
    results: dict[tuple[str, str], list[dict]] = {}
    counters: dict[tuple[str, str], dict[str, float]] = {}
    answerers = [("scripted", None)] + ([("llm", llm)] if llm is not None else [])
    for label, responder in answerers:
        for settings, config, model in (
            ("now", SpeechConfig(), recognizer),
            ("preemptive", speech_turns.preemption_config(), recognizer),
            ("before", speech_turns.before_config(), full),
        ):
            progress(f"speech: end of question -> first audio, {label} answer, settings {settings}")
            driver = Driver(model, voice, config)
            try:
                results[(label, settings)] = speech_turns.turn_trials(
                    driver, clips, trials, voiced_span, captured_at, progress, responder
                )
            finally:
                driver.stage.close()
            counters[(label, settings)] = dict(driver.counters)
    rows = speech_turns.breakdown_rows(
        "scripted answer at 50 tokens/s",
        results[("scripted", "now")],
        results[("scripted", "before")],
        speech_turns.SPEECH_SPANS,
    )
    if llm is not None:
        rows += speech_turns.breakdown_rows(
            f"LLM {llm.model}", results[("llm", "now")], results[("llm", "before")], speech_turns.LLM_SPANS
        )
    # Issue #21: preemptive generation against the same settings without it, in the same run.
    for label, responder in answerers:
        name = "scripted answer at 50 tokens/s" if responder is None else f"LLM {responder.model}"
        rows += speech_turns.breakdown_rows(
            f"{name}, preemptive",
            results[(label, "preemptive")],
            results[(label, "now")],
            speech_turns.LLM_SPANS,
            speech_turns.NO_PREEMPTION_NAME,
        )
        rows += speech_turns.preemption_rows(name, counters[(label, "preemptive")])
    return rows


def run(quick: bool, progress: Callable[[str], None]) -> list[dict]:
    """``OMNISTREAM__REASONING__MODEL`` (or the config's ``reasoning.model``) picks the LLM;
    ``OMNISTREAM_BENCH_SPEECH_LLM=0`` leaves the LLM out; ``OMNISTREAM_BENCH_SPEECH_TRIALS``
    sets the number of spoken questions per answerer and settings (5 with --quick, else 20)."""
    clips = librivox()
    load_before = os.getloadavg()[0]
    llm = None
    if os.environ.get("OMNISTREAM_BENCH_SPEECH_LLM", "1") != "0":
        progress("speech: loading the LLM in its own process")
        llm = speech_turns.LLM(progress)
    progress("speech: loading whisper tiny.en, Silero VAD, hibari")
    recognizer = Recognizer("tiny.en")
    full = Recognizer("tiny.en", window="full")
    voice = Voice("heart")
    try:
        rows = asr_rows(recognizer, full, clips)
        trials = int(os.environ.get("OMNISTREAM_BENCH_SPEECH_TRIALS", 5 if quick else 20))
        rows += response_rows(recognizer, full, voice, clips, trials, llm, progress)
    finally:
        if llm is not None:
            llm.close()
    rows += speech_turns.transport_rows()
    # Barge-in trials answer scripted turns only: the interrupting words do not become questions.
    driver = Driver(recognizer, voice, SpeechConfig(ask_on_user_speech=False))
    try:
        progress("speech: barge-in")
        rows += barge_in_rows(driver, clips, 20, progress)
        progress("speech: false interruptions")
        rows += false_interruption_rows(driver, clips, 3 if quick else 10)
    finally:
        driver.stage.close()
    # Latencies above scale with CPU contention: say how busy the machine was.
    load = max(load_before, os.getloadavg()[0])
    rows.append(
        {"name": "machine load average (1 min, highest of start and end)", "value": load, "unit": "runnable"}
    )
    return rows
