"""Torch reference implementations of the kernels: the ops the Triton kernels accelerate
(float32 math), and what each native CPU kernel (kernels/cpu) computes.

Each function documents its shapes; the Triton and native paths must match these within
tolerance (tests/kernels). The retrieval and frame references are also the production path
wherever Triton does not run (CPU); callers go through ``omnistream.kernels.ops``, never here
directly. The CPU-kernel references are for the parity tests only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

METRICS = ("dot", "cosine")
REDUCTIONS = ("max", "mean")
# Elements of the (blocks, heads, tokens) score tensor materialised at once by the reference.
_SCORE_CHUNK_ELEMENTS = 1 << 22


def crop_box(height: int, width: int, center_crop: bool) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of the region that is resized: the centred square or all."""
    if not center_crop:
        return 0, 0, height, width
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def check_frames(frames: torch.Tensor, size: int) -> None:
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3) frames, got {frames.dtype} {tuple(frames.shape)}")
    if size <= 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"cannot resize {tuple(frames.shape)} frames to {size}x{size}")


def frame_preprocess(
    frames: torch.Tensor,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    center_crop: bool = True,
    antialias: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 frames (B, H, W, 3) RGB -> ``dtype`` (B, 3, size, size): ``(pixel / 255 - mean) / std``.

    With ``center_crop`` the largest centred square is taken before resizing (square subjects are
    recognised far better than when the whole frame is squashed); bilinear resize with
    ``align_corners=False``, antialiased (triangle filter widened by the scale) when shrinking if
    ``antialias``. Computed in float32 on the frames' device; a new tensor, owned by the caller.
    """
    check_frames(frames, size)
    top, left, crop_h, crop_w = crop_box(frames.shape[1], frames.shape[2], center_crop)
    frames = frames[:, top : top + crop_h, left : left + crop_w]
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).to(dtype)


def rope_rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., tokens, head_dim) by ``delta`` positions, rotate_half RoPE.

    ``delta`` is an integer (or float) position difference per token, shaped (tokens,) or
    broadcastable to ``x.shape[:-1]``; ``inv_freq`` float32 (head_dim // 2,) from
    ``Rope.inv_freq``. Computed in float32, returned in ``x``'s dtype as a new tensor.
    """
    angles = delta.to(torch.float32)[..., None] * inv_freq.to(device=x.device, dtype=torch.float32)
    cos, sin = angles.cos(), angles.sin()
    xf = x.float()
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def check_scores_args(
    queries: torch.Tensor, pooled_keys: torch.Tensor, metric: str, head_reduce: str, token_reduce: str
) -> None:
    if queries.ndim != 4 or pooled_keys.ndim != 4:
        raise ValueError(
            f"queries must be (layers, q_heads, q_tokens, head_dim) and pooled keys (layers, blocks, "
            f"kv_heads, head_dim); got {tuple(queries.shape)} and {tuple(pooled_keys.shape)}"
        )
    layers, q_heads, tokens, head_dim = queries.shape
    k_layers, _, kv_heads, k_dim = pooled_keys.shape
    if layers != k_layers or head_dim != k_dim or kv_heads == 0 or q_heads % kv_heads or tokens == 0:
        raise ValueError(
            f"queries {tuple(queries.shape)} do not fit pooled keys {tuple(pooled_keys.shape)}: same "
            "layers and head_dim, q_heads a multiple of kv_heads, at least one query token"
        )
    if metric not in METRICS or head_reduce not in REDUCTIONS or token_reduce not in REDUCTIONS:
        raise ValueError(
            f"metric in {METRICS}, reductions in {REDUCTIONS}; got {metric}/{head_reduce}/{token_reduce}"
        )


def block_scores(
    queries: torch.Tensor,
    pooled_keys: torch.Tensor,
    metric: str = "dot",
    head_reduce: str = "max",
    token_reduce: str = "mean",
) -> torch.Tensor:
    """Score every block against the question, per layer -> float32 (layers, blocks).

    ``queries`` (layers, q_heads, q_tokens, head_dim) and ``pooled_keys`` (layers, blocks,
    kv_heads, head_dim), any float dtype, same RoPE state (both unrotated for position-free
    keys). GQA: query head h is compared with KV head ``h // (q_heads // kv_heads)``. The score of
    (head, token) is ``q . k`` (``dot``) or their cosine; it is reduced over query tokens by
    ``token_reduce`` first, then over query heads by ``head_reduce`` (max keeps the retrieving
    heads that a mean washes out).
    """
    check_scores_args(queries, pooled_keys, metric, head_reduce, token_reduce)
    layers, q_heads, tokens, head_dim = queries.shape
    blocks, kv_heads = pooled_keys.shape[1], pooled_keys.shape[2]
    q = queries.float().reshape(layers, kv_heads, q_heads // kv_heads, tokens, head_dim)
    if metric == "cosine":
        q = F.normalize(q, dim=-1)
    if token_reduce == "mean":  # a mean of dot products is the dot product with the mean query
        q, tokens = q.mean(dim=3, keepdim=True), 1
    out = torch.empty(layers, blocks, dtype=torch.float32, device=queries.device)
    chunk = max(1, _SCORE_CHUNK_ELEMENTS // (q_heads * tokens))
    for layer in range(layers):
        for start in range(0, blocks, chunk):
            k = pooled_keys[layer, start : start + chunk].float()
            if metric == "cosine":
                k = F.normalize(k, dim=-1)
            scores = torch.einsum("ngd,gjtd->ngjt", k, q[layer]).flatten(1, 2)  # (n, q_heads, tokens)
            scores = scores.amax(-1) if token_reduce == "max" else scores.mean(-1)
            out[layer, start : start + chunk] = scores.amax(-1) if head_reduce == "max" else scores.mean(-1)
    return out


class BlockTopK(NamedTuple):
    """Best blocks per layer: ``ids`` int64 (layers, k) and their ``scores`` float32, best first."""

    ids: torch.Tensor
    scores: torch.Tensor


def topk_blocks(scores: torch.Tensor, k: int, allowed: torch.Tensor | None) -> BlockTopK:
    """Top ``min(k, blocks)`` of float32 (layers, blocks) scores; ``allowed`` (blocks,) bool masks ids.

    Masked blocks score -inf, so they come last and only appear when k exceeds the allowed count.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if allowed is not None:
        if allowed.shape != scores.shape[1:]:
            raise ValueError(
                f"allowed must be (blocks,) = {tuple(scores.shape[1:])}, got {tuple(allowed.shape)}"
            )
        scores = scores.masked_fill(~allowed.to(device=scores.device, dtype=torch.bool), float("-inf"))
    values, ids = torch.topk(scores, min(k, scores.shape[1]), dim=1, largest=True, sorted=True)
    return BlockTopK(ids, values)


def block_scores_topk(
    queries: torch.Tensor,
    pooled_keys: torch.Tensor,
    k: int,
    metric: str = "dot",
    head_reduce: str = "max",
    token_reduce: str = "mean",
    allowed: torch.Tensor | None = None,
) -> BlockTopK:
    """``block_scores`` followed by the top ``min(k, blocks)`` blocks of each layer (see both)."""
    return topk_blocks(block_scores(queries, pooled_keys, metric, head_reduce, token_reduce), k, allowed)


class GatherLayout(NamedTuple):
    """Where each selected block lands: ids, lengths and token offsets, all int64 (layers, k)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor
    total: int


def gather_layout(
    keys: torch.Tensor,
    values: torch.Tensor,
    block_ids: torch.Tensor,
    lengths: torch.Tensor | None,
    inv_freq: torch.Tensor,
) -> GatherLayout:
    """Validate a gather and lay the selected blocks out back to back (one host sync for ``total``)."""
    if keys.ndim != 5 or keys.shape != values.shape or keys.dtype != values.dtype:
        raise ValueError(
            "keys and values must both be (layers, blocks, kv_heads, block_tokens, head_dim) of one "
            f"dtype, got {keys.dtype} {tuple(keys.shape)} and {values.dtype} {tuple(values.shape)}"
        )
    layers, blocks, _, block_tokens, head_dim = keys.shape
    if head_dim % 2 or inv_freq.shape != (head_dim // 2,):
        raise ValueError(
            f"head_dim must be even and inv_freq ({head_dim // 2},), got {tuple(inv_freq.shape)}"
        )
    ids = block_ids.to(device=keys.device, dtype=torch.int64)
    if ids.ndim == 1:
        ids = ids.expand(layers, -1)
    if ids.ndim != 2 or ids.shape[0] != layers:
        raise ValueError(f"block_ids must be (k,) or (layers={layers}, k), got {tuple(block_ids.shape)}")
    empty = torch.zeros_like(ids)
    if ids.numel() == 0:
        return GatherLayout(ids.contiguous(), empty, empty, 0)
    if lengths is None:
        lens = torch.full_like(ids, block_tokens)
    elif lengths.shape != (blocks,):
        raise ValueError(f"lengths must be (blocks,) = ({blocks},), got {tuple(lengths.shape)}")
    else:  # clamped so that bad ids are reported below rather than failing the indexing here
        lens = lengths.to(device=keys.device, dtype=torch.int64)[ids.clamp(0, blocks - 1)]
    ends = lens.cumsum(dim=1)
    totals = ends[:, -1]
    bounds = torch.stack([ids.min(), ids.max(), lens.min(), lens.max(), totals.min(), totals.max()])
    low_id, high_id, low_len, high_len, low_total, high_total = bounds.tolist()  # the one host sync
    if low_id < 0 or high_id >= blocks:
        raise ValueError(f"block ids must lie in [0, {blocks}), got {low_id}..{high_id}")
    if low_len < 0 or high_len > block_tokens:
        raise ValueError(f"block lengths must lie in [0, {block_tokens}], got {low_len}..{high_len}")
    if low_total != high_total:
        raise ValueError(f"every layer must gather the same number of tokens, got {totals.tolist()}")
    return GatherLayout(ids.contiguous(), lens, ends - lens, int(low_total))


def check_out(out: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor, end: int) -> None:
    """``out`` buffers must be (layers, kv_heads, >= end, head_dim) in the store's dtype and device."""
    layers, _, kv_heads, _, head_dim = keys.shape
    for buffer in out:
        if (
            buffer.ndim != 4
            or (buffer.shape[0], buffer.shape[1], buffer.shape[3]) != (layers, kv_heads, head_dim)
            or buffer.shape[2] < end
            or buffer.dtype != keys.dtype
            or buffer.device != keys.device
        ):
            raise ValueError(
                f"out buffers must be {keys.dtype} on {keys.device}, shaped (layers={layers}, "
                f"kv_heads={kv_heads}, >= {end}, head_dim={head_dim}); got {buffer.dtype} {tuple(buffer.shape)}"
            )


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
    """Gather KV blocks from a block store into a contiguous cache, keys re-rotated to their new places.

    ``keys``/``values`` (layers, blocks, kv_heads, block_tokens, head_dim) are the store; block b
    holds ``lengths[b]`` valid tokens (all ``block_tokens`` when None). ``block_ids`` (k,) picks
    the same blocks on every layer, (layers, k) per layer (every layer must then gather the same
    number of tokens); blocks are laid out in the given order. Token t of the j-th block gets
    position ``dst_start + offset_j + t``; its key was stored rotated at ``src_starts[b] + t``
    (int64 (blocks,)) or unrotated (``src_starts`` None) and is rotated by the difference with
    ``inv_freq`` (float32 (head_dim // 2,), ``Rope.inv_freq``). Returns new (layers, kv_heads,
    tokens, head_dim) key and value tensors in the store's dtype; or, given ``out`` = (keys,
    values) buffers (layers, kv_heads, capacity, head_dim), writes cache indices
    ``[dst_start, dst_start + tokens)`` of them in place (cache index = position) and returns them.
    """
    layout = gather_layout(keys, values, block_ids, lengths, inv_freq)
    if out is not None:
        check_out(out, keys, dst_start + layout.total)
    layers, total = keys.shape[0], layout.total
    # One row per gathered token: which block it comes from and its index inside that block.
    block = torch.repeat_interleave(layout.ids.flatten(), layout.lengths.flatten()).view(layers, total)
    first_slot = torch.repeat_interleave(layout.offsets.flatten(), layout.lengths.flatten()).view(
        layers, total
    )
    slot = torch.arange(total, device=keys.device).expand(layers, total)
    token = slot - first_slot
    layer = torch.arange(layers, device=keys.device)[:, None]
    picked_k = keys[layer, block, :, token]  # (layers, total, kv_heads, head_dim)
    picked_v = values[layer, block, :, token]
    delta = (
        dst_start
        + slot
        - (
            src_starts.to(device=keys.device, dtype=torch.int64)[block] + token
            if src_starts is not None
            else 0
        )
    )
    rotated = rope_rotate(picked_k, delta[:, :, None], inv_freq)  # delta (layers, total, 1)

    def compact(picked: torch.Tensor) -> torch.Tensor:
        return picked.transpose(1, 2).contiguous()

    if out is None:
        return compact(rotated), compact(picked_v)
    out[0][:, :, dst_start : dst_start + layout.total] = compact(rotated)
    out[1][:, :, dst_start : dst_start + layout.total] = compact(picked_v)
    return out


# -- the CPU kernels (kernels/cpu): what each native call computes, in torch ------------------------


def int8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cpu.quantize_rows``: per row (token), asymmetric over [min, max] (0 included), 256
    levels, round half to even -> (u8 values as float, scale per row, zero point per row)."""
    x = x.float()
    low = x.amin(dim=1).clamp(max=0)
    high = x.amax(dim=1).clamp(min=0)
    span = high - low
    inv = torch.where(span > 0, torch.tensor(255.0) / span, torch.zeros_like(span))
    zero = torch.round(-low * inv)
    u = (torch.round(x * inv[:, None]) + zero[:, None]).clamp(0, 255)
    return u, span / 255.0, zero


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``cpu.int8_linear`` / ``PreparedWeight.linear`` for x (M, K): its activation quantization
    (``int8_quantize_rows``), then exact integer dot products with the int8 rows, scaled."""
    u, x_scale, zero = int8_quantize_rows(x)
    acc = (u - zero[:, None]).double() @ qweight.double().T  # exact: integers far below 2**53
    y = acc * x_scale.double()[:, None] * scales.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return y.float()


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``cpu.ops.rmsnorm`` (without its in-place residual add): ``weight * x / sqrt(mean(x^2) + eps)``."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_heads(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int
) -> torch.Tensor:
    """``cpu.ops.rope_`` as a new tensor: rotate-half RoPE on the first ``heads`` head vectors of
    every row of ``x`` (rows, >= heads * head_dim), row m with ``cos[m]``/``sin[m]`` (rows, head_dim)."""
    rows, half = x.shape[0], head_dim // 2
    out = x.clone()
    part = x[:, : heads * head_dim].reshape(rows, heads, head_dim)
    turned = torch.cat([-part[..., half:], part[..., :half]], dim=-1)
    out[:, : heads * head_dim] = (part * cos[:, None] + turned * sin[:, None]).reshape(rows, -1)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``cpu.ops.silu_mul``: ``silu(gate) * up`` for rows ``[gate | up]`` (..., 2 * I)."""
    inner = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :inner]) * gate_up[..., inner:]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``cpu.ops.attention``: q (n, heads * D) against k, v (1, kv_heads, past + n, D); position
    i sees keys [0, past + i]; grouped-query (query head h uses kv head h // (heads / kv_heads))."""
    n, total = q.shape[0], k.shape[2]
    heads, dim = q.shape[1] // k.shape[3], k.shape[3]
    qh = q.reshape(1, n, heads, dim).transpose(1, 2)
    mask = torch.ones(n, total, dtype=torch.bool).tril(diagonal=total - n)
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(n, heads * dim)


def kquant_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cpu.kquant.quantize_activations``' values and scales: symmetric int8 per ``block``
    values (absmax / 127; an all-zero block has scale 0), as float (M, K) and (M, K / block)."""
    m, k = x.shape
    blocks = x.float().reshape(m, -1, block)
    amax = blocks.abs().amax(dim=2)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return torch.round(blocks * inv[:, :, None]).reshape(m, k), amax / 127


def kquant_linear(
    x_values: torch.Tensor, x_scales: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cpu.kquant.KQuantLinear`` in float64: quantized activations (values (M, K) and scales
    (M, K / block), as ``kquant_activations`` gives them) times the dequantized GGUF weight (N, K)
    -> (result, bound of the sum of |terms| for the tolerance)."""
    m, k = x_values.shape
    block = k // x_scales.shape[1]
    xa = (x_values.double().reshape(m, -1, block) * x_scales.double()[:, :, None]).reshape(m, k)
    wd = weight.double()
    y = xa @ wd.T
    if bias is not None:
        y = y + bias.double()
    return y, xa.abs() @ wd.abs().T
