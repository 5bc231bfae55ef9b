"""Torch reference implementations (float32) of the ops the Triton kernels accelerate.

Each function documents its shapes; the Triton path (when present) must match these within
tolerance. Callers go through ``omnistream.kernels.ops``, never here directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def frame_preprocess(
    frames: torch.Tensor,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    center_crop: bool = True,
    antialias: bool = True,
) -> torch.Tensor:
    """uint8 frames (B, H, W, 3) RGB -> float32 (B, 3, size, size), normalised.

    With ``center_crop`` the largest centred square is taken before resizing (square subjects are
    recognised far better than when the whole frame is squashed); bilinear resize.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3) frames, got {frames.dtype} {tuple(frames.shape)}")
    _, height, width, _ = frames.shape
    if center_crop:
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        frames = frames[:, top : top + side, left : left + side]
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
