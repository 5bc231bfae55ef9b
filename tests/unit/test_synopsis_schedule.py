"""When the synopsis is due, what the LLM is given, resending unacknowledged synopses, and how
synopsis and event lines read in the prompt. (The writing itself, with the real LLM, is in
tests/integration/test_synopsis.py.)"""

from __future__ import annotations

from omnistream.protocol.config import MemoryConfig
from omnistream.protocol.messages import MemoryRecord, Record, Synopsis
from omnistream.reasoning.prompt import fit_items, format_item, memory_log
from omnistream.reasoning.synopsis import ACK_TIMEOUT_S, Sentence, Synopsizer, split_sentences


def said(item_id: int, t0: float, text: str = "words") -> MemoryRecord:
    return MemoryRecord(kind="transcript", t0=t0, t1=t0 + 2, text=text, speaker="scene", item_id=item_id)


def synopsizer(**config) -> Synopsizer:
    return Synopsizer(engine=None, config=MemoryConfig(**config))  # type: ignore[arg-type]  # never writes here


def test_due_after_n_records_or_m_stream_seconds() -> None:
    by_count = synopsizer(synopsis_every_records=3, synopsis_every_s=0)
    for i in range(2):
        by_count.observe("s", said(i + 1, 10.0 * i))
    assert by_count.due() == []
    by_count.observe("s", said(3, 20))
    assert by_count.due() == ["s"]
    by_time = synopsizer(synopsis_every_records=0, synopsis_every_s=60)
    by_time.observe("s", said(1, 0))
    by_time.observe("s", said(2, 57))  # ends at 59: 59 s of stream since the first record
    assert by_time.due() == []
    by_time.observe("s", said(3, 58))
    assert by_time.due() == ["s"]
    assert synopsizer(synopsis_every_records=0, synopsis_every_s=0).due() == []


def test_a_stored_synopsis_covers_the_records_before_it() -> None:
    schedule = synopsizer(synopsis_every_records=2)
    schedule.seed("s", MemoryRecord(kind="synopsis", t0=0, t1=30, text="Earlier things.", item_id=9))
    schedule.observe("s", said(1, 10))  # already summarised (ends at 12 <= 30)
    schedule.observe("s", said(2, 20))
    assert schedule.due() == []
    schedule.observe("s", said(3, 40, "new words"))
    schedule.observe("s", said(4, 50, "more words"))
    assert schedule.due() == ["s"]
    assert [item.item_id for item in schedule.digest("s").new] == [3, 4]


def test_the_llm_is_asked_for_one_sentence_that_opens_with_its_time_span() -> None:
    user, opening = Synopsizer.request(
        ['[00:40-00:42] a voice said: "new words"'], 40, 52, "Records of the stream"
    )
    assert user == (
        'Records of the stream from 00:40 to 00:52:\n[00:40-00:42] a voice said: "new words"\n\n'
        "Summarise these in one sentence."
    )
    assert opening == "From 00:40 to 00:52, the stream showed"


def test_a_stored_synopsis_splits_back_into_its_sentences() -> None:
    text = (
        "From 00:00 to 00:22, the stream showed a butterfly. From 00:22 to 1:02:05, the stream showed Linux."
    )
    assert split_sentences(text) == [
        Sentence(0, 22, "From 00:00 to 00:22, the stream showed a butterfly."),
        Sentence(22, 3725, "From 00:22 to 1:02:05, the stream showed Linux."),
    ]
    assert split_sentences("Free text.") == [Sentence(0, 0, "Free text.")] and split_sentences(" ") == []
    schedule = synopsizer()
    schedule.seed("s", MemoryRecord(kind="synopsis", t0=0, t1=3725, text=text))
    assert schedule.digest("s").text == text and schedule.digest("s").covered_ts == 3725


def test_the_llm_reads_only_the_newest_records_within_the_character_budget() -> None:
    schedule = synopsizer(synopsis_input_chars=25, synopsis_every_records=100)
    for i in range(5):
        schedule.observe("s", said(i + 1, 10.0 * i, f"sentence number {i}"))  # 17 chars each
    digest = schedule.digest("s")
    assert [item.item_id for item in digest.new] == [5] and digest.new_count == 5


def test_unacknowledged_synopsis_is_sent_again() -> None:
    schedule = synopsizer()
    digest = schedule.digest("s")
    digest.pending = Synopsis(session="s", ts=30, text="A summary.")  # as ``write`` leaves it
    digest.sent_at = 100.0
    assert schedule.unacknowledged(now=100.0 + ACK_TIMEOUT_S - 1) == []
    assert schedule.unacknowledged(now=100.0 + ACK_TIMEOUT_S) == [digest.pending]
    schedule.acknowledge(Record(session="s", item_id=7, kind="synopsis", t0=0, ts=30, text="Another."))
    assert digest.pending is not None  # not this one
    schedule.acknowledge(Record(session="s", item_id=7, kind="synopsis", t0=0, ts=30, text="A summary."))
    assert digest.pending is None and schedule.unacknowledged(now=1e9) == []


def test_synopsis_and_event_lines_and_the_budget_keeps_the_synopsis() -> None:
    synopsis = MemoryRecord(kind="synopsis", t0=0, t1=95, text="A butterfly, then Linux.", score=1.0)
    event = MemoryRecord(
        kind="event",
        t0=0,
        t1=30,
        text='00:00-00:14 on screen: monarch (butterfly); 00:03 a voice said: "Front left."',
        members=[1, 2],
    )
    assert format_item(synopsis) == "[summary of the stream up to 01:35] A butterfly, then Linux."
    assert (
        format_item(event)
        == '[00:00-00:30] 00:00-00:14 on screen: monarch (butterfly); 00:03 a voice said: "Front left."'
    )
    items = [synopsis, event, MemoryRecord(kind="now", t0=99, t1=100, text="seen: Linux")]
    kept = fit_items(items, budget_tokens=20, count_tokens=lambda text: len(text.split()))
    assert [item.kind for item in kept] == ["synopsis", "now"]
    assert memory_log(kept).splitlines()[0] == format_item(synopsis)
