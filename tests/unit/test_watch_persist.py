"""Issue #18 item 8: watches are checked before they are acknowledged and stored by memory, so a
restarted reasoning still has them.

Before: the gateway acknowledged a ``Watch`` at once and published it; reasoning kept it in RAM
(and refused a bad one with an ``Error`` no client was waiting for), so after a reasoning
restart every watch was gone. Now memory checks and stores it (SQLite) before the ``Ack``, and
reasoning loads a session's watches from memory on its first contact with the session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from omnistream.memory.stage import MemoryStage
from omnistream.memory.store import MemoryStore
from omnistream.protocol.config import MemoryConfig
from omnistream.protocol.messages import (
    Ack,
    Alert,
    Error,
    Message,
    Record,
    Transcript,
    Watch,
)
from omnistream.protocol.sockets import make_socket, recv, send
from omnistream.reasoning import watch as watch_module

from ..util import wait_until
from .test_memory_and_reasoning import FakeEmbedder, ReasoningHarness, word_engine  # noqa: F401

CONDITION = "tell me when the kettle boils"
FIRING = "the kettle boils and whistles"


def memory_stage(root: Path, published: list[Message]) -> MemoryStage:
    """Memory in-process (a real SQLite store, the fake embedder), publishing into ``published``."""
    store = MemoryStore(root / "m.sqlite", FakeEmbedder.dim)
    return MemoryStage(MemoryConfig(), store, FakeEmbedder(), published.append)  # type: ignore[arg-type]


def as_the_gateway(memory: MemoryStage, watch: Watch, address: str) -> Message:
    """Send ``watch`` to memory's ROUTER as the gateway does; memory's reply."""
    sock = make_socket(zmq.Context.instance(), zmq.DEALER)
    sock.connect(address)
    try:
        send(sock, watch)
        wait_until(lambda: sock.poll(50), 10, "memory to answer the watch", interval=0)
        return recv(sock)[1]
    finally:
        sock.close(linger=0)


def test_a_watch_survives_a_reasoning_restart_and_a_bad_one_is_refused_before_its_ack(
    word_engine,  # noqa: F811
    short_tmp: Path,
    monkeypatch,
) -> None:
    # The tiny random model has no opinion on kettles (its yes/no margins are all within 0.1 of
    # each other): with the bar under its neutral margins every record meets the watch, so an
    # alert is exactly "the watch is registered".
    monkeypatch.setattr(watch_module, "MARGIN_OVER_NEUTRAL", -1.0)
    published: list[Message] = []
    memory = memory_stage(short_tmp, published)
    memory.handle(Transcript(session="k", t0=0.0, ts=4.0, text="the kitchen is quiet"))
    first = ReasoningHarness(word_engine, memory, short_tmp)
    address = first.router.getsockopt(zmq.LAST_ENDPOINT).decode()
    try:
        reply = as_the_gateway(memory, Watch(session="k", watch_id="w1", condition=CONDITION), address)
        assert isinstance(reply, Ack) and reply.request_id == "w1", reply
        watches = [m for m in published if isinstance(m, Watch)]
        assert [w.watch_id for w in watches] == ["w1"]  # stored, then passed to reasoning
        first.handle(watches[0])
        # Refused with the reason, before any Ack: too long, then one watch too many.
        refused = as_the_gateway(memory, Watch(session="k", watch_id="long", condition="x" * 600), address)
        assert isinstance(refused, Error) and refused.code == "invalid" and refused.request_id == "long"
        assert "1..500 characters, got 600" in refused.message, refused.message
        for i in range(2, 17):
            ok = as_the_gateway(memory, Watch(session="k", watch_id=f"w{i}", condition=f"thing {i}"), address)
            assert isinstance(ok, Ack), ok
        extra = as_the_gateway(memory, Watch(session="k", watch_id="w17", condition="one more"), address)
        assert isinstance(extra, Error) and "already has 16 watches" in extra.message, extra
        for i in range(2, 17):  # cancelled: removed from the store
            ok = as_the_gateway(
                memory, Watch(session="k", watch_id=f"w{i}", condition="", cancel=True), address
            )
            assert isinstance(ok, Ack), ok
        assert [row[0] for row in memory.store.watches("k")] == ["w1"]
        threshold = first.stage.watches.watches["k"]["w1"].threshold
    finally:
        first.close()

    # Reasoning restarts: a new stage, nothing in RAM. The next record fires the stored watch.
    second = ReasoningHarness(word_engine, memory, short_tmp)
    try:
        assert not second.stage.watches.watches
        published.clear()
        memory.handle(Transcript(session="k", t0=10.0, ts=14.0, text=FIRING))
        records = [m for m in published if isinstance(m, Record)]
        assert len(records) == 1
        second.handle(records[0])  # the first contact with the session after the restart
        second.stage.stream_records()
        alerts = [m for m in second.out if isinstance(m, Alert)]
        assert [(a.watch_id, a.session) for a in alerts] == [("w1", "k")], second.out
        assert FIRING in alerts[0].text and CONDITION in alerts[0].text
        assert second.counters["watches_loaded"] == 1
        assert second.stage.watches.watches["k"]["w1"].threshold == pytest.approx(threshold)
        # Cancelled: gone from the store and from the running reasoner.
        cancel = Watch(session="k", watch_id="w1", condition="", cancel=True)
        assert isinstance(memory.on_watch(cancel), Ack)
        second.handle(cancel)
        assert memory.store.watches("k") == [] and not second.stage.watches.watches.get("k")
    finally:
        second.close()
        memory.store.close()


def test_a_record_a_question_prefilled_first_is_still_checked_against_the_watches(
    word_engine,  # noqa: F811
    short_tmp: Path,
    monkeypatch,
) -> None:
    """A question's retrieval prefills the records memory returns (``Answerer.memory_for``)
    before the queued copies are streamed; the watches used to see only records new to the KV
    there, so an answer asked right after a scene hid it from every watch. Tracked events
    (sightings) are checked too."""
    monkeypatch.setattr(watch_module, "MARGIN_OVER_NEUTRAL", -1.0)  # every record meets it
    published: list[Message] = []
    memory = memory_stage(short_tmp, published)
    harness = ReasoningHarness(word_engine, memory, short_tmp)
    try:
        harness.handle(Watch(session="k", watch_id="w1", condition=CONDITION))
        memory.handle(Transcript(session="k", t0=0.0, ts=4.0, text=FIRING))
        [record] = [m for m in published if isinstance(m, Record)]
        harness.stage.handle(record)
        item = harness.stage.queued_records["k"][0]
        assert harness.stage.answerer.ingest_many("k", [item])  # a question got there first
        harness.stage.stream_records()
        harness.stage.handle(
            Record(session="k", kind="sighting", t0=5.0, ts=5.0, text="person 1 entered at 00:05", item_id=99)
        )
        harness.stage.stream_records()
        harness.stage.stream_records()  # each record once
        alerts = [m for m in harness.out if isinstance(m, Alert)]
        assert [FIRING in a.text for a in alerts] == [True, False], alerts
        assert "person 1 entered" in alerts[1].text
    finally:
        harness.close()
        memory.store.close()
