"""Reasoning process: on ``Ask``, retrieve from memory, stream the LLM's answer, obey ``Interrupt``.

A ``Draft`` (the words of a spoken question heard so far, from the speech stage) is read ahead:
memory is retrieved and assembled for it and its tokens prefilled while the user is still
speaking, so the ``Ask`` at the end of the turn has only its last words to read before the first
token (see ``Answerer.prepare``).

Memory is asked over a DEALER socket (request/reply with a timeout, retried once), so a memory
restart delays an answer instead of losing it. Answers stream as ``AnswerDelta`` and end with
``AnswerDone`` (carrying an ``error`` when the answer could not be produced).
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from pathlib import Path

import zmq

from omnistream.protocol.codec import ProtocolError
from omnistream.protocol.config import ReasoningConfig
from omnistream.protocol.messages import (
    AnswerDelta,
    AnswerDone,
    Ask,
    DeleteSession,
    Draft,
    Error,
    Interrupt,
    MemoryItem,
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
from omnistream.protocol.runtime import Runtime
from omnistream.protocol.sockets import make_socket, recv, send
from omnistream.reasoning.answer import STREAMED_KINDS, Answerer, split_choice
from omnistream.reasoning.engine import LLMEngine, release_freed_memory
from omnistream.reasoning.prompt import fit_items
from omnistream.reasoning.synopsis import Synopsizer
from omnistream.reasoning.watch import WatchList

log = logging.getLogger("omnistream.reasoning")

# Records checked against standing questions: what was seen and heard, and the tracked events
# ("person 2 entered at 00:41").
WATCHED_KINDS = (*STREAMED_KINDS, "sighting")

MAX_QUESTION_CHARS = 2000
MEMORY_TIMEOUT_S = 10.0
HISTORY_TS = 1e12  # "until the end of time": a history request returns every record
HISTORY_PAGE_RECORDS = 500  # records per history page (memory also bounds a page's bytes)
MAX_QUEUED_RECORDS = 64  # records waiting to be prefilled together; more are streamed at once


class MemoryUnavailable(RuntimeError):
    pass


class MemoryClient:
    """Request/reply to the memory ROUTER; reconnects (new socket) after a timeout."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.ctx, self.address = ctx, address
        self.sock = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = make_socket(self.ctx, zmq.DEALER)
        sock.connect(self.address)
        return sock

    def retrieve(self, request: Retrieve, attempts: int = 2) -> list[MemoryItem]:
        return self.request(request, attempts).items

    def request(self, request: Retrieve, attempts: int = 2) -> Retrieved:
        reply = self.exchange(request, Retrieved, attempts)
        assert isinstance(reply, Retrieved)
        return reply

    def watches(self, session: str, attempts: int = 2) -> list[Watch]:
        """The watches memory stores for ``session``."""
        reply = self.exchange(WatchesRequest(session=session, request_id=uuid.uuid4().hex), Watches, attempts)
        assert isinstance(reply, Watches)
        return reply.watches

    def exchange(
        self, request: Retrieve | WatchesRequest, reply_type: type[Message], attempts: int = 2
    ) -> Message:
        for _ in range(attempts):
            send(self.sock, request)
            deadline = time.monotonic() + MEMORY_TIMEOUT_S
            while time.monotonic() < deadline:
                if not self.sock.poll(100):
                    continue
                try:
                    _, reply = recv(self.sock)
                except ProtocolError as exc:
                    raise MemoryUnavailable(f"bad reply from memory: {exc}") from exc
                if isinstance(reply, reply_type) and getattr(reply, "request_id", None) == request.request_id:
                    return reply
                if getattr(reply, "request_id", None) == request.request_id:
                    raise MemoryUnavailable(f"memory refused the request: {getattr(reply, 'message', reply)}")
            self.sock.close(linger=0)
            self.sock = self._connect()
        raise MemoryUnavailable(
            f"memory did not answer within {MEMORY_TIMEOUT_S:.0f} s ({attempts} attempts)"
        )


class ReasoningStage:
    name = "reasoning"

    def __init__(self, config: ReasoningConfig, engine: LLMEngine, memory: MemoryClient, runtime: Runtime):
        self.config = config
        self.engine = engine
        self.memory = memory
        self.runtime = runtime
        self.answerer = Answerer(
            engine,
            config.window_tokens,
            config.retrieved_tokens,
            block_ram_bytes=config.kv_ram_mb << 20,
            spill_root=runtime.config.data_dir / "kv",
            system_prompt=config.system_prompt,
            choice_scoring=config.choice_scoring,
            sessions_in_ram=config.sessions_in_ram,
            on_unload=self._session_unloaded,
        )
        # Sessions whose history memory has streamed into their KV (since they were last loaded).
        self.loaded_sessions: set[str] = set()
        self.watches = WatchList(engine)
        self.synopsizer = Synopsizer(engine, runtime.config.memory)
        self._ask_waiting = False
        self.queued_records: dict[str, list[MemoryItem]] = {}
        # The last record id of each session checked against its watches (each record once).
        self.watched_upto: dict[str, int] = {}

    def handle(self, message: Message) -> None:
        if isinstance(message, Record) and message.kind == "synopsis":
            self.synopsizer.acknowledge(message)
        elif isinstance(message, Record):
            item = MemoryItem(
                kind=message.kind,
                t0=message.t0,
                t1=message.ts,
                text=message.text,
                speaker=message.speaker,
                item_id=message.item_id,
            )
            # Queued: records that arrived together are prefilled together (one pass over the
            # weights), when the stage is idle or before a question needs them.
            self.queued_records.setdefault(message.session, []).append(item)
            self._load_history(message.session)  # leaves the queued record to stream_records
            if sum(len(items) for items in self.queued_records.values()) >= MAX_QUEUED_RECORDS:
                self.stream_records()
        elif isinstance(message, Draft):
            self.read_ahead(message)
        elif isinstance(message, Ask):
            self.answer(message)
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
            self._load_history(message.session)  # the session's stored watches, this one among them
            try:
                self.watches.add(message)
            except ValueError as exc:
                self.runtime.publish(
                    Error(
                        code="invalid", message=str(exc), request_id=message.watch_id, session=message.session
                    )
                )

    def read_ahead(self, draft: Draft) -> None:
        """Prepare the spoken question in ``draft``; the first draft of a question retrieves its
        memory. A draft that fails (memory away, bad text) is dropped: the Ask will do the work."""
        if not draft.question.strip() or len(draft.question) > MAX_QUESTION_CHARS:
            return
        items = None
        if not self.answerer.has_prepared(draft.session):
            self.stream_records()
            self._load_history(draft.session)  # after the others: the most recently used session
            try:
                items = self.memory.retrieve(
                    Retrieve(
                        ts=draft.ts, session=draft.session, request_id=uuid.uuid4().hex, query=draft.question
                    )
                )
            except MemoryUnavailable:
                return
        self.answerer.prepare(draft, items)
        self.runtime.counters["drafts_read"] += 1

    def stream_records(self) -> None:
        """Prefill the queued records into their sessions' KV memory; watches see each record
        once as it arrives, whether or not a question's retrieval prefilled it first."""
        queued, self.queued_records = self.queued_records, {}
        for session, items in queued.items():
            self._load_history(session)  # again if the session was unloaded since its records came
            items = sorted(items, key=lambda i: i.item_id)
            for item in self.answerer.ingest_many(session, items):
                self.synopsizer.observe(session, item)
                self.runtime.counters["records_streamed"] += 1
            checked = self.watched_upto.get(session, 0)
            for item in items:
                if item.kind not in WATCHED_KINDS or item.item_id <= checked:
                    continue
                checked = item.item_id
                for alert in self.watches.check(session, item):
                    self.runtime.counters["alerts"] += 1
                    self.runtime.publish(alert)
            self.watched_upto[session] = checked
        if queued:
            # Prefill passes of different lengths leave freed buffers scattered over glibc's heap,
            # which it keeps: without this the process grew by ~1 GB over a 60-minute soak.
            release_freed_memory()

    def _load_history(self, session: str) -> None:
        """On first contact with a session (after a restart, or after it was unloaded from RAM),
        stream what memory already holds, page by page: the records after those its spilled KV
        blocks hold go into the live window, and the synopsis is seeded."""
        if session in self.loaded_sessions:
            return
        self.loaded_sessions.add(session)
        try:  # its standing questions, stored by memory (they outlive this process)
            stored = self.memory.watches(session)
        except MemoryUnavailable as exc:
            log.warning("could not load session watches: %s", exc, extra={"session": session})
            self.loaded_sessions.discard(session)
            return
        for watch in stored:
            try:
                self.watches.add(watch)
            except ValueError as exc:  # stored by an older, laxer memory
                log.warning("stored watch refused: %s", exc, extra={"session": session})
        self.runtime.counters["watches_loaded"] += len(stored)
        # Records waiting in the queue (and any stored after them: their Records follow) are
        # streamed by stream_records, which checks them against the watches.
        cut = min((item.item_id for item in self.queued_records.get(session, [])), default=float("inf"))
        after_id = 0
        while True:
            try:
                page = self.memory.request(
                    Retrieve(
                        ts=HISTORY_TS,
                        session=session,
                        request_id=uuid.uuid4().hex,
                        query="",
                        after_id=after_id,
                        page_size=HISTORY_PAGE_RECORDS,
                    )
                )
            except MemoryUnavailable as exc:
                # The pages streamed so far stay; the next contact asks again from the start
                # (records already held are skipped).
                log.warning("could not load session history: %s", exc, extra={"session": session})
                self.loaded_sessions.discard(session)
                return
            for item in page.items:
                if item.kind == "synopsis":
                    self.synopsizer.seed(session, item)
            streamed = sorted(
                (i for i in page.items if i.kind in STREAMED_KINDS and i.item_id < cut),
                key=lambda i: i.item_id,
            )
            self.answerer.ingest_many(session, streamed)
            for item in streamed:  # the digest skips what its synopsis covers or it has seen
                self.synopsizer.observe(session, item)
            self.runtime.counters["history_pages"] += 1
            if not page.more or not page.items:
                return
            after_id = max(item.item_id for item in page.items)

    def _session_unloaded(self, session: str) -> None:
        """The answerer dropped the session's KV from RAM (``reasoning.sessions_in_ram``): its
        history is streamed again when it comes back, and its synopsis digest re-seeded then."""
        self.loaded_sessions.discard(session)
        self.watched_upto.pop(session, None)
        self.synopsizer.forget(session)
        self.watches.forget(session)
        self.runtime.counters["sessions_unloaded"] += 1
        release_freed_memory()

    # -- synopsis (L3): written when idle, never while a question waits ------------------------

    def _question_waiting(self) -> bool:
        """Polls the bus; True once an ``Ask`` (or a shutdown) arrived. The messages stay queued
        for the main loop, which answers the question next."""
        for message in self.runtime.poll(0):
            if isinstance(message, Ask | Draft | Shutdown):
                self._ask_waiting = True
        self.runtime.maybe_publish_stats()  # a long synopsis must not look like a hung stage
        return self._ask_waiting or not self.runtime.running

    def tick(self) -> None:
        """Called by the runtime loop when every queued message is handled (idle)."""
        if self.answerer.drop_stale_drafts():
            release_freed_memory()  # the dropped drafts' assembled caches
        self.stream_records()
        for synopsis in self.synopsizer.unacknowledged(time.monotonic()):
            self.runtime.publish(synopsis)
        self._ask_waiting = False
        for session in self.synopsizer.due():
            synopsis = self.synopsizer.write(session, self._question_waiting)
            if synopsis is None:
                self.runtime.counters["synopses_deferred"] += 1
                return
            release_freed_memory()  # the synopsis prompt's cache
            self.runtime.counters["synopses"] += 1
            self.runtime.publish(synopsis)

    def _interrupted(self, ask: Ask) -> bool:
        for message in self.runtime.poll(0):
            if isinstance(message, Shutdown):
                return True
            if (
                isinstance(message, Interrupt)
                and message.session == ask.session
                and message.turn in ("", ask.turn)
            ):
                return True
        return not self.runtime.running

    def answer(self, ask: Ask) -> None:
        """Answer ``ask``: deltas, then exactly one ``AnswerDone`` (with ``error`` set when the
        question is invalid or answering it failed)."""
        done = AnswerDone(ts=ask.ts, session=ask.session, turn=ask.turn, text="")
        empty = [i for i, choice in enumerate(ask.choices) if not split_choice(choice)]
        if not ask.question.strip() or len(ask.question) > MAX_QUESTION_CHARS:
            done.error = f"Ask.question must be 1..{MAX_QUESTION_CHARS} characters, got {len(ask.question)}"
        elif empty:
            done.error = f"Ask.choices[{empty[0]}] has no text after its letter: {ask.choices[empty[0]]!r}"
        if done.error:
            self.runtime.publish(done)
            return
        try:
            self._answer(ask, done)
        except Exception as exc:  # one question failed: say so, keep the stage and the slot
            log.exception("answer failed", extra={"turn": ask.turn})
            self.runtime.counters["answer_errors"] += 1
            done.error = f"answer failed: {type(exc).__name__}: {exc}"
            self.runtime.publish(done)

    def _answer(self, ask: Ask, done: AnswerDone) -> None:
        start = time.monotonic()
        # Read ahead (Draft): memory was retrieved and assembled for the question's first words,
        # so records that arrived since can wait until after the answer.
        prepared = self.answerer.take_prepared(ask)
        if prepared is None:
            self.stream_records()
        self._load_history(ask.session)
        records_at = time.monotonic()
        try:
            items = (
                []
                if prepared is not None
                else self.memory.retrieve(
                    Retrieve(
                        ts=ask.ts,
                        session=ask.session,
                        request_id=uuid.uuid4().hex,
                        query=ask.question,
                        turn=ask.turn,
                    )
                )
            )
        except MemoryUnavailable as exc:
            done.error = str(exc)
            self.runtime.publish(done)
            return
        retrieved_at = time.monotonic()
        if ask.mode != "full":
            items = fit_items(items, self.config.max_context_tokens, self.engine.count_tokens)
        pieces: list[str] = []
        stopped = False

        def stop() -> bool:  # remembers: the Interrupt is consumed by the poll that sees it
            nonlocal stopped
            stopped = stopped or self._interrupted(ask)
            return stopped

        for seq, (piece, choice) in enumerate(
            self.answerer.answer(ask, items, self.config.max_new_tokens, stop, prepared)
        ):
            if not pieces:
                done.first_token_s = time.monotonic() - start
            pieces.append(piece)
            done.choice = choice or done.choice
            self.runtime.publish(
                AnswerDelta(ts=ask.ts, session=ask.session, turn=ask.turn, text=piece, seq=seq)
            )
        done.text = "".join(pieces).strip()
        done.context = self.answerer.last_context
        if stop():
            done.error = "interrupted"
        done.total_s = time.monotonic() - start
        log.debug(
            "answered",
            extra={
                "turn": ask.turn,
                "mode": ask.mode,
                "records_s": round(records_at - start, 3),
                "retrieve_s": round(retrieved_at - records_at, 3),
                "first_token_s": round(done.first_token_s, 3),
                "total_s": round(done.total_s, 3),
            },
        )
        release_freed_memory()  # the question's assembled cache (retrieved blocks + window)
        self.runtime.counters["answers"] += 1
        self.runtime.counters["answer_tokens"] += len(pieces)
        self.runtime.publish(done)


def main(argv: list[str] | None = None) -> None:
    from omnistream.reasoning.prepare import prepare_llm

    parser = argparse.ArgumentParser(prog="omnistream-reasoning")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    runtime = Runtime("reasoning", args.run_dir)
    config = runtime.config.reasoning
    model_dir = prepare_llm(config.model, runtime.config.cache_dir)
    engine = LLMEngine(model_dir, config.dtype, config.threads)
    stage = ReasoningStage(config, engine, MemoryClient(runtime.ctx, runtime.addresses.memory), runtime)
    runtime.subscribe(*subscriptions("reasoning"))
    runtime.run(stage, tick=stage.tick)


if __name__ == "__main__":
    main()
