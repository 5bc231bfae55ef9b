"""The LLM: load once from the prepared cache, prefill, stream tokens with our own decode loop.

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

from omnistream.reasoning.cache import BufferedCache

log = logging.getLogger("omnistream.reasoning.engine")


FORMATS = ("auto", "gguf", "int8", "float32", "bfloat16", "float16")


def gguf_file(model_dir: Path) -> Path | None:
    """The GGUF a prepared model directory came from: ``<cache>/gguf/<name>.gguf`` beside
    ``<cache>/llm/<name>-<dtype>`` (reasoning/prepare.py), or the one ``*.gguf`` inside a local
    model directory; None if there is none."""
    model_dir = Path(model_dir)
    name = model_dir.name.rsplit("-", 1)[0]
    packaged = model_dir.parent.parent / "gguf" / f"{name}.gguf"
    if packaged.is_file() and packaged.with_suffix(".gguf.sha256").is_file():
        return packaged
    inside = sorted(model_dir.glob("*.gguf")) if model_dir.is_dir() else []
    return inside[0] if len(inside) == 1 else None


def resolve_format(fmt: str, model_dir: Path | None = None) -> str:
    """The weight format to run. "auto" is bfloat16 on a GPU; on a CPU (decoding is bound by
    memory bandwidth) it is "gguf" for a Qwen2 model prepared from a K-quant GGUF (``model_dir``)
    where the native kernel builds: the file's own 4.5-6.5-bit blocks (reasoning/native/
    kquant.py; the 1.5B Q4_K_M decodes 45 % faster than as int8 in 640 MB less RAM, but
    prefills ~2.7x slower), else int8 (a quarter of float32; see reasoning/quant.py)."""
    if fmt not in FORMATS:
        raise ValueError(f"reasoning.dtype must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "auto":
        if torch.cuda.is_available():
            return "bfloat16"
        return "gguf" if model_dir is not None and gguf_runnable(model_dir) else "int8"
    return fmt


def gguf_runnable(model_dir: Path) -> bool:
    """Whether "auto" runs ``model_dir`` as "gguf": a Qwen2 with its GGUF beside it, every weight
    in a block type the native kernel has, mostly K-quants (``kquant.k_quant_share``: the 0.5B's
    Q5_0/Q8_0 decode faster as int8), and the kernel built."""
    from omnistream.reasoning import qwen2

    path = gguf_file(model_dir)
    if path is None or not qwen2.is_qwen2(model_dir):
        return False
    from omnistream.reasoning.native import kquant

    return kquant.available() and kquant.supports(path) and kquant.k_quant_share(path) >= 0.5


def resolve_dtype(dtype: str) -> torch.dtype:
    """The dtype activations and the KV cache are kept in for a weight format."""
    fmt = resolve_format(dtype)
    return torch.float32 if fmt in ("int8", "gguf") else getattr(torch, fmt)


PREPARED_DTYPES = ("bfloat16", "float16", "float32")


def int8_dir(model_dir: Path) -> Path:
    """Where the int8 conversion of a model directory is cached: ``<name>-int8`` beside a
    prepared ``<name>-<dtype>``, else ``<directory name>-int8`` (two local models whose names share
    a prefix, "qwen-1b" and "qwen-7b", get two caches; the cache also records which weights it was
    made from, see ``quant.prepare_int8``)."""
    stem, _, suffix = model_dir.name.rpartition("-")
    return model_dir.with_name(f"{stem if stem and suffix in PREPARED_DTYPES else model_dir.name}-int8")


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

        from omnistream.reasoning import native, qwen2
        from omnistream.reasoning.quant import load_int8, prepare_int8

        started = time.monotonic()
        map_large_buffers()
        self.model_dir = Path(model_dir)
        self.format = resolve_format(dtype, model_dir)
        torch.set_num_threads(threads)
        if self.format in ("int8", "gguf") and native.available():
            # The int8 kernel runs the linear layers (nearly all the work) on ``threads`` cores
            # with its own workers; torch's remaining small ops run on one thread, so its OpenMP
            # barriers never wait for a core another process (or the kernel) holds: on 2 busy
            # cores two torch threads made an 80-token prefill 6x slower.
            native.set_threads(threads)
            torch.set_num_threads(1)
        self.dtype = resolve_dtype(dtype)
        self.device = torch.device(
            "cuda" if torch.cuda.is_available() and self.format not in ("int8", "gguf") else "cpu"
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        # Qwen2 (the packaged models) runs on reasoning/qwen2.py; another architecture in a local
        # model directory goes through transformers.
        ours = qwen2.is_qwen2(model_dir)
        if self.format == "gguf":
            gguf = gguf_file(model_dir)
            if gguf is None or not ours:
                raise ValueError(f"{model_dir}: format 'gguf' needs a Qwen2 model prepared from a GGUF")
            self.model = qwen2.from_gguf(gguf, model_dir)
        elif self.format == "int8":
            prepared = prepare_int8(model_dir, int8_dir(model_dir))
            self.model = qwen2.from_int8_dir(prepared) if ours else load_int8(prepared)
        elif ours:
            self.model = qwen2.from_float_dir(model_dir, self.dtype, str(self.device))
        else:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=self.dtype, attn_implementation="sdpa"
            ).eval()
            self.model.to(self.device)
        release_freed_memory()  # conversion and fusing leave freed buffers on glibc's heap
        # One-token decode steps on a CUDA GPU as CUDA graph replays (reasoning/static_decode.py;
        # None elsewhere, or with OMNISTREAM_CUDA_GRAPHS=0).
        from omnistream.reasoning import static_decode

        self.decoder = static_decode.for_model(self.model)
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
