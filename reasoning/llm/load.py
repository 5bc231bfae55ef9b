"""Loading a Qwen2 (``llm.model``) from its weights: transformers-format safetensors in a float
dtype, the int8 cache (``llm.formats.prepare_int8``), or a GGUF's quantized blocks as they are,
with the map from transformers' tensor names to the GGUF's. Each loader wires the same modules
(``build``); only the linear layers and the embedding differ per format.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from omnistream.kernels.cpu.kquant import KQuantEmbedding, KQuantLinear, QTensor
from omnistream.reasoning.llm.gguf import read_gguf
from omnistream.reasoning.llm.int8 import FORMAT_VERSION, Int8Embedding, Int8Linear
from omnistream.reasoning.llm.model import Qwen2, load_config


def float_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    files = [f for f in files if f.name != "int8.safetensors"]
    if not files:
        raise FileNotFoundError(f"{model_dir}: no safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_file(str(path)))
    return tensors


def _joined_bias(biases: list[torch.Tensor | None], rows: list[int]) -> torch.Tensor | None:
    """The biases of row-concatenated layers (zeros for a part without one), or None if none has one."""
    present = [b for b in biases if b is not None]
    if not present:
        return None
    like = present[0]
    return torch.cat([b if b is not None else like.new_zeros(n) for b, n in zip(biases, rows, strict=True)])


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def build(
    config: SimpleNamespace,
    tensors: dict[str, torch.Tensor],
    make_linear: Callable[[list[str]], nn.Module],
    embedding: nn.Module,
) -> Qwen2:
    """Wire a model: ``make_linear(names)`` returns one module computing the named linear layers
    (transformers' names) with their output rows concatenated; norms come from ``tensors``."""
    model = Qwen2(config)
    model.model.embed_tokens = embedding
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        layer.self_attn.qkv_proj = make_linear([f"{p}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")])
        layer.self_attn.o_proj = make_linear([f"{p}.self_attn.o_proj"])
        layer.mlp.gate_up_proj = make_linear([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"])
        layer.mlp.down_proj = make_linear([f"{p}.mlp.down_proj"])
        layer.input_layernorm.weight.data = tensors[f"{p}.input_layernorm.weight"].float()
        layer.post_attention_layernorm.weight.data = tensors[f"{p}.post_attention_layernorm.weight"].float()
    model.model.norm.weight.data = tensors["model.norm.weight"].float()
    model.lm_head = make_linear(["lm_head"])
    return model.eval()


def from_float_dir(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Qwen2:
    """The model from transformers-format safetensors, weights in ``dtype`` on ``device``."""
    config = load_config(model_dir)
    # Copies (copy=True), so no tensor keeps the safetensors file's mapping alive (see from_int8_dir).
    tensors = {
        name: t.to(device=device, dtype=dtype, copy=True) for name, t in float_tensors(model_dir).items()
    }
    if "lm_head.weight" not in tensors:  # tied output projection
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]

    def make_linear(names: list[str]) -> nn.Module:
        weights = [tensors[f"{n}.weight"] for n in names]
        bias = _joined_bias([tensors.get(f"{n}.bias") for n in names], [w.shape[0] for w in weights])
        return _linear(torch.cat(weights) if len(weights) > 1 else weights[0], bias)

    embedding = nn.Embedding.from_pretrained(tensors["model.embed_tokens.weight"], freeze=True)
    model = build(config, tensors, make_linear, embedding)
    model.model.rotary.to(device)  # inv_freq beside the weights (on a GPU: no host copy per forward)
    return model


def from_int8_dir(model_dir: Path) -> Qwen2:
    """The model from the int8 cache ``llm.int8.write_cache`` writes (int8.safetensors + int8.json)."""
    from safetensors.torch import load_file

    meta = json.loads((Path(model_dir) / "int8.json").read_text())
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{model_dir}: int8 cache version {meta.get('version')}, expected {FORMAT_VERSION}")
    config = load_config(model_dir)
    # load_file's tensors are views of one mapping of the whole file, which lives as long as any
    # of them: fusing q/k/v and gate/up copies those, and a kept view of any other tensor would
    # hold every page the copies read resident as well (+30% RSS). So everything is copied.
    tensors = {name: t.clone() for name, t in load_file(str(Path(model_dir) / "int8.safetensors")).items()}
    missing = [n for n in meta["linears"] if f"{n}.qweight" not in tensors]
    if missing:
        raise ValueError(f"{model_dir}: int8 cache lacks {missing[:3]}")

    def make_linear(names: list[str]) -> nn.Module:
        weights = [tensors.pop(f"{n}.qweight") for n in names]
        scales = torch.cat([tensors.pop(f"{n}.scales") for n in names])
        biases = [tensors.pop(f"{n}.bias", None) for n in names]
        return Int8Linear(torch.cat(weights), scales, _joined_bias(biases, [w.shape[0] for w in weights]))

    return build(config, tensors, make_linear, Int8Embedding(tensors.pop("model.embed_tokens.weight")))


# -- GGUF blocks as they are (kernels/cpu/kquant.py) -----------------------------------------------

GGUF_LINEARS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_tensor_name(name: str) -> str:
    """transformers' name of a linear layer (``model.layers.3.mlp.up_proj``, ``lm_head``) -> the
    GGUF's (``blk.3.ffn_up``, ``output``). llama.cpp's converter does not permute Qwen2's q/k rows
    (only LLaMA's), so GGUF rows are transformers' rows."""
    if name == "lm_head":
        return "output"
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{GGUF_LINEARS[rest]}"


def config_from_gguf(meta: dict, vocab_size: int, tied: bool) -> SimpleNamespace:
    """The fields load_config gives, from a qwen2 GGUF's metadata."""
    arch = meta.get("general.architecture")
    if arch != "qwen2":
        raise ValueError(f"GGUF architecture {arch!r}, expected 'qwen2'")
    heads = int(meta["qwen2.attention.head_count"])
    hidden = int(meta["qwen2.embedding_length"])
    theta = float(meta.get("qwen2.rope.freq_base", 10000.0))
    return SimpleNamespace(
        model_type="qwen2",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(meta["qwen2.feed_forward_length"]),
        num_hidden_layers=int(meta["qwen2.block_count"]),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("qwen2.attention.head_count_kv", heads)),
        head_dim=hidden // heads,
        rms_norm_eps=float(meta.get("qwen2.attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(meta.get("qwen2.context_length", 32768)),
        rope_theta=theta,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=tied,
    )


def from_gguf(gguf_path: Path, model_dir: Path | None = None) -> Qwen2:
    """The model running the GGUF's quantized blocks as they are (Q4_K, Q6_K, Q8_0, Q5_0, on the
    native kernel: ``kernels/cpu/kquant.py``), activations in float32. The configuration
    comes from ``model_dir``'s config.json when given (the converted directory, which also holds
    the tokenizer), else from the GGUF's metadata."""
    tensors, meta = read_gguf(Path(gguf_path))
    embedding = tensors["token_embd.weight"]
    if not isinstance(embedding, QTensor):
        raise ValueError(f"{gguf_path}: token_embd is not a quantized tensor")
    tied = "output.weight" not in tensors
    config = load_config(model_dir) if model_dir else config_from_gguf(meta, embedding.rows, tied)
    if tied:  # the output projection is the embedding's blocks (one copy in RAM)
        tensors["output.weight"] = embedding
    norms = {"model.norm.weight": tensors.pop("output_norm.weight")}
    for i in range(config.num_hidden_layers):
        norms[f"model.layers.{i}.input_layernorm.weight"] = tensors.pop(f"blk.{i}.attn_norm.weight")
        norms[f"model.layers.{i}.post_attention_layernorm.weight"] = tensors.pop(f"blk.{i}.ffn_norm.weight")

    def make_linear(names: list[str]) -> nn.Module:
        parts: list[QTensor] = []
        biases: list[torch.Tensor | None] = []
        rows: list[int] = []
        for name in names:
            base = gguf_tensor_name(name)
            weight = tensors.pop(f"{base}.weight")
            if not isinstance(weight, QTensor):
                raise ValueError(f"{gguf_path}: {base}.weight is not in a supported quantized type")
            bias = tensors.pop(f"{base}.bias", None)
            biases.append(None if bias is None else bias.reshape(-1))
            rows.append(weight.rows)
            if parts and parts[-1].qtype == weight.qtype:  # adjacent rows of one type: one call
                last = parts.pop()
                data = torch.cat([last.data, weight.data])
                weight = QTensor(weight.qtype, last.rows + weight.rows, weight.cols, data)
            parts.append(weight)
        return KQuantLinear(parts, _joined_bias(biases, rows))

    model = build(config, norms, make_linear, KQuantEmbedding(embedding))
    tensors.clear()
    return model
