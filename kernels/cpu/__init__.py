"""Native kernels for AVX2 CPUs (the ``*.c`` files here: int8 linear layers, the thread pool they
share, and whatever other kernels sit beside them), built into one library on first use.

The C sources are compiled once per machine into
``$XDG_CACHE_HOME/omnistream/native/omnistream-<sha of sources + compiler + flags>.so`` (under a lock, with
an atomic rename, so processes starting together build it once) and loaded with ctypes. Without
a C compiler, without AVX2/FMA/F16C, or when the build fails, one warning is logged and
``available()`` is False: the engine then runs float32 on torch's own ops (its "auto" format).
``OMNISTREAM_NATIVE=0`` forces that (tests compare both).

``build()`` compiles ahead of time (``omnistream models`` can call it so the first question does
not wait for the compiler) and returns the library's path, or None where it cannot be used.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

log = logging.getLogger("omnistream.kernels.cpu")

SOURCE_DIR = Path(__file__).parent
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-pthread", "-shared", "-fPIC")
ABI_VERSION = 2
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")

_lib: ctypes.CDLL | None = None
_tried = False
_threads: int | None = None  # None: torch.get_num_threads() at each call


def _cache_dir() -> Path:
    from omnistream.protocol.config import default_cache_dir

    return default_cache_dir() / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _cpu_supported() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return all(flag in flags for flag in REQUIRED_CPU_FLAGS)
    return False


def sources() -> list[Path]:
    """The C files built into the library (every ``*.c`` beside this module, in name order)."""
    return sorted(SOURCE_DIR.glob("*.c"))


def _library_path(compiler: str) -> Path:
    digest = hashlib.sha256()
    for path in [*sources(), *sorted(SOURCE_DIR.glob("*.h"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update("\0".join((compiler, *FLAGS)).encode())
    return _cache_dir() / f"omnistream-{digest.hexdigest()[:16]}.so"


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same file
        if target.exists():
            return
        tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.so")
        try:
            done = subprocess.run(
                [compiler, *FLAGS, "-o", str(tmp), *map(str, sources()), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-1000:]}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def _load() -> ctypes.CDLL | None:
    """Build (if needed) and load the library once per process; None (one warning) if unusable."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if not _cpu_supported():
        log.warning(
            "native int8 kernel unavailable: this CPU lacks AVX2/FMA/F16C; the LLM runs float32 on torch"
        )
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning(
            "native int8 kernel unavailable: no C compiler (gcc) found; the LLM runs float32 on torch"
        )
        return None
    try:
        target = _library_path(compiler)
        if not target.exists():
            _compile(compiler, target)
        lib = ctypes.CDLL(str(target))
        if lib.int8_gemm_abi_version() != ABI_VERSION:
            raise RuntimeError("ABI version mismatch")
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning(f"native int8 kernel unavailable ({error}); the LLM runs float32 on torch")
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    lib.int8_linear.restype = None
    lib.int8_linear.argtypes = [
        pointer,
        integer,
        integer,
        pointer,
        pointer,
        pointer,
        pointer,
        pointer,
        integer,
        integer,
    ]
    lib.int8_set_spin.restype = None
    lib.int8_set_spin.argtypes = [integer]
    lib.int8_quantize_rows.restype = None
    lib.int8_quantize_rows.argtypes = [pointer, integer, integer, pointer, pointer, pointer]
    _lib = lib
    return lib


def enabled() -> bool:
    """False when ``OMNISTREAM_NATIVE=0`` (or ``false``/``no``/``off``) turns the native kernels off."""
    return os.environ.get("OMNISTREAM_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def available() -> bool:
    """Whether Int8Linear should run the native kernel (builds it on the first call)."""
    return enabled() and _load() is not None


def build() -> Path | None:
    """Compile the kernel now if needed: its path, or None where it cannot be used (logged)."""
    if _load() is None:
        return None
    compiler = _compiler()
    return _library_path(compiler) if compiler else None


def set_threads(threads: int | None) -> None:
    """Threads the kernel uses (the caller plus helpers), independent of torch's; None follows
    ``torch.get_num_threads()``. The engine can run torch's own ops on one thread and the kernel
    on two: torch's OpenMP workers and the kernel's helpers then do not spin against each other,
    and torch's OpenMP barriers do not stall when the other core is busy."""
    global _threads
    _threads = None if threads is None else max(1, int(threads))


def weight_rowsum(qweight: torch.Tensor) -> torch.Tensor:
    """The int32 sum of each int8 weight row (removes the activations' +128 offset)."""
    return qweight.sum(dim=1, dtype=torch.int32)


class PreparedWeight:
    """An int8 weight with its row scales, row sums and bias, checked once, for ``linear``
    (per call only the activation is checked: decoding makes ~170 calls a token)."""

    __slots__ = ("weight", "scale", "rowsum", "bias", "out_features", "in_features", "_pointers")

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(
                f"native int8: the weight must be 2-D int8, got {weight.dtype} {tuple(weight.shape)}"
            )
        self.weight = weight.contiguous()
        self.out_features, self.in_features = self.weight.shape
        self.scale = scale.float().contiguous()
        self.rowsum = weight_rowsum(self.weight)
        self.bias = None if bias is None else bias.float().contiguous()
        if self.scale.shape != (self.out_features,) or (
            self.bias is not None and self.bias.shape != (self.out_features,)
        ):
            raise ValueError("native int8: one scale (and bias) per output row")
        self._pointers = (
            self.weight.data_ptr(),
            self.scale.data_ptr(),
            self.rowsum.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(),
        )

    def linear(self, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """``x @ (weight * scale[:, None]).T + bias`` with x quantized to 8 bits per row (token).
        ``x``: (..., in_features), any float dtype; the result is float32 (..., out_features)."""
        lib = _lib if _lib is not None else _load()
        if lib is None:
            raise RuntimeError("the native int8 kernel is not available")
        k = self.in_features
        if x.shape[-1] != k:
            raise ValueError(f"native int8: x has {x.shape[-1]} features, the weight {k}")
        if x.dtype != torch.float32:
            x = x.float()
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty((*x.shape[:-1], self.out_features), dtype=torch.float32)
        w, s, r, b = self._pointers
        lib.int8_linear(
            x.data_ptr(),
            x.numel() // k,
            k,
            w,
            s,
            r,
            b,
            y.data_ptr(),
            self.out_features,
            threads or _threads or torch.get_num_threads(),
        )
        return y


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    w_rowsum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """``x @ (weight * w_scale[:, None]).T + bias`` with x quantized to 8 bits per row (token).

    ``weight``: (N, K) int8 with |w| <= 63; ``w_scale``: (N,) float32; ``w_rowsum``: unused (kept
    for the signature; computed from the weight); ``bias``: (N,) or None. ``x``: (..., K), any
    float dtype; the result is float32 (..., N). For repeated calls, use ``PreparedWeight``.
    """
    return PreparedWeight(weight, w_scale, bias).linear(x, threads)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's activation quantization of a (M, K) tensor, one row (token) at a time,
    asymmetric: (u8 values, float32 scale per row, int32 zero point per row), x ~ scale * (u - zero)."""
    lib = _lib if _lib is not None else _load()
    if lib is None:
        raise RuntimeError("the native int8 kernel is not available")
    x = x.float().contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.uint8)
    scales = torch.empty(m, dtype=torch.float32)
    zeros = torch.empty(m, dtype=torch.int32)
    lib.int8_quantize_rows(x.data_ptr(), m, k, q.data_ptr(), scales.data_ptr(), zeros.data_ptr())
    return q, scales, zeros
