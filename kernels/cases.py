"""Seeded inputs and tolerances shared by the parity tests, the benchmark and the GPU check.

Every generator draws on the target device with its own ``torch.Generator``, so a case is the
same tensor wherever it is built and large stores never pass through host memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def _generator(device: torch.device | str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def frames(
    batch: int, height: int, width: int, device: torch.device | str = "cpu", seed: int = 0
) -> torch.Tensor:
    """uint8 (batch, height, width, 3) noise: the harshest input for an interpolation filter."""
    return torch.randint(
        0,
        256,
        (batch, height, width, 3),
        dtype=torch.uint8,
        device=device,
        generator=_generator(device, seed),
    )


def retrieval_inputs(
    layers: int,
    blocks: int,
    q_heads: int,
    kv_heads: int,
    tokens: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries (layers, q_heads, tokens, head_dim), pooled keys (layers, blocks, kv_heads, head_dim))."""
    gen = _generator(device, seed)
    queries = torch.randn(layers, q_heads, tokens, head_dim, device=device, generator=gen).to(dtype)
    pooled = torch.randn(layers, blocks, kv_heads, head_dim, device=device, generator=gen).to(dtype)
    return queries, pooled


class KVStore(NamedTuple):
    """A block store: keys/values (layers, blocks, kv_heads, block_tokens, head_dim), int64 (blocks,)."""

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    src_starts: torch.Tensor


def kv_store(
    layers: int,
    blocks: int,
    kv_heads: int,
    block_tokens: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> KVStore:
    """Random store whose blocks hold 1..block_tokens valid tokens, cached at positions below 100k."""
    gen = _generator(device, seed)
    shape = (layers, blocks, kv_heads, block_tokens, head_dim)
    keys = torch.randn(shape, device=device, generator=gen).to(dtype)
    values = torch.randn(shape, device=device, generator=gen).to(dtype)
    lengths = torch.randint(1, block_tokens + 1, (blocks,), device=device, generator=gen)
    src_starts = torch.randint(0, 100_000, (blocks,), device=device, generator=gen)
    return KVStore(keys, values, lengths, src_starts)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``torch.testing.assert_close`` tolerances for a result stored in ``dtype`` (float32 math inside)."""
    if dtype == torch.float16:
        return {"atol": 2e-3, "rtol": 2e-3}
    if dtype == torch.bfloat16:
        return {"atol": 1.6e-2, "rtol": 1.6e-2}
    return {"atol": 2e-5, "rtol": 2e-5}
