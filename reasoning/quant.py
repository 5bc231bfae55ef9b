"""Weight formats for the CPU: int8 linear layers (per output channel, symmetric), and the
converted weights cached as safetensors so a later start loads in seconds instead of quantizing
again.

Why int8: decoding one token reads every weight once, so on a laptop CPU it is bound by memory
bandwidth; int8 weights are a quarter of float32. Activations are quantized per call and the
output is float32. The layers run on our own AVX2 kernel (``reasoning/native``: one activation
scale per token, weights read once per call) where it builds, else on fbgemm's dynamic
quantization (one activation scale per call, with ``reduce_range``). Weights are 7-bit so that
AVX2's 16-bit pair sums cannot saturate in either.
The embedding table stays a lookup in bfloat16 (half the RAM, exact rows), and the tied output
projection gets its own int8 copy: with a 150k vocabulary it is the largest matrix of the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omnistream.reasoning import native

log = logging.getLogger("omnistream.reasoning.quant")

FORMAT_VERSION = 2


WEIGHT_MAX = 63  # 7-bit weights: with 8-bit activations, AVX2's u8 x s8 pair sums cannot saturate int16
BUCKET_RATIO = 2.0  # rows whose magnitudes differ by more than this are quantized separately


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with W int8 per output channel (7-bit, |w| <= WEIGHT_MAX).

    Where the native AVX2 kernel builds (``reasoning/native``), it runs the layer from the raw
    int8 weight: every activation row (token) is quantized with its own scale and the weight is
    read once per call, whatever the number of rows; no fbgemm packed copy is made.

    Otherwise (no compiler, no AVX2, or ``OMNISTREAM_NATIVE=0``) fbgemm's dynamic linear runs it.
    fbgemm quantizes the activation with one scale per call. One token with huge activations
    (the attention-sink token has them) would crush every other row of a prefill to a few
    levels, so rows are grouped by magnitude (powers of two) and each group is its own call:
    one call when decoding, a handful when prefilling.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(
                f"Int8Linear needs a 2-D int8 weight, got {qweight.dtype} {tuple(qweight.shape)}"
            )
        if scales.shape != (qweight.shape[0],):
            raise ValueError(f"Int8Linear needs one scale per output row, got {tuple(scales.shape)}")
        self.out_features, self.in_features = qweight.shape
        self.has_bias = bias is not None
        self._packed = self._native = None
        if native.available():
            self._native = native.PreparedWeight(qweight, scales, bias)
            return
        with warnings.catch_warnings():  # quantized tensor types are deprecated, fbgemm's packing is not
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch._make_per_channel_quantized_tensor(
                qweight, scales.double(), torch.zeros(len(scales), dtype=torch.long), 0
            )
        self._packed = torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.float())

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
        if self._native is not None:
            return self._native.weight, self._native.scale, self._native.bias
        weight, bias = torch.ops.quantized.linear_unpack(self._packed)
        return weight.int_repr(), weight.q_per_channel_scales().float(), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native is not None:
            return self._native.linear(x)
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        if rows.shape[0] == 1:
            y = torch.ops.quantized.linear_dynamic(rows, self._packed, False)
            return y.reshape(*shape[:-1], self.out_features)
        magnitude = rows.abs().amax(dim=1).clamp(min=1e-30)
        if magnitude.max() <= BUCKET_RATIO * magnitude.min():
            return torch.ops.quantized.linear_dynamic(rows, self._packed, False).reshape(
                *shape[:-1], self.out_features
            )
        bucket = torch.floor(torch.log2(magnitude) / math.log2(BUCKET_RATIO))
        y = rows.new_empty((rows.shape[0], self.out_features))
        for value in torch.unique(bucket):
            index = torch.nonzero(bucket == value).squeeze(1)
            y.index_copy_(
                0, index, torch.ops.quantized.linear_dynamic(rows.index_select(0, index), self._packed, False)
            )
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"


class BF16Embedding(nn.Module):
    """A token embedding stored in bfloat16, returned in float32 (rows are exact copies)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight).float()


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear (the output projection included) by Int8Linear and the input
    embedding by a bfloat16 table, in place. The model must be float32."""
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    for name in _linear_names(model):
        _set_module(model, name, Int8Linear.from_linear(model.get_submodule(name)))
    model.set_input_embeddings(BF16Embedding(model.get_input_embeddings().weight.data))
    return model


def save_int8(model: nn.Module, out_dir: Path, source_dir: Path) -> None:
    """Write a quantized model as ``int8.safetensors`` (+ config/tokenizer files from ``source_dir``)."""
    tensors: dict[str, torch.Tensor] = {}
    linears = []
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            qweight, scales, bias = module.unpacked()
            tensors[f"{name}.qweight"] = qweight.contiguous()
            tensors[f"{name}.scales"] = scales.contiguous()
            if bias is not None:
                tensors[f"{name}.bias"] = bias.contiguous()
            linears.append(name)
    for name, tensor in model.state_dict().items():
        if "_packed" not in name:
            tensors[name] = tensor.contiguous()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in source_dir.iterdir():
        if (
            path.is_file()
            and not path.name.endswith(".safetensors")
            and path.name != "model.safetensors.index.json"
        ):
            shutil.copy2(path, tmp / path.name)
    save_file(tensors, str(tmp / "int8.safetensors"))
    meta = {"version": FORMAT_VERSION, "source": source_fingerprint(source_dir), "linears": linears}
    (tmp / "int8.json").write_text(json.dumps(meta))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def load_int8(model_dir: Path) -> nn.Module:
    """A model with Int8Linear layers from ``save_int8``'s files, without touching float weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = json.loads((model_dir / "int8.json").read_text())
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{model_dir}: int8 cache version {meta.get('version')}, expected {FORMAT_VERSION}")
    config = AutoConfig.from_pretrained(str(model_dir))
    config.tie_word_embeddings = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    tensors = load_file(str(model_dir / "int8.safetensors"))
    for name in meta["linears"]:
        module = Int8Linear(
            tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.scales"), tensors.pop(f"{name}.bias", None)
        )
        _set_module(model, name, module)
    embedding = tensors.pop("model.embed_tokens.weight")
    model.set_input_embeddings(BF16Embedding(embedding))
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [name for name in missing if name != "model.embed_tokens.weight"]
    if unexpected or missing:
        raise ValueError(
            f"{model_dir}: int8 cache does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    # Non-persistent buffers (RoPE inverse frequencies) were created on the meta device: build
    # those modules again on the CPU from the config.
    for name, module in list(model.named_modules()):
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            _set_module(model, name, type(module)(config))
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"{model_dir}: int8 cache left tensors unset: {leftover[:3]}")
    return model.eval()


def source_fingerprint(float_dir: Path) -> str:
    """What identifies the weights in ``float_dir`` without reading gigabytes: the config, and for
    each weight file its name, size and first and last MiB (a safetensors file starts with its
    tensor table; different weights of the same shapes differ in their data)."""
    digest = hashlib.sha256()
    config = float_dir / "config.json"
    digest.update(config.read_bytes() if config.exists() else b"")
    for path in sorted(float_dir.iterdir()):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with path.open("rb") as f:
                digest.update(f.read(1 << 20))
                f.seek(max(size - (1 << 20), 0))
                digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def prepare_int8(float_dir: Path, out_dir: Path) -> Path:
    """The int8 cache of the model in ``float_dir`` (built once, a few seconds to a minute); a
    cache made by another format version or from other weights is built again."""
    marker = out_dir / "int8.json"
    source = source_fingerprint(float_dir)
    if marker.exists():
        meta = json.loads(marker.read_text())
        if meta.get("version") == FORMAT_VERSION and meta.get("source") == source:
            return out_dir
        log.info("int8 cache is stale, rebuilding", extra={"cache": str(out_dir), "source": source})
    from transformers import AutoModelForCausalLM

    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32).eval()
    quantize_model(model)
    save_int8(model, out_dir, float_dir)
    log.info("quantized", extra={"model": str(float_dir.name), "seconds": round(time.monotonic() - start, 1)})
    return out_dir
