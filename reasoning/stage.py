"""Reasoning process: on ``Ask``, retrieve from memory, stream the LLM's answer, obey ``Interrupt``.

The stage is a state machine the runtime's loop advances (``tick``: one bounded step each time),
never a handler that blocks: records from memory are prefilled into the session's KV a few at a
time (``PREFILL_STEP_TOKENS``), an answer is decoded one piece per step, and the loop hands the
stage what arrived between steps. So a question that arrives while a backlog of records is being
prefilled is answered first: only the records of its session that ended before it was asked are
prefilled before it (while memory retrieves for it); the rest wait until after the answer. An
``Interrupt`` is seen between two decode steps.

Questions, drafts and a session's first contact are jobs (generators): each yields between
steps, and a request to memory (``Retrieve``, ``WatchesRequest``) is emitted ``to=MEMORY`` and
its job waits for the reply, which comes to ``handle`` as a ``MemoryReply`` like any message
(``MEMORY_TIMEOUT_S``, sent twice, then the job fails: an answer ends with an ``AnswerDone``
carrying the error). A memory restart delays an answer instead of losing it.

A ``Draft`` (the words of a spoken question heard so far, from the speech stage) is read ahead:
memory is retrieved and assembled for it and its tokens prefilled while the user is still
speaking, so the ``Ask`` at the end of the turn has only its last words to read before the first
token (see ``Answerer.prepare``).
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from omnistream.protocol.config import MemoryConfig, ReasoningConfig
from omnistream.protocol.messages import (
    AnswerDelta,
    AnswerDone,
    Ask,
    DeleteSession,
    Draft,
    Error,
    Interrupt,
    MemoryRecord,
    Message,
    Record,
    Retrieve,
    Retrieved,
    Shutdown,
    Watch,
    Watches,
    WatchesRequest,
)
from omnistream.protocol.routes import subscriptions
from omnistream.protocol.runtime import MEMORY, Emit, MemoryReply, Runtime
from omnistream.reasoning.answer import STREAMED_KINDS, Answerer, split_choice
from omnistream.reasoning.llm.engine import LLMEngine, release_freed_memory
from omnistream.reasoning.prompt import fit_items
from omnistream.reasoning.synopsis import Synopsizer
from omnistream.reasoning.watch import WatchList

log = logging.getLogger("omnistream.reasoning")

# Records checked against standing questions: what was seen and heard, and the tracked events
# ("person 2 entered at 00:41").
WATCHED_KINDS = (*STREAMED_KINDS, "sighting")

MAX_QUESTION_CHARS = 2000
MEMORY_TIMEOUT_S = 10.0
MAX_UNCONFIRMED = 16  # tentative answers kept for a confirmation that may still come
MEMORY_ATTEMPTS = 2  # a request memory did not answer in MEMORY_TIMEOUT_S is sent once more
HISTORY_TS = 1e12  # "until the end of time": a history request returns every record
HISTORY_PAGE_RECORDS = 500  # records per history page (memory also bounds a page's bytes)
# One prefill step: queued records up to about this many tokens (at least one record) go through
# the model in one pass (kvcache.APPEND_TOKENS), then the loop takes what arrived.
PREFILL_STEP_TOKENS = 128
CHARS_PER_TOKEN = 4  # a record line's size in tokens, estimated before it is tokenized

WAIT = object()  # yielded by a job that waits for a memory reply (not runnable until it comes)


class MemoryUnavailable(RuntimeError):
    pass


class Stopped(Exception):
    """An answer's turn was interrupted while it waited."""


@dataclass
class Job:
    """A question, a draft or a session's first contact, advanced one step per ``tick``."""

    kind: str  # "answer", "draft", "load", "watch"
    session: str
    steps: Generator | None = None
    ask: Ask | None = None
    runnable: bool = True
    stopped: bool = False  # an Interrupt came for it
    started: bool = False
    replies: dict[str, Message] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)
    held: list[Message] | None = None  # a tentative Ask's answer so far (None: not tentative)


@dataclass
class Request:
    job: Job
    message: Retrieve | WatchesRequest
    deadline: float
    attempts: int = 1


def estimate_tokens(item: MemoryRecord) -> int:
    return max(1, len(item.text) // CHARS_PER_TOKEN + 8)  # + the line's times and kind


class ReasoningStage:
    """The stage contract (protocol/runtime.py): built from its configuration, the engine and an
    ``emit`` callable; ``handle`` takes a message, ``tick`` does one step of work (True while
    more is ready), ``close`` ends what is in progress. No sockets."""

    name = "reasoning"

    def __init__(
        self,
        config: ReasoningConfig,
        engine: LLMEngine,
        emit: Emit,
        counters: dict[str, float] | None = None,
        *,
        memory_config: MemoryConfig | None = None,
        spill_root: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        waiting: Callable[[], bool] = lambda: False,
    ):
        self.config = config
        self.engine = engine
        self.emit = emit
        self.counters: dict[str, float] = counters if counters is not None else defaultdict(float)
        self.clock = clock
        # "A question (or a shutdown) waits": for the one piece of work not cut into steps, the
        # synopsis, which gives way to it (Runtime.waiting).
        self.waiting = waiting
        self.answerer = Answerer(
            engine,
            config.window_tokens,
            config.retrieved_tokens,
            block_ram_bytes=config.kv_ram_mb << 20,
            spill_root=spill_root,
            system_prompt=config.system_prompt,
            choice_scoring=config.choice_scoring,
            sessions_in_ram=config.sessions_in_ram,
            on_unload=self._session_unloaded,
            backlog_tokens=config.backlog_tokens,
            related=config.related_records,
        )
        # Sessions whose history memory has streamed into their KV (since they were last loaded),
        # and those being loaded now (by a job).
        self.loaded_sessions: set[str] = set()
        self.loading: set[str] = set()
        self.watches = WatchList(engine)
        self.synopsizer = Synopsizer(engine, memory_config or MemoryConfig())
        self.queued_records: dict[str, list[MemoryRecord]] = {}
        # The last record id of each session checked against its watches (each record once).
        self.watched_upto: dict[str, int] = {}
        self.jobs: deque[Job] = deque()
        self.requests: dict[str, Request] = {}  # request_id -> the job waiting for its reply
        # Tentative answers finished before their Ask was confirmed: turn -> what they sent.
        self.unconfirmed: OrderedDict[str, list[Message]] = OrderedDict()
        self._prefilled_since_release = False

    # -- messages ------------------------------------------------------------------------------

    def handle(self, message: Message | MemoryReply) -> None:
        if isinstance(message, MemoryReply):
            self.on_memory_reply(message.message)
        elif isinstance(message, Record) and message.kind == "synopsis":
            self.synopsizer.acknowledge(message)
        elif isinstance(message, Record):
            item = MemoryRecord(
                kind=message.kind,
                t0=message.t0,
                t1=message.ts,
                text=message.text,
                speaker=message.speaker,
                item_id=message.item_id,
            )
            # Queued: prefilled a few at a time between messages (tick), or before a question
            # that needs them.
            self.queued_records.setdefault(message.session, []).append(item)
            self.load_session(message.session)
        elif isinstance(message, Draft):
            if message.question.strip() and len(message.question) <= MAX_QUESTION_CHARS:
                job = Job("draft", message.session)
                self.start(job, self._read_ahead(job, message))
        elif isinstance(message, Ask):
            self.ask(message)
        elif isinstance(message, Interrupt):
            self.interrupt(message)
        elif isinstance(message, DeleteSession):
            # Deleted from disk by memory (retention, or `omnistream sessions delete`): its KV,
            # records waiting, watches and synopsis go from RAM too.
            self.queued_records.pop(message.session, None)
            if message.session in self.answerer.sessions:
                self.answerer.unload(message.session)  # calls _session_unloaded
            else:
                self._session_unloaded(message.session)
        elif isinstance(message, Watch):
            if message.cancel:
                self.watches.remove(message.session, message.watch_id)
                return
            job = Job("watch", message.session)
            self.start(job, self._add_watch(job, message))

    def ask(self, ask: Ask) -> None:
        """Answer ``ask`` (as a job): deltas, then exactly one ``AnswerDone`` (with ``error`` set
        when the question is invalid or answering it failed)."""
        if not ask.tentative and self._confirm(ask):
            return
        done = AnswerDone(ts=ask.ts, session=ask.session, turn=ask.turn, text="", tentative=ask.tentative)
        empty = [i for i, choice in enumerate(ask.choices) if not split_choice(choice)]
        if not ask.question.strip() or len(ask.question) > MAX_QUESTION_CHARS:
            done.error = f"Ask.question must be 1..{MAX_QUESTION_CHARS} characters, got {len(ask.question)}"
        elif empty:
            done.error = f"Ask.choices[{empty[0]}] has no text after its letter: {ask.choices[empty[0]]!r}"
        if done.error:
            self.emit(done)
            return
        job = Job("answer", ask.session, ask=ask, held=[] if ask.tentative else None)
        self.start(job, self._answer(job, done))

    def _confirm(self, ask: Ask) -> bool:
        """``ask`` confirms a tentative Ask of its turn (preemptive generation, speech): what its
        answer sent tentatively is sent again for the clients, the rest goes out as usual. False
        when there is none (then it is a question like any other)."""
        for job in self.jobs:
            if (
                job.kind == "answer"
                and job.ask is not None
                and job.ask.turn == ask.turn
                and job.held is not None
            ):
                held, job.held = job.held, None
                break
        else:
            held = self.unconfirmed.pop(ask.turn, None)
            if held is None:
                return False
        for message in held:
            self.emit(msgspec.structs.replace(message, tentative=False))
        self.counters["asks_confirmed"] += 1
        return True

    def _emit_answer(self, job: Job, message: AnswerDelta | AnswerDone) -> None:
        """A piece or the end of an answer; while its Ask is tentative, marked so (the gateway
        does not relay it) and kept for ``_confirm``."""
        message.tentative = job.held is not None
        if job.held is not None:
            job.held.append(message)
            if isinstance(message, AnswerDone) and not job.stopped:
                self.unconfirmed[message.turn] = job.held
                while len(self.unconfirmed) > MAX_UNCONFIRMED:
                    self.unconfirmed.popitem(last=False)
        self.emit(message)

    def interrupt(self, message: Interrupt) -> None:
        """Stop the answer of the interrupted turn (every answer of the session for a turn-less
        interrupt): one in progress ends at its next step with error "interrupted"; one not
        started yet is dropped (the runtime drops a waiting Ask the same way)."""
        self.unconfirmed.pop(message.turn, None)
        for job in list(self.jobs):
            if (
                job.kind == "answer"
                and job.ask is not None
                and job.session == message.session
                and message.turn in ("", job.ask.turn)
            ):
                if job.started:
                    job.stopped = True
                    job.runnable = True
                else:
                    self.jobs.remove(job)
                    self._forget_requests(job)
                    self.counters["asks_cancelled"] += 1

    # -- jobs and memory requests --------------------------------------------------------------

    def start(self, job: Job, steps: Generator) -> None:
        job.steps = steps
        if job.kind == "answer":  # questions before drafts and loads; in the order they came
            at = next((i for i, j in enumerate(self.jobs) if j.kind != "answer"), len(self.jobs))
            self.jobs.insert(at, job)
        else:
            self.jobs.append(job)

    def request(self, job: Job, message: Retrieve | WatchesRequest) -> str:
        """Send ``message`` to memory for ``job``; its reply (or failure) is kept in the job."""
        self.requests[message.request_id] = Request(job, message, self.clock() + MEMORY_TIMEOUT_S)
        self.emit(message, MEMORY)
        return message.request_id

    def on_memory_reply(self, reply: Message) -> None:
        request_id = getattr(reply, "request_id", "")
        pending = self.requests.pop(request_id, None)
        if pending is None:  # answered after it was given up (or another's)
            return
        job = pending.job
        if isinstance(reply, Retrieved | Watches):
            job.replies[request_id] = reply
        else:
            job.failed[request_id] = f"memory refused the request: {getattr(reply, 'message', reply)}"
        job.runnable = True

    def check_requests(self) -> None:
        """Send again what memory has not answered in MEMORY_TIMEOUT_S; fail it after
        MEMORY_ATTEMPTS."""
        now = self.clock()
        for request_id, pending in list(self.requests.items()):
            if now < pending.deadline:
                continue
            if pending.attempts < MEMORY_ATTEMPTS:
                pending.attempts += 1
                pending.deadline = now + MEMORY_TIMEOUT_S
                self.counters["memory_resent"] += 1
                self.emit(pending.message, MEMORY)
                continue
            del self.requests[request_id]
            pending.job.failed[request_id] = (
                f"memory did not answer within {MEMORY_TIMEOUT_S:.0f} s ({pending.attempts} attempts)"
            )
            pending.job.runnable = True

    def _forget_requests(self, job: Job) -> None:
        for request_id in [r for r, p in self.requests.items() if p.job is job]:
            del self.requests[request_id]

    def _await(self, job: Job, request_id: str) -> Generator:
        """(in a job) The reply to ``request_id``; raises MemoryUnavailable if it failed (and
        Stopped when the job's answer was interrupted meanwhile)."""
        while True:
            if job.stopped:
                self.requests.pop(request_id, None)
                raise Stopped
            if request_id in job.replies:
                return job.replies.pop(request_id)
            if request_id in job.failed:
                raise MemoryUnavailable(job.failed.pop(request_id))
            yield WAIT

    def _advance(self, job: Job) -> None:
        try:
            job.started = True
            if next(job.steps) is WAIT:  # type: ignore[arg-type]
                job.runnable = False
        except StopIteration:
            self.jobs.remove(job)
        except Exception as exc:  # a job failed: it is logged, the stage goes on
            self.jobs.remove(job)
            self._forget_requests(job)
            log.exception("%s failed", job.kind, extra={"session": job.session})
            self.counters["handler_errors"] += 1
            self.emit(
                Error(
                    code="stage_error",
                    message=f"reasoning: {job.kind}: {type(exc).__name__}: {str(exc)[:500]}",
                    session=job.session,
                )
            )

    # -- the loop's steps ----------------------------------------------------------------------

    def next_job(self) -> Job | None:
        """The job to advance now: the first question (one at a time, in the order they came),
        else, while it waits for memory, the first runnable draft or session load."""
        answering = False
        for job in self.jobs:
            if job.kind == "answer" and answering:
                continue
            if job.runnable:
                return job
            answering = answering or job.kind == "answer"
        return None

    def tick(self) -> bool:
        """One bounded step: the next job's step (questions first), else a few queued records
        prefilled (not while a question waits for memory: its own records are prefilled by
        its job), else (idle) a synopsis. True while more work is ready."""
        self.check_requests()
        job = self.next_job()
        if job is not None:
            self._advance(job)
            return True
        if any(j.kind == "answer" for j in self.jobs):
            return False
        if self.prefill_step():
            return True
        if self._prefilled_since_release:
            # Prefill passes of different lengths leave freed buffers scattered over glibc's
            # heap, which it keeps: without this the process grew by ~1 GB over a 60-minute soak.
            release_freed_memory()
            self._prefilled_since_release = False
        if self.jobs:  # waiting for memory
            return False
        if self.answerer.drop_stale_drafts():
            release_freed_memory()  # the dropped drafts' assembled caches
        for synopsis in self.synopsizer.unacknowledged(self.clock()):
            self.emit(synopsis)
        for session in self.synopsizer.due():
            synopsis = self.synopsizer.write(session, self.waiting)
            if synopsis is None:
                self.counters["synopses_deferred"] += 1
                return False
            release_freed_memory()  # the synopsis prompt's cache
            self.counters["synopses"] += 1
            self.emit(synopsis)
        return False

    def prefill_step(self, session: str | None = None, upto: int | None = None) -> int:
        """Prefill the first queued records (of ``session``, else of the first session whose
        history is loaded), about ``PREFILL_STEP_TOKENS``, at least one; with ``upto`` only
        records up to that index of its queue. Returns how many (0: nothing to do)."""
        if session is None:
            session = next(
                (s for s, items in self.queued_records.items() if items and s in self.loaded_sessions),
                None,
            )
            if session is None:
                return 0
        queue = self.queued_records.get(session, [])
        limit = len(queue) if upto is None else min(upto, len(queue))
        if not limit:
            return 0
        count, tokens = 0, 0
        while count < limit and (count == 0 or tokens + estimate_tokens(queue[count]) <= PREFILL_STEP_TOKENS):
            tokens += estimate_tokens(queue[count])
            count += 1
        items = queue[:count]
        del queue[:count]
        if not queue:
            self.queued_records.pop(session, None)
        began = time.perf_counter()
        self._stream(session, items)
        self.counters["prefill_steps"] += 1
        self.counters["prefill_s"] += time.perf_counter() - began
        return count

    def _stream(self, session: str, items: list[MemoryRecord]) -> None:
        """Prefill ``items`` into the session's KV memory; watches see each record once as it
        arrives, whether or not a question's retrieval prefilled it first."""
        items = sorted(items, key=lambda i: i.item_id)
        for item in self.answerer.ingest_many(session, items):
            self.synopsizer.observe(session, item)
            self.counters["records_streamed"] += 1
        checked = self.watched_upto.get(session, 0)
        for item in items:
            if item.kind not in WATCHED_KINDS or item.item_id <= checked:
                continue
            checked = item.item_id
            for alert in self.watches.check(session, item):
                self.counters["alerts"] += 1
                self.emit(alert)
        self.watched_upto[session] = checked
        self._prefilled_since_release = True

    def stream_records(self) -> None:
        """Prefill every queued record of the sessions whose history is loaded, now."""
        while self.prefill_step():
            pass

    def _backlog_tokens(self, session: str, ts: float) -> int:
        """About how many tokens ``_prefill_before(session, ts=ts)`` would prefill."""
        queue = self.queued_records.get(session, [])
        needed = max((n + 1 for n, item in enumerate(queue) if ts <= 0 or item.t1 <= ts), default=0)
        return sum(estimate_tokens(item) for item in queue[:needed])

    def _defers(self, ask: Ask) -> bool:
        """Whether ``ask``'s backlog waits until after its answer: a baseline reads records as
        text and needs none of it; the full system's first token would wait for more than
        ``reasoning.backlog_tokens`` of it (0: never deferred)."""
        limit = self.config.backlog_tokens
        if limit <= 0 or not self.queued_records.get(ask.session):
            return False
        return ask.mode != "full" or self._backlog_tokens(ask.session, ask.ts) > limit

    def _prefill_before(self, session: str, ts: float | None = None, item_id: int | None = None) -> Generator:
        """(in a job) Prefill the session's queued records that a question needs: those that
        ended by ``ts`` (every one when ``ts`` <= 0: "now") and those up to ``item_id``, with
        everything queued before them (the KV holds records in order); a step at a time."""
        while True:
            queue = self.queued_records.get(session, [])
            needed = 0
            for index, item in enumerate(queue):
                if (ts is not None and (ts <= 0 or item.t1 <= ts)) or (
                    item_id is not None and item.item_id <= item_id
                ):
                    needed = index + 1
            if not needed:
                return
            self.counters["records_before_answer"] += self.prefill_step(session, upto=needed)
            yield

    # -- sessions -------------------------------------------------------------------------------

    def load_session(self, session: str) -> None:
        """On first contact with a session, a job streams what memory holds (``_load_history``)."""
        if (
            session not in self.loaded_sessions
            and session not in self.loading
            and not any(j.kind == "load" and j.session == session for j in self.jobs)
        ):
            job = Job("load", session)
            self.start(job, self._load_history(job, session))

    def _load_history(self, job: Job, session: str) -> Generator:
        """(in a job) On first contact with a session (after a restart, or after it was unloaded
        from RAM), stream what memory already holds, page by page: the records after those its
        spilled KV blocks hold go into the live window, and the synopsis is seeded. Another job
        loading it is waited for."""
        while session in self.loading:
            yield WAIT  # woken when that load ends
        if session in self.loaded_sessions:
            return
        self.loading.add(session)
        try:
            yield from self._load_pages(job, session)
        finally:
            self.loading.discard(session)
            for other in self.jobs:
                other.runnable = True

    def _load_pages(self, job: Job, session: str) -> Generator:
        try:  # its standing questions, stored by memory (they outlive this process)
            reply = yield from self._await(
                job, self.request(job, WatchesRequest(session=session, request_id=uuid.uuid4().hex))
            )
        except MemoryUnavailable as exc:
            log.warning("could not load session watches: %s", exc, extra={"session": session})
            return
        stored = reply.watches
        for watch in stored:
            try:
                self.watches.add(watch)
            except ValueError as exc:  # stored by an older, laxer memory
                log.warning("stored watch refused: %s", exc, extra={"session": session})
        self.counters["watches_loaded"] += len(stored)
        after_id = 0
        while True:
            request = Retrieve(
                ts=HISTORY_TS,
                session=session,
                request_id=uuid.uuid4().hex,
                query="",
                after_id=after_id,
                page_size=HISTORY_PAGE_RECORDS,
            )
            try:
                page = yield from self._await(job, self.request(job, request))
            except MemoryUnavailable as exc:
                # The pages streamed so far stay; the next contact asks again from the start
                # (records already held are skipped).
                log.warning("could not load session history: %s", exc, extra={"session": session})
                return
            for item in page.items:
                if item.kind == "synopsis":
                    self.synopsizer.seed(session, item)
            # Records waiting in the queue (and any stored after them: their Records follow)
            # are streamed from there, where the watches see them.
            cut = min((item.item_id for item in self.queued_records.get(session, [])), default=float("inf"))
            streamed = sorted(
                (i for i in page.items if i.kind in STREAMED_KINDS and i.item_id < cut),
                key=lambda i: i.item_id,
            )
            for start in range(0, len(streamed), 16):  # a step at a time
                chunk = streamed[start : start + 16]
                self.answerer.ingest_many(session, chunk)
                for item in chunk:  # the digest skips what its synopsis covers or it has seen
                    self.synopsizer.observe(session, item)
                self._prefilled_since_release = True
                yield
            self.counters["history_pages"] += 1
            if not page.more or not page.items:
                self.loaded_sessions.add(session)
                return
            after_id = max(item.item_id for item in page.items)

    def _session_unloaded(self, session: str) -> None:
        """The answerer dropped the session's KV from RAM (``reasoning.sessions_in_ram``): its
        history is streamed again when it comes back, and its synopsis digest re-seeded then."""
        self.loaded_sessions.discard(session)
        self.watched_upto.pop(session, None)
        self.synopsizer.forget(session)
        self.watches.forget(session)
        self.counters["sessions_unloaded"] += 1
        release_freed_memory()

    # -- jobs' steps ----------------------------------------------------------------------------

    def _add_watch(self, job: Job, watch: Watch) -> Generator:
        yield from self._load_history(job, watch.session)  # its stored watches, this one among them
        try:
            self.watches.add(watch)
        except ValueError as exc:
            self.emit(
                Error(code="invalid", message=str(exc), request_id=watch.watch_id, session=watch.session)
            )

    def _read_ahead(self, job: Job, draft: Draft) -> Generator:
        """Prepare the spoken question in ``draft``; the first draft of a question retrieves its
        memory. A draft that fails (memory away) is dropped: the Ask will do the work."""
        items = None
        if not self.answerer.has_prepared(draft.session):
            yield from self._load_history(job, draft.session)
            request = Retrieve(
                ts=draft.ts, session=draft.session, request_id=uuid.uuid4().hex, query=draft.question
            )
            request_id = self.request(job, request)
            yield from self._prefill_before(draft.session, ts=draft.ts)
            try:
                items = (yield from self._await(job, request_id)).items
            except MemoryUnavailable:
                return
            yield from self._prefill_before(draft.session, item_id=self._newest(items))
        self.answerer.prepare(draft, items)
        self.counters["drafts_read"] += 1

    @staticmethod
    def _newest(items: list[MemoryRecord]) -> int:
        return max((i.item_id for i in items if i.kind in STREAMED_KINDS), default=0)

    def _answer(self, job: Job, done: AnswerDone) -> Generator:
        ask = job.ask
        assert ask is not None
        try:
            deferred = yield from self._answer_steps(job, ask, done)
            if deferred:  # answered: now the backlog it did not wait for, before the next question
                yield from self._prefill_before(ask.session, ts=ask.ts)
        except Stopped:
            done.error = "interrupted"
            self._emit_answer(job, done)
        except Exception as exc:  # one question failed: say so, keep the stage and the slot
            log.exception("answer failed", extra={"turn": ask.turn})
            self.counters["answer_errors"] += 1
            done.error = f"answer failed: {type(exc).__name__}: {exc}"
            self._emit_answer(job, done)

    def _answer_steps(self, job: Job, ask: Ask, done: AnswerDone) -> Generator:
        """(in a job) The answer; returns whether its backlog was deferred (``_defers``)."""
        start, before = self.clock(), self.counters["records_before_answer"]
        steps_before, prefill_before = self.counters["prefill_steps"], self.counters["prefill_s"]
        queued_at_start = sum(len(q) for q in self.queued_records.values())
        # Read ahead (Draft): memory was retrieved and assembled for the question's first words,
        # so records that arrived since can wait until after the answer.
        prepared = self.answerer.take_prepared(ask)
        yield from self._load_history(job, ask.session)
        items: list[MemoryRecord] = []
        deferred = False
        if prepared is None:
            request_id = self.request(
                job,
                Retrieve(
                    ts=ask.ts,
                    session=ask.session,
                    request_id=uuid.uuid4().hex,
                    query=ask.question,
                    turn=ask.turn,
                ),
            )
            # While memory retrieves: the records of this session that ended before the question
            # (the rest of the backlog waits until after the answer); when they are many
            # (``_defers``), none: the answer reads the retrieved ones among them as text
            # (``Answerer.memory_for``) and they are prefilled after it.
            deferred = self._defers(ask)
            if deferred:
                self.counters["backlogs_deferred"] += 1
            else:
                yield from self._prefill_before(ask.session, ts=ask.ts)
            records_at = self.clock()
            try:
                items = (yield from self._await(job, request_id)).items
            except MemoryUnavailable as exc:
                done.error = str(exc)
                self._emit_answer(job, done)
                return
            if not deferred:  # retrieved records still queued go in first, in order
                yield from self._prefill_before(ask.session, item_id=self._newest(items))
        else:
            records_at = self.clock()
        retrieved_at = self.clock()
        if job.stopped:
            raise Stopped
        if ask.mode != "full":
            items = fit_items(items, self.config.max_context_tokens, self.engine.count_tokens)
        pieces: list[str] = []

        def stop() -> bool:
            return job.stopped

        queue = self.queued_records.get(ask.session)
        queued_from = min(item.item_id for item in queue) if queue else None
        context: list[list[float]] | None = None
        for seq, (piece, choice) in enumerate(
            self.answerer.answer(ask, items, self.config.max_new_tokens, stop, prepared, queued_from)
        ):
            if not pieces:
                done.first_token_s = self.clock() - start
                context = self.answerer.last_context  # its memory is assembled by now
            pieces.append(piece)
            done.choice = choice or done.choice
            delta = AnswerDelta(ts=ask.ts, session=ask.session, turn=ask.turn, text=piece, seq=seq)
            self._emit_answer(job, delta)
            yield  # the loop takes what arrived (an Interrupt) before the next piece
            if job.stopped:
                break
        done.text = "".join(pieces).strip()
        done.context = self.answerer.last_context if context is None else context
        if job.stopped:
            done.error = "interrupted"
        done.total_s = self.clock() - start
        log.info(
            "answered",
            extra={
                "turn": ask.turn,
                "mode": ask.mode,
                "records_before": int(self.counters["records_before_answer"] - before),
                "prefill_steps": int(self.counters["prefill_steps"] - steps_before),
                "prefill_s": round(self.counters["prefill_s"] - prefill_before, 3),
                "queued_at_start": queued_at_start,
                "waited_s": round(start - job.created, 3),
                "queued_after": sum(len(q) for q in self.queued_records.values()),
                "records_s": round(records_at - start, 3),
                "deferred": deferred,
                "backlog_read": len(self.answerer.last_backlog) if deferred else 0,
                "memory_s": round(self.answerer.last_memory_s, 3),
                "suffix_tokens": self.answerer.last_suffix_tokens,
                "retrieve_s": round(retrieved_at - records_at, 3),
                "first_token_s": round(done.first_token_s, 3),
                "total_s": round(done.total_s, 3),
            },
        )
        release_freed_memory()  # the question's assembled cache (retrieved blocks + window)
        self.counters["answers"] += 1
        self.counters["answer_tokens"] += len(pieces)
        self._emit_answer(job, done)
        return deferred

    def close(self) -> None:
        """Stopping: a question being answered ends with an ``AnswerDone`` saying so (one not
        started is left to the gateway, which sends it to the next reasoning); records still
        queued stay in memory's store (streamed again on restart)."""
        for job in list(self.jobs):
            if job.kind == "answer" and job.ask is not None and job.started:
                ask = job.ask
                self.emit(
                    AnswerDone(
                        ts=ask.ts,
                        session=ask.session,
                        turn=ask.turn,
                        text="",
                        error="interrupted: reasoning stopped",
                        tentative=job.held is not None,
                    )
                )
            if job.steps is not None:
                job.steps.close()
        self.jobs.clear()
        self.requests.clear()


def main(argv: list[str] | None = None) -> None:
    from omnistream.reasoning.llm.prepare import prepare_llm

    parser = argparse.ArgumentParser(prog="omnistream-reasoning")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    runtime = Runtime("reasoning", args.run_dir)
    config = runtime.config.reasoning
    model_dir = prepare_llm(config.model, runtime.config.cache_dir)
    engine = LLMEngine(model_dir, config.dtype, config.threads)
    runtime.connect_memory()
    stage = ReasoningStage(
        config,
        engine,
        runtime.emit,
        runtime.counters,
        memory_config=runtime.config.memory,
        spill_root=runtime.config.data_dir / "kv",
        waiting=lambda: runtime.waiting(Ask, Draft, Shutdown),
    )
    runtime.subscribe(*subscriptions("reasoning"))
    runtime.run(stage, tick=stage.tick)


if __name__ == "__main__":
    main()
