"""`omnistream bench memory`: answering from cached KV blocks versus re-reading the same text, and
the StreamingLLM perplexity comparison.

1. Records: the dev episode (../shared/eval/dev) is replayed through the real perception, speech
   and memory processes (no reasoner) and its session history is read back: the clips and
   transcripts the system really produced.
2. Memory of 10 and 60 minutes: those records are streamed into the reasoner's KV memory (sinks +
   rolling window, evicted blocks in the block store), looped with shifted stream times to fill
   the span. Each multiple-choice question of the episode is then asked at the end:
   - KV retrieval (the system's "full" mode): the records text retrieval finds (MiniLM cosine,
     as memory's FAISS search does) fused with the blocks the question's queries score highest;
     their cached blocks are re-rotated into place and only the question is prefilled;
   - baseline, re-prefill: the very same retrieved records and window, re-read as text.
   Time to first token (question in -> first answer token out) and accuracy for both.
3. Perplexity of the LLM on a long real text (the GPL-3 every Debian system carries) with the
   full cache, a rolling window only, and sinks + rolling window (re-rotated, as StreamingLLM).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

EPISODE = Path(__file__).resolve().parents[2] / "shared" / "eval" / "dev"
TEXT = Path("/usr/share/common-licenses/GPL-3")
INGEST_BATCH = 8  # records prefilled per pass while streaming the memory


def episode_records(episode_dir: Path, speed: float, progress: Callable[[str], None]):
    """(records, episode) from replaying the episode through perception, speech and memory."""
    from omnistream.app.client import Client
    from omnistream.app.eval import load_episode
    from omnistream.app.replay import Replayer
    from omnistream.app.system import running_system
    from omnistream.protocol.config import load_config

    episode, video = load_episode(episode_dir)
    session = f"bench-memory-{time.strftime('%Y%m%d-%H%M%S')}"
    config = load_config(
        overrides={"session": session, "stages": ["gateway", "perception", "speech", "memory"]}
    )
    progress(f"bench memory: replaying {video.name} at {speed}x for its records")
    with (
        running_system(config, None, quiet=True) as run_dir,
        Client.connect(run_dir, session=session) as client,
    ):
        Replayer(client, speak=False).run(video, [], speed=speed)
        time.sleep(3.0)  # the last clip closes after the stream ends
        history = client.history(limit=5000)
    records = [item for item in history.items if item.kind in ("clip", "transcript")]
    if not records:
        raise RuntimeError("the replay produced no records")
    return records, episode


def looped(records, duration_s: float, minutes: float):
    """The records repeated with shifted times and fresh ids until ``minutes`` of stream."""
    import msgspec

    out, loop = [], 0
    while loop * duration_s < minutes * 60:
        for item in records:
            out.append(
                msgspec.structs.replace(
                    item,
                    t0=item.t0 + loop * duration_s,
                    t1=item.t1 + loop * duration_s,
                    item_id=len(out) + 1,
                )
            )
        loop += 1
    return out


class TextSearch:
    """Top-k records by MiniLM cosine: the external retrieval memory does with FAISS."""

    def __init__(self, records):
        from omnistream.memory.embedder import TextEmbedder

        self.embedder = TextEmbedder()
        self.records = records
        self.vectors = torch.from_numpy(self.embedder.embed([r.text for r in records]))

    def search(self, query: str, k: int):
        q = torch.from_numpy(self.embedder.embed([query]))[0]
        top = torch.topk(self.vectors @ q, min(k, len(self.records))).indices.tolist()
        return [self.records[i] for i in top]


def ask_both(answerer, session: str, question, now_ts: float, search: TextSearch, top_k: int) -> dict:
    """Ask one multiple-choice question from KV retrieval and from re-prefilling the same text."""
    from omnistream.protocol.messages import Ask
    from omnistream.reasoning.answer import split_choice

    ask = Ask(
        ts=now_ts, session=session, turn="t", question=question.question, choices=list(question.choices)
    )
    # As memory answers a Retrieve: the text search's hits plus the last 30 s of records.
    recent = [r for r in search.records if r.t1 >= now_ts - 30.0]
    retrieved = list({r.item_id: r for r in search.search(question.question, top_k) + recent}.values())
    expected = question.answer.strip()[:1].upper()
    suffix = answerer.engine.ids(answerer.suffix_text(ask, None, [split_choice(c) for c in ask.choices]))
    memory = answerer.session(session)
    result = {}
    for mode in ("kv", "reprefill"):
        start = time.perf_counter()
        if mode == "kv":
            cache = answerer.kv_cache(session, retrieved, question.question)
            chosen = answerer.last_blocks
        else:  # the very text those blocks and the window hold, read again
            blocks = [memory.kv.evicted.blocks[i] for i in sorted(chosen)] + list(memory.kv.window)
            cache = answerer.text_cache_lines([b.text for b in blocks])
        answerer.engine.forward(suffix, cache, cache.get_seq_length()).argmax(-1)
        ttft = time.perf_counter() - start
        context = cache.get_seq_length() - suffix.shape[1]
        cache.crop(-suffix.shape[1])
        letter, _ = answerer.choose(ask, cache, None)
        result[mode] = {"ttft_s": ttft, "correct": letter == expected, "context_tokens": context}
    return result


@torch.inference_mode()
def perplexities(engine, tokens: int, window: int, sinks: int, chunk: int = 32) -> dict[str, float]:
    """Perplexity over ``tokens`` of real text, fed ``chunk`` tokens at a time, with the full
    cache, the last ``window`` tokens only, and ``sinks`` first tokens + the last window."""
    from omnistream.kernels.ops import rope_rotate
    from omnistream.reasoning.kvcache import inv_freq_for
    from omnistream.reasoning.llm.cache import BufferedCache

    ids = engine.ids(TEXT.read_text())[:, :tokens]
    inv_freq = inv_freq_for(engine.model)
    result = {}
    for name, keep_sinks, limit in (
        ("full", 0, None),
        ("window", 0, window),
        ("sinks+window", sinks, window),
    ):
        cache, nll, count = BufferedCache(), 0.0, 0
        for start in range(0, ids.shape[1] - 1, chunk):
            piece = ids[:, start : start + chunk + 1]
            inputs, targets = piece[:, :-1], piece[0, 1:]
            position = cache.get_seq_length()
            out = engine.model(
                input_ids=inputs,
                cache=cache,
                use_cache=True,
                position_ids=torch.arange(position, position + inputs.shape[1]).unsqueeze(0),
            )
            nll += float(torch.nn.functional.cross_entropy(out.logits[0].float(), targets, reduction="sum"))
            count += targets.numel()
            excess = cache.get_seq_length() - (limit or 1 << 30) - keep_sinks
            if limit is not None and excess > 0:  # drop the oldest non-sink tokens, close the gap
                for layer in cache.layers:
                    rest = layer.keys[:, :, keep_sinks + excess :]
                    shift = torch.full((rest.shape[2],), -float(excess))
                    layer.keys = torch.cat(
                        [layer.keys[:, :, :keep_sinks], rope_rotate(rest, shift, inv_freq)], dim=2
                    )
                    layer.values = torch.cat(
                        [layer.values[:, :, :keep_sinks], layer.values[:, :, keep_sinks + excess :]], dim=2
                    )
        result[name] = math.exp(nll / count)
    return result


def run(quick: bool = False, progress: Callable[[str], None] = print) -> list[dict]:
    from omnistream.app.models import prepare_llm_cache
    from omnistream.protocol.config import load_config
    from omnistream.reasoning.answer import Answerer
    from omnistream.reasoning.llm.engine import LLMEngine

    config = load_config()
    records, episode = episode_records(EPISODE, speed=8.0, progress=progress)
    engine = LLMEngine(
        prepare_llm_cache(config, progress=False), config.reasoning.dtype, config.reasoning.threads
    )
    questions = [q for q in episode.questions if q.choices]
    rows = []
    spans = (10,) if quick else (10, 60)
    for minutes in spans:
        memory = looped(records, episode.duration_s, minutes)
        answerer = Answerer(
            engine,
            window_tokens=config.reasoning.window_tokens,
            retrieved_tokens=config.reasoning.retrieved_tokens,
            block_ram_bytes=config.reasoning.kv_ram_mb << 20,
            choice_scoring=config.reasoning.choice_scoring,
        )
        session = f"m{minutes}"
        progress(f"bench memory: streaming {len(memory)} records ({minutes} min) into the KV memory")
        start = time.perf_counter()
        for i in range(0, len(memory), INGEST_BATCH):  # as the stage streams records that queued up
            answerer.ingest_many(session, memory[i : i + INGEST_BATCH])
            if i % (INGEST_BATCH * 12) == 0:
                progress(f"bench memory: {i}/{len(memory)} records streamed")
        ingest_s = time.perf_counter() - start
        search = TextSearch(memory)
        results = []
        for q in questions:
            results.append(ask_both(answerer, session, q, memory[-1].t1, search, top_k=16))
            progress(f"bench memory: {minutes} min, question {len(results)}/{len(questions)}")
        kv = answerer.session(session).kv
        kv_ttft = [r["kv"]["ttft_s"] for r in results]
        re_ttft = [r["reprefill"]["ttft_s"] for r in results]
        rows += [
            {
                "name": f"{minutes} min memory: time to first token, KV retrieval (p50)",
                "value": round(1000 * statistics.median(kv_ttft), 1),
                "unit": "ms",
                "baseline": round(1000 * statistics.median(re_ttft), 1),
                "baseline_name": "re-prefill of the same text",
            },
            {
                "name": f"{minutes} min memory: time to first token, KV retrieval (max)",
                "value": round(1000 * max(kv_ttft), 1),
                "unit": "ms",
                "baseline": round(1000 * max(re_ttft), 1),
                "baseline_name": "re-prefill of the same text",
            },
            {
                "name": f"{minutes} min memory: multiple-choice accuracy, KV retrieval",
                "value": round(100 * sum(r["kv"]["correct"] for r in results) / len(results), 1),
                "unit": "%",
                "baseline": round(100 * sum(r["reprefill"]["correct"] for r in results) / len(results), 1),
                "baseline_name": "re-prefill of the same text",
            },
            {
                "name": f"{minutes} min memory: context tokens per question (p50)",
                "value": statistics.median(r["kv"]["context_tokens"] for r in results),
                "unit": "tokens",
                "baseline": statistics.median(r["reprefill"]["context_tokens"] for r in results),
                "baseline_name": "re-prefill of the same text",
            },
            {
                "name": f"{minutes} min memory: records / tokens streamed, ingest time",
                "value": f"{len(memory)} / {kv.length + sum(b.n_tokens for b in kv.evicted)} / {ingest_s:.0f} s",
                "unit": "",
            },
            {
                "name": f"{minutes} min memory: KV blocks in RAM / on disk",
                "value": f"{kv.evicted.ram_bytes >> 20} MB / {kv.evicted.disk_bytes >> 20} MB",
                "unit": "",
            },
        ]
    progress("bench memory: perplexity, full cache vs window vs sinks + window")
    ppl = perplexities(engine, tokens=512 if quick else 2048, window=128 if quick else 512, sinks=4)
    for name in ("full", "window", "sinks+window"):
        rows.append({"name": f"perplexity on GPL-3 text, {name}", "value": round(ppl[name], 3), "unit": ""})
    return rows
