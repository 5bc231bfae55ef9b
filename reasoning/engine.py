"""The LLM: load once from the prepared cache, prefill, stream tokens with our own decode loop.

transformers' ``generate()`` is not used: the loop below is short, lets the caller stop between
tokens (barge-in), and is where KV-cache reuse plugs in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

log = logging.getLogger("omnistream.reasoning.engine")


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str) -> torch.dtype:
    """ "auto": bfloat16 on a GPU or a CPU with native bf16 (AVX512-BF16/AMX), else float32 —
    on AVX2-only CPUs bf16 matmuls are emulated and several times slower than float32."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() or cpu_has_native_bf16() else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"reasoning.dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


class LLMEngine:
    def __init__(self, model_dir: Path, dtype: str = "auto", threads: int = 2):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.dtype = resolve_dtype(dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=self.dtype, attn_implementation="sdpa"
        ).eval()
        self.eos_ids = {self.tokenizer.eos_token_id}
        for token in ("<|im_end|>", "<|endoftext|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id >= 0:
                self.eos_ids.add(token_id)

    def chat_ids(self, system: str, user: str, answer_prefix: str = "") -> torch.Tensor:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(prompt + answer_prefix, return_tensors="pt").input_ids

    def chat_parts(self, system: str, marker: str = "\x00MEMORY\x00") -> tuple[str, str]:
        """The chat template split around the user's content: (text before it, text after it up
        to the start of the assistant's reply)."""
        messages = [{"role": "system", "content": system}, {"role": "user", "content": marker}]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, after = prompt.split(marker)
        return before, after

    def ids(self, text: str) -> torch.Tensor:
        """Token ids (1, n) of ``text`` without special tokens added."""
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text).input_ids)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache, start: int) -> torch.Tensor:
        """Prefill ``ids`` (1, n) at positions start.. into ``cache``; logits of the last token (1, V)."""
        positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
        out = self.model(input_ids=ids, cache=cache, use_cache=True, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    @torch.inference_mode()
    def choice_logprobs(
        self, cache, suffixes: list[torch.Tensor], letter_ids: list[int]
    ) -> list[torch.Tensor]:
        """For each suffix (1, n) appended to ``cache``: log-probabilities over ``letter_ids`` of the
        next token. The cache is cropped back after each suffix, so it is left as it was."""
        base = cache.get_seq_length()
        scores = []
        for suffix in suffixes:
            logits = self.forward(suffix, cache, base)
            scores.append(torch.log_softmax(logits[0, letter_ids], dim=-1))
            cache.crop(base - cache.get_seq_length())  # transformers 5: a negative count removes tokens
        return scores

    @torch.inference_mode()
    def stream(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        should_stop: Callable[[], bool] = lambda: False,
        cache=None,
    ) -> Iterator[str]:
        """Prefill ``input_ids`` after whatever ``cache`` holds (a new cache if None) and yield text
        pieces as tokens are decoded greedily. Stops at EOS, ``max_new_tokens`` or ``should_stop()``."""
        from transformers import DynamicCache

        cache = DynamicCache() if cache is None else cache
        position = cache.get_seq_length()
        logits = self.forward(input_ids, cache, position)
        position += input_ids.shape[1]
        generated: list[int] = []
        emitted = ""
        for _ in range(max_new_tokens):
            next_id = int(logits.argmax(-1))
            if next_id in self.eos_ids:
                break
            generated.append(next_id)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(emitted):
                yield text[len(emitted) :]
                emitted = text
            if should_stop():
                return
            logits = self.forward(torch.tensor([[next_id]]), cache, position)
            position += 1
