"""The encoder interface on a tiny CLIP and SigLIP tower, the face registry and motion on Debian
opencv-doc images (the default models on real media: tests/integration/test_perception_models.py)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from omnistream.perception.clips import top_labels
from omnistream.perception.detectors import (
    PersonRegistry,
    motion_between,
    motion_thumbnail,
)
from omnistream.perception.encoder import load_encoder

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")


def image(name: str) -> np.ndarray:
    path = OPENCV_DATA / name
    assert path.exists(), f"{path} missing: install the Debian package opencv-doc (scripts/install.sh)"
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_a_local_clip_model_replaces_the_encoder(short_tmp) -> None:
    from transformers import CLIPConfig, CLIPModel, SiglipVisionConfig, SiglipVisionModel

    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    clip_dir, tower_dir = short_tmp / "clip", short_tmp / "siglip-tower"
    config = CLIPConfig(
        text_config={**tiny, "vocab_size": 99},
        vision_config={**tiny, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(clip_dir)
    SiglipVisionModel(SiglipVisionConfig(**tiny, image_size=32, patch_size=8)).save_pretrained(tower_dir)
    frames = [cv2.resize(image(name), (320, 240)) for name in ("orange.jpg", "board.jpg")]
    with pytest.raises(ValueError, match="one shape"):
        load_encoder(str(clip_dir)).encode([frames[0], image("orange.jpg")])
    for path, dim in ((clip_dir, 16), (tower_dir, 32)):
        encoder = load_encoder(str(path))
        assert encoder.feature_dim == dim and encoder.classes == []
        features, probs = encoder.encode(frames)
        assert features.shape == (2, dim) and probs.shape == (2, 0)
        np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
        assert float(features[0] @ features[1]) < 0.9999  # the image matters
        again, _ = encoder.encode(frames[:1])
        np.testing.assert_allclose(again[0], features[0], atol=1e-5)
        assert top_labels(probs[0], encoder.classes, 3, 0.0) == []


def test_unknown_encoder_is_named(short_tmp) -> None:
    with pytest.raises(ValueError, match="no-such-encoder"):
        load_encoder("no-such-encoder")
    (short_tmp / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_encoder(str(short_tmp / "empty"))


def test_registry_keeps_ids_apart_and_notices_comebacks() -> None:
    rng = np.random.default_rng(0)
    alice, bob = rng.normal(0, 0.1, 128), rng.normal(0, 0.1, 128)
    alice_again = alice + rng.normal(0, 0.01, 128)
    registry = PersonRegistry(match_distance=0.55, comeback_gap_s=30.0)
    assert registry.identify([alice, bob], ts=0.0) == [(1, True, 0.0), (2, True, 0.0)]
    assert registry.identify([alice_again], ts=5.0) == [(1, False, 0.0)]
    # Two faces in one frame never share an id, even if both are nearest to the same person.
    assert [pid for pid, *_ in registry.identify([alice, alice_again], ts=6.0)] == [1, 3]
    assert registry.identify([bob], ts=50.0) == [(2, False, 50.0)]


def test_motion_is_zero_for_a_still_frame_and_grows_with_change() -> None:
    frame = image("board.jpg")
    still = motion_between(motion_thumbnail(frame), motion_thumbnail(frame.copy()))
    shifted = motion_between(motion_thumbnail(frame), motion_thumbnail(np.roll(frame, 40, axis=1)))
    assert still == 0.0 and shifted > 0.02
    assert motion_between(None, motion_thumbnail(frame)) == 0.0
