"""Sources the perception process reads itself: a webcam (OpenCV) or a file/URL (PyAV).

Each source decodes in its own thread and hands RGB frames to ``on_frame`` (the stage's
``FrameSlot``: latest wins when live, blocking when a file is read as fast as possible) and
16 kHz mono audio to ``on_audio`` (the stage publishes it for speech). What happens to the source
is reported as ``SourceEvent``s, never raised: it opened, ended, failed (a corrupt or truncated
file: everything decoded before the damage was delivered), reconnected, stalled (``watch``: no
frame for ``stall_s``) or resumed. A URL or camera that fails or ends is reopened every
``reconnect_s``; a file ends (or restarts with ``loop``).

A URL's credentials (``rtsp://user:password@host``, ``?token=...``) never leave the process: the
source's ``name`` (in events, ``Error`` messages to every client, logs, frames' ``source``) and
every event's detail have them replaced by ``***`` (``redact``).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import av
import cv2
import numpy as np

from omnistream.perception.sampling import RateLimiter
from omnistream.perception.sources import AUDIO_CHUNK_S, AUDIO_RATE

FrameSink = Callable[[np.ndarray, float], bool]  # (uint8 (H, W, 3) RGB, stream s) -> accepted
AudioSink = Callable[[np.ndarray, float], None]  # (float32 (N,) 16 kHz mono, stream s of 1st sample)


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_.-]*(?:token|key|secret|passw(?:or)?d|pass|pwd|auth|sig(?:nature)?|credential)"
    r"[A-Za-z0-9_.-]*)=)[^&;#\s]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with the credentials of any URL in it replaced by ``***``: the user info
    (``rtsp://user:pass@cam`` -> ``rtsp://***@cam``) and query parameters named like secrets
    (``token``, ``api_key``, ``password``, ``sig``, ...)."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}***", text)


@dataclass(frozen=True)
class SourceEvent:
    kind: str  # "opened" | "ended" | "error" | "reconnected" | "stalled" | "resumed"
    source: str
    detail: str = ""


class LiveSource:
    """Thread plumbing shared by the sources; subclasses implement ``_read_once``."""

    reconnects = False  # reopen after an end or a failure

    def __init__(
        self,
        spec: str,
        on_frame: FrameSink,
        on_audio: AudioSink | None = None,
        reconnect_s: float = 2.0,
        stall_s: float = 5.0,
    ):
        self.spec = spec
        self.name = redact(spec)  # what may be shown: events, logs, frames' source
        self.on_frame = on_frame
        self.on_audio = on_audio
        self.reconnect_s = reconnect_s
        self.stall_s = stall_s
        self.frames = 0
        self.last_frame_wall = 0.0
        self.started_wall = 0.0
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._events: list[SourceEvent] = []
        self._lock = threading.Lock()
        self._stalled = False
        self._thread = threading.Thread(target=self._run, name=f"source {self.name}", daemon=True)

    def start(self) -> LiveSource:
        self.started_wall = time.monotonic()
        self._thread.start()
        return self

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _read_once(self, attempt: int) -> None:
        """Open the source and deliver until it ends (return) or fails (raise)."""
        raise NotImplementedError

    def _report(self, kind: str, detail: str = "") -> None:
        with self._lock:
            self._events.append(SourceEvent(kind, self.name, redact(detail)))

    def _deliver(self, image: np.ndarray, ts: float) -> bool:
        accepted = self.on_frame(image, ts)
        self.frames += 1
        self.last_frame_wall = time.monotonic()
        return accepted

    def events(self) -> list[SourceEvent]:
        """Events since the last call, with a "stalled"/"resumed" check against ``stall_s``."""
        quiet_since = self.last_frame_wall or self.started_wall
        if not self.finished.is_set() and self.started_wall:
            stalled = time.monotonic() - quiet_since > self.stall_s
            if stalled != self._stalled:
                self._stalled = stalled
                self._report(
                    "stalled" if stalled else "resumed", f"no frame for {self.stall_s:g} s" if stalled else ""
                )
        with self._lock:
            events, self._events = self._events, []
        return events

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                self._read_once(attempt)
                self._report("ended", f"{self.frames} frames so far")
            except (ValueError, OSError) as exc:  # ours and PyAV's/OpenCV's name the source already
                self._report("error", str(exc))
            except Exception as exc:  # reported, never fatal: the stage keeps running
                self._report("error", f"{self.name}: {type(exc).__name__}: {exc}")
            attempt += 1
            if not self.reconnects or self._stop.wait(self.reconnect_s):
                break
        self.finished.set()


def _camera_device(spec: str) -> int | str:
    target = spec.removeprefix("camera:")
    return int(target) if target.isdigit() else target


class CameraSource(LiveSource):
    """``camera:N`` (webcam index N) or ``camera:/dev/video2``; OpenCV, BGR converted to RGB.

    Stream time is wall-clock seconds since the source started.
    """

    reconnects = True

    def _read_once(self, attempt: int) -> None:
        capture = cv2.VideoCapture(_camera_device(self.spec))
        try:
            if not capture.isOpened():
                raise OSError(f"cannot open camera {self.spec}")
            self._report("reconnected" if attempt else "opened")
            while not self._stop.is_set():
                ok, bgr = capture.read()
                if not ok:
                    return
                self._deliver(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), time.monotonic() - self.started_wall)
        finally:
            capture.release()


class StreamSource(LiveSource):
    """A file or URL through PyAV: video frames plus the audio track, in one demuxing pass.

    ``realtime`` paces delivery at the stream's own clock (a recording plays as if live; a
    pause of more than a second is not caught up). Without it every frame that ``sample_fps``
    admits (stream time; 0 = all) is delivered as fast as ``on_frame`` accepts it. Stream time
    is the container's time; after a reconnect or a loop it continues from where it was.
    """

    def __init__(
        self,
        spec: str,
        on_frame: FrameSink,
        on_audio: AudioSink | None = None,
        *,
        realtime: bool = True,
        loop: bool = False,
        sample_fps: float = 0.0,
        reconnect_s: float = 2.0,
        stall_s: float = 5.0,
    ):
        super().__init__(spec, on_frame, on_audio, reconnect_s, stall_s)
        self.is_url = "://" in spec
        self.reconnects = self.is_url or loop
        self.realtime = realtime
        self.sample_fps = sample_fps
        self._next_ts = 0.0  # stream time where the next (re)opened pass starts

    def _open(self) -> av.container.InputContainer:
        options = {"rtsp_transport": "tcp"} if self.spec.startswith("rtsp") else {}
        # Network reads give up after stall_s, so a dead server ends the pass and we reconnect.
        return av.open(self.spec, options=options, timeout=(10.0, self.stall_s) if self.is_url else None)

    def _read_once(self, attempt: int) -> None:
        with self._open() as container:
            self._report("reconnected" if attempt and self.is_url else "opened")
            video = container.streams.video[0] if container.streams.video else None
            audio = container.streams.audio[0] if container.streams.audio and self.on_audio else None
            if video is None and audio is None:
                raise ValueError(f"{self.spec} has neither a video nor an audio stream")
            if video is not None:
                video.thread_type = "AUTO"
            resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
            pending, pending_ts = np.zeros(0, np.float32), 0.0
            chunk = int(AUDIO_CHUNK_S * AUDIO_RATE)
            limiter = RateLimiter(self.sample_fps)
            offset: float | None = None
            pass_end = self._next_ts
            last_pts = -float("inf")
            wall0 = stream0 = 0.0
            try:
                for packet in container.demux(*(s for s in (video, audio) if s is not None)):
                    if self._stop.is_set():
                        return
                    for frame in packet.decode():
                        if not isinstance(frame, av.VideoFrame | av.AudioFrame) or frame.pts is None:
                            continue
                        assert frame.time_base is not None  # decoded frames carry their stream's
                        pts = float(frame.pts * frame.time_base)
                        if offset is None:  # a file starts at its own time, a URL at time since start
                            start = (
                                max(self._next_ts, time.monotonic() - self.started_wall)
                                if self.is_url
                                else self._next_ts
                            )
                            offset = start - pts if (attempt or self.is_url or pts < 0) else 0.0
                            wall0, stream0 = time.monotonic(), pts + offset
                        ts = pts + offset
                        pass_end, last_pts = max(pass_end, ts), max(last_pts, pts)
                        if isinstance(frame, av.AudioFrame):
                            assert self.on_audio is not None  # audio is only demuxed with a sink
                            for out in resampler.resample(frame):
                                if not len(pending):
                                    pending_ts = ts
                                pending = np.concatenate([pending, out.to_ndarray().reshape(-1)])
                            while len(pending) >= chunk:
                                self.on_audio(pending[:chunk].copy(), pending_ts)
                                pending, pending_ts = pending[chunk:], pending_ts + AUDIO_CHUNK_S
                            continue
                        if self.realtime:
                            lag = (ts - stream0) - (time.monotonic() - wall0)
                            if lag > 0:
                                self._stop.wait(lag)
                            elif lag < -1.0:  # fell behind (a stall): restart the clock
                                wall0, stream0 = time.monotonic(), ts
                        elif not limiter.admit(ts):
                            continue
                        self._deliver(frame.to_ndarray(format="rgb24"), ts)
                # FFmpeg ends a cut-off file quietly: compare with the duration it declares.
                declared = (
                    container.duration / av.time_base if container.duration and not self.is_url else 0.0
                )
                declared_end = (container.start_time or 0) / av.time_base + declared
                if declared and last_pts < declared_end - 1.0:
                    raise ValueError(
                        f"{self.spec} is truncated: it ends at {last_pts:.1f} s of the {declared:.1f} s it declares"
                    )
            except av.error.FFmpegError as exc:
                damage = "broke off" if self.is_url else "is corrupt or truncated"
                raise ValueError(f"{self.spec} {damage} after {pass_end:.2f} s: {exc}") from None
            finally:
                if len(pending) and self.on_audio is not None:
                    self.on_audio(pending, pending_ts)
                frame_gap = (
                    1.0 / float(video.average_rate) if video is not None and video.average_rate else 0.04
                )
                self._next_ts = pass_end + frame_gap


def open_source(spec: str, on_frame: FrameSink, on_audio: AudioSink | None, **options) -> LiveSource:
    """``camera:N`` -> ``CameraSource``; anything else (path, URL) -> ``StreamSource``.

    ``options``: realtime, loop, sample_fps, reconnect_s, stall_s (cameras take the last two).
    """
    if spec.startswith("camera:"):
        keep = {k: v for k, v in options.items() if k in ("reconnect_s", "stall_s")}
        return CameraSource(spec, on_frame, on_audio, **keep)
    return StreamSource(spec, on_frame, on_audio, **options)
