"""Media sources: decode a recording (PyAV) into timestamped RGB frames and 16 kHz audio chunks.

``MediaReader`` yields ``MediaEvent``s in stream-time order, interleaving video and audio. A file
that cannot be opened raises ``MediaError`` naming the file and the reason; a file that breaks
mid-way ends the stream with a ``MediaError`` after everything decodable was yielded.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

AUDIO_RATE = 16000
AUDIO_CHUNK_S = 0.1


class MediaError(RuntimeError):
    pass


@dataclass(frozen=True)
class MediaEvent:
    kind: str  # "video" | "audio"
    ts: float  # stream seconds of the frame / first audio sample
    data: np.ndarray  # video: uint8 (H, W, 3) RGB; audio: float32 (N,) mono 16 kHz


def _video(path: str, max_fps: float) -> Iterator[MediaEvent]:
    with av.open(path) as container:
        if not container.streams.video:
            return
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        min_gap = 1.0 / max_fps if max_fps > 0 else 0.0
        last = -1e9
        for frame in container.decode(stream):
            if frame.pts is None or frame.time_base is None:
                continue
            ts = float(frame.pts * frame.time_base)
            if ts - last + 1e-6 < min_gap:
                continue
            last = ts
            yield MediaEvent("video", ts, frame.to_ndarray(format="rgb24"))


def _audio(path: str) -> Iterator[MediaEvent]:
    with av.open(path) as container:
        if not container.streams.audio:
            return
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        pending = np.zeros(0, np.float32)
        pending_ts = 0.0
        chunk = int(AUDIO_CHUNK_S * AUDIO_RATE)

        def drain(final: bool) -> Iterator[MediaEvent]:
            nonlocal pending, pending_ts
            while len(pending) >= chunk or (final and len(pending)):
                piece, pending = pending[:chunk], pending[chunk:]
                yield MediaEvent("audio", pending_ts, piece.copy())
                pending_ts += len(piece) / AUDIO_RATE

        for frame in container.decode(container.streams.audio[0]):
            for out in resampler.resample(frame):
                if not len(pending) and out.pts is not None and out.time_base is not None:
                    pending_ts = float(out.pts * out.time_base)
                pending = np.concatenate([pending, out.to_ndarray().reshape(-1).astype(np.float32)])
            yield from drain(final=False)
        for out in resampler.resample(None):
            pending = np.concatenate([pending, out.to_ndarray().reshape(-1).astype(np.float32)])
        yield from drain(final=True)


class MediaReader:
    def __init__(self, path: str | Path, max_fps: float = 0.0):
        self.path = str(path)
        self.max_fps = max_fps
        try:
            with av.open(self.path) as container:
                self.has_video = bool(container.streams.video)
                self.has_audio = bool(container.streams.audio)
                self.duration_s = float(container.duration / av.time_base) if container.duration else 0.0
        except (av.error.FFmpegError, OSError) as exc:
            raise MediaError(f"cannot open {self.path}: {exc}") from None
        if not (self.has_video or self.has_audio):
            raise MediaError(f"{self.path} has neither a video nor an audio stream")

    def __iter__(self) -> Iterator[MediaEvent]:
        streams = []
        if self.has_video:
            streams.append(_video(self.path, self.max_fps))
        if self.has_audio:
            streams.append(_audio(self.path))
        try:
            yield from heapq.merge(*streams, key=lambda event: event.ts)
        except av.error.FFmpegError as exc:
            raise MediaError(f"{self.path} is corrupt or truncated: {exc}") from None
