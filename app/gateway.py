"""Gateway process: the one door for clients.

Clients send requests to a ROUTER (``Ask``, ``VideoFrame``, ``AudioChunk``, ``Interrupt``,
``Watch``, ``StatusRequest``, ``HistoryRequest``) and subscribe to a PUB that re-publishes what
they need from the bus (answers, audio, transcripts, percepts, clips, sightings, alerts, stats,
errors). An ``Ask`` is acknowledged with an ``Ack``; a ``Watch`` is passed to memory, which
checks and stores it and answers the ``Ack`` (or an ``Error`` naming why not) that is relayed.
A ``HistoryRequest`` is forwarded to memory's ROUTER without blocking and its ``History``
relayed back to the client that asked (an ``Error`` with code ``unavailable`` if memory does not
answer in time; at most ``gateway.max_pending_history`` wait at once, more are refused with
``busy``). Requests read in one step are served round robin across clients, so one client's
flood cannot starve another. A malformed request is answered with an ``Error`` naming the
problem and the gateway keeps serving.

Reliability: every accepted ``Ask`` is tracked until its ``AnswerDone``. When the reasoning
process restarts (a new pid in its ``Stats``), questions it had not started are sent again to the
new one and questions it was answering end with an ``AnswerDone`` carrying an error; when no
answer makes progress for ``gateway.ask_timeout_s`` every waiting question ends the same way, so
a client never waits forever. At most ``gateway.max_pending_asks`` questions wait at once; more
are refused with ``Error`` ``busy`` (retry later). Audio beyond ``gateway.max_audio_speed`` x real
time per session and channel is dropped (counted in ``audio_dropped``); each client connection
(beyond loopback: each client key) also has its own budget of audio seconds and frames per second
(``gateway.client_*``), so new session names buy no more (``audio_dropped``,
``frames_dropped_rate``); frames go to the media bus, which drops what a slow perception cannot take.
A client may name at most ``gateway.sessions_per_client`` sessions (each counts until it is idle
for ``gateway.client_session_idle_s``); a request naming one more is answered with ``Error``
``too_many_sessions`` (every stage keeps state per session).

Bounds: every string and list field of a client request has a limit (``check_request``; a chunk,
a frame and the lists included), and a request beyond one is answered with an ``Error``
``invalid`` naming the field and the limit. One receive step reads at most
``bus.poll_max_messages`` requests; a request whose handling fails is answered with an ``Error``
``stage_error`` and the gateway keeps serving.

Security: beyond loopback (``gateway.host``) both client sockets are CURVE servers and a ZAP
handler admits only the authorised client keys (``protocol.security``).

Layout (the stage contract, protocol/runtime.py): ``GatewayStage`` holds every rule above and no
socket: a client's request comes to its ``handle`` as a ``ClientRequest`` (the connection's
identity, whom it is charged to, its frames), memory's replies as ``MemoryReply``, and what it
sends goes through ``emit`` (``to=client(identity)``, ``CLIENTS``, ``MEMORY`` or the bus).
``GatewaySockets`` is the thin socket side: the ROUTER and PUB clients connect to (read round
robin), CURVE, and the channels it lends the runtime's ``emit``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import msgspec
import numpy as np
import zmq

from omnistream.app.cluster import owner
from omnistream.protocol.codec import ProtocolError, decode
from omnistream.protocol.config import Config, GatewayConfig
from omnistream.protocol.messages import (
    PREEMPTION_DISCARDED,
    WATCH_CONDITION_CHARS,
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
    Percept,
    RecordKind,
    Stats,
    Status,
    StatusRequest,
    VideoFrame,
    Watch,
)
from omnistream.protocol.routes import client_requests, relayed_to_clients
from omnistream.protocol.runtime import BUS, CLIENTS, MEMORY, Emit, MemoryReply, Runtime, To, client
from omnistream.protocol.security import (
    SecurityError,
    load_server_keys,
    make_curve_server,
    start_authenticator,
)
from omnistream.protocol.sockets import make_socket, read_bounded, send
from omnistream.speech.rates import sample_rate_problem

log = logging.getLogger("omnistream.gateway")

CLIENT_REQUESTS = client_requests()  # protocol/routes.py
FORWARDED_TO_CLIENTS = relayed_to_clients()
# Percepts go to clients (the demo's preview of what perception saw) once per object detection,
# or at most once a second when nothing is detected, without their feature vectors: not every
# encoded frame (up to 20/s, ~5 KB each).
CLIENT_PERCEPT_S = 1.0
MAX_RELAYED_SESSIONS = 1024
MAX_QUESTION_CHARS = 2000
MAX_CHOICES, MAX_CHOICE_CHARS = 26, 500
MAX_ID_CHARS = 128  # session, turn, watch_id, request_id
MAX_HISTORY_ITEMS = 5000
RECORD_KINDS = get_args(RecordKind)  # HistoryRequest.kinds: each at most once
MAX_SOURCE_CHARS = 128  # VideoFrame.source
HISTORY_TIMEOUT_S = 10.0  # history requests and watches memory has not answered by then fail
MAX_PENDING_WATCHES = 256
MIN_AUDIO_RATE, MAX_AUDIO_RATE = 4000, 192000
RESEND_DELAY_S = 0.5  # after a new reasoning pid: its subscriptions reach the bus first
ALLOWED_CONTROL = frozenset("\t\n\r")
CLIENT_QUEUE = 32  # requests waiting in the gateway per client connection (see GatewayStage)
MAX_BUCKETS = 1000  # per (session, channel) and per client: the least recently used are forgotten


def _odd_char(text: str) -> int:
    """Index of the first control character (other than tab/newline) or -1."""
    for i, ch in enumerate(text):
        if (ord(ch) < 32 and ch not in ALLOWED_CONTROL) or ord(ch) == 127 or 0xD800 <= ord(ch) <= 0xDFFF:
            return i
    return -1


def check_text(field: str, text: str, max_chars: int, allow_empty: bool = False) -> str | None:
    """A reason to refuse ``text``, or None."""
    if not allow_empty and not text.strip():
        return f"{field} must not be empty"
    if len(text) > max_chars:
        return f"{field} must have at most {max_chars} characters, got {len(text)}"
    bad = _odd_char(text)
    if bad >= 0:
        return f"{field} contains control character U+{ord(text[bad]):04X} at index {bad}"
    return None


def check_request(message: Message, limits: GatewayConfig) -> str | None:
    """Why a client request is out of bounds (sizes, lengths, odd text), or None. Every string
    and list field of every client request is checked here (Literal fields are checked when
    decoding)."""
    reason = check_text("session", message.session, MAX_ID_CHARS)
    if reason is None and (
        "/" in message.session or "\\" in message.session or not message.session.strip(".")
    ):
        reason = f"session {message.session!r} must not contain '/' or '\\' or be only dots"
    if reason is None and not np.isfinite(message.ts):
        reason = f"ts must be a finite number, got {message.ts}"
    if reason is not None:
        return reason
    if isinstance(message, Ask):
        if not 0 < len(message.question.strip()) <= MAX_QUESTION_CHARS:
            return f"Ask.question must have 1..{MAX_QUESTION_CHARS} characters, got {len(message.question)}"
        reason = check_text("Ask.question", message.question, MAX_QUESTION_CHARS) or check_text(
            "Ask.turn", message.turn, MAX_ID_CHARS
        )
        if reason is None and len(message.choices) > MAX_CHOICES:
            reason = f"Ask.choices must have at most {MAX_CHOICES} entries, got {len(message.choices)}"
        for i, choice in enumerate(message.choices):
            reason = reason or check_text(f"Ask.choices[{i}]", choice, MAX_CHOICE_CHARS)
        if reason is None and message.audio_rate and not 8000 <= message.audio_rate <= 48000:
            reason = f"Ask.audio_rate must be 0 or 8000..48000 Hz, got {message.audio_rate}"
        if reason is None and message.tentative:
            reason = "Ask.tentative is the speech stage's (preemptive generation), not a client's"
        return reason
    if isinstance(message, Watch):
        return check_text("Watch.watch_id", message.watch_id, MAX_ID_CHARS) or check_text(
            "Watch.condition", message.condition, WATCH_CONDITION_CHARS, allow_empty=message.cancel
        )
    if isinstance(message, VideoFrame):
        image, side = message.image, limits.max_frame_side
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            return f"VideoFrame.image must be uint8 (H, W, 3), got {image.dtype} {tuple(image.shape)}"
        if not (0 < image.shape[0] <= side and 0 < image.shape[1] <= side):
            return f"VideoFrame.image sides must be 1..{side} pixels, got {tuple(image.shape[:2])}"
        if image.nbytes > limits.max_frame_bytes:
            return (
                f"VideoFrame.image must have at most {limits.max_frame_bytes} bytes "
                f"(gateway.max_frame_bytes), got {image.nbytes}"
            )
        return check_text("VideoFrame.source", message.source, MAX_SOURCE_CHARS, allow_empty=True)
    if isinstance(message, AudioChunk):
        pcm = message.pcm
        if not MIN_AUDIO_RATE <= message.sample_rate <= MAX_AUDIO_RATE:
            return f"AudioChunk.sample_rate must be {MIN_AUDIO_RATE}..{MAX_AUDIO_RATE} Hz, got {message.sample_rate}"
        problem = sample_rate_problem(message.sample_rate)  # a prime rate: a huge resampling filter
        if problem:
            return f"AudioChunk.{problem}"
        if pcm.ndim != 1 or pcm.dtype not in (np.float32, np.int16) or not len(pcm):
            return (
                f"AudioChunk.pcm must be non-empty float32 or int16 (N,), got {pcm.dtype} {tuple(pcm.shape)}"
            )
        if len(pcm) > limits.max_audio_chunk_s * message.sample_rate:
            return (
                f"AudioChunk.pcm holds {len(pcm) / message.sample_rate:.0f} s; at most "
                f"{limits.max_audio_chunk_s:.0f} s per chunk (gateway.max_audio_chunk_s)"
            )
        if pcm.nbytes > limits.max_audio_chunk_bytes:
            return (
                f"AudioChunk.pcm must have at most {limits.max_audio_chunk_bytes} bytes per chunk "
                f"(gateway.max_audio_chunk_bytes), got {pcm.nbytes}"
            )
        if pcm.dtype == np.float32 and not np.isfinite(pcm).all():
            return "AudioChunk.pcm contains NaN or infinite samples"
        return None
    if isinstance(message, Interrupt):
        return check_text("Interrupt.turn", message.turn, MAX_ID_CHARS, allow_empty=True) or check_text(
            "Interrupt.reason", message.reason, MAX_QUESTION_CHARS, allow_empty=True
        )
    if isinstance(message, StatusRequest | HistoryRequest):
        reason = check_text("request_id", message.request_id, MAX_ID_CHARS, allow_empty=True)
        if reason is None and isinstance(message, HistoryRequest):
            kinds = message.kinds
            if len(kinds) > len(RECORD_KINDS):
                reason = (
                    f"HistoryRequest.kinds must have at most {len(RECORD_KINDS)} entries "
                    f"(each of {', '.join(RECORD_KINDS)} once), got {len(kinds)}"
                )
            elif len(set(kinds)) < len(kinds) or not set(kinds) <= set(RECORD_KINDS):
                reason = f"HistoryRequest.kinds must name each of {', '.join(RECORD_KINDS)} at most once, got {kinds}"
        return reason
    return None


def client_percept(
    relayed: OrderedDict[str, tuple[float | None, float]], percept: Percept, now: float
) -> Percept | None:
    """The percept as clients get it (no features), or None when its session's last relayed
    percept (``relayed``: session -> (boxes_ts, when), updated here) had the same detection and
    is under CLIENT_PERCEPT_S old."""
    last = relayed.get(percept.session)
    if last is not None and last[0] == percept.boxes_ts and now - last[1] < CLIENT_PERCEPT_S:
        return None
    relayed[percept.session] = (percept.boxes_ts, now)
    relayed.move_to_end(percept.session)
    while len(relayed) > MAX_RELAYED_SESSIONS:
        relayed.popitem(last=False)
    return msgspec.structs.replace(percept, features=np.zeros(0, np.float32))


@dataclass
class PendingAsk:
    ask: Ask
    started: bool = False  # an AnswerDelta came
    resent: bool = False  # already sent again to a restarted reasoning


class AudioBucket:
    """Token bucket (seconds of audio, or frames): refills at ``speed`` per wall-clock second up
    to ``burst_s``."""

    def __init__(self, speed: float, burst_s: float):
        self.speed, self.burst_s = speed, burst_s
        self.tokens, self.at = burst_s, time.monotonic()

    def take(self, amount: float) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst_s, self.tokens + (now - self.at) * self.speed)
        self.at = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


def take_from(buckets: OrderedDict, key: object, speed: float, burst: float, amount: float) -> bool:
    """Take ``amount`` from the bucket of ``key`` (a new one: full); at most MAX_BUCKETS kept."""
    bucket = buckets.get(key)
    if bucket is None:
        bucket = buckets[key] = AudioBucket(speed, burst)
        while len(buckets) > MAX_BUCKETS:
            buckets.popitem(last=False)
    buckets.move_to_end(key)
    return bucket.take(amount)


@dataclass
class ClientRequest:
    """A client's request as the gateway's ROUTER read it: the connection's ``identity`` (where
    the reply goes), ``client`` (``client_key``: whom its budgets are charged to) and the
    message's ``frames`` (decoded and checked by the stage)."""

    identity: bytes
    client: tuple
    frames: list = field(default_factory=list)
    session: str = "default"


def client_key(identity: bytes, frame: zmq.Frame) -> tuple[str, bytes | str]:
    """Whom a request's budget is charged to: the client's CURVE key when the gateway serves
    beyond loopback (all its connections share it), else the connection's ROUTER identity."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:  # no ZAP handler: loopback
        user = ""
    return ("key", user) if user else ("connection", identity)


class GatewayStage:
    """The gateway's rules (checks, budgets, sessions, questions in flight, history and watch
    forwarding), without sockets: built from the configuration and an ``emit`` callable."""

    name = "gateway"

    def __init__(
        self,
        config: Config,
        emit: Emit,
        counters: dict[str, float] | None = None,
        *,
        own_stats: Callable[[], Stats] | None = None,
    ):
        self.emit = emit
        self.counters: dict[str, float] = counters if counters is not None else defaultdict(float)
        self.config = config.gateway
        self.bus = config.bus
        self.replicas = config.cluster.reasoning_replicas
        self.own_stats = own_stats or (lambda: Stats(stage="gateway", counters=dict(self.counters)))
        self.pending: OrderedDict[str, PendingAsk] = OrderedDict()
        self.failed: OrderedDict[str, str] = OrderedDict()  # turns this gateway ended with an error
        self.last_progress = time.monotonic()
        self.reasoning_pid = 0
        self.replica_pids: dict[str, int] = {}  # a Ray cluster's reasoning replicas (app/cluster.py)
        self.percepts_relayed: OrderedDict[str, tuple[float | None, float]] = OrderedDict()
        self.resend_at: float | None = None
        self.audio_buckets: OrderedDict[tuple[str, str], AudioBucket] = OrderedDict()
        self.client_audio: OrderedDict[tuple, AudioBucket] = OrderedDict()  # per client_key
        self.total_audio = AudioBucket(self.config.total_audio_speed, self.config.total_audio_burst_s)
        self.client_frames: OrderedDict[tuple, AudioBucket] = OrderedDict()
        # per client_key: its session names -> when each was last named (oldest first)
        self.client_sessions: OrderedDict[tuple, OrderedDict[str, float]] = OrderedDict()
        self.session_owners: OrderedDict[str, tuple] = OrderedDict()  # session -> CURVE key (not_owner)
        self.stats: dict[str, Stats] = {}
        # gateway-side id -> (client identity, client's request_id, deadline)
        self.history_pending: dict[str, tuple[bytes, str, float]] = {}
        # (session, watch_id) -> (client identity, deadline): watches memory has not stored yet
        self.watch_pending: dict[tuple[str, str], tuple[bytes, float]] = {}

    def relay(self, message: Message) -> None:
        """To every client's SUB (counted in ``client_dropped`` when its queue is full)."""
        if not self.emit(message, CLIENTS):
            self.counters["client_dropped"] += 1

    def handle(self, message: Message | ClientRequest | MemoryReply) -> None:
        if isinstance(message, ClientRequest):
            self.serve_client(message.identity, message.client, message.frames)
            return
        if isinstance(message, MemoryReply):
            self.on_memory(message.message)
            return
        if isinstance(message, Stats):
            self.stats[message.stage] = message
            if message.stage == "reasoning" and message.state == "running":
                self.on_reasoning_pid(message.pid)
            elif message.stage.startswith("reasoning-") and message.state == "running":
                self.on_reasoning_pid(message.pid, replica=message.stage)
        elif isinstance(message, (AnswerDelta, AnswerDone)) and message.tentative:
            self.last_progress = time.monotonic()
            return  # an answer to a question not confirmed yet: sent again if it is, else dropped
        elif isinstance(message, Interrupt) and message.reason == PREEMPTION_DISCARDED:
            return  # that dropped answer's end: no client saw it
        elif isinstance(message, AnswerDelta):
            pending = self.pending.get(message.turn)
            if pending is not None:
                pending.started = True
            self.last_progress = time.monotonic()
        elif isinstance(message, AnswerDone):
            self.pending.pop(message.turn, None)
            self.last_progress = time.monotonic()
            if self.failed.get(message.turn) == message.error:
                return  # our own failure notice coming back over the bus: clients have it
        elif isinstance(message, Percept):
            message = client_percept(self.percepts_relayed, message, time.monotonic())
            if message is None:
                return
        self.relay(message)

    def serve_client(self, identity: bytes, key: tuple, frames: list) -> None:
        """Answer one client request (``frames``: the message; ``key``: ``client_key``)."""
        message: Message | None = None
        try:
            message = decode(frames, max_message_bytes=self.bus.max_message_bytes)
            if isinstance(message, HistoryRequest) and check_request(message, self.config) is None:
                refused = self.not_owner(message, key)
                reply = refused or self.forward_history(identity, message)
            else:
                reply = self.on_request(message, key)
                if isinstance(message, Watch) and isinstance(reply, Ack):  # checked here: to memory
                    reply = self.forward_watch(identity, message)
        except ProtocolError as exc:
            self.counters["rejected"] += 1
            reply = exc.to_error()
        except Exception as exc:  # answer the client; the gateway keeps serving
            what = type(message).__name__ if message is not None else "request"
            log.error("handler failed on %s: %s: %s", what, type(exc).__name__, exc, exc_info=exc)
            self.counters["handler_errors"] += 1
            self.emit(
                Error(code="stage_error", message=f"gateway: {what}: {type(exc).__name__}: {str(exc)[:500]}")
            )
            request_id = next(
                (
                    str(getattr(message, f))
                    for f in ("request_id", "turn", "watch_id")
                    if getattr(message, f, "")
                ),
                "",
            )
            reply = Error(
                code="stage_error",
                message=f"gateway: {what}: {type(exc).__name__}: {str(exc)[:500]}",
                request_id=request_id[:MAX_ID_CHARS],
            )
        if reply is not None:
            self.emit(reply, client(identity))

    def on_request(self, message: Message, client: tuple = ("connection", b"")) -> Message | None:
        """Check and route one client request; ``client`` (``client_key``) pays for its media."""
        counters = self.counters
        if not isinstance(message, CLIENT_REQUESTS):
            counters["rejected"] += 1
            return Error(code="unsupported", message=f"clients may not send {type(message).__name__}")
        reason = check_request(message, self.config)
        if reason is not None:
            counters["rejected"] += 1
            request_id = getattr(message, "turn", "") or getattr(message, "watch_id", "")
            if isinstance(message, StatusRequest | HistoryRequest):
                request_id = message.request_id[:MAX_ID_CHARS]
            return Error(code="invalid", message=reason, request_id=request_id[:MAX_ID_CHARS])
        if isinstance(message, StatusRequest):
            self.stats["gateway"] = self.own_stats()
            return Status(request_id=message.request_id, stages=dict(self.stats))
        refused = self.session_refused(message, client)
        if refused is not None:
            counters["sessions_refused"] += 1
            return refused
        if isinstance(message, Ask):
            if message.turn in self.pending:
                return Ack(ts=message.ts, session=message.session, request_id=message.turn)  # a re-send
            if len(self.pending) >= self.config.max_pending_asks:
                counters["busy"] += 1
                return Error(
                    code="busy",
                    message=f"{len(self.pending)} questions are waiting for an answer (limit "
                    f"{self.config.max_pending_asks}); retry in a few seconds",
                    request_id=message.turn,
                )
            if not self.pending:
                self.last_progress = time.monotonic()
            self.pending[message.turn] = PendingAsk(message)
        if isinstance(message, AudioChunk) and not self.audio_allowed(message, client):
            counters["audio_dropped"] += 1
            counters["audio_dropped_s"] += len(message.pcm) / message.sample_rate
            return None
        if isinstance(message, VideoFrame) and not self.frame_allowed(client):
            counters["frames_dropped_rate"] += 1
            return None
        counters[f"in_{type(message).__name__}"] += 1
        if isinstance(message, Watch):  # memory stores it and acknowledges it (forward_watch)
            return Ack(ts=message.ts, session=message.session, request_id=message.watch_id)
        self.emit(message, BUS)
        if isinstance(message, Ask):
            return Ack(ts=message.ts, session=message.session, request_id=message.turn)
        return None

    def session_refused(self, message: Message, client: tuple) -> Error | None:
        """An ``Error`` when ``message`` names a session beyond the client's
        ``gateway.sessions_per_client`` (names it used within ``client_session_idle_s``), else
        None (the name is recorded as in use now)."""
        not_owner = self.not_owner(message, client)
        if not_owner is not None:
            return not_owner
        config, now = self.config, time.monotonic()
        sessions = self.client_sessions.get(client)
        if sessions is None:
            sessions = self.client_sessions[client] = OrderedDict()
            while len(self.client_sessions) > MAX_BUCKETS:
                self.client_sessions.popitem(last=False)
        self.client_sessions.move_to_end(client)
        while sessions and now - next(iter(sessions.values())) > config.client_session_idle_s:
            sessions.popitem(last=False)
        if message.session not in sessions and len(sessions) >= max(config.sessions_per_client, 1):
            request_id = getattr(message, "turn", "") or getattr(message, "watch_id", "")
            return Error(
                code="too_many_sessions",
                message=f"this client already uses {len(sessions)} sessions (gateway.sessions_per_client "
                f"= {config.sessions_per_client}); a session counts until it is idle for "
                f"{config.client_session_idle_s:.0f} s (gateway.client_session_idle_s)",
                request_id=request_id[:MAX_ID_CHARS],
            )
        sessions[message.session] = now
        sessions.move_to_end(message.session)
        return None

    def not_owner(self, message: Message, client: tuple) -> Error | None:
        """Beyond loopback a session belongs to the client key that named it first: a request
        from another key naming it (to read its history, ask, interrupt or feed it) is refused
        with ``not_your_session``. Loopback clients are trusted: they are this machine's user,
        who owns the run directory and the data. The most recent ``MAX_BUCKETS`` sessions are
        remembered."""
        if client[0] != "key":
            return None
        owner = self.session_owners.setdefault(message.session, client)
        self.session_owners.move_to_end(message.session)
        while len(self.session_owners) > MAX_BUCKETS:
            self.session_owners.popitem(last=False)
        if owner == client:
            return None
        self.counters["not_owner"] += 1
        request_id = getattr(message, "turn", "") or getattr(message, "watch_id", "")
        return Error(
            code="not_your_session",
            message=f"session {message.session!r} was opened by another client key; use a session of your own",
            request_id=(getattr(message, "request_id", "") or request_id)[:MAX_ID_CHARS],
        )

    def audio_allowed(self, chunk: AudioChunk, client: tuple) -> bool:
        """Within the client's audio budget, then within its (session, channel)'s, then within
        all clients' together (``gateway.total_audio_speed``: new connections each bring a budget
        of their own, and whatever is accepted waits on the bus until speech has heard it)."""
        seconds, config = len(chunk.pcm) / chunk.sample_rate, self.config
        return (
            take_from(
                self.client_audio, client, config.client_audio_speed, config.client_audio_burst_s, seconds
            )
            and take_from(
                self.audio_buckets,
                (chunk.session, chunk.channel),
                config.max_audio_speed,
                config.audio_burst_s,
                seconds,
            )
            and self.total_audio.take(seconds)
        )

    def frame_allowed(self, client: tuple) -> bool:
        config = self.config
        return take_from(self.client_frames, client, config.client_max_fps, config.client_frame_burst, 1.0)

    # -- questions in flight -------------------------------------------------------------------

    def on_reasoning_pid(self, pid: int, replica: str = "") -> None:
        """A new reasoning process: re-send what the old one had not started, fail the rest.
        ``replica`` ("reasoning-I", a cluster's): only the questions of the sessions it owns."""
        if replica:
            previous = self.replica_pids.get(replica, 0)
            self.replica_pids[replica] = pid
        else:
            previous, self.reasoning_pid = self.reasoning_pid, pid
        if not previous or previous == pid:
            return
        self.counters["reasoning_restarts_seen"] += 1
        replicas = self.replicas
        for pending in list(self.pending.values()):
            if replica and replica != f"reasoning-{owner(pending.ask.session, replicas)}":
                continue  # another replica's session: its answer goes on
            if pending.started or pending.resent:
                self.fail(pending, "reasoning restarted while answering this question; ask again")
            else:
                pending.resent = True
                self.resend_at = time.monotonic() + RESEND_DELAY_S
        self.last_progress = time.monotonic()

    def fail(self, pending: PendingAsk, error: str) -> None:
        ask = pending.ask
        self.pending.pop(ask.turn, None)
        self.failed[ask.turn] = error
        while len(self.failed) > 1000:
            self.failed.popitem(last=False)
        self.counters["asks_failed"] += 1
        done = AnswerDone(ts=ask.ts, session=ask.session, turn=ask.turn, text="", error=error)
        self.relay(done)
        self.emit(done)  # speech stops speaking it
        # ... and reasoning stops working on it if it still is (its client was told it failed)
        self.emit(Interrupt(ts=ask.ts, session=ask.session, turn=ask.turn, reason=error))

    def check_pending(self) -> None:
        now = time.monotonic()
        if self.resend_at is not None and now >= self.resend_at:
            self.resend_at = None
            for pending in self.pending.values():
                if pending.resent and not pending.started:
                    self.counters["asks_resent"] += 1
                    self.emit(pending.ask)
        timeout = self.config.ask_timeout_s
        if self.pending and now - self.last_progress > timeout:
            for pending in list(self.pending.values()):
                self.fail(
                    pending,
                    f"no answer progress within {timeout:.0f} s (reasoning busy, stalled or not running); ask again",
                )

    def forward_history(self, identity: bytes, request: HistoryRequest) -> Message | None:
        """Send ``request`` on to memory under a gateway-side id, without blocking; the reply
        comes in ``on_memory``. At most ``gateway.max_pending_history`` wait at once: beyond (or
        when memory's queue is full) an ``Error`` ``busy``."""
        if not (request.t0 <= request.t1 and 0 < request.limit <= MAX_HISTORY_ITEMS):
            self.counters["rejected"] += 1
            return Error(
                code="invalid",
                message=f"HistoryRequest needs t0 <= t1 and 1 <= limit <= {MAX_HISTORY_ITEMS}, "
                f"got t0={request.t0}, t1={request.t1}, limit={request.limit}",
                request_id=request.request_id,
            )
        limit = self.config.max_pending_history
        if len(self.history_pending) >= limit:
            self.counters["history_busy"] += 1
            return Error(
                code="busy",
                message=f"{len(self.history_pending)} history requests are waiting for memory "
                f"(gateway.max_pending_history = {limit}); retry in a few seconds",
                request_id=request.request_id,
            )
        forward_id = uuid.uuid4().hex
        # never blocks: a memory that is away or stalled must not stop the gateway
        if not self.emit(msgspec.structs.replace(request, request_id=forward_id), MEMORY):
            self.counters["history_busy"] += 1
            return Error(
                code="busy",
                message="memory is not taking requests (its queue is full); retry in a few seconds",
                request_id=request.request_id,
            )
        self.history_pending[forward_id] = (
            identity,
            request.request_id,
            time.monotonic() + HISTORY_TIMEOUT_S,
        )
        self.counters["in_HistoryRequest"] += 1
        return None

    def forward_watch(self, identity: bytes, watch: Watch) -> Message | None:
        """Pass a checked ``Watch`` to memory, which stores it (it outlives restarts), hands it
        to reasoning and acknowledges it; its ``Ack`` or ``Error`` is relayed in ``on_memory``."""
        key = (watch.session, watch.watch_id)
        if len(self.watch_pending) >= MAX_PENDING_WATCHES and key not in self.watch_pending:
            self.counters["watch_busy"] += 1
            return Error(
                code="busy",
                message=f"{len(self.watch_pending)} watches are waiting for memory; retry in a few seconds",
                request_id=watch.watch_id,
            )
        if not self.emit(watch, MEMORY):
            self.counters["watch_busy"] += 1
            return Error(
                code="busy",
                message="memory is not taking requests (its queue is full); retry in a few seconds",
                request_id=watch.watch_id,
            )
        self.watch_pending[key] = (identity, time.monotonic() + HISTORY_TIMEOUT_S)
        return None

    def on_memory(self, reply: Message) -> None:
        """Memory's reply to a forwarded history request or watch: to the client that sent it."""
        if not isinstance(reply, History | Error | Ack):
            return
        watch = self.watch_pending.pop((reply.session, reply.request_id), None)
        if watch is not None and isinstance(reply, Ack | Error):
            self.emit(reply, client(watch[0]))
            return
        pending = self.history_pending.pop(reply.request_id, None) if not isinstance(reply, Ack) else None
        if pending is None:  # answered after its deadline
            return
        identity, client_request_id, _ = pending
        self.emit(msgspec.structs.replace(reply, request_id=client_request_id), client(identity))

    def tick(self) -> None:
        """Tell clients whose history request memory left unanswered (memory down or restarting),
        and end questions that can no longer be answered."""
        self.check_pending()
        now = time.monotonic()
        for forward_id, (identity, client_request_id, deadline) in list(self.history_pending.items()):
            if now >= deadline:
                del self.history_pending[forward_id]
                error = Error(
                    code="unavailable",
                    message=f"memory did not answer the history request within {HISTORY_TIMEOUT_S:.0f} s",
                    request_id=client_request_id,
                )
                self.emit(error, client(identity))
        for (session, watch_id), (identity, deadline) in list(self.watch_pending.items()):
            if now >= deadline:
                del self.watch_pending[(session, watch_id)]
                error = Error(
                    code="unavailable",
                    message=f"memory did not store the watch within {HISTORY_TIMEOUT_S:.0f} s; it is "
                    "not registered, send it again",
                    request_id=watch_id,
                    session=session,
                )
                self.emit(error, client(identity))

    def close(self) -> None:
        pass


class GatewaySockets:
    """The gateway's sockets around a ``GatewayStage``: the ROUTER clients send requests to
    (read round robin, handed to the stage as ``ClientRequest``), the PUB they subscribe to, the
    DEALER to memory (``Runtime.connect_memory``), CURVE beyond loopback. Passed to
    ``Runtime.run`` in the stage's place: it hands on ``handle`` and ``tick`` and closes the
    sockets at the end."""

    name = "gateway"

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        ctx, limit = runtime.ctx, runtime.config.bus.max_message_bytes
        # Requests queued per client connection: few, so a flood waits in the client's socket
        # (and its kernel buffers), not in the gateway's memory (1000 x 192 kB audio chunks was
        # 190 MB; a frame is up to gateway.max_frame_bytes). Replies keep deep queues.
        self.router = make_socket(ctx, zmq.ROUTER, hwm=1000, max_message_bytes=limit, RCVHWM=CLIENT_QUEUE)
        self.client_pub = make_socket(ctx, zmq.PUB, hwm=10000, max_message_bytes=limit)
        self.authenticator = None
        if runtime.addresses.curve:
            keys = load_server_keys(runtime.config.keys_dir)  # SecurityError: refuse to serve
            self.authenticator = start_authenticator(ctx, keys)
            make_curve_server(self.router, keys)
            make_curve_server(self.client_pub, keys)
        self.router.bind(runtime.addresses.gateway)
        self.client_pub.bind(runtime.addresses.gateway_pub)
        runtime.connect_memory()
        runtime.outlets["clients"] = self.to_clients
        runtime.outlets["client"] = self.to_client
        self.stage = GatewayStage(
            runtime.config, runtime.emit, runtime.counters, own_stats=runtime.stats_message
        )
        runtime.add_socket(self.router, self.on_client)
        runtime.subscribe(*FORWARDED_TO_CLIENTS)

    def to_clients(self, message: Message, _to: To) -> bool:
        try:
            send(self.client_pub, message, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def to_client(self, message: Message, to: To) -> bool:
        send(self.router, message, prefix=[to.identity])
        return True

    def on_client(self, sock: zmq.Socket) -> None:
        """Serve at most ``bus.poll_max_messages`` requests and ``bus.poll_max_bytes`` bytes (the
        rest wait in the socket), round robin across clients: the requests read are served one
        per client in turn, so a client with a thousand waiting requests delays another's by one
        request each, not a thousand."""
        queues: OrderedDict[bytes, deque[list[zmq.Frame]]] = OrderedDict()
        bus = self.runtime.config.bus  # and bus.poll_max_bytes: a flood of frames is not all taken at once

        def take(frames: list[zmq.Frame]) -> None:
            queues.setdefault(frames[0].bytes, deque()).append(frames)

        if read_bounded(sock, take, bus.poll_max_messages, bus.poll_max_bytes):
            self.runtime.counters["poll_byte_limit"] += 1
        while queues:
            for identity in list(queues):
                waiting = queues[identity]
                frames = waiting.popleft()
                self.stage.handle(ClientRequest(identity, client_key(identity, frames[-1]), frames[1:]))
                if not waiting:
                    del queues[identity]

    def handle(self, message: Message) -> None:
        self.stage.handle(message)

    def tick(self) -> None:
        self.stage.tick()

    def close(self) -> None:
        self.stage.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        self.router.close(linger=0)
        self.client_pub.close(linger=0)

    stop = close


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnistream-gateway")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    runtime = Runtime("gateway", args.run_dir)
    try:
        gateway = GatewaySockets(runtime)
    except SecurityError as exc:
        log.error("refusing to serve clients beyond loopback without CURVE keys: %s", exc)
        print(f"gateway: refusing to start: {exc}", file=sys.stderr)
        runtime.close()
        sys.exit(2)
    runtime.run(gateway, tick=gateway.tick)


if __name__ == "__main__":
    main()
