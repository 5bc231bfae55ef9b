"""Streaming KV correctness on a tiny Qwen2 built from a config (float32, exact comparisons)."""

from __future__ import annotations

import pytest
import torch

from omnistream.kernels.ops import rope_rotate
from omnistream.reasoning.kvcache import Block, BlockStore, StreamingKV, inv_freq_for

from ..tiny import SHAPES, qwen2_model

VOCAB = SHAPES["stream"]["vocab_size"]


@pytest.fixture(scope="module")
def model():
    return qwen2_model("stream", seed=0)


def ids(*tokens: int) -> torch.Tensor:
    return torch.tensor([tokens])


SINK = ids(1, 2, 3, 4)
ENTRIES = [ids(10, 11, 12), ids(20, 21, 22, 23, 24), ids(30, 31), ids(40, 41, 42, 43), ids(50, 51, 52)]
QUESTION = ids(60, 61, 62)


@torch.inference_mode()
def full_logits(model, sequence: torch.Tensor) -> torch.Tensor:
    return model(input_ids=sequence).logits[0, -QUESTION.shape[1] :]


@torch.inference_mode()
def question_logits(model, stream: StreamingKV, cache) -> torch.Tensor:
    start = cache.get_seq_length()
    positions = torch.arange(start, start + QUESTION.shape[1]).unsqueeze(0)
    return model(input_ids=QUESTION, cache=cache, position_ids=positions).logits[0]


@torch.inference_mode()
def layer0_keys(model, sequence: torch.Tensor, offset: int = 0) -> torch.Tensor:
    from transformers import DynamicCache

    cache = DynamicCache()
    positions = torch.arange(offset, offset + sequence.shape[1]).unsqueeze(0)
    model(input_ids=sequence, cache=cache, position_ids=positions)
    return cache.layers[0].keys


def test_rerotating_a_cached_key_equals_computing_it_at_the_new_position(model) -> None:
    inv_freq = inv_freq_for(model)
    at_5 = layer0_keys(model, ENTRIES[1], offset=5)
    at_1005 = layer0_keys(model, ENTRIES[1], offset=1005)
    moved = rope_rotate(at_5, torch.full((ENTRIES[1].shape[1],), 1000.0), inv_freq)
    torch.testing.assert_close(moved, at_1005, atol=2e-5, rtol=1e-4)
    # Removing the rotation gives the same position-free key wherever it was computed.
    free_5 = rope_rotate(at_5, -torch.arange(5, 10, dtype=torch.float32), inv_freq)
    free_1005 = rope_rotate(at_1005, -torch.arange(1005, 1010, dtype=torch.float32), inv_freq)
    torch.testing.assert_close(free_5, free_1005, atol=2e-5, rtol=1e-4)


def test_window_covering_everything_matches_a_full_forward(model) -> None:
    stream = StreamingKV(model, SINK, window_tokens=1000)
    for i, entry in enumerate(ENTRIES):
        stream.append(entry, t0=i, t1=i + 1, text=f"entry {i}")
    assert len(stream.evicted) == 0 and stream.length == SINK.shape[1] + sum(e.shape[1] for e in ENTRIES)
    expected = full_logits(model, torch.cat([SINK, *ENTRIES, QUESTION], dim=1))
    torch.testing.assert_close(
        question_logits(model, stream, stream.assemble([])), expected, atol=1e-4, rtol=1e-4
    )


def test_evicted_blocks_retrieved_back_match_a_full_forward(model) -> None:
    """Ingest with a window holding everything, then shrink it: eviction stores position-free keys,
    re-rotates the window; assembling every block again must reproduce the full forward."""
    stream = StreamingKV(model, SINK, window_tokens=1000)
    for i, entry in enumerate(ENTRIES):
        stream.append(entry, t0=i, t1=i + 1, text=f"entry {i}")
    stream.window_tokens = 6
    stream.append(ids(70), t0=9, t1=9, text="tick")  # triggers eviction down to the budget
    assert [b.block_id for b in stream.evicted] == [0, 1, 2, 3]
    assert [b.block_id for b in stream.window] == [4, 5]
    assert all(b.pooled is not None and b.pooled.shape == (2, 2, 16) for b in stream.evicted)
    expected = full_logits(model, torch.cat([SINK, *ENTRIES, ids(70), QUESTION], dim=1))
    cache = stream.assemble(list(reversed(list(stream.evicted))))  # order given does not matter
    torch.testing.assert_close(question_logits(model, stream, cache), expected, atol=1e-4, rtol=1e-4)
    # The live cache is untouched by assembling.
    assert stream.length == SINK.shape[1] + 3 + 1


def test_rolling_window_keys_equal_a_recomputed_window(model) -> None:
    """Layer-0 keys depend only on token and position: after eviction the live [sinks | window]
    must hold exactly the keys a fresh forward over sinks + window tokens computes."""
    stream = StreamingKV(model, SINK, window_tokens=7)
    reserved = stream.window_bytes()
    for i, entry in enumerate(ENTRIES):
        stream.append(entry, t0=i, t1=i + 1, text=f"entry {i}")
    assert stream.window_bytes() == reserved > 0  # evictions move the window in place
    window_ids = [ENTRIES[b.block_id] for b in stream.window]
    assert [b.block_id for b in stream.window] == [3, 4] and len(stream.evicted) == 3
    expected = layer0_keys(model, torch.cat([SINK, *window_ids], dim=1))
    torch.testing.assert_close(stream.cache.layers[0].keys, expected, atol=2e-5, rtol=1e-4)
    # Selected blocks in between shift the window's positions but keep them contiguous.
    assembled = stream.assemble([stream.evicted.blocks[1]])
    expected = layer0_keys(model, torch.cat([SINK, ENTRIES[1], *window_ids], dim=1))
    torch.testing.assert_close(assembled.layers[0].keys, expected, atol=2e-5, rtol=1e-4)


def test_assembling_without_the_newest_entries_matches_a_forward_without_them(model) -> None:
    stream = StreamingKV(model, SINK, window_tokens=1000)
    for i, entry in enumerate(ENTRIES):
        stream.append(entry, t0=i, t1=i + 1, text=f"entry {i}")
    cache = stream.assemble([], drop_newest_tokens=ENTRIES[-1].shape[1] + ENTRIES[-2].shape[1])
    expected = full_logits(model, torch.cat([SINK, *ENTRIES[:-2], QUESTION], dim=1))
    torch.testing.assert_close(question_logits(model, stream, cache), expected, atol=1e-4, rtol=1e-4)


def test_blocks_spilled_to_disk_come_back_exactly(model, tmp_path) -> None:
    store = BlockStore(ram_budget_bytes=0, spill_dir=tmp_path / "kv")
    stream = StreamingKV(model, SINK, window_tokens=1000, store=store)
    for i, entry in enumerate(ENTRIES):
        stream.append(entry, t0=i, t1=i + 1, text=f"entry {i}")
    stream.window_tokens = 6
    stream.append(ids(70), t0=9, t1=9, text="tick")
    assert store.ram_bytes == 0 and len(list((tmp_path / "kv").glob("block-*.safetensors"))) == 4
    assert store.disk_bytes > 0 and all(b.keys == [] for b in store)
    expected = full_logits(model, torch.cat([SINK, *ENTRIES, ids(70), QUESTION], dim=1))
    torch.testing.assert_close(
        question_logits(model, stream, stream.assemble(list(store))), expected, atol=1e-4, rtol=1e-4
    )


def test_persisted_blocks_survive_a_new_process_and_assemble_the_same_cache(model, tmp_path) -> None:
    """Write-through block files carry the metadata and pooled keys; a store opened on the same
    directory (a restarted reasoner) restores them and assembling gives the same logits."""
    store = BlockStore(ram_budget_bytes=1 << 30, spill_dir=tmp_path / "kv", persist=True)
    stream = StreamingKV(model, SINK, window_tokens=7, store=store)
    for i, entry in enumerate(ENTRIES):
        stream.append(entry, t0=i, t1=i + 1.5, text=f"entry {i}", item_id=100 + i)
    assert [b.block_id for b in store] == [0, 1, 2] and store.ram_bytes > 0  # written, still in RAM
    before = stream.assemble(list(store))

    reopened = BlockStore(ram_budget_bytes=1 << 30, spill_dir=tmp_path / "kv", persist=True)
    assert [(b.block_id, b.item_id, b.t0, b.t1, b.text, b.n_tokens) for b in reopened] == [
        (b.block_id, b.item_id, b.t0, b.t1, b.text, b.n_tokens) for b in store
    ]
    for old, new in zip(store, reopened, strict=True):
        assert torch.equal(old.pooled, new.pooled) and new.keys == []
    restarted = StreamingKV(model, SINK, window_tokens=7, store=reopened)
    for i in (3, 4):  # the live window is streamed again; evicted blocks are not
        restarted.append(ENTRIES[i], t0=i, t1=i + 1.5, text=f"entry {i}", item_id=100 + i)
    assert len(reopened) == 3 and [b.block_id for b in restarted.window] == [3, 4]
    # The retrieved blocks land exactly as before the restart (same tensors, same positions); the
    # window was recomputed after the sinks alone, so only its deeper layers may differ.
    after = restarted.assemble(list(reopened))
    end = SINK.shape[1] + sum(b.n_tokens for b in store)
    for old_layer, new_layer in zip(before.layers, after.layers, strict=True):
        assert torch.equal(old_layer.keys[:, :, :end], new_layer.keys[:, :, :end])
        assert torch.equal(old_layer.values[:, :, :end], new_layer.values[:, :, :end])
    fresh = StreamingKV(model, SINK, window_tokens=7)
    for i in (3, 4):
        fresh.append(ENTRIES[i], t0=i, t1=i + 1.5, text=f"entry {i}")
    torch.testing.assert_close(
        question_logits(model, restarted, restarted.assemble([])),
        question_logits(model, fresh, fresh.assemble([])),
    )


def test_an_unreadable_block_file_drops_the_spilled_blocks_with_a_warning(model, tmp_path, caplog) -> None:
    """One corrupt file once made the session raise on every use; now the session's spilled
    blocks are dropped (its records are streamed again from memory) and the store works."""
    store = BlockStore(ram_budget_bytes=1 << 30, spill_dir=tmp_path / "kv", persist=True)
    stream = StreamingKV(model, SINK, window_tokens=7, store=store)
    for i, entry in enumerate(ENTRIES):
        stream.append(entry, t0=i, t1=i + 1.5, text=f"entry {i}", item_id=100 + i)
    assert len(store) == 3
    (tmp_path / "kv" / "block-00000001.safetensors").write_bytes(b"not a safetensors file")
    with caplog.at_level("WARNING", logger="omnistream.reasoning"):
        reopened = BlockStore(ram_budget_bytes=1 << 30, spill_dir=tmp_path / "kv", persist=True)
    assert len(reopened) == 0 and reopened.disk_bytes == 0
    assert "block-00000001" in caplog.text and "dropping" in caplog.text
    assert not (tmp_path / "kv").exists() or not any((tmp_path / "kv").iterdir())


def test_pooled_key_stack_follows_the_store(model) -> None:
    stream = StreamingKV(model, SINK, window_tokens=4)
    for i, entry in enumerate(ENTRIES[:3]):
        stream.append(entry, t0=i, t1=i + 1, text=f"entry {i}")
    block_ids, pooled = stream.evicted.pooled_keys()
    assert block_ids == [0, 1] and pooled.shape == (2, 2, 2, 16)
    stream.append(ENTRIES[3], t0=3, t1=4, text="entry 3")
    block_ids, pooled = stream.evicted.pooled_keys()
    assert block_ids == [0, 1, 2]
    for column, block_id in enumerate(block_ids):
        torch.testing.assert_close(pooled[:, column], stream.evicted.blocks[block_id].pooled)


def test_blocks_are_ranked_by_the_question_queries_among_the_candidates(model) -> None:
    stream = StreamingKV(model, SINK, window_tokens=4)
    for i, entry in enumerate(ENTRIES):
        stream.append(entry, t0=i, t1=i + 1, text=f"entry {i}")
    block_ids, pooled = stream.evicted.pooled_keys()
    assert len(block_ids) >= 3
    queries = torch.randn(2, 4, 3, 16, generator=torch.Generator().manual_seed(7))
    # By hand: the layers' mean of each block's best head's score with the mean query.
    per_head = torch.einsum(
        "lhd,lbkd->lbhk", queries.mean(dim=2), pooled.repeat_interleave(2, dim=2)[:, :, :4]
    )
    scores = per_head.diagonal(dim1=2, dim2=3).amax(-1).mean(0)
    expected = [block_ids[i] for i in torch.argsort(scores, descending=True).tolist()]
    assert stream.evicted.rank(queries, set(block_ids)) == expected
    candidates = set(block_ids[1:])
    assert stream.evicted.rank(queries, candidates) == [b for b in expected if b in candidates]
    assert stream.evicted.rank(queries, set()) == []


def test_appending_many_entries_in_one_pass_equals_appending_them_one_by_one(model, monkeypatch) -> None:
    """Same blocks, windows and evictions; the same keys and values while nothing is evicted
    mid-pass (an entry prefilled in a pass also sees the entries evicted at its end)."""
    from omnistream.reasoning import kvcache

    monkeypatch.setattr(kvcache, "APPEND_TOKENS", 8)  # passes of at most 8 tokens: 3+5, 2+4, 3
    entries = [(e, i, i + 1, f"entry {i}", 100 + i) for i, e in enumerate(ENTRIES)]
    for window in (100, 9):
        one, many = (
            StreamingKV(model, SINK, window_tokens=window),
            StreamingKV(model, SINK, window_tokens=window),
        )
        for entry in entries:
            one.append(*entry)
        blocks = many.append_many(entries)
        assert [(b.block_id, b.item_id, b.n_tokens) for b in blocks] == [
            (i, 100 + i, e.shape[1]) for i, e in enumerate(ENTRIES)
        ]
        assert [b.block_id for b in many.window] == [b.block_id for b in one.window]
        assert sorted(many.evicted.blocks) == sorted(one.evicted.blocks)
        assert many.length == one.length
    assert len(many.evicted) == 2  # window 9 (3+5+2+4+3 tokens) evicted two entries
    one, many = StreamingKV(model, SINK, window_tokens=100), StreamingKV(model, SINK, window_tokens=100)
    for entry in entries:
        one.append(*entry)
    many.append_many(entries)
    for a, b in zip(many.cache.layers, one.cache.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=2e-5, rtol=1e-4)


def random_store(
    seed: int, blocks: int, layers: int = 3, kv_heads: int = 2, head_dim: int = 16
) -> BlockStore:
    generator = torch.Generator().manual_seed(seed)
    store = BlockStore()
    for block_id in range(blocks):
        pooled = torch.randn(layers, kv_heads, head_dim, generator=generator)
        store.add(Block(block_id, float(block_id), block_id + 1.0, f"block {block_id}", 4, pooled=pooled))
    return store


def test_the_block_store_ranks_random_blocks_as_their_scores_say() -> None:
    """Issue #19 item 3: the one ranking (``BlockStore.rank``: ``block_scores`` then
    ``topk_blocks`` with the candidates allowed) orders the candidates exactly as an argsort of
    their layer-averaged ``block_scores`` does (what ``Answerer.rank_blocks`` computed: checked
    equal on these stores before it was dropped, 682c60e)."""
    from omnistream.kernels import reference

    for seed in range(20):
        store = random_store(seed, blocks=5 + 7 * seed)
        generator = torch.Generator().manual_seed(1000 + seed)
        queries = torch.randn(3, 4, 1 + seed % 6, 16, generator=generator)
        ids, pooled = store.pooled_keys()
        for candidates in (set(ids), set(ids[::2]), set(ids[seed % 3 :: 5]), {ids[-1]}, set()):
            keep = [i for i, block_id in enumerate(ids) if block_id in candidates]
            scores = reference.block_scores(queries, pooled[:, keep]).mean(dim=0) if keep else torch.empty(0)
            expected = [ids[keep[i]] for i in torch.argsort(scores, descending=True).tolist()]
            ranked = store.rank(queries, candidates)
            assert ranked == expected, (seed, sorted(candidates))
            assert sorted(ranked) == sorted(candidates)
