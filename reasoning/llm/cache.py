"""A KV cache whose layers grow in place.

transformers' DynamicCache appends with ``torch.cat``, which copies the whole cache of every layer
for every decoded token: with an 8k-token memory window that is hundreds of MB moved per token.
Here each layer keeps a preallocated buffer that doubles when full, and ``keys``/``values`` are
views of its filled part, so appending costs only the new tokens. Assigning ``layer.keys``
directly (as the streaming memory does when it evicts) adopts the tensor as the new buffer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

MIN_CAPACITY = 256


class BufferedLayer(DynamicLayer):
    def __init__(self) -> None:
        self._k_buf = self._v_buf = None
        self._k = self._v = None
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return self._k

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._k = self._k_buf = tensor

    @property
    def values(self) -> torch.Tensor | None:
        return self._v

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._v = self._v_buf = tensor

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads, _, dim = key_states.shape
        self.keys = key_states.new_empty((batch, heads, 0, dim))
        self.values = value_states.new_empty((batch, heads, 0, value_states.shape[-1]))
        self.is_initialized = True

    def _ensure_capacity(self, needed: int, exact: bool = False) -> None:
        if self._k_buf.shape[-2] >= needed and self._k_buf.dim() == 4:
            return
        length = self._k.shape[-2]
        capacity = needed if exact else max(needed, 2 * length, MIN_CAPACITY)
        for name in ("k", "v"):
            view = getattr(self, f"_{name}")
            buffer = view.new_empty((*view.shape[:2], capacity, view.shape[-1]))
            buffer[..., :length, :] = view
            setattr(self, f"_{name}_buf", buffer)
            setattr(self, f"_{name}", buffer[..., :length, :])

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` in all (no doubling when they are reached)."""
        if self.is_initialized:
            self._ensure_capacity(tokens, exact=True)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self._k.shape[-2]
        end = start + key_states.shape[-2]
        self._ensure_capacity(end)
        self._k_buf[..., start:end, :] = key_states
        self._v_buf[..., start:end, :] = value_states
        self._k = self._k_buf[..., :end, :]
        self._v = self._v_buf[..., :end, :]
        return self._k, self._v

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens (transformers 5 convention), keeping the buffer."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        end = max(0, self._k.shape[-2] + tokens_to_remove)
        self._k = self._k_buf[..., :end, :]
        self._v = self._v_buf[..., :end, :]

    # -- shared storage (llm/cuda_graphs.py: a CUDA graph's static KV buffers) ----------

    def uses_buffers(self, k_buf: torch.Tensor, v_buf: torch.Tensor) -> bool:
        """Whether ``k_buf``/``v_buf`` are this layer's storage (``move_to``)."""
        return self._k_buf is k_buf and self._v_buf is v_buf

    def move_to(self, k_buf: torch.Tensor, v_buf: torch.Tensor) -> None:
        """Make ``k_buf``/``v_buf`` (batch, heads, capacity, dim) this layer's storage, with the
        filled part copied in; later updates write into them while they have room."""
        length = self._k.shape[-2]
        for view, buffer in ((self._k, k_buf), (self._v, v_buf)):
            if view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
                view = view.clone()  # a view of the target itself: no overlapping copy
            buffer.narrow(-2, 0, length).copy_(view)
        self._k_buf, self._v_buf = k_buf, v_buf
        self.set_length(length)

    def set_length(self, length: int) -> None:
        """The filled part is the buffers' first ``length`` tokens (written there by the caller)."""
        self._k = self._k_buf.narrow(-2, 0, length)
        self._v = self._v_buf.narrow(-2, 0, length)

    def detach_buffers(self) -> None:
        """Copy the filled part into storage of its own (the shared buffers go to another cache)."""
        self._k = self._k_buf = self._k.clone(memory_format=torch.contiguous_format)
        self._v = self._v_buf = self._v.clone(memory_format=torch.contiguous_format)

    def nbytes_reserved(self) -> int:
        if self._k_buf is None:
            return 0
        return (self._k_buf.numel() + self._v_buf.numel()) * self._k_buf.element_size()


class BufferedCache(DynamicCache):
    """DynamicCache API with in-place growing layers (see the module docstring)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=BufferedLayer)

    def reserve(self, tokens: int) -> None:
        """Preallocate every initialised layer for ``tokens`` in all."""
        for layer in self.layers:
            layer.reserve(tokens)


def cache_from(keys: list[torch.Tensor], values: list[torch.Tensor]) -> BufferedCache:
    """A cache holding the given per-layer keys/values (1, kv_heads, tokens, head_dim)."""
    cache = BufferedCache()
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache.update(k, v, layer)
    return cache


def cache_over(keys: torch.Tensor, values: torch.Tensor, length: int) -> BufferedCache:
    """A cache whose layer i keeps its keys/values in ``keys[i:i+1]``/``values[i:i+1]`` (buffers
    (layers, kv_heads, capacity, head_dim)), filled up to ``length``: no copy, and room for
    ``capacity - length`` more tokens before a layer reallocates."""
    cache = BufferedCache()
    for index in range(keys.shape[0]):
        k, v = keys[index : index + 1], values[index : index + 1]
        cache.update(k[:, :, :0], v[:, :, :0], index)  # creates the layer
        layer = cache.layers[index]
        layer._k_buf, layer._v_buf = k, v
        layer.set_length(length)
    return cache
