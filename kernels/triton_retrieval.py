"""Triton kernels for KV-cache retrieval: block scoring (GQA-aware) and gather + RoPE re-rotation.

Scoring: one program scores ``BLOCK_N`` blocks of one layer. It loads each KV head's pooled keys
once, multiplies them with the query tokens of every query head in that head's group (a
``tl.dot`` on tensor cores for fp16/bf16, exact float32 otherwise), reduces over tokens then
heads in registers and writes one float32 score per block: the (blocks, heads, tokens) scores
the reference materialises in chunks never reach memory. Top-k over the (layers, blocks) scores
is ``torch.topk`` (scores are 1/(kv_heads * head_dim) of the key bytes, so it is not the cost).

Gather: one program moves ``BLOCK_T`` tokens of one KV head of one selected block of one layer,
rotating the key pairs (x1, x2) = (first half, second half) by ``delta * inv_freq`` in float32
(libdevice sin/cos on the GPU: a fast approximate sine is far off at 1e5 radians) and copying
the values, straight into the output cache.
Import this module only where triton is installed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from omnistream.kernels.reference import check_out, check_scores_args, gather_layout

# Measured on an H100 at 1M blocks x 28 layers (fp16, head_dim 128): 2.0 TB/s, best of a sweep.
_BLOCK_N = 128
_BLOCK_T = 32


def _interpreting() -> bool:
    """Under TRITON_INTERPRET the kernels run in numpy: no libdevice, and bf16 dots are wrong."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _scores_kernel(
    q_ptr,
    k_ptr,
    out_ptr,
    n_blocks,
    n_tokens,
    head_dim,
    sq_l,
    sq_h,
    sq_t,
    sq_d,
    sk_l,
    sk_n,
    sk_g,
    sk_d,
    so_l,
    so_n,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    COSINE: tl.constexpr,
    HEAD_MAX: tl.constexpr,
    TOKEN_MAX: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    layer = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    t = tl.arange(0, BLOCK_T)
    n_ok = n < n_blocks
    d_ok = d < head_dim
    best = tl.full((BLOCK_N,), float("-inf") if HEAD_MAX else 0.0, tl.float32)
    for g in range(KV_HEADS):
        k_ptrs = k_ptr + layer * sk_l + n.to(tl.int64)[:, None] * sk_n + g * sk_g + d[None, :] * sk_d
        keys = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if COSINE:
            k_norm = tl.maximum(tl.sqrt(tl.sum(keys.to(tl.float32) * keys.to(tl.float32), axis=1)), 1e-12)
        for j in range(GROUP):
            head = g * GROUP + j
            acc = tl.full((BLOCK_N,), float("-inf") if TOKEN_MAX else 0.0, tl.float32)
            for t0 in range(0, n_tokens, BLOCK_T):
                tt = t0 + t
                t_ok = tt < n_tokens
                q_ptrs = q_ptr + layer * sq_l + head * sq_h + tt[:, None] * sq_t + d[None, :] * sq_d
                queries = tl.load(q_ptrs, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
                if NATIVE_DOT:
                    scores = tl.dot(keys, tl.trans(queries), out_dtype=tl.float32)
                else:
                    scores = tl.dot(
                        keys.to(tl.float32), tl.trans(queries.to(tl.float32)), input_precision="ieee"
                    )
                if COSINE:
                    qf = queries.to(tl.float32)
                    q_norm = tl.maximum(tl.sqrt(tl.sum(qf * qf, axis=1)), 1e-12)
                    scores = scores / k_norm[:, None] / q_norm[None, :]
                if TOKEN_MAX:
                    acc = tl.maximum(acc, tl.max(tl.where(t_ok[None, :], scores, float("-inf")), axis=1))
                else:
                    acc += tl.sum(scores, axis=1)  # masked tokens are zero rows: they add nothing
            if not TOKEN_MAX:
                acc = acc / n_tokens
            if HEAD_MAX:
                best = tl.maximum(best, acc)
            else:
                best += acc
    if not HEAD_MAX:
        best = best / (KV_HEADS * GROUP)
    tl.store(out_ptr + layer * so_l + n * so_n, best, mask=n_ok)


def block_scores(
    queries: torch.Tensor,
    pooled_keys: torch.Tensor,
    metric: str = "dot",
    head_reduce: str = "max",
    token_reduce: str = "mean",
) -> torch.Tensor:
    """Same contract as ``reference.block_scores``: float32 (layers, blocks) on the keys' device."""
    check_scores_args(queries, pooled_keys, metric, head_reduce, token_reduce)
    layers, q_heads, tokens, head_dim = queries.shape
    blocks, kv_heads = pooled_keys.shape[1], pooled_keys.shape[2]
    queries = queries.to(pooled_keys.device)
    out = torch.empty(layers, blocks, dtype=torch.float32, device=pooled_keys.device)
    if layers == 0 or blocks == 0:
        return out
    # Same-dtype fp16/bf16 inputs multiply on tensor cores (products exact, float32 sums). The
    # triton 3.9 interpreter computes bf16 dots wrongly, so there bf16 takes the float32 route.
    native_types = (
        (torch.float16,) if os.environ.get("TRITON_INTERPRET") == "1" else (torch.float16, torch.bfloat16)
    )
    native = queries.dtype == pooled_keys.dtype and queries.dtype in native_types
    grid = (triton.cdiv(blocks, _BLOCK_N), layers)
    _scores_kernel[grid](
        queries,
        pooled_keys,
        out,
        blocks,
        tokens,
        head_dim,
        *queries.stride(),
        *pooled_keys.stride(),
        *out.stride(),
        KV_HEADS=kv_heads,
        GROUP=q_heads // kv_heads,
        COSINE=metric == "cosine",
        HEAD_MAX=head_reduce == "max",
        TOKEN_MAX=token_reduce == "max",
        NATIVE_DOT=native,
        BLOCK_N=_BLOCK_N,
        BLOCK_T=max(16, min(64, triton.next_power_of_2(tokens))),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        num_warps=4,
        num_stages=2,
    )
    return out


@triton.jit
def _gather_kernel(
    k_ptr,
    v_ptr,
    ok_ptr,
    ov_ptr,
    ids_ptr,
    lens_ptr,
    offs_ptr,
    src_ptr,
    inv_freq_ptr,
    n_selected,
    dst_start,
    write_start,
    sk_l,
    sk_b,
    sk_h,
    sk_t,
    sk_d,
    sv_l,
    sv_b,
    sv_h,
    sv_t,
    sv_d,
    sok_l,
    sok_h,
    sok_t,
    sok_d,
    sov_l,
    sov_h,
    sov_t,
    sov_d,
    HALF: tl.constexpr,
    HAS_SRC: tl.constexpr,
    PRECISE_TRIG: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pair = tl.program_id(0)
    layer = (pair // n_selected).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    block = tl.load(ids_ptr + pair)  # int64 (layers, k) laid out contiguously
    length = tl.load(lens_ptr + pair)
    offset = tl.load(offs_ptr + pair)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_HALF)
    t_ok = t < length
    mask = t_ok[:, None] & (i < HALF)[None, :]
    delta = dst_start + offset + t
    if HAS_SRC:
        delta -= tl.load(src_ptr + block) + t
    inv_freq = tl.load(inv_freq_ptr + i, mask=i < HALF, other=0.0)
    angle = delta.to(tl.float32)[:, None] * inv_freq[None, :]
    if PRECISE_TRIG:  # full-range argument reduction: angles reach 1e5 radians
        cos = libdevice.cos(angle)
        sin = libdevice.sin(angle)
    else:
        cos = tl.cos(angle)
        sin = tl.sin(angle)
    tok = t.to(tl.int64)[:, None]
    src_k = k_ptr + layer * sk_l + block * sk_b + head * sk_h + tok * sk_t + i[None, :] * sk_d
    x1 = tl.load(src_k, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_k + HALF * sk_d, mask=mask, other=0.0).to(tl.float32)
    row = (write_start + offset + tok) * sok_t
    dst_k = ok_ptr + layer * sok_l + head * sok_h + row + i[None, :] * sok_d
    k_type = ok_ptr.dtype.element_ty
    tl.store(dst_k, (x1 * cos - x2 * sin).to(k_type), mask=mask)
    tl.store(dst_k + HALF * sok_d, (x2 * cos + x1 * sin).to(k_type), mask=mask)
    src_v = v_ptr + layer * sv_l + block * sv_b + head * sv_h + tok * sv_t + i[None, :] * sv_d
    dst_v = ov_ptr + layer * sov_l + head * sov_h + (write_start + offset + tok) * sov_t + i[None, :] * sov_d
    tl.store(dst_v, tl.load(src_v, mask=mask), mask=mask)
    tl.store(dst_v + HALF * sov_d, tl.load(src_v + HALF * sv_d, mask=mask), mask=mask)


def gather_rerotate(
    keys: torch.Tensor,
    values: torch.Tensor,
    block_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    dst_start: int,
    lengths: torch.Tensor | None = None,
    src_starts: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.gather_rerotate``, on the store's device."""
    layout = gather_layout(keys, values, block_ids, lengths, inv_freq)
    layers, _, kv_heads, block_tokens, head_dim = keys.shape
    if out is None:
        out_k = torch.empty(layers, kv_heads, layout.total, head_dim, dtype=keys.dtype, device=keys.device)
        out_v = torch.empty_like(out_k)
        write_start = 0
    else:
        check_out(out, keys, dst_start + layout.total)
        out_k, out_v = out
        write_start = dst_start
    selected = layout.ids.shape[1]
    if layout.total == 0:
        return out_k, out_v
    src = src_starts.to(device=keys.device, dtype=torch.int64) if src_starts is not None else layout.ids
    grid = (layers * selected, kv_heads, triton.cdiv(block_tokens, _BLOCK_T))
    _gather_kernel[grid](
        keys,
        values,
        out_k,
        out_v,
        layout.ids,
        layout.lengths.contiguous(),
        layout.offsets.contiguous(),
        src,
        inv_freq.to(device=keys.device, dtype=torch.float32).contiguous(),
        selected,
        dst_start,
        write_start,
        *keys.stride(),
        *values.stride(),
        *out_k.stride(),
        *out_v.stride(),
        HALF=head_dim // 2,
        HAS_SRC=src_starts is not None,
        PRECISE_TRIG=not _interpreting(),
        BLOCK_T=_BLOCK_T,
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
    )
    return out_k, out_v
