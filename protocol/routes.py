"""The conversation: for every message type, who sends it, who receives it, on which channel.

This table is where routing is decided. Each stage's subscriptions (``subscriptions``), the
requests the gateway accepts from clients (``client_requests``), the events it relays to them
(``relayed_to_clients``) and the topics that travel on the media bus (``media_topics``) are
derived from it; docs/architecture.md's message table is checked against it by
tests/unit/test_routes.py.

Channels:
- "bus": PUB to the bus proxy, SUB by type name (``Runtime.subscribe``);
- "media": the same for large, droppable payloads (frames), on their own proxy;
- "gateway": a client's DEALER to the gateway's ROUTER (a request, and its direct reply);
- "memory": reasoning's and the gateway's DEALER to memory's ROUTER (request and reply);
- "control": a stage's PUSH to the launcher (readiness);
- "none": a type no process sends (kept for the codec's tests of multi-array messages).

Parties: the stages by name ("perception", "memory", "reasoning", "speech", "gateway"), the
"launcher", any "client" (through the gateway), and "*" (every stage).
"""

from __future__ import annotations

from dataclasses import dataclass

from omnistream.protocol.messages import (
    Ack,
    Alert,
    AnswerDelta,
    AnswerDone,
    Ask,
    AudioChunk,
    AudioOut,
    Clip,
    DeleteSession,
    Draft,
    Error,
    History,
    HistoryRequest,
    Interrupt,
    KVBlock,
    Message,
    Percept,
    Ready,
    Record,
    Retrieve,
    Retrieved,
    Shutdown,
    Sighting,
    Stats,
    Status,
    StatusRequest,
    Synopsis,
    Transcript,
    UserSpeech,
    VideoFrame,
    Watch,
    Watches,
    WatchesRequest,
)

CHANNELS = ("bus", "media", "gateway", "memory", "control", "none")
STAGES = ("perception", "memory", "reasoning", "speech", "gateway")


@dataclass(frozen=True)
class Route:
    message: type[Message]
    senders: tuple[str, ...]
    receivers: tuple[str, ...]
    channel: str
    why: str

    @property
    def name(self) -> str:
        return self.message.__name__


def _r(message: type[Message], senders: str, receivers: str, channel: str, why: str) -> Route:
    assert channel in CHANNELS, channel
    return Route(message, tuple(senders.split()), tuple(receivers.split()), channel, why)


# A client's request reaches the gateway on "gateway"; the gateway checks it and passes it on
# (the row of the same type on "bus"/"media"/"memory" says where).
ROUTES: tuple[Route, ...] = (
    _r(VideoFrame, "client", "gateway", "gateway", "a camera frame"),
    _r(VideoFrame, "gateway", "perception", "media", "frames to encode (latest wins)"),
    _r(AudioChunk, "client", "gateway", "gateway", "microphone or stream sound"),
    _r(AudioChunk, "gateway perception", "speech", "bus", "sound to transcribe (a file source's too)"),
    _r(Ask, "client", "gateway", "gateway", "a question"),
    _r(Ask, "gateway speech", "reasoning memory speech", "bus", "a question (typed or spoken)"),
    _r(Interrupt, "client", "gateway", "gateway", "stop answering"),
    _r(Interrupt, "gateway speech", "reasoning speech gateway", "bus", "barge-in or a client's stop"),
    _r(Watch, "client", "gateway", "gateway", "a standing question"),
    _r(Watch, "gateway", "memory", "memory", "a standing question to check and store"),
    _r(Watch, "memory", "reasoning", "bus", "a stored (or cancelled) standing question"),
    _r(WatchesRequest, "reasoning", "memory", "memory", "a session's stored watches"),
    _r(Watches, "memory", "reasoning", "memory", "reply to WatchesRequest"),
    _r(StatusRequest, "client", "gateway", "gateway", "which stages run"),
    _r(Status, "gateway", "client", "gateway", "reply to StatusRequest"),
    _r(HistoryRequest, "client", "gateway", "gateway", "what memory recorded"),
    _r(HistoryRequest, "gateway", "memory", "memory", "forwarded history query"),
    _r(History, "memory", "gateway", "memory", "reply to HistoryRequest"),
    _r(History, "gateway", "client", "gateway", "reply to HistoryRequest"),
    _r(Ack, "gateway", "client", "gateway", "a request accepted"),
    _r(Ack, "memory", "gateway client", "memory", "a watch stored, a session deleted"),
    _r(DeleteSession, "client", "memory", "memory", "delete a stored session (omnistream sessions)"),
    _r(DeleteSession, "memory", "reasoning", "bus", "a session deleted: drop its KV"),
    _r(Percept, "perception", "memory gateway", "bus", "what one analysed frame shows"),
    _r(Clip, "perception", "memory gateway", "bus", "a closed scene"),
    _r(Sighting, "perception", "memory gateway", "bus", "an object or person appearing or leaving"),
    _r(Transcript, "speech", "memory gateway", "bus", "words heard, with stream times"),
    _r(UserSpeech, "speech", "gateway", "bus", "the user started or stopped speaking"),
    _r(Draft, "speech", "reasoning", "bus", "a spoken question so far, read ahead"),
    _r(Retrieve, "reasoning", "memory", "memory", "memory for a question"),
    _r(Retrieved, "memory", "reasoning", "memory", "reply to Retrieve"),
    _r(Record, "memory", "reasoning", "bus", "a stored record to stream into the KV cache"),
    _r(Synopsis, "reasoning", "memory", "bus", "the running summary to store"),
    _r(AnswerDelta, "reasoning", "speech gateway", "bus", "the next piece of an answer"),
    _r(AnswerDone, "reasoning gateway", "speech gateway", "bus", "an answer's end (or failure)"),
    _r(AudioOut, "speech", "gateway", "bus", "the answer spoken"),
    _r(Alert, "reasoning", "gateway", "bus", "a watch became true"),
    _r(Stats, "* launcher", "gateway", "bus", "counters, rates and state of a process"),
    _r(Error, "*", "gateway", "bus", "a stage could not do something"),
    _r(Error, "gateway", "client", "gateway", "a request refused"),
    _r(Error, "memory", "reasoning gateway client", "memory", "a memory request refused or failed"),
    _r(Shutdown, "launcher", "*", "bus", "stop"),
    _r(Ready, "* bus", "launcher", "control", "a process is up"),
    _r(KVBlock, "", "", "none", "not sent: the codec's multi-array test type"),
)


def routes(message: type[Message]) -> list[Route]:
    return [route for route in ROUTES if route.message is message]


def subscriptions(stage: str) -> tuple[type[Message], ...]:
    """What ``stage`` subscribes to on the bus and the media bus (``Runtime.subscribe``)."""
    found = [
        route.message
        for route in ROUTES
        if route.channel in ("bus", "media") and stage in route.receivers and route.message is not Shutdown
    ]
    return tuple(dict.fromkeys(found))


def client_requests() -> tuple[type[Message], ...]:
    """What the gateway accepts from a client."""
    return tuple(dict.fromkeys(r.message for r in ROUTES if r.channel == "gateway" and "client" in r.senders))


def relayed_to_clients() -> tuple[type[Message], ...]:
    """What the gateway relays from the bus to every client's SUB."""
    return subscriptions("gateway")


def media_topics() -> tuple[bytes, ...]:
    return tuple(dict.fromkeys(r.name.encode() for r in ROUTES if r.channel == "media"))
