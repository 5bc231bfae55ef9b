"""The gateway's rules through the stage harness (tests/harness.py): no sockets, no processes.

A client's request reaches ``GatewayStage.handle`` as a ``ClientRequest`` (identity, whom it is
charged to, its encoded frames); what the stage sends comes back from ``run_stage`` with where it
went (the client that asked, every client, memory, the bus).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from omnistream.app.gateway import ClientRequest, GatewayStage
from omnistream.protocol.codec import encode
from omnistream.protocol.config import load_config
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
    Transcript,
    Watch,
)
from omnistream.protocol.runtime import MemoryReply

from ..harness import run_stage

ALICE, BOB = b"alice", b"bob"


def gateway(tmp_path: Path, **overrides) -> GatewayStage:
    config = load_config(None, {"paths.data_dir": str(tmp_path / "data"), **overrides})
    return GatewayStage(config, lambda message, to=None: True)


def request(message: Message, identity: bytes = ALICE) -> ClientRequest:
    return ClientRequest(identity, ("connection", identity), [bytes(f) for f in encode(message)])


def replies_to(run, identity: bytes) -> list[Message]:
    return [s.message for s in run.sent if s.to.channel == "client" and s.to.identity == identity]


def on(run, channel: str) -> list[Message]:
    return [s.message for s in run.sent if s.to.channel == channel]


def test_requests_out_of_bounds_are_refused_with_the_reason(tmp_path: Path) -> None:
    stage = gateway(tmp_path)
    run = run_stage(
        stage,
        [
            request(Ask(turn="t1", question="")),
            request(Ask(turn="t2", question="x" * 2001)),
            request(Ask(turn="t3", question="ok?", choices=["A one"] * 27)),
            request(Watch(watch_id="w", condition="bell\x07")),
            request(AudioChunk(pcm=np.zeros(160, np.float32), sample_rate=44101)),
            request(Transcript(t0=0.0, text="clients may not send this")),
            ClientRequest(ALICE, ("connection", ALICE), [b"Ask", b"\xff not msgpack"]),
        ],
    )
    errors = replies_to(run, ALICE)
    assert [e.code for e in errors] == ["invalid"] * 5 + ["unsupported", "invalid"], errors
    assert "Ask.question must have 1..2000 characters, got 0" in errors[0].message
    assert errors[0].request_id == "t1" and errors[2].request_id == "t3"
    assert "at most 26 entries, got 27" in errors[2].message
    assert "control character U+0007 at index 4" in errors[3].message
    assert "clients may not send Transcript" in errors[5].message
    assert errors[6].message  # a header that does not decode, named
    assert not on(run, "bus")  # nothing refused went on
    assert stage.counters["rejected"] == 7


def test_an_ask_is_acknowledged_and_published_and_its_answer_relayed(tmp_path: Path) -> None:
    stage = gateway(tmp_path)
    ask = Ask(session="s", turn="t1", question="what is on the table?")
    run = run_stage(
        stage,
        [
            request(ask),
            request(ask),  # a re-send: acknowledged again, published once
            AnswerDelta(session="s", turn="t1", text="A cup", seq=0),
            AnswerDone(session="s", turn="t1", text="A cup."),
        ],
    )
    acks = replies_to(run, ALICE)
    assert [type(a) for a in acks] == [Ack, Ack] and all(a.request_id == "t1" for a in acks)
    assert on(run, "bus") == [ask]
    assert [type(m) for m in on(run, "clients")] == [AnswerDelta, AnswerDone]
    assert not stage.pending  # answered


def test_status_history_and_watches_are_routed(tmp_path: Path) -> None:
    stage = gateway(tmp_path)
    run = run_stage(
        stage,
        [
            Stats(stage="memory", pid=7),
            request(StatusRequest(request_id="st")),
            request(HistoryRequest(session="s", request_id="h1")),
            request(Watch(session="s", watch_id="w1", condition="a person enters"), BOB),
        ],
    )
    [status] = replies_to(run, ALICE)
    assert (
        isinstance(status, Status)
        and status.request_id == "st"
        and set(status.stages) == {"memory", "gateway"}
    )
    forwarded = on(run, "memory")
    assert [type(m) for m in forwarded] == [HistoryRequest, Watch]
    assert forwarded[0].request_id != "h1"  # under the gateway's own id
    assert not replies_to(run, BOB)  # the watch's Ack is memory's
    # Memory's replies go back to the client that asked, under its own request id.
    history = History(session="s", request_id=forwarded[0].request_id, items=[])
    run = run_stage(
        stage,
        [
            MemoryReply(history),
            MemoryReply(Ack(session="s", request_id="w1")),
            MemoryReply(History(session="s", request_id="late")),  # nobody waits: dropped
        ],
    )
    [reply] = replies_to(run, ALICE)
    assert isinstance(reply, History) and reply.request_id == "h1"
    [ack] = replies_to(run, BOB)
    assert isinstance(ack, Ack) and ack.request_id == "w1"
    assert not stage.history_pending and not stage.watch_pending


def test_a_history_request_memory_does_not_answer_fails_in_time(tmp_path: Path, monkeypatch) -> None:
    from omnistream.app import gateway as gateway_module

    stage = gateway(tmp_path)
    run_stage(stage, [request(HistoryRequest(session="s", request_id="h1"))])
    monkeypatch.setattr(gateway_module, "HISTORY_TIMEOUT_S", 0.0)
    stage.history_pending = {k: (i, r, 0.0) for k, (i, r, _) in stage.history_pending.items()}
    run = run_stage(stage, [])
    [error] = replies_to(run, ALICE)
    assert isinstance(error, Error) and error.code == "unavailable" and error.request_id == "h1"


def test_audio_beyond_the_clients_budget_is_dropped(tmp_path: Path) -> None:
    stage = gateway(tmp_path, **{"gateway.client_audio_speed": 1.0, "gateway.client_audio_burst_s": 3.0})
    second = np.zeros(16_000, np.float32)
    run = run_stage(stage, [request(AudioChunk(session="s", pcm=second)) for _ in range(10)])
    assert len(on(run, "bus")) == 3  # the burst, then about 1 s per second of wall time
    assert stage.counters["audio_dropped"] == 7
    assert not replies_to(run, ALICE)  # dropped quietly (a live stream goes on)


def test_too_many_pending_questions_are_refused_busy_and_a_stalled_one_fails(tmp_path: Path) -> None:
    stage = gateway(tmp_path, **{"gateway.max_pending_asks": 2, "gateway.ask_timeout_s": 0.0})
    asks = [Ask(session="s", turn=f"t{i}", question="what?") for i in range(3)]
    run = run_stage(stage, [request(a) for a in asks])
    replies = replies_to(run, ALICE)
    assert [type(r) for r in replies] == [Ack, Ack, Error] and replies[2].code == "busy"
    # No progress within ask_timeout_s: both end with an error, to the clients and on the bus.
    failed = [m for m in on(run, "clients") if isinstance(m, AnswerDone)]
    assert sorted(d.turn for d in failed) == ["t0", "t1"] and all(
        "no answer progress" in d.error for d in failed
    )
    interrupts = [m for m in on(run, "bus") if isinstance(m, Interrupt)]
    assert sorted(i.turn for i in interrupts) == ["t0", "t1"]  # reasoning stops working on them
