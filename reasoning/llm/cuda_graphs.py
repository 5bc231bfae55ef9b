"""Decoding one token at a time on a CUDA GPU as one CUDA graph replay (as vLLM and gpt-fast do).

A decoded token is ~500 small kernels (24-28 layers of norms, four matmuls, RoPE, attention);
launched one by one from Python each costs tens of microseconds on a VM, far more than the GPU
time of the token (an H200 reads the 0.5B's 1 GB of bf16 weights in ~0.2 ms). Here the whole
step is captured once into a CUDA graph and replayed per token. A graph replays fixed kernels on
fixed addresses, so the step is written with static shapes:

- The KV cache of each layer is a preallocated buffer (1, kv_heads, capacity, head_dim). The
  capacity is a bucket, a power of two >= the cache length + 1 (at least ``MIN_CAPACITY``); one
  graph is captured per bucket (the buffers grow, and the graphs are dropped, when a longer
  cache comes). The graph of bucket ``b`` works on the buffers' first ``b`` tokens.
- The token id, the slot its key/value goes to (the cache length) and its RoPE position live
  in one small device tensor, copied in from pinned host memory before each replay; RoPE's
  cos/sin are computed on the device from the position, the new key/value are written with
  ``index_copy_`` at the slot, and attention runs over the whole bucket with a boolean mask
  ``arange(b) <= slot`` built on the device. Grouped-query attention runs as SDPA with each
  kv head's query heads as its query rows (all at the same position: the same mask applies),
  which is exact and needs no ``enable_gqa`` or repeated keys.

The BufferedCache stays the source of truth: the static buffers ARE the decoded cache's
storage. On a step, each of the cache's BufferedLayers that does not already use them gets its
filled part copied in once (``BufferedLayer.move_to``; a cache decoding token after token is
copied only at its first step), and after the replay its ``keys``/``values`` are views of the
buffers one token longer. So everything that reads or edits a cache through its API (crop,
eviction writing in place, eager prefills after it, ``layer.keys = ...``) sees and keeps one
consistent cache: in-place edits go into the buffers, a reassigned or regrown storage is copied
in again at the next step. When another cache takes the buffers, the one holding them gets its
filled part copied out into storage of its own first (``detach_buffers``), so two live caches
never share them. Memory: the buffers (2 x layers x kv_heads x capacity x head_dim in bf16: 28
KB a token for the 1.5B) plus each graph's few MB of activations.

The step falls back to the engine's eager forward (``step``/``next_token`` return None) when it
does not fit: more than one token, a cache other than a BufferedCache or with layers of other
lengths/dtypes/devices, an empty cache, more than ``max_capacity`` tokens, ``on_query`` taps or
forward hooks on the model (they must see every forward). With ``graphs=False`` the same static
maths runs eagerly, on any device: the CPU tests compare it with the model's own forward.
``OMNISTREAM_CUDA_GRAPHS=0`` turns the whole path off in ``LLMEngine``. A decoder's static
inputs and buffers are shared by its steps: it is used from one thread (as the reasoner's stage
runs its engine).
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules import module as torch_module

from omnistream.reasoning.llm.cache import BufferedCache
from omnistream.reasoning.llm.model import Qwen2, rotate

log = logging.getLogger("omnistream.reasoning.llm")

MIN_CAPACITY = 256
MAX_CAPACITY = 32768
WARMUP_RUNS = 2  # eager runs of a step on a side stream before its capture (CUDA graph docs)


def enabled_by_env() -> bool:
    """``OMNISTREAM_CUDA_GRAPHS=0`` turns CUDA-graph decoding off (the eager forward runs)."""
    return os.environ.get("OMNISTREAM_CUDA_GRAPHS", "1").strip().lower() not in ("0", "false", "no", "off")


def bucket(tokens: int, min_capacity: int = MIN_CAPACITY) -> int:
    """The capacity for ``tokens``: the smallest power of two >= it, at least ``min_capacity``."""
    return max(min_capacity, 1 << max(0, tokens - 1).bit_length())


def for_model(model: nn.Module) -> StaticDecoder | None:
    """The decoder ``LLMEngine`` uses: for our Qwen2 in float weights on a CUDA device, unless
    turned off by ``OMNISTREAM_CUDA_GRAPHS=0``; else None."""
    if not enabled_by_env() or not isinstance(model, Qwen2):
        return None
    embed = model.model.embed_tokens
    if not isinstance(embed, nn.Embedding) or embed.weight.device.type != "cuda":
        return None
    return StaticDecoder(model)


class StaticDecoder:
    """One-token decode steps of a Qwen2 on static KV buffers, replayed as CUDA graphs."""

    def __init__(
        self,
        model: Qwen2,
        graphs: bool = True,
        min_capacity: int = MIN_CAPACITY,
        max_capacity: int = MAX_CAPACITY,
    ):
        embed = model.model.embed_tokens
        if not isinstance(embed, nn.Embedding):
            raise ValueError("static decoding needs float weights (an nn.Embedding token table)")
        self.model = model
        self.layers = list(model.model.layers)
        self.dtype, self.device = embed.weight.dtype, embed.weight.device
        self.graphs = graphs and self.device.type == "cuda"
        self.enabled = True  # False: step/next_token return None (the caller runs its eager forward)
        self.min_capacity, self.max_capacity = min_capacity, max_capacity
        attn = self.layers[0].self_attn
        self.kv_heads, self.head_dim = attn.kv_heads, attn.head_dim
        self.capacity = 0
        self.k_bufs: list[torch.Tensor] = []
        self.v_bufs: list[torch.Tensor] = []
        self.owners: list[weakref.ref | None] = [None] * len(self.layers)  # layer holding each pair
        self.arange: torch.Tensor | None = None
        self.inv_freq = model.model.rotary.inv_freq.to(self.device, copy=True)
        self.cuda_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._modules = list(model.modules())
        # Static inputs and outputs (the graphs read and write these addresses).
        self.inputs = torch.zeros(3, dtype=torch.long, device=self.device)  # token, slot, position
        self.logits = torch.zeros(1, model.config.vocab_size, dtype=torch.float32, device=self.device)
        self.next_id = torch.zeros(1, dtype=torch.long, device=self.device)
        if self.device.type == "cuda":
            self.host = torch.zeros(3, dtype=torch.long, pin_memory=True)
            self.copied = torch.cuda.Event()
        else:
            self.host, self.copied = self.inputs, None
        self.steps = self.replays = self.captures = 0

    # -- the caller's API ------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, cache, position: int) -> torch.Tensor | None:
        """Decode ``ids`` (1, 1) at RoPE ``position`` after what ``cache`` holds: the logits (1, V)
        as a float32 CPU tensor (one device sync), or None where the static step does not fit."""
        if ids.dim() != 2 or ids.shape != (1, 1) or not self._run(ids, None, cache, position):
            return None
        return self.logits.to("cpu", copy=True)

    @torch.inference_mode()
    def next_token(self, token: int, cache, position: int) -> int | None:
        """Decode ``token`` at RoPE ``position`` after what ``cache`` holds; the greedy next token
        id (argmax on the device: one sync, 8 bytes read), or None where the step does not fit."""
        if not self._run(None, token, cache, position):
            return None
        return int(self.next_id)

    def release(self) -> None:
        """Give the buffers up: a cache still using them gets storage of its own; graphs dropped."""
        for i, owner in enumerate(self.owners):
            layer = owner() if owner is not None else None
            if layer is not None and layer.uses_buffers(self.k_bufs[i], self.v_bufs[i]):
                layer.detach_buffers()
        self.cuda_graphs.clear()
        self.k_bufs, self.v_bufs, self.owners = [], [], [None] * len(self.layers)
        self.capacity, self.arange = 0, None

    # -- one step ---------------------------------------------------------------------------------

    def cache_length(self, cache) -> int | None:
        """The length of ``cache`` if the static step can extend it, else None."""
        if not self.enabled or not isinstance(cache, BufferedCache) or len(cache.layers) != len(self.layers):
            return None
        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return None
        if any(m._forward_hooks or m._forward_pre_hooks for m in self._modules):
            return None
        if any(layer.self_attn.on_query for layer in self.layers):
            return None
        length = None
        shape = (1, self.kv_heads)
        for layer in cache.layers:
            if not layer.is_initialized:
                return None
            for t in (layer.keys, layer.values):
                if (
                    t is None
                    or t.dim() != 4
                    or t.shape[:2] != shape
                    or t.shape[3] != self.head_dim
                    or t.dtype != self.dtype
                    or t.device != self.device
                ):
                    return None
            n = layer.keys.shape[2]
            if length is None:
                length = n
            if n != length or layer.values.shape[2] != n:
                return None
        if not length or bucket(length + 1, self.min_capacity) > self.max_capacity:
            return None
        return length

    def _run(self, ids: torch.Tensor | None, token: int | None, cache, position: int) -> bool:
        length = self.cache_length(cache)
        if length is None:
            return False
        size = bucket(length + 1, self.min_capacity)
        if size > self.capacity:
            self._grow(size)
        for i, layer in enumerate(cache.layers):
            self._adopt(i, layer)
        self._set_inputs(ids, token, length, position)
        if self.graphs:
            graph = self.cuda_graphs.get(size)
            if graph is None:
                try:
                    graph = self.cuda_graphs[size] = self._capture(size)
                except Exception:  # noqa: BLE001 - any capture failure: decode eagerly from now on
                    log.warning("CUDA graph capture failed; decoding eagerly", exc_info=True)
                    self.enabled = False
                    return False  # the cache's length is unchanged: the eager step rewrites the slot
            graph.replay()
            self.replays += 1
        else:
            self._forward(size)
        for layer in cache.layers:
            layer.set_length(length + 1)
        self.steps += 1
        return True

    def _grow(self, capacity: int) -> None:
        """New buffers of ``capacity`` tokens (zeros: masked slots must hold finite numbers, or
        0 x NaN would reach the output); the old ones stay with the cache using them."""
        self.cuda_graphs.clear()  # they read the old buffers' addresses
        shape = (1, self.kv_heads, capacity, self.head_dim)
        self.k_bufs = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_bufs = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.owners = [None] * len(self.layers)
        self.arange = torch.arange(capacity, device=self.device)
        self.capacity = capacity

    def _adopt(self, index: int, layer) -> None:
        k_buf, v_buf = self.k_bufs[index], self.v_bufs[index]
        if layer.uses_buffers(k_buf, v_buf):
            return
        owner = self.owners[index]
        previous = owner() if owner is not None else None
        if previous is not None and previous is not layer and previous.uses_buffers(k_buf, v_buf):
            previous.detach_buffers()
        layer.move_to(k_buf, v_buf)
        self.owners[index] = weakref.ref(layer)

    def _set_inputs(self, ids: torch.Tensor | None, token: int | None, slot: int, position: int) -> None:
        on_device = ids is not None and ids.device.type != "cpu"
        if token is None and not on_device:
            token = int(ids[0, 0])
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy out of ``host`` is done (no-op after a sync)
        host = self.host
        host[0], host[1], host[2] = token or 0, slot, position
        if host is not self.inputs:
            self.inputs.copy_(host, non_blocking=True)
            self.copied.record()
        if on_device:
            self.inputs[0:1].copy_(ids.reshape(1))

    def _capture(self, size: int) -> torch.cuda.CUDAGraph:
        """The step for bucket ``size`` as a CUDA graph: warm-up runs on a side stream (the
        inputs are the real step's, so their writes to the buffers are the ones the replay
        makes), then the capture."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._forward(size)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._forward(size)
        self.captures += 1
        return graph

    def _forward(self, size: int) -> None:
        """The model's forward for one token on the static buffers' first ``size`` tokens: reads
        ``inputs``, writes the new key/value at the slot, ``logits`` and ``next_id``. The same
        maths as Qwen2.forward (llm/model.py) with static shapes."""
        model = self.model
        ids = self.inputs[0:1].view(1, 1)
        slot = self.inputs[1:2]
        x = model.model.embed_tokens(ids)
        # RoPE at the position, on the device (Rotary.forward's maths; its inv_freq may be on the CPU).
        angles = self.inputs[2:3].float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = (self.arange[:size] <= slot).view(1, 1, 1, size)
        with self._attention_backends():
            x = self._layers(x, cos, sin, slot, mask, size)
        logits = model.lm_head(model.model.norm(x))[:, -1]
        self.logits.copy_(logits)
        self.next_id.copy_(logits.argmax(-1))

    def _attention_backends(self):
        """On CUDA, SDPA with a mask as the memory-efficient kernel (math as the fallback): not
        cuDNN's, which has known failures with masks under graph capture."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _layers(
        self, x: torch.Tensor, cos, sin, slot: torch.Tensor, mask: torch.Tensor, size: int
    ) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            heads, kv_heads, dim = attn.heads, attn.kv_heads, attn.head_dim
            q, k, v = attn.qkv_proj(layer.input_layernorm(x)).split(
                (attn.q_size, attn.kv_size, attn.kv_size), dim=-1
            )
            q = rotate(q.view(1, 1, heads, dim).transpose(1, 2), cos, sin)
            k = rotate(k.view(1, 1, kv_heads, dim).transpose(1, 2), cos, sin)
            v = v.view(1, 1, kv_heads, dim).transpose(1, 2)
            keys = self.k_bufs[index].narrow(2, 0, size)
            values = self.v_bufs[index].narrow(2, 0, size)
            keys.index_copy_(2, slot, k)
            values.index_copy_(2, slot, v)
            # Query head h uses kv head h // (heads / kv_heads): a kv head's query heads are rows.
            out = F.scaled_dot_product_attention(
                q.reshape(1, kv_heads, heads // kv_heads, dim), keys, values, attn_mask=mask
            )
            x = x + attn.o_proj(out.reshape(1, 1, attn.q_size))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x
