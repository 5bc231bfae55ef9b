"""ctypes wrappers of ``ops.c`` (fused float32 ops of a Qwen2 layer) taking torch tensors.

All take float32 CPU tensors whose last dimension is contiguous and return (or fill) float32
tensors; ``usable()`` says whether the library is there (and ``OMNISTREAM_NATIVE`` allows it).
The CPU forward (reasoning/llm/cpu.py) calls them; tests/kernels/test_cpu_ops.py compares each
with its torch reference (kernels/reference.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Iterator

import torch

from omnistream.kernels import cpu

ABI_VERSION = 2
# Pause instructions the pool's helpers spin for the next call during a forward (pool.c's default,
# ~1000, lets them sleep in the Python between a layer's native calls, and waking them costs more
# than the gap). Restored after the forward, so idle helpers still sleep soon.
FORWARD_SPIN = 10000
_lib: ctypes.CDLL | None = None
_checked = False


class LinearSpec(ctypes.Structure):
    """ops.c's lin_t: an int8 layer as ``cpu.PreparedWeight`` holds it (which must outlive it)."""

    _fields_ = [
        ("w", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("rowsum", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("N", ctypes.c_int),
        ("K", ctypes.c_int),
    ]

    @classmethod
    def of(cls, prepared: cpu.PreparedWeight) -> LinearSpec:
        w, s, r, b = prepared._pointers
        return cls(w, s, r, b, prepared.out_features, prepared.in_features)


def _load() -> ctypes.CDLL | None:
    global _lib, _checked
    if _checked:
        return _lib
    _checked = True
    lib = cpu._load()
    if lib is None or not hasattr(lib, "ops_abi_version") or lib.ops_abi_version() != ABI_VERSION:
        return None
    p, i, long_, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    lib.ops_rmsnorm.restype = lib.ops_rope.restype = lib.ops_silu_mul.restype = lib.ops_attention.restype = (
        None
    )
    lib.ops_rmsnorm.argtypes = [p, p, p, p, i, i, f, i]
    lib.ops_rope.argtypes = [p, i, long_, i, i, p, p, i]
    lib.ops_silu_mul.argtypes = [p, i, i, p, i]
    lib.ops_attention.argtypes = [p, long_, i, i, i, i, p, long_, long_, p, long_, long_, i, p, long_, f, i]
    lin = ctypes.POINTER(LinearSpec)
    lib.ops_layer_in.restype = lib.ops_layer_out.restype = lib.int8_get_spin.restype = i
    lib.int8_get_spin.argtypes = []
    lib.ops_layer_in.argtypes = [p, p, p, f, i, i, lin, p, p, p, i, i, i]
    lib.ops_layer_out.argtypes = [
        p,
        long_,
        i,
        i,
        i,
        i,
        p,
        long_,
        long_,
        p,
        long_,
        long_,
        i,
        f,
        p,
        i,
        lin,
        p,
        f,
        lin,
        lin,
        p,
        i,
    ]
    _lib = lib
    return lib


def usable() -> bool:
    """The ops are built and allowed (``OMNISTREAM_NATIVE=0`` turns them off with the int8 kernel)."""
    return cpu.enabled() and _load() is not None


def _threads() -> int:
    return cpu._threads or torch.get_num_threads()


def _check(t: torch.Tensor, name: str) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1:
        raise ValueError(f"native ops: {name} must be float32 on the CPU with a contiguous last dimension")


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension. With ``residual``, ``x`` is
    first updated in place to ``x + residual`` (the layer's skip connection). x: contiguous."""
    if not x.is_contiguous():
        raise ValueError("native rmsnorm: x must be contiguous")
    _check(x, "x")
    hidden = x.shape[-1]
    if residual is not None:
        residual = residual.contiguous()
        if residual.shape != x.shape:
            raise ValueError("native rmsnorm: residual and x differ in shape")
    weight = weight.contiguous()
    y = torch.empty_like(x)
    (_lib or _load()).ops_rmsnorm(
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        y.data_ptr(),
        x.numel() // hidden,
        hidden,
        eps,
        _threads(),
    )
    return y


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """Rotate-half RoPE in place on the first ``heads`` head vectors of every row of ``x``
    (rows, >= heads * head_dim), row m with ``cos[m]``/``sin[m]`` (rows, head_dim)."""
    _check(x, "x")
    rows = x.shape[0]
    if x.dim() != 2 or x.shape[1] < heads * head_dim or head_dim % 2:
        raise ValueError("native rope: x must be (rows, >= heads * head_dim), head_dim even")
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    if cos.shape != (rows, head_dim) or sin.shape != (rows, head_dim):
        raise ValueError(f"native rope: cos/sin must be ({rows}, {head_dim})")
    (_lib or _load()).ops_rope(
        x.data_ptr(), rows, x.stride(0), heads, head_dim, cos.data_ptr(), sin.data_ptr(), _threads()
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for rows ``[gate | up]`` (..., 2 * I): (..., I)."""
    gate_up = gate_up.contiguous()
    _check(gate_up, "gate_up")
    inner = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], inner))
    (_lib or _load()).ops_silu_mul(
        gate_up.data_ptr(), gate_up.numel() // (2 * inner), inner, out.data_ptr(), _threads()
    )
    return out


def attention_supported(head_dim: int) -> bool:
    return head_dim % 8 == 0 and head_dim <= 256


def _attention_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """The leading arguments ops_attention and ops_layer_out share: q (pointer, row stride), the
    shape (n, heads, kv_heads, head_dim), k and v (pointer, head and token strides), past."""
    _, kv_heads, total, head_dim = k.shape
    n = q.shape[0]
    return (
        q.data_ptr(),
        q.stride(0),
        n,
        q.shape[1] // head_dim,
        kv_heads,
        head_dim,
        k.data_ptr(),
        k.stride(1),
        k.stride(2),
        v.data_ptr(),
        v.stride(1),
        v.stride(2),
        total - n,
    )


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal grouped-query attention of n new positions against a cache that ends with them.

    q: (n, heads * D) (rows may be strided, e.g. the q part of a fused qkv output); k, v: (1,
    kv_heads, past + n, D), any strides with a contiguous last dimension (a BufferedLayer's view).
    Position i sees keys [0, past + i]. Returns (n, heads * D) (into ``out`` if given)."""
    _check(q, "q")
    _check(k, "k")
    _check(v, "v")
    _, kv_heads, total, head_dim = k.shape
    n = q.shape[0]
    heads = q.shape[1] // head_dim
    if (
        k.shape[0] != 1
        or v.shape != k.shape
        or q.shape[1] != heads * head_dim
        or heads % kv_heads
        or total < n
        or not attention_supported(head_dim)
    ):
        raise ValueError(f"native attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if out is None:
        out = q.new_empty((n, heads * head_dim))
    (_lib or _load()).ops_attention(
        *_attention_operands(q, k, v),
        out.data_ptr(),
        out.stride(0),
        1.0 / math.sqrt(head_dim),
        _threads(),
    )
    return out


@contextlib.contextmanager
def helpers_spinning(pauses: int | None = None) -> Iterator[None]:
    """Within the block, the pool's helpers spin at least ``pauses`` (default FORWARD_SPIN)
    between calls instead of sleeping; the previous setting comes back after it."""
    lib = _lib or _load()
    old = lib.int8_get_spin()
    lib.int8_set_spin(max(old, FORWARD_SPIN if pauses is None else pauses))
    try:
        yield
    finally:
        lib.int8_set_spin(old)


# -- layer halves on int8 weights (one native call each) -------------------------------------------


def layer_in(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    qkv: LinearSpec,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rope_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """Into a layer: ``x += residual`` (in place, when given), ``h = rmsnorm(x)``, returns
    ``qkv = h @ Wqkv.T + b`` (rows, qkv.N) with RoPE applied in place to its first ``rope_heads``
    heads (0: none). x, residual: contiguous (rows, hidden); cos/sin: contiguous (rows, head_dim)."""
    rows, hidden = x.shape
    out = x.new_empty((rows, qkv.N))
    status = (_lib or _load()).ops_layer_in(
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        norm_weight.data_ptr(),
        eps,
        rows,
        hidden,
        qkv,
        out.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        rope_heads,
        head_dim,
        _threads(),
    )
    if status:
        raise MemoryError("native layer_in: out of memory")
    return out


def layer_out(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    x: torch.Tensor,
    o_proj: LinearSpec,
    norm_weight: torch.Tensor,
    eps: float,
    gate_up: LinearSpec,
    down: LinearSpec,
) -> torch.Tensor:
    """The rest of a layer for the rows of ``q`` (n, heads * D, strided rows allowed): attention
    against k/v as ``attention``, ``x += o_proj(.)`` in place (x: contiguous (n, hidden)), then
    returns the MLP's output ``down(silu(gate) * up)(rmsnorm(x))`` (n, hidden), not yet added."""
    _, kv_heads, total, head_dim = k.shape
    n, hidden = x.shape
    if q.shape[0] != n or total < n or v.shape != k.shape or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"native layer_out: q {tuple(q.shape)}, k {tuple(k.shape)}, x {tuple(x.shape)}")
    out = x.new_empty((n, hidden))
    status = (_lib or _load()).ops_layer_out(
        *_attention_operands(q, k, v),
        1.0 / math.sqrt(head_dim),
        x.data_ptr(),
        hidden,
        o_proj,
        norm_weight.data_ptr(),
        eps,
        gate_up,
        down,
        out.data_ptr(),
        _threads(),
    )
    if status:
        raise MemoryError("native layer_out: out of memory")
    return out
