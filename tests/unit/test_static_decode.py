"""Static-shape decode steps (reasoning/llm/cuda_graphs.py) against the model's own forward.

On the CPU the static maths run eagerly (``graphs=False``): KV written at a slot given as a
tensor, attention over the capacity bucket with a mask built from it, RoPE from a position
tensor, the buckets growing, the BufferedCache kept as the source of truth across edits and
across caches. The CUDA-graph replay itself runs in the ``gpu`` test (and scripts/gpu_llm_check.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omnistream.reasoning.llm import cuda_graphs as static_decode
from omnistream.reasoning.llm import load
from omnistream.reasoning.llm import model as qwen2
from omnistream.reasoning.llm.cache import BufferedCache
from omnistream.reasoning.llm.cuda_graphs import StaticDecoder, bucket

from ..tiny import save_qwen2

ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture(scope="module")
def grouped_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 with 3 query heads per kv head and linear RoPE scaling."""
    return save_qwen2(tmp_path_factory.mktemp("grouped"), "grouped", seed=5)


@pytest.fixture(scope="module", params=["tiny", "grouped"])
def model(request, tiny_llm_dir: Path, grouped_dir: Path) -> qwen2.Qwen2:
    return load.from_float_dir(tiny_llm_dir if request.param == "tiny" else grouped_dir)


def eager(model, ids: torch.Tensor, cache, start: int) -> torch.Tensor:
    """The model's own forward (the CPU path the engine runs): logits (1, V) of the last token."""
    positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
    with torch.inference_mode():
        out = model(input_ids=ids, cache=cache, position_ids=positions, logits_to_keep=1)
    return out.logits[:, -1].float()


def prefilled(model, ids: torch.Tensor, start: int = 0) -> tuple[BufferedCache, BufferedCache]:
    """Two caches holding the same prefill: one for the static steps, one for the reference."""
    caches = BufferedCache(), BufferedCache()
    for cache in caches:
        eager(model, ids, cache, start)
    return caches


def assert_same_caches(a: BufferedCache, b: BufferedCache) -> None:
    assert a.get_seq_length() == b.get_seq_length()
    for la, lb in zip(a.layers, b.layers, strict=True):
        torch.testing.assert_close(la.keys, lb.keys, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(la.values, lb.values, atol=ATOL, rtol=RTOL)


def step_both(
    model, decoder, static: BufferedCache, reference: BufferedCache, token: int, position: int
) -> None:
    got = decoder.step(torch.tensor([[token]]), static, position)
    assert got is not None, "the static step should fit"
    want = eager(model, torch.tensor([[token]]), reference, position)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert int(decoder.next_id) == int(want.argmax(-1))


def test_buckets_are_powers_of_two_from_the_minimum() -> None:
    assert bucket(1) == 256 and bucket(256) == 256 and bucket(257) == 512 and bucket(4097) == 8192
    assert [bucket(n, 8) for n in (1, 8, 9, 16, 17, 33)] == [8, 8, 16, 16, 32, 64]


@pytest.mark.parametrize("offset", [0, 9])
def test_static_steps_match_the_forward_across_growing_buckets(model, offset: int) -> None:
    """40 tokens after a 5-token prefill: buckets 8 -> 16 -> 32 -> 64. ``offset`` puts the RoPE
    positions ahead of the cache slots (a cache of sinks continued at later positions)."""
    vocab = model.config.vocab_size
    torch.manual_seed(offset)
    ids = torch.randint(0, vocab, (1, 45))
    decoder = StaticDecoder(model, graphs=False, min_capacity=8)
    static, reference = prefilled(model, ids[:, :5], offset)
    capacities = []
    for i in range(5, 45):
        step_both(model, decoder, static, reference, int(ids[0, i]), offset + i)
        capacities.append(decoder.capacity)
    assert capacities[0] == 8 and capacities[-1] == 64 and sorted(set(capacities)) == [8, 16, 32, 64]
    assert decoder.steps == 40
    assert_same_caches(static, reference)
    # The cache's storage is the decoder's buffers (decoded tokens are written there, no copy).
    assert static.layers[0].uses_buffers(decoder.k_bufs[0], decoder.v_bufs[0])
    # next_token is the same step with the argmax read back.
    token = int(ids[0, 3])
    expected = int(eager(model, torch.tensor([[token]]), reference, offset + 45).argmax(-1))
    assert decoder.next_token(token, static, offset + 45) == expected


def test_cache_edits_between_steps_are_kept(model) -> None:
    """What the engine's callers do to a cache between decode steps (crop, in-place edits as
    eviction makes, eager prefills within and beyond the buffers, a reassigned layer) is seen by
    the next static step: the BufferedCache stays the source of truth."""
    vocab = model.config.vocab_size
    torch.manual_seed(11)
    ids = torch.randint(0, vocab, (1, 200))
    decoder = StaticDecoder(model, graphs=False, min_capacity=16)
    static, reference = prefilled(model, ids[:, :6])
    position = 6

    def steps(count: int) -> None:
        nonlocal position
        for _ in range(count):
            step_both(model, decoder, static, reference, int(ids[0, position]), position)
            position += 1

    steps(4)
    for cache in (static, reference):  # crop (choice_logprobs after each suffix)
        cache.crop(-3)
    position -= 3
    steps(3)
    with torch.inference_mode():  # in-place edits of the filled part (eviction's shift)
        for cache in (static, reference):
            for layer in cache.layers:
                layer.keys[:, :, 1:4] *= 0.5
                layer.values[:, :, 2:3] = 0.25
    steps(2)
    for cache in (static, reference):  # an eager prefill inside the buffers' capacity
        eager(model, ids[:, position : position + 3], cache, position)
    position += 3
    assert static.layers[0].uses_buffers(decoder.k_bufs[0], decoder.v_bufs[0])
    steps(2)
    for cache in (static, reference):  # an eager prefill beyond them: the cache regrows its own
        eager(model, ids[:, position : position + 40], cache, position)
    position += 40
    assert not static.layers[0].uses_buffers(decoder.k_bufs[0], decoder.v_bufs[0])
    steps(3)  # copied in again, into buffers grown to the next bucket
    assert decoder.capacity == 64 and static.layers[0].uses_buffers(decoder.k_bufs[0], decoder.v_bufs[0])
    with torch.inference_mode():  # a layer's storage reassigned (bench/memory.py re-rotates so)
        for cache in (static, reference):
            layer = cache.layers[1]
            layer.keys, layer.values = layer.keys.clone() * 0.9, layer.values.clone()
    steps(3)
    assert_same_caches(static, reference)


def test_caches_decoded_alternately_keep_their_own_tokens(model) -> None:
    """The buffers go to whichever cache steps: the cache holding them gets its own storage
    first, so neither loses tokens."""
    vocab = model.config.vocab_size
    torch.manual_seed(12)
    a_ids, b_ids = torch.randint(0, vocab, (1, 30)), torch.randint(0, vocab, (1, 40))
    decoder = StaticDecoder(model, graphs=False, min_capacity=16)
    a_static, a_reference = prefilled(model, a_ids[:, :10])
    b_static, b_reference = prefilled(model, b_ids[:, :7])
    for i in range(12):
        step_both(model, decoder, a_static, a_reference, int(a_ids[0, 10 + i]), 10 + i)
        step_both(model, decoder, b_static, b_reference, int(b_ids[0, 7 + i]), 7 + i)
    assert b_static.layers[0].uses_buffers(decoder.k_bufs[0], decoder.v_bufs[0])
    assert not a_static.layers[0].uses_buffers(decoder.k_bufs[0], decoder.v_bufs[0])
    assert_same_caches(a_static, a_reference)
    assert_same_caches(b_static, b_reference)
    buffers = decoder.k_bufs[0], decoder.v_bufs[0]
    decoder.release()  # the last one too gets its own storage
    assert decoder.capacity == 0 and not b_static.layers[0].uses_buffers(*buffers)
    assert_same_caches(b_static, b_reference)
    eager(model, torch.tensor([[3]]), b_static, 19)
    eager(model, torch.tensor([[3]]), b_reference, 19)
    assert_same_caches(b_static, b_reference)


def test_steps_that_do_not_fit_fall_back(model) -> None:
    """None (the caller runs its eager forward) for taps, hooks, other caches, an empty cache,
    several tokens, a cache over the largest bucket, or the decoder turned off; the cache is left
    as it was."""
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, 15))
    decoder = StaticDecoder(model, graphs=False, min_capacity=8, max_capacity=16)
    cache, _ = prefilled(model, ids)
    token = torch.tensor([[1]])
    attn = model.model.layers[-1].self_attn
    attn.on_query.append(lambda q: None)
    try:
        assert decoder.step(token, cache, 15) is None
    finally:
        attn.on_query.clear()
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *_: None)
    try:
        assert decoder.step(token, cache, 15) is None and decoder.next_token(1, cache, 15) is None
    finally:
        handle.remove()
    dynamic = DynamicCache()
    eager(model, ids, dynamic, 0)
    assert decoder.step(token, dynamic, 15) is None
    assert decoder.step(token, BufferedCache(), 0) is None
    assert decoder.step(torch.tensor([[1, 2]]), cache, 15) is None
    decoder.enabled = False
    assert decoder.step(token, cache, 15) is None
    decoder.enabled = True
    assert cache.get_seq_length() == 15 and decoder.steps == 0 and decoder.capacity == 0
    assert decoder.step(token, cache, 15) is not None  # 16 tokens: the largest bucket, 16
    assert decoder.step(token, cache, 16) is None  # a 17th would need 32
    assert cache.get_seq_length() == 16 and decoder.steps == 1


def test_engine_decodes_the_same_greedy_tokens_with_the_static_decoder(tiny_llm_dir: Path) -> None:
    from omnistream.reasoning.llm.engine import LLMEngine

    engine = LLMEngine(tiny_llm_dir, dtype="float32", threads=1)
    assert engine.decoder is None  # CUDA only; the CPU keeps its native path
    ids = engine.tokenizer("the butterfly was on the leaf", return_tensors="pt").input_ids
    engine.eos_ids = set()  # a random model: decode the full length
    expected = list(engine.greedy(ids, 30))
    engine.decoder = StaticDecoder(engine.model, graphs=False, min_capacity=8)
    assert list(engine.greedy(ids, 30)) == expected
    assert engine.decoder.steps == 29 and engine.decoder.capacity == bucket(ids.shape[1] + 29, 8)
    # forward's one-token logits are a copy: the next step does not change them.
    cache = BufferedCache()
    engine.forward(ids, cache, 0)
    first = engine.forward(torch.tensor([[expected[0]]]), cache, ids.shape[1])
    kept = first.clone()
    engine.forward(torch.tensor([[expected[1]]]), cache, ids.shape[1] + 1)
    assert torch.equal(first, kept) and engine.decoder.steps == 31


def test_the_engine_takes_the_static_path_only_on_cuda(tiny_llm_dir: Path, monkeypatch) -> None:
    model = load.from_float_dir(tiny_llm_dir)
    assert static_decode.for_model(model) is None  # a CPU model
    monkeypatch.setenv("OMNISTREAM_CUDA_GRAPHS", "0")
    assert not static_decode.enabled_by_env()
    monkeypatch.setenv("OMNISTREAM_CUDA_GRAPHS", "1")
    assert static_decode.enabled_by_env()
    monkeypatch.delenv("OMNISTREAM_CUDA_GRAPHS")
    assert static_decode.enabled_by_env()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_match_eager_steps(tiny_llm_dir: Path) -> None:
    """bf16 on the GPU: graph replays (one capture per bucket) against the model's eager forward."""
    model = load.from_float_dir(tiny_llm_dir, torch.bfloat16, "cuda")
    decoder = StaticDecoder(model, graphs=True, min_capacity=16)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, 60))
    static, reference = BufferedCache(), BufferedCache()
    for cache in (static, reference):
        eager(model, ids[:, :10].cuda(), cache, 0)
    agree = 0
    for i in range(10, 60):
        got = decoder.step(ids[:, i : i + 1], static, i)
        want = eager(model, ids[:, i : i + 1].cuda(), reference, i).cpu()
        assert got is not None
        assert float(torch.nn.functional.cosine_similarity(got, want).min()) > 0.999
        agree += int(got.argmax(-1)) == int(want.argmax(-1))
    assert agree >= 45 and decoder.replays == 50 and decoder.captures == 3  # buckets 16, 32, 64
    for la, lb in zip(static.layers, reference.layers, strict=True):
        torch.testing.assert_close(la.keys.float(), lb.keys.float(), atol=0.05, rtol=0.05)
