"""The memory pyramid on tiny budgets: exact merge and eviction order, persistence of the tier
state, tiered retrieval, and RAM bounded by the budgets while every record stays on disk.

Embeddings are built by hand (no model): each record's text maps to a chosen vector, so which
adjacent pair is the most similar is known in advance.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import numpy as np

from omnistream.memory.session import Scenes
from omnistream.memory.stage import MemoryStage
from omnistream.memory.store import MemoryStore
from omnistream.memory.tiers import Pyramid, TierRecord, leaf, merge, render
from omnistream.protocol.config import MemoryConfig
from omnistream.protocol.messages import Clip, HistoryRequest, Label, Percept, Retrieve, Synopsis, Transcript

DIM = 4


def unit(*values: float) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


# a~b 0.9, b~g 0.9 (a tie with a~b), c~d 0.95, e=f (1.0), everything else 0.
VECTORS = {
    "a": unit(1, 0),
    "b": unit(0.9, 0.43589),
    "c": unit(0, 0, 1),
    "d": unit(0, 0, 0.95, 0.31225),
    "e": unit(0, 1),
    "f": unit(0, 1),
    "g": unit(1, 0),
    "h": unit(0, 0, 0, 1),
}


class TableEmbedder:
    """Vectors chosen by the test: VECTORS[text]; a question gets the vector of its first word."""

    dim = DIM

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([VECTORS.get((text.split() or [""])[0], unit(1, 1, 1, 1)) for text in texts])


class Sink:
    """Records consolidation steps in memory (what ``MemoryStore`` makes durable)."""

    def __init__(self) -> None:
        self.next_id = 100
        self.steps: list[tuple] = []

    def save_event(self, event: TierRecord, sources: list[int]) -> int:
        self.next_id += 1
        self.steps.append(("merge", sources, self.next_id))
        return self.next_id

    def archive(self, item_id: int) -> None:
        self.steps.append(("archive", item_id))


def transcript_entry(item_id: int, name: str, t0: float) -> TierRecord:
    return leaf(item_id, "transcript", t0, t0 + 5, name, VECTORS[name])


def spans(entries: list[TierRecord]) -> list[tuple[float, float]]:
    return [(e.t0, e.t1) for e in entries]


def test_l1_merges_the_most_similar_adjacent_pair_and_l2_merges_upward() -> None:
    sink = Sink()
    pyramid = Pyramid(l1_budget=3, l2_budget=2, event_max_chars=10_000, sink=sink)
    for item_id, name in enumerate("abcd", start=1):
        pyramid.add(transcript_entry(item_id, name, 10.0 * (item_id - 1)))
    # (a,b)=0.9, (b,c)=0, (c,d)=0.95: c and d merge into the first event (id 101).
    assert sink.steps == [("merge", [3, 4], 101)]
    assert [e.item_id for e in pyramid.l1] == [1, 2] and [e.item_id for e in pyramid.l2] == [101]
    pyramid.add(transcript_entry(5, "e", 40))
    pyramid.add(transcript_entry(6, "f", 50))  # (e,f)=1.0 beats (a,b)=0.9
    assert sink.steps[-1] == ("merge", [5, 6], 102)
    pyramid.add(transcript_entry(7, "g", 60))
    assert len(sink.steps) == 2  # L1 = a, b, g: within budget
    pyramid.add(transcript_entry(8, "h", 70))
    # (a,b)=0.9 ties (b,g)=0.9: the oldest pair merges (103). L2 then holds 3 > 2 events whose
    # neighbours are all orthogonal (similarity 0): the oldest pair, 103 (a,b) and 101 (c,d), merges.
    assert sink.steps[2:] == [("merge", [1, 2], 103), ("merge", [103, 101], 104)]
    assert [e.item_id for e in pyramid.l1] == [7, 8]
    assert [e.item_id for e in pyramid.l2] == [104, 102]
    assert spans(pyramid.l2) == [(0, 35), (40, 55)]
    assert pyramid.l2[0].members == [1, 2, 3, 4]
    # The event's vector: the mean of its halves' vectors, weighted by the records each covers.
    ab, cd = VECTORS["a"] + VECTORS["b"], VECTORS["c"] + VECTORS["d"]
    expected = 2 * ab / np.linalg.norm(ab) + 2 * cd / np.linalg.norm(cd)
    np.testing.assert_allclose(pyramid.l2[0].embedding, expected / np.linalg.norm(expected), atol=1e-6)
    assert (pyramid.merges, pyramid.archived) == (4, 0)


def test_full_l2_archives_its_oldest_event_when_no_merge_fits() -> None:
    sink = Sink()
    pyramid = Pyramid(l1_budget=2, l2_budget=1, event_max_chars=60, sink=sink)
    for item_id, name in enumerate("abcdefg", start=1):
        pyramid.add(transcript_entry(item_id, name, 10.0 * (item_id - 1)))
    # c arrives: (a,b) merges (101). e arrives: (c,d) merges (102); L2 = [101, 102] > 1 and their
    # merged text (four quoted records with times, 98 chars) exceeds 60: the oldest, 101, is
    # archived. g arrives: (e,f) merges (103); 102 is archived the same way.
    assert sink.steps == [
        ("merge", [1, 2], 101),
        ("merge", [3, 4], 102),
        ("archive", 101),
        ("merge", [5, 6], 103),
        ("archive", 102),
    ]
    assert [e.item_id for e in pyramid.l2] == [103] and [e.item_id for e in pyramid.l1] == [7]
    assert (pyramid.merges, pyramid.archived) == (3, 2)
    assert len(render(pyramid.l2[0].parts)) <= 60 < len(render(merge(pyramid.l2[0], pyramid.l2[0]).parts))


def test_visual_features_count_in_similarity() -> None:
    same_text = VECTORS["a"]
    red, blue = unit(1, 0), unit(0, 1)
    clips = [
        leaf(1, "clip", 0, 5, "x", same_text, features=red),
        leaf(2, "clip", 5, 10, "x", same_text, features=blue),
        leaf(3, "clip", 10, 15, "x", same_text, features=blue),
    ]
    sink = Sink()
    pyramid = Pyramid(l1_budget=2, l2_budget=4, event_max_chars=10_000, sink=sink)
    for entry in clips:
        pyramid.add(entry)
    assert sink.steps == [("merge", [2, 3], 101)]  # text ties; the blue pair looks alike


def test_event_text_keeps_times_deduplicates_descriptions_and_quotes_speech() -> None:
    first = leaf(1, "clip", 0, 14, "seen: monarch (butterfly)", VECTORS["a"], features=unit(1))
    speech = leaf(2, "transcript", 3, 6, "Front left.", VECTORS["b"], speaker="scene")
    again = leaf(
        3, "clip", 40, 52, "seen: monarch (butterfly) (same scene as at 00:00; 2nd time)", VECTORS["a"]
    )
    user = leaf(4, "transcript", 53, 54, "what was that", VECTORS["e"], speaker="user")
    event = merge(merge(first, speech), merge(again, user))
    assert event.text == (
        '00:00-00:14, 00:40-00:52 on screen: monarch (butterfly); 00:03 a voice said: "Front left."; '
        '00:53 the user said: "what was that"'
    )
    assert (event.t0, event.t1, event.members) == (0, 54, [1, 2, 3, 4])


def stage_at(path: Path, **config) -> MemoryStage:
    values = {"l1_items": 3, "l2_items": 2, "event_max_chars": 10_000, "return_all_below": 0, **config}
    return MemoryStage(MemoryConfig(**values), MemoryStore(path, DIM), TableEmbedder())


def feed(stage: MemoryStage, names: str, session: str = "default") -> None:
    for i, name in enumerate(names):
        stage.handle(Transcript(t0=10.0 * i, ts=10.0 * i + 5, text=name, session=session))


def tier_of(store: MemoryStore) -> dict[int, tuple[str, str, int]]:
    rows = store.db.execute("SELECT id, kind, tier, parent FROM items").fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_tier_state_is_on_disk_and_reloads_exactly(tmp_path: Path) -> None:
    stage = stage_at(tmp_path / "m.sqlite")
    feed(stage, "abcdefgh")
    # The merges of the pyramid test above, with SQLite ids: a1 b2 c3 d4, event 5 = (c,d);
    # e6 f7, event 8 = (e,f); g9 h10, event 11 = (a,b), event 12 = (11, 5).
    assert tier_of(stage.store) == {
        1: ("transcript", "archive", 11),
        2: ("transcript", "archive", 11),
        3: ("transcript", "archive", 5),
        4: ("transcript", "archive", 5),
        5: ("event", "archive", 12),
        6: ("transcript", "archive", 8),
        7: ("transcript", "archive", 8),
        8: ("event", "L2", 0),
        9: ("transcript", "L1", 0),
        10: ("transcript", "L1", 0),
        11: ("event", "archive", 12),
        12: ("event", "L2", 0),
    }
    assert stage.counters["merges"] == 4 and stage.store.working_set_size("default") == 4
    stage.store.close()
    reloaded = stage_at(tmp_path / "m.sqlite")
    pyramid = reloaded.session("default").pyramid
    assert [e.item_id for e in pyramid.l1] == [9, 10] and [e.item_id for e in pyramid.l2] == [12, 8]
    assert pyramid.l2[0].members == [1, 2, 3, 4] and pyramid.l2[0].text.startswith('00:00 a voice said: "a"')
    # Consolidation goes on from the reloaded state: a13 e14 make L1 overflow; (g,h) is the oldest
    # of three orthogonal pairs (event 15), then L2's most similar pair, (12, 8) at 0.157, merges (16).
    reloaded.handle(Transcript(t0=80, ts=85, text="a"))
    reloaded.handle(Transcript(t0=90, ts=95, text="e"))
    assert [e.item_id for e in pyramid.l1] == [13, 14] and [e.item_id for e in pyramid.l2] == [16, 15]
    assert pyramid.l2[0].members == [1, 2, 3, 4, 6, 7]
    assert reloaded.store.working_set_size("default") == 4


def test_a_smaller_budget_at_start_consolidates_what_is_stored(tmp_path: Path) -> None:
    big = stage_at(tmp_path / "m.sqlite", l1_items=100)
    feed(big, "abcdefgh")
    assert big.counters["merges"] == 0
    big.store.close()
    small = stage_at(tmp_path / "m.sqlite")
    pyramid = small.session("default").pyramid
    # L1 first: (e,f) 1.0 -> 9, (c,d) 0.95 -> 10, (a,b) 0.9 (oldest of a tie) -> 11; then L2:
    # [11, 10, 9] are orthogonal, the oldest pair merges -> 12.
    assert [e.item_id for e in pyramid.l1] == [7, 8] and [e.item_id for e in pyramid.l2] == [12, 9]


def test_tiered_retrieval_synopsis_first_working_set_archive_hits_recent_and_now(tmp_path: Path) -> None:
    stage = stage_at(tmp_path / "m.sqlite", l1_items=2, l2_items=1, event_max_chars=60, top_k=1)
    feed(stage, "abcdef")  # as in the L2-archive pyramid test: 7 (a,b) and 8 (c,d) archived, 9 = (e,f)
    stage.handle(Synopsis(ts=55, t0=0, text="Letters were read aloud.", through_item_id=6))
    stage.handle(Percept(ts=59, features=unit(1), labels=[]))
    stage.handle(Transcript(t0=70, ts=75, text="h"))
    # Ids: a1 b2 c3, event 4 = (a,b); d5 e6, event 7 = (c,d), 4 archived; f8; synopsis 9;
    # h10, event 11 = (e,f), 7 archived. Working set: L2 = [11], L1 = [10].
    reply = stage.retrieve(Retrieve(ts=76, request_id="r", query="c", top_k=1, recent_s=10))
    got = [(item.kind, item.item_id, item.members) for item in reply.items]
    # synopsis; then in time order: the archive's best match for "c" (the record c itself, id 3),
    # the L2 event (e,f), the L1 record h; "now" (no labels here) last.
    assert got[0] == ("synopsis", 9, [])
    assert got[1:4] == [("transcript", 3, []), ("event", 11, [6, 8]), ("transcript", 10, [])]
    assert reply.items[-1].kind == "now" and len(reply.items) == 5
    assert reply.items[1].score > 0.99
    # A question asked before the synopsis was written does not see it.
    early = stage.retrieve(Retrieve(ts=50, request_id="r", query="c", top_k=1, recent_s=10))
    assert all(item.kind != "synopsis" for item in early.items)
    # History by kind: events with their members, and the synopsis.
    events = stage.history(HistoryRequest(request_id="h", kinds=["event"]))
    assert [(i.item_id, i.members) for i in events.items] == [(4, [1, 2]), (7, [3, 5]), (11, [6, 8])]
    synopses = stage.history(HistoryRequest(request_id="h", kinds=["synopsis"]))
    assert [i.text for i in synopses.items] == ["Letters were read aloud."]
    assert len(stage.history(HistoryRequest(request_id="h")).items) == 7  # clips + transcripts


def test_recent_window_returns_records_not_their_event(tmp_path: Path) -> None:
    """A history-sized window (how reasoning reloads a session) yields every record once."""
    stage = stage_at(tmp_path / "m.sqlite", l1_items=2, l2_items=1, event_max_chars=60)
    feed(stage, "abcdef")
    reply = stage.retrieve(Retrieve(ts=1e12, request_id="r", query="", top_k=0, recent_s=1e12))
    assert [(item.kind, item.item_id) for item in reply.items] == [
        ("transcript", i) for i in (1, 2, 3, 5, 6, 8)
    ]


def test_synopsis_is_stored_once_and_acknowledged(tmp_path: Path) -> None:
    published = []
    stage = stage_at(tmp_path / "m.sqlite")
    stage.emit = published.append
    synopsis = Synopsis(ts=30, t0=0, text="A butterfly, then the word Linux.", through_item_id=4)
    stage.handle(synopsis)
    stage.handle(synopsis)  # the acknowledgement was lost and reasoning sent it again
    assert stage.store.count("default", ("synopsis",)) == 1
    assert [(r.kind, r.item_id, r.text) for r in published] == [("synopsis", 1, synopsis.text)] * 2


def test_ram_is_bounded_by_the_budgets_while_disk_keeps_everything(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    class RandomEmbedder:
        dim = 32

        def embed(self, texts: list[str]) -> np.ndarray:
            v = rng.standard_normal((len(texts), 32)).astype(np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    config = MemoryConfig(
        l1_items=8,
        l2_items=4,
        event_max_chars=300,
        return_all_below=0,
        sensory_max=16,
        scene_prototypes=8,
        seen_history_s=30,
    )
    stage = MemoryStage(config, MemoryStore(tmp_path / "m.sqlite", 32), RandomEmbedder())

    def step(i: int) -> None:
        if i % 2:
            stage.handle(Transcript(t0=i, ts=i + 0.5, text=f"words {i}"))
        else:
            features = rng.standard_normal(64).astype(np.float32)
            stage.handle(Clip(clip_id=i, t0=i, ts=i + 1, features=features / np.linalg.norm(features)))
        stage.handle(Percept(ts=i, features=np.zeros(64, np.float32)))

    for i in range(200):
        step(i)
    tracemalloc.start()
    gc.collect()  # FAISS's SWIG wrappers leave reference cycles for the collector
    before = tracemalloc.take_snapshot()
    for i in range(200, 1200):
        step(i)
        if i % 250 == 0:
            stage.retrieve(Retrieve(ts=i, request_id=f"r{i}", query="words"))
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    state = stage.session("default")
    assert len(state.pyramid.l1) <= 8 and len(state.pyramid.l2) <= 4
    assert stage.store.working_set_size("default") == len(state.pyramid.l1) + len(state.pyramid.l2)
    assert len(state.sensory) <= 16 and len(state.scenes.scenes) <= 8 and len(state.seen) <= 31
    # Keeping as little as a clip's 64 features per record would add ~180 kB.
    assert grown < 150_000, f"Python heap grew {grown} bytes over 1000 records"
    assert stage.store.count("default") == 1200  # every clip and transcript is on disk
    assert stage.store.count("default", ("event",)) == stage.counters["merges"] > 500


def test_a_question_without_a_stream_time_is_about_now(tmp_path: Path) -> None:
    stage = stage_at(tmp_path / "m.sqlite", return_all_below=100)
    feed(stage, "abc")
    assert stage.stream_now("default") == 25
    reply = stage.retrieve(Retrieve(ts=0, request_id="r", query="c"))
    assert reply.ts == 25 and [item.text for item in reply.items] == ["a", "b", "c"]
    stage.handle(Percept(ts=31, features=unit(1), labels=[]))
    assert stage.stream_now("default") == 31


def test_history_of_the_newest_records(tmp_path: Path) -> None:
    stage = stage_at(tmp_path / "m.sqlite", l1_items=100)
    feed(stage, "abcde")
    newest = stage.history(HistoryRequest(request_id="h", limit=2, newest=True))
    assert [item.text for item in newest.items] == ["d", "e"] and newest.truncated
    oldest = stage.history(HistoryRequest(request_id="h", limit=2))
    assert [item.text for item in oldest.items] == ["a", "b"] and oldest.truncated
    assert stage.history(HistoryRequest(request_id="h", limit=1, newest=True)).items[0].t1 == 45
    # The newest is the record that ends last, even when another began later.
    stage.handle(Transcript(t0=50, ts=70, text="a"))
    stage.handle(Transcript(t0=55, ts=60, text="b"))
    assert stage.history(HistoryRequest(request_id="h", limit=1, newest=True)).items[0].t1 == 70


def test_scene_marks_stay_bounded_and_ignore_other_encoders() -> None:
    scenes = Scenes(capacity=2)
    assert scenes.observe(0, unit(1)) is None
    assert scenes.observe(10, unit(0, 1)) is None
    assert scenes.observe(20, unit(1)) == (0, 2)  # the first scene again: seen at 00:00, 2nd time
    assert scenes.observe(30, unit(0, 0, 1)) is None  # a third scene: the least recently seen goes
    assert [scene.first_t0 for scene in scenes.scenes] == [0, 30]
    assert scenes.observe(40, np.ones(7, np.float32)) is None  # features of another size


def test_now_carries_the_scenes_latest_text_and_people(tmp_path: Path) -> None:
    stage = stage_at(tmp_path / "m.sqlite")
    stage.handle(Percept(ts=10, features=unit(1), labels=[Label(name="crossword puzzle", score=0.9)]))
    stage.handle(
        Percept(
            ts=10.2,
            features=unit(1),
            labels=[Label(name="crossword puzzle", score=0.8)],
            text_seen=["SUDOKU"],
            faces=["person 2"],
        )
    )
    now = stage.now_item("default", 10.5)
    assert now is not None and now.kind == "now"
    assert now.text == 'seen: crossword puzzle; people: person 2; text: "SUDOKU"'
