"""The "int8" weight format: linear layers as int8 rows (per output channel, symmetric, 7-bit),
the embedding as int8 rows, and the cache file they are loaded from.

Why int8: decoding one token reads every weight once, so on a laptop CPU it is bound by memory
bandwidth; int8 weights are a quarter of float32. Activations are quantized per call and the
output is float32. The layers run on the native AVX2 kernel (kernels/cpu: one activation scale
per token, weights read once per call). Weights are 7-bit so that AVX2's 16-bit pair sums
cannot saturate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from omnistream.kernels import cpu as native

FORMAT_VERSION = 3  # 3: written from the safetensors by ``write_cache``, named by the source's fingerprint


WEIGHT_MAX = 63  # 7-bit weights: with 8-bit activations, AVX2's u8 x s8 pair sums cannot saturate int16


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with W int8 per output channel (7-bit, |w| <= WEIGHT_MAX), on the
    native AVX2 kernel (``kernels/cpu``): every activation row (token) is quantized with its own
    scale and the weight is read once per call, whatever the number of rows. Where the kernel
    does not build (no compiler, no AVX2, ``OMNISTREAM_NATIVE=0``) the int8 format is not offered
    ("auto" runs float32 there): fbgemm's dynamic int8 layers decoded the 1.5B at 0.46 tokens/s on
    2 busy cores, 4x slower than float32 (BENCHMARKS.md)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(
                f"Int8Linear needs a 2-D int8 weight, got {qweight.dtype} {tuple(qweight.shape)}"
            )
        if scales.shape != (qweight.shape[0],):
            raise ValueError(f"Int8Linear needs one scale per output row, got {tuple(scales.shape)}")
        if not native.available():
            raise RuntimeError(
                "the int8 format needs the native CPU kernels (kernels/cpu: gcc and an AVX2/FMA/F16C "
                "CPU; OMNISTREAM_NATIVE not 0); use reasoning.dtype = auto or float32"
            )
        self.out_features, self.in_features = qweight.shape
        self.has_bias = bias is not None
        self._native = native.PreparedWeight(qweight, scales, bias)

    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 weight, float32 scale per row): symmetric, absmax of each row maps to WEIGHT_MAX."""
        w = weight.float()
        scales = (w.abs().amax(dim=1) / WEIGHT_MAX).clamp(min=1e-12)
        q = torch.round(w / scales[:, None]).clamp(-WEIGHT_MAX, WEIGHT_MAX).to(torch.int8)
        return q, scales

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scales = cls.quantize(linear.weight.data)
        return cls(q, scales, None if linear.bias is None else linear.bias.data)

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(int8 weight, scales, bias) as stored."""
        return self._native.weight, self._native.scale, self._native.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._native.linear(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"


class Int8Embedding(nn.Module):
    """A token embedding as int8 rows with one float scale per row (absmax / 127), returned in
    float32: a quarter of float32's RAM and half of bfloat16's (136 MB less for the 0.5B, 233 MB
    for the 1.5B). A row is read once per token, so the table's size is all that matters."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        qweight = torch.empty(weight.shape, dtype=torch.int8)
        scales = torch.empty(weight.shape[0])
        for start in range(0, weight.shape[0], 8192):  # in slices: no float32 copy of the whole table
            rows = weight[start : start + 8192].float()
            scale = (rows.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
            qweight[start : start + 8192] = torch.round(rows / scale[:, None]).to(torch.int8)
            scales[start : start + 8192] = scale
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scales[ids].unsqueeze(-1)


def write_cache(float_dir: Path, out_dir: Path, source: str) -> None:
    """Quantize the transformers-format safetensors in ``float_dir`` into ``out_dir``:
    ``int8.safetensors`` (per linear layer ``<name>.qweight``/``.scales``/``.bias``, the norms in
    float32, the embedding in bfloat16; a tied output projection gets its own int8 copy: with a
    150k vocabulary it is the largest matrix of the model), ``int8.json`` and the config and
    tokenizer files. One layer at a time, so the float model is never whole in RAM twice."""
    from omnistream.reasoning.llm.load import float_tensors
    from omnistream.reasoning.llm.model import LINEARS, load_config

    config = load_config(float_dir)
    weights = float_tensors(float_dir)
    names = [
        f"model.layers.{i}.{kind}.{n}"
        for i in range(config.num_hidden_layers)
        for kind, n in (*(("self_attn", n) for n in LINEARS[:4]), *(("mlp", n) for n in LINEARS[4:]))
    ] + ["lm_head"]
    embedding = weights["model.embed_tokens.weight"]
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": embedding.to(torch.bfloat16).contiguous()
    }
    for name in names:
        weight = weights.pop(f"{name}.weight", None)
        if weight is None and name == "lm_head":
            weight = embedding  # tied
        if weight is None:
            raise ValueError(f"{float_dir}: no weight {name}.weight")
        tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = Int8Linear.quantize(weight)
        bias = weights.pop(f"{name}.bias", None)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.float().contiguous()
    for name, tensor in weights.items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            tensors[name] = tensor.float().contiguous()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in float_dir.iterdir():
        if (
            path.is_file()
            and not path.name.endswith(".safetensors")
            and path.name != "model.safetensors.index.json"
        ):
            shutil.copy2(path, tmp / path.name)
    save_file(tensors, str(tmp / "int8.safetensors"))
    meta = {"version": FORMAT_VERSION, "source": source, "linears": names}
    (tmp / "int8.json").write_text(json.dumps(meta))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
