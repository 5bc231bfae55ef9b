"""`omnistream bench llm`: the reasoner's LLM speed per weight format, against llama.cpp.

For each model and weight format, in a fresh process (so peak RSS is that format's own):
load time, peak RSS, prefill tokens/s at 32/256/1024 tokens, decode tokens/s (one token at a time
after a 256-token prompt, the text's own next tokens fed back so every backend decodes the same
sequence), and time to first token of a 20-token question after a 1024-token context already in
the cache (the reasoner's case: memory is streamed in before the question comes). The reference
is llama-cpp-python on the same GGUF file, same prompts, same threads, in the same run; it is
installed only for this benchmark, never in the project's environment: its worker runs under the
interpreter named by ``$OMNISTREAM_LLAMA_CPP_PYTHON`` (a separate virtual environment with
llama-cpp-python, see README), else this one if it has the package; without either the reference
is skipped with a note saying so. Both compute the last position's logits on every call
(llama.cpp's ``eval`` does it internally).

The gguf format runs the GGUF's own quantized blocks on the native kernel (kernels/cpu/
kquant.c), the int8 format its int8 rows on the native int8 kernel (kernels/cpu).

The prompt text is real English prose (the GPL-3 text every Debian system carries), so tokens
per word are those of real text.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PREFILL_LENGTHS = (32, 256, 1024)
DECODE_TOKENS = 64
QUESTION_TOKENS = 20
CONTEXT_TOKENS = 1024
TEXT_FILES = (Path("/usr/share/common-licenses/GPL-3"), Path(__file__).resolve().parents[1] / "README.md")
_NOTES: list[str] = []


def corpus() -> str:
    for path in TEXT_FILES:
        if path.exists():
            return path.read_text() * 3
    raise FileNotFoundError(f"no benchmark text found (looked for {', '.join(map(str, TEXT_FILES))})")


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- workers (each runs in its own process) -------------------------------------------------------


def measure_torch(model: str, fmt: str, threads: int, quick: bool) -> dict:
    import torch

    from omnistream.protocol.config import load_config
    from omnistream.reasoning.llm.cache import BufferedCache
    from omnistream.reasoning.llm.engine import LLMEngine, peak_rss_mb
    from omnistream.reasoning.llm.prepare import prepare_llm

    config = load_config()
    model_dir = prepare_llm(model, config.cache_dir)
    start = time.perf_counter()
    engine = LLMEngine(model_dir, fmt, threads)
    load_s = time.perf_counter() - start
    from omnistream.kernels import cpu as native

    ids = engine.ids(corpus())[:, : CONTEXT_TOKENS + DECODE_TOKENS + QUESTION_TOKENS]
    repeats = 2 if quick else 3

    def prefill(n: int) -> None:
        engine.forward(ids[:, :n], BufferedCache(), 0)

    prefill(8)  # warm-up: first calls allocate and pack
    result = {"load_s": load_s, "native": native.available()}
    for n in PREFILL_LENGTHS:
        result[f"prefill_{n}"] = n / _median_time(lambda n=n: prefill(n), 1 if n >= 1024 else repeats)

    with torch.inference_mode():
        cache = BufferedCache()
        engine.forward(ids[:, :256], cache, 0)
        start = time.perf_counter()
        for i in range(DECODE_TOKENS):
            logits = engine.forward(ids[:, 256 + i : 257 + i], cache, 256 + i)
            int(logits.argmax(-1))
        result["decode"] = DECODE_TOKENS / (time.perf_counter() - start)

        cache = BufferedCache()
        engine.forward(ids[:, :CONTEXT_TOKENS], cache, 0)
        question = ids[:, CONTEXT_TOKENS : CONTEXT_TOKENS + QUESTION_TOKENS]

        def first_token() -> None:
            int(engine.forward(question, cache, CONTEXT_TOKENS).argmax(-1))
            cache.crop(-QUESTION_TOKENS)

        result["ttft_ms"] = 1000 * _median_time(first_token, 5)
    result["peak_rss_mb"] = peak_rss_mb()
    result["rss_mb"] = _rss_mb()
    return result


def _rss_mb() -> float:
    """Resident memory now (after the measurements: the steady size, not the load's peak)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_llama_cpp(gguf: str, threads: int, quick: bool) -> dict:
    """The llama.cpp reference on the GGUF file ``gguf``. Imports only llama_cpp and the standard
    library: it runs as a script under another venv's interpreter (``LLAMA_CPP_PYTHON``)."""
    import resource

    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(
        model_path=gguf,
        n_ctx=4096,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=1024,
        verbose=False,
    )
    load_s = time.perf_counter() - start
    tokens = llm.tokenize(corpus().encode(), add_bos=False)[
        : CONTEXT_TOKENS + DECODE_TOKENS + QUESTION_TOKENS
    ]
    repeats = 2 if quick else 3

    def prefill(n: int) -> None:
        llm.reset()
        llm.eval(tokens[:n])

    prefill(8)
    result = {"load_s": load_s}
    for n in PREFILL_LENGTHS:
        result[f"prefill_{n}"] = n / _median_time(lambda n=n: prefill(n), 1 if n >= 1024 else repeats)
    prefill(256)
    start = time.perf_counter()
    for i in range(DECODE_TOKENS):
        llm.eval([tokens[256 + i]])
    result["decode"] = DECODE_TOKENS / (time.perf_counter() - start)
    prefill(CONTEXT_TOKENS)
    question = tokens[CONTEXT_TOKENS : CONTEXT_TOKENS + QUESTION_TOKENS]

    def first_token() -> None:
        llm.eval(question)
        llm.n_tokens = CONTEXT_TOKENS  # the next eval drops the question's KV

    result["ttft_ms"] = 1000 * _median_time(first_token, 5)
    # Not engine.peak_rss_mb: importing the engine would load torch into the reference process.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_mb"] = _rss_mb()
    return result


# -- the suite --------------------------------------------------------------------------------


LLAMA_CPP_PYTHON = "OMNISTREAM_LLAMA_CPP_PYTHON"  # interpreter (its own venv) with llama-cpp-python


def _gguf_path(model: str) -> str:
    from omnistream.protocol.config import load_config
    from omnistream.reasoning.llm.prepare import PACKAGED_MODELS, assemble_gguf

    return str(assemble_gguf(PACKAGED_MODELS[model], load_config().cache_dir / "gguf"))


def _run_worker(
    backend: str, model: str, fmt: str, threads: int, quick: bool, python: str | None = None
) -> dict:
    if backend == "llama_cpp":  # this file as a script (-P: nothing beside it on sys.path), the GGUF's path
        head = [python or sys.executable, "-P", str(Path(__file__).resolve()), backend, _gguf_path(model)]
    else:
        head = [sys.executable, "-m", "omnistream.bench.llm", backend, model]
    command = [*head, fmt, str(threads)]
    if quick:
        command.append("--quick")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker {backend} {model} {fmt} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_cpp_python() -> tuple[str | None, str]:
    """(interpreter, "") for the llama.cpp worker, or (None, why not): ``$OMNISTREAM_LLAMA_CPP_PYTHON``
    when set (it must import llama_cpp), else this interpreter if it has llama-cpp-python."""
    import importlib.util

    python = os.environ.get(LLAMA_CPP_PYTHON)
    if python:
        done = (
            subprocess.run(
                [python, "-c", "import llama_cpp"], capture_output=True, text=True, check=False, timeout=60
            )
            if Path(python).exists()
            else None
        )
        if done is None or done.returncode != 0:
            return None, f"${LLAMA_CPP_PYTHON}={python} cannot import llama_cpp: no llama.cpp reference"
        return python, ""
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable, ""
    return None, (
        "llama-cpp-python is not installed: no llama.cpp reference (install it in its own venv and "
        f"set ${LLAMA_CPP_PYTHON} to that venv's python, see README)"
    )


def llama_cpp_available() -> bool:
    return llama_cpp_python()[0] is not None


ROWS = [
    *((f"prefill_{n}", f"prefill {n} tokens", "tokens/s") for n in PREFILL_LENGTHS),
    ("decode", "decode", "tokens/s"),
    ("ttft_ms", f"first token, {QUESTION_TOKENS}-token question, {CONTEXT_TOKENS} cached", "ms"),
    ("load_s", "load", "s"),
    ("peak_rss_mb", "peak RSS", "MB"),
    ("rss_mb", "RSS after the runs", "MB"),
]


def run(
    quick: bool = False,
    progress: Callable[[str], None] = print,
    models: tuple[str, ...] | None = None,
    formats: tuple[str, ...] | None = None,
    threads: int = 2,
) -> list[dict]:
    from omnistream.protocol.config import load_config

    config = load_config()
    models = models or (
        (config.reasoning.model,)
        if quick
        else tuple(dict.fromkeys((config.reasoning.model, "qwen2.5-coder-0.5b")))
    )
    formats = formats or (("gguf", "int8", "float32") if quick else ("gguf", "int8", "float32", "bfloat16"))
    rows: list[dict] = []
    _NOTES.clear()
    python, missing = llama_cpp_python()
    if python is None:
        _NOTES.append(missing)
    for model in models:
        reference = None
        if python is not None:
            progress(f"bench llm: llama.cpp {model} (reference)")
            reference = _run_worker("llama_cpp", model, "Q4_K_M", threads, quick, python)
        for fmt in formats:
            progress(f"bench llm: {model} {fmt}")
            measured = _run_worker("torch", model, fmt, threads, quick)
            for key, label, unit in ROWS:
                row = {"name": f"{model} {fmt}: {label}", "value": round(measured[key], 2), "unit": unit}
                if reference is not None:
                    row.update(baseline=round(reference[key], 2), baseline_name="llama.cpp Q4_K_M")
                rows.append(row)
    return rows


def report_extra() -> dict:
    return {"markdown": "\n".join(f"Note: {note}" for note in _NOTES)} if _NOTES else {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m omnistream.bench.llm", description="one bench worker")
    parser.add_argument("backend", choices=("torch", "llama_cpp"))
    parser.add_argument("model", help="a packaged model's name; for llama_cpp also a .gguf file's path")
    parser.add_argument("format")
    parser.add_argument("threads", type=int)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.backend == "torch":
        result = measure_torch(args.model, args.format, args.threads, args.quick)
    else:
        gguf = args.model if args.model.endswith(".gguf") else _gguf_path(args.model)
        result = measure_llama_cpp(gguf, args.threads, args.quick)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
