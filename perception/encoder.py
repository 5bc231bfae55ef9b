"""Frame encoders: RGB frames in, L2-normalised features and class probabilities out.

``FrameEncoder`` is the interface any encoder implements. The default is EfficientNet-Lite0
with its packaged ImageNet-1k weights; ``VisionTowerEncoder`` loads a CLIP/SigLIP model (or a
bare vision tower) from a local directory, for example on a GPU. Both batch: ``encode`` takes a
list of frames and runs them as one batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
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


def stack_frames(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) frames of one shape -> uint8 (B, H, W, 3) tensor."""
    shapes = {frame.shape for frame in frames}
    if len(shapes) != 1:
        raise ValueError(f"frames of one batch must share one shape, got {sorted(shapes)}")
    return torch.from_numpy(np.stack(frames))


class EfficientNetLiteEncoder:
    """EfficientNet-Lite0: 224x224 centre crop, RGB scaled to [-1, 1] (mean = std = 0.5)."""

    input_size = 224

    def __init__(self, threads: int = 1, device: str = "cpu"):
        from omnistream.perception.efficientnet_lite import load_efficientnet_lite0

        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = load_efficientnet_lite0().to(self.device)
        self.feature_dim = self.model.feature_dim
        self.classes = imagenet_classes()

    @torch.inference_mode()
    def encode(self, frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        batch = stack_frames(frames).to(self.device)
        pixels = ops.frame_preprocess(batch, self.input_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        features, logits = self.model(pixels)
        features = torch.nn.functional.normalize(features, dim=-1)
        probs = logits.softmax(-1)
        return features.float().cpu().numpy(), probs.float().cpu().numpy()


# CLIP's preprocessing constants, used when the model directory has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionTowerEncoder:
    """A transformers vision model from a local directory: CLIP/SigLIP (image features through
    ``get_image_features``) or a bare vision tower (``CLIPVisionModel``, ``SiglipVisionModel``:
    pooled output). Centre crop to the model's ``image_size``, mean/std from the directory's
    preprocessor config. It has no class names, so percepts carry features and no labels.
    """

    def __init__(self, path: str | Path, threads: int = 1, device: str = "cpu"):
        from transformers import AutoConfig, AutoModel

        path = Path(path).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"frame encoder directory {path} has no config.json")
        torch.set_num_threads(threads)
        config = AutoConfig.from_pretrained(path)
        vision = getattr(config, "vision_config", config)
        self.input_size = int(vision.image_size)
        preprocessor = path / "preprocessor_config.json"
        settings = json.loads(preprocessor.read_text()) if preprocessor.exists() else {}
        self.mean = tuple(settings.get("image_mean", CLIP_MEAN))
        self.std = tuple(settings.get("image_std", CLIP_STD))
        self.device = torch.device(device)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.feature_dim = int(getattr(config, "projection_dim", 0) or vision.hidden_size)
        self.classes: list[ClassName] = []

    @torch.inference_mode()
    def encode(self, frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        batch = stack_frames(frames).to(self.device)
        pixels = ops.frame_preprocess(batch, self.input_size, self.mean, self.std)
        pixels = pixels.to(next(self.model.parameters()).dtype)
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=pixels)
        else:
            out = self.model(pixel_values=pixels)
        # transformers 5 returns a model output whose pooler_output holds the (projected) features.
        features = out if isinstance(out, torch.Tensor) else out.pooler_output
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy(), np.zeros((len(frames), 0), np.float32)


def load_encoder(name: str, threads: int = 1, device: str = "cpu") -> FrameEncoder:
    """``name``: "efficientnet-lite0" or a local model directory (CLIP/SigLIP or vision tower)."""
    if name == "efficientnet-lite0":
        return EfficientNetLiteEncoder(threads=threads, device=device)
    if Path(name).expanduser().is_dir():
        return VisionTowerEncoder(name, threads=threads, device=device)
    raise ValueError(
        f"unknown frame encoder {name!r} (available: efficientnet-lite0, or a local model directory)"
    )
