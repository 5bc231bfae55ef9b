"""Qwen2 for inference: the model definition the engine runs, and its torch forward.

Why not transformers' Qwen2ForCausalLM: importing its modelling code pulls in torch.distributed's
tensor stack, sympy and scipy (about 200 MB of resident memory in a process with a RAM budget),
and every forward call builds attention masks and output objects the reasoner does not need; a
decoded token is 24-28 layers of small operations, where that per-call Python work shows.

Same maths as transformers' (tests/unit/test_qwen2.py compares logits and caches with it):
RMSNorm, attention with q/k/v biases, rotate-half RoPE at the given positions (``inv_freq`` from
``kernels.rope.Rope``, the one RoPE definition), grouped-query SDPA (causal over the new tokens,
everything cached before them visible), SiLU-gated MLP. The q/k/v projections run as one matrix
and gate/up as another (rows concatenated: exact for float weights and for int8 weights quantized
per row); ``on_query`` callbacks still see each layer's q projection (the question's queries for
KV-block retrieval).

Two forwards: ``Qwen2.forward``'s torch layers (any device: the GPU's prefill, and the reference
the tests compare with) and, for one sequence in float32 on a CPU where the native kernels build,
``llm.cpu.forward`` (kernels/cpu). One-token decode steps on a CUDA GPU replay a CUDA graph
(``llm.cuda_graphs``). Weights are attached by ``llm.load``.

Module names follow transformers' (``model.layers.3.self_attn``, ``lm_head``), and the cache is
anything with ``update(keys, values, layer)`` and ``get_seq_length()`` (``BufferedCache``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from omnistream.kernels.rope import Rope
from omnistream.reasoning.llm import cpu

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_qwen2(model_dir: Path) -> bool:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("model_type") == "qwen2"


def load_config(model_dir: Path) -> SimpleNamespace:
    """config.json as attributes, with the fields the reasoner reads filled in."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    if raw.get("model_type") != "qwen2":
        raise ValueError(f"{model_dir}: model_type {raw.get('model_type')!r}, expected 'qwen2'")
    config = SimpleNamespace(**raw)
    config.head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    config.num_key_value_heads = raw.get("num_key_value_heads", raw["num_attention_heads"])
    config.rms_norm_eps = raw.get("rms_norm_eps", 1e-6)
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ValueError(f"{model_dir}: RoPE type {rope_type!r} is not supported (default or linear)")
    params["rope_type"] = rope_type
    config.rope_parameters = params
    config.rope_theta = params["rope_theta"]
    config.tie_word_embeddings = raw.get("tie_word_embeddings", False)
    return config


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dtype) * x.to(
            dtype
        )  # in the activations' dtype (bf16 on a GPU), as transformers


class Rotary(nn.Module):
    """cos/sin of RoPE for given positions (rotate-half layout), default or linear scaling."""

    def __init__(self, config: SimpleNamespace):
        super().__init__()
        self.register_buffer("inv_freq", Rope.from_hf_config(config).inv_freq(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: SimpleNamespace, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj: nn.Module = nn.Identity()  # set by the loader: q, k, v rows concatenated
        self.o_proj: nn.Module = nn.Identity()
        self.on_query: list[Callable[[torch.Tensor], None]] = []

    def forward(self, x: torch.Tensor, cos, sin, cache, mask: torch.Tensor | bool | None) -> torch.Tensor:
        """``mask``: a boolean (n, past + n) mask, True for causal attention over the new tokens
        alone (nothing cached before them: SDPA's ``is_causal``, which lets a GPU run its fused
        flash kernels instead of reading a mask), or None (one token: everything visible)."""
        batch, n, _ = x.shape
        q, k, v = self.qkv_proj(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        for callback in self.on_query:
            callback(q)
        q = q.view(batch, n, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        causal = mask is True
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if causal else mask,
            enable_gqa=self.heads != self.kv_heads,
            is_causal=causal,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, n, self.q_size))


def causal_mask(n: int, past: int, device) -> torch.Tensor:
    """(n, past + n) booleans: new token i sees the ``past`` cached tokens and new ones up to i."""
    return torch.ones(n, past + n, dtype=torch.bool, device=device).tril(diagonal=past)


class MLP(nn.Module):
    def __init__(self, config: SimpleNamespace):
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up_proj: nn.Module = nn.Identity()  # set by the loader: gate, up rows concatenated
        self.down_proj: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: SimpleNamespace, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos, sin, cache, mask) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, config: SimpleNamespace):
        super().__init__()
        self.embed_tokens: nn.Module = nn.Identity()  # set by the loader
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)


@dataclass
class Output:
    logits: torch.Tensor
    past_key_values: object = None


class Qwen2(nn.Module):
    """Qwen2 causal LM for inference: ``model(input_ids=, cache=, position_ids=, logits_to_keep=)``."""

    native_ops = True  # False: always the torch layers (tests compare the two forwards)

    def __init__(self, config: SimpleNamespace):
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head: nn.Module = nn.Identity()  # set by the loader

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache=None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        use_cache: bool = True,  # noqa: ARG002 - transformers' keyword, accepted for the same calls
        past_key_values=None,
    ) -> Output:
        cache = cache if cache is not None else past_key_values
        n = input_ids.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=input_ids.device)[None]
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary(position_ids[0], x.dtype)
        if x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[0] == 1 and cpu.usable(self):
            x = cpu.forward(self, x[0], cos, sin, cache, min(logits_to_keep, n) if logits_to_keep else n)
            return Output(logits=self.lm_head(x[None]), past_key_values=cache)
        # New token i sees everything cached and the new tokens up to itself: with nothing cached
        # that is plain causal attention (SDPA's is_causal, no mask tensor).
        mask: torch.Tensor | bool | None = None
        if n > 1:
            mask = True if past == 0 else causal_mask(n, past, x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, mask)
        x = self.model.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return Output(logits=self.lm_head(x), past_key_values=cache)
