"""All real processes and default models on the bundled 30 s recording.

The recording shows a monarch butterfly while a reader says "He might even have been made amiable
himself.", then the handwritten word "Linux". The answer to a question about what was seen and
heard must name both; it must also be spoken. Then memory is SIGKILLed: the launcher restarts it,
what it stored survives, and the system still answers.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from omnistream.app.client import Client, ClientError
from omnistream.app.launcher import Launcher
from omnistream.app.models import prepare_llm_cache
from omnistream.app.replay import DEFAULT_SAMPLE, Replayer, ScheduledAsk

from ..conftest import make_config, pid_alive
from ..util import wait_until

pytestmark = pytest.mark.slow

QUESTION = "Which animal was on screen, and what did the reader say he might even have been made?"


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    root = Path(tmp_path_factory.mktemp("e2e"))
    run_dir = Path("/tmp") / f"os-e2e-{os.getpid()}"
    config = make_config(root, ("gateway", "perception", "memory", "reasoning", "speech"))
    prepare_llm_cache(config, progress=False)
    launcher = Launcher(config, run_dir)
    launcher.start()
    yield launcher
    pids = [c.pid for c in launcher.children.values()]
    launcher.shutdown()
    assert not any(pid_alive(pid) for pid in pids), "a stage outlived the shutdown"


def supervise(launcher: Launcher, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        launcher.step(timeout_ms=100)


def test_replay_answers_about_what_was_seen_and_heard_in_text_and_speech(
    system: Launcher, tmp_path: Path
) -> None:
    with Client.connect(system.run_dir) as client:
        replayer = Replayer(client)
        [answer] = replayer.run(
            DEFAULT_SAMPLE, [ScheduledAsk(30.0, QUESTION)], speed=3.0, answer_timeout_s=240
        )
    assert answer.done is not None and not answer.done.error, answer.done
    text = answer.done.text.lower()
    assert answer.text.strip().lower() == text  # the deltas add up to the final answer
    assert "butterfly" in text, text
    assert "amiable" in text, text
    assert answer.first_delta_wall > answer.sent_wall
    wav = answer.save_wav(tmp_path / "answer.wav")
    audio, rate = soundfile.read(wav)
    assert rate == 24000 and len(audio) / rate > 1.0
    assert float(np.sqrt(np.mean(audio**2))) > 0.01
    assert answer.first_audio_wall > 0


def test_a_question_that_cannot_be_answered_still_ends_with_its_answer_done(system: Launcher) -> None:
    """An empty choice ("A.") once raised inside reasoning: no AnswerDone, the client waited for
    minutes. Every Ask ends with exactly one AnswerDone, with the reason when it failed, and the
    next question is answered."""
    with Client.connect(system.run_dir) as client:
        start = time.monotonic()
        with pytest.raises(ClientError, match=r"Ask.choices\[0\] has no text after its letter"):
            list(client.ask("Which is it?", choices=["A.", "B a cat"], timeout_s=60))
        assert time.monotonic() - start < 30
        assert client.last_done is not None
        assert client.last_done.error == "Ask.choices[0] has no text after its letter: 'A.'"
        "".join(
            client.ask("Which animal was on screen?", choices=["A a cat", "B a butterfly"], timeout_s=120)
        )
        assert client.last_done is not None and not client.last_done.error and client.last_done.choice == "B"


def test_memory_killed_with_sigkill_comes_back_with_its_memories(system: Launcher) -> None:
    memory = system.children["memory"]
    old_pid = memory.pid
    os.kill(old_pid, signal.SIGKILL)
    wait_until(
        lambda: memory.ready and memory.pid != old_pid,
        120,
        lambda: f"memory back: {system.status_rows()}",
        every=lambda: system.step(timeout_ms=100),
        interval=0,
    )
    assert memory.restarts == 1
    with Client.connect(system.run_dir) as client:
        text = "".join(client.ask("What did the reader say? Quote the words.", ts=31.0)).lower()
        status = client.status()
    assert "amiable" in text, text
    assert status.stages["memory"].pid == memory.pid
    supervise(system, 0.5)
