"""Weight formats and the in-place KV cache, on a tiny Qwen2 built from a config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, Qwen2ForCausalLM

from omnistream.reasoning.llm import load
from omnistream.reasoning.llm.cache import BufferedCache
from omnistream.reasoning.llm.engine import LLMEngine
from omnistream.reasoning.llm.formats import choose, int8_cache, prepare_int8, resolve_format
from omnistream.reasoning.llm.int8 import WEIGHT_MAX, Int8Linear


def test_buffered_cache_equals_dynamic_cache_through_appends_crops_and_assignments() -> None:
    torch.manual_seed(0)
    ours, theirs = BufferedCache(), DynamicCache()
    for step in range(300):
        n = 5 if step % 7 == 0 else 1
        k, v = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
        for layer in range(2):
            a, b = ours.update(k, v, layer), theirs.update(k, v, layer)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        if step % 50 == 0:
            ours.crop(-3)
            theirs.crop(-3)
        if step == 120:  # the streaming memory assigns evicted layers directly
            for cache in (ours, theirs):
                cache.layers[0].keys = cache.layers[0].keys[:, :, 10:].clone()
                cache.layers[0].values = cache.layers[0].values[:, :, 10:].clone()
    assert ours.get_seq_length() == theirs.get_seq_length() > 300
    for mine, reference in zip(ours.layers, theirs.layers, strict=True):
        assert torch.equal(mine.keys, reference.keys) and torch.equal(mine.values, reference.values)
    # Appending reuses the buffer: far fewer reallocations than tokens.
    assert ours.layers[1].nbytes_reserved() < 2 * ours.layers[1].keys.numel() * 4 * 2 + 256 * 2 * 8 * 4 * 2


def test_buffered_cache_rejects_a_positive_crop() -> None:
    cache = BufferedCache()
    cache.update(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2), 0)
    with pytest.raises(ValueError, match="negative"):
        cache.crop(2)


def test_int8_linear_is_exact_on_its_grid_and_close_on_real_weights() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    quantized = Int8Linear.from_linear(linear)
    qweight, scales, bias = quantized.unpacked()
    assert qweight.dtype == torch.int8 and int(qweight.abs().max()) == WEIGHT_MAX
    assert torch.equal(bias, linear.bias.data)
    dequantized = qweight.float() * scales[:, None]
    assert (dequantized - linear.weight.data).abs().max() <= scales.max() / 2 + 1e-7
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        expected, got = linear(x), quantized(x)
    assert got.shape == expected.shape
    assert (got - expected).norm() / expected.norm() < 0.03


def test_an_outlier_token_does_not_change_the_other_rows() -> None:
    """The attention-sink token's activations are orders of magnitude larger than the others';
    one activation scale for the whole prefill would flatten every other row."""
    torch.manual_seed(1)
    quantized = Int8Linear.from_linear(torch.nn.Linear(64, 32))
    rows = torch.randn(6, 64)
    outlier = torch.randn(1, 64) * 500
    with torch.inference_mode():
        alone = quantized(rows)
        together = quantized(torch.cat([outlier, rows]))
    assert torch.equal(together[1:], alone)
    torch.testing.assert_close(together[:1], quantized(outlier), rtol=0, atol=0)


def test_int8_linear_names_a_bad_weight() -> None:
    with pytest.raises(ValueError, match="int8"):
        Int8Linear(torch.zeros(4, 4), torch.ones(4), None)
    with pytest.raises(ValueError, match="scale per output row"):
        Int8Linear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(3), None)


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_llm_dir: Path) -> Path:
    return tiny_llm_dir


def _quantized_in_memory(model_dir: Path, embedding: torch.nn.Module):
    """The float model with every linear layer quantized in memory (no cache file)."""
    model = load.from_float_dir(model_dir)
    for layer in model.model.layers:
        for parent, name in (
            (layer.self_attn, "qkv_proj"),
            (layer.self_attn, "o_proj"),
            (layer.mlp, "gate_up_proj"),
            (layer.mlp, "down_proj"),
        ):
            setattr(parent, name, Int8Linear.from_linear(getattr(parent, name)))
    model.lm_head = Int8Linear.from_linear(model.lm_head)
    model.model.embed_tokens = embedding
    return model


def test_int8_cache_loads_the_same_model_it_saved(tiny_model_dir: Path) -> None:
    out = prepare_int8(tiny_model_dir)
    assert out == int8_cache(tiny_model_dir) and out.parent == tiny_model_dir.parent
    assert out.name.startswith("int8-") and (out / "int8.safetensors").exists()
    loaded = load.from_int8_dir(out)
    reference = Qwen2ForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    in_memory = _quantized_in_memory(tiny_model_dir, loaded.model.embed_tokens)
    assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == 2 * 4 + 1  # fused; lm_head included
    ids = torch.tensor([[5, 17, 99, 300, 42, 7, 1000, 3]])
    with torch.inference_mode():
        from_disk, fresh, exact = (m(input_ids=ids).logits for m in (loaded, in_memory, reference))
    assert torch.equal(from_disk, fresh)  # the cache holds exactly what quantization made
    assert (from_disk - exact).norm() / exact.norm() < 0.05
    assert (from_disk.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.75


def test_engine_runs_int8_and_decodes_the_greedy_sequence(tiny_model_dir: Path) -> None:
    engine = LLMEngine(tiny_model_dir, dtype="int8", threads=1)
    assert engine.format == "int8" and engine.dtype == torch.float32
    ids = engine.tokenizer("the butterfly was on the leaf", return_tensors="pt").input_ids
    decoded = list(engine.greedy(ids, 12))
    seq = ids
    with torch.inference_mode():  # reference: the whole sequence recomputed each step, no cache
        for _ in range(12):
            next_id = engine.model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            if int(next_id) in engine.eos_ids:
                break
            seq = torch.cat([seq, next_id], dim=1)
    assert decoded == seq[0, ids.shape[1] :].tolist() and len(decoded) == 12


@pytest.mark.parametrize(
    "text",
    ["the butterfly's wings, unbelievably bright!", "naïve café — 東京 ok", "one two, three: four five"],
)
def test_text_stream_pieces_add_up_to_one_decode(tiny_model_dir: Path, text: str) -> None:
    from transformers import AutoTokenizer

    from omnistream.reasoning.llm.engine import TextStream

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    stream = TextStream(tokenizer)
    pieces = [stream.push(token_id) for token_id in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert sum(1 for piece in pieces if piece) > 3


def test_format_names_are_checked() -> None:
    assert resolve_format("float32") == "float32"
    assert resolve_format("auto") in ("int8", "bfloat16")
    assert choose("int8").dtype == torch.float32 and choose("int8").device == "cpu"
    with pytest.raises(ValueError, match="reasoning.dtype"):
        resolve_format("int4")


def test_two_local_models_get_their_own_int8_caches(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A second local model must never load the first one's int8 weights: caches are named by
    the weights' fingerprint (names sharing a prefix, or the same name in two folders, do not
    matter), and a cache directory made from other weights is rebuilt."""
    import shutil

    first, second, same_name = tmp_path / "qwen-1b", tmp_path / "qwen-7b", tmp_path / "other" / "qwen-1b"
    shutil.copytree(tiny_model_dir, first)
    model = Qwen2ForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    torch.manual_seed(1)
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.05)
    shutil.copytree(tiny_model_dir, second)
    model.save_pretrained(second)
    shutil.copytree(second, same_name)
    assert int8_cache(first) != int8_cache(second)
    assert int8_cache(first).name != int8_cache(same_name).name  # same directory name, other weights
    assert int8_cache(second).name == int8_cache(same_name).name  # same weights: same fingerprint
    ids = torch.tensor([[5, 17, 99, 300]])
    with torch.inference_mode():
        a = load.from_int8_dir(prepare_int8(first))(ids).logits
        b = load.from_int8_dir(prepare_int8(second))(ids).logits
        assert not torch.allclose(a, b)
        assert torch.equal(load.from_int8_dir(prepare_int8(same_name))(ids).logits, b)
        # The same cache directory reused for other weights (a model replaced in place) is rebuilt.
        shared = tmp_path / "shared-int8"
        assert torch.equal(load.from_int8_dir(prepare_int8(first, shared))(ids).logits, a)
        assert torch.equal(load.from_int8_dir(prepare_int8(second, shared))(ids).logits, b)


def test_the_engine_runs_qwen2_only(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2}'
    )
    with pytest.raises(ValueError, match="Qwen2"):
        LLMEngine(tmp_path, "float32", 1)


def test_a_prepared_model_finds_its_gguf_by_its_marker_not_its_name(tmp_path: Path) -> None:
    """``llm.prepare`` records the GGUF a directory was converted from (CONVERTED); the GGUF
    counts only with its sha256 marker (a complete reassembly)."""
    from omnistream.reasoning.llm.formats import gguf_file

    model_dir = tmp_path / "llm" / "renamed-anything"
    model_dir.mkdir(parents=True)
    (model_dir / "CONVERTED").write_text("qwen-x.gguf")
    gguf = tmp_path / "gguf" / "qwen-x.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert gguf_file(model_dir) is None  # no sha256 marker: an interrupted reassembly
    gguf.with_suffix(".gguf.sha256").write_text("0" * 64)
    assert gguf_file(model_dir) == gguf
    assert int8_cache(model_dir).parent == tmp_path / "llm"
