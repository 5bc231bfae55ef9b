"""First token of questions asked while records are still being ingested (issue #20 item 6).

    python -P scripts/bench_backlog.py EVAL_DATA/memory.sqlite EPISODE/episode.json 128:1 0:1 [--stride 2]

The reasoning stage (the default model, in-process, no other stage competing for the cores)
walks a recorded stream: the clips and transcripts an eval's memory stored. Before each question
of the episode the records since the previous one arrive at once (the backlog) and the question
right after them, as open text; the stage then works until idle (the backlog prefilled) before
the next. Each CONFIG is ``reasoning.backlog_tokens:reasoning.related_records`` (0 or 1) and
walks the whole stream with a fresh stage; it prints each answer's first token, the time spent
assembling its memory, the prompt tokens read after it and the backlog records read as text, then
p50 / p95 / max. Memory is played by a function returning every record up to the question
(what memory returns for a short session) and the newest clip as what is on screen.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import time
import uuid


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import msgspec

    from omnistream.protocol.config import MemoryConfig, load_config
    from omnistream.protocol.messages import (
        AnswerDone,
        Ask,
        MemoryRecord,
        Record,
        Retrieve,
        Retrieved,
        Watches,
        WatchesRequest,
    )
    from omnistream.protocol.runtime import BUS, MemoryReply
    from omnistream.reasoning.llm.engine import LLMEngine
    from omnistream.reasoning.llm.prepare import prepare_llm
    from omnistream.reasoning.stage import ReasoningStage

    parser = argparse.ArgumentParser()
    parser.add_argument("memory_sqlite")
    parser.add_argument("episode_json")
    parser.add_argument("configs", nargs="+", help="backlog_tokens:related_records, e.g. 128:1")
    parser.add_argument("--stride", type=int, default=1, help="ask every n-th question (longer backlogs)")
    args = parser.parse_args()
    rows = sqlite3.connect(args.memory_sqlite).execute(
        "select id, kind, t0, t1, text, speaker from items where kind in ('clip', 'transcript') order by id"
    )
    records = [
        Record(item_id=i, kind=kind, t0=t0, ts=t1, text=text, speaker=speaker, session="bench")
        for i, kind, t0, t1, text, speaker in rows
    ]
    with open(args.episode_json) as file:
        questions = json.load(file)["questions"][:: args.stride]
    config = load_config()
    engine = LLMEngine(
        prepare_llm(config.reasoning.model, config.cache_dir),
        config.reasoning.dtype,
        config.reasoning.threads,
    )

    def respond(request):
        if isinstance(request, WatchesRequest):
            return [Watches(session=request.session, request_id=request.request_id)]
        assert isinstance(request, Retrieve)
        if request.page_size:  # history: nothing stored before the stream
            return [Retrieved(session=request.session, request_id=request.request_id)]
        known = [r for r in records if r.ts <= request.ts]
        items = [
            MemoryRecord(
                kind=r.kind, t0=r.t0, t1=r.ts, text=r.text, speaker=r.speaker, item_id=r.item_id, score=0.3
            )
            for r in known
        ]
        clips = [r for r in known if r.kind == "clip"]
        if clips:
            items.append(MemoryRecord(kind="now", t0=clips[-1].t0, t1=request.ts, text=clips[-1].text))
        return [Retrieved(session=request.session, request_id=request.request_id, items=items)]

    def drive(stage, messages) -> list:
        out, pending = [], []

        def emit(message, to=BUS):
            out.append(message)
            if to.channel == "memory":
                pending.extend(respond(message))
            return True

        stage.emit = emit
        for message in messages:
            stage.handle(message)
        idle = 0
        while idle < 3:
            replies, pending[:] = list(pending), []
            for reply in replies:
                stage.handle(MemoryReply(reply))
            busy = stage.tick()
            idle = 0 if (busy or replies or pending) else idle + 1
        return out

    summary = []
    for spec in args.configs:
        backlog, related = spec.split(":")
        reasoning = msgspec.structs.replace(
            config.reasoning,
            backlog_tokens=int(backlog),
            related_records=bool(int(related)),
            max_new_tokens=10,
        )
        stage = ReasoningStage(
            reasoning,
            engine,
            lambda message, to=None: True,
            memory_config=MemoryConfig(synopsis_every_records=0, synopsis_every_s=0),
        )
        first, previous, began = [], -1.0, time.perf_counter()
        for question in questions:
            ts = question["ask_at_s"]
            burst = [r for r in records if previous < r.ts <= ts]
            previous = ts
            ask = Ask(ts=ts, session="bench", turn=uuid.uuid4().hex, question=question["question"])
            [done] = [m for m in drive(stage, [*burst, ask]) if isinstance(m, AnswerDone)]
            first.append(done.first_token_s)
            answerer = stage.answerer
            print(
                f"{spec} {question['id']} backlog {len(burst)} records: first token {done.first_token_s:.2f} s"
                f" (memory {answerer.last_memory_s:.2f} s, prompt {answerer.last_suffix_tokens} tokens,"
                f" {len(answerer.last_backlog)} read as text) {done.text[:50]!r}",
                flush=True,
            )
        ranked = sorted(first)
        p95 = ranked[round(0.95 * (len(ranked) - 1))]
        summary.append(
            f"{spec}: first token p50 {statistics.median(first):.2f} s, p95 {p95:.2f} s, max {ranked[-1]:.2f} s,"
            f" {int(stage.counters['backlogs_deferred'])} backlogs deferred, walk {time.perf_counter() - began:.0f} s"
        )
    print("\n".join(summary))


if __name__ == "__main__":
    main()
