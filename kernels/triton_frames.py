"""Triton frame preprocessing: crop, bilinear resize (antialias optional), scale and normalise, fused.

One program computes ``BLOCK`` output pixels of one frame, all three channels, reading the uint8
HWC frame directly: the frame crosses the bus and the PCIe link as uint8 (4x fewer bytes than
float) and is read once. Filter weights follow torch's ``interpolate`` (``align_corners=False``):
plain bilinear is 2x2 taps with clamped source indices; antialias is a separable triangle filter
of half-width ``max(scale, 1)`` with weights normalised per output row/column, as in PIL and
torch. Import this module only where triton is installed.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from omnistream.kernels.reference import check_frames, crop_box


def _block() -> int:
    """Output pixels per program: 256 is fastest on an H100; the interpreter wants few programs."""
    return 1024 if os.environ.get("TRITON_INTERPRET") == "1" else 256


@triton.jit
def _aa_weight(tap, lo, center, invscale, size):
    """Unnormalised triangle weight of source index ``lo + tap`` (0 outside the window)."""
    w = tl.maximum(1.0 - tl.abs((tap + lo - center + 0.5) * invscale), 0.0)
    return tl.where(tap < size, w, 0.0)


@triton.jit
def _frame_kernel(
    src_ptr,
    out_ptr,
    crop_h,
    crop_w,
    top,
    left,
    s_b,
    s_h,
    s_w,
    s_c,
    out_size,
    o_b,
    o_c,
    o_h,
    o_w,
    scale_y,
    scale_x,
    support_y,
    support_x,
    invscale_y,
    invscale_x,
    mean_r,
    mean_g,
    mean_b,
    std_r,
    std_g,
    std_b,
    ANTIALIAS: tl.constexpr,
    TAPS_Y: tl.constexpr,
    TAPS_X: tl.constexpr,
    BLOCK: tl.constexpr,
):
    frame = tl.program_id(1)
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = pixel < out_size * out_size
    oy = pixel // out_size
    ox = pixel % out_size
    base = src_ptr + frame.to(tl.int64) * s_b + top * s_h + left * s_w
    red = tl.zeros((BLOCK,), tl.float32)
    green = tl.zeros((BLOCK,), tl.float32)
    blue = tl.zeros((BLOCK,), tl.float32)
    if ANTIALIAS:
        center_y = scale_y * (oy.to(tl.float32) + 0.5)
        center_x = scale_x * (ox.to(tl.float32) + 0.5)
        # float -> int truncates toward zero, like the C++ static_cast torch uses.
        y_lo = tl.maximum((center_y - support_y + 0.5).to(tl.int32), 0)
        x_lo = tl.maximum((center_x - support_x + 0.5).to(tl.int32), 0)
        y_size = tl.minimum((center_y + support_y + 0.5).to(tl.int32), crop_h) - y_lo
        x_size = tl.minimum((center_x + support_x + 0.5).to(tl.int32), crop_w) - x_lo
        total_y = tl.zeros((BLOCK,), tl.float32)
        for ty in range(TAPS_Y):
            total_y += _aa_weight(ty, y_lo, center_y, invscale_y, y_size)
        total_x = tl.zeros((BLOCK,), tl.float32)
        for tx in range(TAPS_X):
            total_x += _aa_weight(tx, x_lo, center_x, invscale_x, x_size)
        # Pixels past the end have empty windows: keep their totals non-zero (they are not stored).
        total_y = tl.where(total_y > 0, total_y, 1.0)
        total_x = tl.where(total_x > 0, total_x, 1.0)
        for ty in range(TAPS_Y):
            wy = _aa_weight(ty, y_lo, center_y, invscale_y, y_size) / total_y
            row = base + tl.minimum(y_lo + ty, crop_h - 1) * s_h
            for tx in range(TAPS_X):
                w = wy * (_aa_weight(tx, x_lo, center_x, invscale_x, x_size) / total_x)
                p = row + tl.minimum(x_lo + tx, crop_w - 1) * s_w
                red += w * tl.load(p, mask=in_range, other=0).to(tl.float32)
                green += w * tl.load(p + s_c, mask=in_range, other=0).to(tl.float32)
                blue += w * tl.load(p + 2 * s_c, mask=in_range, other=0).to(tl.float32)
    else:
        sy = tl.maximum(scale_y * (oy.to(tl.float32) + 0.5) - 0.5, 0.0)
        sx = tl.maximum(scale_x * (ox.to(tl.float32) + 0.5) - 0.5, 0.0)
        y0 = sy.to(tl.int32)
        x0 = sx.to(tl.int32)
        y1 = tl.minimum(y0 + 1, crop_h - 1)
        x1 = tl.minimum(x0 + 1, crop_w - 1)
        ly = sy - y0.to(tl.float32)
        lx = sx - x0.to(tl.float32)
        for corner in tl.static_range(4):
            yy = y1 if corner >= 2 else y0
            xx = x1 if corner % 2 == 1 else x0
            w = (ly if corner >= 2 else 1.0 - ly) * (lx if corner % 2 == 1 else 1.0 - lx)
            p = base + yy * s_h + xx * s_w
            red += w * tl.load(p, mask=in_range, other=0).to(tl.float32)
            green += w * tl.load(p + s_c, mask=in_range, other=0).to(tl.float32)
            blue += w * tl.load(p + 2 * s_c, mask=in_range, other=0).to(tl.float32)
    out = out_ptr + frame.to(tl.int64) * o_b + oy * o_h + ox * o_w
    dtype = out_ptr.dtype.element_ty
    tl.store(out, ((red / 255.0 - mean_r) / std_r).to(dtype), mask=in_range)
    tl.store(out + o_c, ((green / 255.0 - mean_g) / std_g).to(dtype), mask=in_range)
    tl.store(out + 2 * o_c, ((blue / 255.0 - mean_b) / std_b).to(dtype), mask=in_range)


def _axis(in_size: int, out_size: int, antialias: bool) -> tuple[float, float, float, int]:
    """(scale, support, invscale, taps) of one axis, as torch computes them for bilinear."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = 2 * math.ceil(support) + 1 if antialias else 2
    return scale, support, invscale, taps


def frame_preprocess(
    frames: torch.Tensor,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    center_crop: bool = True,
    antialias: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Same contract as ``reference.frame_preprocess``; runs on the frames' device (or the interpreter)."""
    check_frames(frames, size)
    batch, height, width, _ = frames.shape
    top, left, crop_h, crop_w = crop_box(height, width, center_crop)
    scale_y, support_y, invscale_y, taps_y = _axis(crop_h, size, antialias)
    scale_x, support_x, invscale_x, taps_x = _axis(crop_w, size, antialias)
    out = torch.empty(batch, 3, size, size, dtype=dtype, device=frames.device)
    if batch == 0:
        return out
    block = _block()
    grid = (triton.cdiv(size * size, block), batch)
    _frame_kernel[grid](
        frames,
        out,
        crop_h,
        crop_w,
        top,
        left,
        *frames.stride()[:3],
        frames.stride(3),
        size,
        *out.stride(),
        scale_y,
        scale_x,
        support_y,
        support_x,
        invscale_y,
        invscale_x,
        *(float(m) for m in mean),
        *(float(s) for s in std),
        ANTIALIAS=antialias,
        TAPS_Y=taps_y,
        TAPS_X=taps_x,
        BLOCK=block,
    )
    return out
