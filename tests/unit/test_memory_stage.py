"""The memory stage through the stage harness (tests/harness.py): no sockets, no processes, a real
SQLite store and the bag-of-letters embedder.

Issue #19 item 1: memory is built from its configuration and an ``emit`` callable; a request read
from its ROUTER comes to ``handle`` as a ``Request`` (the sender's identity, its frames) and the
reply goes out ``to=client(identity)``; what it announces (``Record``, a stored ``Watch``) goes
to the bus. A malformed request is answered with an error naming the problem, and nothing stored
is lost.
"""

from __future__ import annotations

from pathlib import Path

from omnistream.memory.stage import MemoryStage, Request
from omnistream.memory.store import MemoryStore
from omnistream.protocol.codec import encode
from omnistream.protocol.config import MemoryConfig
from omnistream.protocol.messages import (
    Ack,
    Error,
    Record,
    Retrieve,
    Retrieved,
    Transcript,
    Watch,
    Watches,
    WatchesRequest,
)
from omnistream.protocol.runtime import BUS, client

from ..harness import FakeClock, run_stage
from .test_memory_and_reasoning import FakeEmbedder

REASONER = b"\x00reasoner"


def stage_in(tmp_path: Path, **config) -> MemoryStage:
    store = MemoryStore(tmp_path / "m.sqlite", FakeEmbedder.dim)
    return MemoryStage(MemoryConfig(**config), store, FakeEmbedder())  # type: ignore[arg-type]


def request(message, identity: bytes = REASONER) -> Request:
    return Request(identity, encode(message))


def test_memory_answers_a_retrieve_with_the_stored_record_to_the_sender(tmp_path: Path) -> None:
    stage = stage_in(tmp_path)
    heard = Transcript(session="k", t0=1.0, ts=3.0, text="the kettle is on the stove", speaker="scene")
    ask = Retrieve(ts=10.0, session="k", request_id="r1", query="where is the kettle?")
    run = run_stage(stage, [heard, request(ask)], clock=FakeClock())
    records = run.of(Record)
    assert [(r.kind, r.text, r.t0, r.ts) for r in records] == [
        ("transcript", "the kettle is on the stove", 1.0, 3.0)
    ]
    assert run.sent[0].to == BUS  # announced on the bus, after it was stored
    replies = [sent for sent in run.sent if isinstance(sent.message, Retrieved)]
    assert len(replies) == 1 and replies[0].to == client(REASONER)  # to the sender only
    reply = replies[0].message
    assert reply.request_id == "r1" and reply.session == "k"
    assert [(item.item_id, item.kind, item.text) for item in reply.items] == [
        (records[0].item_id, "transcript", "the kettle is on the stove")
    ]
    stage.close()


def test_a_malformed_request_gets_a_clear_error_and_loses_nothing_stored(tmp_path: Path) -> None:
    stage = stage_in(tmp_path)
    heard = [
        Transcript(session="k", t0=float(i), ts=i + 1.0, text=f"line number {i} of the talk")
        for i in range(3)
    ]
    garbage = Request(b"\x00gateway", [b"Retrieve", b"\xc1 not msgpack"])
    short = Request(b"\x00gateway", [b"Retrieve"])
    unsupported = request(Transcript(session="k", t0=0.0, ts=1.0, text="not a request"), b"\x00gateway")
    again = Retrieve(ts=10.0, session="k", request_id="after", query="talk")
    run = run_stage(stage, [*heard, garbage, short, unsupported, request(again)])
    errors = [sent for sent in run.sent if isinstance(sent.message, Error)]
    assert [sent.to for sent in errors] == [client(b"\x00gateway")] * 3  # each to its sender
    assert [e.message.code for e in errors] == ["malformed", "malformed", "unsupported"]
    assert "header is not valid msgpack" in errors[0].message.message
    assert "expected [topic, header, *buffers], got 1 frame(s)" in errors[1].message.message
    assert errors[2].message.message == "memory does not serve Transcript"
    assert stage.counters["rejected"] == 2
    # Memory goes on serving, and every record stored before is still there.
    assert stage.store.count("k") == 3
    reply = next(m for m in run if isinstance(m, Retrieved))
    assert reply.request_id == "after"
    assert [item.text for item in reply.items] == [m.text for m in heard]
    stage.close()


def test_a_watch_is_stored_before_its_ack_and_passed_to_reasoning(tmp_path: Path) -> None:
    stage = stage_in(tmp_path)
    watch = Watch(session="k", watch_id="w1", condition="  tell me when the kettle boils ")
    run = run_stage(
        stage,
        [
            request(watch, b"\x00gateway"),
            request(Watch(session="k", watch_id="empty", condition=" "), b"\x00gateway"),
            request(WatchesRequest(session="k", request_id="after-restart")),
        ],
    )
    kinds = [(type(sent.message).__name__, sent.to) for sent in run.sent]
    assert kinds == [
        ("Watch", BUS),  # stored, then passed on to reasoning
        ("Ack", client(b"\x00gateway")),
        ("Error", client(b"\x00gateway")),
        ("Watches", client(REASONER)),
    ]
    stored, ack, refused, listed = (sent.message for sent in run.sent)
    assert stored.condition == "tell me when the kettle boils"
    assert isinstance(ack, Ack) and ack.request_id == "w1"
    assert isinstance(refused, Error) and refused.code == "invalid" and refused.request_id == "empty"
    assert "Watch.condition must have 1.." in refused.message
    assert isinstance(listed, Watches) and listed.request_id == "after-restart"
    assert [(w.watch_id, w.condition) for w in listed.watches] == [("w1", "tell me when the kettle boils")]
    stage.close()


def test_retention_runs_on_the_stage_clock(tmp_path: Path) -> None:
    stage = stage_in(tmp_path)
    clock = FakeClock()
    run_stage(stage, [], clock=clock, settle_s=1.0)
    first = stage.retention_at
    assert first == 1000.0  # at start
    every = stage.retention.every_s
    run_stage(stage, [], clock=clock, settle_s=every / 2, idle_s=1.0)
    assert stage.retention_at == first  # not again before retention.every_s
    run_stage(stage, [], clock=clock, settle_s=every, idle_s=1.0)
    assert stage.retention_at > first
    stage.close()
