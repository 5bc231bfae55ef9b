"""GGUF blocks run as they are (kernels/cpu/kquant.c, kquant.py; the file read by reasoning/llm/gguf.py): the repacked blocks
dequantize exactly as the gguf package's reference, each block type's GEMM equals a float64
reference built from the dequantized weights and the kernel's own activation quantization, and a
tiny Qwen2 read from a synthetic GGUF matches the float model built from its dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnistream.kernels import cpu as native
from omnistream.kernels import reference as ref
from omnistream.kernels.cpu import kquant
from omnistream.reasoning.llm import gguf as gguf_reader
from omnistream.reasoning.llm import load

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

pytestmark = pytest.mark.skipif(
    not kquant.available(), reason="native kernel unavailable (no compiler or no AVX2)"
)

TYPES = (kquant.Q4_K, kquant.Q6_K, kquant.Q8_0, kquant.Q5_0)
ACT_BLOCK = {kquant.Q4_K: 256, kquant.Q6_K: 256, kquant.Q8_0: 32, kquant.Q5_0: 32}


def random_blocks(qtype: int, rows: int, cols: int, seed: int, scale: float = 0.01) -> np.ndarray:
    """GGUF blocks (rows, bytes) of ``qtype``: the gguf package's own quantization of random
    weights where it has one (Q8_0, Q5_0), else random valid blocks (every byte pattern of a
    K-quant block is valid; only the f16 super-block scales are set to small positive values)."""
    rng = np.random.default_rng(seed)
    if qtype in (kquant.Q8_0, kquant.Q5_0):
        return quantize((rng.standard_normal((rows, cols)) * scale * 10).astype(np.float32), GT(qtype))
    nb = cols // 256
    raw = rng.integers(0, 256, size=(rows, nb, kquant.GGUF_BYTES[qtype]), dtype=np.uint8)
    scales = (rng.random((rows, nb, 2)) * scale + scale / 10).astype(np.float16).view(np.uint8)
    if qtype == kquant.Q4_K:
        raw[:, :, 0:4] = scales.reshape(rows, nb, 4)  # d, dmin
    else:
        raw[:, :, 208:210] = scales.reshape(rows, nb, 4)[:, :, 0:2]  # d (after ql, qh, scales)
    return raw.reshape(rows, -1)


def centered_q4k(rows: int, cols: int, seed: int, scale: float) -> np.ndarray:
    """Random Q4_K blocks whose weights have mean ~0 (dmin = d, mins = 7.5 x scales), packed as
    GGUF packs 6-bit scales/mins into 12 bytes: a model built from them stays well conditioned."""
    raw = random_blocks(kquant.Q4_K, rows, cols, seed, scale).reshape(rows, -1, 144)
    rng = np.random.default_rng(seed)
    sc = rng.integers(1, 9, size=raw.shape[:2] + (8,))
    mn = np.round(sc * 7.5).astype(np.int64)
    packed = np.zeros(raw.shape[:2] + (12,), dtype=np.int64)
    packed[..., 0:4] = sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6)
    packed[..., 4:8] = mn[..., 0:4] | ((mn[..., 4:8] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:8] & 0xF) | ((mn[..., 4:8] & 0xF) << 4)
    raw[..., 2:4] = raw[..., 0:2]  # dmin = d
    raw[..., 4:16] = packed.astype(np.uint8)
    return raw.reshape(rows, -1)


def reference(
    x: torch.Tensor, w: np.ndarray, qtype: int, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 reference, float64 bound of the sum of |terms|): ``reference.kquant_linear`` on
    the kernel's quantized activations (checked against ``reference.kquant_activations`` in
    test_activation_quantization) and the gguf package's dequantized weights."""
    q, d, _ = kquant.quantize_activations(x, ACT_BLOCK[qtype])
    return ref.kquant_linear(q.float(), d, torch.from_numpy(w), bias)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: kquant.NAMES[t])
def test_dequantize_matches_gguf(qtype):
    cols = 512
    raw = random_blocks(qtype, 9, cols, seed=qtype)
    weight = kquant.QTensor.from_gguf_blocks(qtype, raw, cols)
    expected = dequantize(raw, GT(qtype)).reshape(9, cols)
    assert np.array_equal(weight.dequantize().numpy(), expected)
    rows = torch.tensor([4, 0, 8, 4])
    assert np.array_equal(weight.dequantize(rows).numpy(), expected[rows.numpy()])
    assert (
        weight.nbytes
        == 9 * cols // (256 if qtype in (kquant.Q4_K, kquant.Q6_K) else 32) * kquant.BYTES[qtype]
    )


def test_q4k_repack_spreads_scales():
    """The 6-bit scales/mins of Q4_K's 12 bytes, as bytes (the packing of ggml's get_scale_min_k4)."""
    raw = random_blocks(kquant.Q4_K, 3, 256, seed=5)
    packed = raw[:, 4:16].astype(np.int32)
    out = kquant.repack(kquant.Q4_K, raw)
    for j in range(8):
        if j < 4:
            sc, mn = packed[:, j] & 63, packed[:, j + 4] & 63
        else:
            sc = (packed[:, j + 4] & 0xF) | ((packed[:, j - 4] >> 6) << 4)
            mn = (packed[:, j + 4] >> 4) | ((packed[:, j] >> 6) << 4)
        assert np.array_equal(out[:, 4 + j], sc) and np.array_equal(out[:, 12 + j], mn)
    assert np.array_equal(out[:, 20:], raw[:, 16:])


@pytest.mark.parametrize("block", [256, 32])
def test_activation_quantization(block):
    x = torch.randn(3, 512) * torch.tensor([0.1, 1.0, 30.0])[:, None]
    x[1, 7] = 0.0
    x[2, :block] = 0.0  # an all-zero block: scale 0, values 0
    q, d, s = kquant.quantize_activations(x, block)
    amax = x.abs().reshape(3, -1, block).amax(dim=2)
    assert torch.allclose(d, amax / 127)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    expected = (x.reshape(3, -1, block) * inv[:, :, None]).reshape(3, 512)
    assert (q.float() - expected).abs().max() <= 0.5 + 1e-4
    assert q.abs().max() <= 127 and q[2, :block].eq(0).all()
    assert torch.equal(s.int(), q.int().reshape(3, -1, 16).sum(dim=2))
    values, scales = ref.kquant_activations(x, block)  # the torch reference: ties may round apart
    assert torch.allclose(d, scales) and (q.float() - values).abs().max() <= 1


@pytest.mark.parametrize("n", [3, 4, 5, 7, 26])
@pytest.mark.parametrize("m", [4, 5, 6, 7, 9])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: kquant.NAMES[t])
def test_prefill_tiles_equal_decode_tiles(qtype, m, n):
    """Every prefill tile (the assembly 4 x 3 ones, the 4 x 2 and 1-row tails for the rest of the
    rows and tokens) gives bit for bit what decoding one token at a time gives: the same integer
    sums and float steps per output."""
    k = 512
    raw = random_blocks(qtype, n, k, seed=100 * m + n + qtype)
    layer = kquant.KQuantLinear([kquant.QTensor.from_gguf_blocks(qtype, raw, k)], torch.randn(n))
    x = torch.randn(m, k) * 2
    x[1, 5] = -30.0
    native.set_threads(1)
    try:
        y = layer(x)
        one = torch.cat([layer(x[i : i + 1]) for i in range(m)])
    finally:
        native.set_threads(None)
    assert torch.equal(y, one)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape", [(1, 7, 512), (1, 64, 768), (5, 13, 768), (11, 33, 1024), (37, 70, 256), (800, 5, 256)]
)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: kquant.NAMES[t])
def test_gemm_matches_reference(qtype, shape, threads):
    m, n, k = shape
    raw = random_blocks(qtype, n, k, seed=m * n + qtype)
    weight = kquant.QTensor.from_gguf_blocks(qtype, raw, k)
    x = torch.randn(m, k) * 2
    x[0, 3] = 40.0  # an outlier: only its own block's scale grows
    bias = torch.randn(n) if m % 2 else None
    native.set_threads(threads)
    try:
        y = kquant.KQuantLinear([weight], bias)(x)
    finally:
        native.set_threads(None)
    expected, bound = reference(x, dequantize(raw, GT(qtype)).reshape(n, k), qtype, bias)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # float32 rounding of the per-block products and sums only: exact integer dot products inside
    assert ((y.double() - expected).abs() <= 2e-6 * bound + 1e-6).all()


def test_fused_parts_of_different_types():
    """q/k rows as Q4_K, v rows as Q6_K (the 1.5B's attention): one layer, one output."""
    k = 512
    parts = [(kquant.Q4_K, 24), (kquant.Q6_K, 8), (kquant.Q5_0, 5)]
    raws = [random_blocks(t, n, k, seed=i) for i, (t, n) in enumerate(parts)]
    layer = kquant.KQuantLinear(
        [kquant.QTensor.from_gguf_blocks(t, r, k) for (t, _), r in zip(parts, raws, strict=True)],
        torch.randn(37),
    )
    x = torch.randn(2, 3, k)
    y = layer(x)
    assert y.shape == (2, 3, 37)
    row = 0
    for (t, n), r in zip(parts, raws, strict=True):
        expected, bound = reference(
            x.reshape(6, k), dequantize(r, GT(t)).reshape(n, k), t, layer.bias[row : row + n]
        )
        assert ((y.reshape(6, 37)[:, row : row + n].double() - expected).abs() <= 2e-6 * bound + 1e-6).all()
        row += n


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        kquant.QTensor.from_gguf_blocks(kquant.Q4_K, np.zeros((2, 144), np.uint8), 512)
    weight = kquant.QTensor.from_gguf_blocks(kquant.Q8_0, random_blocks(kquant.Q8_0, 4, 64, 1), 64)
    with pytest.raises(ValueError):
        kquant.KQuantLinear([weight])(torch.randn(1, 32))
    with pytest.raises(IndexError):
        weight.dequantize(torch.tensor([4]))


# -- a tiny Qwen2 from a synthetic GGUF ------------------------------------------------------------

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 512, 4, 2, 2, 320


def write_tiny_gguf(path, tied: bool, vocab: int = VOCAB) -> dict[str, tuple[int, np.ndarray]]:
    """A 2-layer Qwen2 GGUF mixing every supported type; returns {name: (type, blocks or floats)}."""
    rng = np.random.default_rng(7)
    head_dim = HIDDEN // HEADS
    layout = {"token_embd": (kquant.Q4_K, vocab, HIDDEN)}
    if not tied:
        layout["output"] = (kquant.Q6_K, vocab, HIDDEN)
    for i in range(LAYERS):
        layout |= {
            f"blk.{i}.attn_q": (kquant.Q4_K, HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_k": (kquant.Q5_0 if i else kquant.Q4_K, KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_v": (kquant.Q6_K if i else kquant.Q8_0, KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_output": (kquant.Q8_0, HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate": (kquant.Q4_K, FFN, HIDDEN),
            f"blk.{i}.ffn_up": (kquant.Q5_0, FFN, HIDDEN),
            f"blk.{i}.ffn_down": (kquant.Q6_K if i else kquant.Q4_K, HIDDEN, FFN),
        }
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(1000000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    tensors: dict[str, tuple[int, np.ndarray]] = {}
    for seed, (name, (qtype, rows, cols)) in enumerate(layout.items()):
        # weights of about 0.04: Q4_K d x scale (~4.5) x (q - 7.5), Q6_K d x scale (~64) x (q - 32)
        if qtype == kquant.Q4_K:
            raw = centered_q4k(rows, cols, seed=100 + seed, scale=0.002)
        else:
            raw = random_blocks(
                qtype, rows, cols, seed=100 + seed, scale=4e-5 if qtype == kquant.Q6_K else 0.004
            )
        writer.add_tensor(f"{name}.weight", raw, raw_dtype=GT(qtype))
        tensors[f"{name}.weight"] = (qtype, raw)
    floats = {"output_norm.weight": HIDDEN}
    for i in range(LAYERS):
        floats |= {f"blk.{i}.attn_norm.weight": HIDDEN, f"blk.{i}.ffn_norm.weight": HIDDEN}
        floats |= {f"blk.{i}.attn_{p}.bias": n for p, n in (("q", HIDDEN), ("k", 128), ("v", 128))}
    for name, n in floats.items():
        value = 1.0 + 0.1 * rng.standard_normal(n) if "norm" in name else 0.05 * rng.standard_normal(n)
        writer.add_tensor(name, value.astype(np.float32))
        tensors[name] = (0, value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def float_model(tensors: dict[str, tuple[int, np.ndarray]]):
    """The same model with float32 weights dequantized by the gguf package (nn.Linear layers)."""

    def weight(name: str) -> torch.Tensor:
        qtype, data = tensors[name]
        if qtype == 0:
            return torch.from_numpy(data)
        rows = data.shape[0]
        return torch.from_numpy(dequantize(data, GT(qtype)).reshape(rows, -1).copy())

    names = {n: weight(n) for n in tensors}
    if "output.weight" not in names:
        names["output.weight"] = names["token_embd.weight"]
    meta = {
        "general.architecture": "qwen2",
        "qwen2.attention.head_count": HEADS,
        "qwen2.attention.head_count_kv": KV_HEADS,
        "qwen2.embedding_length": HIDDEN,
        "qwen2.feed_forward_length": FFN,
        "qwen2.block_count": LAYERS,
        "qwen2.rope.freq_base": 1000000.0,
    }
    config = load.config_from_gguf(meta, VOCAB, "output.weight" not in tensors)
    norms = {"model.norm.weight": names["output_norm.weight"]}
    for i in range(LAYERS):
        norms[f"model.layers.{i}.input_layernorm.weight"] = names[f"blk.{i}.attn_norm.weight"]
        norms[f"model.layers.{i}.post_attention_layernorm.weight"] = names[f"blk.{i}.ffn_norm.weight"]

    def make_linear(hf_names: list[str]):
        bases = [load.gguf_tensor_name(n) for n in hf_names]
        ws = [names[f"{b}.weight"] for b in bases]
        bias = load._joined_bias([names.get(f"{b}.bias") for b in bases], [w.shape[0] for w in ws])
        return load._linear(torch.cat(ws), bias)

    embedding = torch.nn.Embedding.from_pretrained(names["token_embd.weight"], freeze=True)
    return load.build(config, norms, make_linear, embedding)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_qwen2_from_gguf_matches_float(tmp_path, tied):
    from omnistream.reasoning.llm.cache import BufferedCache

    path = tmp_path / "tiny.gguf"
    tensors = write_tiny_gguf(path, tied)
    model = load.from_gguf(path)
    reference_model = float_model(tensors)
    assert model.config.num_key_value_heads == KV_HEADS and model.config.tie_word_embeddings == tied
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert [p.qtype for p in qkv.parts] == [kquant.Q4_K, kquant.Q8_0]  # q and k merged, v on its own
    assert isinstance(model.model.embed_tokens, kquant.KQuantEmbedding)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    got = model(input_ids=ids, cache=BufferedCache()).logits
    want = reference_model(input_ids=ids, cache=BufferedCache()).logits
    # int8 activations per block: a few % of the logits' spread, and the same top token
    assert (got - want).abs().max() < 0.1 * want.std()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    # decoding one token after a prefill (the M = 1 path) agrees as well
    cache = BufferedCache()
    model(input_ids=ids[:, :11], cache=cache)
    step = model(input_ids=ids[:, 11:], cache=cache).logits
    assert (step[0, -1] - want[0, -1]).abs().max() < 0.1 * want.std()


def test_engine_runs_gguf_and_auto_picks_it(tmp_path, tiny_llm_dir):
    """A Qwen2 directory with its GGUF inside: "auto" resolves to "gguf" on a CPU, and the engine's
    cached greedy decoding equals recomputing the whole sequence each step."""
    import json
    import shutil

    from omnistream.reasoning.llm.engine import LLMEngine
    from omnistream.reasoning.llm.formats import gguf_file, resolve_format

    model_dir = tmp_path / "tiny-gguf"
    shutil.copytree(tiny_llm_dir, model_dir, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    vocab = json.loads((tiny_llm_dir / "config.json").read_text())["vocab_size"]
    write_tiny_gguf(model_dir / "tiny.gguf", tied=True, vocab=vocab)
    config = {
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    assert gguf_file(model_dir) == model_dir / "tiny.gguf"
    assert resolve_format("auto", tiny_llm_dir) in ("int8", "bfloat16")  # no GGUF there
    if not torch.cuda.is_available():
        assert resolve_format("auto", model_dir) == "gguf"
    engine = LLMEngine(model_dir, dtype="gguf", threads=2)
    assert engine.format == "gguf" and engine.dtype == torch.float32
    assert isinstance(engine.model.lm_head, kquant.KQuantLinear)
    ids = engine.tokenizer("the butterfly was on the leaf", return_tensors="pt").input_ids
    decoded = list(engine.greedy(ids, 8))
    seq = ids
    with torch.inference_mode():
        for _ in range(8):
            next_id = engine.model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            if int(next_id) in engine.eos_ids:
                break
            seq = torch.cat([seq, next_id], dim=1)
    assert decoded == seq[0, ids.shape[1] :].tolist()


def test_gguf_header_and_k_quant_share(tmp_path):
    """Our GGUF reader: metadata scalars, tensor table and data offsets as the gguf package wrote
    them; the K-quant share "auto" uses to choose the format."""
    path = tmp_path / "tiny.gguf"
    tensors = write_tiny_gguf(path, tied=False)
    read, meta = gguf_reader.read_gguf(path)
    assert meta["general.architecture"] == "qwen2" and meta["qwen2.block_count"] == LAYERS
    assert set(read) == set(tensors)
    for name, (qtype, data) in tensors.items():
        if qtype == 0:
            assert torch.equal(read[name], torch.from_numpy(data))
        else:
            assert read[name].qtype == qtype and read[name].rows == data.shape[0]
            assert np.array_equal(
                read[name].dequantize().numpy(), dequantize(data, GT(qtype)).reshape(data.shape[0], -1)
            )
    assert gguf_reader.supports(path)
    share = gguf_reader.k_quant_share(path)
    k_bytes = sum(d.nbytes for t, d in tensors.values() if t in (kquant.Q4_K, kquant.Q6_K))
    all_bytes = sum(d.nbytes for t, d in tensors.values() if t)
    assert share == pytest.approx(k_bytes / all_bytes)
    only_q8 = tmp_path / "q8.gguf"
    writer = gguf.GGUFWriter(str(only_q8), "qwen2")
    writer.add_tensor("w.weight", random_blocks(kquant.Q8_0, 4, 64, 1), raw_dtype=GT.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_reader.k_quant_share(only_q8) == 0.0 and gguf_reader.supports(only_q8)
    assert not gguf_reader.supports(tmp_path / "missing.gguf")
