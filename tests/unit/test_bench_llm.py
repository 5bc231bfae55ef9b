"""bench llm's llama.cpp reference: found through $OMNISTREAM_LLAMA_CPP_PYTHON (its own venv),
and a note naming what is missing when it cannot run (the suite still runs without it)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from omnistream.bench import llm


def test_interpreter_without_llama_cpp_is_refused_with_the_reason(monkeypatch):
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("this interpreter has llama-cpp-python")
    monkeypatch.setenv(llm.LLAMA_CPP_PYTHON, sys.executable)
    python, why = llm.llama_cpp_python()
    assert python is None
    assert llm.LLAMA_CPP_PYTHON in why and "cannot import llama_cpp" in why


def test_missing_interpreter_and_package_say_how_to_get_the_reference(monkeypatch, tmp_path):
    monkeypatch.setenv(llm.LLAMA_CPP_PYTHON, str(tmp_path / "no-such-python"))
    assert llm.llama_cpp_python()[0] is None
    monkeypatch.delenv(llm.LLAMA_CPP_PYTHON)
    python, why = llm.llama_cpp_python()
    if importlib.util.find_spec("llama_cpp") is None:
        assert python is None and llm.LLAMA_CPP_PYTHON in why
    else:
        assert python == sys.executable


def test_reference_worker_runs_as_a_script_without_the_package(tmp_path):
    """The llama.cpp worker is this file run as a script under another venv: its module-level
    imports must be the standard library's only (the argument parser answers without omnistream)."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-P", "-S", llm.__file__, "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "llama_cpp" in done.stdout
