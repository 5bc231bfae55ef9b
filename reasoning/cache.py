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
