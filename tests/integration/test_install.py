"""The repository root is the omnistream package's folder and holds ``kernels/``, a name the Hugging
Face package that transformers imports also has. Nothing started from the root may shadow it."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RUN_QWEN2 = """
import sys
import kernels, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
import omnistream.kernels.ops
torch.manual_seed(0)
config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
logits = Qwen2ForCausalLM(config).eval()(torch.arange(6)[None]).logits
print(repr(sys.path[0]))
print(kernels.__file__)
print(omnistream.kernels.ops.__file__)
print(tuple(logits.shape), bool(torch.isfinite(logits).all()))
"""


def _from_root(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_transformers_qwen2_runs_from_the_repository_root_with_hugging_face_kernels() -> None:
    assert version("kernels")  # the Hugging Face package is installed (dev extra)
    done = _from_root("-c", RUN_QWEN2)
    assert done.returncode == 0, done.stderr[-3000:]
    path0, hf_kernels, ours, result = done.stdout.strip().splitlines()[-4:]
    assert path0 == "''"  # the root (current directory) was first on sys.path
    assert Path(hf_kernels).resolve().parent != ROOT / "kernels"  # the installed package
    assert Path(hf_kernels).parent.parent.name == "site-packages", hf_kernels
    assert Path(ours).resolve() == ROOT / "kernels" / "ops.py"  # and omnistream.kernels is still ours
    assert result == "(1, 6, 64) True"


def test_top_level_kernels_without_the_package_names_it() -> None:
    """Without site-packages the top-level name finds only the project's folder, which says what is
    missing instead of posing as the Hugging Face package."""
    done = _from_root("-S", "-c", "import kernels")
    assert done.returncode == 1
    assert "ModuleNotFoundError: No module named 'kernels' (the Hugging Face package" in done.stderr
