"""Barge-in with real processes: gateway, memory, reasoning (the real 0.5B LLM) and speech.

The client speaks a question into the user channel (synthesised speech at 16 kHz, sent in 20 ms
chunks in real time, as a browser would); the question becomes an ``Ask``, the answer is spoken
back at 16 kHz; while it plays, the user talks over it (a LibriVox clip). The speech stage must
send ``Interrupt``, flush the audio and stop sending it, reasoning must stop generating, and the
assistant transcript must hold only what was spoken before the cut.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from omnistream.app.client import Client
from omnistream.app.launcher import Launcher
from omnistream.app.models import prepare_llm_cache
from omnistream.protocol.messages import (
    AnswerDelta,
    AnswerDone,
    AudioOut,
    Interrupt,
    Message,
    Stats,
    Transcript,
)
from omnistream.protocol.text import words
from omnistream.speech.speak import Voice

from ..conftest import make_config, pid_alive
from ..util import wait_until

pytestmark = pytest.mark.slow

RATE = 16000
STEP = RATE // 50  # 20 ms
QUESTION = "Please tell me a long story about a butterfly in a garden."
STORYTELLER = (
    "You are a storyteller. Whatever the user asks, answer with a long story of at least ten "
    "sentences, full of details. Never answer in one sentence."
)
BARGE_IN = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav")


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    root = Path(tmp_path_factory.mktemp("barge"))
    config = make_config(
        root,
        ("gateway", "memory", "reasoning", "speech"),
        **{
            "reasoning.model": "qwen2.5-coder-0.5b",
            "reasoning.max_new_tokens": 400,
            # The built-in instructions ask for one or two sentences, which a fast machine generates
            # before the user can talk over them; this test needs the answer still being generated.
            "reasoning.system_prompt": STORYTELLER,
        },
    )
    prepare_llm_cache(config, progress=False)
    launcher = Launcher(config, Path("/tmp") / f"os-barge-{os.getpid()}")
    launcher.start()
    yield launcher
    pids = [c.pid for c in launcher.children.values()]
    launcher.shutdown()
    assert not any(pid_alive(pid) for pid in pids)


class Microphone:
    """Sends 20 ms user-channel chunks in real time, silence when nothing is being said."""

    def __init__(self, client: Client, launcher: Launcher):
        self.client, self.launcher = client, launcher
        self.ts = 0.0
        self.events: list[tuple[float, Message]] = []

    def say(self, audio: np.ndarray) -> None:
        for start in range(0, len(audio), STEP):
            self._chunk(audio[start : start + STEP])

    def until(self, condition, timeout_s: float) -> None:
        wait_until(
            condition,
            timeout_s,
            lambda: f"the condition; events: {[type(m).__name__ for _, m in self.events][-30:]}",
            every=lambda: self._chunk(np.zeros(STEP, np.float32)),
            interval=0,
        )

    def _chunk(self, pcm: np.ndarray) -> None:
        due = time.monotonic() + len(pcm) / RATE
        self.client.push_audio(pcm.astype(np.float32), RATE, self.ts, channel="user")
        self.ts += len(pcm) / RATE
        self.launcher.step(timeout_ms=0)
        while (remaining := due - time.monotonic()) > 0:
            now = time.monotonic()
            self.events += [(now, e) for e in self.client.poll_events(remaining)]

    def of(self, kind: type, turn: str | None = None) -> list:
        return [m for _, m in self.events if isinstance(m, kind) and (turn is None or m.turn == turn)]


def test_user_talks_over_the_spoken_answer_and_it_stops(system: Launcher) -> None:
    question = Voice("heart").synthesize(QUESTION, RATE)
    barge_in, rate = soundfile.read(BARGE_IN, dtype="float32")
    assert rate == RATE
    with Client.connect(system.run_dir, timeout_s=60) as client:
        mic = Microphone(client, system)
        mic.say(np.concatenate([np.zeros(RATE // 2, np.float32), question]))
        mic.until(lambda: mic.of(AnswerDelta), timeout_s=180)  # the spoken question was asked
        turn = mic.of(AnswerDelta)[0].turn
        [question_text] = [m.text for m in mic.of(Transcript) if m.speaker == "user" and m.final]
        assert "butterfly" in question_text.lower()
        audio = lambda: [m for m in mic.of(AudioOut, turn) if m.pcm is not None]  # noqa: E731
        mic.until(lambda: sum(len(m.pcm) for m in audio()) > RATE, timeout_s=180)  # a second of it
        cut_wall = time.monotonic()
        mic.say(barge_in[: 3 * RATE])
        mic.until(lambda: mic.of(AnswerDone, turn) and any(m.final for m in mic.of(AudioOut, turn)), 60)
        mic.until(lambda: [m for m in mic.of(Transcript, turn) if m.speaker == "assistant"], 10)
        mic.until(lambda: len([m for m in mic.of(Transcript) if m.speaker == "user" and m.final]) > 1, 60)
        # The spoken question was read ahead by reasoning while it was being said (Draft).
        read = lambda: [m.counters.get("drafts_read", 0) for m in mic.of(Stats) if m.stage == "reasoning"]  # noqa: E731
        mic.until(lambda: read() and read()[-1] >= 1, 30)

    [interrupt] = mic.of(Interrupt, turn)
    assert interrupt.reason == "barge-in"
    events = [m for _, m in mic.events if getattr(m, "turn", None) == turn]
    flush_at = next(i for i, m in enumerate(events) if isinstance(m, AudioOut) and m.flush)
    late = [m for m in events[flush_at:] if isinstance(m, AudioOut) and m.pcm is not None]
    assert late == []  # no assistant audio after the client was told to drop it
    flush_wall = next(w for w, m in mic.events if m is events[flush_at])
    assert flush_wall > cut_wall
    assert all(m.sample_rate == RATE for m in audio())  # the microphone's rate
    [done] = mic.of(AnswerDone, turn)
    assert done.error == "interrupted", done  # reasoning stopped generating
    answer = "".join(m.text for m in mic.of(AnswerDelta, turn))
    [spoken] = [m for m in mic.of(Transcript, turn) if m.speaker == "assistant"]
    said = words(spoken.text)
    assert said and said == words(answer)[: len(said)]  # what was heard, from the start
    assert len(said) < len(words(answer))
    heard_s = sum(len(m.pcm) for m in audio()) / RATE
    assert spoken.ts - spoken.t0 <= heard_s + 0.05
    user = [m for m in mic.of(Transcript) if m.speaker == "user" and m.final]
    assert any("dashwood" in m.text.lower() for m in user), [m.text for m in user]
