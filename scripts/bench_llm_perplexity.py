"""Perplexity of the LLM per weight format on real prose (reasoning.bench.corpus(): the GPL-3
text), with top-1 agreement against float32: one prefill of TOKENS tokens, every position's
logits. Usage: python scripts/bench_llm_perplexity.py [model] [tokens] [formats...]
(default: qwen2.5-coder-0.5b 512 float32 gguf int8)."""

from __future__ import annotations

import sys

import torch

from omnistream.bench.llm import corpus
from omnistream.protocol.config import load_config
from omnistream.reasoning.llm.cache import BufferedCache
from omnistream.reasoning.llm.engine import LLMEngine
from omnistream.reasoning.llm.prepare import prepare_llm

model = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-0.5b"
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 512
formats = sys.argv[3:] or ["float32", "gguf", "int8"]
model_dir = prepare_llm(model, load_config().cache_dir)
reference = None
for fmt in formats:
    engine = LLMEngine(model_dir, fmt, 2)
    ids = engine.ids(corpus())[:, :tokens]
    with torch.inference_mode():
        logits = engine.model(input_ids=ids, cache=BufferedCache()).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    nll = -logprobs.gather(1, ids[0, 1:, None]).mean()
    top1 = logits.argmax(-1)
    line = f"{model} {fmt}: perplexity {torch.exp(nll):.3f} on {tokens} tokens"
    if reference is None:
        reference = (top1, logprobs)
    else:
        agree = (top1 == reference[0]).float().mean()
        kl = torch.nn.functional.kl_div(logprobs, reference[1], log_target=True, reduction="batchmean")
        line += f", top-1 agreement with {formats[0]} {100 * agree:.1f} %, KL {kl:.4f}"
    print(line, flush=True)
    del engine
