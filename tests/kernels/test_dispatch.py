"""The backend is chosen once, can be forced by env or at run time, and really switches paths."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from omnistream.kernels import cases, ops, reference, triton_frames, triton_retrieval
from omnistream.kernels.rope import Rope


def _spy(monkeypatch: pytest.MonkeyPatch, module, name: str, calls: list[str]) -> list[str]:
    """Record ``name`` in ``calls`` whenever ``module.name`` runs; returns ``calls``."""
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def _run_all_ops() -> tuple[torch.Tensor, ...]:
    frames = cases.frames(1, 12, 10)
    queries, pooled = cases.retrieval_inputs(1, 30, 2, 1, 3, 16, torch.float32)
    store = cases.kv_store(1, 4, 1, 5, 8, torch.float32)
    inv_freq = Rope(head_dim=8).inv_freq()
    best = ops.block_scores_topk(queries, pooled, k=3)
    keys, values = ops.gather_rerotate(
        store.keys, store.values, torch.tensor([2, 1]), inv_freq, 7, store.lengths
    )
    return ops.frame_preprocess(frames, 8, (0.5,) * 3, (0.5,) * 3), best.scores, keys, values


@pytest.mark.usefixtures("backend")
def test_forced_triton_runs_the_triton_kernels_on_cpu_under_the_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ops.set_backend("reference")
    want = _run_all_ops()
    calls: list[str] = []
    for module, name in [
        (triton_frames, "frame_preprocess"),
        (triton_retrieval, "block_scores"),
        (triton_retrieval, "gather_rerotate"),
    ]:
        _spy(monkeypatch, module, name, calls)
    assert calls == []
    ops.set_backend("triton")
    assert ops.backend() == "triton"
    got = _run_all_ops()
    assert sorted(calls) == ["block_scores", "frame_preprocess", "gather_rerotate"]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("backend")
def test_triton_backend_without_interpreter_keeps_cpu_tensors_on_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    ops.set_backend("triton")
    calls = _spy(monkeypatch, triton_frames, "frame_preprocess", [])
    reference_calls = _spy(monkeypatch, reference, "frame_preprocess", [])
    ops.frame_preprocess(cases.frames(1, 4, 4), 2, (0.0,) * 3, (1.0,) * 3)
    assert calls == [] and reference_calls == ["frame_preprocess"]


@pytest.mark.usefixtures("backend")
def test_set_backend_validates_and_auto_detects(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ops.set_backend("cuda")
    monkeypatch.delenv("OMNISTREAM_KERNELS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ops.set_backend("auto")
    assert ops.backend() == "reference"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ops.set_backend("auto")
    assert ops.backend() == "triton"  # triton is a dev dependency, so it is installed here
    monkeypatch.setattr(ops, "_triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match="not installed"):
        ops.set_backend("triton")


@pytest.mark.parametrize("forced", ["reference", "triton"])
def test_environment_override_is_read_at_import(forced: str) -> None:
    env = {**os.environ, "OMNISTREAM_KERNELS": forced}
    env.pop("TRITON_INTERPRET", None)
    code = "from omnistream.kernels import ops; print(ops.backend())"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == forced


@pytest.mark.parametrize("forced", ["reference", "triton"])
@pytest.mark.usefixtures("backend")
def test_block_store_round_trip_through_ops(forced: str) -> None:
    """The lead's flow: pool stored keys, find the block a question matches, put it back in place."""
    ops.set_backend(forced)
    rope = Rope(head_dim=16, theta=1e6)
    stored_k = torch.randn(2, 5, 2, 6, 16, generator=torch.Generator().manual_seed(13))  # RoPE removed
    stored_v = torch.randn_like(stored_k)
    pooled = stored_k.mean(dim=3)  # (layers, blocks, kv_heads, head_dim)
    queries = pooled[:, 3].repeat_interleave(2, dim=1)[:, :, None, :]  # 4 query heads ask for block 3
    best = ops.block_scores_topk(queries, pooled, k=2, metric="cosine")
    assert best.ids[:, 0].tolist() == [3, 3]
    assert best.scores[:, 0].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    keys, values = ops.gather_rerotate(stored_k, stored_v, best.ids[0, :1], rope.inv_freq(), dst_start=10)
    torch.testing.assert_close(keys, ops.rope_rotate(stored_k[:, 3], torch.arange(10, 16), rope.inv_freq()))
    torch.testing.assert_close(ops.rope_rotate(keys, -torch.arange(10, 16), rope.inv_freq()), stored_k[:, 3])
    assert torch.equal(values, stored_v[:, 3])
