"""Frame encoders: RGB frames in, L2-normalised features and class probabilities out.

``FrameEncoder`` is the interface any encoder implements (a CLIP/SigLIP or VLM vision tower from
a local path can replace the default). The default is EfficientNet-Lite0 with its packaged
ImageNet-1k weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Protocol

import numpy as np
import torch

from omnistream.kernels import ops


@dataclass(frozen=True)
class ClassName:
    name: str
    category: str

    def label(self) -> str:
        """'monarch (butterfly)': a plain category helps a small LLM read the label."""
        if self.category and self.category.lower() not in self.name.lower():
            return f"{self.name} ({self.category})"
        return self.name


def imagenet_classes() -> list[ClassName]:
    text = resources.files("omnistream.perception").joinpath("data/imagenet_labels.tsv").read_text()
    rows = [line.split("\t") for line in text.splitlines() if line]
    return [ClassName(name=row[2], category=row[3]) for row in rows]


class FrameEncoder(Protocol):
    feature_dim: int
    classes: list[ClassName]

    def encode(self, frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (H, W, 3) RGB frames -> (features float32 (B, D) L2-normalised, probs float32 (B, C))."""
        ...


class EfficientNetLiteEncoder:
    """EfficientNet-Lite0: 224x224 centre crop, RGB scaled to [-1, 1] (mean = std = 0.5)."""

    input_size = 224

    def __init__(self, threads: int = 1):
        from omnistream.perception.efficientnet_lite import load_efficientnet_lite0

        torch.set_num_threads(threads)
        self.model = load_efficientnet_lite0()
        self.feature_dim = self.model.feature_dim
        self.classes = imagenet_classes()

    @torch.inference_mode()
    def encode(self, frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        batch = torch.from_numpy(np.stack(frames))
        pixels = ops.frame_preprocess(batch, self.input_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        features, logits = self.model(pixels)
        features = torch.nn.functional.normalize(features, dim=-1)
        return features.numpy().astype(np.float32), logits.softmax(-1).numpy().astype(np.float32)


def load_encoder(name: str, threads: int = 1) -> FrameEncoder:
    if name == "efficientnet-lite0":
        return EfficientNetLiteEncoder(threads=threads)
    raise ValueError(f"unknown frame encoder {name!r} (available: efficientnet-lite0)")
