"""The records a question is about, repeated next to it (reasoning/prompt.py), and the timeline
facts memory computes for order and "where" questions: pure functions and a memory stage with a
bag-of-letters embedder, no models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from omnistream.protocol.messages import Clip, Label, MemoryRecord, Percept, Retrieve, Sighting
from omnistream.reasoning.prompt import (
    TIMELINE_CHARS,
    TIMELINE_FACT_CHARS,
    bounded_facts,
    format_item,
    related_lines,
    related_records,
    time_window,
)

from .test_memory_and_reasoning import memory_stage, tiny_engine, vec  # noqa: F401 (tiny_engine: a fixture)


def clip(item_id: int, t0: float, t1: float, text: str) -> MemoryRecord:
    return MemoryRecord(kind="clip", t0=t0, t1=t1, text=text, item_id=item_id)


def heard(item_id: int, t0: float, t1: float, text: str) -> MemoryRecord:
    return MemoryRecord(kind="transcript", t0=t0, t1=t1, text=text, item_id=item_id)


STREAM = [
    heard(1, 2, 9, "And Mr. John Dashwood had then leisure to consider how much he could do."),
    clip(2, 0, 14, "seen: monastery (residence), bell cote (shelter), castle; still"),
    clip(3, 14, 28, "seen: joystick (control), croquet ball, pill bottle; still"),
    heard(4, 31, 34, "Go forward 10 meters."),
    clip(5, 28, 42, "seen: candle (stick); objects: 2 people: person in a black shirt (centre)"),
    clip(6, 42, 56, "seen: baboon (monkeys), guenon (monkey); still"),
    heard(7, 45, 47, "10 of close"),
    heard(8, 59, 63, "8 of spades, 4 of clubs, 7 of hearts."),
    clip(9, 56, 70, "seen: soccer ball; objects: person in a blue shirt (centre), yellow ball (centre)"),
    heard(10, 89, 95, "Had he married a more amiable woman he might have been made more respectable."),
    clip(11, 86, 100, "seen: lighter (device); still"),
]


@pytest.mark.parametrize(
    ("question", "now", "window"),
    [
        ("About forty seconds ago a voice said what?", 75, (19.0, 51.0)),
        ("More than two minutes ago a reader said what?", 248, (0.0, 138.0)),
        ("Shown about two minutes ago, how many people?", 258, (90.0, 186.0)),
        ("About a minute and a half ago a video was shown.", 186, (60.0, 132.0)),
        ("What did it say a couple of minutes ago?", 300, (132.0, 228.0)),
        ("Less than 30 seconds ago, what fell?", 100, (70.0, 100.0)),
        ("At the very start of the stream a reader said what?", 104, (0.0, 30.0)),
        ("What is on screen right now?", 100, None),
        ("Earlier a voice named a card. Which?", 100, None),
    ],
)
def test_the_time_a_question_names_becomes_a_window(question: str, now: float, window) -> None:
    assert time_window(question, now) == (pytest.approx(window) if window else None)


def test_the_words_heard_at_the_time_a_question_names_are_put_next_to_it() -> None:
    question = (
        "About forty seconds ago a voice gave a movement instruction. How far did it say to go forward?"
    )
    lines = related_lines(related_records(question, STREAM, 75), STREAM)
    # Only that sentence.
    assert lines == ['[00:31-00:34] a voice said: "Go forward 10 meters."']
    # What was on screen as it was said, only for a question joining the two ("while ...").
    [line] = related_lines([STREAM[6]], STREAM, "Which card did a voice name while the monkey was on screen?")
    assert line.endswith("(on screen then: baboon (monkeys), guenon (monkey))")


def test_what_a_voice_said_while_a_scene_was_on_screen_is_joined_by_time() -> None:
    """Nothing in "10 of close" shares a word with the question: the scene it names (a monkey)
    was on screen while it was said."""
    records = related_records(
        "Which playing card did a voice name while the monkey with the red nose was on screen?", STREAM, 100
    )
    assert heard(7, 45, 47, "10 of close") in records
    assert all(r.kind == "transcript" or "monkey" in r.text for r in records)


def test_a_question_gets_the_record_sharing_its_rare_words_and_synonyms() -> None:
    [record] = related_records(
        "More than a minute ago a reader said a man might have been made still more respectable if he "
        "had done what?",
        STREAM,
        248,
    )
    assert "married a more amiable woman" in record.text
    # "footballer" finds the scene of a soccer ball (a longer form of a label synonym).
    found = related_records("What was the footballer wearing?", STREAM, 100)
    assert 9 in [r.item_id for r in found] and all("ball" in r.text for r in found)


def test_memory_text_similarity_ranks_records_sharing_no_word() -> None:
    scored = [MemoryRecord(**{**_fields(r), "score": 0.6 if r.item_id == 8 else 0.25}) for r in STREAM]
    question = "So far, how many playing cards in all has a voice named?"
    assert [r.item_id for r in related_records(question, scored, 100)] == [8]
    assert related_records(question, STREAM, 100) == []  # no shared word, no similarity: nothing


def _fields(item: MemoryRecord) -> dict:
    return {f: getattr(item, f) for f in item.__struct_fields__}


@pytest.mark.parametrize(
    "question",
    [
        "What is on screen right now?",
        "Roughly how many people are on screen right now?",  # past scenes with people would mislead
        "What colour is the car?",  # nothing shares a word with it
    ],
)
def test_no_lines_when_the_question_is_about_now_or_names_nothing_remembered(question: str) -> None:
    assert related_records(question, STREAM, 100) == []


def test_a_record_outside_the_time_the_question_names_is_left_out() -> None:
    question = "About ten seconds ago, what did the voice say about the cards?"
    assert [r.item_id for r in related_records(question, STREAM, 75)] == [8]
    # Asked at 01:40 it points at 01:30: the cards (00:59) are out, and what was said then
    # comes although it shares no word with the question.
    assert [r.item_id for r in related_records(question, STREAM, 100)] == [10]
    assert related_records("About ten seconds ago, what was shown?", STREAM, 200) == []


def stage_with_scenes(tmp_path: Path):
    stage = memory_stage(tmp_path)
    scenes = [
        (0, 14, "seen: fox squirrel, hare"),
        (14, 28, "seen: palace (residence), monastery"),
        (28, 42, "seen: soccer ball; objects: person in a blue shirt (centre), yellow ball (centre)"),
        (42, 56, "seen: fox squirrel, hare"),
        (56, 70, "seen: lemon, orange"),
    ]
    for i, (t0, t1, text) in enumerate(scenes):
        stage.handle(
            Clip(clip_id=i + 1, t0=t0, ts=t1, features=vec(i + 1, 1, dim=26), labels=[], description=text)
        )
    stage.handle(Percept(ts=70, features=np.ones(4, np.float32) / 2, labels=[Label("lemon", 0.9)]))
    return stage


def test_a_question_about_the_most_recent_gets_the_order_of_last_appearances(tmp_path: Path) -> None:
    stage = stage_with_scenes(tmp_path)
    facts = stage.now_item("default", 70, "Which was shown most recently: the squirrel or the palace?").facts
    # The squirrel came first, and also last: the order of first appearance alone misleads.
    assert "in order of first appearance: squirrel (00:00), palace (00:14)" in facts
    assert "in order of last appearance, the most recent last: palace (00:14), squirrel (00:42)" in facts
    first = stage.now_item("default", 70, "Which was shown first: the squirrel or the palace?").facts
    assert not any("last appearance" in fact for fact in first)


def test_on_screen_names_no_tv_and_where_tells_the_scene(tmp_path: Path) -> None:
    stage = stage_with_scenes(tmp_path)
    stage.handle(
        Sighting(ts=40, t0=30, label="sports ball", event="appeared", text="yellow ball appeared", track_id=1)
    )
    stage.handle(
        Sighting(ts=42, t0=30, label="sports ball", event="left", text="yellow ball 1 last seen at 00:42")
    )
    assert stage.now_item("default", 70, "What is on screen right now?").facts == []
    [fact] = stage.now_item("default", 70, "Where was a ball most recently seen?").facts
    assert fact.endswith(
        "; the scene it was last in: soccer ball; objects: person in a blue shirt (centre), yellow ball (centre)"
    )
    [when] = stage.now_item("default", 70, "When was a ball last seen?").facts
    assert "scene" not in when


def test_memory_gives_every_record_its_similarity_to_the_question(tmp_path: Path) -> None:
    """A short session is returned whole, each record scored against the question (the reasoner
    ranks the records it repeats next to the question by it)."""
    stage = stage_with_scenes(tmp_path)
    items = stage.retrieve(Retrieve(ts=70, request_id="r", query="fox squirrel")).items
    clips = {item.text: item.score for item in items if item.kind == "clip"}
    assert clips["seen: fox squirrel, hare"] > 0.8
    assert clips["seen: fox squirrel, hare"] > max(s for t, s in clips.items() if "squirrel" not in t)


def test_the_suffix_repeats_the_related_records_from_what_the_mode_reads(tiny_engine) -> None:  # noqa: F811
    """In full mode the lines come from all of memory; the recent-window baseline gets none of
    what its window does not hold."""
    from omnistream.protocol.messages import Ask
    from omnistream.reasoning.answer import RELATED_HEADER, Answerer

    answerer = Answerer(tiny_engine, 256, 64)
    now = MemoryRecord(kind="now", t0=74, t1=75, text="seen: lighter")
    question = (
        "About forty seconds ago a voice gave a movement instruction. How far did it say to go forward?"
    )
    full = Ask(ts=75, session="s", turn="t", question=question, mode="full")
    _, seen = answerer.memory_for(full, [*STREAM[:9], now])
    suffix = answerer.suffix_text(full, seen, [])
    line = '[00:31-00:34] a voice said: "Go forward 10 meters."'
    assert f"{RELATED_HEADER}\n{line}" in suffix
    assert suffix.index(line) < suffix.index("Current stream time") < suffix.index(question)
    recent = Ask(ts=75, session="s2", turn="t", question=question, mode="recent")
    _, seen = answerer.memory_for(recent, [*STREAM[:9], now])
    assert line not in answerer.suffix_text(recent, seen, [])  # 00:31 is not in its 30 s


@pytest.mark.parametrize(
    ("seconds", "said"),
    [
        (4, "just now"),
        (38, "about 40 seconds ago"),
        (70, "about a minute ago"),
        (130, "about 2 minutes ago"),
        (3900, "about an hour ago"),
    ],
)
def test_how_long_ago_is_said_as_people_say_it(seconds: float, said: str) -> None:
    from omnistream.memory.stage import ago

    assert ago(seconds) == said


def test_a_when_question_gets_how_long_ago_a_thing_was_last_seen(tmp_path: Path) -> None:
    stage = stage_with_scenes(tmp_path)
    [fact] = stage.now_item("default", 70, "When was the palace last on screen?").facts
    assert fact == "palace on screen 1 time (00:14-00:28); last about 40 seconds ago"
    [fact] = stage.now_item("default", 70, "How many times was the palace shown?").facts
    assert "ago" not in fact


def test_what_was_shown_right_after_a_scene_is_the_next_scene_marked_as_such() -> None:
    records = related_records("What was shown immediately after the photo of the monkey?", STREAM, 100)
    assert [r.item_id for r in records] == [6, 9]
    assert records[1].text.endswith("(shown right after the scene at 00:42)")
    before = related_records("What was shown just before the monkeys?", STREAM, 100)
    assert [r.item_id for r in before] == [5, 6] and "right before the scene at 00:42" in before[0].text
    # "after" in what a voice said is no scene order.
    said = related_records("What did the voice say after he married a more amiable woman?", STREAM, 100)
    assert [r.item_id for r in said] == [10]


@pytest.mark.parametrize(
    ("question", "heard", "filler"),
    [
        (
            "Earlier a reader said that to be rather cold hearted and rather ... is to be ill disposed. "
            "What was the missing word?",
            "Unless to be rather coldhearted and rather selfish is to be ill disposed.",
            "selfish",
        ),
        (
            "Earlier, the reader of the novel said that he might even have been made what himself?",
            "He might even have been made amiable himself.",
            "amiable",
        ),
        ("A voice said 'Go somewhere and do ...' what?", "Go somewhere and do something.", "something"),
        ("What did the voice say?", "Go somewhere and do something.", None),  # no gap
        ("He said the cat sat on the ... what?", "Go somewhere and do something.", None),  # no quote
    ],
)
def test_the_words_filling_a_quoted_gap_are_found(question: str, heard: str, filler) -> None:
    from omnistream.reasoning.prompt import gap_filler

    assert gap_filler(question, heard) == filler


def test_a_line_heard_tells_the_words_of_the_question_s_gap() -> None:
    question = "Earlier, a reader said that he might have been made more ... what?"
    record = heard(
        10, 89, 95, "Had he married a more amiable woman he might have been made more respectable."
    )
    [line] = related_lines([record], STREAM, question)
    assert line.endswith('(the words in the gap of the question: "respectable")')


def test_of_many_things_said_at_the_time_named_the_nearest_come_first() -> None:
    """Ten sentences in the six minutes before: 'about four minutes ago' (240 s before 06:00,
    give or take 96 s) keeps the three said nearest 02:00."""
    said = [heard(i + 1, 30.0 * i, 30.0 * i + 3, f"sentence number {i}") for i in range(12)]
    question = "About four minutes ago a voice mentioned a man by name. Who?"
    assert [r.t0 for r in related_records(question, said, 360)] == [90.0, 120.0, 150.0]


def test_timeline_facts_are_bounded_and_keep_the_order_lines():
    # A question naming many things ("black-and-white", colours) made memory list a fact for
    # each: hundreds of tokens read before the first token. The prompt keeps them bounded.
    long_fact = (
        "white on screen 5 separate times (" + ", ".join(f"{i:02d}:00-{i:02d}:10" for i in range(30)) + ")"
    )
    facts = [
        "ball: appeared 2 separate times, first at 00:10; seen as yellow ball (00:10), white ball (01:20)",
        long_fact,
        *[f"thing{i} on screen 1 time (00:0{i}-00:1{i}); " + "x" * 150 for i in range(8)],
        "in order of first appearance: ball (00:10), white (00:20)",
    ]
    kept = bounded_facts(facts)
    assert kept[0] == facts[0]  # the detector's class first, whole
    assert kept[1].endswith(" ...") and len(kept[1]) <= TIMELINE_FACT_CHARS + 4
    assert kept[1].startswith("white on screen 5 separate times (00:00-00:10, 01:00-01:10")
    assert kept[-1] == facts[-1]  # which-first answered from the order line, always kept
    assert sum(map(len, kept[:-1])) <= TIMELINE_CHARS
    assert len(kept) < len(facts)
    item = MemoryRecord(kind="now", t0=0.0, t1=90.0, text="seen: a ball", facts=facts)
    assert format_item(item).count("[timeline]") == len(kept)
    short = ["cup: appeared 1 separate time, first at 00:05; in view now"]
    assert bounded_facts(short) == short
