"""The reasoner's LLM engine on a CUDA GPU: correctness against transformers and speed, one run.

    python scripts/gpu_llm_check.py CONFIG_DIR [CONFIG_DIR ...] [--json OUT]

Each CONFIG_DIR holds a packaged model's config.json and tokenizer files (no weights: a GPU
machine here cannot reach the model packages). The weights are random, drawn by transformers'
own initialisation and saved as safetensors, which is all speed depends on; correctness compares
our Qwen2 forward (reasoning/qwen2.py, loaded through ``LLMEngine`` as on a CPU) with
transformers' Qwen2 on the same weights. For each model, in bfloat16: prefill tokens/s at
32/256/1024, decode tokens/s (128 tokens after a 256-token prompt), first token for a 20-token
question on a 1024-token cache, load seconds and peak GPU memory; transformers' model with its
DynamicCache is the baseline in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

PREFILL = (32, 256, 1024)
DECODE_TOKENS = 128
CONTEXT, QUESTION = 1024, 20
DEVICE = "cuda"


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


def measure(forward, new_cache, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (1, 4096), device=DEVICE)
    result = {}
    for n in PREFILL:
        result[f"prefill_{n}"] = n / _sync_time(lambda n=n: forward(ids[:, :n], new_cache(), 0))
    cache = new_cache()
    forward(ids[:, :256], cache, 0)
    _sync()
    start = time.perf_counter()
    for i in range(DECODE_TOKENS):
        int(forward(ids[:, 256 + i : 257 + i], cache, 256 + i).argmax(-1))
    result["decode"] = DECODE_TOKENS / (time.perf_counter() - start)
    cache = new_cache()
    forward(ids[:, :CONTEXT], cache, 0)

    def first_token() -> None:
        int(forward(ids[:, CONTEXT : CONTEXT + QUESTION], cache, CONTEXT).argmax(-1))
        cache.crop(-QUESTION)

    result["ttft_ms"] = 1000 * _sync_time(first_token, 5)
    return result


def check(config_dir: Path, work: Path) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    from omnistream.reasoning.cache import BufferedCache
    from omnistream.reasoning.engine import LLMEngine

    model_dir = random_model_dir(config_dir, work / config_dir.name)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    engine = LLMEngine(model_dir, "auto")
    _sync()
    ours = {"load_s": time.perf_counter() - start, "format": engine.format, "device": str(engine.device)}
    vocab = engine.model.config.vocab_size
    ours.update(measure(engine.forward, BufferedCache, vocab))
    if DEVICE == "cuda":
        ours["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20

    reference = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=engine.dtype, attn_implementation="sdpa"
    ).to(DEVICE).eval()

    @torch.inference_mode()
    def ref_forward(ids, cache, start):
        positions = torch.arange(start, start + ids.shape[1], device=DEVICE)[None]
        out = reference(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float().cpu()

    ids = torch.randint(0, vocab, (1, 300), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    a_cache, b_cache = BufferedCache(), DynamicCache()
    got, want = engine.forward(ids[:, :280], a_cache, 0), ref_forward(ids[:, :280], b_cache, 0)
    steps = [(got, want)]
    for i in range(280, 300):  # decode steps over the caches
        steps.append((engine.forward(ids[:, i : i + 1], a_cache, i), ref_forward(ids[:, i : i + 1], b_cache, i)))
    cos = min(float(torch.nn.functional.cosine_similarity(g, w).min()) for g, w in steps)
    top1 = sum(int(g.argmax(-1)) == int(w.argmax(-1)) for g, w in steps) / len(steps)
    baseline = measure(ref_forward, DynamicCache, vocab)
    del engine, reference
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return {"model": config_dir.name, "ours": ours, "transformers": baseline, "logit_cosine_min": cos, "top1_agree": top1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU (tiny configs)")
    args = parser.parse_args()
    global DEVICE
    if args.cpu:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device")
    work = Path(tempfile.mkdtemp())
    results = [check(c, work) for c in args.configs]
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    print("| model | engine | load s | prefill 32 / 256 / 1024 tok/s | decode tok/s | first token ms | peak GPU MB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for name in ("ours", "transformers"):
            m = r[name]
            print(
                f"| {r['model']} | {'omnistream ' + m.get('format', '') if name == 'ours' else 'transformers (baseline)'} "
                f"| {m.get('load_s', float('nan')):.1f} | {m['prefill_32']:.0f} / {m['prefill_256']:.0f} / {m['prefill_1024']:.0f} "
                f"| {m['decode']:.1f} | {m['ttft_ms']:.1f} | {m.get('peak_gpu_mb', float('nan')):.0f} |"
            )
        print(f"| {r['model']} | logits vs transformers | min cosine {r['logit_cosine_min']:.5f}, top-1 agreement {r['top1_agree']:.2f} | | | | |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
