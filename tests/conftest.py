from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from omnistream.protocol.config import Config, load_config


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: ipc:// socket paths must stay under ~100 characters."""
    path = Path(tempfile.mkdtemp(prefix="os-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_config(root: Path, stages: tuple[str, ...], **overrides) -> Config:
    values = {"paths.data_dir": str(root / "data"), "stages": list(stages), **overrides}
    return load_config(None, values)


def launched(root: Path, stages: tuple[str, ...], **overrides) -> Iterator:
    """Real stage processes (``make_config``'s data directory, ``root / "run"``), shut down when
    the fixture that yields from this ends."""
    from omnistream.app.launcher import Launcher

    launcher = Launcher(make_config(root, stages, **overrides), root / "run")
    launcher.start()
    try:
        yield launcher
    finally:
        launcher.shutdown()


@pytest.fixture
def gateway_and_memory(short_tmp: Path):
    """A real gateway and memory (processes), no models: request routing and storage tests."""
    yield from launched(short_tmp, ("gateway", "memory"))


@pytest.fixture
def gateway_only(short_tmp: Path):
    """A real gateway (a process) alone, no models."""
    yield from launched(short_tmp, ("gateway",))


@pytest.fixture
def curve_gateway(short_tmp: Path):
    """Starts a real gateway (a process, no models) served beyond loopback with CURVE keys for
    the named clients: ``curve_gateway("alice", "bob")`` -> (launcher, keys_dir, port)."""
    from omnistream.app.launcher import Launcher

    from .util import curve_settings

    started = []

    def start(*clients: str):
        keys_dir = short_tmp / "keys"
        curve = curve_settings(keys_dir, *clients)
        launcher = Launcher(make_config(short_tmp, ("gateway",), **curve), short_tmp / "run")
        launcher.start()
        started.append(launcher)
        return launcher, keys_dir, curve["gateway.port"]

    yield start
    for launcher in started:
        launcher.shutdown()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Qwen2 saved from a config, with the packaged MiniLM
    tokenizer and a minimal chat template: the LLM unit tests' model (no download, seconds)."""
    from transformers import AutoTokenizer

    from omnistream.memory.embedder import packaged_minilm_dir

    from .tiny import save_qwen2

    path = tmp_path_factory.mktemp("tiny-llm") / "tiny-bfloat16"  # named as prepared models are
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_dir()))
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tokenizer.save_pretrained(path)
    return save_qwen2(path, "tiny", seed=0, vocab_size=len(tokenizer))
