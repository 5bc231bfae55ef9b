"""A reasoner meeting a long session for the first time (as after a restart) streams its whole
history from memory, page by page over memory's socket: the tiny model, 2000 records (~25 s on
2 cores, so not among the unit tests).
"""

from __future__ import annotations

from pathlib import Path

from ..unit.test_memory_and_reasoning import FakeEmbedder, ReasoningHarness, memory_stage, word_engine  # noqa: F401


def test_a_restarted_reasoner_streams_a_history_over_the_header_cap(
    word_engine,  # noqa: F811
    short_tmp: Path,
) -> None:
    """Issue #18 item 12, end to end over memory's socket: 2000 records of 600 characters
    (1.2 MB: one reply would be refused by the reasoner's socket) all reach the KV of a reasoner
    meeting the session for the first time (as after a restart)."""
    from omnistream.protocol.messages import Record

    memory = memory_stage(short_tmp)
    vector = FakeEmbedder().embed(["y"])[0]
    memory.store.db.execute("BEGIN")
    ids = [  # one long word: one token for the tiny model, 600 bytes on the wire
        memory.store.add("long", "transcript", 2.0 * i, 2.0 * i + 1, f"{i} {'y' * 595}", vector)
        for i in range(2000)
    ]
    memory.store.db.execute("COMMIT")
    harness = ReasoningHarness(word_engine, memory, short_tmp, window_tokens=256)
    stage = harness.stage
    try:
        harness.handle(
            Record(session="long", ts=4001, t0=4000, item_id=ids[-1], kind="transcript", text="last")
        )
        assert "long" in stage.loaded_sessions
        stage.stream_records()  # the record that came is streamed from the queue (watches see it)
        kv = stage.answerer.sessions["long"].kv
        assert [b.item_id for b in kv.evicted] + [b.item_id for b in kv.window] == ids
        assert harness.counters["history_pages"] >= 5
    finally:
        harness.close()
