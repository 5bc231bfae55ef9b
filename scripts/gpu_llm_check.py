"""The reasoner's LLM engine on a CUDA GPU: correctness against transformers and speed, one run.

    python scripts/gpu_llm_check.py CONFIG_DIR [CONFIG_DIR ...] [--json OUT]

Each CONFIG_DIR holds a packaged model's config.json and tokenizer files (no weights: a GPU
machine here cannot reach the model packages). The weights are random, drawn by transformers'
own initialisation and saved as safetensors, which is all speed depends on; correctness compares
our Qwen2 forward (reasoning/llm/model.py, loaded through ``LLMEngine`` as on a CPU) with
transformers' Qwen2 on the same weights. For each model, in bfloat16: prefill tokens/s at
32/256/1024; decode tokens/s after a 256-token prompt and 8 untimed warm-up tokens, with our
CUDA-graph decode (reasoning/llm/cuda_graphs.py through ``LLMEngine.next_token``, 128 tokens),
with it off (the eager forward, as ``OMNISTREAM_CUDA_GRAPHS=0``, 64 tokens; again with cuDNN's
SDPA off, to see whether per-length attention plans are what makes eager decode slow) and
transformers' (64 tokens); first token for a 20-token question on a 1024-token cache, repeated
and at lengths not seen before; load seconds and peak GPU memory. transformers' model with its
DynamicCache is the baseline in the same run. Graph decode is checked against eager decode
over 64 greedy steps after a 500-token prompt (crossing the 512-token capacity bucket: the
buffers grow, a graph is captured again): free-running greedy tokens, the logits' cosine and
argmax with eager fed the same tokens, the caches after; against the same static maths run
without graphs (the same kernels: the difference should be ~0); two caches decoded alternately
(the static buffers change hands); synchronizing CUDA calls per decode step. ``--cpu`` is a dry
run on tiny configs: float32, the static maths without graphs.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

PREFILL = (32, 256, 1024)
DECODE_TOKENS, DECODE_WARMUP, DECODE_PROMPT = 128, 8, 256
EAGER_DECODE_TOKENS = 64  # the eager decodes (~85 ms a token on the VM): fewer, so the run stays short
CHECK_PROMPT, CHECK_STEPS, PLAIN_STEPS = 500, 64, 32
CONTEXT, QUESTION = 1024, 20
DEVICE = "cuda"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _sync_time(fn, repeats: int = 3) -> float:
    fn()
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def random_model_dir(config_dir: Path, out: Path) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(str(config_dir))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    out.mkdir(parents=True)
    for path in config_dir.iterdir():
        shutil.copy2(path, out / path.name)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def measure(forward, new_cache, vocab: int, next_token=None, decode_tokens: int = DECODE_TOKENS) -> dict:
    """Prefill, decode and first-token speed. ``next_token(token, cache, position) -> int`` is
    the decode step (default: ``forward`` and an argmax of the logits it returns)."""
    ids = torch.randint(0, vocab, (1, 4096), device=DEVICE)
    result = {}
    for n in PREFILL:
        result[f"prefill_{n}"] = n / _sync_time(lambda n=n: forward(ids[:, :n], new_cache(), 0))
    result["decode"] = time_decode(forward, new_cache, vocab, next_token, decode_tokens)
    cache = new_cache()
    forward(ids[:, :CONTEXT], cache, 0)

    def first_token() -> None:
        int(forward(ids[:, CONTEXT : CONTEXT + QUESTION], cache, CONTEXT).argmax(-1))
        cache.crop(-QUESTION)

    result["ttft_ms"] = 1000 * _sync_time(first_token, 5)
    # First token for questions of lengths not seen before (per-shape costs: kernel plans, autotuning).
    times = []
    for n in range(QUESTION + 1, QUESTION + 6):
        _sync()
        start = time.perf_counter()
        int(forward(ids[:, CONTEXT : CONTEXT + n], cache, CONTEXT).argmax(-1))
        _sync()
        times.append(time.perf_counter() - start)
        cache.crop(-n)
    result["ttft_fresh_ms"] = 1000 * sorted(times)[len(times) // 2]
    return result


def time_decode(forward, new_cache, vocab: int, next_token=None, count: int = DECODE_TOKENS) -> float:
    """Tokens/s of ``count`` decode steps after a DECODE_PROMPT prefill and DECODE_WARMUP
    untimed steps (the first steps of a shape: CUDA graph capture, cuBLAS/SDPA plans)."""
    if next_token is None:

        def next_token(token: int, cache, position: int) -> int:
            return int(forward(torch.tensor([[token]], device=DEVICE), cache, position).argmax(-1))

    tokens = torch.randint(0, vocab, (DECODE_PROMPT + DECODE_WARMUP + count,)).tolist()
    cache = new_cache()
    forward(torch.tensor([tokens[:DECODE_PROMPT]], device=DEVICE), cache, 0)
    position = DECODE_PROMPT
    for token in tokens[position : position + DECODE_WARMUP]:
        next_token(token, cache, position)
        position += 1
    _sync()
    start = time.perf_counter()
    for token in tokens[position:]:
        next_token(token, cache, position)
        position += 1
    _sync()
    return count / (time.perf_counter() - start)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float()).min())


def graph_vs_eager(engine, vocab: int) -> dict:
    """Our static (CUDA graph) decode against our eager forward, both through ``engine.forward``."""
    from omnistream.reasoning.llm.cache import BufferedCache

    decoder = engine.decoder
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, vocab, (1, CHECK_PROMPT), generator=gen)
    replays = decoder.steps
    # Free-running greedy decode with the static path; the next token the graph computed on the
    # device (``next_token``'s) must be the argmax of the logits it returned.
    decoder.enabled = True
    graph_cache = BufferedCache()
    token = int(engine.forward(prompt, graph_cache, 0).argmax(-1))
    fed, graph_logits, device_argmax_ok = [token], [], 0
    for i in range(CHECK_STEPS):
        logits = engine.forward(torch.tensor([[token]]), graph_cache, CHECK_PROMPT + i)
        graph_logits.append(logits)
        token = int(logits.argmax(-1))
        device_argmax_ok += int(decoder.next_id) == token
        fed.append(token)
    static_steps = decoder.steps - replays
    # Eager, fed the same tokens (teacher forcing), then free-running from the prompt.
    decoder.enabled = False
    eager_cache = BufferedCache()
    engine.forward(prompt, eager_cache, 0)
    eager_logits = [
        engine.forward(torch.tensor([[fed[i]]]), eager_cache, CHECK_PROMPT + i) for i in range(CHECK_STEPS)
    ]
    free_cache = BufferedCache()
    token = int(engine.forward(prompt, free_cache, 0).argmax(-1))
    eager_free = [token]
    for i in range(CHECK_STEPS):
        token = engine.next_token(token, free_cache, CHECK_PROMPT + i)
        eager_free.append(token)
    # The same static maths run without graphs (the same kernels launched one by one), fed the
    # same tokens: the replays must give the same numbers (the graph mechanics, apart from kernels).
    from omnistream.reasoning.llm.cuda_graphs import StaticDecoder

    plain = StaticDecoder(engine.model, graphs=False)
    engine.decoder = plain
    try:
        plain_cache = BufferedCache()
        engine.forward(prompt, plain_cache, 0)
        plain_diff = max(
            float(
                (engine.forward(torch.tensor([[fed[i]]]), plain_cache, CHECK_PROMPT + i) - graph_logits[i])
                .abs()
                .max()
            )
            for i in range(PLAIN_STEPS)
        )
        plain_steps = plain.steps
    finally:
        engine.decoder = decoder
    same_prefix = next((i for i, (a, b) in enumerate(zip(fed, eager_free, strict=True)) if a != b), len(fed))
    kv_diff = max(
        float((a.float() - b.float()).abs().max())
        for la, lb in zip(graph_cache.layers, eager_cache.layers, strict=True)
        for a, b in ((la.keys, lb.keys), (la.values, lb.values))
    )
    lengths_ok = graph_cache.get_seq_length() == eager_cache.get_seq_length() == CHECK_PROMPT + CHECK_STEPS
    result = {
        "static_steps": static_steps,
        "steps": CHECK_STEPS,
        "cosine_min": min(_cosine(g, e) for g, e in zip(graph_logits, eager_logits, strict=True)),
        "argmax_agree": sum(
            int(g.argmax(-1)) == int(e.argmax(-1)) for g, e in zip(graph_logits, eager_logits, strict=True)
        )
        / CHECK_STEPS,
        "device_argmax_agree": device_argmax_ok / CHECK_STEPS,
        "greedy_identical_tokens": same_prefix,
        "greedy_tokens": len(fed),
        "kv_max_abs_diff": kv_diff,
        "cache_lengths_ok": lengths_ok,
        "graph_vs_static_eager_max_abs_diff": plain_diff,
        "static_eager_steps": plain_steps,
    }
    # Two caches decoded alternately through the static path: the buffers change hands each step.
    decoder.enabled = True
    prompts = [torch.randint(0, vocab, (1, n), generator=gen) for n in (300, 200)]
    steps = [torch.randint(0, vocab, (8,), generator=gen).tolist() for _ in prompts]
    caches = [BufferedCache() for _ in prompts]
    for prompt_ids, cache in zip(prompts, caches, strict=True):
        engine.forward(prompt_ids, cache, 0)
    got: list[list[torch.Tensor]] = [[], []]
    before = decoder.steps
    for i in range(8):
        for which in (0, 1):
            n = prompts[which].shape[1]
            got[which].append(engine.forward(torch.tensor([[steps[which][i]]]), caches[which], n + i))
    alternating_static = decoder.steps - before
    decoder.enabled = False
    cos = []
    for which in (0, 1):
        cache, n = BufferedCache(), prompts[which].shape[1]
        engine.forward(prompts[which], cache, 0)
        for i in range(8):
            cos.append(
                _cosine(got[which][i], engine.forward(torch.tensor([[steps[which][i]]]), cache, n + i))
            )
    decoder.enabled = True
    result["alternating_cosine_min"] = min(cos)
    result["alternating_static_steps"] = alternating_static
    return result


def sync_counts(engine, vocab: int) -> dict:
    """Synchronizing CUDA calls per decode step (torch.cuda.set_sync_debug_mode), static and eager."""
    import warnings

    from omnistream.reasoning.llm.cache import BufferedCache

    counts = {}
    for name, enabled in (("static", True), ("eager", False)):
        engine.decoder.enabled = enabled
        cache = BufferedCache()
        engine.forward(torch.randint(0, vocab, (1, 64)), cache, 0)
        for i in range(3):  # shapes seen (graph captured) before counting
            engine.next_token(1, cache, 64 + i)
        for how in ("forward", "next_token"):
            _sync()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    for _ in range(4):
                        position = cache.get_seq_length()
                        if how == "forward":
                            int(engine.forward(torch.tensor([[1]]), cache, position).argmax(-1))
                        else:
                            engine.next_token(1, cache, position)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts[f"{name}_{how}"] = sum("synchroniz" in str(w.message) for w in caught) / 4
    engine.decoder.enabled = True
    return counts


def check(config_dir: Path, work: Path) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    from omnistream.reasoning.llm.cache import BufferedCache
    from omnistream.reasoning.llm.engine import LLMEngine

    model_dir = random_model_dir(config_dir, work / config_dir.name)
    _log(f"{config_dir.name}: random weights saved")
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    engine = LLMEngine(model_dir, "auto" if DEVICE == "cuda" else "float32")
    _sync()
    ours = {"load_s": time.perf_counter() - start, "format": engine.format, "device": str(engine.device)}
    if DEVICE == "cpu":  # dry run: the static decode maths without graphs (small buckets: they grow)
        from omnistream.reasoning.llm.cuda_graphs import StaticDecoder

        engine.decoder = StaticDecoder(engine.model, graphs=False, min_capacity=16)
    if engine.decoder is None:
        sys.exit(f"{config_dir.name}: no static decoder (OMNISTREAM_CUDA_GRAPHS=0 or not our Qwen2 on CUDA)")
    vocab = engine.model.config.vocab_size
    ours.update(measure(engine.forward, BufferedCache, vocab, engine.next_token))
    ours["graph_captures"] = engine.decoder.captures
    _log(
        f"{config_dir.name}: ours measured ({ours['decode']:.1f} tok/s decode, {engine.decoder.captures} captures)"
    )
    engine.decoder.enabled = False
    ours["decode_eager"] = time_decode(
        engine.forward, BufferedCache, vocab, engine.next_token, EAGER_DECODE_TOKENS
    )
    if DEVICE == "cuda":  # diagnosis: is eager decode slow for cuDNN attention's per-length plans?
        cudnn = torch.backends.cuda.cudnn_sdp_enabled()
        ours["cudnn_sdp_enabled"] = cudnn
        torch.backends.cuda.enable_cudnn_sdp(False)
        try:
            ours["decode_eager_no_cudnn_sdp"] = time_decode(
                engine.forward, BufferedCache, vocab, engine.next_token, EAGER_DECODE_TOKENS
            )
        finally:
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
    engine.decoder.enabled = True
    _log(
        f"{config_dir.name}: ours eager decode {ours['decode_eager']:.1f} tok/s, cuDNN SDPA off "
        f"{ours.get('decode_eager_no_cudnn_sdp', float('nan')):.1f} tok/s"
    )
    if DEVICE == "cuda":
        ours["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    static = graph_vs_eager(engine, vocab)
    static["graph_captures"] = engine.decoder.captures
    _log(f"{config_dir.name}: graph vs eager {static}")
    if DEVICE == "cuda":
        try:
            static["syncs_per_step"] = sync_counts(engine, vocab)
        except Exception as exc:  # noqa: BLE001 - informative only
            static["syncs_per_step"] = repr(exc)
        _log(f"{config_dir.name}: syncs per step {static['syncs_per_step']}")

    reference = (
        AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=engine.dtype, attn_implementation="sdpa")
        .to(DEVICE)
        .eval()
    )

    @torch.inference_mode()
    def ref_forward(ids, cache, start):
        positions = torch.arange(start, start + ids.shape[1], device=DEVICE)[None]
        out = reference(
            input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1, :].float().cpu()

    ids = torch.randint(0, vocab, (1, 300), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    a_cache, b_cache = BufferedCache(), DynamicCache()
    got, want = engine.forward(ids[:, :280], a_cache, 0), ref_forward(ids[:, :280], b_cache, 0)
    steps = [(got, want)]
    for i in range(280, 300):  # decode steps over the caches
        steps.append(
            (engine.forward(ids[:, i : i + 1], a_cache, i), ref_forward(ids[:, i : i + 1], b_cache, i))
        )
    cos = min(float(torch.nn.functional.cosine_similarity(g, w).min()) for g, w in steps)
    top1 = sum(int(g.argmax(-1)) == int(w.argmax(-1)) for g, w in steps) / len(steps)
    _log(f"{config_dir.name}: vs transformers min cosine {cos:.5f}, top-1 {top1:.2f}")
    baseline = measure(ref_forward, DynamicCache, vocab, decode_tokens=EAGER_DECODE_TOKENS)
    _log(f"{config_dir.name}: transformers measured")
    del engine
    reference = None  # frees the model (ref_forward is not called again)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return {
        "model": config_dir.name,
        "ours": ours,
        "transformers": baseline,
        "logit_cosine_min": cos,
        "top1_agree": top1,
        "graph_vs_eager": static,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU (tiny configs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # a failed graph capture is logged (and decoding goes eager)
    global DEVICE
    if args.cpu:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device")
    work = Path(tempfile.mkdtemp())
    results = []
    for config_dir in args.configs:
        try:
            results.append(check(config_dir, work))
        except Exception:  # noqa: BLE001 - report it and go on with the next model
            import traceback

            traceback.print_exc()
            _log(f"{config_dir.name}: FAILED (traceback above)")
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            continue
        _log(f"result: {json.dumps(results[-1])}")  # kept if a later model does not finish
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    print(
        "| model | engine | load s | prefill 32 / 256 / 1024 tok/s | decode tok/s "
        "| first token ms (repeated / new lengths) | peak GPU MB |"
    )
    print("|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in results:
        ours, theirs = r["ours"], r["transformers"]
        for label, m, decode in (
            (f"omnistream {ours['format']}, CUDA graphs", ours, ours["decode"]),
            ("transformers (baseline)", theirs, theirs["decode"]),
        ):
            print(
                f"| {r['model']} | {label} | {m.get('load_s', nan):.1f} "
                f"| {m['prefill_32']:.0f} / {m['prefill_256']:.0f} / {m['prefill_1024']:.0f} | {decode:.1f} "
                f"| {m['ttft_ms']:.1f} / {m['ttft_fresh_ms']:.1f} | {m.get('peak_gpu_mb', nan):.0f} |"
            )
        print(
            f"| {r['model']} | omnistream {ours['format']}, eager (OMNISTREAM_CUDA_GRAPHS=0) | | "
            f"| {ours['decode_eager']:.1f} (cuDNN SDPA off: {ours.get('decode_eager_no_cudnn_sdp', nan):.1f}; "
            f"was on: {ours.get('cudnn_sdp_enabled')}) | | |"
        )
        print(
            f"| {r['model']} | logits vs transformers | min cosine {r['logit_cosine_min']:.5f}, "
            f"top-1 agreement {r['top1_agree']:.2f} | | | | |"
        )
        g = r["graph_vs_eager"]
        print(
            f"| {r['model']} | graph vs eager, {g['steps']} steps | static steps {g['static_steps']}/{g['steps']}, "
            f"captures {g['graph_captures']}, min cosine {g['cosine_min']:.5f}, argmax agreement "
            f"{g['argmax_agree']:.2f} (device argmax {g['device_argmax_agree']:.2f}), identical greedy tokens "
            f"{g['greedy_identical_tokens']}/{g['greedy_tokens']}, KV max abs diff {g['kv_max_abs_diff']:.3g}, "
            f"lengths ok {g['cache_lengths_ok']}, graph vs the same maths without graphs ({g['static_eager_steps']} steps): "
            f"max abs logit diff {g['graph_vs_static_eager_max_abs_diff']:.3g}, two caches alternating: min cosine "
            f"{g['alternating_cosine_min']:.5f} ({g['alternating_static_steps']}/16 static) | | | | |"
        )
        if "syncs_per_step" in g:
            print(f"| {r['model']} | synchronizing calls per decode step | {g['syncs_per_step']} | | | | |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
