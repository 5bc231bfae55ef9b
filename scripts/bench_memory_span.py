"""One span of `omnistream bench memory` (KV retrieval vs re-prefill), one JSON line per question.

Usage: .venv/bin/python scripts/bench_memory_span.py MINUTES  (the 0.5B; records from the dev episode)
"""

import json
import sys
import time

from omnistream.app.models import prepare_llm_cache
from omnistream.bench import memory as mb
from omnistream.protocol.config import load_config
from omnistream.reasoning.answer import Answerer
from omnistream.reasoning.llm.engine import LLMEngine

config = load_config(overrides={"reasoning.model": "qwen2.5-coder-0.5b"})
records, episode = mb.episode_records(mb.EPISODE, speed=8.0, progress=print)
engine = LLMEngine(
    prepare_llm_cache(config, progress=False), config.reasoning.dtype, config.reasoning.threads
)
questions = [q for q in episode.questions if q.choices]
minutes = int(sys.argv[1])
memory = mb.looped(records, episode.duration_s, minutes)
answerer = Answerer(
    engine,
    window_tokens=config.reasoning.window_tokens,
    retrieved_tokens=config.reasoning.retrieved_tokens,
    block_ram_bytes=config.reasoning.kv_ram_mb << 20,
)
t = time.perf_counter()
for i in range(0, len(memory), mb.INGEST_BATCH):
    answerer.ingest_many("m", memory[i : i + mb.INGEST_BATCH])
kv = answerer.session("m").kv
print(
    json.dumps(
        {
            "records": len(memory),
            "tokens": kv.length + sum(b.n_tokens for b in kv.evicted),
            "ingest_s": time.perf_counter() - t,
            "evicted": len(kv.evicted),
        }
    ),
    flush=True,
)
search = mb.TextSearch(memory)
for q in questions:
    r = mb.ask_both(answerer, "m", q, memory[-1].t1, search, top_k=16)
    print(json.dumps(r), flush=True)
