"""Objects, people and their timeline, end to end: real processes, the default models.

A 30 s recording made of OpenCV's sample photos: a footballer with a ball at his feet (0-8 s),
fruit (8-16 s), two basketball players (16-24 s), a close-up of an open hand (24-30 s). The object
detector, the hand models and the tracker turn them into sightings in memory; questions about how
many people were there, where the ball was last seen and what the hand showed are answered from
them.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from omnistream.app.client import Client
from omnistream.app.launcher import Launcher
from omnistream.app.models import prepare_llm_cache
from omnistream.app.replay import Replayer, ScheduledAsk

from ..conftest import make_config, pid_alive

pytestmark = pytest.mark.slow

SAMPLES = Path("/usr/share/doc/opencv-doc/examples/data")
TIMELINE = [("messi5.jpg", 8), ("fruits.jpg", 8), ("basketball1.png", 8), ("handSrc.jpg", 6)]
HAND = Path("/usr/share/doc/opencv-doc/opencv4/html/handSrc.jpg")  # opencv-doc's photo of an open hand
SIZE = (640, 400)


def cover(image: np.ndarray) -> np.ndarray:
    """Scaled to cover the frame, centre-cropped (as a camera frames a scene)."""
    height, width = image.shape[:2]
    scale = max(SIZE[0] / width, SIZE[1] / height)
    resized = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    top, left = (resized.shape[0] - SIZE[1]) // 2, (resized.shape[1] - SIZE[0]) // 2
    return np.ascontiguousarray(resized[top : top + SIZE[1], left : left + SIZE[0]])


def make_video(path: Path, fps: int = 10) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        for name, seconds in TIMELINE:
            source = HAND if name == HAND.name else SAMPLES / name
            image = cv2.imread(str(source))
            assert image is not None, f"{source} missing (Debian package opencv-doc)"
            frame = av.VideoFrame.from_ndarray(cover(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)), format="rgb24")
            for _ in range(seconds * fps):
                container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    root = Path(tmp_path_factory.mktemp("objects"))
    config = make_config(root, ("gateway", "perception", "memory", "reasoning"))
    prepare_llm_cache(config, progress=False)
    launcher = Launcher(config, Path("/tmp") / f"os-obj-{os.getpid()}")
    launcher.start()
    yield launcher, root
    pids = [c.pid for c in launcher.children.values()]
    launcher.shutdown()
    assert not any(pid_alive(pid) for pid in pids), "a stage outlived the shutdown"


def test_people_counts_and_last_seen_come_from_the_tracked_objects(system) -> None:
    launcher, root = system
    video = make_video(root / "objects.mp4")
    asks = [
        ScheduledAsk(23.0, "How many people were on screen at most at the same time?"),
        ScheduledAsk(23.5, "When was the ball last seen?"),
        ScheduledAsk(
            23.8, "Which of these was on screen?", choices=["A a cat", "B a ball", "C a laptop", "D a car"]
        ),
        ScheduledAsk(
            29.5,
            "What is the hand on screen showing right now?",
            choices=["A a fist", "B a thumbs up", "C an open hand", "D a pointing finger"],
        ),
    ]
    with Client.connect(launcher.run_dir) as client:
        answers = Replayer(client).run(video, asks, speed=2.0, answer_timeout_s=240)
        history = client.history(0, 1e9, kinds=["sighting"])
    sightings = [item.text for item in history.items]
    assert any(text.startswith("person 1") and "entered at 00:00" in text for text in sightings), sightings
    assert any("ball 1 last seen at 00:0" in text for text in sightings), sightings
    assert any(text.startswith("2 people present") for text in sightings), sightings
    assert any(text.startswith("hand 1 appeared at 00:2") for text in sightings), sightings
    people, ball, choice, hand = (a.done for a in answers)
    assert people is not None and not people.error and ball is not None and choice is not None
    assert any(word in people.text.lower() for word in ("2", "two")), people.text
    assert "00:0" in ball.text or "00:1" in ball.text, ball.text  # the time it was last seen (~00:08)
    assert choice.choice == "B", choice
    assert hand is not None and hand.choice == "C", hand  # "showing an open hand" in the now record
