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


class LLMEngine:
    def __init__(self, model_dir: Path, dtype: str = "bfloat16", threads: int = 2):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype), attn_implementation="sdpa"
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

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text).input_ids)

    @torch.inference_mode()
    def stream(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        should_stop: Callable[[], bool] = lambda: False,
        first_token_filter: list[int] | None = None,
    ) -> Iterator[str]:
        """Yield text pieces as tokens are decoded (greedy). ``first_token_filter`` restricts the
        first token to the given ids (multiple-choice letters)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :]
        if first_token_filter:
            mask = torch.full_like(logits, float("-inf"))
            mask[:, first_token_filter] = 0.0
            logits = logits + mask
        generated: list[int] = []
        emitted = ""
        position = input_ids.shape[1]
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
            out = self.model(
                input_ids=torch.tensor([[next_id]]),
                cache=cache,
                use_cache=True,
                position_ids=torch.tensor([[position]]),
            )
            position += 1
            logits = out.logits[:, -1, :]
