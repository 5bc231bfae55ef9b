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
