"""Fake camera and microphone files for headless Chromium, made from real media (the bundled
sample's video; a question spoken by the packaged TTS voice). Shared with `omnistream bench
browser`, which defines them.

Chromium plays ``--use-file-for-fake-video-capture`` (Y4M) and ``--use-file-for-fake-audio-capture``
(WAV) in a loop as if they were a webcam and a microphone.
"""

from __future__ import annotations

from omnistream.bench.browser import fake_camera, fake_microphone

__all__ = ["fake_camera", "fake_microphone"]
