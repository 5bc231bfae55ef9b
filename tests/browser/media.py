"""Fake camera and microphone files for headless Chromium, made from real media.

Chromium plays ``--use-file-for-fake-video-capture`` (Y4M) and ``--use-file-for-fake-audio-capture``
(WAV) in a loop as if they were a webcam and a microphone.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import soundfile

from omnistream.app.replay import DEFAULT_SAMPLE


def fake_camera(
    path: Path, seconds: float = 12.0, width: int = 320, height: int = 180, fps: int = 10
) -> Path:
    """The first ``seconds`` of the bundled sample (the butterfly photo) as a 4:2:0 Y4M file."""
    with av.open(str(DEFAULT_SAMPLE)) as container, open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        stream = container.streams.video[0]
        written = 0
        for frame in container.decode(stream):
            if frame.time is not None and frame.time >= seconds:
                break
            planes = frame.reformat(width=width, height=height, format="yuv420p").to_ndarray()
            out.write(b"FRAME\n" + np.ascontiguousarray(planes, np.uint8).tobytes())
            written += 1
    if not written:
        raise ValueError(f"no video frames decoded from {DEFAULT_SAMPLE}")
    return path


def fake_microphone(path: Path, question: str, silence_after_s: float = 400.0, rate: int = 16000) -> Path:
    """``question`` spoken by the real TTS voice, then silence. Chromium loops the file: the
    silence must outlast an answer, or the repeated question would interrupt it (barge-in)."""
    from omnistream.speech.speak import Voice

    speech = Voice().synthesize(question, sample_rate=rate).astype(np.float32)
    speech *= 0.8 / max(float(np.abs(speech).max()), 1e-6)
    pcm = np.concatenate(
        [np.zeros(rate, np.float32), speech, np.zeros(int(silence_after_s * rate), np.float32)]
    )
    soundfile.write(str(path), pcm, rate, subtype="PCM_16")
    return path
