"""Perception process: frames in (latest wins), ``Percept`` per encoded frame, ``Clip`` per scene.

Frames arrive on a media socket with a small high-water mark and the runtime keeps only the
newest, so a slow encoder drops frames instead of queueing them. ``max_fps`` caps the encode
rate; received/encoded/dropped counts go out in ``Stats``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from omnistream.perception.clips import ClipSegmenter, top_labels
from omnistream.perception.encoder import FrameEncoder, load_encoder
from omnistream.protocol.config import PerceptionConfig
from omnistream.protocol.messages import Message, Percept, Shutdown, VideoFrame
from omnistream.protocol.runtime import Runtime

log = logging.getLogger("omnistream.perception")

# Close a session's open clip when no frame has come for this long (stream ended or paused).
IDLE_CLOSE_S = 3.0


class PerceptionStage:
    name = "perception"

    def __init__(self, config: PerceptionConfig, encoder: FrameEncoder, publish, counters: dict[str, float]):
        self.config = config
        self.encoder = encoder
        self.publish = publish
        self.counters = counters
        self.segmenters: dict[str, ClipSegmenter] = {}
        self.last_frame_wall: dict[str, float] = {}
        self._last_encode = 0.0

    def _segmenter(self, session: str) -> ClipSegmenter:
        if session not in self.segmenters:
            self.segmenters[session] = ClipSegmenter(
                classes=self.encoder.classes,
                cut_distance=self.config.scene_cut_distance,
                cut_frames=self.config.scene_cut_frames,
                max_clip_s=self.config.max_clip_s,
                top_k=self.config.top_labels,
                min_score=self.config.min_label_score,
                session=session,
            )
        return self.segmenters[session]

    def handle(self, message: Message) -> None:
        if isinstance(message, VideoFrame):
            self.on_frame(message)
        elif isinstance(message, Shutdown):
            self.flush_all()

    def on_frame(self, frame: VideoFrame) -> None:
        self.counters["frames_received"] += 1
        image = frame.image
        if image.dtype.name != "uint8" or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 8:
            raise ValueError(
                f"VideoFrame.image must be uint8 (H, W, 3) with H, W >= 8, got {image.dtype} {image.shape}"
            )
        now = time.monotonic()
        if self.config.max_fps > 0 and now - self._last_encode < 1.0 / self.config.max_fps:
            self.counters["frames_skipped"] += 1
            return
        self._last_encode = now
        features, probs = self.encoder.encode([image])
        segmenter = self._segmenter(frame.session)
        for clip in segmenter.push(frame.ts, features[0], probs[0]):
            self.publish(clip)
            self.counters["clips"] += 1
        labels = top_labels(
            probs[0], self.encoder.classes, self.config.top_labels, self.config.min_label_score
        )
        self.publish(
            Percept(
                ts=frame.ts,
                session=frame.session,
                features=features[0],
                labels=labels,
                clip_id=segmenter.current_clip_id,
                frame_index=frame.index,
                latency_s=time.monotonic() - now,
            )
        )
        self.counters["frames_encoded"] += 1
        self.last_frame_wall[frame.session] = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        for session, last in list(self.last_frame_wall.items()):
            if now - last > IDLE_CLOSE_S:
                self._flush(session)

    def _flush(self, session: str) -> None:
        segmenter = self.segmenters.get(session)
        if segmenter is not None and segmenter.has_open_clip():
            self.publish(segmenter.close())
            self.counters["clips"] += 1
        self.last_frame_wall.pop(session, None)

    def stop(self) -> None:
        self.flush_all()

    def flush_all(self) -> None:
        for session in list(self.segmenters):
            self._flush(session)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnistream-perception")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    runtime = Runtime("perception", args.run_dir)
    config = runtime.config.perception
    encoder = load_encoder(config.encoder, threads=config.threads)
    stage = PerceptionStage(config, encoder, runtime.publish, runtime.counters)
    runtime.subscribe(VideoFrame)
    runtime.run(stage, tick=stage.tick)


if __name__ == "__main__":
    main()
