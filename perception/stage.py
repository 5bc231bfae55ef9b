"""Perception process: frames in (latest wins), a ``Percept`` per encoded frame, a ``Clip`` per scene.

Frames come from clients through the gateway (``VideoFrame`` on the media bus, drained by a
``MediaReceiver`` thread so no stale frame waits in a queue) or from a source the process reads itself (``perception.source``: a
webcam, a file or a URL; its sound track is published as scene ``AudioChunk``s for speech;
``perception.sources``: several, each its own session). Either way they land in a ``FairSlot``:
one slot per stream, taken round-robin (a batch spans the streams waiting); in a stream's slot a
newer frame replaces one the encoder has not taken, so a slow encoder drops frames and never
queues them. The encoder runs as fast as it can up to
``max_fps`` (wall clock), or at a fixed ``sample_fps`` (stream time).

Detectors run in a background thread: objects on frames sampled at ``objects_fps`` (COCO
classes with positions and colours, people with their poses when ``pose`` is on, tracked into
``Sighting`` events: who entered, what appeared, what was last seen where, how many people were
present), faces and text on keyframes (the first
frame of a scene, then every ``keyframe_every_s``); a closed clip waits for its frames' results
(objects, people, text seen) before it is published. Counts of frames received, encoded and
dropped go out in ``Stats``; source trouble goes out as ``Error`` (``source_ended``,
``source_stalled``, ...) and never stops the stage.

Layout (the stage contract, protocol/runtime.py): ``PerceptionStage`` holds no socket: frames
come to ``handle`` (or, in the process, to ``on_frame`` from the ``MediaReceiver`` thread ``main``
starts and hands it as ``receiver``, stopped by ``close``), ``tick`` does one bounded step
(encode one batch, publish what the detectors found, release the clips they finished, close idle
streams), and everything goes out through ``emit`` (the bus). Its clock (``clock``) paces frames
and closes idle streams, so tests/harness.py's ``run_stage`` drives it on a fake one.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omnistream.perception.clips import ClipSegmenter, describe, top_labels
from omnistream.perception.detectors import (
    Detections,
    DetectorWorker,
    FaceDetector,
    PersonRegistry,
    TextReader,
    motion_between,
    motion_thumbnail,
)
from omnistream.perception.encoder import FrameEncoder, load_encoder
from omnistream.perception.hands import HandReader
from omnistream.perception.live import LiveSource, open_source
from omnistream.perception.objects import ObjectDetector, ObjectSighting
from omnistream.perception.pose import PoseEstimator
from omnistream.perception.receiver import MediaReceiver
from omnistream.perception.sampling import FairSlot, RateLimiter, SampledFrame
from omnistream.perception.sources import AUDIO_RATE
from omnistream.perception.tracks import Tracker, TrackEvent
from omnistream.protocol.config import PerceptionConfig
from omnistream.protocol.messages import (
    AudioChunk,
    Box,
    Clip,
    Error,
    Message,
    Percept,
    Shutdown,
    Sighting,
    VideoFrame,
)
from omnistream.protocol.runtime import BUS, Emit, Runtime, To
from omnistream.protocol.text import clock

log = logging.getLogger("omnistream.perception")

# Close a session's open clip when no frame has come for this long (stream ended or paused).
IDLE_CLOSE_S = 3.0
# A closed clip waits at most this long (wall) for the detectors to finish its keyframes.
MAX_CLIP_HOLD_S = 10.0


def to_box(sighting: ObjectSighting) -> Box:
    """A detection as a ``Box`` normalised to its frame (what a ``Percept`` carries)."""
    (x0, y0, x1, y1), (width, height) = sighting.box, sighting.frame_size
    w, h = max(width, 1), max(height, 1)
    return Box(sighting.label, x0 / w, y0 / h, x1 / w, y1 / h, sighting.score, sighting.colour)


@dataclass
class _SessionState:
    segmenter: ClipSegmenter
    last_frame_wall: float = 0.0
    last_keyframe_ts: float = -float("inf")
    last_object_ts: float = -float("inf")
    last_ts: float = 0.0  # stream time of the latest frame encoded
    tracker: Tracker = field(default_factory=Tracker)
    objects_now: list[str] = field(default_factory=list)
    boxes_now: list[Box] = field(default_factory=list)  # the newest detections as boxes,
    boxes_ts: float | None = None  # made on the frame at this stream time
    thumbnail: np.ndarray | None = None
    stream_limiter: RateLimiter | None = None
    faces_now: list[str] = field(default_factory=list)  # latest detections, carried by percepts
    text_now: list[str] = field(default_factory=list)
    scene_start: float = 0.0  # stream time where the open clip starts
    tracked_scene: float = 0.0  # the scene the tracker's tracks are in (its start)
    annotations: list[Detections] = field(default_factory=list)  # detector results not yet in a clip
    held: list[tuple[Clip, float]] = field(default_factory=list)  # closed clips, wall time closed


def no_emit(message: Message, to: To = BUS) -> bool:
    return True


class PerceptionStage:
    """The stage's logic without sockets: ``handle`` (pushed frames), ``tick`` (encode what is
    waiting, publish detections, clips and source output), ``close``. Built from its
    configuration, the frame encoder and an ``emit`` callable (everything goes to the bus);
    ``counters`` are the runtime's (published in ``Stats``), ``clock`` a monotonic clock."""

    name = "perception"

    def __init__(
        self,
        config: PerceptionConfig,
        encoder: FrameEncoder,
        emit: Emit = no_emit,
        counters: dict[str, float] | None = None,
        *,
        session: str = "default",
        detectors: DetectorWorker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.encoder = encoder
        self.emit = emit
        self.counters: dict[str, float] = counters if counters is not None else defaultdict(float)
        self.clock = clock
        self.session = session
        self.detectors = detectors
        # A slot per stream, taken round-robin; a batch spans the streams waiting (one live
        # stream: batches of one, its newest frame).
        self.slot = FairSlot(capacity=1)
        self.batch_size = max(config.batch_size, 1)
        self.wall_limiter = RateLimiter(config.max_fps)
        # Least recently used first; beyond ``live_sessions`` the first is closed (``_evict``).
        self.sessions: OrderedDict[str, _SessionState] = OrderedDict()
        self.source: LiveSource | None = None  # the first of ``sources``
        self.sources: dict[str, LiveSource] = {}  # session -> the source read for it
        self._audio: deque[tuple[np.ndarray, float, str]] = deque()  # filled by the source threads
        self.rejected: deque[Error] = deque()  # bad frames the media receiver thread refused
        self.receiver: MediaReceiver | None = None
        self._pending_keyframes: set[tuple[str, float]] = set()  # (session, ts) at the detectors
        self._received = self._skipped = self._from_source = 0
        self.idle_close_s = IDLE_CLOSE_S

    # -- inputs ------------------------------------------------------------------------------

    def start_source(self, spec: str, session: str | None = None) -> LiveSource:
        """Read ``spec`` (camera:N, a file or a URL) in this process, in a thread, as ``session``
        (default: the stage's); several sources are sampled in turn (``FairSlot``)."""
        config = self.config
        session = session or self.session
        if session in self.sources:
            raise ValueError(f"perception already reads a source for session {session!r}")
        is_file = not spec.startswith("camera:") and "://" not in spec
        if is_file and not config.source_realtime:  # lossless: the reader waits for the encoder
            self.slot.add(session, capacity=max(config.batch_size, 1), block=True)
            self.wall_limiter = RateLimiter(0.0)
        else:
            self.slot.add(session)
        source = open_source(
            spec,
            lambda image, ts: self._offer_from_source(image, ts, session),
            lambda pcm, ts: self._audio.append((pcm, ts, session)),
            realtime=config.source_realtime,
            loop=config.source_loop,
            sample_fps=config.sample_fps or (0.0 if config.source_realtime else config.max_fps),
            reconnect_s=config.reconnect_s,
            stall_s=config.stall_s,
        )
        self.sources[session] = source
        self.source = self.source or source
        source.start()
        return source

    def _offer_from_source(self, image: np.ndarray, ts: float, session: str) -> bool:
        source = self.sources[session]
        self._from_source += 1  # each source thread adds here: a count, a lost increment is harmless
        frame = SampledFrame(
            image,
            ts,
            index=source.frames + 1,
            session=session,
            source=source.name,  # its credentials redacted
        )
        while not self.slot.put(frame, timeout_s=0.5):
            if self.slot.closed or source.stopping:
                return False
        return True

    def handle(self, message: Message) -> None:
        if isinstance(message, VideoFrame):
            self.on_frame(message)
        elif isinstance(message, Shutdown):
            self.flush_all()

    def on_frame(self, frame: VideoFrame) -> None:
        """A frame pushed by a client: checked, then offered to the slot (latest wins).

        Called from the ``MediaReceiver`` thread in the process (from ``handle`` in tests).
        """
        self._received += 1
        image = frame.image
        if image.dtype.name != "uint8" or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 8:
            raise ValueError(
                f"VideoFrame.image must be uint8 (H, W, 3) with H, W >= 8, got {image.dtype} {image.shape}"
            )
        self.slot.put(SampledFrame(image, frame.ts, frame.index, frame.session, frame.source))

    def _due(self, frame: SampledFrame) -> bool:
        """With a fixed ``sample_fps``: is this frame's stream time due? (else it is dropped)"""
        limiter = self._state(frame.session).stream_limiter
        if limiter is not None and not limiter.admit(frame.ts):
            self._skipped += 1
            return False
        return True

    def _state(self, session: str) -> _SessionState:
        if session in self.sessions:
            self.sessions.move_to_end(session)
        else:
            # Every source read here stays live (its stream never pauses), pushed sessions share the rest.
            while len(self.sessions) >= max(self.config.live_sessions, len(self.sources) + 1, 1):
                self._evict(next(iter(self.sessions)))
            segmenter = ClipSegmenter(
                classes=self.encoder.classes,
                cut_distance=self.config.scene_cut_distance,
                cut_frames=self.config.scene_cut_frames,
                max_clip_s=self.config.max_clip_s,
                top_k=self.config.top_labels,
                min_score=self.config.min_label_score,
                session=session,
            )
            limiter = RateLimiter(self.config.sample_fps) if self.config.sample_fps > 0 else None
            tracker = Tracker(max_missed_s=self.config.track_missed_s)
            self.sessions[session] = _SessionState(segmenter, stream_limiter=limiter, tracker=tracker)
        return self.sessions[session]

    # -- the loop ----------------------------------------------------------------------------

    def tick(self) -> bool:
        """One step: at most one batch encoded. True while frames wait that may be encoded at
        once (no ``max_fps`` pacing): the loop then takes new messages without waiting."""
        self._publish_source_output()
        while self.rejected:
            self.emit(self.rejected.popleft())
            self.counters["rejected"] += 1
        if len(self.slot) and self.wall_limiter.admit(self.clock()):
            frames = [frame for frame in self.slot.take(self.batch_size) if self._due(frame)]
            shapes: dict[tuple[int, ...], list[SampledFrame]] = {}
            for frame in frames:  # a batch is one shape: streams of other sizes go in their own
                shapes.setdefault(frame.image.shape, []).append(frame)
            for batch in shapes.values():
                self.encode(batch)
        self._collect_detections()
        self._release_clips()
        now = self.clock()
        for session, state in list(self.sessions.items()):
            if state.last_frame_wall and now - state.last_frame_wall > self.idle_close_s:
                self._flush(session, wait=False)
        dropped = self.slot.dropped + self._skipped + self.counters.get("dropped_in", 0.0)
        received = self._received + self._from_source + self.counters.get("dropped_in", 0.0)
        self.counters["frames_received"] = received
        self.counters["frames_dropped"] = dropped
        return bool(len(self.slot)) and not self.wall_limiter.period

    def encode(self, frames: list[SampledFrame]) -> None:
        """Encode one batch and publish a ``Percept`` per frame (and the clips they close)."""
        features, probs = self.encoder.encode([f.image for f in frames])
        for frame, feature, prob in zip(frames, features, probs, strict=True):
            state = self._state(frame.session)
            thumbnail = motion_thumbnail(frame.image)
            motion = motion_between(state.thumbnail, thumbnail)
            state.thumbnail = thumbnail
            closed = state.segmenter.push(frame.ts, feature, prob, motion)
            clip_id = state.segmenter.current_clip_id
            if closed:  # a new scene: what the detectors saw in the last one no longer holds
                state.faces_now, state.text_now, state.objects_now = [], [], []
                state.scene_start = closed[-1].ts
            now = self.clock()
            state.held += [(clip, now) for clip in closed]
            state.last_ts = frame.ts
            if self.detectors is not None:
                keyframe = bool(closed) or frame.ts - state.last_keyframe_ts >= self.config.keyframe_every_s
                objects_due = (
                    self.detectors.objects is not None
                    and self.config.objects_fps > 0
                    and frame.ts - state.last_object_ts >= 1.0 / self.config.objects_fps
                )
                if keyframe or objects_due:
                    self._submit_keyframe(state, frame, keyframe)
            labels = top_labels(
                prob, self.encoder.classes, self.config.top_labels, self.config.min_label_score
            )
            self.emit(
                Percept(
                    ts=frame.ts,
                    session=frame.session,
                    features=feature,
                    labels=labels,
                    text_seen=list(state.text_now),
                    faces=list(state.faces_now),
                    objects=list(state.objects_now),
                    boxes=list(state.boxes_now),
                    boxes_ts=state.boxes_ts,
                    clip_id=clip_id,
                    frame_index=frame.index,
                    latency_s=round(time.monotonic() - frame.arrived, 4),
                )
            )
            self.counters["frames_encoded"] += 1
            state.last_frame_wall = self.clock()
        self._release_clips()

    # -- detectors and clips -------------------------------------------------------------------

    def _submit_keyframe(self, state: _SessionState, frame: SampledFrame, keyframe: bool = True) -> None:
        assert self.detectors is not None
        if keyframe:
            state.last_keyframe_ts = frame.ts
        state.last_object_ts = frame.ts
        tag = (frame.session, frame.ts)
        self._pending_keyframes.add(tag)
        replaced = self.detectors.submit(frame.image, frame.ts, frame.session, tag, keyframe=keyframe)
        self._pending_keyframes.discard(replaced)
        self.counters["keyframes" if keyframe else "object_frames"] += 1

    def _collect_detections(self) -> None:
        if self.detectors is None:
            return
        for found in self.detectors.results():
            self._pending_keyframes.discard(found.tag)
            state = self.sessions.get(found.session)
            if state is None:  # the session was closed (``_evict``) while they ran
                self.counters["detections_dropped"] += 1
                continue
            # Kept by stream time: which clip a keyframe belongs to is only known once the
            # segmenter's hysteresis has decided whether its scene change was real.
            state.annotations.append(found)
            if found.objects is not None and found.ts >= state.tracked_scene:
                if state.scene_start > state.tracked_scene:
                    # A new scene: the last one's tracks end at the cut (the same ball in another
                    # picture is another sighting, not the same track moving).
                    for event in state.tracker.flush(state.scene_start):
                        self._publish_sighting(found.session, event)
                    state.tracked_scene = state.scene_start
                for event in state.tracker.update(found.ts, found.objects):
                    self._publish_sighting(found.session, event)
                if found.ts >= state.scene_start:
                    state.objects_now = [sighting.describe() for sighting in found.objects]
                if state.boxes_ts is None or found.ts >= state.boxes_ts:
                    state.boxes_ts, state.boxes_now = found.ts, [to_box(s) for s in found.objects]
                self.counters["objects_seen"] += len(found.objects)
            if found.keyframe and found.ts >= state.scene_start:
                state.faces_now = [face.label() for face in found.faces]
                state.text_now = list(found.text)
            self.counters["detections"] += 1
            self.counters["faces_seen"] += len(found.faces)
            self.counters["detector_s"] += found.seconds

    def _release_clips(self, force: bool = False) -> None:
        now = self.clock()
        for session, state in self.sessions.items():
            while state.held:
                clip, closed_at = state.held[0]
                waiting = any(s == session and clip.t0 <= t <= clip.ts for s, t in self._pending_keyframes)
                if waiting and not force and now - closed_at < MAX_CLIP_HOLD_S:
                    break
                state.held.pop(0)
                self._publish_clip(state, clip)

    def _publish_clip(self, state: _SessionState, clip: Clip) -> None:
        """Attach the people and text the detectors found in [t0, ts], describe, publish."""
        mine = [found for found in state.annotations if found.ts <= clip.ts]
        state.annotations = [found for found in state.annotations if found.ts > clip.ts]
        people: dict[int, str] = {}
        for found in sorted((f for f in mine if f.ts >= clip.t0), key=lambda f: f.ts):
            for face in found.faces:
                back = f"back, last seen {clock(found.ts - face.back_after_s)}" if face.back_after_s else ""
                people.setdefault(face.person_id, "new" if face.new else back)
            clip.text_seen += [line for line in found.text if line not in clip.text_seen]
        clip.faces = [f"person {pid}" for pid in sorted(people)]
        notes = [
            f"person {pid} ({note})" if note else f"person {pid}" for pid, note in sorted(people.items())
        ]
        clip.objects = clip_objects([f for f in mine if f.ts >= clip.t0 and f.objects is not None])
        colours = [f.colours for f in mine if f.ts >= clip.t0 and f.colours]
        colour = max(set(colours), key=colours.count) if colours else ""  # the most frequent
        clip.description = describe(clip.labels, notes, clip.text_seen, clip.motion, clip.objects, colour)
        self.emit(clip)
        self.counters["clips"] += 1

    def _publish_sighting(self, session: str, event: TrackEvent) -> None:
        self.emit(
            Sighting(
                ts=event.ts,
                t0=event.t0,
                session=session,
                label=event.label,
                event=event.kind,  # type: ignore[arg-type]
                text=event.text,
                track_id=event.track_id,
                count=event.count,
            )
        )
        self.counters["sightings"] += 1

    def _publish_source_output(self) -> None:
        while self._audio:
            pcm, ts, session = self._audio.popleft()
            self.emit(AudioChunk(ts=ts, session=session, pcm=pcm, sample_rate=AUDIO_RATE, channel="scene"))
        for session, source in self.sources.items():
            self._publish_source_events(session, source)

    def _publish_source_events(self, session: str, source: LiveSource) -> None:
        for event in source.events():
            self.counters[f"source_{event.kind}"] += 1
            log.info(
                "source %s",
                event.kind,
                extra={"stage": self.name, "source": event.source, "detail": event.detail},
            )
            if event.kind != "opened":
                message = f"perception source {event.source}: {event.kind}" + (
                    f" ({event.detail})" if event.detail else ""
                )
                self.emit(Error(code=f"source_{event.kind}", message=message, session=session))

    def _flush(self, session: str, wait: bool = True) -> None:
        """Close the session's open clip. ``wait``: block until the detectors are done (at the
        end); otherwise the clip is held until they are, and the loop goes on."""
        state = self.sessions.get(session)
        if state is None:
            return
        if state.segmenter.has_open_clip():
            state.held.append((state.segmenter.close(), self.clock()))
        if wait and self.detectors is not None:
            self.detectors.wait_idle(MAX_CLIP_HOLD_S)
            self._collect_detections()
        self._release_clips(force=wait)
        for event in state.tracker.flush(state.last_ts):  # the stream stopped: tracks end here
            self._publish_sighting(session, event)
        state.objects_now = []
        state.last_frame_wall = 0.0

    def _evict(self, session: str) -> None:
        """Close the session (``perception.live_sessions`` reached): its open clip and the clips
        waiting for detectors are published now (with what the detectors found so far), its
        tracks end, and its state is forgotten. A frame of it later starts afresh."""
        self._collect_detections()
        self._flush(session, wait=False)
        state = self.sessions.pop(session)
        for clip, _ in state.held:
            self._publish_clip(state, clip)
        self._pending_keyframes = {tag for tag in self._pending_keyframes if tag[0] != session}
        self.counters["sessions_closed"] += 1

    def close(self) -> None:
        """Stop taking frames (the receiver, the sources), publish every open clip (waiting for
        the detectors), stop the detectors."""
        if self.receiver is not None:
            self.receiver.stop()
        if self.sources:
            self.slot.close()
            for source in self.sources.values():
                source.stop()
        self.flush_all()
        if self.detectors is not None:
            self.detectors.close()

    stop = close

    def flush_all(self) -> None:
        for session in list(self.sessions):
            self._flush(session)


def clip_objects(found: list[Detections]) -> list[str]:
    """What the object detector saw in a clip, most frequent first: each class once, as described
    at its best detection, with the most seen at once ("2 people: person in a blue shirt (left)")."""
    best: dict[str, tuple[float, str]] = {}
    frames: dict[str, int] = {}
    most: dict[str, int] = {}
    for detections in found:
        counts: dict[str, int] = {}
        for sighting in detections.objects or []:
            counts[sighting.label] = counts.get(sighting.label, 0) + 1
            if sighting.score > best.get(sighting.label, (0.0, ""))[0]:
                best[sighting.label] = (sighting.score, sighting.describe())
        for label, n in counts.items():
            frames[label] = frames.get(label, 0) + 1
            most[label] = max(most.get(label, 0), n)
    out = []
    for label in sorted(best, key=lambda name: (-frames[name], -best[name][0])):
        many = most[label]
        plural = "people" if label == "person" else f"{label}s"
        out.append(f"{many} {plural}: {best[label][1]}" if many > 1 else best[label][1])
    return out[:8]


def build_detectors(config: PerceptionConfig) -> DetectorWorker | None:
    if not (config.faces or config.ocr or config.objects_fps > 0):
        return None
    faces = FaceDetector(PersonRegistry(config.face_match_distance)) if config.faces else None
    reader = objects = pose = hands = None
    if config.ocr:
        try:
            reader = TextReader()
        except ModuleNotFoundError as exc:  # the detectors extra is not installed
            log.warning("perception.ocr is on but text in scene cannot be read: %s", exc)
    if config.objects_fps > 0:
        try:
            objects = ObjectDetector(min_score=config.object_min_score, threads=config.threads)
        except (ModuleNotFoundError, FileNotFoundError) as exc:  # labels only, as before
            log.warning("perception.objects_fps > 0 but objects cannot be detected: %s", exc)
    if objects is not None and config.pose:
        try:
            pose = PoseEstimator(threads=config.threads)
        except (ModuleNotFoundError, FileNotFoundError) as exc:  # objects without poses
            log.warning("perception.pose is on but poses cannot be estimated: %s", exc)
    if objects is not None and config.hands:
        try:
            hands = HandReader(threads=config.threads)
        except (ModuleNotFoundError, FileNotFoundError) as exc:  # objects without hands
            log.warning("perception.hands is on but hands cannot be found: %s", exc)
    if faces is None and reader is None and objects is None:
        return None
    return DetectorWorker(faces, reader, objects, pose, hands)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnistream-perception")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    runtime = Runtime("perception", args.run_dir)
    config = runtime.config.perception
    encoder = load_encoder(config.encoder, threads=config.threads, device=config.device)
    stage = PerceptionStage(
        config,
        encoder,
        runtime.emit,
        runtime.counters,
        session=runtime.config.session,
        detectors=build_detectors(config),
    )
    bus = runtime.config.bus
    # Pushed frames straight off the media bus, in a thread, so no stale frame waits in a queue.
    stage.receiver = MediaReceiver(
        runtime.ctx,
        runtime.addresses.media_out,
        stage.on_frame,
        stage.rejected.append,
        bus.frame_hwm,
        bus.max_message_bytes,
    ).start()
    for session, spec in runtime.config.source_sessions():  # perception.source and .sources
        stage.start_source(spec, session)
    # A short poll: frames from an in-process source wake nothing, the tick must come round.
    runtime.run(stage, tick=stage.tick, poll_s=0.005)


if __name__ == "__main__":
    main()
