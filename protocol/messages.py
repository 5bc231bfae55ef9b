"""Every message that crosses a process boundary, in one place.

Each type is a tagged ``msgspec.Struct``; the tag is the class name and doubles as the ZeroMQ
topic. ndarray fields travel as separate zero-copy frames (see ``protocol.codec``), never pickled.

Conventions: ``ts`` is stream time in seconds (the position in the watched stream, not wall
clock) and always means the same thing: the moment the message stands at, i.e. when what it says
became true. A message about a span carries its start as ``t0`` and its end as ``ts`` (Clip,
Transcript, Sighting, Record: the span is [t0, ts]); an instant's message carries that instant (a
frame's capture, an Ask's asking, a Draft's last word heard); a reply carries the ``ts`` of what
it answers. ``Ask.ts <= 0`` means "now": memory and reasoning take the newest stream time they
know. ``session`` names the user session; ``turn`` names one question/answer exchange.
A remembered thing is a *record* everywhere: ``Record`` announces a stored one, ``MemoryRecord``
is one as memory returns it, memory/store.py's ``StoredRecord`` the stored row, memory/tiers.py's
``TierRecord`` the working-memory copy with its vectors (``MemberRecord``: one record inside a
consolidated event). A ``KVBlock`` (reasoning) is a record's tokens in the KV cache.
Unknown fields and wrong field types are rejected at decode time with an error naming the field.
"""

from __future__ import annotations

from typing import Literal, Union

import msgspec
import numpy as np


class Message(
    msgspec.Struct,
    tag=True,
    tag_field="type",
    forbid_unknown_fields=True,
    omit_defaults=True,
    kw_only=True,
):
    """Base of all messages. ``ts`` is stream time (seconds)."""

    ts: float = 0.0
    session: str = "default"


# --- media -----------------------------------------------------------------------------------


class VideoFrame(Message):
    """One RGB frame. ``image``: uint8 (H, W, 3), owned by the receiver after decode."""

    image: np.ndarray
    source: str = "client"
    index: int = 0


class AudioChunk(Message):
    """Mono PCM. ``pcm``: float32 (N,) in [-1, 1] or int16 (N,), at ``sample_rate`` Hz.

    ``channel`` is "user" for the user's microphone (its speech can become questions) or
    "scene" for the sound track of the watched stream (transcribed into memory only).
    """

    pcm: np.ndarray
    sample_rate: int = 16000
    channel: Literal["user", "scene"] = "scene"


class AudioOut(Message):
    """Synthesised assistant speech for ``turn``. ``pcm``: float32 (N,) at ``sample_rate`` Hz.

    ``flush=True`` tells the client to drop any audio of this turn it has queued (barge-in).
    Without ``final`` the answer is only paused (the user may have coughed): more chunks of the
    turn may follow and are played. ``final=True`` ends the turn's audio. Chunks are small (about
    40 ms) and paced to real time, so a client should play them as they come.
    """

    turn: str = ""
    pcm: np.ndarray | None = None
    sample_rate: int = 24000
    seq: int = 0
    flush: bool = False
    final: bool = False


# --- perception --------------------------------------------------------------------------------


class Label(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    name: str
    score: float
    category: str = ""


class Box(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """One detected object: COCO ``label`` and its box normalised to the frame, (x0, y0) the top
    left and (x1, y1) the bottom right corner as fractions (0..1) of its width and height;
    ``colour`` is the colour name perception gave it ("red", "blue and white", "")."""

    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 0.0
    colour: str = ""


class Percept(Message):
    """What perception saw in one encoded frame. ``features``: float32 (D,), L2-normalised."""

    features: np.ndarray
    labels: list[Label] = []
    text_seen: list[str] = []
    faces: list[str] = []
    objects: list[str] = []  # objects in view (tracked): "red cup (left)", "person in a blue shirt (centre)"
    clip_id: int = 0
    frame_index: int = 0
    latency_s: float = 0.0
    # The newest object detections (made at ``perception.objects_fps``, so usually of an earlier
    # frame than this one) and the stream time of the frame they were made on (None: none yet):
    # what a client draws on its own copy of that frame.
    boxes: list[Box] = []
    boxes_ts: float | None = None


class Clip(Message):
    """A closed clip: the span [t0, ts] of one scene. ``features``: float32 (D,) mean-pooled."""

    clip_id: int
    t0: float
    features: np.ndarray
    labels: list[Label] = []
    text_seen: list[str] = []
    faces: list[str] = []  # session-stable person ids seen in the clip ("person 2")
    objects: list[str] = []  # objects detected in the clip, with positions and colours
    motion: float = 0.0  # mean frame-to-frame change of grey thumbnails, 0 (still) .. 1
    description: str = ""
    n_frames: int = 0


class Sighting(Message):
    """A change in what is in view, from perception's object tracker: ``event`` "appeared" (a
    person: "entered"), "left" / "gone" (last seen: ``ts``), or "count" (people present over
    [t0, ts]). ``text`` says it in words with its stream times ("cell phone 1 last seen at 03:12, on
    the right, right of the laptop"); memory stores it as a record of kind "sighting"."""

    t0: float
    label: str  # COCO class ("person", "cell phone")
    event: Literal["appeared", "left", "gone", "count"]
    text: str
    track_id: int = 0
    count: int = 0


# --- speech -------------------------------------------------------------------------------------


class Transcript(Message):
    """Speech recognised in [t0, ts]. Partials are replaced by later partials or the final."""

    t0: float
    text: str
    final: bool = True
    speaker: Literal["user", "assistant", "scene"] = "scene"
    turn: str = ""


class UserSpeech(Message):
    """The user started (``started=True``) or stopped speaking."""

    started: bool


# --- questions and answers ------------------------------------------------------------------------


AnswerMode = Literal["full", "reprefill", "recent", "no_memory"]


class Ask(Message):
    """A question asked at stream time ``ts`` (``ts <= 0``: now, the newest stream time memory
    has). ``choices`` (optional) makes it multiple choice.

    ``mode`` picks how memory is used: "full" (the system: streamed KV cache plus retrieved
    blocks), or a baseline for evaluation: "reprefill" (the same retrieved records re-read as
    text), "recent" (only the last ``recent_window_s`` seconds), "no_memory" (only what is on
    screen now and the last utterance).
    """

    turn: str
    question: str
    choices: list[str] = []
    speak: bool = True
    mode: AnswerMode = "full"
    audio_rate: int = 0  # sample rate (Hz) the client wants spoken answers in; 0: the voice's own
    # Preemptive generation (speech, ``speech.preemptive``): asked before the end of the user's
    # turn is confirmed. Its answer is marked tentative and not relayed to clients until an Ask
    # of the same turn without the flag (same question and ts) confirms it; an Interrupt of the
    # turn discards it. Only the speech stage sends it (the gateway refuses it from clients).
    tentative: bool = False


class Draft(Message):
    """The question a user is still speaking: the words heard so far (``ts``: stream time of the
    last of them). Reasoning reads it ahead (retrieves memory for it and prefills its tokens) so
    that the ``Ask`` that follows at the end of the turn only has the rest to read. Nothing is
    answered for a draft; one that no ``Ask`` follows is dropped after a few seconds."""

    question: str


class AnswerDelta(Message):
    turn: str
    text: str
    seq: int = 0
    # Part of an answer to a tentative Ask not confirmed yet: for the speech stage only (the
    # gateway does not relay it). On confirmation the pieces are sent again without the flag,
    # with the same ``seq``.
    tentative: bool = False


class AnswerDone(Message):
    turn: str
    text: str
    choice: str = ""
    error: str = ""
    first_token_s: float = 0.0
    total_s: float = 0.0
    # The stream-time spans [t0, t1] (merged, oldest first) of the remembered records the answer
    # was given from: clips, transcripts and sightings in the model's context, and what was on
    # screen when asked. The running synopsis is not listed (it spans the whole stream). For
    # citations, and for the eval's evidence recall (was the evidence in context?).
    context: list[list[float]] = []
    tentative: bool = False  # the end of an answer to a tentative Ask not confirmed yet (see AnswerDelta)


PREEMPTION_DISCARDED = "preemption discarded"  # Interrupt.reason: a tentative answer dropped


class Interrupt(Message):
    """Stop answering ``turn`` (empty: whatever is being answered) at once. With ``reason``
    PREEMPTION_DISCARDED it drops a tentative answer no client saw (the gateway does not relay it)."""

    turn: str = ""
    reason: str = ""


WATCH_CONDITION_CHARS = 500  # Watch.condition: 1..500 characters (it is put to the LLM per record)
WATCHES_PER_SESSION = 16


class Watch(Message):
    """A standing question: raise an ``Alert`` whenever it becomes true.

    Memory checks it (``condition`` 1..WATCH_CONDITION_CHARS characters, at most
    WATCHES_PER_SESSION per session) and stores it before it is acknowledged, so it outlives a
    restart of reasoning or memory; ``cancel=True`` removes the watch of that id (``condition``
    is not used)."""

    watch_id: str
    condition: str
    cancel: bool = False


class WatchesRequest(Message):
    """Reasoning asks memory for the stored watches of ``session`` (on first contact with it)."""

    request_id: str


class Watches(Message):
    """Memory's reply to ``WatchesRequest``: the session's stored watches, oldest first."""

    request_id: str
    watches: list[Watch] = []


class Alert(Message):
    watch_id: str
    text: str


# --- memory ----------------------------------------------------------------------------------------


MemoryKind = Literal["clip", "transcript", "sighting", "event", "synopsis", "now"]
RecordKind = Literal["clip", "transcript", "sighting", "event", "synopsis"]


class MemoryRecord(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One remembered record with its stream-time span [t0, t1].

    Kinds: "clip" (a scene description), "transcript" (speech) and "sighting" (an object or
    person entering, leaving or last seen, a count of people: perception's tracker) are what was perceived;
    "event" is several adjacent records merged by memory consolidation (``members``: the ids of
    the clips and transcripts it covers, whose text it carries with their times); "synopsis" is
    the running summary of the session so far; "now" is what is on screen (retrieval only).
    """

    kind: MemoryKind
    t0: float
    t1: float
    text: str
    score: float = 0.0
    speaker: str = ""
    item_id: int = 0
    members: list[int] = []
    # "now" only: what memory's timeline says of the things the question names (first and last
    # seen, separate appearances, people present), computed from the sighting records.
    facts: list[str] = []


class Retrieve(Message):
    """Reasoning asks memory for what is relevant to ``query`` up to stream time ``ts``.

    With ``turn`` set, memory answers from the snapshot it took when that ``Ask`` arrived.

    With ``page_size`` > 0 it is a page of the session's history instead (a reasoner streaming a
    session's records into its KV): the stored clips, transcripts and synopses with ids above
    ``after_id``, in id order, at most ``page_size`` of them and few enough for one reply
    (``query``, ``top_k``, ``recent_s`` and ``turn`` are not used); ``Retrieved.more`` says that
    more follow (ask again with ``after_id`` = the last item's id).
    """

    request_id: str
    query: str
    top_k: int = 8
    recent_s: float = 30.0
    turn: str = ""
    after_id: int = 0
    page_size: int = 0


class Record(Message):
    """Memory stored a record spanning [t0, ts]: a clip description, a final transcript, a
    sighting, or a synopsis (the acknowledgement of a ``Synopsis``)."""

    item_id: int
    kind: Literal["clip", "transcript", "sighting", "synopsis"]
    t0: float
    text: str
    speaker: str = ""


class Synopsis(Message):
    """Reasoning's running summary of ``session`` from its start to stream time ``ts``.

    ``through_item_id`` is the last record it took into account; memory stores it (the L3 tier)
    and acknowledges it with a ``Record`` of kind "synopsis".
    """

    text: str
    t0: float = 0.0
    through_item_id: int = 0


class Retrieved(Message):
    request_id: str
    items: list[MemoryRecord] = []
    error: str = ""
    more: bool = False  # a history page (``Retrieve.page_size``) with more records after it


class DeleteSession(Message):
    """Delete everything stored for ``session``: its records, watches and spilled KV.

    ``omnistream sessions delete`` sends it to memory's ROUTER (a session that is live, with
    messages in the last few minutes, is refused unless ``force``); memory answers ``Ack`` (or
    ``Error``) and, as for a session its retention policy deletes, publishes it on the bus so
    reasoning drops the session's KV from RAM."""

    request_id: str = ""
    force: bool = False


class HistoryRequest(Message):
    """A client asks what memory recorded in ``session`` over stream times [t0, t1].

    Records overlapping the range are returned in time order, at most ``limit`` of them;
    ``kinds`` restricts them to clips, transcripts, consolidated events or synopses (empty:
    clips and transcripts). ``newest`` returns the newest ``limit`` records instead of the oldest
    (still oldest first): ``limit=1, newest=True`` is where the session's stream time stands.
    """

    request_id: str
    t0: float = 0.0
    t1: float = 1e12
    kinds: list[RecordKind] = []
    limit: int = 500
    newest: bool = False


class History(Message):
    """Memory's answer to a ``HistoryRequest``; ``truncated`` when more records matched."""

    request_id: str
    items: list[MemoryRecord] = []
    truncated: bool = False


class KVBlock(Message):
    """A block of cached keys/values for a span of memory text (filled by the KV-streaming reasoner).

    ``keys``/``values``: float16 (layers, kv_heads, tokens, head_dim).
    """

    block_id: int
    t0: float
    keys: np.ndarray
    values: np.ndarray
    text: str = ""


# --- control -----------------------------------------------------------------------------------------


class Stats(Message):
    """Periodic health of one stage. ``counters`` are totals; ``rates`` are per second."""

    stage: str
    pid: int = 0
    counters: dict[str, float] = {}
    rates: dict[str, float] = {}
    state: str = "running"


class StatusRequest(Message):
    request_id: str = ""


class Status(Message):
    request_id: str = ""
    stages: dict[str, Stats] = {}


class Error(Message):
    """A rejected message or a failed request. ``code`` is a stable machine-readable name."""

    code: str
    message: str
    request_id: str = ""


class Ready(Message):
    stage: str
    pid: int


class Shutdown(Message):
    reason: str = ""


class Ack(Message):
    request_id: str = ""


AnyMessage = Union[  # noqa: UP007 - a runtime Union: msgspec decodes into it
    VideoFrame,
    AudioChunk,
    AudioOut,
    Percept,
    Clip,
    Sighting,
    Transcript,
    UserSpeech,
    Ask,
    Draft,
    AnswerDelta,
    AnswerDone,
    Interrupt,
    Watch,
    WatchesRequest,
    Watches,
    Alert,
    Retrieve,
    Retrieved,
    Record,
    Synopsis,
    HistoryRequest,
    History,
    DeleteSession,
    KVBlock,
    Stats,
    StatusRequest,
    Status,
    Error,
    Ready,
    Shutdown,
    Ack,
]

MESSAGE_TYPES: dict[str, type[Message]] = {t.__name__: t for t in AnyMessage.__args__}  # type: ignore[attr-defined]

# System-priority messages are handled before any queued data (pipecat's SystemFrame idea).
SYSTEM_TYPES = (Interrupt, UserSpeech, Shutdown)
