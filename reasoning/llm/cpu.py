"""The CPU forward: Qwen2's decoder layers on the fused native ops (kernels/cpu), for one
sequence in float32, with any weight format.

The same maths as the torch layers (``Qwen2.forward``), in a few native calls per layer. Each
layer is two halves:

- in: ``x += down`` (the previous layer's MLP output), ``h = rmsnorm(x)``, ``qkv = qkv_proj(h)``
  with RoPE applied in place to its q and k heads;
- out: attention against the cache, ``x += o_proj(.)``, and the MLP's output on ``rmsnorm(x)``
  (added to ``x`` by the next layer's in-half, or by the final norm).

With every linear layer a native ``Int8Linear`` (the "int8" format) each half is one native call
(``ops.layer_in``/``layer_out``: the linears run inside the same call); with other linear
modules ("gguf"'s ``KQuantLinear``, float32 ``nn.Linear``, a hooked layer) the halves call the
modules between the fused norm, RoPE, attention and SiLU ops. The last layer computes attention
and MLP only for the ``keep`` rows whose logits are wanted (its keys and values still go to the
cache for every row).
"""

from __future__ import annotations

import torch
from torch.nn.modules import module as torch_module

from omnistream.kernels.cpu import ops
from omnistream.reasoning.llm.int8 import Int8Linear


def usable(model) -> bool:
    """Whether float32 CPU forwards of ``model`` run here (native ops built and allowed, a head
    size the native attention takes, and ``model.native_ops`` not switched off by a test)."""
    return model.native_ops and ops.usable() and ops.attention_supported(model.config.head_dim)


def forward(model, x: torch.Tensor, cos, sin, cache, keep: int) -> torch.Tensor:
    """``x`` (n, hidden) is the residual stream, updated in place; returns the normed last
    ``keep`` rows (keep, hidden)."""
    x = x.contiguous() if x.is_contiguous() else x.clone()
    cos, sin = cos.contiguous(), sin.contiguous()
    layers = _plan(model)
    n = x.shape[0]
    down = None
    with ops.helpers_spinning():
        for index, (layer, attn, w_in, eps_in, w_post, eps_post, fused) in enumerate(layers):
            q_size, kv_size, dim, kv_heads = attn.q_size, attn.kv_size, attn.head_dim, attn.kv_heads
            rope_heads = 0 if attn.on_query else attn.heads + kv_heads  # taps see q before RoPE
            if fused is not None:
                qkv = ops.layer_in(x, down, w_in, eps_in, fused[0], cos, sin, rope_heads, dim)
            else:
                h = ops.rmsnorm(x, w_in, eps_in, residual=down)
                qkv = attn.qkv_proj(h[None])[0]  # modules see (batch, n, features), as on the torch path
                if rope_heads:
                    ops.rope_(qkv, cos, sin, rope_heads, dim)  # q heads and k heads are adjacent
            if attn.on_query:
                q = qkv[None, :, :q_size].clone()
                for callback in attn.on_query:
                    callback(q)
                ops.rope_(qkv, cos, sin, attn.heads + kv_heads, dim)
            k, v = _kv_views(qkv, q_size, kv_size, kv_heads, dim)
            if cache is not None:
                k, v = _float_kv(*cache.update(k, v, attn.layer))
            rows = keep if index + 1 == len(layers) else n  # the last layer: only the kept rows
            if rows < n:
                x = x[n - rows :]
            q = qkv[n - rows :, :q_size]
            if fused is not None:
                down = ops.layer_out(q, k, v, x, fused[1], w_post, eps_post, fused[2], fused[3])
            else:
                out = attn.o_proj(ops.attention(q, k, v)[None])[0]
                h = ops.rmsnorm(x, w_post, eps_post, residual=out)
                mlp = layer.mlp
                down = mlp.down_proj(ops.silu_mul(mlp.gate_up_proj(h[None])))[0]
    norm = model.model.norm
    return ops.rmsnorm(x, norm.weight, norm.eps, residual=down)


def _plan(model) -> list[tuple]:
    """Per layer (layer, attention, input norm weight and eps, post-attention norm weight and
    eps, fused), where ``fused`` is the ``ops.LinearSpec`` of qkv, o, gate_up and down when every
    linear layer of the model is a native Int8Linear and no forward hook is set (hooks must see
    module calls), else None. Built once per set of modules; checked each forward through the
    modules' dicts (nn.Module attribute lookups cost ~1 us each)."""
    modules = []
    for layer in model.model.layers:
        attn, mlp = layer._modules["self_attn"]._modules, layer._modules["mlp"]._modules
        modules += (attn["qkv_proj"], attn["o_proj"], mlp["gate_up_proj"], mlp["down_proj"])
    cached = model.__dict__.get("_cpu_plan")
    if (
        cached is None
        or len(cached[0]) != len(modules)
        or any(a is not b for a, b in zip(cached[0], modules, strict=True))
    ):
        specs = None
        if all(type(m) is Int8Linear and m._native is not None for m in modules):
            specs = [ops.LinearSpec.of(m._native) for m in modules]
        layers = [
            (
                layer,
                layer.self_attn,
                layer.input_layernorm.weight,
                layer.input_layernorm.eps,
                layer.post_attention_layernorm.weight,
                layer.post_attention_layernorm.eps,
            )
            for layer in model.model.layers
        ]
        fused = (
            [(*entry, tuple(specs[4 * i : 4 * i + 4])) for i, entry in enumerate(layers)] if specs else None
        )
        cached = model.__dict__["_cpu_plan"] = (modules, fused, [(*entry, None) for entry in layers])
    hooked = torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
    if cached[1] is None or hooked or any(m._forward_hooks or m._forward_pre_hooks for m in modules):
        return cached[2]
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
