"""Objects: colour names, positions, the tracker, memory's timeline of what was seen (the COCO
detector on OpenCV's sample photos: tests/integration/test_objects_models.py)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from omnistream.perception.objects import (
    ObjectSighting,
    colour_name,
    middle_colours,
    position_words,
)
from omnistream.perception.tracks import Tracker
from omnistream.protocol.labels import classes_in

SAMPLES = Path("/usr/share/doc/opencv-doc/examples/data")


def rgb(name: str) -> np.ndarray:
    image = cv2.imread(str(SAMPLES / name))
    assert image is not None, f"{SAMPLES / name} missing (Debian package opencv-doc)"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize(
    ("colour", "name"),
    [
        ((230, 20, 20), "red"),
        ((20, 40, 220), "blue"),
        ((240, 230, 30), "yellow"),
        ((30, 160, 40), "green"),
        ((255, 140, 0), "orange"),
        ((128, 0, 160), "purple"),
        ((255, 105, 180), "pink"),
        ((120, 70, 20), "brown"),
        ((250, 250, 250), "white"),
        ((10, 10, 10), "black"),
        ((128, 128, 128), "grey"),
    ],
)
def test_colour_names_of_pure_colours(colour: tuple[int, int, int], name: str) -> None:
    patch = np.full((30, 30, 3), colour, np.uint8)
    noisy = np.clip(patch + np.random.default_rng(0).integers(-12, 12, patch.shape), 0, 255).astype(np.uint8)
    assert colour_name(noisy) == name


def test_colour_names_of_mixed_colours() -> None:
    patch = np.zeros((40, 40, 3), np.uint8)
    patch[:, :24] = (220, 20, 20)
    patch[:, 24:] = (250, 250, 250)
    assert colour_name(patch) == "red and white"  # 60 / 40: both named, the larger first
    patch[:, 34:] = (20, 40, 220)
    assert colour_name(patch) == "red"  # 85 % red, 15 % blue: one colour
    assert colour_name(np.zeros((0, 0, 3), np.uint8)) == ""


def test_two_chromatic_colours_are_both_named_from_a_fifth() -> None:
    """Stripes: a shirt of blue and red stripes over a dark background names both; a fifth of
    white or black beside a colour is shading or background, not a second colour."""
    patch = np.full((40, 40, 3), 15, np.uint8)  # black 28 %
    patch[:, :18] = (20, 40, 220)  # blue 45 %
    patch[:, 18:29] = (220, 20, 30)  # red 27 %
    assert colour_name(patch) == "blue and red"
    patch[:, 18:29] = (250, 250, 250)  # white 27 %: not named
    assert colour_name(patch) == "blue"


def test_warm_lit_red_is_orange_red_and_shading_is_one_colour() -> None:
    """A red thing under warm light (hue ~22) is "orange-red": neither plain "red" nor "orange";
    a patch shaded from orange-red into orange is one colour, not "orange-red and orange"."""
    patch = np.full((40, 40, 3), (200, 85, 30), np.uint8)  # hue 21
    assert colour_name(patch) == "orange-red"
    patch[:, 26:] = (230, 130, 30)  # hue 31: orange, 35 %
    assert colour_name(patch) == "orange-red"
    patch[:, 26:] = (110, 45, 15)  # the same hue in shadow: brown, 35 %
    assert colour_name(patch) == "orange-red"


def test_the_middle_of_a_picture_is_named_by_its_colours() -> None:
    """What the detector has no class for still has a colour: the mandrill's face is blue and
    red, the Starry Night blue; a grey frame stays grey (no colour to name)."""
    assert middle_colours(rgb("baboon.jpg")) == "blue and red"
    assert middle_colours(rgb("starry_night.jpg")) == "blue"
    assert middle_colours(rgb("fruits.jpg")) == "orange"
    assert middle_colours(np.full((120, 160, 3), 128, np.uint8)) == "grey"


def test_a_clip_description_says_its_colours_without_naming_a_thing() -> None:
    from omnistream.perception.clips import describe

    text = describe([], objects=["yellow ball (centre)"], colours="blue and red", motion=0.0)
    assert text == "objects: yellow ball (centre); mostly blue and red in the middle; still"


def test_person_names_take_their_article() -> None:
    person = ObjectSighting("person", 0.9, (0, 0, 50, 100), (640, 480), "left", "orange and brown")
    assert person.name() == "person in an orange and brown shirt"
    assert (
        ObjectSighting("person", 0.9, (0, 0, 50, 100), (640, 480), "left", "red").name()
        == "person in a red shirt"
    )


def test_position_words() -> None:
    assert position_words((0, 0, 50, 50), 600, 400) == "left"
    assert position_words((500, 300, 600, 400), 600, 400) == "right"
    assert position_words((280, 180, 300, 200), 600, 400) == "centre, far"
    assert position_words((0, 0, 600, 300), 600, 400) == "centre, near"


def test_classes_a_question_mentions() -> None:
    assert classes_in("Where did I leave my phone?") == ["cell phone"]
    assert classes_in("How many people came in?") == ["person"]
    assert set(classes_in("What colour was the cup next to the laptop?")) == {"cup", "laptop"}
    assert classes_in("What did she say about the budget?") == []
    assert classes_in("What is in my hand?") == ["hand"]  # perception/hands.py's close-up hands


def sighting(label: str, x: int, y: int = 100, size: int = 60) -> ObjectSighting:
    box = (x, y, x + size, y + size)
    return ObjectSighting(label, 0.9, box, (640, 480), position_words(box, 640, 480), "red")


def test_tracker_enter_occlusion_leave_is_one_track_with_its_events() -> None:
    tracker = Tracker(min_hits=2, max_missed_s=3.0)
    events = []
    # A cup sits still on the right from t=0; a person walks in from the left at t=2.
    for step in range(40):  # 2 detections a second for 20 s
        ts = step / 2
        frame = [sighting("cup", 500)]
        if 2 <= ts < 12 and not (5 <= ts < 6.5):  # the person is missed for 1.5 s (occluded)
            frame.append(sighting("person", 40 + int(ts * 20), 80, 150))
        if ts >= 15:
            frame = []  # the cup is taken away at 15 s
        events += [(ts, e) for e in tracker.update(ts, frame)]
    events += [(20.0, e) for e in tracker.flush(20.0)]
    kinds = [(e.kind, e.label, e.track_id) for _, e in events if e.kind != "count"]
    assert kinds == [
        ("appeared", "cup", 1),
        ("appeared", "person", 1),  # one person track despite the occlusion
        ("left", "person", 1),
        ("gone", "cup", 1),
    ]
    entered = next(e for _, e in events if e.kind == "appeared" and e.label == "person")
    assert entered.t0 == 2.0 and entered.text.startswith("person 1 (in a red shirt) entered at 00:02")
    left = next(e for _, e in events if e.kind == "left")
    assert left.ts == 11.5 and "last seen at 00:12" in left.text and "(in view 00:02-00:12)" in left.text
    gone = next(e for _, e in events if e.kind == "gone")
    assert gone.ts == 14.5 and gone.text.startswith("red cup 1 last seen at 00:14, on the right")
    counts = [e.text for _, e in events if e.kind == "count"]
    assert counts == ["1 person present 00:02-00:12"]  # from first seen to last seen


def test_tracker_ignores_a_single_false_detection_and_counts_two_people() -> None:
    tracker = Tracker(min_hits=2, max_missed_s=2.0)
    assert tracker.update(0.0, [sighting("dog", 300)]) == []  # seen once: not announced
    events = tracker.update(0.5, [sighting("person", 50, size=120), sighting("person", 400, size=120)])
    events += tracker.update(1.0, [sighting("person", 55, size=120), sighting("person", 405, size=120)])
    events += tracker.update(4.0, [sighting("person", 60, size=120), sighting("person", 410, size=120)])
    assert [e.label for e in events if e.kind == "appeared"] == ["person", "person"]
    assert [e for e in events if e.kind == "count"] == []  # the interval is told when it ends
    assert all(e.label != "dog" for e in events)
    assert len(tracker.in_view()) == 2
    assert [e.text for e in tracker.flush(5.0) if e.kind == "count"] == ["2 people present 00:00-00:04"]


def test_a_crowd_makes_counts_not_an_event_per_person() -> None:
    tracker = Tracker(min_hits=2, max_missed_s=1.0, crowd=3)
    events = []
    for step in range(40):  # 2 frames a second: 5 people walk through, 2 stay for the first 10 s
        ts = step / 2
        people = [sighting("person", 20 + 120 * i, 50, 100) for i in range(5 if ts < 10 else 2)]
        if ts == 4:
            people = people[:4]  # one missed in one frame: no count change announced
        events += tracker.update(ts, people)
    events += tracker.flush(20.0)
    # Only the two who stayed, once the crowd had gone, have events of their own; the crowd is in the counts.
    assert [e.kind for e in events if e.label == "person" and e.kind != "count"] == ["left", "left"]
    assert [e.text for e in events if e.kind == "count"] == [
        "5 people present 00:00-00:10",
        "2 people present 00:10-00:20",
    ]


def test_memory_stores_sightings_and_answers_last_seen_from_the_timeline(tmp_path: Path) -> None:
    from omnistream.protocol.messages import Percept, Record, Retrieve, Sighting
    from omnistream.reasoning.prompt import format_item

    from .test_memory_and_reasoning import memory_stage

    stage, published = memory_stage(tmp_path), []
    stage.emit = published.append
    # A tracker run: the phone shows up twice, last on the right of the laptop; two people for a while.
    tracker = Tracker(min_hits=2, max_missed_s=2.0)
    events = []
    for step in range(60):
        ts = step / 2
        frame = [sighting("laptop", 250, 200, 100)]
        if 2 <= ts < 6 or 14 <= ts < 20:
            frame.append(sighting("cell phone", 120 if ts < 10 else 420, 220, 60))
        if 8 <= ts < 24:
            frame.append(sighting("person", 20, 50, 150))
        if 10 <= ts < 16:
            frame.append(sighting("person", 450, 50, 150))
        events += tracker.update(ts, frame)
    for event in events:
        stage.handle(
            Sighting(
                ts=event.ts,
                t0=event.t0,
                label=event.label,
                event=event.kind,
                text=event.text,
                track_id=event.track_id,
                count=event.count,
            )
        )
    records = [m for m in published if isinstance(m, Record)]
    assert records and all(r.kind == "sighting" for r in records)
    assert any(
        r.text.startswith("red phone 2 last seen at 00:20, on the right, right of the laptop")
        for r in records
    )
    stage.handle(Percept(ts=30, features=np.ones(4, np.float32) / 2, objects=["red laptop (centre)"]))
    reply = stage.retrieve(Retrieve(ts=30, request_id="r", query="Where did I leave my phone?"))
    assert any(item.kind == "sighting" and "phone 2 last seen" in item.text for item in reply.items)
    now = reply.items[-1]
    assert now.kind == "now" and "objects: red laptop (centre); 0 people in view" in now.text
    assert now.facts == [
        "phone: appeared 2 separate times, first at 00:02, last appeared at 00:14; "
        "red phone 2 last seen at 00:20, on the right, right of the laptop (in view 00:14-00:20)"
    ]
    assert "[timeline] phone: appeared 2 separate times" in format_item(now)
    people = stage.retrieve(Retrieve(ts=30, request_id="p", query="How many people were there at most?"))
    [fact] = people.items[-1].facts
    assert (
        fact.startswith("person: appeared 2 separate times, first at 00:08")
        and "at most 2 at once (00:10-00:16)" in fact
    )


def test_the_timeline_tells_each_look_of_a_thing_with_its_times(tmp_path: Path) -> None:
    """A ball seen yellow in one scene and white in another: the timeline fact lists both looks
    with their times (the last-seen record alone named only the white one)."""
    from dataclasses import replace

    from omnistream.protocol.messages import Percept, Retrieve, Sighting

    from .test_memory_and_reasoning import memory_stage

    stage = memory_stage(tmp_path)
    stage.emit = lambda message: True
    tracker = Tracker(min_hits=2, max_missed_s=2.0)
    events = []
    for step in range(60):
        ts = step / 2
        if ts < 8 or 20 <= ts < 24:
            events += tracker.update(ts, [replace(sighting("sports ball", 300), colour="yellow")])
        elif 12 <= ts < 16:
            events += tracker.update(ts, [replace(sighting("sports ball", 100), colour="white")])
        else:
            events += tracker.update(ts, [])
    for event in events + tracker.flush(30.0):
        stage.handle(
            Sighting(
                ts=event.ts, t0=event.t0, label=event.label, event=event.kind, text=event.text,
                track_id=event.track_id, count=event.count,
            )
        )  # fmt: skip
    stage.handle(Percept(ts=30, features=np.ones(4, np.float32) / 2, objects=[]))
    reply = stage.retrieve(Retrieve(ts=30, request_id="b", query="What colour was the ball?"))
    [fact] = reply.items[-1].facts
    assert fact.startswith("ball: appeared 3 separate times"), fact
    assert fact.endswith("; seen as yellow ball (00:00, 00:20), white ball (00:12)"), fact
