"""The fused float32 ops of the CPU kernels (kernels/cpu/ops.c) against their torch references
(kernels/reference.py)."""

from __future__ import annotations

import math

import pytest
import torch

from omnistream.kernels import reference as ref
from omnistream.kernels.cpu import ops
from omnistream.reasoning.llm.model import Rotary

pytestmark = pytest.mark.skipif(not ops.usable(), reason="native library not built (no gcc/AVX2)")


@pytest.mark.parametrize("rows,hidden", [(1, 896), (3, 48), (70, 64), (5, 13)])
def test_rmsnorm_with_and_without_residual(rows: int, hidden: int) -> None:
    torch.manual_seed(rows)
    x, r, w = torch.randn(rows, hidden) * 3, torch.randn(rows, hidden), torch.randn(hidden)
    torch.testing.assert_close(ops.rmsnorm(x.clone(), w, 1e-6), ref.rmsnorm(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    inplace = x.clone()
    y = ops.rmsnorm(inplace, w, 1e-6, residual=r)
    torch.testing.assert_close(inplace, x + r)  # the skip connection is written back
    torch.testing.assert_close(y, ref.rmsnorm(x + r, w, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,heads,kv_heads,dim", [(1, 14, 2, 64), (37, 6, 2, 8), (5, 3, 3, 18)])
def test_rope_in_place_on_q_and_k_of_a_fused_row(rows: int, heads: int, kv_heads: int, dim: int) -> None:
    torch.manual_seed(dim)
    config = type(
        "C", (), {"head_dim": dim, "rope_theta": 10000.0, "rope_parameters": {"rope_type": "default"}}
    )
    positions = torch.randperm(500)[:rows]  # any positions, not only contiguous ones
    cos, sin = Rotary(config)(positions, torch.float32)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim)
    expected = ref.rope_heads(qkv, cos, sin, heads + kv_heads, dim)
    got = qkv.clone()
    ops.rope_(got, cos, sin, heads + kv_heads, dim)  # q and k heads are adjacent in a qkv row
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:, (heads + kv_heads) * dim :], qkv[:, (heads + kv_heads) * dim :])  # v untouched


@pytest.mark.parametrize("rows,inner", [(1, 4864), (33, 96), (2, 13)])
def test_silu_mul(rows: int, inner: int) -> None:
    gu = torch.randn(rows, 2 * inner) * 4
    torch.testing.assert_close(ops.silu_mul(gu), ref.silu_mul(gu), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "n,past,heads,kv_heads,dim",
    [
        (1, 300, 14, 2, 64),  # a 0.5B decode step
        (1, 0, 14, 2, 64),  # the first token: one key
        (20, 1024, 14, 2, 64),  # a question after a long cache
        (150, 0, 14, 2, 64),  # a prefill: several query and key blocks, ragged ends
        (7, 65, 5, 5, 16),  # no grouping, odd head count
        (33, 3, 6, 2, 8),  # the tied test model's shape
        (9, 100, 12, 2, 128),  # 1.5B-like head_dim
        (3, 62, 3, 1, 24),  # D % 16 == 8
    ],
)
def test_attention_matches_sdpa(n: int, past: int, heads: int, kv_heads: int, dim: int) -> None:
    torch.manual_seed(n + past)
    # The cache as BufferedLayer holds it: a view of the filled part of a larger buffer.
    capacity = past + n + 17
    kbuf, vbuf = torch.randn(1, kv_heads, capacity, dim), torch.randn(1, kv_heads, capacity, dim)
    k, v = kbuf[:, :, : past + n], vbuf[:, :, : past + n]
    # q as the fast path passes it: the q columns of a fused qkv output (strided rows).
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim) * 2
    q = qkv[:, : heads * dim]
    torch.testing.assert_close(ops.attention(q, k, v), ref.causal_attention(q, k, v), rtol=1e-4, atol=1e-5)


def test_attention_rejects_what_it_cannot_run() -> None:
    with pytest.raises(ValueError):
        ops.attention(
            torch.randn(2, 4 * 12), torch.randn(1, 2, 5, 12), torch.randn(1, 2, 5, 12)
        )  # head_dim 12
    with pytest.raises(ValueError):
        ops.attention(
            torch.randn(6, 32), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
        )  # fewer keys than queries


def test_attention_scale_is_one_over_sqrt_head_dim() -> None:
    """One key: the output is that key's value whatever the scale; two equal-score keys average."""
    q = torch.zeros(1, 8)
    k = torch.randn(1, 1, 2, 8)
    v = torch.randn(1, 1, 2, 8)
    torch.testing.assert_close(ops.attention(q, k, v)[0], v[0, 0].mean(0))
    q = torch.ones(1, 8)
    k = torch.zeros(1, 1, 2, 8)
    k[0, 0, 1] = 1.0
    w = torch.softmax(torch.tensor([0.0, 8.0 / math.sqrt(8)]), 0)
    torch.testing.assert_close(ops.attention(q, k, v)[0], w @ v[0, 0])


def test_helpers_spin_longer_only_within_a_forward() -> None:
    lib = ops._load()
    before = lib.int8_get_spin()
    with ops.helpers_spinning(before + 12345):
        assert lib.int8_get_spin() == before + 12345
    assert lib.int8_get_spin() == before


def test_empty_input_gives_empty_outputs() -> None:
    assert ops.attention(torch.randn(0, 32), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)).shape == (
        0,
        32,
    )
