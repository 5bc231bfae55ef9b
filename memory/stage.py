"""Memory process: stores clips and transcripts, keeps the last seconds of percepts, answers retrieval.

Bus in: ``Clip``, final ``Transcript``, ``Percept`` (sensory tier). ROUTER in: ``Retrieve`` from
reasoning, answered with ``Retrieved`` (hybrid: text-vector search + the recent window + what is
on screen now, in time order).
"""

from __future__ import annotations

import argparse
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq

from omnistream.memory.embedder import TextEmbedder
from omnistream.memory.store import Item, MemoryStore
from omnistream.protocol.codec import ProtocolError
from omnistream.protocol.config import MemoryConfig
from omnistream.protocol.messages import (
    Ask,
    Clip,
    Error,
    History,
    HistoryRequest,
    MemoryItem,
    Message,
    Percept,
    Record,
    Retrieve,
    Retrieved,
    Transcript,
)
from omnistream.protocol.runtime import Runtime
from omnistream.protocol.sockets import make_socket, recv, send

log = logging.getLogger("omnistream.memory")

SAME_SCENE_SIMILARITY = 0.85
MAX_QUERY_CHARS = 2000
MAX_SNAPSHOTS = 256


def clock(seconds: float) -> str:
    """Stream time as mm:ss (h:mm:ss past an hour)."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class MemoryStage:
    name = "memory"

    def __init__(
        self,
        config: MemoryConfig,
        store: MemoryStore,
        embedder: TextEmbedder,
        counters: dict[str, float],
        publish: Callable[[Message], None] = lambda message: None,
    ):
        self.config = config
        self.store = store
        self.embedder = embedder
        self.counters = counters
        self.publish = publish
        # Retrieval results taken when each question arrived (the moment the user asked).
        self.snapshots: OrderedDict[str, Retrieved] = OrderedDict()
        self.sensory: dict[str, deque[Percept]] = {}
        self.clip_features = {session: store.features(session) for session in store.sessions()}

    def handle(self, message: Message) -> None:
        if isinstance(message, Ask):
            self.snapshot(message)
        elif isinstance(message, Clip):
            self.on_clip(message)
        elif isinstance(message, Transcript) and message.final and message.text.strip():
            self.on_transcript(message)
        elif isinstance(message, Percept):
            window = self.sensory.setdefault(message.session, deque())
            window.append(message)
            while window and window[0].ts < message.ts - self.config.sensory_s:
                window.popleft()

    def on_clip(self, clip: Clip) -> None:
        features = np.asarray(clip.features, np.float32)
        previous = self.clip_features.setdefault(clip.session, [])
        earlier = [t0 for t0, f in previous if float(f @ features) >= SAME_SCENE_SIMILARITY]
        text = clip.description
        if earlier:
            text += f" (same scene as at {clock(earlier[0])}; {ordinal(len(earlier) + 1)} time)"
        meta = {"clip_id": clip.clip_id, "occurrence": len(earlier) + 1}
        embedding = self.embedder.embed([text])[0]
        item_id = self.store.add(clip.session, "clip", clip.t0, clip.ts, text, embedding, features=features, meta=meta)
        previous.append((clip.t0, features))
        self.counters["clips_stored"] += 1
        self.publish(Record(ts=clip.ts, session=clip.session, item_id=item_id, kind="clip", t0=clip.t0, text=text))

    def on_transcript(self, transcript: Transcript) -> None:
        text = transcript.text.strip()
        item_id = self.store.add(
            transcript.session,
            "transcript",
            transcript.t0,
            transcript.ts,
            text,
            self.embedder.embed([text])[0],
            speaker=transcript.speaker,
        )
        self.counters["transcripts_stored"] += 1
        self.publish(
            Record(
                ts=transcript.ts,
                session=transcript.session,
                item_id=item_id,
                kind="transcript",
                t0=transcript.t0,
                text=text,
                speaker=transcript.speaker,
            )
        )

    def now_item(self, session: str, until_ts: float) -> MemoryItem | None:
        """What is on screen at ``until_ts``: labels of the latest percepts (sensory tier)."""
        window = [p for p in self.sensory.get(session, ()) if p.ts <= until_ts + 0.5]
        if not window:
            return None
        recent = window[-3:]
        scores: dict[str, float] = {}
        for percept in recent:
            for label in percept.labels:
                scores[label.name] = scores.get(label.name, 0.0) + label.score / len(recent)
        names = [name for name, _ in sorted(scores.items(), key=lambda kv: -kv[1])[:4]]
        return MemoryItem(kind="now", t0=recent[0].ts, t1=recent[-1].ts, text="seen: " + ", ".join(names))

    def snapshot(self, ask: Ask) -> None:
        request = Retrieve(ts=ask.ts, session=ask.session, request_id=ask.turn, query=ask.question[:MAX_QUERY_CHARS])
        self.snapshots[ask.turn] = self.retrieve(request)
        while len(self.snapshots) > MAX_SNAPSHOTS:
            self.snapshots.popitem(last=False)

    def retrieve(self, request: Retrieve) -> Retrieved:
        snapshot = self.snapshots.pop(request.turn, None) if request.turn else None
        if snapshot is not None:
            return Retrieved(ts=snapshot.ts, session=snapshot.session, request_id=request.request_id, items=snapshot.items)
        if len(request.query) > MAX_QUERY_CHARS:
            raise ProtocolError(
                "too_large", f"Retrieve.query has {len(request.query)} chars, limit {MAX_QUERY_CHARS}"
            )
        session, until = request.session, request.ts
        if self.store.count(session) <= self.config.return_all_below:
            chosen: dict[int, tuple[Item, float]] = {
                item.id: (item, 0.0) for item in self.store.between(session, float("-inf"), until)
            }
        else:
            query = self.embedder.embed([request.query])[0]
            chosen = {
                item.id: (item, score)
                for item, score in self.store.search(session, query, request.top_k, until)
            }
            for item in self.store.between(session, until - request.recent_s, until):
                chosen.setdefault(item.id, (item, 0.0))
        items = [
            MemoryItem(
                kind=item.kind, t0=item.t0, t1=item.t1, text=item.text, score=score, speaker=item.speaker, item_id=item.id
            )
            for item, score in sorted(chosen.values(), key=lambda pair: (pair[0].t0, pair[0].id))
        ]
        now = self.now_item(session, until)
        if now is not None:
            items.append(now)
        self.counters["retrievals"] += 1
        return Retrieved(ts=request.ts, session=session, request_id=request.request_id, items=items)

    def history(self, request: HistoryRequest) -> History:
        """Stored records of the session overlapping [t0, t1], oldest first (client history queries)."""
        items = [
            item
            for item in self.store.between(request.session, request.t0, request.t1)
            if not request.kinds or item.kind in request.kinds
        ]
        self.counters["history_requests"] += 1
        return History(
            ts=request.ts,
            session=request.session,
            request_id=request.request_id,
            items=[
                MemoryItem(kind=i.kind, t0=i.t0, t1=i.t1, text=i.text, speaker=i.speaker, item_id=i.id)  # type: ignore[arg-type]
                for i in items[: request.limit]
            ],
            truncated=len(items) > request.limit,
        )

    def on_router(self, sock: zmq.Socket) -> None:
        while True:
            try:
                identity, message = recv(sock, prefix_frames=1, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except ProtocolError as exc:
                self.counters["rejected"] += 1
                log.warning("rejected request: %s", exc)
                continue
            if isinstance(message, HistoryRequest):
                reply: Message = self.history(message)
            elif not isinstance(message, Retrieve):
                reply = Error(code="unsupported", message=f"memory does not serve {type(message).__name__}")
            else:
                try:
                    reply = self.retrieve(message)
                except ProtocolError as exc:
                    reply = exc.to_error(request_id=message.request_id)
            send(sock, reply, prefix=identity)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnistream-memory")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    runtime = Runtime("memory", args.run_dir)
    config = runtime.config
    embedder = TextEmbedder(threads=1)
    store = MemoryStore(config.data_dir / "memory.sqlite", embedder.dim)
    stage = MemoryStage(config.memory, store, embedder, runtime.counters, runtime.publish)
    router = make_socket(runtime.ctx, zmq.ROUTER, max_message_bytes=1 << 20)
    router.bind(runtime.addresses.memory)
    runtime.add_socket(router, stage.on_router)
    runtime.subscribe(Clip, Transcript, Percept, Ask)
    runtime.run(stage)
    store.close()


if __name__ == "__main__":
    main()
