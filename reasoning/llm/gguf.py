"""Reading a GGUF file: its metadata and tensors (quantized ones as ``kquant.QTensor`` blocks in
the kernel's layout, float ones as float32 tensors). Tensors are copied out of the file into
anonymous memory, so no mapping of the GGUF stays resident (RSS is the weights alone).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from omnistream.kernels.cpu.kquant import (
    BLOCK_VALUES,
    GGUF_BYTES,
    NAMES,
    Q4_K,
    Q5_0,
    Q6_K,
    Q8_0,
    SUPPORTED,
    QTensor,
    repack,
)

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_FLOATS = {0: (np.float32, 4), 1: (np.float16, 2), 30: (np.uint16, 2)}  # F32, F16, BF16 (as bits)


class _Header:
    """A GGUF's metadata and tensor table, parsed from a file object. Our own parser: the gguf
    package's reader builds numpy views of every vocabulary string (13 s for a Qwen2 vocabulary);
    arrays are skipped here (the tokenizer comes from the converted directory)."""

    def __init__(self, f):
        self.f = f
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0
        if self._take(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version, n_tensors, n_kv = struct.unpack("<IQQ", self._take(20))
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        self.meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            vtype = self._u32()
            if vtype == _ARRAY:
                self._skip_array()
            else:
                self.meta[key] = self._value(vtype)
        self.tensors: list[tuple[str, list[int], int, int]] = []  # name, shape (rows first), type, offset
        for _ in range(n_tensors):
            name = self._string()
            ndim = self._u32()
            dims = list(struct.unpack(f"<{ndim}Q", self._take(8 * ndim)))
            qtype, offset = struct.unpack("<IQ", self._take(12))
            self.tensors.append((name, dims[::-1], qtype, offset))
        align = int(self.meta.get("general.alignment", 32))
        self.data_start = (self.base + self.pos + align - 1) // align * align

    def _take(self, n: int) -> bytes:
        while self.pos + n > len(self.buf):
            more = self.f.read(max(1 << 20, n))
            if not more:
                raise ValueError("truncated GGUF header")
            self.buf = self.buf[self.pos :] + more
            self.base += self.pos
            self.pos = 0
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def _u32(self) -> int:
        return struct.unpack("<I", self._take(4))[0]

    def _string(self) -> str:
        (n,) = struct.unpack("<Q", self._take(8))
        return self._take(n).decode("utf-8", "replace")

    def _value(self, vtype: int) -> object:
        if vtype == _STRING:
            return self._string()
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _skip_array(self) -> None:
        etype = self._u32()
        (count,) = struct.unpack("<Q", self._take(8))
        if etype == _STRING:
            for _ in range(count):
                self._take(struct.unpack("<Q", self._take(8))[0])
        elif etype == _ARRAY:
            for _ in range(count):
                self._skip_array()
        else:
            self._take(count * struct.calcsize(_SCALARS[etype]))


def supports(path: Path) -> bool:
    """Whether every tensor of the GGUF at ``path`` is of a type ``read_gguf`` loads (reads only
    the header)."""
    try:
        with open(path, "rb") as f:
            header = _Header(f)
    except (OSError, ValueError, struct.error):
        return False
    return all(qtype in SUPPORTED or qtype in _FLOATS for _, _, qtype, _ in header.tensors)


def k_quant_share(path: Path) -> float:
    """The fraction of the GGUF's quantized weight bytes in K-quant blocks (Q4_K, Q6_K). Those
    run at memory speed when decoding (one float step per 256 values); Q8_0/Q5_0 blocks take a
    float step per 32 values, which on 2 AVX2 cores decodes slower than our int8 format (0.5B:
    25 vs 35 tokens/s), so the engine prefers "gguf" only for K-quant files."""
    try:
        with open(path, "rb") as f:
            header = _Header(f)
    except (OSError, ValueError, struct.error):
        return 0.0
    sizes = {Q4_K: 0, Q6_K: 0, Q8_0: 0, Q5_0: 0}
    for _, shape, qtype, _ in header.tensors:
        if qtype in sizes:
            sizes[qtype] += int(np.prod(shape)) // BLOCK_VALUES[qtype] * GGUF_BYTES[qtype]
    total = sum(sizes.values())
    return (sizes[Q4_K] + sizes[Q6_K]) / total if total else 0.0


def read_gguf(path: Path) -> tuple[dict[str, QTensor | torch.Tensor], dict[str, object]]:
    """Tensors of a GGUF (quantized ones as QTensor, float ones as float32 tensors) and its
    scalar/string metadata. Tensors are read (not mapped) into anonymous memory, so no page of
    the file stays resident."""
    tensors: dict[str, QTensor | torch.Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        header = _Header(f)
        for name, shape, qtype, offset in header.tensors:
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            cols = shape[-1]
            if qtype in SUPPORTED:
                if cols % BLOCK_VALUES[qtype]:
                    raise ValueError(f"{path}: {name} has {cols} columns, not whole {NAMES[qtype]} blocks")
                raw = np.empty((rows, cols // BLOCK_VALUES[qtype] * GGUF_BYTES[qtype]), dtype=np.uint8)
            elif qtype in _FLOATS:
                raw = np.empty(shape, dtype=_FLOATS[qtype][0])
            else:
                raise ValueError(f"{path}: tensor {name} has GGML type {qtype}, not supported")
            f.seek(header.data_start + offset)
            view = memoryview(raw.reshape(-1).view(np.uint8))
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise ValueError(f"{path}: truncated tensor {name}")
                done += got
            if qtype in SUPPORTED:
                tensors[name] = QTensor(
                    qtype, rows, cols, torch.from_numpy(repack(qtype, raw) if qtype == Q4_K else raw)
                )
            elif qtype == 30:
                tensors[name] = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
            else:
                tensors[name] = torch.from_numpy(raw).float()
    return tensors, header.meta
