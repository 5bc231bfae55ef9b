"""The LLM engine: load a model once in the format ``llm.formats`` chooses, prefill, and stream
tokens with our own decode loop.

transformers' ``generate()`` is not used: the loop below is short, lets the caller stop between
tokens (barge-in), and is where KV-cache reuse plugs in.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from omnistream.reasoning.llm import formats
from omnistream.reasoning.llm.cache import BufferedCache

log = logging.getLogger("omnistream.reasoning.llm")


@functools.cache
def _libc():
    """glibc, loaded once (``find_library`` runs ``ldconfig``: not per ingest pass)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc keeps freed mid-sized buffers, e.g. the
    parts of weights fused at load: ~110 MB of resident memory for the 0.5B)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # not glibc: nothing to do
        libc.malloc_trim(0)


def map_large_buffers() -> None:
    """Make every allocation of 1 MiB or more its own mapping, returned to the OS when freed.

    By default glibc raises its mmap threshold (up to 32 MiB) each time a mapped buffer is
    freed, so after the first few passes the activations and attention buffers of a prefill
    (1-30 MB each, sizes changing with every pass) come from the heap, where freed pieces stay
    resident and fragment: in the soak the reasoner grew by ~300 MB over one long ingest of a
    record backlog and fell back only at the next ``malloc_trim``. A fixed threshold also turns
    the dynamic adjustment off."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LLMEngine:
    def __init__(self, model_dir: Path, dtype: str = "auto", threads: int = 2):
        from transformers import AutoTokenizer

        from omnistream.kernels import cpu
        from omnistream.reasoning.llm import cuda_graphs, load
        from omnistream.reasoning.llm.model import is_qwen2

        started = time.monotonic()
        map_large_buffers()
        self.model_dir = Path(model_dir)
        if not is_qwen2(self.model_dir):
            raise ValueError(
                f"{model_dir}: not a Qwen2 model (config.json model_type); the engine runs Qwen2 only"
            )
        choice = formats.choose(dtype, self.model_dir)
        self.format, self.dtype, self.device = choice.format, choice.dtype, torch.device(choice.device)
        torch.set_num_threads(threads)
        if self.format in ("int8", "gguf") and cpu.available():
            # The native kernels run the linear layers (nearly all the work) on ``threads`` cores
            # with their own workers; torch's remaining small ops run on one thread, so its OpenMP
            # barriers never wait for a core another process (or the kernel) holds: on 2 busy
            # cores two torch threads made an 80-token prefill 6x slower.
            cpu.set_threads(threads)
            torch.set_num_threads(1)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if self.format == "gguf":
            if choice.gguf is None:
                raise ValueError(
                    f"{model_dir}: format 'gguf' needs a model prepared from a GGUF (or one *.gguf in it)"
                )
            self.model = load.from_gguf(choice.gguf, self.model_dir)
        elif self.format == "int8":
            self.model = load.from_int8_dir(formats.prepare_int8(self.model_dir))
        else:
            self.model = load.from_float_dir(self.model_dir, self.dtype, str(self.device))
        release_freed_memory()  # conversion and fusing leave freed buffers on glibc's heap
        # One-token decode steps on a CUDA GPU as CUDA graph replays (None elsewhere, or with
        # OMNISTREAM_CUDA_GRAPHS=0).
        self.decoder = cuda_graphs.for_model(self.model)
        self.eos_ids = {self.tokenizer.eos_token_id}
        for token in ("<|im_end|>", "<|endoftext|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id >= 0:
                self.eos_ids.add(token_id)
        self.load_seconds = time.monotonic() - started
        log.info(
            "llm loaded",
            extra={
                "format": self.format,
                "seconds": round(self.load_seconds, 1),
                "peak_rss_mb": round(peak_rss_mb()),
            },
        )

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
        decoder = getattr(self, "decoder", None)
        if decoder is not None and ids.shape[1] == 1:
            logits = decoder.step(ids, cache, start)  # None: the step does not fit, run eagerly
            if logits is not None:
                return logits
        positions = torch.arange(start, start + ids.shape[1], device=self.device).unsqueeze(0)
        out = self.model(
            input_ids=ids.to(self.device),
            cache=cache,
            use_cache=True,
            position_ids=positions,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float().cpu()

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
    def continuation_logprobs(
        self, cache, prompt: torch.Tensor, continuations: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Prefill ``prompt`` (1, n) after ``cache``, then for each continuation (1, m): the
        log-probability of each of its tokens (m,) following the prompt. The cache is cropped back
        to what it held before, so it is left as it was."""
        base = cache.get_seq_length()
        last = torch.log_softmax(self.forward(prompt, cache, base)[0], dim=-1)
        start = base + prompt.shape[1]
        scores = []
        for ids in continuations:
            first = last[int(ids[0, 0])].reshape(1)
            if ids.shape[1] > 1:
                positions = torch.arange(start, start + ids.shape[1] - 1, device=self.device).unsqueeze(0)
                logits = (
                    self.model(
                        input_ids=ids[:, :-1].to(self.device),
                        cache=cache,
                        use_cache=True,
                        position_ids=positions,
                        logits_to_keep=ids.shape[1] - 1,
                    )
                    .logits[0]
                    .float()
                    .cpu()
                )
                rest = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
                cache.crop(start - cache.get_seq_length())
                first = torch.cat([first, rest])
            scores.append(first)
        cache.crop(base - cache.get_seq_length())
        return scores

    @torch.inference_mode()
    def greedy(self, input_ids: torch.Tensor, max_new_tokens: int, cache=None) -> Iterator[int]:
        """Prefill ``input_ids`` after whatever ``cache`` holds (a new cache if None), then yield
        greedily decoded token ids until EOS or ``max_new_tokens``. The next token is computed only
        when the caller asks for it, so stopping between tokens costs nothing."""
        cache = BufferedCache() if cache is None else cache
        position = cache.get_seq_length()
        next_id = int(self.forward(input_ids, cache, position).argmax(-1))
        position += input_ids.shape[1]
        for step in range(max_new_tokens):
            if next_id in self.eos_ids:
                return
            yield next_id
            if step + 1 < max_new_tokens:
                next_id = self.next_token(next_id, cache, position)
                position += 1

    @torch.inference_mode()
    def next_token(self, token: int, cache, position: int) -> int:
        """Decode ``token`` at ``position`` after ``cache``; the greedy next token id. On a CUDA
        GPU a CUDA graph replay whose argmax is read back (8 bytes, one sync)."""
        decoder = getattr(self, "decoder", None)
        if decoder is not None:
            next_id = decoder.next_token(token, cache, position)
            if next_id is not None:
                return next_id
        return int(self.forward(torch.tensor([[token]]), cache, position).argmax(-1))

    def stream(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        should_stop: Callable[[], bool] = lambda: False,
        cache=None,
    ) -> Iterator[str]:
        """Text pieces of the greedy continuation as tokens are decoded. Stops at EOS,
        ``max_new_tokens`` or ``should_stop()`` (checked after every token)."""
        text = TextStream(self.tokenizer)
        for token_id in self.greedy(input_ids, max_new_tokens, cache):
            piece = text.push(token_id)
            if piece:
                yield piece
            if should_stop():
                return


class TextStream:
    """Incremental detokenization: each pushed token id gives the text it completes. Only a short
    tail is decoded each time (not the whole answer), and a piece is held back while it ends in
    an incomplete UTF-8 sequence or could still merge with the next token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.context = 0  # decoding starts here, one piece back, so merges across pieces come out right
        self.shown = 0  # ids whose text has been returned

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.context : self.shown], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.context :], skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(before) or not text.startswith(before):
            return ""
        self.context, self.shown = self.shown, len(self.ids)
        return text[len(before) :]

    def rest(self) -> str:
        """The text of the pushed ids not returned yet (a piece held back at the end)."""
        before = self.tokenizer.decode(self.ids[self.context : self.shown], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.context :], skip_special_tokens=True)
        self.context, self.shown = self.shown, len(self.ids)
        return text[len(before) :] if text.startswith(before) else ""
