"""Kernel tests: Triton kernels run on CPU tensors through the Triton interpreter.

``TRITON_INTERPRET`` must be set before a kernel is decorated, so it is set while this conftest
imports the kernel modules and then put back, so nothing spawned by other test folders inherits
it; each kernel test sets it again for its own duration.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator

import pytest
import torch

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    for _name in ("omnistream.kernels.triton_frames", "omnistream.kernels.triton_retrieval"):
        if _name in sys.modules:  # decorated earlier without the interpreter: decorate again
            importlib.reload(sys.modules[_name])
        else:
            importlib.import_module(_name)
finally:
    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``torch.empty``/``empty_like`` return NaN-filled float tensors (and -1 ints) during a test.

    An output element a kernel forgets to write then fails the parity check instead of passing by
    luck with whatever memory held.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.fill_(float("nan") if tensor.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
    yield


@pytest.fixture
def backend() -> Iterator[None]:
    """Restore the dispatch backend a test changes."""
    from omnistream.kernels import ops

    saved = ops.backend()
    yield
    ops.set_backend(saved)
