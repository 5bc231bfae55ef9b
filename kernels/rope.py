"""Rotary position embedding (RoPE) parameters of a model, as the kernels need them.

Qwen2/Llama use the rotate_half convention: the first and second halves of head_dim form the
(x1, x2) pairs rotated by ``angle = position * inv_freq[i]``. Rotations compose additively, so a
key cached at position p moves to q by rotating it by ``q - p``; a key stored without rotation
(position-free) is rotated by q. Linear scaling divides positions by ``factor``, which is the
same as dividing ``inv_freq`` (what transformers does), so every kernel only needs ``inv_freq``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rope:
    """RoPE of one model: ``head_dim`` (even), base ``theta``, scaling ``"default"`` or ``"linear"``."""

    head_dim: int
    theta: float = 10000.0
    scaling: str = "default"
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.scaling not in ("default", "linear"):
            raise ValueError(f"unsupported rope scaling {self.scaling!r} (supported: default, linear)")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")

    def inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 (head_dim // 2,) radians per position, computed exactly as transformers does."""
        exponents = (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(dtype=torch.float32) / self.head_dim
        )
        inv_freq = 1.0 / (self.theta**exponents)
        if self.scaling == "linear":
            inv_freq /= self.factor
        return inv_freq.to(device)

    @classmethod
    def from_hf_config(cls, config) -> Rope:
        """From a transformers ``PretrainedConfig`` (``rope_parameters`` in 5.x, ``rope_theta`` before)."""
        params = dict(getattr(config, "rope_parameters", None) or {})
        legacy = getattr(config, "rope_scaling", None) or {}
        kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        factor = float(params.get("factor", legacy.get("factor", 1.0))) if kind == "linear" else 1.0
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(head_dim=head_dim, theta=float(theta), scaling=kind, factor=factor)
