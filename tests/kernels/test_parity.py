"""Triton kernels against their torch references, on CPU through the Triton interpreter.

Odd shapes on purpose: 63 tokens, head dim 60, 1 and 1000 blocks, frames not a multiple of any
block size, strided (non-contiguous) inputs; every output dtype the kernels write.
"""

from __future__ import annotations

import pytest
import torch

from omnistream.kernels import cases, reference, triton_frames, triton_retrieval
from omnistream.kernels.rope import Rope

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize(
    ("height", "width", "size", "center_crop"),
    [(37, 53, 24, True), (30, 17, 13, False), (9, 11, 20, True)],
)
def test_frame_preprocess_parity(
    height: int, width: int, size: int, center_crop: bool, antialias: bool
) -> None:
    frames = cases.frames(2, height, width, seed=height)
    got = triton_frames.frame_preprocess(frames, size, MEAN, STD, center_crop, antialias)
    want = reference.frame_preprocess(frames, size, MEAN, STD, center_crop, antialias)
    torch.testing.assert_close(got, want, **cases.tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frame_preprocess_parity_half_output_strided_input(dtype: torch.dtype) -> None:
    wide = cases.frames(3, 41, 70, seed=5)
    frames = wide[:, :, 3:64]  # non-contiguous view: the kernel must honour strides
    got = triton_frames.frame_preprocess(frames, 16, (0.5,) * 3, (0.5,) * 3, dtype=dtype)
    want = reference.frame_preprocess(frames, 16, (0.5,) * 3, (0.5,) * 3, dtype=dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), **cases.tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("blocks", "tokens", "head_dim"), [(1000, 5, 16), (1, 63, 60)])
def test_block_scores_parity(dtype: torch.dtype, blocks: int, tokens: int, head_dim: int) -> None:
    queries, pooled = cases.retrieval_inputs(1, blocks, 4, 2, tokens, head_dim, dtype, seed=blocks)
    got = triton_retrieval.block_scores(queries, pooled)
    want = reference.block_scores(queries, pooled)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("head_reduce", ["max", "mean"])
@pytest.mark.parametrize("token_reduce", ["max", "mean"])
def test_block_scores_parity_all_reductions(metric: str, head_reduce: str, token_reduce: str) -> None:
    queries, pooled = cases.retrieval_inputs(2, 70, 6, 2, 19, 20, torch.float16, seed=7)
    got = triton_retrieval.block_scores(queries, pooled, metric, head_reduce, token_reduce)
    want = reference.block_scores(queries, pooled, metric, head_reduce, token_reduce)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_block_scores_parity_mixed_dtypes_strided_keys() -> None:
    queries, _ = cases.retrieval_inputs(2, 1, 4, 1, 3, 32, torch.float32, seed=8)
    _, wide = cases.retrieval_inputs(2, 90, 4, 2, 3, 32, torch.bfloat16, seed=9)
    pooled = wide[:, ::2, 1:2]  # every other block, one of the KV heads: strided
    torch.testing.assert_close(
        triton_retrieval.block_scores(queries, pooled),
        reference.block_scores(queries, pooled),
        atol=1e-4,
        rtol=1e-4,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotated", [True, False])
def test_gather_rerotate_parity(dtype: torch.dtype, rotated: bool) -> None:
    store = cases.kv_store(2, 7, 2, 63, 60, dtype, seed=11)
    inv_freq = Rope(head_dim=60, theta=1e6, scaling="linear", factor=2.0).inv_freq()
    ids = torch.tensor([5, 0, 3, 5])
    src = store.src_starts if rotated else None
    got = triton_retrieval.gather_rerotate(store.keys, store.values, ids, inv_freq, 4093, store.lengths, src)
    want = reference.gather_rerotate(store.keys, store.values, ids, inv_freq, 4093, store.lengths, src)
    assert got[0].shape == want[0].shape == (2, 2, int(store.lengths[ids].sum()), 60)
    torch.testing.assert_close(got[0].float(), want[0].float(), **cases.tolerance(dtype))
    assert torch.equal(got[1], want[1])


def test_gather_rerotate_parity_per_layer_ids_into_out_buffer() -> None:
    store = cases.kv_store(2, 1000, 1, 8, 16, torch.float16, seed=12)
    lengths = torch.full((1000,), 8)
    lengths[[17, 999]] = 3
    ids = torch.tensor([[999, 4, 17], [17, 999, 500]])  # 19 tokens on both layers
    inv_freq = Rope(head_dim=16, theta=10000.0).inv_freq()
    outs = []
    for module in (triton_retrieval, reference):
        cache = (
            torch.zeros(2, 1, 40, 16, dtype=torch.float16),
            torch.zeros(2, 1, 40, 16, dtype=torch.float16),
        )
        outs.append(
            module.gather_rerotate(
                store.keys, store.values, ids, inv_freq, 9, lengths, store.src_starts, out=cache
            )
        )
    (got_k, got_v), (want_k, want_v) = outs
    torch.testing.assert_close(got_k, want_k, **cases.tolerance(torch.float16))
    assert torch.equal(got_v, want_v)
    assert not got_k[:, :, :9].any() and not got_k[:, :, 28:].any()


def test_gather_rerotate_of_no_blocks_is_empty_on_both_paths() -> None:
    store = cases.kv_store(2, 3, 2, 4, 8, torch.float16)
    inv_freq = Rope(head_dim=8).inv_freq()
    for module in (triton_retrieval, reference):
        keys, values = module.gather_rerotate(
            store.keys, store.values, torch.zeros(0, dtype=torch.int64), inv_freq, 5
        )
        assert keys.shape == values.shape == (2, 2, 0, 8)
