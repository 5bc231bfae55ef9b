"""The torch references against plain per-element math on tiny inputs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from omnistream.kernels import reference
from omnistream.kernels.rope import Rope


def test_empty_is_poisoned_with_nan() -> None:
    assert torch.isnan(torch.empty(3)).all()
    assert (torch.empty(2, dtype=torch.int64) == -1).all()


def test_frame_preprocess_same_size_is_per_pixel_normalisation() -> None:
    frames = torch.arange(2 * 4 * 6 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 4, 6, 3)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = reference.frame_preprocess(frames, 4, mean, std, center_crop=True, antialias=False)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    for b, c, y, x in [(0, 0, 0, 0), (1, 2, 3, 3), (0, 1, 2, 1)]:
        pixel = frames[b, y, x + 1, c].item()  # centre crop of width 6 to 4 starts at column 1
        assert out[b, c, y, x].item() == pytest.approx((pixel / 255 - mean[c]) / std[c], abs=1e-6)


def test_frame_preprocess_halving_weights() -> None:
    row = torch.tensor([0, 60, 120, 250], dtype=torch.uint8)
    frames = row.view(1, 1, 4, 1).expand(1, 4, 4, 3).contiguous()
    unit = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    plain = reference.frame_preprocess(frames, 2, *unit, antialias=False)
    # align_corners=False: output pixel 0 samples source 0.5, pixel 1 samples 2.5.
    assert plain[0, 0, 0].tolist() == pytest.approx([30 / 255, 185 / 255], abs=1e-6)
    smooth = reference.frame_preprocess(frames, 2, *unit, antialias=True)
    # Triangle filter of half-width 2 centred at 1 and 3, weights normalised per output pixel.
    left = (0.75 * 0 + 0.75 * 60 + 0.25 * 120) / 1.75
    right = (0.25 * 60 + 0.75 * 120 + 0.75 * 250) / 1.75
    assert smooth[0, 1, 1].tolist() == pytest.approx([left / 255, right / 255], abs=1e-6)


def test_frame_preprocess_rejects_bad_frames() -> None:
    with pytest.raises(ValueError, match="uint8"):
        reference.frame_preprocess(torch.zeros(1, 4, 4, 3), 2, (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="resize"):
        reference.frame_preprocess(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), 0, (0, 0, 0), (1, 1, 1))


def test_rope_inv_freq_and_config() -> None:
    rope = Rope(head_dim=8, theta=10000.0)
    expected = [10000.0 ** (-i / 8) for i in (0, 2, 4, 6)]
    assert rope.inv_freq().tolist() == pytest.approx(expected, rel=1e-6)
    linear = Rope(head_dim=8, theta=10000.0, scaling="linear", factor=4.0)
    assert linear.inv_freq().tolist() == pytest.approx([f / 4 for f in expected], rel=1e-6)
    config = SimpleNamespace(
        rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0},
        head_dim=None,
        hidden_size=896,
        num_attention_heads=14,
    )
    assert Rope.from_hf_config(config) == Rope(head_dim=64, theta=1e6, scaling="linear", factor=2.0)
    with pytest.raises(ValueError):
        Rope(head_dim=7)
    with pytest.raises(ValueError):
        Rope(head_dim=8, scaling="yarn")


def test_rope_rotate_is_a_rotation_of_half_pairs() -> None:
    inv_freq = Rope(head_dim=4, theta=100.0).inv_freq()  # pairs (0, 2) and (1, 3)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0]])
    delta = torch.tensor([3, -7])
    out = reference.rope_rotate(x, delta, inv_freq)
    for t in range(2):
        for i in range(2):
            angle = delta[t].item() * inv_freq[i].item()
            a, b = x[t, i].item(), x[t, i + 2].item()
            assert out[t, i].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-5)
            assert out[t, i + 2].item() == pytest.approx(b * math.cos(angle) + a * math.sin(angle), abs=1e-5)
    there_and_back = reference.rope_rotate(reference.rope_rotate(x, delta, inv_freq), -delta, inv_freq)
    torch.testing.assert_close(there_and_back, x, atol=1e-6, rtol=0)


def test_rope_rotate_matches_transformers_qwen2() -> None:
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

    config = Qwen2Config(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0},
    )
    rope = Rope.from_hf_config(config)
    assert (rope.head_dim, rope.scaling, rope.factor) == (16, "linear", 2.0)
    keys = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[0, 3, 17, 400, 9000]])
    cos, sin = Qwen2RotaryEmbedding(config)(keys, positions)
    _, expected = apply_rotary_pos_emb(keys, keys, cos, sin)
    torch.testing.assert_close(
        reference.rope_rotate(keys, positions[0], rope.inv_freq()), expected, atol=1e-5, rtol=1e-5
    )


def _plain_scores(queries, pooled, metric, head_reduce, token_reduce) -> list[list[float]]:
    layers, q_heads, tokens, head_dim = queries.shape
    blocks, kv_heads = pooled.shape[1], pooled.shape[2]
    group = q_heads // kv_heads

    def score(q, k) -> float:
        dot = sum(q[i].item() * k[i].item() for i in range(head_dim))
        if metric == "cosine":
            dot /= math.sqrt(sum(v.item() ** 2 for v in q)) * math.sqrt(sum(v.item() ** 2 for v in k))
        return dot

    def reduce(values: list[float], how: str) -> float:
        return max(values) if how == "max" else sum(values) / len(values)

    return [
        [
            reduce(
                [
                    reduce(
                        [score(queries[layer, h, t], pooled[layer, n, h // group]) for t in range(tokens)],
                        token_reduce,
                    )
                    for h in range(q_heads)
                ],
                head_reduce,
            )
            for n in range(blocks)
        ]
        for layer in range(layers)
    ]


@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("head_reduce", ["max", "mean"])
@pytest.mark.parametrize("token_reduce", ["max", "mean"])
def test_block_scores_per_element(metric: str, head_reduce: str, token_reduce: str) -> None:
    gen = torch.Generator().manual_seed(2)
    queries = torch.randn(2, 4, 3, 5, generator=gen)
    pooled = torch.randn(2, 6, 2, 5, generator=gen)
    got = reference.block_scores(queries, pooled, metric, head_reduce, token_reduce)
    assert got.tolist() == [
        pytest.approx(row, abs=1e-5)
        for row in _plain_scores(queries, pooled, metric, head_reduce, token_reduce)
    ]


def test_block_scores_groups_query_heads_onto_kv_heads() -> None:
    queries = torch.zeros(1, 4, 1, 2)
    queries[0, 3, 0] = torch.tensor([1.0, 0.0])  # only query head 3 asks, and it reads KV head 1
    pooled = torch.zeros(1, 3, 2, 2)
    pooled[0, 0, 0] = torch.tensor([5.0, 0.0])  # block 0 matches on KV head 0: invisible to head 3
    pooled[0, 2, 1] = torch.tensor([2.0, 0.0])
    assert reference.block_scores(queries, pooled).tolist() == [[0.0, 0.0, 2.0]]


def test_block_scores_topk_orders_masks_and_clips() -> None:
    queries = torch.ones(2, 2, 1, 1)
    pooled = torch.tensor([[3.0, 1.0, 4.0, 1.5], [0.0, 2.0, -1.0, 5.0]]).view(2, 4, 1, 1)
    best = reference.block_scores_topk(queries, pooled, k=2)
    assert best.ids.tolist() == [[2, 0], [3, 1]]
    assert best.scores.tolist() == [[4.0, 3.0], [5.0, 2.0]]
    allowed = torch.tensor([True, True, False, True])
    assert reference.block_scores_topk(queries, pooled, k=2, allowed=allowed).ids.tolist() == [[0, 3], [3, 1]]
    assert reference.block_scores_topk(queries, pooled, k=10).ids.shape == (2, 4)
    with pytest.raises(ValueError):
        reference.block_scores_topk(queries, pooled, k=0)
    with pytest.raises(ValueError, match="multiple"):
        reference.block_scores(torch.ones(2, 3, 1, 1), torch.ones(2, 4, 2, 1))


def _small_store() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 2, 3, 4, generator=gen), torch.randn(2, 4, 2, 3, 4, generator=gen)


def test_gather_rerotate_per_element() -> None:
    keys, values = _small_store()
    lengths = torch.tensor([3, 1, 2, 3])
    src_starts = torch.tensor([100, 7, 50, 0])
    inv_freq = Rope(head_dim=4, theta=10.0).inv_freq()
    ids = torch.tensor([[2, 1], [1, 2]])  # per layer, same token count (3) on both
    out_k, out_v = reference.gather_rerotate(
        keys, values, ids, inv_freq, dst_start=10, lengths=lengths, src_starts=src_starts
    )
    assert out_k.shape == out_v.shape == (2, 2, 3, 4)
    for layer in range(2):
        slot = 0
        for block in ids[layer].tolist():
            for t in range(lengths[block].item()):
                delta = 10 + slot - (src_starts[block].item() + t)
                for head in range(2):
                    x = keys[layer, block, head, t]
                    for i in range(2):
                        angle = delta * inv_freq[i].item()
                        want = (
                            x[i].item() * math.cos(angle) - x[i + 2].item() * math.sin(angle),
                            x[i + 2].item() * math.cos(angle) + x[i].item() * math.sin(angle),
                        )
                        got = (out_k[layer, head, slot, i].item(), out_k[layer, head, slot, i + 2].item())
                        assert got == pytest.approx(want, abs=1e-5)
                    assert torch.equal(out_v[layer, head, slot], values[layer, block, head, t])
                slot += 1


def test_gather_rerotate_unrotated_store_and_out_buffer() -> None:
    keys, values = _small_store()
    inv_freq = Rope(head_dim=4, theta=10.0).inv_freq()
    cache_k, cache_v = torch.zeros(2, 2, 12, 4), torch.zeros(2, 2, 12, 4)
    returned = reference.gather_rerotate(
        keys, values, torch.tensor([3, 0]), inv_freq, dst_start=5, out=(cache_k, cache_v)
    )
    assert returned[0] is cache_k and returned[1] is cache_v
    positions = torch.arange(5, 11)
    stored = torch.cat([keys[:, 3], keys[:, 0]], dim=2)  # (layers, kv_heads, 6, head_dim), unrotated
    torch.testing.assert_close(cache_k[:, :, 5:11], reference.rope_rotate(stored, positions, inv_freq))
    torch.testing.assert_close(cache_v[:, :, 5:11], torch.cat([values[:, 3], values[:, 0]], dim=2))
    assert not cache_k[:, :, :5].any() and not cache_k[:, :, 11:].any()


def test_gather_rerotate_rejects_bad_requests() -> None:
    keys, values = _small_store()
    inv_freq = Rope(head_dim=4).inv_freq()
    with pytest.raises(ValueError, match="same number of tokens"):
        reference.gather_rerotate(
            keys, values, torch.tensor([[0], [1]]), inv_freq, 0, lengths=torch.tensor([3, 1, 2, 3])
        )
    with pytest.raises(ValueError, match="block ids"):
        reference.gather_rerotate(keys, values, torch.tensor([4]), inv_freq, 0)
    with pytest.raises(ValueError, match="inv_freq"):
        reference.gather_rerotate(keys, values, torch.tensor([0]), inv_freq[:1], 0)
    with pytest.raises(ValueError, match="out buffers"):
        reference.gather_rerotate(
            keys, values, torch.tensor([0]), inv_freq, 0, out=(torch.zeros(2, 2, 2, 4),) * 2
        )
