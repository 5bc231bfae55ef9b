"""One dispatch for every accelerated op: chosen once at import, overridable.

The Triton path is used when a CUDA device and triton are present; otherwise the torch
reference runs. ``OMNISTREAM_KERNELS=reference|triton`` or ``set_backend`` forces either.
"""

from __future__ import annotations

import importlib.util
import os

from omnistream.kernels import reference


def _detect() -> str:
    forced = os.environ.get("OMNISTREAM_KERNELS", "")
    if forced in ("reference", "triton"):
        return forced
    if importlib.util.find_spec("triton") is None:
        return "reference"
    import torch

    return "triton" if torch.cuda.is_available() else "reference"


_backend = _detect()


def backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    global _backend
    if name not in ("reference", "triton"):
        raise ValueError(f"unknown kernel backend {name!r}")
    _backend = name


# Only reference implementations exist so far; the Triton kernels plug in here.
frame_preprocess = reference.frame_preprocess
