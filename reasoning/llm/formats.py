"""Which weight format a model runs in, decided once, and the caches formats are loaded from.

Formats (``reasoning.dtype``):

- "gguf": the packaged GGUF's own quantized blocks, as they are, on the native kernel
  (kernels/cpu/kquant.c). "auto" on a CPU for a GGUF that is mostly K-quants (the default 1.5B
  Q4_K_M: fastest decode, least RAM).
- "int8": int8 rows made from the float weights (``llm.int8``), on the native int8 kernel. "auto"
  on a CPU otherwise (the 0.5B's Q5_0/Q8_0 blocks decode faster as int8).
- "float32", "bfloat16", "float16": the float weights. "auto" on a CUDA GPU is bfloat16, and
  float32 on a CPU where the native kernels do not build (no gcc, no AVX2, OMNISTREAM_NATIVE=0).

Caches are named by what they were made from, not by directory names: the int8 cache of a model
is ``int8-<fingerprint of its weights>`` beside it (``int8_cache``), so two local models never
share one, and a model replaced in place gets a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("omnistream.reasoning.llm")

FORMATS = ("auto", "gguf", "int8", "float32", "bfloat16", "float16")
CONVERTED = "CONVERTED"  # marker of a directory prepared from a GGUF (llm.prepare.convert): holds its name


@dataclass(frozen=True)
class Choice:
    """How a model runs: ``format`` (never "auto"), the ``device`` and the ``dtype`` of the
    activations and the KV cache, and the GGUF file for "gguf"."""

    format: str
    device: str
    dtype: torch.dtype
    gguf: Path | None = None


def choose(fmt: str, model_dir: Path | None = None) -> Choice:
    """Resolve ``fmt`` for ``model_dir`` on this machine (see the module docstring)."""
    fmt = resolve_format(fmt, model_dir)
    if fmt in ("gguf", "int8"):
        return Choice(
            fmt, "cpu", torch.float32, gguf_file(model_dir) if fmt == "gguf" and model_dir else None
        )
    return Choice(fmt, "cuda" if torch.cuda.is_available() else "cpu", getattr(torch, fmt))


def resolve_format(fmt: str, model_dir: Path | None = None) -> str:
    """The format name ``choose`` picks."""
    if fmt not in FORMATS:
        raise ValueError(f"reasoning.dtype must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "auto":
        if torch.cuda.is_available():
            return "bfloat16"
        from omnistream.kernels import cpu

        if not cpu.available():
            return "float32"
        return "gguf" if model_dir is not None and gguf_runnable(model_dir) else "int8"
    return fmt


def gguf_file(model_dir: Path) -> Path | None:
    """The GGUF a model directory runs from: the one named in its ``CONVERTED`` marker (a
    packaged model prepared by ``llm.prepare``: ``<cache>/gguf/<name>.gguf``, checked by its
    sha256 marker), else the one ``*.gguf`` inside it; None if there is none."""
    model_dir = Path(model_dir)
    marker = model_dir / CONVERTED
    if marker.is_file():
        name = marker.read_text().strip()
        packaged = Path(name) if Path(name).is_absolute() else model_dir.parent.parent / "gguf" / name
        if packaged.is_file() and packaged.with_suffix(".gguf.sha256").is_file():
            return packaged
    inside = sorted(model_dir.glob("*.gguf")) if model_dir.is_dir() else []
    return inside[0] if len(inside) == 1 else None


def gguf_runnable(model_dir: Path) -> bool:
    """Whether "auto" runs ``model_dir`` as "gguf": a Qwen2 with its GGUF, every weight in a block
    type the native kernel has, mostly K-quants (``gguf.k_quant_share``), and the kernel built."""
    from omnistream.kernels.cpu import kquant
    from omnistream.reasoning.llm import gguf
    from omnistream.reasoning.llm.model import is_qwen2

    path = gguf_file(model_dir)
    if path is None or not is_qwen2(model_dir):
        return False
    return kquant.available() and gguf.supports(path) and gguf.k_quant_share(path) >= 0.5


def fingerprint(model_dir: Path) -> str:
    """What identifies the weights in ``model_dir`` without reading gigabytes: the config, and for
    each weight file its name, size and first and last MiB (a safetensors file starts with its
    tensor table; different weights of the same shapes differ in their data)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config = model_dir / "config.json"
    digest.update(config.read_bytes() if config.exists() else b"")
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with path.open("rb") as f:
                digest.update(f.read(1 << 20))
                f.seek(max(size - (1 << 20), 0))
                digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def int8_cache(model_dir: Path) -> Path:
    """The int8 cache directory of ``model_dir``: ``int8-<fingerprint>`` beside it (for a packaged
    model, in the configured cache directory's ``llm/``)."""
    model_dir = Path(model_dir)
    return model_dir.parent / f"int8-{fingerprint(model_dir)}"


def prepare_int8(model_dir: Path, out_dir: Path | None = None) -> Path:
    """The int8 cache of the model in ``model_dir`` (``int8_cache`` unless ``out_dir`` is given),
    built once (seconds to a minute); a cache of another format version or made from other
    weights is built again."""
    from omnistream.reasoning.llm.int8 import FORMAT_VERSION, write_cache

    model_dir = Path(model_dir)
    source = fingerprint(model_dir)
    out_dir = out_dir or int8_cache(model_dir)
    marker = out_dir / "int8.json"
    if marker.exists():
        meta = json.loads(marker.read_text())
        if meta.get("version") == FORMAT_VERSION and meta.get("source") == source:
            return out_dir
        log.info("int8 cache is stale, rebuilding", extra={"cache": str(out_dir), "source": source})
    start = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    write_cache(model_dir, out_dir, source)
    log.info("quantized", extra={"model": model_dir.name, "seconds": round(time.monotonic() - start, 1)})
    return out_dir
