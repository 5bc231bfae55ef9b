"""The CPU forward (reasoning/llm/cpu.py, on the native ops) against the torch forward of the
same model, for float32 and int8 weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omnistream.kernels.cpu import ops
from omnistream.reasoning.llm import cpu, load
from omnistream.reasoning.llm.cache import BufferedCache

from ..tiny import save_qwen2

pytestmark = pytest.mark.skipif(not ops.usable(), reason="native library not built (no gcc/AVX2)")


@pytest.fixture(scope="module")
def tied_odd_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 with an odd head count: 3 query heads on 1 KV head, head_dim 16."""
    return save_qwen2(tmp_path_factory.mktemp("odd"), "odd", seed=3)


def _logits(model, ids, cache, start, positions=None, **kwargs) -> torch.Tensor:
    if positions is None:
        positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    return model(input_ids=ids, cache=cache, position_ids=positions, **kwargs).logits


def _both(monkeypatch, path: Path, int8: bool, tmp_path: Path):
    """The same model twice: one forced onto the torch path."""
    if int8:
        from omnistream.reasoning.llm.formats import prepare_int8

        int8_dir = prepare_int8(path, tmp_path / "tiny-int8")
        fast, slow = load.from_int8_dir(int8_dir), load.from_int8_dir(int8_dir)
    else:
        fast, slow = load.from_float_dir(path), load.from_float_dir(path)
    slow.native_ops = False
    return fast, slow


@pytest.mark.parametrize("which", ["tiny", "odd"])
@pytest.mark.parametrize("int8", [False, True])
def test_fast_forward_matches_the_torch_forward(
    which: str, int8: bool, tiny_llm_dir: Path, tied_odd_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    path = tiny_llm_dir if which == "tiny" else tied_odd_dir
    fast, slow = _both(monkeypatch, path, int8, tmp_path)
    assert cpu.usable(fast)
    assert (cpu._plan(fast)[0][-1] is not None) == int8  # int8: a native call per layer half
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
    assert not cpu.usable(load.from_float_dir(tiny_llm_dir))


def test_a_hooked_linear_is_still_called_as_a_module(tiny_llm_dir: Path, tmp_path: Path, monkeypatch) -> None:
    fast, slow = _both(monkeypatch, tiny_llm_dir, True, tmp_path)
    calls: list[tuple] = []
    handle = fast.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda _m, _i, out: calls.append(out.shape)
    )
    assert cpu._plan(fast)[0][-1] is None  # the per-module path, which calls the hook
    ids = torch.randint(0, fast.config.vocab_size, (1, 10))
    a = _logits(fast, ids, BufferedCache(), 0)
    b = _logits(slow, ids, BufferedCache(), 0)
    assert calls == [(1, 10, fast.config.hidden_size)]  # (batch, tokens, features) as on the torch path
    torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
    handle.remove()
    assert cpu._plan(fast)[0][-1] is not None
