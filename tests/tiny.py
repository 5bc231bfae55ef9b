"""Tiny Qwen2 models for the LLM tests: one definition, named shapes, randomly initialised.

``qwen2_config(shape, **overrides)`` is a transformers ``Qwen2Config``; ``qwen2_model`` the
model (seeded, eval mode); ``save_qwen2`` writes it as safetensors (what ``llm.load`` and
``LLMEngine`` read). The shapes cover what the engine's paths branch on: grouped-query attention,
a tied output projection, linear RoPE scaling, an odd head count.
"""

from __future__ import annotations

from pathlib import Path

LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}

SHAPES: dict[str, dict] = {
    # The engine tests' model (tests/conftest.py's tiny_llm_dir, with the MiniLM tokenizer's vocabulary).
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
    # Tied output projection and linear RoPE scaling.
    "tied": dict(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_parameters=LINEAR_ROPE,
    ),
    # 3 query heads per kv head and linear RoPE scaling.
    "grouped": dict(
        vocab_size=211,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        rope_parameters=LINEAR_ROPE,
    ),
    # An odd head count: 3 query heads on 1 kv head, head_dim 16, tied.
    "odd": dict(
        vocab_size=200,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    ),
    # The streaming-memory tests' model (a long position range).
    "stream": dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
}


def qwen2_config(shape: str, **overrides):
    from transformers import Qwen2Config

    return Qwen2Config(**{**SHAPES[shape], **overrides})


def qwen2_model(shape: str, seed: int, **overrides):
    """transformers' Qwen2ForCausalLM of ``shape``, weights drawn after ``torch.manual_seed(seed)``."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(qwen2_config(shape, **overrides)).eval()


def save_qwen2(path: Path, shape: str, seed: int, **overrides) -> Path:
    """``qwen2_model(shape, seed)`` saved into ``path`` (config.json + model.safetensors)."""
    qwen2_model(shape, seed, **overrides).save_pretrained(path)
    return path
