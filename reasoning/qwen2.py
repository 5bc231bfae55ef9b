"""Qwen2 for inference, written for the reasoner: the model the engine runs on its fast path.

Why not transformers' Qwen2ForCausalLM: importing its modelling code pulls in torch.distributed's
tensor stack, sympy and scipy (about 200 MB of resident memory in a process with a RAM budget),
and every forward call builds attention masks and output objects the reasoner does not need; a
decoded token is 24-28 layers of small operations, where that per-call Python work shows.

Same maths as transformers' (tests/unit/test_qwen2.py compares logits and caches with it):
RMSNorm, attention with q/k/v biases, rotate-half RoPE at the given positions, grouped-query
SDPA (causal over the new tokens, everything cached before them visible), SiLU-gated MLP. The
q/k/v projections run as one matrix and gate/up as another (rows concatenated: exact for float
weights and for int8 weights quantized per row); ``on_query`` callbacks still see each layer's
q projection (the question's queries for KV-block retrieval).

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
        return self.weight.to(dtype) * x.to(dtype)  # in the activations' dtype (bf16 on a GPU), as transformers


class Rotary(nn.Module):
    """cos/sin of RoPE for given positions (rotate-half layout), default or linear scaling."""

    def __init__(self, config: SimpleNamespace):
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if config.rope_parameters["rope_type"] == "linear":
            inv_freq = inv_freq / float(config.rope_parameters["factor"])
        self.register_buffer("inv_freq", inv_freq, persistent=False)

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

    def forward(self, x: torch.Tensor, cos, sin, cache, mask: torch.Tensor | None) -> torch.Tensor:
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
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.heads != self.kv_heads, is_causal=False
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, n, self.q_size))


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

    native_ops = True  # False: always the torch layers (tests compare the two paths)

    def uses_native_ops(self) -> bool:
        """Whether float32 CPU forwards run on the fused native ops (``_forward_native``)."""
        from omnistream.reasoning.native import ops

        return self.native_ops and ops.usable() and ops.attention_supported(self.config.head_dim)

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
        if x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[0] == 1 and self.uses_native_ops():
            x = _forward_native(self, x[0], cos, sin, cache, min(logits_to_keep, n) if logits_to_keep else n)
            return Output(logits=self.lm_head(x[None]), past_key_values=cache)
        # New token i sees everything cached and the new tokens up to itself.
        mask = None
        if n > 1:
            mask = torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(diagonal=past)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, mask)
        x = self.model.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return Output(logits=self.lm_head(x), past_key_values=cache)


def _forward_native(model: Qwen2, x: torch.Tensor, cos, sin, cache, keep: int) -> torch.Tensor:
    """The decoder layers and the final norm on the fused native ops (reasoning/native/ops.c), for
    one sequence in float32 on the CPU: the same maths as the layers' forward, in ~5 native calls
    plus the 4 linear layers per layer. ``x`` (n, hidden) is the residual stream, updated in place;
    returns the normed last ``keep`` rows. Each residual add is fused into the next RMSNorm, and
    the last layer computes attention and MLP only for the ``keep`` rows whose logits are wanted
    (its keys and values still go to the cache for every row)."""
    from omnistream.reasoning.native import ops

    x = x.contiguous() if x.is_contiguous() else x.clone()
    cos, sin = cos.contiguous(), sin.contiguous()
    plan = _int8_plan(model)
    with ops.helpers_spinning():
        if plan is not None:
            return _int8_layers(model, x, cos, sin, cache, keep, plan)
        return _module_layers(model, x, cos, sin, cache, keep)


def _module_layers(model: Qwen2, x: torch.Tensor, cos, sin, cache, keep: int) -> torch.Tensor:
    """``_forward_native`` with the linear layers called as modules (float32, other formats)."""
    from omnistream.reasoning.native import ops

    layers = model.model.layers
    n = x.shape[0]
    norm = layers[0].input_layernorm
    h = ops.rmsnorm(x, norm.weight, norm.eps)
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        q_size, kv_size, dim, kv_heads = attn.q_size, attn.kv_size, attn.head_dim, attn.kv_heads
        qkv = attn.qkv_proj(h[None])[0]  # modules see (batch, n, features), as on the torch path
        if attn.on_query:
            q = qkv[None, :, :q_size].clone()  # before RoPE, which runs in place below
            for callback in attn.on_query:
                callback(q)
        ops.rope_(qkv, cos, sin, attn.heads + kv_heads, dim)  # q heads and k heads are adjacent
        k, v = _kv_views(qkv, q_size, kv_size, kv_heads, dim)
        if cache is not None:
            k, v = _float_kv(*cache.update(k, v, attn.layer))
        last = index + 1 == len(layers)
        rows = keep if last else n  # the last layer: only the rows whose logits are kept
        if rows < n:
            x = x[n - rows :]
        out = attn.o_proj(ops.attention(qkv[n - rows :, :q_size], k, v)[None])[0]
        mlp, norm = layer.mlp, layer.post_attention_layernorm
        h = ops.rmsnorm(x, norm.weight, norm.eps, residual=out)
        down = mlp.down_proj(ops.silu_mul(mlp.gate_up_proj(h[None])))[0]
        norm = model.model.norm if last else layers[index + 1].input_layernorm
        h = ops.rmsnorm(x, norm.weight, norm.eps, residual=down)
    return h


def _int8_plan(model: Qwen2) -> list | None:
    """Per layer what ``_int8_layers`` needs (attention module, norms, ops.LinearSpec of qkv, o,
    gate_up and down) when every linear layer is a native Int8Linear without hooks (then each
    half of a layer is one native call); None otherwise. Built once per set of modules; checked
    each forward through the modules' dicts (nn.Module attribute lookups cost ~1 us each)."""
    from torch.nn.modules import module as torch_module

    from omnistream.reasoning.native import ops
    from omnistream.reasoning.quant import Int8Linear

    modules = []
    for layer in model.model.layers:
        attn, mlp = layer._modules["self_attn"]._modules, layer._modules["mlp"]._modules
        modules += (attn["qkv_proj"], attn["o_proj"], mlp["gate_up_proj"], mlp["down_proj"])
    cached = model.__dict__.get("_native_plan")
    if cached is None or len(cached[0]) != len(modules) or any(a is not b for a, b in zip(cached[0], modules, strict=True)):
        plan = None
        if all(type(m) is Int8Linear and m._native is not None for m in modules):
            specs = [ops.LinearSpec.of(m._native) for m in modules]
            plan = [
                (
                    layer.self_attn,
                    layer.input_layernorm.weight,
                    layer.input_layernorm.eps,
                    layer.post_attention_layernorm.weight,
                    layer.post_attention_layernorm.eps,
                    *specs[4 * i : 4 * i + 4],
                )
                for i, layer in enumerate(model.model.layers)
            ]
        cached = model.__dict__["_native_plan"] = (modules, plan)
    if cached[1] is None or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in modules):
        return None
    return cached[1]


def _kv_views(qkv: torch.Tensor, q_size: int, kv_size: int, kv_heads: int, dim: int):
    """k and v as (1, kv_heads, n, dim) views of fused qkv rows (n, q_size + 2 * kv_size)."""
    shape, strides = (1, kv_heads, qkv.shape[0], dim), (kv_size, dim, qkv.shape[1], 1)
    offset = qkv.storage_offset() + q_size
    return qkv.as_strided(shape, strides, offset), qkv.as_strided(shape, strides, offset + kv_size)


def _float_kv(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a cache returned, as the native attention takes it (a cache kept in another dtype or
    layout is converted; BufferedLayer's float32 views pass as they are)."""
    if k.dtype != torch.float32 or k.stride(-1) != 1 or v.dtype != torch.float32 or v.stride(-1) != 1:
        return k.float().contiguous(), v.float().contiguous()
    return k, v


def _int8_layers(model: Qwen2, x: torch.Tensor, cos, sin, cache, keep: int, plan: list) -> torch.Tensor:
    """``_forward_native`` for int8 layers: per layer one native call up to the rotated qkv, then
    ``cache.update``, then one for attention, o_proj, the norm and the MLP (ops.layer_in/out)."""
    from omnistream.reasoning.native import ops

    n = x.shape[0]
    down = None
    for index, (attn, w_in, eps_in, w_post, eps_post, qkv_spec, o_spec, gate_up_spec, down_spec) in enumerate(plan):
        q_size, kv_size, dim, kv_heads = attn.q_size, attn.kv_size, attn.head_dim, attn.kv_heads
        rope_heads = 0 if attn.on_query else attn.heads + kv_heads  # taps see q before RoPE
        qkv = ops.layer_in(x, down, w_in, eps_in, qkv_spec, cos, sin, rope_heads, dim)
        if attn.on_query:
            q = qkv[None, :, :q_size].clone()
            for callback in attn.on_query:
                callback(q)
            ops.rope_(qkv, cos, sin, attn.heads + kv_heads, dim)
        k, v = _kv_views(qkv, q_size, kv_size, kv_heads, dim)
        if cache is not None:
            k, v = _float_kv(*cache.update(k, v, attn.layer))
        rows = keep if index + 1 == len(plan) else n  # the last layer: only the kept rows
        if rows < n:
            x = x[n - rows :]
        down = ops.layer_out(qkv[n - rows :, :q_size], k, v, x, o_spec, w_post, eps_post, gate_up_spec, down_spec)
    norm = model.model.norm
    return ops.rmsnorm(x, norm.weight, norm.eps, residual=down)


# -- loading ---------------------------------------------------------------------------------------


def _float_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
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
        name: t.to(device=device, dtype=dtype, copy=True) for name, t in _float_tensors(model_dir).items()
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


def from_int8_dir(model_dir: Path) -> Qwen2:
    """The model from the int8 cache ``quant.save_int8`` writes (int8.safetensors + int8.json)."""
    from safetensors.torch import load_file

    from omnistream.reasoning.quant import FORMAT_VERSION, Int8Linear

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


# -- GGUF blocks as they are (reasoning/native/kquant.py) -------------------------------------------

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
    native kernel: ``reasoning/native/kquant.py``), activations in float32. The configuration
    comes from ``model_dir``'s config.json when given (the converted directory, which also holds
    the tokenizer), else from the GGUF's metadata."""
    from omnistream.reasoning.native.kquant import KQuantEmbedding, KQuantLinear, QTensor, read_gguf

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
