"""Streaming KV memory for the reasoner (StreamingLLM sinks + rolling window, ReKV offloading).

Memory text arrives one entry (a clip description or a transcript line) at a time and is
prefilled into a live cache laid out as ``[sinks | window]`` with contiguous RoPE positions. The
sinks are the system prompt and memory header. When the window exceeds its token budget, the
oldest entries leave it: their keys are stored *without* rotation (position-free) together with
their values and a per-layer mean-pooled key, and the keys still in the window are re-rotated
so positions stay contiguous. At question time a cache ``[sinks | retrieved blocks | window]`` is
assembled with every key rotated to its new position, so only the question is prefilled.

Tensors: keys/values per layer are (1, kv_heads, tokens, head_dim) in the model dtype; pooled
keys are float32 (layers, kv_heads, head_dim).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from omnistream.kernels import ops
from omnistream.kernels.rope import Rope
from omnistream.reasoning.llm.cache import BufferedCache, cache_over

log = logging.getLogger("omnistream.reasoning")


@dataclass
class Block:
    """One memory entry's KV. ``keys`` are unrotated (position-free) once the block is evicted."""

    block_id: int
    t0: float
    t1: float
    text: str
    n_tokens: int
    # Evicted: (layers, 1, kv_heads, tokens, head_dim), a one-block store for kernels.ops; [] while
    # the block's tensors are only on disk.
    keys: torch.Tensor | list = field(default_factory=list)
    values: torch.Tensor | list = field(default_factory=list)
    pooled: torch.Tensor | None = None
    item_id: int = -1  # the memory record this block holds

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class BlockStore:
    """Evicted blocks: metadata and pooled keys stay in RAM; K/V tensors live in a RAM tier with a
    byte budget, least recently used blocks spilled to ``spill_dir`` as safetensors files.

    With ``persist`` every block is written to ``spill_dir`` as it arrives (write-through, atomic
    rename), with its metadata in the file header, so a restarted reasoner gets the session's
    evicted KV back (``restore``) instead of recomputing it."""

    def __init__(self, ram_budget_bytes: int = 1 << 62, spill_dir: Path | None = None, persist: bool = False):
        if persist and spill_dir is None:
            raise ValueError("a persistent block store needs a directory")
        self.ram_budget_bytes = ram_budget_bytes
        self.spill_dir = spill_dir
        self.persist = persist
        self.blocks: dict[int, Block] = {}
        self._resident: OrderedDict[int, None] = OrderedDict()
        self.disk_bytes = 0
        self._pooled: torch.Tensor | None = None  # (blocks, layers, kv_heads, head_dim), in block order
        self._pooled_ids: list[int] = []
        if persist:
            self.restore()

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks.values())

    @property
    def ram_bytes(self) -> int:
        return sum(self.blocks[i].nbytes() for i in self._resident)

    def add(self, block: Block) -> None:
        self.blocks[block.block_id] = block
        self._resident[block.block_id] = None
        if self.persist:
            self._write(block)
        self._enforce_budget()

    def pooled_keys(self) -> tuple[list[int], torch.Tensor]:
        """(block ids, their pooled keys stacked as (layers, blocks, kv_heads, head_dim)) for
        question-to-block scoring; the stack grows with the store instead of being rebuilt."""
        missing = list(self.blocks)[len(self._pooled_ids) :]  # blocks are only ever added, in order
        if missing:
            fresh = torch.stack([self.blocks[i].pooled for i in missing], dim=1)
            self._pooled = fresh if self._pooled is None else torch.cat([self._pooled, fresh], dim=1)
            self._pooled_ids += missing
        if self._pooled is None:
            return [], torch.empty(0)
        return self._pooled_ids, self._pooled

    def rank(self, queries: torch.Tensor, candidates: set[int]) -> list[int]:
        """Block ids among ``candidates`` by how strongly the question's ``queries`` (layers,
        q_heads, tokens, head_dim; before RoPE, like the stored keys) attend to their pooled keys,
        averaged over layers (ReKV's internal retrieval), best first: ``kernels.ops.block_scores``
        and ``topk_blocks``."""
        ids, pooled = self.pooled_keys()
        allowed = torch.tensor([block_id in candidates for block_id in ids], dtype=torch.bool)
        count = int(allowed.sum())
        if not count:
            return []
        scores = ops.block_scores(queries, pooled).mean(dim=0, keepdim=True)
        return [ids[i] for i in ops.topk_blocks(scores, count, allowed).ids[0].tolist()]

    def _write(self, block: Block) -> None:
        path = self._path(block.block_id)
        if path.exists():
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tensors = {f"k{i}": k.contiguous() for i, k in enumerate(block.keys)}
        tensors.update({f"v{i}": v.contiguous() for i, v in enumerate(block.values)})
        if block.pooled is not None:
            tensors["pooled"] = block.pooled.contiguous()
        meta = {
            "t0": repr(block.t0),
            "t1": repr(block.t1),
            "text": block.text,
            "n_tokens": str(block.n_tokens),
            "item_id": str(block.item_id),
        }
        partial = path.with_suffix(".partial")
        save_file(tensors, str(partial), metadata=meta)
        os.chmod(partial, 0o600)
        partial.replace(path)
        self.disk_bytes += path.stat().st_size

    def restore(self) -> list[Block]:
        """Blocks written by an earlier process (metadata and pooled keys; K/V load on demand).

        One unreadable file drops them all (with a warning): the session's records are then
        streamed again from memory, instead of every question failing on that file."""
        try:
            return self._restore()
        except ValueError as exc:
            log.warning("dropping the session's spilled KV blocks: %s", exc)
            for block_id in list(self.blocks):
                del self.blocks[block_id]
            self._resident.clear()
            self._pooled, self._pooled_ids, self.disk_bytes = None, [], 0
            assert self.spill_dir is not None
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            return []

    def _restore(self) -> list[Block]:
        from safetensors import safe_open

        restored = []
        for path in sorted(self.spill_dir.glob("block-*.safetensors")) if self.spill_dir.exists() else []:
            block_id = int(path.stem.split("-")[1])
            if block_id in self.blocks:
                continue
            try:
                with safe_open(str(path), framework="pt") as reader:
                    meta = reader.metadata() or {}
                    pooled = reader.get_tensor("pooled") if "pooled" in reader.keys() else None  # noqa: SIM118
                block = Block(
                    block_id,
                    float(meta["t0"]),
                    float(meta["t1"]),
                    meta["text"],
                    int(meta["n_tokens"]),
                    pooled=pooled,
                    item_id=int(meta.get("item_id", -1)),
                )
            except Exception as exc:  # safetensors raises its own SafetensorError
                raise ValueError(f"KV block file {path} is unreadable: {exc}") from exc
            self.blocks[block_id] = block
            self.disk_bytes += path.stat().st_size
            restored.append(block)
        return restored

    def load(self, block_id: int) -> Block:
        """The block with its tensors in RAM (read back from disk if it was spilled)."""
        block = self.blocks[block_id]
        if block_id not in self._resident:
            tensors = load_file(str(self._path(block_id)))
            tensors.pop("pooled", None)
            layers = len(tensors) // 2
            block.keys = torch.stack([tensors[f"k{i}"] for i in range(layers)])
            block.values = torch.stack([tensors[f"v{i}"] for i in range(layers)])
        self._resident[block_id] = None
        self._resident.move_to_end(block_id)
        self._enforce_budget(keep=block_id)
        return block

    def _path(self, block_id: int) -> Path:
        assert self.spill_dir is not None
        return self.spill_dir / f"block-{block_id:08d}.safetensors"

    def _enforce_budget(self, keep: int = -1) -> None:
        while self.spill_dir is not None and self.ram_bytes > self.ram_budget_bytes:
            victim = next((i for i in self._resident if i != keep), None)
            if victim is None:
                return
            block = self.blocks[victim]
            self._write(block)
            block.keys, block.values = [], []
            del self._resident[victim]


APPEND_TOKENS = 128  # at most this many tokens of queued entries are prefilled in one pass (its attention
# scores over the window are the pass's largest transient: 14 heads x 128 x 4.6k floats = 33 MB per layer)
RESERVE_SLACK = 512  # window buffers hold this many tokens beyond the budget (a pass, or one long entry)


ASSEMBLY_SLACK = 256  # an assembled cache has room for this many more tokens (the question, the answer)


def inv_freq_for(model) -> torch.Tensor:
    """The model's RoPE frequencies (``kernels.rope.Rope``, as the model itself rotates)."""
    return Rope.from_hf_config(model.config).inv_freq()


class StreamingKV:
    """Live ``[sinks | window]`` cache plus evicted blocks; see the module docstring."""

    def __init__(self, model, sink_ids: torch.Tensor, window_tokens: int, store: BlockStore | None = None):
        self.model = model
        self.inv_freq = inv_freq_for(model)
        self.window_tokens = window_tokens
        self.cache = BufferedCache()
        self._forward(sink_ids, start=0)
        self.n_sink = sink_ids.shape[1]
        self.cache.reserve(self.n_sink + window_tokens + RESERVE_SLACK)
        self.window: list[Block] = []
        self.evicted = store if store is not None else BlockStore()
        self._next_id = max(self.evicted.blocks, default=-1) + 1

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def _layers(self):
        return self.cache.layers

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, start: int, cache: BufferedCache | None = None):
        positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
        return self.model(
            input_ids=ids, cache=cache or self.cache, use_cache=True, position_ids=positions, logits_to_keep=1
        )

    def append(self, ids: torch.Tensor, t0: float, t1: float, text: str, item_id: int = -1) -> Block:
        """Prefill one entry (ids (1, n)) after everything in the live cache; evict if over budget."""
        return self.append_many([(ids, t0, t1, text, item_id)])[0]

    def append_many(self, entries: list[tuple[torch.Tensor, float, float, str, int]]) -> list[Block]:
        """Prefill entries ``(ids (1, n), t0, t1, text, item_id)`` in order, several per forward
        pass (up to ``APPEND_TOKENS``): the same cache as appending them one by one (causal
        attention), with the weights read once per pass instead of once per entry."""
        blocks: list[Block] = []
        start = 0
        while start < len(entries):
            end, tokens = start, 0
            while end < len(entries) and (end == start or tokens + entries[end][0].shape[1] <= APPEND_TOKENS):
                tokens += entries[end][0].shape[1]
                end += 1
            batch = entries[start:end]
            self._forward(torch.cat([e[0] for e in batch], dim=1), self.length)
            for ids, t0, t1, text, item_id in batch:
                block = Block(self._next_id, t0, t1, text, ids.shape[1], item_id=item_id)
                self._next_id += 1
                self.window.append(block)
                blocks.append(block)
            while sum(b.n_tokens for b in self.window) > self.window_tokens and len(self.window) > 1:
                self._evict_oldest()
            start = end
        return blocks

    def _evict_oldest(self) -> None:
        block = self.window.pop(0)
        lo, hi = self.n_sink, self.n_sink + block.n_tokens
        unrotate = -torch.arange(lo, hi)
        shift_back = torch.full((self.length - hi,), -block.n_tokens)
        layers = self._layers()
        first = layers[0].keys
        # The block as a one-block store (layers, 1, kv_heads, tokens, head_dim): keys unrotated.
        shape = (len(layers), 1, first.shape[1], block.n_tokens, first.shape[3])
        block.keys, block.values = first.new_empty(shape), first.new_empty(shape)
        for index, layer in enumerate(layers):
            keys, values = layer.keys, layer.values
            block.keys[index] = ops.rope_rotate(keys[:, :, lo:hi], unrotate, self.inv_freq)
            block.values[index] = values[:, :, lo:hi]
            # The rest of the window moves down in place (its buffer keeps its size: no
            # reallocation per eviction, no doubling beyond the window).
            rest = ops.rope_rotate(keys[:, :, hi:], shift_back, self.inv_freq)
            keys[:, :, lo : lo + rest.shape[2]] = rest
            values[:, :, lo : lo + rest.shape[2]] = values[:, :, hi:].clone()
            layer.crop(-block.n_tokens)
        block.pooled = block.keys[:, 0].float().mean(dim=2)
        self.evicted.add(block)

    def assemble(self, blocks: list[Block], drop_newest_tokens: int = 0) -> BufferedCache:
        """A new cache ``[sinks | blocks (time order) | window]`` with contiguous positions,
        leaving out the newest ``drop_newest_tokens`` of the window: each block gathered from the
        store with its keys rotated to its new place (``kernels.ops.gather_rerotate``), the
        window's keys rotated by the blocks' length, all written into one buffer per layer with
        ``ASSEMBLY_SLACK`` tokens of room after them.

        The live cache is not modified. With no blocks it is a copy of the live cache.
        """
        # Hold each block's tensors here: loading one block may spill another back to disk.
        loaded = []
        for block in sorted(blocks, key=lambda b: b.block_id):
            block = self.evicted.load(block.block_id)
            loaded.append((block.n_tokens, block.keys, block.values))
        inserted = sum(n for n, _, _ in loaded)
        layers = self._layers()
        first = layers[0].keys
        window_end = first.shape[2] - drop_newest_tokens
        total = inserted + window_end
        shape = (len(layers), first.shape[1], total + ASSEMBLY_SLACK, first.shape[3])
        keys, values = first.new_empty(shape), first.new_empty(shape)
        start = self.n_sink + inserted
        shift = torch.full((window_end - self.n_sink,), inserted)
        for index, layer in enumerate(layers):
            keys[index, :, : self.n_sink] = layer.keys[0, :, : self.n_sink]
            values[index, :, : self.n_sink] = layer.values[0, :, : self.n_sink]
            window = layer.keys[0, :, self.n_sink : window_end]
            keys[index, :, start:total] = (
                ops.rope_rotate(window, shift, self.inv_freq) if inserted else window
            )
            values[index, :, start:total] = layer.values[0, :, self.n_sink : window_end]
        first_block = torch.zeros(1, dtype=torch.int64)
        position = self.n_sink
        for n_tokens, block_keys, block_values in loaded:
            ops.gather_rerotate(
                block_keys, block_values, first_block, self.inv_freq, position, out=(keys, values)
            )
            position += n_tokens
        return cache_over(keys, values, total)

    def window_bytes(self) -> int:
        """Bytes the live cache's buffers hold (reserved, not only filled)."""
        return sum(layer.nbytes_reserved() for layer in self._layers())
