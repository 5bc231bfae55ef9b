"""Check the Triton kernels on a CUDA GPU: parity with the references, then speed. Prints tables.

    python -m omnistream.bench.gpu_check [--quick]

Parity runs the compiled kernels (not the interpreter) on the same odd shapes and dtypes as the
CPU tests, plus the native bf16 dot the interpreter cannot run and a 100k-block case; speed is the
``omnistream bench kernels`` suite (frames 1-32 x 640x480, 1k-1M blocks, 16-256 gathered blocks).
Exit status 1 when a parity case fails or the Triton retrieval is not faster than the torch
reference at 100k blocks or more (results: BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

from omnistream.bench import kernels as kernel_bench
from omnistream.kernels import cases, ops, reference
from omnistream.kernels.rope import Rope

Case = tuple[str, Callable[[], tuple[torch.Tensor, torch.Tensor]], dict[str, float]]


def _frame_cases(device: torch.device) -> list[Case]:
    from omnistream.kernels import triton_frames

    found: list[Case] = []
    for (height, width, size, crop), antialias, dtype in [
        ((37, 53, 24, True), True, torch.float32),
        ((37, 53, 24, True), False, torch.float32),
        ((30, 17, 13, False), True, torch.float16),
        ((9, 11, 20, True), True, torch.bfloat16),
        ((480, 640, 224, True), True, torch.float32),
        ((1080, 1920, 224, False), True, torch.float16),
    ]:
        frames = cases.frames(3, height, width, device=device, seed=height)

        def pair(frames=frames, size=size, crop=crop, antialias=antialias, dtype=dtype):
            args = (frames, size, kernel_bench.MEAN, kernel_bench.STD, crop, antialias, dtype)
            return triton_frames.frame_preprocess(*args).float(), reference.frame_preprocess(*args).float()

        found.append(
            (
                f"frames {height}x{width}->{size} crop={crop} aa={antialias} {dtype}",
                pair,
                cases.tolerance(dtype),
            )
        )
    return found


def _score_cases(device: torch.device) -> list[Case]:
    from omnistream.kernels import triton_retrieval

    found: list[Case] = []
    for blocks, tokens, head_dim, dtype, metric, head_reduce, token_reduce in [
        (1000, 5, 16, torch.float32, "dot", "max", "mean"),
        (1000, 5, 16, torch.bfloat16, "dot", "max", "mean"),
        (1, 63, 60, torch.float16, "cosine", "mean", "max"),
        (70, 19, 20, torch.bfloat16, "cosine", "max", "max"),
        (100_000, 16, 128, torch.bfloat16, "dot", "max", "mean"),
    ]:
        queries, pooled = cases.retrieval_inputs(
            2, blocks, 12, 2, tokens, head_dim, dtype, device=device, seed=blocks
        )

        def pair(q=queries, p=pooled, how=(metric, head_reduce, token_reduce)):
            return triton_retrieval.block_scores(q, p, *how), reference.block_scores(q, p, *how)

        name = f"scores {blocks} blocks T={tokens} D={head_dim} {dtype} {metric}/{head_reduce}/{token_reduce}"
        found.append((name, pair, {"atol": 1e-3, "rtol": 1e-3}))
    return found


def _gather_cases(device: torch.device) -> list[Case]:
    from omnistream.kernels import triton_retrieval

    found: list[Case] = []
    for dtype, rotated in [(torch.float32, True), (torch.float16, False), (torch.bfloat16, True)]:
        store = cases.kv_store(2, 1000, 2, 63, 60, dtype, device=device, seed=11)
        inv_freq = Rope(head_dim=60, theta=1e6, scaling="linear", factor=2.0).inv_freq(device)
        ids = torch.tensor([999, 0, 3, 500], device=device)
        src = store.src_starts if rotated else None

        def pair(store=store, inv_freq=inv_freq, ids=ids, src=src):
            got = triton_retrieval.gather_rerotate(
                store.keys, store.values, ids, inv_freq, 4093, store.lengths, src
            )
            want = reference.gather_rerotate(
                store.keys, store.values, ids, inv_freq, 4093, store.lengths, src
            )
            if not torch.equal(got[1], want[1]):
                return torch.ones(1), torch.zeros(1)  # values must be copied bit for bit
            return got[0].float(), want[0].float()

        found.append(
            (f"gather 4 of 1000 blocks T=63 D=60 {dtype} rotated={rotated}", pair, cases.tolerance(dtype))
        )
    return found


def _topk_case(device: torch.device) -> Case:
    """Triton-path top-k ids must be the reference's best blocks (ties within float error aside)."""
    queries, pooled = cases.retrieval_inputs(4, 50_000, 12, 2, 16, 128, torch.float16, device=device, seed=3)

    def pair():
        ids = ops.block_scores_topk(queries, pooled, k=8).ids
        scores = reference.block_scores(queries, pooled)
        kth = scores.topk(8, dim=1).values[:, -1:]
        return torch.minimum(scores.gather(1, ids), kth.expand(-1, 8)), kth.expand(-1, 8)

    return ("topk ids 50000 blocks fp16 (chosen scores >= kth best)", pair, {"atol": 1e-3, "rtol": 0.0})


def parity(device: torch.device) -> bool:
    print("| parity case | max abs error | ok |\n|---|---|---|")
    passed = True
    for name, pair, tol in [
        *_frame_cases(device),
        *_score_cases(device),
        *_gather_cases(device),
        _topk_case(device),
    ]:
        got, want = pair()
        error = (got - want).abs().max().item() if got.numel() else 0.0
        ok = (
            got.shape == want.shape
            and bool(torch.isfinite(got).all())
            and torch.allclose(got, want, rtol=tol["rtol"], atol=tol["atol"])
        )
        passed &= ok
        print(f"| {name} | {error:.3g} | {'yes' if ok else 'NO'} |", flush=True)
    return passed


def speed(quick: bool) -> bool:
    rows = kernel_bench.run(quick, lambda line: print(line, file=sys.stderr, flush=True))
    print("\n| measurement | triton ms | torch reference ms | speedup |\n|---|---|---|---|")
    faster_at_scale = True
    for row in rows:
        speedup = row["baseline"] / row["value"]
        print(f"| {row['name']} | {row['value']:.3f} | {row['baseline']:.3f} | {speedup:.1f}x |")
        blocks = int(row["name"].split()[1]) if row["name"].startswith("block_scores_topk") else 0
        if blocks >= 100_000 and speedup <= 1.0:
            faster_at_scale = False
    return faster_at_scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes in the speed table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        print("gpu_check needs a CUDA device and compiled Triton (unset TRITON_INTERPRET)", file=sys.stderr)
        return 2
    ops.set_backend("triton")
    device = torch.device("cuda")
    start = time.monotonic()
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
    parity_ok = parity(device)
    faster = speed(args.quick)
    print(
        f"\nparity: {'pass' if parity_ok else 'FAIL'}; triton faster at >= 100k blocks: {'yes' if faster else 'NO'}"
    )
    print(f"{time.monotonic() - start:.0f} s")
    return 0 if parity_ok and faster else 1


if __name__ == "__main__":
    sys.exit(main())
