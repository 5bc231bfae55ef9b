"""Answering: memory in, a streamed answer (or a scored multiple-choice letter) out.

The prompt is the chat template split in three: a prefix (system prompt and memory header: the
attention sinks), one line per memory record, and a suffix (what is on screen now with the
timeline of the things the question names, the few records the question is about repeated
(``prompt.related_records``: a small model copies from a line next to the question, not from one
2000 tokens back), the current time, the question and its choices, the start of the assistant's
reply). In "full" mode the
record lines come from the session's streamed KV cache and only the suffix is prefilled; the
baselines re-read records as text.

Multiple choice is answered from the model's own short open answer to the question (the choice
that answer names; see ``Answerer.choose`` for the other scorings), so the pick agrees with what
the assistant says when asked openly.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omnistream.protocol.messages import Ask, Draft, MemoryRecord
from omnistream.protocol.text import words
from omnistream.reasoning.choices import NOT_SEEN, supported_choice
from omnistream.reasoning.kvcache import BlockStore, StreamingKV
from omnistream.reasoning.llm.cache import BufferedCache, cache_from
from omnistream.reasoning.llm.engine import LLMEngine, TextStream
from omnistream.reasoning.prompt import (
    CHOICE_LETTERS,
    SYSTEM_PROMPT,
    backlog_records,
    clock,
    format_item,
    related_lines,
    related_records,
)

CHOICE_PREFIX = re.compile(r"^\s*([A-F])[\s.):]+")
NO_MEMORY_TEXT = "(nothing remembered: answer only from what is on screen now)"
RECENT_WINDOW_S = 30.0  # the "recent" baseline: what a short context window would hold
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al.)
DRAFT_MAX_AGE_S = 8.0  # a question read ahead (``Answerer.prepare``) is used for an Ask this recent
DRAFT_MEMORY_S = 15.0  # ... and its memory, assembled at the first draft, is rebuilt after this
# What goes into the KV stream (perceived records); events and the synopsis are derived.
# Sightings are not streamed: memory hands the reasoner their timeline for the things a question
# names (the "now" record's facts); streaming each of them cost every question behind the backlog
# (first token p95 3.9 -> 36.9 s on docs/episodes/objects at 2x, BENCHMARKS.md).
STREAMED_KINDS = ("clip", "transcript")
# How a multiple-choice question is answered (Answerer.choose).
CHOICE_SCORING = ("answer", "text", "letter")
OPEN_FIRST_TOKENS = 40  # the short open answer a multiple-choice pick is made from
SHORTLY = "\nIn short: "  # after that answer, what each choice's words are scored as following
RELATED_HEADER = "Memory lines about this question:"


def session_dir_name(session: str) -> str:
    """A directory name for a session that cannot leave its parent ("..", "/") and stays the same
    across restarts: the readable part plus a hash of the exact name."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", session)[:48]
    return f"{readable}-{hashlib.sha256(session.encode()).hexdigest()[:12]}"


KV_FILES_VERSION = 1  # bump when what a block file holds changes


def kv_fingerprint(engine, prefix_ids: list[int]) -> str:
    """What the cached keys and values depend on: the model (its directory and, for a source
    fingerprint, its config), the weight format, dtype and device, and the prompt prefix they
    were computed after. Spilled blocks live under it: another model's, format's or prompt's
    blocks are never read (``omnistream --model`` changed, two systems sharing a data dir)."""
    config = engine.model_dir / "config.json"
    parts = {
        "version": KV_FILES_VERSION,
        "model": str(engine.model_dir.resolve()),
        "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.exists() else "",
        "format": engine.format,
        "dtype": str(engine.dtype),
        "device": str(engine.device),
        "prefix": hashlib.sha256(str(list(prefix_ids)).encode()).hexdigest(),
    }
    return hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:16]


def tap_queries(model, callback: Callable[[torch.Tensor], None]) -> list:
    """Call ``callback`` with each layer's q projection (batch, tokens, heads * head_dim) on the
    next forward passes (our Qwen2's ``on_query``); returns handles with ``remove()``."""
    handles = []
    for layer in model.model.layers:
        layer.self_attn.on_query.append(callback)
        handles.append(_Untap(layer.self_attn.on_query, callback))
    return handles


@dataclass
class _Untap:
    callbacks: list
    callback: Callable

    def remove(self) -> None:
        self.callbacks.remove(self.callback)


def split_choice(choice: str) -> str:
    """'C a butterfly' / 'C) a butterfly' -> 'a butterfly'."""
    return CHOICE_PREFIX.sub("", choice, count=1).strip()


def merge_spans(spans: list[tuple[float, float]], gap_s: float = 0.5) -> list[list[float]]:
    """Stream-time spans sorted and merged where they overlap or nearly touch."""
    merged: list[list[float]] = []
    for t0, t1 in sorted(spans):
        if merged and t0 <= merged[-1][1] + gap_s:
            merged[-1][1] = max(merged[-1][1], t1)
        else:
            merged.append([t0, t1])
    return merged


def common_prefix(a: list, b: list) -> int:
    """Length of the longest common prefix of two sequences."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@dataclass
class Prepared:
    """A spoken question read ahead while the user was still speaking (``Answerer.prepare``):
    its memory assembled into ``cache``, then the suffix's head (what is on screen, the time,
    "Question:") and the question's tokens so far, ``question_ids``, after ``base`` tokens."""

    question: str
    cache: object
    base: int
    question_ids: list[int]
    at: float  # time.monotonic() of the last draft
    made: float = field(default_factory=time.monotonic)  # when its memory was assembled
    context: list[list[float]] = field(default_factory=list)  # spans of the records in ``cache``


def _fresh(prepared: Prepared | None) -> bool:
    now = time.monotonic()
    return (
        prepared is not None
        and now - prepared.at <= DRAFT_MAX_AGE_S
        and now - prepared.made <= DRAFT_MEMORY_S
    )


@dataclass
class SessionMemory:
    """One session's streamed KV and the id of the last record it holds."""

    kv: StreamingKV
    last_item_id: int = 0
    block_of_item: dict[int, int] = field(default_factory=dict)


class Answerer:
    def __init__(
        self,
        engine: LLMEngine,
        window_tokens: int = 8192,
        retrieved_tokens: int = 2048,
        block_ram_bytes: int = 512 << 20,
        spill_root: Path | None = None,
        internal_retrieval: bool = True,
        system_prompt: str = "",
        choice_scoring: str = "answer",
        sessions_in_ram: int = 0,
        on_unload: Callable[[str], None] = lambda session: None,
        backlog_tokens: int = 128,
        related: bool = True,
    ):
        if choice_scoring not in CHOICE_SCORING:
            raise ValueError(f"choice scoring must be one of {CHOICE_SCORING}, got {choice_scoring!r}")
        self.choice_scoring = choice_scoring
        self.internal_retrieval = internal_retrieval
        self.last_blocks: list[int] = []  # the evicted blocks the last KV question used
        self.last_context: list[list[float]] = []  # spans of the records the last answer read
        self.last_open_answer = ""  # the open answer the last multiple-choice pick was made from
        self.related: list[str] = []  # memory lines repeated before the question (memory_for)
        self.repeat_related = related  # reasoning.related_records
        # Records retrieved for a question that its session's KV does not hold yet (queued behind
        # it, ``memory_for``'s ``queued_from``): at most this many tokens of them read as text.
        self.backlog_tokens = backlog_tokens
        self.last_backlog: list[MemoryRecord] = []  # those the last answer read
        # Where the last answer's first token went: assembling its memory, and the prompt read
        # after it (what is on screen, related lines, the question), in tokens.
        self.last_memory_s = 0.0
        self.last_suffix_tokens = 0
        self.engine = engine
        self.block_ram_bytes = block_ram_bytes
        self.spill_root = spill_root
        self.window_tokens = window_tokens
        self.retrieved_tokens = retrieved_tokens
        self.prefix_text, self.suffix_end = engine.chat_parts(system_prompt or SYSTEM_PROMPT)
        self.prefix_text += "Memory of the stream:\n"
        self.prefix_ids = engine.ids(self.prefix_text)
        # Spilled KV blocks are kept per model/format/dtype/device/prompt (kv_fingerprint).
        self.spill_dir = spill_root / kv_fingerprint(engine, self.prefix_ids) if spill_root else None
        self.letter_ids = [engine.tokenizer.convert_tokens_to_ids(letter) for letter in CHOICE_LETTERS]
        # Least recently used first; beyond ``sessions_in_ram`` (0: no limit) the first is
        # unloaded: its KV leaves RAM (evicted blocks stay on disk with ``spill_root``) and
        # ``on_unload`` is told, so the caller streams its records again when it comes back.
        self.sessions: OrderedDict[str, SessionMemory] = OrderedDict()
        self.sessions_in_ram = sessions_in_ram
        self.on_unload = on_unload
        self.prepared: dict[str, Prepared] = {}  # by session

    # -- memory ingestion ------------------------------------------------------------------------

    def session(self, name: str) -> SessionMemory:
        if name in self.sessions:
            self.sessions.move_to_end(name)
        else:
            while self.sessions_in_ram > 0 and len(self.sessions) >= self.sessions_in_ram:
                self.unload(next(iter(self.sessions)))
            spill_dir = self.spill_dir / session_dir_name(name) if self.spill_dir else None
            store = BlockStore(self.block_ram_bytes, spill_dir, persist=spill_dir is not None)
            kv = StreamingKV(self.engine.model, self.prefix_ids, self.window_tokens, store)
            memory = SessionMemory(kv)
            # Blocks an earlier run evicted come back from disk; the records after them (the
            # live window) are streamed again from memory's history.
            for block in store:
                memory.block_of_item[block.item_id] = block.block_id
                memory.last_item_id = max(memory.last_item_id, block.item_id)
            self.sessions[name] = memory
        return self.sessions[name]

    def unload(self, name: str) -> None:
        """Drop the session's KV (live window, RAM tier) and any question read ahead for it.
        Its spilled blocks stay on disk: ``session`` finds them again, as after a restart."""
        if self.sessions.pop(name, None) is not None:
            self.prepared.pop(name, None)
            self.on_unload(name)

    def ingest(self, session: str, item: MemoryRecord) -> bool:
        """Stream one record into the session's KV cache (once: records are keyed by id)."""
        return bool(self.ingest_many(session, [item]))

    def ingest_many(self, session: str, items: list[MemoryRecord]) -> list[MemoryRecord]:
        """Stream records (in id order) into the session's KV cache, several per forward pass;
        returns those that were new (records already held, or not streamed kinds, are skipped)."""
        memory = self.session(session)
        new: list[MemoryRecord] = []
        last = memory.last_item_id
        for item in items:
            if item.kind in STREAMED_KINDS and item.item_id > last:
                new.append(item)
                last = item.item_id
        if not new:
            return []
        lines = [format_item(item) for item in new]
        entries = [
            (self.engine.ids(line + "\n"), item.t0, item.t1, line, item.item_id)
            for item, line in zip(new, lines, strict=True)
        ]
        for item, block in zip(new, memory.kv.append_many(entries), strict=True):
            memory.block_of_item[item.item_id] = block.block_id
        memory.last_item_id = new[-1].item_id
        return new

    # -- prompt pieces -------------------------------------------------------------------------

    def suffix_head(self, ask: Ask, now: MemoryRecord | None) -> str:
        """The suffix up to the question's words (it ends in "Question:")."""
        parts = [""]
        if now is not None:
            parts.append(format_item(now))
        if self.related:  # repeated next to the question: a small model copies from here
            parts.append(RELATED_HEADER + "\n" + "\n".join(self.related))
        parts.append(f"Current stream time: {clock(ask.ts)}.")
        parts.append("\nQuestion:")
        return "\n".join(parts)

    def suffix_text(self, ask: Ask, now: MemoryRecord | None, choices: list[str]) -> str:
        parts = [f"{self.suffix_head(ask, now)} {ask.question}"]
        if choices:
            lettered = [f"{CHOICE_LETTERS[i]}. {text}" for i, text in enumerate(choices)]
            parts.append("Choices:\n" + "\n".join(lettered))
            parts.append("Answer with the letter of the correct choice.")
        return "\n".join(parts) + self.suffix_end

    def text_cache(self, records: list[MemoryRecord]):
        """A fresh cache holding prefix + the records as text (the re-prefill baselines)."""
        return self.text_cache_lines([format_item(item) for item in records])

    def text_cache_lines(self, lines: list[str]):
        text = "".join(line + "\n" for line in lines) or NO_MEMORY_TEXT + "\n"
        cache = BufferedCache()
        self.engine.forward(self.engine.ids(self.prefix_text + text), cache, 0)
        return cache

    @torch.inference_mode()
    def question_queries(self, kv: StreamingKV, question: str) -> torch.Tensor:
        """The question's query vectors before RoPE, (layers, q_heads, tokens, head_dim): the
        question prefilled after the sinks, each layer's q projection captured on the way."""
        config = self.engine.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        captured: list[torch.Tensor] = []
        hooks = tap_queries(self.engine.model, lambda q: captured.append(q[0]))
        try:
            sinks = cache_from(
                [layer.keys[:, :, : kv.n_sink] for layer in kv.cache.layers],
                [layer.values[:, :, : kv.n_sink] for layer in kv.cache.layers],
            )
            self.engine.forward(self.engine.ids(question), sinks, kv.n_sink)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.stack([q.reshape(q.shape[0], -1, head_dim).transpose(0, 1) for q in captured]).float()

    def kv_cache(self, session: str, retrieved: list[MemoryRecord], question: str = ""):
        """The session's streamed cache with retrieved evicted blocks put back: the blocks of the
        records memory found by text (external retrieval) fused with the blocks the question's
        own queries score highest (internal retrieval), up to ``retrieved_tokens``."""
        memory = self.session(session)
        # An event memory merged stands for its member records, whose blocks the stream holds.
        item_ids = [
            i for item in retrieved for i in (item.members if item.kind == "event" else [item.item_id])
        ]
        # Records stored after the question was asked (while it waited) are not part of its memory.
        asked_at = max((memory.block_of_item.get(i, -1) for i in item_ids), default=-1)
        candidates = {b.block_id for b in memory.kv.evicted if b.block_id <= asked_at}
        external = [memory.block_of_item[i] for i in item_ids if memory.block_of_item.get(i) in candidates]
        internal: list[int] = []  # evicted blocks the question's queries attend to most
        if question and self.internal_retrieval and candidates:
            internal = memory.kv.evicted.rank(self.question_queries(memory.kv, question), candidates)
        fused: dict[int, float] = {}
        for ranking in (external, internal):  # reciprocal rank fusion
            for rank, block_id in enumerate(dict.fromkeys(ranking)):
                fused[block_id] = fused.get(block_id, 0.0) + 1.0 / (RRF_K + rank)
        blocks, budget = [], self.retrieved_tokens
        for block_id in sorted(fused, key=lambda i: -fused[i]):
            block = memory.kv.evicted.blocks[block_id]
            if block.n_tokens <= budget:
                blocks.append(block)
                budget -= block.n_tokens
        later = sum(b.n_tokens for b in memory.kv.window if b.block_id > asked_at)
        self.last_blocks = [b.block_id for b in blocks]
        in_context = blocks + [b for b in memory.kv.window if b.block_id <= asked_at]
        self.last_context = merge_spans([(b.t0, b.t1) for b in in_context])
        return memory.kv.assemble(blocks, drop_newest_tokens=later)

    def memory_for(
        self, ask: Ask, items: list[MemoryRecord], queued_from: int | None = None
    ) -> tuple[object, MemoryRecord | None]:
        """The cache to answer ``ask`` from, and the 'now' record, according to ``ask.mode``.

        ``queued_from``: the id of the first record queued to be streamed into the session's KV
        after the answer (the caller's backlog): retrieved records from it on are not streamed
        here (the KV holds records in order); in "full" mode the most related and newest of them
        are read as text after the memory, up to ``backlog_tokens``."""
        now = next((item for item in items if item.kind == "now"), None)
        synopsis = [item for item in items if item.kind == "synopsis"][:1]
        records = [item for item in items if item.kind not in ("now", "synopsis")]
        perceived = [item for item in records if item.kind in STREAMED_KINDS]
        waiting = [r for r in perceived if queued_from is not None and r.item_id >= queued_from]
        unread = {r.item_id for r in waiting}
        held = [r for r in records if r.item_id not in unread]
        self.ingest_many(
            ask.session, sorted((r for r in perceived if r.item_id not in unread), key=lambda r: r.item_id)
        )
        self.last_backlog = []
        if ask.mode == "full":
            cache = self.kv_cache(ask.session, held, ask.question)
            # The synopsis stands for what left the window: after the memory, before the
            # question. While the window still holds the whole session it tells nothing the
            # records do not, and re-reading it cost every question 1-3 s on 2 cores.
            if synopsis and len(self.session(ask.session).kv.evicted):
                line = self.engine.ids(format_item(synopsis[0]) + "\n")
                self.engine.forward(line, cache, cache.get_seq_length())
            # The backlog: newer than everything the KV holds, so after it.
            self.last_backlog = backlog_records(
                ask.question, waiting, ask.ts, self.backlog_tokens, lambda text: len(self.engine.ids(text)[0])
            )
            if self.last_backlog:
                lines = "".join(format_item(item) + "\n" for item in self.last_backlog)
                self.engine.forward(self.engine.ids(lines), cache, cache.get_seq_length())
            shown: list[MemoryRecord] = []
        elif ask.mode == "reprefill":
            shown = records
        elif ask.mode == "recent":
            shown = [r for r in perceived if r.t1 >= ask.ts - RECENT_WINDOW_S]
        else:
            shown = [r for r in perceived if r.kind == "transcript"][-1:]
        if ask.mode != "full":
            cache = self.text_cache(synopsis + shown if ask.mode == "reprefill" else shown)
            self.last_context = []
        # The records the question names, from what this mode reads (a baseline gets none of
        # what it does not hold), repeated next to the question.
        # (The backlog read just before the question is not repeated.)
        pool = held if ask.mode == "full" else shown
        related = related_records(ask.question, pool, ask.ts) if self.repeat_related else []
        self.related = related_lines(related, pool, ask.question)
        shown = shown + related + self.last_backlog
        spans = [tuple(span) for span in self.last_context] + [(r.t0, r.t1) for r in shown]
        self.last_context = merge_spans(spans + ([(now.t0, now.t1)] if now is not None else []))
        return cache, now

    # -- answering -----------------------------------------------------------------------------

    def open_answer_tokens(
        self, cache, prompt: torch.Tensor, should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[int]:
        """The greedy short answer to ``prompt``, token by token, up to its first line break (at
        most OPEN_FIRST_TOKENS); the cache is cropped back to what it held before at the end."""
        base = cache.get_seq_length()
        newline = set(self.engine.ids("\n")[0].tolist())
        try:
            for n, token in enumerate(self.engine.greedy(prompt, OPEN_FIRST_TOKENS, cache)):
                if token in newline and n:
                    return
                yield token
                if should_stop():
                    return
        finally:
            cache.crop(base - cache.get_seq_length())

    def open_answer(self, cache, prompt: torch.Tensor) -> list[int]:
        return list(self.open_answer_tokens(cache, prompt))

    def choose_after(
        self, ask: Ask, cache, prompt: torch.Tensor, answer_ids: list[int]
    ) -> tuple[str, list[float]]:
        """ "answer" scoring once the open answer (``answer_ids``, after ``prompt``) is known."""
        texts = [split_choice(c) for c in ask.choices[: len(CHOICE_LETTERS)]]
        said = self.engine.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        self.last_open_answer = said
        picked = supported_choice(said, texts)
        if picked is not None:
            return CHOICE_LETTERS[picked], [float(i == picked) for i in range(len(texts))]
        continuations = [self.engine.ids(text) for text in texts]
        if said and not NOT_SEEN.search(said):  # score the choices after the answer
            tail = self.engine.ids(SHORTLY)
            prompt = torch.cat([prompt, torch.tensor([answer_ids], dtype=prompt.dtype), tail], dim=1)
            continuations = [self.engine.ids(" " + text.strip()) for text in texts]
        means = [float(lp.mean()) for lp in self.engine.continuation_logprobs(cache, prompt, continuations)]
        return CHOICE_LETTERS[max(range(len(means)), key=means.__getitem__)], means

    def choose(self, ask: Ask, cache, now: MemoryRecord | None) -> tuple[str, list[float]]:
        """The choice to answer with; returns (letter, one score per choice, higher is better).

        "answer" scoring (the default): the question is first answered openly, as a user asking
        it without choices would be answered (``open_answer``); the choice that answer names is
        picked (``choices.supported_choice``), else the choice whose words are most likely
        after the answer and "In short:", so the pick agrees with the assistant's own answer.
        An answer that says it did not see or hear falls back to "text" scoring.
        "text": the question is asked without the choices and each
        choice's own words are scored as the start of the reply, by their mean log-probability
        per token: a small model copies well from what it has in context (a quote heard, a word
        read on screen), while picking a letter out of a list is close to chance for it.
        "letter": the likelihood of each choice's letter with the choices listed, averaged over
        rotations of their order (a small model favours some letters; rotating cancels that)."""
        texts = [split_choice(c) for c in ask.choices[: len(CHOICE_LETTERS)]]
        self.last_open_answer = ""
        if self.choice_scoring in ("answer", "text"):
            prompt = self.engine.ids(self.suffix_text(ask, now, []))
            if self.choice_scoring == "answer":
                return self.choose_after(ask, cache, prompt, self.open_answer(cache, prompt))
            continuations = [self.engine.ids(text) for text in texts]
            logprobs = self.engine.continuation_logprobs(cache, prompt, continuations)
            means = [float(lp.mean()) for lp in logprobs]
            return CHOICE_LETTERS[max(range(len(means)), key=means.__getitem__)], means
        n = len(texts)
        suffixes, orders = [], []
        for shift in range(n):
            order = [(j + shift) % n for j in range(n)]  # displayed position j shows choice order[j]
            orders.append(order)
            suffixes.append(self.engine.ids(self.suffix_text(ask, now, [texts[k] for k in order])))
        totals = torch.zeros(n)
        for order, logprobs in zip(
            orders, self.engine.choice_logprobs(cache, suffixes, self.letter_ids[:n]), strict=True
        ):
            for position, original in enumerate(order):
                totals[original] += logprobs[position]
        means = (totals / n).tolist()
        return CHOICE_LETTERS[int(torch.argmax(totals))], means

    # -- reading a spoken question ahead -------------------------------------------------------

    def prepare(self, draft: Draft, items: list[MemoryRecord] | None) -> None:
        """Read ``draft`` (the words of a question heard so far) ahead: the first draft of a
        question assembles its memory (``items``: what memory retrieved for it) and prefills the
        suffix's head; each draft then prefills its words, reusing the tokens it shares with the
        previous draft (the cache is cut back to where they differ, as llama.cpp's prompt cache
        does). ``items`` may be None when ``has_prepared`` (the memory is already assembled)."""
        prepared = self.prepared.get(draft.session)
        if prepared is None or items is not None:
            ask = Ask(ts=draft.ts, session=draft.session, turn="", question=draft.question)
            cache, now = self.memory_for(ask, items or [])
            self.engine.forward(self.engine.ids(self.suffix_head(ask, now)), cache, cache.get_seq_length())
            prepared = Prepared(
                draft.question, cache, cache.get_seq_length(), [], time.monotonic(), context=self.last_context
            )
            self.prepared[draft.session] = prepared
        unread = self._unread(prepared, draft.question)
        if unread:
            start = prepared.base + len(prepared.question_ids) - len(unread)
            self.engine.forward(torch.tensor([unread]), prepared.cache, start)
        prepared.question, prepared.at = draft.question, time.monotonic()

    def has_prepared(self, session: str) -> bool:
        """A question is being read ahead for ``session``: its last draft is recent, and so is
        its memory (a long question gets its memory assembled again)."""
        return _fresh(self.prepared.get(session))

    def drop_stale_drafts(self) -> int:
        """Forget questions read ahead that no Ask followed; returns how many."""
        stale = [s for s in self.prepared if not self.has_prepared(s)]
        for session in stale:
            del self.prepared[session]
        return len(stale)

    def take_prepared(self, ask: Ask) -> Prepared | None:
        """The read-ahead state ``ask`` can be answered from, removed from the session: a spoken
        question (full mode, open) asked soon after its last draft, whose words begin with at
        least half of the draft's (its memory was retrieved for those words)."""
        prepared = self.prepared.pop(ask.session, None)
        if prepared is None or ask.choices or ask.mode != "full":
            return None
        if not _fresh(prepared):
            return None
        drafted, asked = words(prepared.question), words(ask.question)
        return prepared if drafted and 2 * common_prefix(drafted, asked) >= len(drafted) else None

    def _unread(self, prepared: Prepared, question: str) -> list[int]:
        """Cut the prepared cache back to the tokens it shares with ``question``'s; returns the
        question's tokens after those (for the caller to prefill)."""
        ids = self.engine.ids(f" {question}")[0].tolist()
        same = common_prefix(prepared.question_ids, ids)
        if same < len(prepared.question_ids):
            prepared.cache.crop(same - len(prepared.question_ids))
        prepared.question_ids = ids
        return ids[same:]

    def answer(
        self,
        ask: Ask,
        items: list[MemoryRecord],
        max_new_tokens: int,
        should_stop: Callable[[], bool],
        prepared: Prepared | None = None,
        queued_from: int | None = None,
    ) -> Iterator[tuple[str, str]]:
        """Yield (text piece, choice letter or "") as the answer is produced. With ``prepared``
        (``take_prepared``: the question read ahead) the answer comes from that cache, ``items``
        unused: only the question's last words are left to read. ``queued_from``: see
        ``memory_for``."""
        if prepared is not None:  # its last words and the turn's end in one pass
            unread = self._unread(prepared, ask.question) + self.engine.ids(self.suffix_end)[0].tolist()
            cache, suffix = prepared.cache, torch.tensor([unread])
            self.last_context = prepared.context
        else:
            began = time.perf_counter()
            cache, now = self.memory_for(ask, items, queued_from)
            self.last_memory_s = time.perf_counter() - began
            self.last_suffix_tokens = len(self.engine.ids(self.suffix_text(ask, now, []))[0])
            if ask.choices and self.choice_scoring == "answer":
                yield from self._answer_then_choose(ask, cache, now, should_stop)
                return
            if ask.choices:
                letter, _ = self.choose(ask, cache, now)
                chosen = split_choice(ask.choices[CHOICE_LETTERS.index(letter)])
                yield f"{letter}. {chosen}", letter
                return
            suffix = self.engine.ids(self.suffix_text(ask, now, []))
        for piece in self.engine.stream(suffix, max_new_tokens, should_stop, cache=cache):
            yield piece, ""

    def _answer_then_choose(
        self, ask: Ask, cache, now: MemoryRecord | None, should_stop: Callable[[], bool]
    ) -> Iterator[tuple[str, str]]:
        """A multiple-choice question with "answer" scoring: the open answer streams as it is
        decoded (the user sees the assistant's own words at once), then the choice it supports
        comes as the last piece, "(B. two)"; an interrupted answer picks nothing."""
        prompt = self.engine.ids(self.suffix_text(ask, now, []))
        text, answer_ids = TextStream(self.engine.tokenizer), []
        for token in self.open_answer_tokens(cache, prompt, should_stop):
            answer_ids.append(token)
            piece = text.push(token)
            if piece:
                yield piece, ""
        if should_stop():
            return
        rest = text.rest()
        letter, _ = self.choose_after(ask, cache, prompt, answer_ids)
        chosen = split_choice(ask.choices[CHOICE_LETTERS.index(letter)])
        yield f"{rest} ({letter}. {chosen})", letter
