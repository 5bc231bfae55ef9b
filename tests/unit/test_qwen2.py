"""The reasoner's own Qwen2 against transformers' Qwen2ForCausalLM on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omnistream.reasoning.llm import load
from omnistream.reasoning.llm import model as qwen2
from omnistream.reasoning.llm.cache import BufferedCache
from omnistream.reasoning.llm.int8 import Int8Embedding, Int8Linear

from ..tiny import save_qwen2


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 with a tied output projection and linear RoPE scaling."""
    return save_qwen2(tmp_path_factory.mktemp("tied"), "tied", seed=1)


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def _run(model, ids: torch.Tensor, cache, start: int, **kwargs) -> torch.Tensor:
    positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    with torch.inference_mode():
        return model(input_ids=ids, cache=cache, use_cache=True, position_ids=positions, **kwargs).logits


@pytest.mark.parametrize("which", ["tiny", "tied"])
def test_logits_and_cache_match_transformers(which: str, tiny_llm_dir: Path, tied_dir: Path) -> None:
    path = tiny_llm_dir if which == "tiny" else tied_dir
    ours, theirs = load.from_float_dir(path), _hf(path)
    vocab = ours.config.vocab_size
    torch.manual_seed(2)
    ids = torch.randint(0, vocab, (1, 30))
    caches = BufferedCache(), BufferedCache()
    # A prefill, one decoded token, another prefill after it: every logit and cached key equal.
    for lo, hi in ((0, 17), (17, 18), (18, 30)):
        a = _run(ours, ids[:, lo:hi], caches[0], lo)
        b = _run(theirs, ids[:, lo:hi], caches[1], lo)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    for la, lb in zip(caches[0].layers, caches[1].layers, strict=True):
        torch.testing.assert_close(la.keys, lb.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(la.values, lb.values, atol=1e-5, rtol=1e-4)
    # logits_to_keep=1: only the last position, the same numbers.
    last = _run(ours, ids, BufferedCache(), 0, logits_to_keep=1)
    full = _run(theirs, ids, BufferedCache(), 0)
    assert last.shape == (1, 1, vocab)
    torch.testing.assert_close(last[0, 0], full[0, -1], atol=2e-5, rtol=1e-4)


def test_on_query_sees_the_q_projection(tiny_llm_dir: Path) -> None:
    ours, theirs = load.from_float_dir(tiny_llm_dir), _hf(tiny_llm_dir)
    ids = torch.randint(0, ours.config.vocab_size, (1, 9))
    seen: list[torch.Tensor] = []
    ours.model.layers[1].self_attn.on_query.append(seen.append)
    expected: list[torch.Tensor] = []
    hook = theirs.model.layers[1].self_attn.q_proj.register_forward_hook(
        lambda _m, _i, out: expected.append(out)
    )
    _run(ours, ids, BufferedCache(), 0)
    _run(theirs, ids, BufferedCache(), 0)
    hook.remove()
    assert len(seen) == 1 and seen[0].shape == (1, 9, ours.config.num_attention_heads * ours.config.head_dim)
    torch.testing.assert_close(seen[0], expected[0], atol=1e-5, rtol=1e-4)


def _transformers_with_int8_layers(float_dir: Path, int8_dir: Path):
    """transformers' Qwen2 with each linear layer replaced by the Int8Linear of the int8 cache."""
    from safetensors.torch import load_file

    theirs = _hf(float_dir)
    tensors = load_file(str(int8_dir / "int8.safetensors"))
    if theirs.config.tie_word_embeddings:
        theirs.lm_head = torch.nn.Linear(1, 1)  # untied: the cache holds the output projection's own rows
    for name, module in list(theirs.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            layer = Int8Linear(
                tensors[f"{name}.qweight"], tensors[f"{name}.scales"], tensors.get(f"{name}.bias")
            )
            setattr(theirs.get_submodule(parent) if parent else theirs, child, layer)
    return theirs


def test_int8_model_matches_transformers_with_the_same_int8_layers(
    tiny_llm_dir: Path, tmp_path: Path
) -> None:
    from omnistream.reasoning.llm.formats import prepare_int8

    int8_dir = prepare_int8(tiny_llm_dir, tmp_path / "tiny-int8")
    ours, theirs = load.from_int8_dir(int8_dir), _transformers_with_int8_layers(tiny_llm_dir, int8_dir)
    # The torch layers, as transformers': the fused native ops sum in another order, and one
    # last-bit difference before a per-row activation quantization moves a value by a rounding
    # step (test_llm_cpu compares the native path with this one at that noise level).
    ours.native_ops = False
    theirs.set_input_embeddings(ours.model.embed_tokens)  # ours keeps the table as int8 rows
    ids = torch.randint(0, ours.config.vocab_size, (1, 25))
    a = _run(ours, ids, BufferedCache(), 0)
    b = _run(theirs, ids, BufferedCache(), 0)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_other_architectures_are_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2}'
    )
    assert not qwen2.is_qwen2(tmp_path)
    with pytest.raises(ValueError, match="llama"):
        qwen2.load_config(tmp_path)


def test_int8_embedding_rows_are_within_half_a_step() -> None:
    torch.manual_seed(3)
    table = torch.randn(1000, 64) * torch.linspace(0.01, 5, 1000)[:, None]
    table[7] = 0.0  # an all-zero row stays zero
    embedding = Int8Embedding(table.to(torch.bfloat16))
    ids = torch.tensor([[0, 7, 500, 999, 7]])
    rows = embedding(ids)[0]
    exact = table.to(torch.bfloat16).float()[ids[0]]
    step = exact.abs().amax(dim=1, keepdim=True) / 127
    assert rows.dtype == torch.float32 and rows.shape == (5, 64)
    assert bool(((rows - exact).abs() <= step / 2 + 1e-6).all())
    assert bool((rows[1] == 0).all())
    assert embedding.qweight.dtype == torch.int8 and embedding.qweight.element_size() == 1


def test_causal_prefill_without_a_mask_matches_the_boolean_mask(tiny_llm_dir: Path) -> None:
    """A prefill with nothing cached runs SDPA with is_causal=True (no mask tensor: a GPU's fused
    kernels); on the CPU its logits and cache equal the explicit boolean mask's."""
    ours = load.from_float_dir(tiny_llm_dir)
    ours.native_ops = False  # the torch layers (the GPU's path)
    torch.manual_seed(3)
    ids = torch.randint(0, ours.config.vocab_size, (1, 23))
    seen: list[object] = []
    layer0 = ours.model.layers[0].self_attn
    hook = layer0.register_forward_pre_hook(lambda _m, args: seen.append(args[4]))
    causal_cache = BufferedCache()
    causal = _run(ours, ids, causal_cache, 0)
    hook.remove()
    assert seen == [True]  # nothing cached: is_causal, no mask built

    x = ours.model.embed_tokens(ids)
    cos, sin = ours.model.rotary(torch.arange(23), x.dtype)
    mask = qwen2.causal_mask(23, 0, x.device)
    masked_cache = BufferedCache()
    with torch.inference_mode():
        for layer in ours.model.layers:
            x = layer(x, cos, sin, masked_cache, mask)
        masked = ours.lm_head(ours.model.norm(x))
    torch.testing.assert_close(causal, masked, atol=1e-5, rtol=1e-5)
    assert causal.argmax(-1).tolist() == masked.argmax(-1).tolist()
    for a, b in zip(causal_cache.layers, masked_cache.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-6, rtol=1e-6)
    # After a cache, the mask is built (the new tokens see every cached one).
    seen.clear()
    hook = layer0.register_forward_pre_hook(lambda _m, args: seen.append(args[4]))
    _run(ours, ids[:, :5], causal_cache, 23)
    hook.remove()
    assert isinstance(seen[0], torch.Tensor) and seen[0].shape == (5, 28)
    assert bool(seen[0][:, :23].all()) and seen[0][:, 23:].sum(1).tolist() == [1, 2, 3, 4, 5]
