"""The fused float32 ops (reasoning/native/ops.c) against torch, and the Qwen2 fast path that
uses them against the pure-torch forward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from omnistream.reasoning import qwen2
from omnistream.reasoning.cache import BufferedCache
from omnistream.reasoning.native import ops

pytestmark = pytest.mark.skipif(not ops.usable(), reason="native library not built (no gcc/AVX2)")


def _norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("rows,hidden", [(1, 896), (3, 48), (70, 64), (5, 13)])
def test_rmsnorm_with_and_without_residual(rows: int, hidden: int) -> None:
    torch.manual_seed(rows)
    x, r, w = torch.randn(rows, hidden) * 3, torch.randn(rows, hidden), torch.randn(hidden)
    torch.testing.assert_close(ops.rmsnorm(x.clone(), w, 1e-6), _norm_ref(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    inplace = x.clone()
    y = ops.rmsnorm(inplace, w, 1e-6, residual=r)
    torch.testing.assert_close(inplace, x + r)  # the skip connection is written back
    torch.testing.assert_close(y, _norm_ref(x + r, w, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,heads,kv_heads,dim", [(1, 14, 2, 64), (37, 6, 2, 8), (5, 3, 3, 18)])
def test_rope_in_place_on_q_and_k_of_a_fused_row(rows: int, heads: int, kv_heads: int, dim: int) -> None:
    torch.manual_seed(dim)
    config = type("C", (), {"head_dim": dim, "rope_theta": 10000.0, "rope_parameters": {"rope_type": "default"}})
    positions = torch.randperm(500)[:rows]  # any positions, not only contiguous ones
    cos, sin = qwen2.Rotary(config)(positions, torch.float32)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim)
    expected = qkv.clone()
    for start, count in ((0, heads), (heads * dim, kv_heads)):
        part = expected[:, start : start + count * dim].view(rows, count, dim).transpose(0, 1)
        expected[:, start : start + count * dim] = qwen2.rotate(part, cos, sin).transpose(0, 1).reshape(rows, -1)
    got = qkv.clone()
    ops.rope_(got, cos, sin, heads + kv_heads, dim)  # q and k heads are adjacent in a qkv row
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:, (heads + kv_heads) * dim :], qkv[:, (heads + kv_heads) * dim :])  # v untouched


@pytest.mark.parametrize("rows,inner", [(1, 4864), (33, 96), (2, 13)])
def test_silu_mul(rows: int, inner: int) -> None:
    gu = torch.randn(rows, 2 * inner) * 4
    torch.testing.assert_close(ops.silu_mul(gu), F.silu(gu[:, :inner]) * gu[:, inner:], rtol=1e-5, atol=1e-5)


def _attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    n, total = q.shape[0], k.shape[2]
    heads, dim = q.shape[1] // k.shape[3], k.shape[3]
    qh = q.reshape(1, n, heads, dim).transpose(1, 2)
    mask = torch.ones(n, total, dtype=torch.bool).tril(diagonal=total - n)
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(n, heads * dim)


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
    torch.testing.assert_close(ops.attention(q, k, v), _attention_ref(q, k, v), rtol=1e-4, atol=1e-5)


def test_attention_rejects_what_it_cannot_run() -> None:
    with pytest.raises(ValueError):
        ops.attention(torch.randn(2, 4 * 12), torch.randn(1, 2, 5, 12), torch.randn(1, 2, 5, 12))  # head_dim 12
    with pytest.raises(ValueError):
        ops.attention(torch.randn(6, 32), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))  # fewer keys than queries


# -- the whole forward ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied_odd_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 with an odd head count: 3 query heads on 1 KV head, head_dim 16."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("odd")
    config = Qwen2Config(
        vocab_size=200,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def _logits(model, ids, cache, start, positions=None, **kwargs) -> torch.Tensor:
    if positions is None:
        positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    return model(input_ids=ids, cache=cache, position_ids=positions, **kwargs).logits


def _both(monkeypatch, path: Path, int8: bool, tmp_path: Path):
    """The same model twice: one forced onto the torch path."""
    if int8:
        from omnistream.reasoning.quant import prepare_int8

        int8_dir = prepare_int8(path, tmp_path / "tiny-int8")
        fast, slow = qwen2.from_int8_dir(int8_dir), qwen2.from_int8_dir(int8_dir)
    else:
        fast, slow = qwen2.from_float_dir(path), qwen2.from_float_dir(path)
    slow.native_ops = False
    return fast, slow


@pytest.mark.parametrize("which", ["tiny", "odd"])
@pytest.mark.parametrize("int8", [False, True])
def test_fast_forward_matches_the_torch_forward(
    which: str, int8: bool, tiny_llm_dir: Path, tied_odd_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    path = tiny_llm_dir if which == "tiny" else tied_odd_dir
    fast, slow = _both(monkeypatch, path, int8, tmp_path)
    assert fast.uses_native_ops()
    assert (qwen2._int8_plan(fast) is not None) == int8  # int8: a native call per layer half
    # float32: the same numbers up to summation order. int8: activations are quantized per row, so
    # a last-bit difference in a layer's input can move one value by a rounding step.
    tol = {"atol": 1e-2, "rtol": 1e-2} if int8 else {"atol": 1e-4, "rtol": 1e-4}
    cache_tol = {"atol": 1e-2, "rtol": 1e-2} if int8 else {"atol": 1e-5, "rtol": 1e-4}
    vocab = fast.config.vocab_size
    torch.manual_seed(5)
    ids = torch.randint(0, vocab, (1, 80))
    caches = BufferedCache(), BufferedCache()
    # A prefill, decode steps over the cache, another prefill, with the q taps on.
    seen: tuple[list, list] = ([], [])
    for model, log in zip((fast, slow), seen, strict=True):
        model.model.layers[1].self_attn.on_query.append(log.append)
    for lo, hi in ((0, 40), (40, 41), (41, 42), (42, 43), (43, 80)):
        a = _logits(fast, ids[:, lo:hi], caches[0], lo)
        b = _logits(slow, ids[:, lo:hi], caches[1], lo)
        torch.testing.assert_close(a, b, **tol)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    for la, lb in zip(caches[0].layers, caches[1].layers, strict=True):
        torch.testing.assert_close(la.keys, lb.keys, **cache_tol)
        torch.testing.assert_close(la.values, lb.values, **cache_tol)
    assert len(seen[0]) == len(seen[1]) == 5
    for qa, qb in zip(*seen, strict=True):  # q before RoPE, kept unchanged after the forward
        torch.testing.assert_close(qa, qb, **cache_tol)
    # logits_to_keep=1 and no cache at all.
    a = _logits(fast, ids, None, 0, logits_to_keep=1)
    b = _logits(slow, ids, None, 0)
    assert a.shape == (1, 1, vocab)
    torch.testing.assert_close(a[0, 0], b[0, -1], **tol)


def test_fast_forward_with_non_contiguous_positions(tiny_llm_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The streaming memory prefills at positions it chooses; the fast path takes them as given."""
    fast, slow = _both(monkeypatch, tiny_llm_dir, False, tmp_path)
    ids = torch.randint(0, fast.config.vocab_size, (1, 12))
    positions = torch.tensor([[0, 1, 2, 50, 51, 52, 53, 200, 201, 202, 300, 301]])
    a = _logits(fast, ids, BufferedCache(), 0, positions)
    b = _logits(slow, ids, BufferedCache(), 0, positions)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_native_off_forces_the_torch_path(tiny_llm_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMNISTREAM_NATIVE", "0")
    assert not qwen2.from_float_dir(tiny_llm_dir).uses_native_ops()


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
    assert ops.attention(torch.randn(0, 32), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)).shape == (0, 32)


def test_a_hooked_linear_is_still_called_as_a_module(tiny_llm_dir: Path, tmp_path: Path, monkeypatch) -> None:
    fast, slow = _both(monkeypatch, tiny_llm_dir, True, tmp_path)
    calls: list[tuple] = []
    handle = fast.model.layers[0].mlp.down_proj.register_forward_hook(lambda _m, _i, out: calls.append(out.shape))
    assert qwen2._int8_plan(fast) is None  # the per-module path, which calls the hook
    ids = torch.randint(0, fast.config.vocab_size, (1, 10))
    a = _logits(fast, ids, BufferedCache(), 0)
    b = _logits(slow, ids, BufferedCache(), 0)
    assert calls == [(1, 10, fast.config.hidden_size)]  # (batch, tokens, features) as on the torch path
    torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
    handle.remove()
    assert qwen2._int8_plan(fast) is not None
