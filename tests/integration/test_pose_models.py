"""MoveNet and the object detector on real photos (the default models). (Pose words from keypoints:
tests/unit/test_pose.py.)
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from omnistream.perception.objects import ObjectDetector
from omnistream.perception.pose import (
    INDEX,
    PoseEstimator,
    posture,
    raised_arms,
)

from ..unit.test_pose import sighting

pytestmark = pytest.mark.slow  # the real default detector models


SAMPLES = Path("/usr/share/doc/opencv-doc/examples/data")


def rgb(name: str) -> np.ndarray:
    image = cv2.imread(str(SAMPLES / name))
    assert image is not None, f"{SAMPLES / name} missing (Debian package opencv-doc)"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def estimator() -> PoseEstimator:
    try:
        return PoseEstimator()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(f"MoveNet cannot run here: {exc}")


@pytest.fixture(scope="module")
def detector() -> ObjectDetector:
    return ObjectDetector(min_score=0.5)


def test_movenet_sees_a_man_standing_and_holding_a_basketball(estimator, detector) -> None:
    # basketball1.png: a man on the left stands facing the camera, a basketball in his hands at
    # chest height; a second man, blurred and cut by the frame, on the right.
    image = rgb("basketball1.png")
    found = detector.detect(image)
    person = found[0]
    assert person.label == "person" and person.box[0] < 100, found
    kp = estimator.keypoints(image, person.box)
    seen = {name: kp.get(name) for name in INDEX}
    chain = ["nose", "left_shoulder", "left_hip", "left_knee", "left_ankle"]
    assert all(seen[name] is not None for name in chain), kp.score
    heights = [seen[name][1] for name in chain]
    assert heights == sorted(heights)  # head above shoulders above hips above knees above feet
    x1, y1, x2, y2 = person.box
    assert all(x1 - 10 <= x <= x2 + 10 and y1 - 10 <= y <= y2 + 10 for x, y in kp.xy[kp.score > 0.3])
    assert posture(kp) == "standing" and raised_arms(kp) == 0
    # The ball (the detector misses it in this grey, blurred photo; its box marked by hand).
    ball = sighting("sports ball", (122, 93, 180, 150))
    words = estimator.annotate(image, [*found, ball])[0].pose
    assert words == ("standing", "holding a ball"), words
    # The same ball at his feet is not held.
    assert estimator.annotate(image, [*found, sighting("sports ball", (100, 430, 150, 478))])[0].pose == (
        "standing",
    )


def test_movenet_on_a_footballer_kicking_says_no_wrong_pose(estimator, detector) -> None:
    # messi5.jpg: a footballer in a lunge, kicking the ball at his feet, arms out to the sides.
    image = rgb("messi5.jpg")
    found = detector.detect(image)
    person = found[0]
    kp = estimator.keypoints(image, person.box)
    nose, hips = kp.get("nose"), kp.mean("left_hip", "right_hip")
    assert nose is not None and hips is not None
    assert person.box[1] <= nose[1] < hips[1] <= person.box[3]
    words = estimator.annotate(image, found)[0].pose
    assert not {"sitting", "standing", "raising an arm", "raising both arms"} & set(words), words
    assert not any(word.startswith("holding") for word in words), words  # the ball is at his feet


def test_the_detector_worker_adds_poses_and_runs_without_them(
    estimator, detector, monkeypatch, caplog
) -> None:
    from omnistream.perception import stage as perception_stage
    from omnistream.perception.detectors import DetectorWorker
    from omnistream.protocol.config import PerceptionConfig

    worker = DetectorWorker(None, None, detector, estimator)
    try:
        worker.submit(rgb("basketball1.png"), 1.0, "s", keyframe=False)
        assert worker.wait_idle(30.0)
        (found,) = worker.results()
    finally:
        worker.close()
    assert found.objects is not None and worker.failures == 0
    assert found.objects[0].describe().endswith("(left, standing)"), found.objects

    assert PerceptionConfig().pose
    built = perception_stage.build_detectors(PerceptionConfig(ocr=False, faces=False, pose=False))
    assert built is not None and built.objects is not None and built.pose is None
    built.close()

    def missing(**_kwargs) -> None:
        raise ModuleNotFoundError("pose estimation needs the package ai-edge-litert")

    monkeypatch.setattr(perception_stage, "PoseEstimator", missing)
    with caplog.at_level("WARNING", logger="omnistream.perception"):
        built = perception_stage.build_detectors(PerceptionConfig(ocr=False, faces=False))
    assert "poses cannot be estimated" in caplog.text and "ai-edge-litert" in caplog.text
    assert built is not None and built.objects is not None and built.pose is None
    built.close()
