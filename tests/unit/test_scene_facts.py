"""Facts about the scene a question names (issue #17): people counted in that scene by memory's
timeline, not the session's busiest moment; left and right of the picture inside black bars."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from omnistream.perception.objects import ObjectSighting, picture_area, position_words
from omnistream.perception.tracks import Tracker
from omnistream.protocol.messages import Clip, Percept, Retrieve, Sighting

from .test_memory_and_reasoning import memory_stage
from .test_objects import rgb

EPISODE = Path(__file__).resolve().parents[2] / "docs" / "episodes" / "scenes" / "episode.mp4"


def person(x: int, colour: str, size: int = 80) -> ObjectSighting:
    box = (x, 100, x + size, 100 + 2 * size)
    return ObjectSighting("person", 0.9, box, (640, 360), position_words(box, 640, 360), colour)


# Three scenes: a street with five people, a portrait of one man in a white shirt, two players.
SCENES = [
    (0.0, 14.0, [person(20 + 120 * i, "black", 40) for i in range(5)], "seen: street; objects: 5 people: person in a black shirt (left, far)"),
    (14.0, 28.0, [person(280, "white", 120)], "seen: jersey (T-shirt); objects: person in a white shirt (centre, near)"),
    (28.0, 42.0, [person(100, "red"), person(400, "blue")], "seen: basketball; objects: 2 people: person in a red shirt (left)"),
]  # fmt: skip


def stage_with_scenes(tmp_path: Path):
    stage = memory_stage(tmp_path)
    stage.emit = lambda message: True
    tracker = Tracker(min_hits=2, max_missed_s=1.0)
    events = []
    for step in range(int(60 / 0.5)):
        ts = step * 0.5
        frame = next((people for t0, t1, people, _ in SCENES if t0 <= ts < t1 - 0.5), [])
        events += tracker.update(ts, frame)
    events += tracker.flush(60.0)
    for event in events:
        stage.handle(
            Sighting(
                ts=event.ts, t0=event.t0, label=event.label, event=event.kind, text=event.text,
                track_id=event.track_id, count=event.count,
            )
        )  # fmt: skip
    for clip_id, (t0, t1, _, description) in enumerate(SCENES):
        features = np.eye(4, dtype=np.float32)[clip_id]
        stage.handle(Clip(clip_id=clip_id, t0=t0, ts=t1, features=features, description=description))
    stage.handle(Percept(ts=60, features=np.ones(4, np.float32) / 2, objects=[]))
    return stage


def person_fact(stage, question: str) -> str:
    reply = stage.retrieve(Retrieve(ts=60, request_id="q", query=question))
    [fact] = [fact for fact in reply.items[-1].facts if fact.startswith("person:")]
    return fact


def test_people_are_counted_in_the_scene_the_question_names(tmp_path: Path) -> None:
    stage = stage_with_scenes(tmp_path)
    fact = person_fact(stage, "In the picture of the man in a white T-shirt, how many people were there?")
    assert "at most" not in fact, fact  # the street's five are another scene
    assert (
        "in the scenes the question names: 1 person (00:14-00:28: jersey (T-shirt); objects: person in a white shirt"
        in fact
    ), fact
    fact = person_fact(stage, "How many people played basketball?")
    assert "names: 2 people (00:28-00:42: basketball" in fact, fact


def test_the_most_people_at_once_only_when_asked(tmp_path: Path) -> None:
    stage = stage_with_scenes(tmp_path)
    assert "at most 5 at once (00:00-00:13)" in person_fact(stage, "What is the most people you saw at once?")
    # A question that names no scene gets no count from the timeline (the records it gets say them).
    fact = person_fact(stage, "How many people were there?")
    assert "at most" not in fact and "in view at once" not in fact, fact


def padded(image: np.ndarray, width: int = 640, height: int = 360) -> tuple[np.ndarray, int, float]:
    """``image`` fitted into a black ``width`` x ``height`` frame (as an episode shows a photo):
    the frame, the left bar's width and the scale."""
    scale = min(width / image.shape[1], height / image.shape[0])
    small = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)))
    frame = np.zeros((height, width, 3), np.uint8)
    x0, y0 = (width - small.shape[1]) // 2, (height - small.shape[0]) // 2
    frame[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
    return frame, x0, scale


def test_left_and_right_are_of_the_picture_inside_black_bars() -> None:
    photo = rgb("fruits.jpg")  # 512 x 480: a tall picture on a wide screen, bars at both sides
    frame, x0, scale = padded(photo)
    x1, y1, x2, y2 = picture_area(frame)
    assert abs(x1 - x0) <= 1 and abs(x2 - (640 - x0)) <= 1 and (y1, y2) == (0, 360)
    # A thing at x 90-160 of the picture's 512 is on the left of the picture; of the whole
    # screen, it was in the centre.
    box = (x0 + round(90 * scale), 100, x0 + round(160 * scale), 200)
    assert position_words(box, 640, 360) == "centre"
    assert position_words(box, 640, 360, picture_area(frame)) == "left"
    assert picture_area(photo) == (0, 0, 512, 480)  # no bars: the whole frame
    assert picture_area(rgb("messi5.jpg")) == (0, 0, 548, 342)


def test_the_picture_area_of_an_encoded_episode_frame() -> None:
    """H.264 leaves noise in the bars: a breakfast-table photo (1032 x 829) shown at 640 x 360."""
    video = cv2.VideoCapture(str(EPISODE))
    video.set(cv2.CAP_PROP_POS_MSEC, 5000)
    ok, frame = video.read()
    assert ok, f"cannot read {EPISODE}"
    x1, y1, x2, y2 = picture_area(frame[:, :, ::-1])
    assert abs(x1 - 96) <= 3 and abs(x2 - 544) <= 3 and (y1, y2) == (0, 360), (x1, x2)
    # The mobile phone at the bottom left of the table (in the picture: x 55-190 of 1032).
    phone = (96 + 24, 250, 96 + 83, 330)
    assert position_words(phone, 640, 360, (x1, y1, x2, y2)) == "left"


def test_a_thing_seen_in_several_looks_is_told_as_it_looked_in_the_scene_named(tmp_path: Path) -> None:
    """A yellow ball at a footballer's feet, later white balls in a street scene: asked about the
    ball next to the man in the striped shirt, the timeline says how it looked in that scene."""
    from dataclasses import replace

    stage = memory_stage(tmp_path)
    stage.emit = lambda message: True
    tracker = Tracker(min_hits=2, max_missed_s=1.0)
    ball = ObjectSighting("sports ball", 0.9, (300, 250, 340, 290), (640, 360), "centre", "yellow")
    events = []
    for step in range(120):
        ts = step * 0.5
        if ts < 13:
            events += tracker.update(ts, [ball])
        elif 20 <= ts < 33 or 40 <= ts < 53:
            events += tracker.update(ts, [replace(ball, box=(100, 100, 110, 110), colour="white")])
        else:
            events += tracker.update(ts, [])
    for event in events + tracker.flush(60.0):
        stage.handle(
            Sighting(
                ts=event.ts, t0=event.t0, label=event.label, event=event.kind, text=event.text,
                track_id=event.track_id, count=event.count,
            )
        )  # fmt: skip
    scenes = [
        (0.0, 14.0, "seen: soccer ball; objects: person in a red and blue striped shirt (centre), yellow ball (centre)"),
        (20.0, 34.0, "seen: mobile home; objects: 3 people: person in a black shirt (left, far), white ball (left, far)"),
        (40.0, 54.0, "seen: pole; objects: 2 people: person in a grey shirt (right, far), white ball (left, far)"),
    ]  # fmt: skip
    for clip_id, (t0, t1, description) in enumerate(scenes):
        features = np.eye(4, dtype=np.float32)[clip_id]
        stage.handle(Clip(clip_id=clip_id, t0=t0, ts=t1, features=features, description=description))
    stage.handle(Percept(ts=60, features=np.ones(4, np.float32) / 2, objects=[]))
    question = "What colour was the ball next to the man in the striped shirt?"
    reply = stage.retrieve(Retrieve(ts=60, request_id="b", query=question))
    [fact] = [fact for fact in reply.items[-1].facts if fact.startswith("ball:")]
    assert (
        "white ball 3 last seen" in fact and "seen as yellow ball (00:00), white ball (00:20, 00:40)" in fact
    )
    assert fact.endswith("; in the scenes the question names: yellow ball (00:00-00:14)"), fact
    # Without words naming a scene, no scene is picked.
    reply = stage.retrieve(Retrieve(ts=60, request_id="c", query="What colour was the ball?"))
    assert "question names" not in reply.items[-1].facts[0]


def test_a_hand_record_says_what_the_hand_did() -> None:
    """A close-up hand's gesture rides in its tracker records ("how was the hand held?" asked a
    minute later finds them); a person's pose words stay in the clip descriptions."""
    hand = ObjectSighting(
        "hand", 0.99, (200, 60, 460, 330), (640, 360), "centre, near", "", ("showing an open hand",)
    )
    tracker = Tracker(min_hits=2, max_missed_s=1.0)
    events = tracker.update(0.0, [hand]) + tracker.update(0.5, [hand]) + tracker.flush(14.0)
    assert [e.text for e in events] == [
        "hand 1 appeared at 00:00, in the centre, near, showing an open hand",
        "hand 1 last seen at 00:00, in the centre, near, showing an open hand (in view 00:00-00:00)",
    ]


def test_a_tiny_hand_with_nobody_around_it_is_not_a_hand() -> None:
    """Palm detection finds "hands" in a bus front or a sign; a hand with no person around it is
    a close-up, never a speck under 1 % of the frame."""
    from omnistream.perception.hands import Hand, annotate

    def hand_at(box: tuple[int, int, int, int]) -> Hand:
        points = np.zeros((21, 3), np.float32)
        points[:, 0] = np.linspace(box[0], box[2], 21)
        points[:, 1] = np.linspace(box[1], box[3], 21)
        return Hand(points=points, score=0.8, gesture="a V sign")

    bus = ObjectSighting("bus", 0.99, (150, 40, 560, 330), (640, 360), "centre, near", "red")
    out = annotate([bus], {}, [hand_at((300, 150, 320, 170))], (640, 360))
    assert [s.label for s in out] == ["bus"]
    out = annotate([bus], {}, [hand_at((40, 150, 110, 230))], (640, 360))  # 2.4 % of the frame
    assert [s.label for s in out] == ["bus", "hand"]


def test_colour_and_people_words_are_no_things_of_the_scene_timeline(tmp_path: Path) -> None:
    stage = stage_with_scenes(tmp_path)
    question = "In the picture of the man in a white T-shirt, how many people were there?"
    facts = stage.retrieve(Retrieve(ts=60, request_id="q", query=question)).items[-1].facts
    assert facts[0].startswith("person:") and "names: 1 person" in facts[0], facts
    # Before: "white on screen 1 time (00:14-00:28)", "people on screen 2 separate times (...)".
    assert not [fact for fact in facts if fact.startswith(("white ", "people ", "picture "))], facts
    assert any(fact.startswith("shirt on screen") for fact in facts), facts  # things still are
