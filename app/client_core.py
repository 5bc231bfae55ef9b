"""What ``Client`` and ``AsyncClient`` share, with no sockets and no waiting: the requests they
build, how a reply answers a request (and when to send it again), how an answer's events are
read, and what the gateway's own ``Stats`` say about its restarts. ``client.py`` and
``async_client.py`` add only the transport: sending, receiving and waiting, blocking or awaited.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from pathlib import Path

import numpy as np

from omnistream.protocol import config as config_paths
from omnistream.protocol.messages import (
    Ack,
    AnswerDelta,
    AnswerDone,
    Ask,
    AudioChunk,
    Error,
    History,
    HistoryRequest,
    Interrupt,
    Message,
    Stats,
    Status,
    StatusRequest,
    VideoFrame,
    Watch,
)
from omnistream.protocol.sockets import Addresses

RESEND_EVERY_S = 2.0
# The gateway's frame limits (gateway.max_frame_side and gateway.max_frame_bytes, by default): it
# refuses a bigger frame, and one over its socket's message cap (bus.max_message_bytes) would cut
# the client's connection, so ``push_frame`` refuses it here with a clear error; replay and the
# demo downscale theirs (``fit_frame``).
MAX_FRAME_SIDE = 8192
MAX_FRAME_BYTES = 25 << 20
LOST_AFTER_S = 30.0  # after a gateway restart, silence on a turn for this long means it was lost


class ClientError(RuntimeError):
    """The gateway refused a request, did not answer in time, or an answer failed. ``code`` is
    the gateway's error code when it refused (``busy``: retry later), else ""."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


def fit_frame(
    image: np.ndarray, max_bytes: int = MAX_FRAME_BYTES, max_side: int = MAX_FRAME_SIDE
) -> np.ndarray:
    """``image`` (H, W, C) itself when within the gateway's frame limits, else a copy scaled down
    (same aspect) to fit them."""
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width, 1), math.sqrt(max_bytes / max(image.nbytes, 1)))
    if scale >= 1.0:
        return image
    import cv2

    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA)


def default_run_dir() -> Path:
    """``$OMNISTREAM_RUN_DIR``, ``$XDG_RUNTIME_DIR/omnistream``, else ``run`` in the data folder."""
    return config_paths.default_run_dir()


def default_keys_dir() -> Path:
    env = os.environ.get("OMNISTREAM_KEYS_DIR")
    return Path(env) if env else config_paths.default_keys_dir()


def gateway_addresses(run_dir: Path | None, endpoint: str | None, keys_dir: Path | None) -> Addresses:
    """The system of ``run_dir`` (this machine), or the gateway at ``endpoint`` (``tcp://HOST:PORT``,
    with CURVE when ``keys_dir`` is given)."""
    if endpoint:
        return Addresses.remote(endpoint, curve=keys_dir is not None or None)
    return Addresses.load(run_dir or default_run_dir())


def refusal(request: Message, error: Error) -> ClientError:
    return ClientError(
        f"gateway refused {type(request).__name__}: [{error.code}] {error.message}", error.code
    )


def history_request(
    session: str, t0: float, t1: float, kinds: list[str] | None, limit: int, newest: bool = False
) -> HistoryRequest:
    return HistoryRequest(
        session=session,
        request_id=uuid.uuid4().hex,
        t0=t0,
        t1=t1,
        kinds=list(kinds or []),  # type: ignore[arg-type]  # msgspec validates the kinds
        limit=limit,
        newest=newest,
    )


def reply_owner(reply: Message, waiting) -> str | None:
    """Which of the ``waiting`` request ids ``reply`` answers: the one it names, or the only one
    waiting for an error the gateway could not attribute (no request id); None if none."""
    request_id = getattr(reply, "request_id", "")
    if request_id in waiting:
        return request_id
    if isinstance(reply, Error) and not request_id and len(waiting) == 1:
        return next(iter(waiting))
    return None


class Request:
    """One request and its reply: the deadline, when to send it again (status and history
    requests are resent, since repeating them is harmless), and what the reply means."""

    def __init__(
        self, message: Message, expect: type[Message], request_id: str, resend: bool, timeout_s: float
    ):
        self.message = message
        self.expect = expect
        self.request_id = request_id
        self.resend = resend
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.sent_at = time.monotonic()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def sent(self) -> None:
        self.sent_at = time.monotonic()

    def resend_due(self) -> bool:
        return self.resend and time.monotonic() - self.sent_at > RESEND_EVERY_S

    def next_wait(self) -> float:
        """How long to wait for the reply before sending the request again (or giving up)."""
        remaining = self.remaining()
        return min(remaining, RESEND_EVERY_S) if self.resend else remaining

    def answered_by(self, reply: Message) -> bool:
        return reply_owner(reply, (self.request_id,)) is not None

    def result(self, reply: Message) -> Message:
        """The reply this request expects; a ``ClientError`` for a refusal or another reply."""
        if isinstance(reply, Error):
            raise refusal(self.message, reply)
        if not isinstance(reply, self.expect):
            raise ClientError(f"expected {self.expect.__name__}, gateway sent {type(reply).__name__}")
        return reply

    def no_reply(self) -> ClientError:
        return ClientError(f"no reply from the gateway within {self.timeout_s:.0f} s")


class AnswerTurn:
    """One question's answer read from the event stream: its text deltas, its end, its timeout,
    and the turn lost to a gateway restart (nothing heard for ``lost_after_s`` since)."""

    def __init__(self, client: ClientCore, turn: str, timeout_s: float, lost_after_s: float):
        self.client = client
        self.turn = turn
        self.timeout_s = timeout_s
        self.lost_after_s = lost_after_s
        self.deadline = time.monotonic() + timeout_s
        self.restarts_seen = client.gateway_restarted_at
        self.heard = time.monotonic()
        self.finished = False

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check_lost(self) -> None:
        restarted_at = self.client.gateway_restarted_at
        if (
            restarted_at != self.restarts_seen
            and time.monotonic() - max(self.heard, restarted_at) > self.lost_after_s
        ):
            raise ClientError(
                f"the gateway restarted while answering and nothing more came for {self.lost_after_s:.0f} s; ask again"
            )

    def too_late(self) -> ClientError:
        return ClientError(f"no complete answer within {self.timeout_s:.0f} s")

    def take(self, event: Message) -> str | None:
        """The text ``event`` adds to this answer; None for an event that is not this turn's delta
        or end. At the end ``finished`` is set and the client's ``last_done`` holds the
        ``AnswerDone`` (a ``ClientError`` when the answer failed)."""
        if not isinstance(event, AnswerDelta | AnswerDone) or event.turn != self.turn:
            return None
        self.heard = time.monotonic()
        if isinstance(event, AnswerDelta):
            return event.text
        self.client.last_done = event
        self.finished = True
        if event.error:
            raise ClientError(f"answer failed: {event.error}")
        return ""


class ClientCore:
    """The state and messages of a client, without its sockets: the session, the counters of
    dropped frames and audio, the last answer's ``AnswerDone`` and the gateway's process id."""

    def __init__(self, addresses: Addresses, session: str = "default", timeout_s: float = 30.0):
        self.addresses = addresses
        self.session = session
        self.timeout_s = timeout_s
        self.frames_dropped = 0
        self.audio_dropped = 0
        self.last_done: AnswerDone | None = None
        self.gateway_pid = 0  # from the gateway's Stats; a change means it restarted
        self.gateway_restarted_at = 0.0

    def _note_gateway_pid(self, stats: Stats | None) -> None:
        if stats is None or stats.state != "running" or not stats.pid:
            return
        if self.gateway_pid and stats.pid != self.gateway_pid:
            self.gateway_restarted_at = time.monotonic()
        self.gateway_pid = stats.pid

    def _note_event(self, event: Message) -> None:
        if isinstance(event, Stats) and event.stage == "gateway":
            self._note_gateway_pid(event)

    def _unreachable(self) -> ClientError:
        return ClientError(f"gateway at {self.addresses.gateway} unreachable for {self.timeout_s:.0f} s")

    # -- requests (each with the id its reply names) -------------------------------------------

    def _status_request(self) -> Request:
        request_id = uuid.uuid4().hex
        return Request(StatusRequest(request_id=request_id), Status, request_id, True, self.timeout_s)

    def _status_reply(self, reply: Message) -> Status:
        assert isinstance(reply, Status)
        self._note_gateway_pid(reply.stages.get("gateway"))
        return reply

    def _history_request(
        self, t0: float, t1: float, kinds: list[str] | None, limit: int, newest: bool
    ) -> Request:
        request = history_request(self.session, t0, t1, kinds, limit, newest)
        return Request(request, History, request.request_id, True, self.timeout_s)

    def _ask_request(
        self, question: str, ts: float, choices: list[str] | None, speak: bool, mode: str = "full"
    ) -> Request:
        turn = uuid.uuid4().hex
        ask = Ask(
            ts=ts,
            session=self.session,
            turn=turn,
            question=question,
            choices=choices or [],
            speak=speak,
            mode=mode,
        )
        return Request(ask, Ack, turn, False, self.timeout_s)

    def _watch_request(self, condition: str, ts: float) -> Request:
        watch_id = uuid.uuid4().hex
        watch = Watch(ts=ts, session=self.session, watch_id=watch_id, condition=condition)
        return Request(watch, Ack, watch_id, False, self.timeout_s)

    def _interrupt(self, turn: str, ts: float) -> Interrupt:
        return Interrupt(ts=ts, session=self.session, turn=turn, reason="client")

    def _frame(self, image: np.ndarray, ts: float, index: int) -> VideoFrame:
        height, width = image.shape[:2]
        if max(height, width) > MAX_FRAME_SIDE or image.nbytes > MAX_FRAME_BYTES:
            raise ClientError(
                f"a {width}x{height} frame ({image.nbytes / 1e6:.1f} MB) is over the gateway's limits "
                f"({MAX_FRAME_SIDE} px a side, {MAX_FRAME_BYTES / 1e6:.1f} MB): scale it down first "
                "(omnistream.app.client_core.fit_frame)",
                code="too_large",
            )
        return VideoFrame(ts=ts, session=self.session, image=image, index=index)

    def _audio(self, pcm: np.ndarray, sample_rate: int, ts: float, channel: str) -> AudioChunk:
        return AudioChunk(ts=ts, session=self.session, pcm=pcm, sample_rate=sample_rate, channel=channel)  # type: ignore[arg-type]
