"""Multiple choice from the open answer (reasoning/choices.py) and the eval's evidence recall
(app/eval.py): pure functions, no models."""

from __future__ import annotations

import pytest

from omnistream.app.eval import Question, classify_evidence, evidence_records, restates
from omnistream.protocol.messages import MemoryRecord
from omnistream.protocol.text import content_words
from omnistream.reasoning.answer import merge_spans
from omnistream.reasoning.choices import support, supported_choice

COUNT = ["nobody", "just one person", "between two and ten people", "more than thirty people"]


def test_content_words_normalise_numbers_plurals_and_drop_stop_words() -> None:
    assert content_words("There are two people on the screen") == ["2", "people"]
    assert content_words("3 oranges and a lemon") == ["3", "orange", "lemon"]
    assert content_words("He said twice: glasses!") == ["said", "2", "glass"]


@pytest.mark.parametrize(
    ("answer", "choices", "expected"),
    [
        ("There are two people on screen right now.", ["one", "two", "three", "five"], 1),
        ("2 people.", ["one", "two", "three", "five"], 1),
        ("A lemon and an orange.", ["a bowl of soup", "a lemon", "a cat", "a car"], 1),
        ("He was fetched from a ditch.", ["a river", "a ditch", "a palace", "a ship"], 1),
        ("A red apple.", ["green", "yellow", "purple", "red"], 3),
        ("I see three people walking.", COUNT, 2),  # 3 lies between two and ten
        ("A cab and a limousine.", ["aeroplanes", "bicycles", "a cab and a limousine", "boats"], 2),
        # A compound names its last word: a fox squirrel is a squirrel, a soccer ball a ball.
        ("A fox squirrel is on screen right now.", ["a rabbit", "a cat", "a fox", "a squirrel"], 3),
        ("A soccer ball.", ["soccer", "a ball", "a dog", "a cup"], 1),
        # Part of one choice, nothing of the others: that choice.
        ("The shirt was blue.", ["all white", "red and blue stripes", "green and yellow", "black"], 1),
    ],
)
def test_the_choice_the_answer_names_is_picked(answer: str, choices: list[str], expected: int) -> None:
    assert supported_choice(answer, choices) == expected


@pytest.mark.parametrize(
    ("answer", "choices"),
    [
        ("I did not see that.", ["a red ball", "a blue ball", "a cup", "a phone"]),
        ("I didn't hear anyone say it.", ["yes", "no", "twice", "never"]),
        ("Something on a table.", ["a pencil", "a coin", "a ball", "a phone"]),  # names none
        ("A ball.", ["a red ball", "a blue ball", "a cup", "a phone"]),  # a tie: red or blue?
        ("A fox or a squirrel.", ["a rabbit", "a cat", "a fox", "a squirrel"]),  # not one compound
        ("Red, not green.", ["green", "yellow", "purple", "red"]),
        ("", ["a", "b"]),
    ],
)
def test_no_pick_when_the_answer_supports_no_single_choice(answer: str, choices: list[str]) -> None:
    assert supported_choice(answer, choices) is None


def test_words_every_choice_shares_weigh_less() -> None:
    scores = support("more people", ["people on the left", "people on the right"])
    assert scores[0] == scores[1] and scores[0] < 0.5
    assert support("the right one", ["people on the left", "people on the right"])[1] > 0.5


def test_merge_spans_sorts_and_joins_overlapping_and_touching_spans() -> None:
    assert merge_spans([(10, 12), (0, 2), (1.5, 4), (4.3, 5), (20, 21)]) == [[0, 5], [10, 12], [20, 21]]
    assert merge_spans([]) == []


def record(t0: float, t1: float, text: str, kind: str = "clip") -> MemoryRecord:
    return MemoryRecord(kind=kind, t0=t0, t1=t1, text=text)


def question(kind: str = "visual-past", evidence=(14.0, 30.0)) -> Question:
    return Question(
        id="q",
        ask_at_s=120,
        question="Earlier a man was seen in a car. What was he wearing?",
        kind=kind,
        choices=["A a bow tie", "B a hat", "C a scarf", "D glasses"],
        answer="A",
        keywords=["bow tie", "bowtie"],
        evidence_s=list(evidence),
    )


def test_evidence_classes_tell_perception_from_retrieval_from_reasoning() -> None:
    q = question()
    records = [record(0, 14, "seen: butterfly"), record(15, 29, "seen: suit, bow tie, car mirror")]
    assert classify_evidence(q, True, [], records) == "answered"
    assert classify_evidence(q, False, [[0, 14], [40, 60]], records) == "not retrieved"
    assert classify_evidence(q, False, [[0, 29]], records) == "not reasoned"
    # The record in the window names neither a keyword nor the right choice: not perceived.
    assert classify_evidence(q, False, [[0, 29]], [record(15, 29, "seen: minivan, cab")]) == "not perceived"
    # A record far from the evidence window does not count, even if it names the answer.
    assert classify_evidence(q, False, [[0, 200]], [record(80, 90, "seen: bow tie")]) == "not perceived"
    assert classify_evidence(question(evidence=()), False, [], records) == ""


def test_counting_evidence_is_any_record_inside_the_windows() -> None:
    q = question(kind="counting", evidence=(0.0, 10.0, 50.0, 60.0))
    assert q.windows == [(0.0, 10.0), (50.0, 60.0)]
    held = evidence_records(q, [record(1, 5, "seen: butterfly"), record(20, 30, "x"), record(55, 58, "y")])
    assert [r.text for r in held] == ["seen: butterfly", "y"]


def test_an_answer_made_of_the_question_s_words_restates_it() -> None:
    asked = "The narrator spoke of the winter of despair. What was the spring?"
    assert restates(asked, "The narrator spoke of the winter of despair.")
    assert not restates(asked, 'It was "the spring of hope".')
    asked = "About six minutes ago a reader mentioned a man by name. Who?"
    assert restates(asked, "The man by name was mentioned about six minutes ago.")
    assert not restates(asked, "Mr. Dashwood, at 00:41.")
    assert not restates("Who was mentioned?", "")
    order = "Of these three, which appeared first: the sudoku puzzle, the orange, or the butterfly?"
    assert not restates(order, "The orange appeared first in the stream.")  # wrong, but an answer
    assert not restates("How many people are on screen now?", "There are 4 people on screen now.")
    assert not restates("When was the ball last seen?", "The ball was last seen at 03:49.")
    assert restates("Where was the ball last seen?", "The ball was last seen at 03:49.")
    held = "In the animated scene, what is the woman in the purple dress holding in her hand?"
    assert restates(held, "The woman in the purple dress is holding it in her hand.")
    assert not restates(held, "The woman in the purple dress is holding a candle in her hand.")
