"""The benchmark's baselines compute what the ops compute, and the GPU check refuses to run on CPU."""

from __future__ import annotations

import numpy as np
import torch

from omnistream.bench import gpu_check
from omnistream.bench import kernels as bench
from omnistream.kernels import cases, reference
from omnistream.kernels.rope import Rope


def test_numpy_baseline_picks_the_reference_blocks() -> None:
    queries, pooled = cases.retrieval_inputs(
        bench.LAYERS,
        300,
        bench.Q_HEADS,
        bench.KV_HEADS,
        bench.QUESTION_TOKENS,
        bench.HEAD_DIM,
        torch.float32,
        seed=4,
    )
    ids = bench._numpy_topk(queries.numpy(), pooled.numpy())
    want = reference.block_scores_topk(queries, pooled, bench.TOP_K).ids
    assert [sorted(row) for row in ids.tolist()] == [sorted(row) for row in want.tolist()]


def test_loop_baseline_gathers_what_the_reference_gathers() -> None:
    store = cases.kv_store(bench.LAYERS, 6, bench.KV_HEADS, 5, 8, torch.float32, seed=6)
    inv_freq = Rope(8, theta=1e6).inv_freq()
    keys, values = reference.gather_rerotate(
        store.keys, store.values, torch.tensor([4, 1]), inv_freq, 0, store.lengths
    )
    loop = bench._loop_gather(store, [4, 1], inv_freq)
    torch.testing.assert_close(torch.stack([k for k, _ in loop]), keys)
    torch.testing.assert_close(torch.stack([v for _, v in loop]), values)


def test_opencv_baseline_is_close_to_the_reference_on_a_smooth_frame() -> None:
    ramp = np.linspace(0, 255, bench.FRAME_W, dtype=np.float32)[None, :, None] * np.ones(
        (bench.FRAME_H, 1, 3), np.float32
    )
    frames = np.ascontiguousarray(ramp.astype(np.uint8)[None])
    opencv = bench._opencv_preprocess(frames)
    want = reference.frame_preprocess(
        torch.from_numpy(frames), bench.FRAME_SIZE, bench.MEAN, bench.STD
    ).numpy()
    assert opencv.shape == want.shape
    assert np.abs(opencv - want).max() < 0.02


def test_timed_ms_measures_the_call() -> None:
    calls = []
    assert bench.timed_ms(lambda: calls.append(1), torch.device("cpu"), repeat=4) >= 0.0
    assert len(calls) == 5  # one warm-up, then the timed repeats


def test_gpu_check_refuses_without_cuda() -> None:
    assert gpu_check.main([]) == 2
