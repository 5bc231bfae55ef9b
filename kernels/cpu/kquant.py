"""Running a GGUF's quantized weights as they are: Q4_K, Q6_K, Q8_0 and Q5_0 blocks, multiplied
by our AVX2 kernel (``kquant.c``) without converting them to another format.

The packaged Qwen2.5-Coder GGUFs are Q4_K_M (1.5B) and Q5_0/Q8_0/K-quant mixes (0.5B): running
their blocks directly keeps the file's exact weights at ~4.5-6.5 bits each, instead of the
dequantized model re-quantized to int8 (8 bits plus a scale per row: the 1.5B is 1.8 GB as int8,
~1.1 GB here), and decoding reads that much less memory per token.

Layouts in RAM (one row of a weight = K / block values blocks, rows adjacent):
- Q4_K (256 values, 148 bytes, repacked from GGUF's 144): f16 d, f16 dmin, 8 sub-block scales
  and 8 mins as bytes (GGUF packs them in 6 bits, 12 bytes), 128 bytes of nibbles as in GGUF;
- Q6_K (256 values, 210 bytes), Q8_0 (32, 34 bytes), Q5_0 (32, 22 bytes): as in GGUF.
The GGUF file itself is read by ``omnistream.reasoning.llm.gguf``; its torch reference is
``kernels/reference.py`` (``dequantize_blocks``, ``kquant_linear``).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from omnistream.kernels import cpu

Q5_0, Q8_0, Q4_K, Q6_K = 6, 8, 12, 14
NAMES = {Q5_0: "Q5_0", Q8_0: "Q8_0", Q4_K: "Q4_K", Q6_K: "Q6_K"}
BLOCK_VALUES = {Q5_0: 32, Q8_0: 32, Q4_K: 256, Q6_K: 256}
GGUF_BYTES = {Q5_0: 22, Q8_0: 34, Q4_K: 144, Q6_K: 210}  # per block in the file
BYTES = {Q5_0: 22, Q8_0: 34, Q4_K: 148, Q6_K: 210}  # per block in RAM (Q4_K repacked)
SUPPORTED = tuple(NAMES)

_ready: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    """The native library with this module's functions declared (raises if it is unavailable)."""
    global _ready
    if _ready is not None:
        return _ready
    lib = cpu._load()
    if lib is None or not hasattr(lib, "kq_linear"):
        raise RuntimeError("the native kernel library (with kquant.c) is not available")
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.kq_abi_version.restype = i
    lib.kq_linear.restype = i
    lib.kq_linear.argtypes = [i, p, i, i, p, i, p, p, ctypes.c_long, i]
    lib.kq_dequant_rows.restype = i
    lib.kq_dequant_rows.argtypes = [i, p, i, p, i, p]
    lib.kq_quantize_rows.restype = None
    lib.kq_quantize_rows.argtypes = [p, i, i, i, p, p, p]
    _ready = lib
    return lib


def available() -> bool:
    try:
        return cpu.available() and _lib() is not None
    except RuntimeError:
        return False


def repack(qtype: int, raw: np.ndarray) -> np.ndarray:
    """GGUF blocks (rows, bytes) uint8 -> our layout (a copy, never a view of the file)."""
    if qtype not in SUPPORTED:
        raise ValueError(f"GGUF type {qtype} is not supported (Q4_K, Q6_K, Q8_0, Q5_0)")
    rows = raw.shape[0]
    if qtype != Q4_K:
        return np.array(raw, dtype=np.uint8, copy=True, order="C")
    blocks = raw.reshape(-1, 144)
    out = np.empty((blocks.shape[0], 148), dtype=np.uint8)
    for start in range(0, blocks.shape[0], 1 << 20):  # in slices: small temporaries
        b = blocks[start : start + (1 << 20)]
        o = out[start : start + (1 << 20)]
        s = b[:, 4:16]
        o[:, 0:4] = b[:, 0:4]  # d, dmin
        o[:, 4:8] = s[:, 0:4] & 63  # scales 0-3
        o[:, 8:12] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)  # scales 4-7
        o[:, 12:16] = s[:, 4:8] & 63  # mins 0-3
        o[:, 16:20] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)  # mins 4-7
        o[:, 20:] = b[:, 16:]
    return out.reshape(rows, -1)


@dataclass
class QTensor:
    """A (rows, cols) weight as blocks of ``qtype`` in our layout: ``data`` uint8 (rows, bytes)."""

    qtype: int
    rows: int
    cols: int
    data: torch.Tensor

    @classmethod
    def from_gguf_blocks(cls, qtype: int, raw: np.ndarray, cols: int) -> QTensor:
        raw = np.asarray(raw, dtype=np.uint8).reshape(raw.shape[0], -1)
        expected = cols // BLOCK_VALUES.get(qtype, 1) * GGUF_BYTES.get(qtype, 0)
        if qtype not in SUPPORTED or cols % BLOCK_VALUES[qtype] or raw.shape[1] != expected:
            raise ValueError(f"bad GGUF blocks: type {qtype}, {raw.shape} for {cols} columns")
        return cls(qtype, raw.shape[0], cols, torch.from_numpy(repack(qtype, raw)))

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 (n, cols) of the given rows (all rows when None)."""
        ids = torch.arange(self.rows) if rows is None else rows.reshape(-1)
        ids = ids.to(torch.int64).contiguous()
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.rows):
            raise IndexError(f"row index out of range for {self.rows} rows")
        out = torch.empty((len(ids), self.cols), dtype=torch.float32)
        if _lib().kq_dequant_rows(
            self.qtype, self.data.data_ptr(), self.cols, ids.data_ptr(), len(ids), out.data_ptr()
        ):
            raise ValueError("kq_dequant_rows rejected the tensor")
        return out

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def quantize_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's activation quantization of (M, K): int8 values, float32 scale per ``block``
    values (256 for K-quants, 32 for Q8_0/Q5_0), int16 sums of every 16 values (for tests)."""
    x = x.float().contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8)
    d = torch.empty((m, k // block), dtype=torch.float32)
    s = torch.empty((m, k // 16), dtype=torch.int16)
    _lib().kq_quantize_rows(x.data_ptr(), m, k, block, q.data_ptr(), d.data_ptr(), s.data_ptr())
    return q, d, s


def threads() -> int:
    return cpu._threads or torch.get_num_threads()


class KQuantLinear(nn.Module):
    """``y = x @ W.T + b`` with W made of row ranges (parts) of GGUF blocks, each of its own type
    (q/k/v rows fused where v is Q6_K and q/k Q4_K): each part writes its own output columns."""

    def __init__(self, parts: list[QTensor], bias: torch.Tensor | None = None):
        super().__init__()
        if not parts or len({p.cols for p in parts}) != 1:
            raise ValueError("KQuantLinear needs parts with the same number of columns")
        self.parts = parts
        self.in_features = parts[0].cols
        self.out_features = sum(p.rows for p in parts)
        self.bias = None if bias is None else bias.float().contiguous()
        if self.bias is not None and self.bias.shape != (self.out_features,):
            raise ValueError(f"bias of {tuple(self.bias.shape)} for {self.out_features} rows")
        self._calls = []
        row = 0
        for p in parts:
            bias_ptr = None if self.bias is None else self.bias.data_ptr() + 4 * row
            self._calls.append((p.qtype, p.data.data_ptr(), p.rows, bias_ptr, row))
            row += p.rows
        self._lib = _lib()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        if x.shape[-1] != k:
            raise ValueError(f"KQuantLinear: x has {x.shape[-1]} features, the weight {k}")
        if x.dtype != torch.float32:
            x = x.float()
        if not x.is_contiguous():
            x = x.contiguous()
        m = x.numel() // k
        n = self.out_features
        y = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
        xp, yp, t = x.data_ptr(), y.data_ptr(), threads()
        for qtype, w, rows, bias, row in self._calls:
            if self._lib.kq_linear(qtype, xp, m, k, w, rows, bias, yp + 4 * row, n, t):
                raise RuntimeError("kq_linear failed (bad type, shape or out of memory)")
        return y

    def weight_bytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def extra_repr(self) -> str:
        types = "+".join(f"{NAMES[p.qtype]}x{p.rows}" for p in self.parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, {types}, bias={self.bias is not None}"


class KQuantEmbedding(nn.Module):
    """A token embedding kept as GGUF blocks; looked-up rows are dequantized to float32."""

    def __init__(self, weight: QTensor):
        super().__init__()
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.rows, weight.cols

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.dequantize(ids).reshape(*ids.shape, self.embedding_dim)
