"""One dispatch for every accelerated op: chosen once at import, overridable.

The backend is ``triton`` when triton is installed and a CUDA device is present, ``reference``
(torch, float32 math) otherwise. ``OMNISTREAM_KERNELS=reference|triton`` at import, or
``set_backend`` at run time (a stage passes its config here; tests force either), overrides it.
With the ``triton`` backend a call runs the Triton kernel when its tensors are on a CUDA device,
or anywhere under ``TRITON_INTERPRET=1`` (how CI checks parity on CPU); CPU tensors otherwise take
the reference, so a CPU model on a GPU machine keeps working. Results live on the inputs' device.

How the KV block store calls the retrieval ops (ReKV), for a store holding per-block keys and
values ``(layers, blocks, kv_heads, block_tokens, head_dim)`` with RoPE removed (position-free),
per-block pooled keys ``(layers, blocks, kv_heads, head_dim)`` and valid lengths ``(blocks,)``::

    rope = Rope.from_hf_config(model.config)
    scores = ops.block_scores(question_queries, pooled)            # (layers, blocks) float32
    best = ops.block_scores_topk(question_queries, pooled, k=8)    # BlockTopK: ids (layers, 8), best first
    ids = chosen_ids.sort().values                                 # (k,): one choice for all layers, time order
    keys, values = ops.gather_rerotate(store_k, store_v, ids, rope.inv_freq(), dst_start=n_sink,
                                       lengths=store_lengths)
    # keys/values (layers, kv_heads, tokens, head_dim) at positions n_sink .. n_sink + tokens - 1

``question_queries`` are the question's query vectors per layer (layers, q_heads, q_tokens,
head_dim): q_proj outputs before RoPE, like the stored keys. ``block_scores`` gives every
block's score to mix with text/time retrieval (the design's finding: choose blocks once for all
layers, query-key scores as a secondary signal); ``best.ids`` (layers, k) can be passed to
``gather_rerotate`` as is (ReKV's per-layer choice) when every layer then gathers the same
number of tokens. Pass ``out=(cache_k, cache_v)`` to write straight into a preallocated cache
at index ``dst_start``, and ``src_starts`` when stored keys are still rotated at their original
positions. ``rope_rotate(keys, delta, inv_freq)`` moves keys already in a cache (the live
window after an eviction). Writing an evicted block b of n tokens into the store:
``store_k[:, b, :, :n] = keys_without_rope``, ``pooled[:, b] = keys_without_rope.float().mean(2)``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from omnistream.kernels import reference
from omnistream.kernels.reference import BlockTopK, rope_rotate
from omnistream.kernels.rope import Rope

__all__ = [
    "BlockTopK",
    "Rope",
    "backend",
    "block_scores",
    "block_scores_topk",
    "frame_preprocess",
    "gather_rerotate",
    "rope_rotate",
    "set_backend",
    "topk_blocks",
]

BACKENDS = ("reference", "triton")


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def detect() -> str:
    """The backend to use here: ``OMNISTREAM_KERNELS`` if set, else triton iff triton and CUDA exist."""
    forced = os.environ.get("OMNISTREAM_KERNELS", "")
    if forced:
        return forced
    return "triton" if _triton_installed() and torch.cuda.is_available() else "reference"


def set_backend(name: str) -> None:
    """Force ``reference`` or ``triton`` (triton must be installed); ``auto`` redoes detection."""
    global _backend
    if name == "auto":
        name = detect()
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (known: auto, {', '.join(BACKENDS)})")
    if name == "triton" and not _triton_installed():
        raise RuntimeError("kernel backend 'triton' requested but triton is not installed")
    _backend = name


def backend() -> str:
    return _backend


_backend = "reference"
set_backend(detect())


def _use_triton(tensor: torch.Tensor) -> bool:
    return _backend == "triton" and (tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def frame_preprocess(
    frames: torch.Tensor,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    center_crop: bool = True,
    antialias: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB -> ``dtype`` (B, 3, size, size); see ``reference.frame_preprocess``.

    For the GPU path hand in frames already on the device (a uint8 copy is 4x smaller than float).
    """
    if _use_triton(frames):
        from omnistream.kernels import triton_frames

        return triton_frames.frame_preprocess(frames, size, mean, std, center_crop, antialias, dtype)
    return reference.frame_preprocess(frames, size, mean, std, center_crop, antialias, dtype)


def block_scores(
    queries: torch.Tensor,
    pooled_keys: torch.Tensor,
    metric: str = "dot",
    head_reduce: str = "max",
    token_reduce: str = "mean",
) -> torch.Tensor:
    """float32 (layers, blocks) question-to-block scores; see ``reference.block_scores``."""
    if _use_triton(pooled_keys):
        from omnistream.kernels import triton_retrieval

        return triton_retrieval.block_scores(queries, pooled_keys, metric, head_reduce, token_reduce)
    return reference.block_scores(queries, pooled_keys, metric, head_reduce, token_reduce)


def block_scores_topk(
    queries: torch.Tensor,
    pooled_keys: torch.Tensor,
    k: int,
    metric: str = "dot",
    head_reduce: str = "max",
    token_reduce: str = "mean",
    allowed: torch.Tensor | None = None,
) -> BlockTopK:
    """Top ``min(k, blocks)`` blocks per layer: ``BlockTopK(ids (layers, k) int64, scores float32)``.

    ``allowed`` (blocks,) bool excludes blocks (e.g. those still in the live window); see
    ``reference.block_scores`` for the scoring and ``reference.topk_blocks`` for the selection.
    """
    return topk_blocks(block_scores(queries, pooled_keys, metric, head_reduce, token_reduce), k, allowed)


def topk_blocks(scores: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> BlockTopK:
    """Top ``min(k, blocks)`` of float32 (layers, blocks) scores, best first, ``allowed`` (blocks,)
    bool masking ids; see ``reference.topk_blocks`` (``torch.topk`` on every device)."""
    return reference.topk_blocks(scores, k, allowed)


def gather_rerotate(
    keys: torch.Tensor,
    values: torch.Tensor,
    block_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    dst_start: int,
    lengths: torch.Tensor | None = None,
    src_starts: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather blocks (k,) or (layers, k) from the store and re-rotate their keys to ``dst_start`` on.

    Shapes, positions and ``out`` as in ``reference.gather_rerotate``; keys and values keep the
    store's dtype and device.
    """
    if _use_triton(keys):
        from omnistream.kernels import triton_retrieval

        return triton_retrieval.gather_rerotate(
            keys, values, block_ids, inv_freq, dst_start, lengths, src_starts, out
        )
    return reference.gather_rerotate(keys, values, block_ids, inv_freq, dst_start, lengths, src_starts, out)
