"""The memory process's MiniLM encoder (own numpy BERT forward + tokenizers) against transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnistream.memory.embedder import MAX_TOKENS, TextEmbedder, packaged_minilm_dir

TEXTS = [
    "seen: a monarch butterfly on a purple flower",
    'the user said: "what did she say about the budget ten minutes ago?"',
    "x",
    "Sense and Sensibility. " * 80,  # longer than the truncation limit
    "Ünïcödé, punctuation!? and   spaces",
]


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return TextEmbedder()


def test_matches_transformers_bert(embedder: TextEmbedder) -> None:
    from transformers import AutoModel, AutoTokenizer

    path = str(packaged_minilm_dir())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    ours = [e.ids for e in embedder.tokenizer.encode_batch(TEXTS)]
    assert ours == batch["input_ids"].tolist()
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    got = embedder.embed(TEXTS)
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-5)
    # Padding does not change a text's vector: alone or in a batch with longer texts.
    np.testing.assert_allclose(embedder.embed(["x"])[0], got[2], atol=2e-5)


def test_similar_meanings_are_close(embedder: TextEmbedder) -> None:
    cat, kitten, budget = embedder.embed(
        ["a cat sleeping on a mat", "a kitten asleep on a rug", "the quarterly budget spreadsheet"]
    )
    assert float(cat @ kitten) > float(cat @ budget) + 0.2
    assert embedder.embed([]).shape == (0, 384)


def test_erf_matches_math_erf() -> None:
    import math

    from omnistream.memory.embedder import _erf

    x = np.linspace(-6, 6, 2001)
    np.testing.assert_allclose(_erf(x), [math.erf(v) for v in x], atol=2e-7)


def test_the_memory_process_encoder_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from omnistream.memory.embedder import TextEmbedder; "
        "TextEmbedder().embed(['hello']); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
