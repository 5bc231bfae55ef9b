"""Memory store durability and search, memory stage retrieval, prompt building, the decode loop."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from omnistream.memory.stage import MemoryStage, clock, ordinal
from omnistream.memory.store import MemoryStore
from omnistream.protocol.codec import ProtocolError
from omnistream.protocol.config import MemoryConfig, load_config
from omnistream.protocol.messages import Ask, Clip, Label, MemoryRecord, Percept, Retrieve, Transcript
from omnistream.reasoning.prompt import fit_items, format_item, memory_log


def vec(*values: float, dim: int = 4) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


def test_store_persists_searches_and_filters_by_time(tmp_path: Path) -> None:
    store = MemoryStore(tmp_path / "m.sqlite", dim=4)
    a = store.add("s1", "clip", 0, 10, "butterfly", vec(1, 0), features=np.ones(3, np.float32))
    b = store.add("s1", "transcript", 12, 14, "amiable", vec(0, 1), speaker="scene")
    store.add("s2", "clip", 0, 5, "other session", vec(1, 0))
    assert (tmp_path / "m.sqlite").stat().st_mode & 0o777 == 0o600
    hits = store.search("s1", vec(1, 0.1), top_k=2, until_ts=100)
    assert [item.id for item, _ in hits] == [a, b]
    assert store.search("s1", vec(0, 1), top_k=5, until_ts=5)[0][0].id == a  # b starts after 5 s
    store.close()
    reopened = MemoryStore(tmp_path / "m.sqlite", dim=4)
    assert reopened.count("s1") == 2 and reopened.count("s2") == 1
    assert [i.text for i in reopened.between("s1", 11, 20)] == ["amiable"]
    assert reopened.search("s1", vec(0, 1), 1, 100)[0][0].id == b  # index rebuilt from rows
    assert [t0 for t0, _ in reopened.features("s1")] == [0.0]
    with pytest.raises(ValueError, match="3 dims"):
        reopened.add("s1", "clip", 0, 1, "x", np.ones(3, np.float32))
    assert reopened.count("s1") == 2


class FakeEmbedder:
    """Deterministic bag-of-letters vectors: enough to test ranking logic without a model."""

    dim = 26

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 26), np.float32)
        for row, text in enumerate(texts):
            for ch in text.lower():
                if "a" <= ch <= "z":
                    out[row, ord(ch) - 97] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def memory_stage(tmp_path: Path, **config) -> MemoryStage:
    return MemoryStage(MemoryConfig(**config), MemoryStore(tmp_path / "m.sqlite", 26), FakeEmbedder())


def clip(clip_id: int, t0: float, t1: float, name: str, features: np.ndarray) -> Clip:
    return Clip(
        clip_id=clip_id,
        t0=t0,
        ts=t1,
        features=features,
        labels=[Label(name, 0.5)],
        description=f"seen: {name}",
    )


def test_memory_stage_marks_repeated_scenes_and_returns_time_ordered_items(tmp_path: Path) -> None:
    stage = memory_stage(tmp_path)
    stage.handle(clip(1, 0, 14, "monarch (butterfly)", vec(1, 0)))
    stage.handle(Transcript(t0=3, ts=6, text="Front left.", speaker="scene"))
    stage.handle(Transcript(t0=7, ts=8, text="partial words", final=False))
    stage.handle(clip(2, 14, 30, "bow tie (tie)", vec(0, 1)))
    stage.handle(clip(3, 90, 104, "monarch (butterfly)", vec(1, 0.05)))
    stage.handle(Percept(ts=100, features=vec(1, 0), labels=[Label("monarch (butterfly)", 0.6)]))
    # Asked at 01:41, answered late: the clip that closed at 01:44 was not known yet.
    early = stage.retrieve(Retrieve(ts=101, request_id="e", query="butterfly?"))
    assert [item.t1 for item in early.items if item.kind != "now"] == [14, 6, 30]
    reply = stage.retrieve(Retrieve(ts=104, request_id="r", query="butterfly?"))
    texts = [item.text for item in reply.items]
    assert texts[:3] == ["seen: monarch (butterfly)", "Front left.", "seen: bow tie (tie)"]
    assert texts[3] == "seen: monarch (butterfly) (same scene as at 00:00; 2nd time)"
    assert reply.items[-1].kind == "now" and "monarch" in reply.items[-1].text
    assert len(reply.items) == 5  # the partial transcript is not stored


def test_memory_stage_beyond_budget_uses_search_plus_recent_window(tmp_path: Path) -> None:
    # L1 of one record and no L2: every pair merges straight into the archive, found by search.
    stage = memory_stage(tmp_path, return_all_below=3, l1_items=1, l2_items=0)
    for i in range(6):
        stage.handle(
            Transcript(t0=i * 10, ts=i * 10 + 2, text=["zebra", "apple", "mango", "kiwi", "plum", "lime"][i])
        )
    reply = stage.retrieve(Retrieve(ts=60, request_id="r", query="zebra", top_k=1, recent_s=15))
    assert [item.text for item in reply.items] == ["zebra", "lime"]
    with pytest.raises(ProtocolError, match="Retrieve.query"):
        stage.retrieve(Retrieve(ts=1, request_id="r", query="x" * 5000))


def test_clock_and_ordinal() -> None:
    assert clock(134.4) == "02:14" and clock(3725) == "1:02:05"
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22)] == [
        "1st",
        "2nd",
        "3rd",
        "4th",
        "11th",
        "12th",
        "13th",
        "21st",
        "22nd",
    ]


def test_prompt_lines_and_budget() -> None:
    items = [
        MemoryRecord(kind="clip", t0=0, t1=14, text="seen: monarch (butterfly)", score=0.9),
        MemoryRecord(
            kind="transcript",
            t0=93,
            t1=97,
            text="He might even have been made amiable himself.",
            speaker="scene",
        ),
        MemoryRecord(kind="transcript", t0=99, t1=100, text="what was that", speaker="user"),
        MemoryRecord(kind="now", t0=100, t1=101, text="seen: Linux"),
    ]
    assert format_item(items[0]) == "[00:00-00:14] on screen: monarch (butterfly)"
    assert (
        format_item(items[1]) == '[01:33-01:37] a voice said: "He might even have been made amiable himself."'
    )
    assert format_item(items[2]).startswith("[01:39-01:40] the user said")
    assert format_item(items[3]) == "[now, 01:41] on screen right now: Linux"
    assert memory_log(items).splitlines()[1] == format_item(items[1])
    kept = fit_items(items, budget_tokens=30, count_tokens=lambda s: len(s.split()))
    assert kept[-1].kind == "now" and kept[0].kind == "clip"  # highest score and "now" survive
    assert len(kept) < len(items)


def test_config_overrides_and_unknown_keys(monkeypatch) -> None:
    monkeypatch.setenv("OMNISTREAM__REASONING__MAX_NEW_TOKENS", "12")
    config = load_config(None, {"perception.max_fps": 5})
    assert config.reasoning.max_new_tokens == 12 and config.perception.max_fps == 5
    with pytest.raises(msgspec.ValidationError, match="bogus"):
        load_config(None, {"reasoning.bogus": 1})
    with pytest.raises(msgspec.ValidationError, match="max_fps"):
        load_config(None, {"perception.max_fps": "fast"})


@pytest.fixture(scope="module")
def tiny_engine(tiny_llm_dir):
    from omnistream.reasoning.llm.engine import LLMEngine

    return LLMEngine(tiny_llm_dir, dtype="float32", threads=1)


def test_decode_loop_matches_full_forward_greedy(tiny_engine) -> None:
    ids = tiny_engine.tokenizer("the butterfly was on the leaf", return_tensors="pt").input_ids
    streamed = "".join(tiny_engine.stream(ids, 8))
    # Reference: greedy decoding by recomputing the whole sequence each step (no cache).
    seq = ids
    with torch.inference_mode():
        for _ in range(8):
            next_id = tiny_engine.model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            if int(next_id) in tiny_engine.eos_ids:
                break
            seq = torch.cat([seq, next_id], dim=1)
    expected = tiny_engine.tokenizer.decode(seq[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    assert streamed == expected and streamed


def test_decode_loop_stops_on_request(tiny_engine) -> None:
    ids = tiny_engine.tokenizer("question", return_tensors="pt").input_ids
    calls = []
    pieces = list(tiny_engine.stream(ids, 50, should_stop=lambda: calls.append(1) or len(calls) >= 3))
    assert len(pieces) == 3


def test_choice_logprobs_match_full_forward_and_leave_the_cache_as_it_was(tiny_engine) -> None:
    from transformers import DynamicCache

    prefix = tiny_engine.tokenizer("memory of the stream", return_tensors="pt").input_ids
    suffixes = [tiny_engine.ids("a or b"), tiny_engine.ids("b or a then")]
    letters = [tiny_engine.tokenizer.convert_tokens_to_ids(t) for t in ("a", "b")]
    cache = DynamicCache()
    tiny_engine.forward(prefix, cache, 0)
    scores = tiny_engine.choice_logprobs(cache, suffixes, letters)
    assert cache.get_seq_length() == prefix.shape[1]
    for suffix, score in zip(suffixes, scores, strict=True):
        with torch.inference_mode():
            logits = tiny_engine.model(input_ids=torch.cat([prefix, suffix], dim=1)).logits[0, -1]
        torch.testing.assert_close(
            score, torch.log_softmax(logits[letters].float(), -1), atol=1e-4, rtol=1e-4
        )


def test_continuation_logprobs_match_full_forward_and_leave_the_cache_as_it_was(tiny_engine) -> None:
    from omnistream.reasoning.llm.cache import BufferedCache

    prefix = tiny_engine.tokenizer("memory of the stream", return_tensors="pt").input_ids
    prompt = tiny_engine.ids(" question: which one?")
    continuations = [
        tiny_engine.ids("a monarch butterfly"),
        tiny_engine.ids("bird"),
        tiny_engine.ids("fail better"),
    ]
    cache = BufferedCache()
    tiny_engine.forward(prefix, cache, 0)
    scores = tiny_engine.continuation_logprobs(cache, prompt, continuations)
    assert cache.get_seq_length() == prefix.shape[1]
    for ids, score in zip(continuations, scores, strict=True):
        whole = torch.cat([prefix, prompt, ids], dim=1)
        with torch.inference_mode():
            logits = tiny_engine.model(input_ids=whole).logits[0].float()
        start = prefix.shape[1] + prompt.shape[1]
        expected = torch.log_softmax(logits[start - 1 : -1], -1).gather(1, ids[0, :, None]).squeeze(1)
        assert score.shape == (ids.shape[1],)
        torch.testing.assert_close(score, expected, atol=1e-4, rtol=1e-4)


def test_text_scoring_picks_the_choice_the_model_finds_likeliest(tiny_engine) -> None:
    from omnistream.reasoning.answer import Answerer

    answerer = Answerer(tiny_engine, 256, 64, choice_scoring="text")
    ask = Ask(ts=5, session="s", turn="t", question="which?", choices=["A red", "B green", "C blue"])
    cache, now = answerer.memory_for(ask, [])
    letter, scores = answerer.choose(ask, cache, now)
    prompt = tiny_engine.ids(answerer.suffix_text(ask, now, []))
    expected = [
        float(lp.mean())
        for lp in tiny_engine.continuation_logprobs(
            cache, prompt, [tiny_engine.ids(t) for t in ("red", "green", "blue")]
        )
    ]
    assert scores == pytest.approx(expected)
    assert letter == "ABC"[max(range(3), key=expected.__getitem__)]
    with pytest.raises(ValueError, match="choice scoring"):
        Answerer(tiny_engine, choice_scoring="vibes")


def test_answer_scoring_picks_the_choice_the_open_answer_names(tiny_engine) -> None:
    """The multiple-choice pick agrees with the open answer the same question gets: a choice
    made of the words the model answers openly is picked over the others; the cache is left as
    it was."""
    from omnistream.reasoning.answer import Answerer

    answerer = Answerer(tiny_engine, 256, 64)
    assert answerer.choice_scoring == "answer"  # the default
    ask = Ask(ts=5, session="s", turn="t", question="which?")
    cache, now = answerer.memory_for(ask, [])
    held = cache.get_seq_length()
    open_text = "".join(
        tiny_engine.stream(tiny_engine.ids(answerer.suffix_text(ask, now, [])), 40, cache=cache)
    )
    cache.crop(held - cache.get_seq_length())
    said = open_text.split("\n")[0].strip()
    assert said, "the tiny model answered nothing"
    choices = ["A zebra crossing", f"B {said}", "C quiet harbour", "D violet umbrella"]
    ask = Ask(ts=5, session="s", turn="t", question="which?", choices=choices)
    letter, scores = answerer.choose(ask, cache, now)
    assert answerer.last_open_answer == said
    assert letter == "B" and scores[1] == max(scores)
    assert cache.get_seq_length() == held


CHOICE_TEXTS = ("zebra crossing", "quiet harbour", "violet umbrella")


def choice_ask() -> Ask:
    """A multiple-choice question whose choices the tiny model's babble names none of."""
    choices = [f"{c} {t}" for c, t in zip("ABC", CHOICE_TEXTS, strict=True)]
    return Ask(ts=5, session="s", turn="t", question="which?", choices=choices)


def test_a_multiple_choice_answer_streams_the_open_answer_then_its_choice(tiny_engine) -> None:
    from omnistream.reasoning.answer import Answerer

    answerer = Answerer(tiny_engine, 256, 64)
    texts = CHOICE_TEXTS
    ask = choice_ask()
    pieces = list(answerer.answer(ask, [], 64, lambda: False))
    *said, (last, letter) = pieces
    assert letter in "ABC" and all(not choice for _, choice in said)
    assert last.endswith(f"({letter}. {texts['ABC'.index(letter)]})")
    open_text = "".join(piece for piece, _ in said) + last[: last.rindex(" (")]
    assert open_text.strip() == answerer.last_open_answer
    # Interrupted while answering: no choice is made.
    stopped = list(answerer.answer(ask, [], 64, lambda: True))
    assert len(stopped) <= 1 and all(not choice for _, choice in stopped)


def test_answer_scoring_scores_the_choices_after_an_answer_that_names_none(tiny_engine) -> None:
    from omnistream.reasoning.answer import SHORTLY, Answerer

    answerer = Answerer(tiny_engine, 256, 64, choice_scoring="answer")
    texts = CHOICE_TEXTS
    ask = choice_ask()
    cache, now = answerer.memory_for(ask, [])
    letter, scores = answerer.choose(ask, cache, now)
    said = answerer.last_open_answer
    assert not any(t in said for t in texts)  # the tiny model's babble names none of them
    prompt = tiny_engine.ids(answerer.suffix_text(ask, now, []))
    answer_ids = answerer.open_answer(cache, prompt)
    assert tiny_engine.tokenizer.decode(answer_ids, skip_special_tokens=True).strip() == said
    after = torch.cat([prompt, torch.tensor([answer_ids]), tiny_engine.ids(SHORTLY)], dim=1)
    expected = [
        float(lp.mean())
        for lp in tiny_engine.continuation_logprobs(cache, after, [tiny_engine.ids(" " + t) for t in texts])
    ]
    assert scores == pytest.approx(expected)
    assert letter == "ABC"[max(range(3), key=expected.__getitem__)]


def test_an_answer_reports_the_spans_of_the_records_it_read(tiny_engine) -> None:
    from omnistream.reasoning.answer import Answerer

    answerer = Answerer(tiny_engine, 256, 64)
    records = [
        MemoryRecord(kind="clip", t0=0, t1=4, text="seen: butterfly", item_id=1),
        MemoryRecord(kind="transcript", t0=4.2, t1=6, text="fail better", item_id=2),
        MemoryRecord(kind="clip", t0=40, t1=44, text="seen: orange", item_id=3),
    ]
    now = MemoryRecord(kind="now", t0=58, t1=60, text="seen: sudoku")
    ask = Ask(ts=60, session="s", turn="t", question="what?", mode="full")
    answerer.memory_for(ask, [*records, now])
    assert answerer.last_context == [[0, 6], [40, 44], [58, 60]]
    recent = Ask(ts=60, session="s2", turn="t", question="what?", mode="recent")
    answerer.memory_for(recent, [*records, now])
    assert answerer.last_context == [[40, 44], [58, 60]]  # the 30 s window and what is on screen


def test_the_timeline_counts_appearances_and_orders_what_scenes_named(tmp_path: Path) -> None:
    """Order and counts come from the clips' labels and text, computed by memory: each thing a
    question names gets its separate appearances (runs of consecutive clips) and the order of
    first appearance; a label below a clip's best three does not count."""
    from omnistream.memory.stage import scene_words

    stage = memory_stage(tmp_path)
    scenes = [
        (0, 14, 'seen: monarch (butterfly), admiral, ringlet; text: "MONARCH"'),
        (14, 30, "seen: suit, bow tie, car mirror, minivan, orange"),  # orange: 5th label, noise
        (30, 44, 'seen: crossword puzzle, envelope; text: "SUDOKU"'),
        (44, 58, "seen: orange, lemon, banana"),
        (58, 70, "seen: monarch (butterfly), admiral"),
        (70, 80, "seen: monarch (butterfly), ringlet"),  # the same appearance, cut in two clips
        (80, 90, "seen: minivan, cab"),
        (90, 100, "seen: admiral, monarch (butterfly)"),
    ]
    for i, (t0, t1, text) in enumerate(scenes):
        stage.handle(clip(i + 1, t0, t1, text, vec(i % 4 + 1, 1, dim=26)))
    assert scene_words('seen: fig, kiwi, cab, orange; text: "SUDOKU"; still') == {
        "fig",
        "kiwi",
        "cab",
        "sudoku",
    }
    percept = Percept(ts=75, features=np.ones(4, np.float32) / 2, labels=[Label("admiral", 0.6)])
    stage.handle(percept)
    count = stage.now_item("default", 75, "How many separate times has the butterfly photo appeared so far?")
    # Asked at 01:15: the clip that closed at 01:20 was not known yet.
    assert count.facts == ["butterfly on screen 2 separate times (00:00-00:14, 00:58-01:10); on screen now"]
    stage.handle(msgspec.structs.replace(percept, ts=100))
    order = stage.now_item(
        "default", 100, "Which appeared first: the sudoku puzzle, the orange or the butterfly?"
    )
    assert order.facts == [
        "sudoku puzzle on screen 1 time (00:30-00:44)",
        "orange on screen 1 time (00:44-00:58)",
        "butterfly on screen 3 separate times (00:00-00:14, 00:58-01:20, 01:30-01:40); on screen now",
        "in order of first appearance: butterfly (00:00), sudoku puzzle (00:30), orange (00:44)",
    ]
    assert stage.now_item("default", 100, "What colour was the cab?").facts == [
        "cab on screen 1 time (01:20-01:30)"
    ]
    assert stage.now_item("default", 100, "What did the voice say at the start?").facts == []


def test_a_question_answered_late_gets_what_was_on_screen_when_it_was_asked(tmp_path: Path) -> None:
    stage = memory_stage(tmp_path)
    for step in range(200):  # 10 percepts a second for 20 s: a dog, then a cat from 10 s on
        ts = step / 10
        name = "dog" if ts < 10 else "cat"
        stage.handle(
            Percept(ts=ts, features=vec(1, 0), labels=[Label(name, 0.9)], objects=[f"grey {name} (centre)"])
        )
    state = stage.session("default")
    assert len(state.seen) == 20  # one light percept a second, without features
    assert all(p.features.size == 0 for p in state.seen)
    late = stage.now_item("default", 5.0)  # the sensory window (10 s) holds only the cat now
    assert late is not None and "dog" in late.text and "cat" not in late.text and late.t1 <= 5.5
    assert "cat" in stage.now_item("default", 19.9).text
    assert stage.now_item("default", -30.0) is None


def test_memory_snapshots_at_question_time_and_announces_records(tmp_path: Path) -> None:
    published = []
    stage = MemoryStage(
        MemoryConfig(),
        MemoryStore(tmp_path / "m.sqlite", 26),
        FakeEmbedder(),
        published.append,
    )
    stage.handle(Transcript(t0=1, ts=2, text="first words", speaker="scene"))
    stage.handle(Ask(ts=3, turn="q1", question="what was said?"))
    stage.handle(Transcript(t0=2.5, ts=4, text="said after the question", speaker="scene"))
    snap = stage.retrieve(Retrieve(ts=3, request_id="r1", query="ignored", turn="q1"))
    assert [item.text for item in snap.items] == ["first words"] and snap.request_id == "r1"
    fresh = stage.retrieve(Retrieve(ts=5, request_id="r2", query="x", turn="q1"))  # snapshot used once
    assert [item.text for item in fresh.items] == ["first words", "said after the question"]
    assert [(r.item_id, r.kind, r.text) for r in published] == [
        (1, "transcript", "first words"),
        (2, "transcript", "said after the question"),
    ]
    assert [item.item_id for item in fresh.items] == [1, 2]


def record(item_id: int, t0: float, text: str, kind: str = "clip") -> MemoryRecord:
    return MemoryRecord(kind=kind, t0=t0, t1=t0 + 5, text=text, item_id=item_id)


RECORDS = [
    record(i + 1, 10.0 * i, f"scene number {i} with a red {word}")
    for i, word in enumerate(["car", "apple", "leaf", "kettle", "guitar", "window", "bicycle"])
]


def test_events_bring_back_their_members_blocks_and_the_synopsis_stays_in_context(tiny_engine) -> None:
    from omnistream.reasoning.answer import Answerer

    answerer = Answerer(tiny_engine, window_tokens=24, retrieved_tokens=10_000, internal_retrieval=False)
    for item in RECORDS:
        assert answerer.ingest("s", item)
    memory = answerer.session("s")
    evicted = {b.item_id: b for b in memory.kv.evicted}
    assert {1, 2, 3} <= set(evicted)
    event = MemoryRecord(kind="event", t0=0, t1=25, text="merged", item_id=99, members=[2, 3])
    synopsis = MemoryRecord(kind="synopsis", t0=0, t1=60, text="a stream of red things", item_id=100)
    assert not answerer.ingest("s", event) and not answerer.ingest("s", synopsis)  # derived, not streamed
    cache = answerer.kv_cache("s", [event, RECORDS[-1]])
    window = sum(b.n_tokens for b in memory.kv.window)
    assert cache.get_seq_length() == memory.kv.n_sink + evicted[2].n_tokens + evicted[3].n_tokens + window

    ask = Ask(ts=70, session="s", turn="t", question="what was red?", mode="full")
    with_synopsis, _ = answerer.memory_for(ask, [synopsis, event, RECORDS[-1]])
    line = tiny_engine.ids(format_item(synopsis) + "\n").shape[1]
    assert with_synopsis.get_seq_length() == cache.get_seq_length() + line
    recent, _ = answerer.memory_for(
        msgspec.structs.replace(ask, mode="recent"), [synopsis, event, RECORDS[-1]]
    )
    expected = tiny_engine.ids(answerer.prefix_text + format_item(RECORDS[-1]) + "\n").shape[1]
    assert recent.get_seq_length() == expected  # the baselines get neither synopsis nor events
    # While the window holds the whole session the synopsis adds nothing: it is left out.
    roomy = Answerer(tiny_engine, window_tokens=10_000, internal_retrieval=False)
    for item in RECORDS:
        roomy.ingest("s", item)
    whole, _ = roomy.memory_for(ask, [synopsis, *RECORDS])
    assert len(roomy.session("s").kv.evicted) == 0
    assert whole.get_seq_length() == roomy.session("s").kv.cache.get_seq_length()


def test_internal_retrieval_scores_blocks_by_the_questions_own_queries(tiny_engine) -> None:
    """question_queries captures each layer's q projection during the question's prefill; the
    ranking of the evicted blocks by them (BlockStore.rank, what kv_cache calls) must equal a
    direct computation from the model's hidden states."""
    from omnistream.kernels import reference
    from omnistream.reasoning.answer import Answerer
    from omnistream.reasoning.llm.cache import cache_from

    answerer = Answerer(tiny_engine, window_tokens=24)
    for item in RECORDS:
        answerer.ingest("s", item)
    kv = answerer.session("s").kv
    candidates = {b.block_id for b in kv.evicted}
    question = "which scene had the kettle?"
    ranked = kv.evicted.rank(answerer.question_queries(kv, question), candidates)
    assert sorted(ranked) == sorted(candidates)

    model = tiny_engine.model
    sinks = cache_from(
        [layer.keys[:, :, : kv.n_sink] for layer in kv.cache.layers],
        [layer.values[:, :, : kv.n_sink] for layer in kv.cache.layers],
    )
    ids = tiny_engine.ids(question)
    positions = torch.arange(kv.n_sink, kv.n_sink + ids.shape[1]).unsqueeze(0)
    n = ids.shape[1]
    queries = []
    with torch.inference_mode():  # the layers run one by one, each one's q projection read directly
        x = model.model.embed_tokens(ids)
        cos, sin = model.model.rotary(positions[0], x.dtype)
        mask = torch.ones(n, kv.n_sink + n, dtype=torch.bool).tril(diagonal=kv.n_sink)
        for layer in model.model.layers:
            attention = layer.self_attn
            q = attention.qkv_proj(layer.input_layernorm(x))[0, :, : attention.q_size]
            queries.append(q.reshape(n, model.config.num_attention_heads, -1).transpose(0, 1))
            x = layer(x, cos, sin, sinks, mask)
    block_ids, pooled = kv.evicted.pooled_keys()
    scores = reference.block_scores(torch.stack(queries), pooled).mean(dim=0)
    expected = [block_ids[i] for i in torch.argsort(scores, descending=True).tolist()]
    assert ranked == expected


def test_session_directory_names_stay_inside_their_parent() -> None:
    from omnistream.reasoning.answer import session_dir_name

    names = {session_dir_name(s) for s in ("..", ".", "../etc", "a/b", "kitchen", "kitchen ")}
    assert len(names) == 6
    assert all("/" not in n and n not in (".", "..") and not n.startswith(".") for n in names)
    assert session_dir_name("kitchen") == session_dir_name("kitchen")  # stable across restarts


def counting_forward(engine, monkeypatch) -> list[int]:
    """Record how many tokens each ``engine.forward`` call reads."""
    calls: list[int] = []
    forward = engine.forward

    def counted(ids, cache, start):
        calls.append(ids.shape[1])
        return forward(ids, cache, start)

    monkeypatch.setattr(engine, "forward", counted)
    return calls


def test_a_question_read_ahead_is_answered_as_if_asked_at_once_reading_only_its_end(
    tiny_engine, monkeypatch
) -> None:
    from omnistream.protocol.messages import Draft
    from omnistream.reasoning.answer import Answerer

    question = "where was the red kettle in the scene?"
    ask = Ask(ts=70, session="s", turn="t", question=question, mode="full")
    answers = {}
    for read_ahead in (False, True):
        answerer = Answerer(tiny_engine, window_tokens=24, retrieved_tokens=64)
        for item in RECORDS:
            answerer.ingest("s", item)
        prepared = None
        if read_ahead:
            # Partial transcripts as whisper revises them: a wrong word is read, then replaced.
            answerer.prepare(Draft(ts=70, session="s", question="where was a"), RECORDS[:2])
            answerer.prepare(Draft(ts=70, session="s", question="where was the red kettle"), None)
            assert answerer.has_prepared("s")
            prepared = answerer.take_prepared(ask)
            assert prepared is not None and not answerer.has_prepared("s")
        calls = counting_forward(tiny_engine, monkeypatch)
        items = [] if read_ahead else RECORDS[:2]
        answers[read_ahead] = "".join(p for p, _ in answerer.answer(ask, items, 12, lambda: False, prepared))
        monkeypatch.undo()
        if read_ahead:  # memory was assembled ahead: the first pass is the prefill of what is left
            end = (
                tiny_engine.ids(" in the scene?")[0].shape[0] + tiny_engine.ids(answerer.suffix_end).shape[1]
            )
            assert calls[0] <= end + 1, calls  # the words after the last draft and the turn's end
        else:  # (retrieval's question pass,) the whole suffix, then one token at a time
            assert tiny_engine.ids(answerer.suffix_text(ask, None, [])).shape[1] in calls, calls
    assert answers[True] == answers[False] and answers[True]


def test_a_read_ahead_draft_is_not_used_for_a_different_question_or_when_stale(
    tiny_engine, monkeypatch
) -> None:
    from omnistream.protocol.messages import Draft
    from omnistream.reasoning import answer as answer_module

    answerer = answer_module.Answerer(tiny_engine, window_tokens=24, retrieved_tokens=64)
    draft = Draft(ts=5, session="s", question="where did I leave my keys")
    answerer.prepare(draft, [])
    other = Ask(ts=6, session="s", turn="t", question="what is on the screen now?")
    assert answerer.take_prepared(other) is None  # retrieved for other words
    answerer.prepare(draft, [])
    choices = Ask(ts=6, session="s", turn="t", question="where did I leave my keys?", choices=["A x", "B y"])
    assert answerer.take_prepared(choices) is None
    answerer.prepare(draft, [])
    with monkeypatch.context() as patch:  # a question spoken for long: its memory is re-assembled
        patch.setattr(answer_module, "DRAFT_MEMORY_S", -1.0)
        assert not answerer.has_prepared("s")
    assert answerer.has_prepared("s")
    monkeypatch.setattr(answer_module, "DRAFT_MAX_AGE_S", -1.0)
    assert not answerer.has_prepared("s") and answerer.drop_stale_drafts() == 1
    assert answerer.prepared == {}


def test_spilled_kv_is_kept_apart_per_model_format_and_prompt(tiny_engine, tiny_llm_dir, tmp_path) -> None:
    """Blocks spilled under data_dir/kv record what computed them: after the model, its format or
    dtype, or the system prompt changes, a session never reads the old blocks (wrong shapes or
    silently wrong answers); the same setup finds its own blocks again."""
    from omnistream.reasoning.answer import Answerer
    from omnistream.reasoning.llm.engine import LLMEngine

    def spill_dir(engine, **kwargs) -> Path:
        answerer = Answerer(engine, window_tokens=24, spill_root=tmp_path / "kv", **kwargs)
        answerer.ingest_many(
            "s",
            [
                MemoryRecord(kind="clip", t0=i, t1=i + 1, text=f"seen: thing {i} " * 4, item_id=i + 1)
                for i in range(8)
            ],
        )
        blocks = answerer.session("s").kv.evicted
        assert len(blocks) > 0 and blocks.spill_dir is not None
        return blocks.spill_dir

    first = spill_dir(tiny_engine)
    assert spill_dir(tiny_engine) == first  # a restarted reasoner with the same setup
    assert spill_dir(tiny_engine, system_prompt="Answer like a pirate.") != first
    assert spill_dir(LLMEngine(tiny_llm_dir, dtype="bfloat16", threads=1)) != first
    restored = Answerer(tiny_engine, window_tokens=24, spill_root=tmp_path / "kv").session("s")
    assert len(restored.kv.evicted) > 0 and restored.last_item_id > 0


# -- issue #18 items 2 and 12: sessions beyond RAM, history in pages --------------------------------


HISTORY_WORDS = "the reader said that the monarch butterfly rested on a green leaf by the window "


def long_history(store: MemoryStore, session: str, n: int) -> set[int]:
    """``n`` clips and transcripts of ~250 characters (over 1 MiB together), one synopsis and a
    sighting (not history: the reasoner streams clips and transcripts), and another session's
    record; returns the ids a history must hold."""
    vector = FakeEmbedder().embed([HISTORY_WORDS])[0]
    ids = set()
    store.db.execute("BEGIN")
    for i in range(n):
        kind = "clip" if i % 2 else "transcript"
        ids.add(store.add(session, kind, 2.0 * i, 2.0 * i + 1.5, f"{i}: {HISTORY_WORDS * 3}", vector))
        if i == n // 2:
            ids.add(store.add(session, "synopsis", 0.0, 2.0 * i, "A long reading about butterflies.", vector))
            store.add(session, "sighting", 2.0 * i, 2.0 * i + 1, "a cup appeared", vector)
            store.add("other", "clip", 2.0 * i, 2.0 * i + 1, "another session's clip", vector)
    store.db.execute("COMMIT")
    return ids


def test_a_long_sessions_history_comes_in_pages_under_the_header_cap(tmp_path: Path) -> None:
    """Issue #18 item 12: 5000 records are ~1.4 MB, over the 1 MiB header cap a reply must fit,
    so a history asked for in one reply never arrived and a restarted reasoner never rebuilt its
    KV. Asked in pages (by item id), every page decodes and the pages hold every record once."""
    from omnistream.protocol.codec import DEFAULT_MAX_HEADER_BYTES, decode, encode

    stage = memory_stage(tmp_path)
    expected = long_history(stage.store, "long", 5000)
    for page_size in (500, 5000):  # the second: memory bounds a page's bytes on its own
        seen: list[int] = []
        after, pages, header_bytes = 0, 0, 0
        while True:
            reply = stage.retrieve(
                Retrieve(
                    ts=1e12,
                    session="long",
                    request_id=f"p{pages}",
                    query="",
                    after_id=after,
                    page_size=page_size,
                )
            )
            frames = [bytes(frame) for frame in encode(reply)]
            assert len(frames[1]) < DEFAULT_MAX_HEADER_BYTES
            header_bytes += len(frames[1])
            page = decode(frames)  # what the reasoner's socket gets: within every limit
            assert page.items and page.request_id == f"p{pages}"
            seen += [item.item_id for item in page.items]
            pages += 1
            if not page.more:
                break
            after = page.items[-1].item_id
        assert len(seen) == len(set(seen)) and set(seen) == expected, page_size
        assert seen == sorted(seen) and pages >= 6
        assert header_bytes > DEFAULT_MAX_HEADER_BYTES  # more than one reply could hold


@pytest.fixture(scope="module")
def word_engine(tiny_llm_dir):
    """The tiny model read through its MiniLM vocabulary split into words (BERT's
    pre-tokenizer): the stage's watch list needs " yes" and " no" as single tokens."""
    from transformers import BertTokenizerFast

    from omnistream.reasoning.llm.engine import LLMEngine

    engine = LLMEngine(tiny_llm_dir, dtype="float32", threads=1)
    engine.tokenizer = BertTokenizerFast.from_pretrained(str(tiny_llm_dir))
    return engine


class ReasoningHarness:
    """A ``ReasoningStage`` asking a real memory stage over a real ROUTER socket (served in a
    thread: the memory process's reader), driven by tests/harness.py's ``run_stage`` (``handle``:
    one message, then the loop until the stage is idle), its published messages collected.
    Memory is filled before the harness starts serving and not touched after."""

    def __init__(self, engine, memory: MemoryStage, root: Path, **reasoning):
        import threading
        import uuid

        import zmq

        from omnistream.memory.stage import router_outlet, serve_router
        from omnistream.protocol.config import save_config
        from omnistream.protocol.runtime import BUS
        from omnistream.protocol.sockets import make_socket
        from omnistream.reasoning.stage import ReasoningStage

        from ..conftest import make_config

        overrides = {"memory.synopsis_every_records": 0, "memory.synopsis_every_s": 0}
        overrides |= {f"reasoning.{key}": value for key, value in reasoning.items()}
        self.config = make_config(root, ("memory", "reasoning"), **overrides)
        save_config(self.config, root / "config.json")  # what the stages would read
        self.counters: dict[str, float] = defaultdict(float)
        self.out: list = []
        self.running = True
        ctx = zmq.Context.instance()
        address = f"inproc://memory-{uuid.uuid4().hex}"
        self.router = make_socket(ctx, zmq.ROUTER, max_message_bytes=1 << 20)
        self.router.bind(address)
        self.done = threading.Event()
        reply, announce = router_outlet(self.router), memory.emit  # replies to the sender's DEALER
        memory.emit = lambda message, to=BUS: (
            reply(message, to) if to.channel == "client" else announce(message)
        )

        def serve() -> None:
            while not self.done.is_set():
                if self.router.poll(20):
                    serve_router(memory, self.router, 1000, 32 << 20)

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        self.dealer = make_socket(ctx, zmq.DEALER)  # as the reasoning process's (Runtime.connect_memory)
        self.dealer.connect(address)
        self.stage = ReasoningStage(
            self.config.reasoning,
            engine,
            self.emit,
            self.counters,
            memory_config=self.config.memory,
            spill_root=self.config.data_dir / "kv",
        )

    def emit(self, message, to=None) -> bool:
        self.out.append(message)
        return True

    def respond(self, request) -> list:
        """Memory's reply to ``request``, over the socket."""
        import time

        from omnistream.protocol.sockets import recv, send

        send(self.dealer, request)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.dealer.poll(50):
                _, reply = recv(self.dealer)
                if getattr(reply, "request_id", None) == request.request_id:
                    return [reply]
        return []

    def handle(self, message) -> None:
        """``message`` to the stage, then its loop until it is idle (memory answering)."""
        from ..harness import run_stage

        run = run_stage(self.stage, [message], respond=self.respond, settle_s=0.2)
        self.out += [sent.message for sent in run.sent if sent.to.channel == "bus"]

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.router.close(linger=0)
        self.dealer.close(linger=0)


def test_reasoning_holds_a_bounded_number_of_sessions_and_rebuilds_one_that_comes_back(
    word_engine, short_tmp: Path
) -> None:
    """Issue #18 item 2: 50 sessions (a tab reloaded 50 times) keep at most
    ``reasoning.sessions_in_ram`` KV caches in RAM; the least recently used is unloaded, and when
    it is asked about again its KV comes back whole: the blocks it had evicted from disk, its
    live window streamed again from memory's history."""
    from omnistream.protocol.messages import AnswerDone, Record

    published: list = []
    memory = MemoryStage(
        MemoryConfig(),
        MemoryStore(short_tmp / "m.sqlite", 26),
        FakeEmbedder(),
        published.append,
    )
    for i in range(50):
        for j in range(6):  # ~20 tokens each: a 48-token window evicts the first ones
            memory.handle(
                Transcript(
                    session=f"s{i}",
                    t0=10.0 * j,
                    ts=10.0 * j + 4,
                    text=f"session {i} line {j} about a red kettle",
                )
            )
    records = [m for m in published if isinstance(m, Record)]
    harness = ReasoningHarness(
        word_engine, memory, short_tmp, sessions_in_ram=3, window_tokens=48, max_new_tokens=2
    )
    stage = harness.stage
    try:
        for record in records:  # as they came over the bus
            harness.handle(record)
            stage.stream_records()
            assert len(stage.answerer.sessions) <= 3 and len(stage.loaded_sessions) <= 3
        assert list(stage.answerer.sessions) == ["s47", "s48", "s49"]
        assert harness.counters["sessions_unloaded"] == 47
        assert len(stage.synopsizer.sessions) <= 3
        harness.handle(Ask(ts=60, session="s0", turn="t0", question="what about the kettle?", mode="full"))
        done = [m for m in harness.out if isinstance(m, AnswerDone)]
        assert len(done) == 1 and not done[0].error, done
        kv = stage.answerer.sessions["s0"].kv
        assert len(stage.answerer.sessions) == 3 and "s47" not in stage.answerer.sessions
        evicted = [b.item_id for b in kv.evicted]  # read back from data_dir/kv
        window = [b.item_id for b in kv.window]  # streamed again from memory
        assert evicted and window
        assert evicted + window == [r.item_id for r in records if r.session == "s0"]
        assert done[0].context == [[10.0 * j, 10.0 * j + 4] for j in range(6)]  # all of s0's records
    finally:
        harness.close()
