"""First estimate of speculative decoding on this machine: the 0.5B drafting for the 1.5B (the
same tokenizer, checked), greedy. Prints the RSS of both models, the cost of a k-token 1.5B forward
(all logits) against a 1-token step and the draft's step, then per real-text prompt and K: plain
greedy tok/s, speculative tok/s, acceptance, and whether the output equals plain greedy's.
Usage: python scripts/bench_llm_speculative.py (OMNISTREAM_DRAFT_FORMAT: the draft's format, auto;
TOKENS: tokens per prompt, 96). Run it alone (flock /tmp/omni-heavy.lock on shared machines)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from omnistream.bench.llm import corpus
from omnistream.protocol.config import load_config
from omnistream.reasoning.llm.cache import BufferedCache
from omnistream.reasoning.llm.engine import LLMEngine
from omnistream.reasoning.llm.prepare import prepare_llm


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def logits_all(engine: LLMEngine, ids: torch.Tensor, cache, start: int) -> torch.Tensor:
    positions = torch.arange(start, start + ids.shape[1])[None]
    out = engine.model(input_ids=ids, cache=cache, position_ids=positions, logits_to_keep=ids.shape[1])
    return out.logits[0]


def plain_decode(target: LLMEngine, prompt: torch.Tensor, n: int) -> tuple[list[int], float]:
    """n greedy tokens (EOS not checked) and the seconds of decoding after the prompt's prefill."""
    cache = BufferedCache()
    out = [int(target.forward(prompt, cache, 0).argmax(-1))]
    began = time.perf_counter()
    while len(out) < n:
        out.append(target.next_token(out[-1], cache, prompt.shape[1] + len(out) - 1))
    return out, time.perf_counter() - began


def speculative(target: LLMEngine, draft: LLMEngine, prompt: torch.Tensor, k: int, n: int):
    """n greedy tokens of the target (EOS not checked), with the draft proposing k at a time:
    (tokens, proposed, accepted, verify cycles, seconds after both prefills)."""
    tc, dc = BufferedCache(), BufferedCache()
    out = [int(target.forward(prompt, tc, 0).argmax(-1))]
    draft.forward(prompt, dc, 0)
    pos, proposed, accepted, cycles = prompt.shape[1], 0, 0, 0
    began = time.perf_counter()
    while len(out) < n:  # both caches hold positions < pos; out[-1] (at pos) is not fed yet
        guesses, token = [], out[-1]
        for j in range(k):
            token = draft.next_token(token, dc, pos + j)
            guesses.append(token)
        predicted = logits_all(target, torch.tensor([[out[-1], *guesses]]), tc, pos).argmax(-1).tolist()
        a = 0
        while a < k and predicted[a] == guesses[a]:
            a += 1
        proposed, accepted, cycles = proposed + k, accepted + a, cycles + 1
        tc.crop(-(k - a))  # keep out[-1] and the a accepted guesses
        dc.crop(-(k - min(a + 1, k)))
        if a == k:  # the draft never fed its last guess
            draft.forward(torch.tensor([[guesses[-1]]]), dc, pos + k)
        out += [*guesses[:a], predicted[a]]
        pos += a + 1
    return out[:n], proposed, accepted, cycles, time.perf_counter() - began


def main() -> None:
    config = load_config()
    start = rss_mb()
    target = LLMEngine(prepare_llm("qwen2.5-coder-1.5b", config.cache_dir), "gguf", 2)
    loaded = rss_mb()
    draft_format = os.environ.get("OMNISTREAM_DRAFT_FORMAT", "auto")
    draft = LLMEngine(prepare_llm("qwen2.5-coder-0.5b", config.cache_dir), draft_format, 2)
    both = rss_mb()
    print(f"RSS: 1.5B {target.format} {loaded - start:.0f} MB, 0.5B {draft.format} {both - loaded:.0f} MB")
    same_vocab = target.tokenizer.get_vocab() == draft.tokenizer.get_vocab()
    print(f"same vocabulary: {same_vocab} ({len(target.tokenizer.get_vocab())} tokens)")
    text = corpus()
    context = target.ids(text)[:, :256]
    with torch.inference_mode():
        for name, engine, ks in (("1.5B", target, (1, 2, 3, 4, 5, 6, 8)), ("0.5B", draft, (1,))):
            cache = BufferedCache()
            engine.forward(context, cache, 0)
            for k in ks:
                times = []
                for _ in range(7):
                    began = time.perf_counter()
                    logits_all(engine, context[:, :k], cache, 256)
                    times.append(time.perf_counter() - began)
                    cache.crop(-k)
                print(f"{name}: forward of {k} tokens after 256: {1000 * statistics.median(times):.1f} ms")
        readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()[:3000]
        system = "You are a helpful assistant."
        prompts = {
            "summary": f"Summarise this text in five sentences:\n\n{readme}",
            "code": "Write a Python function that parses a CSV file of dates and amounts and returns "
            "the monthly totals, with a docstring.",
            "licence": f"What does this licence say about distributing modified versions?\n\n{text[:2500]}",
        }
        n = int(os.environ.get("TOKENS", "96"))
        for label, question in prompts.items():
            prompt = target.chat_ids(system, question)
            plain, seconds = plain_decode(target, prompt, n)
            plain_rate = (n - 1) / seconds  # decoding only, after the prefill (as below)
            for k in (2, 3, 4, 6):
                out, proposed, accepted, cycles, seconds = speculative(target, draft, prompt, k, n)
                rate = (n - 1) / seconds
                print(
                    f"{label} ({prompt.shape[1]} tokens) K={k}: plain {plain_rate:.1f} tok/s, "
                    f"speculative {rate:.1f} tok/s, acceptance {accepted / proposed:.2f}, "
                    f"tokens/cycle {(n - 1) / cycles:.2f}, same output {out == plain}"
                )


if __name__ == "__main__":
    main()
