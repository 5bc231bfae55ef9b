"""`omnistream bench kernels`: the kernels' speed, each against a baseline measured in the same run.

On a CUDA device with triton: Triton kernels vs the torch reference on the same GPU. On CPU: the
torch reference (the path CPU users run) vs what one would write without it: OpenCV + numpy per
frame for preprocessing, numpy matmul + argpartition for block scoring, a per-block loop of
index, rotate and concatenate for gathering. Shapes are the default LLM's (Qwen2.5-1.5B: 28
layers, 12 query heads, 2 KV heads, head_dim 128) and 640x480 frames resized to 224x224.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from omnistream.kernels import cases, ops, reference
from omnistream.kernels.rope import Rope

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 28, 12, 2, 128
QUESTION_TOKENS, BLOCK_TOKENS, TOP_K = 16, 32, 8
FRAME_H, FRAME_W, FRAME_SIZE = 480, 640, 224
MEAN = STD = (0.5, 0.5, 0.5)


def timed_ms(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median wall time of ``fn`` in milliseconds after one warm-up call (which compiles kernels)."""
    fn()
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _opencv_preprocess(frames: np.ndarray) -> np.ndarray:
    import cv2

    side = min(FRAME_H, FRAME_W)
    top, left = (FRAME_H - side) // 2, (FRAME_W - side) // 2
    out = np.empty((len(frames), 3, FRAME_SIZE, FRAME_SIZE), np.float32)
    for i, frame in enumerate(frames):
        small = cv2.resize(
            frame[top : top + side, left : left + side],
            (FRAME_SIZE, FRAME_SIZE),
            interpolation=cv2.INTER_AREA,
        )
        out[i] = ((small.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def _numpy_topk(queries: np.ndarray, pooled: np.ndarray) -> np.ndarray:
    group = Q_HEADS // KV_HEADS
    ids = []
    for layer in range(LAYERS):
        q = queries[layer].reshape(KV_HEADS, group * QUESTION_TOKENS, HEAD_DIM)
        per_head = np.stack([pooled[layer, :, g] @ q[g].T for g in range(KV_HEADS)], axis=1)
        scores = per_head.reshape(len(pooled[layer]), Q_HEADS, QUESTION_TOKENS).mean(-1).max(-1)
        ids.append(np.argpartition(-scores, TOP_K - 1)[:TOP_K])
    return np.stack(ids)


def _loop_gather(
    store: cases.KVStore, ids: list[int], inv_freq: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What a caller writes by hand: per layer, per block, slice, rotate to its place, concatenate."""
    layers = []
    for layer in range(LAYERS):
        keys, values, position = [], [], 0
        for block in ids:
            n = int(store.lengths[block])
            where = torch.arange(position, position + n)
            keys.append(reference.rope_rotate(store.keys[layer, block, :, :n], where, inv_freq))
            values.append(store.values[layer, block, :, :n])
            position += n
        layers.append((torch.cat(keys, dim=1), torch.cat(values, dim=1)))
    return layers


def _row(name: str, value: float, baseline_name: str, baseline: float) -> dict:
    return {"name": name, "value": value, "unit": "ms", "baseline_name": baseline_name, "baseline": baseline}


def _frame_rows(device: torch.device, gpu: bool, batches: list[int], repeat: int) -> list[dict]:
    rows = []
    for batch in batches:
        frames = cases.frames(batch, FRAME_H, FRAME_W, device=device)
        name = f"frame_preprocess {batch}x{FRAME_W}x{FRAME_H} -> {FRAME_SIZE}"
        args = (frames, FRAME_SIZE, MEAN, STD)
        ref_ms = timed_ms(partial(reference.frame_preprocess, *args), device, repeat)
        if gpu:
            ms = timed_ms(partial(ops.frame_preprocess, *args), device, repeat)
            rows.append(_row(f"{name} triton (cuda)", ms, "torch reference (cuda)", ref_ms))
        else:
            cv_ms = timed_ms(partial(_opencv_preprocess, frames.numpy()), device, repeat)
            rows.append(_row(f"{name} torch reference (cpu)", ref_ms, "opencv INTER_AREA + numpy", cv_ms))
    return rows


def _score_rows(device: torch.device, gpu: bool, sizes: list[int], repeat: int) -> list[dict]:
    rows = []
    for blocks in sizes:
        shape = (LAYERS, blocks, Q_HEADS, KV_HEADS, QUESTION_TOKENS, HEAD_DIM)
        queries, pooled = cases.retrieval_inputs(*shape, torch.float16, device=device)
        name = f"block_scores_topk {blocks} blocks x {LAYERS} layers, top {TOP_K}"
        ref_ms = timed_ms(partial(reference.block_scores_topk, queries, pooled, TOP_K), device, repeat)
        if gpu:
            ms = timed_ms(partial(ops.block_scores_topk, queries, pooled, TOP_K), device, repeat)
            rows.append(_row(f"{name} triton (cuda)", ms, "torch reference (cuda)", ref_ms))
        else:
            host = (queries.float().numpy(), pooled.float().numpy())
            np_ms = timed_ms(partial(_numpy_topk, *host), device, repeat)
            rows.append(_row(f"{name} torch reference (cpu)", ref_ms, "numpy matmul + argpartition", np_ms))
        del queries, pooled
    return rows


def _gather_rows(
    device: torch.device, gpu: bool, store_blocks: int, picks: list[int], repeat: int
) -> list[dict]:
    rows = []
    store = cases.kv_store(
        LAYERS, store_blocks, KV_HEADS, BLOCK_TOKENS, HEAD_DIM, torch.float16, device=device
    )
    inv_freq = Rope(HEAD_DIM, theta=1e6).inv_freq(device)
    for k in picks:
        ids = torch.randperm(store_blocks, generator=torch.Generator().manual_seed(k))[:k].to(device)
        name = f"gather_rerotate {k} of {store_blocks} blocks x {LAYERS} layers"
        args = (store.keys, store.values, ids, inv_freq, 64, store.lengths)
        ref_ms = timed_ms(partial(reference.gather_rerotate, *args), device, repeat)
        if gpu:
            ms = timed_ms(partial(ops.gather_rerotate, *args), device, repeat)
            rows.append(_row(f"{name} triton (cuda)", ms, "torch reference (cuda)", ref_ms))
        else:
            loop_ms = timed_ms(partial(_loop_gather, store, ids.tolist(), inv_freq), device, repeat)
            rows.append(_row(f"{name} torch reference (cpu)", ref_ms, "per-block loop + cat", loop_ms))
    return rows


def run(quick: bool, progress: Callable[[str], None]) -> list[dict]:
    """Rows ``{name, value, unit, baseline_name, baseline}``: Triton vs reference on a GPU, else reference vs CPU baselines."""
    gpu = torch.cuda.is_available() and ops.backend() == "triton"
    device = torch.device("cuda" if gpu else "cpu")
    repeat = 3 if quick else 10
    progress(
        f"kernels: {'triton vs torch on ' + torch.cuda.get_device_name(0) if gpu else 'torch reference vs opencv/numpy on cpu'}"
    )
    rows = _frame_rows(device, gpu, [1, 8] if quick else [1, 8, 32], repeat)
    progress("kernels: frame preprocessing done")
    if gpu:
        sizes = [1_000, 100_000] if quick else [1_000, 10_000, 100_000, 1_000_000]
    else:
        sizes = [1_000, 10_000] if quick else [1_000, 10_000, 50_000]
    rows += _score_rows(device, gpu, sizes, repeat)
    progress("kernels: block scoring done")
    rows += _gather_rows(device, gpu, 4096 if gpu else 256, [16, 64] if quick else [16, 64, 256], repeat)
    progress("kernels: gather done")
    return rows
