"""The cluster placement's pieces that need no Ray nor another process: the stage order and
replica names, the gateway and a replica's per-session filtering (the shard owner across
processes and CURVE between stages: tests/integration/test_cluster_processes.py)."""

from __future__ import annotations

from pathlib import Path

from omnistream.app.cluster import ClusterSystem, owner
from omnistream.protocol.config import load_config


def test_the_stages_start_bus_then_memory_and_reasoning_replicas_get_names() -> None:
    config = load_config(None, {"cluster.reasoning_replicas": 2})
    system = ClusterSystem.__new__(ClusterSystem)
    system.config = config
    assert system.names() == [
        "bus",
        "memory",
        "gateway",
        "perception",
        "reasoning-0",
        "reasoning-1",
        "speech",
    ]
    system.config = load_config(None, {})
    assert system.names() == ["bus", "memory", "gateway", "perception", "reasoning", "speech"]


def test_a_restarted_replica_fails_only_the_questions_of_its_own_sessions(tmp_path: Path) -> None:
    from omnistream.app.gateway import ClientRequest, GatewayStage
    from omnistream.protocol.codec import encode
    from omnistream.protocol.messages import AnswerDelta, AnswerDone, Ask, Stats

    from ..harness import run_stage

    config = load_config(None, {"paths.data_dir": str(tmp_path / "data"), "cluster.reasoning_replicas": 2})
    stage = GatewayStage(config, lambda message, to=None: True)
    names = [f"s{i}" for i in range(50)]
    mine, theirs = (next(n for n in names if owner(n, 2) == i) for i in (0, 1))
    asks = [
        Ask(session=mine, turn="t0", question="what is here?"),
        Ask(session=theirs, turn="t1", question="and?"),
    ]
    requests = [
        ClientRequest(b"alice", ("connection", b"alice"), [bytes(f) for f in encode(a)]) for a in asks
    ]
    run = run_stage(
        stage,
        [
            Stats(stage="reasoning-0", pid=100),
            Stats(stage="reasoning-1", pid=200),
            *requests,
            AnswerDelta(session=mine, turn="t0", text="A", seq=0),
            AnswerDelta(session=theirs, turn="t1", text="B", seq=0),
            Stats(stage="reasoning-0", pid=101),  # replica 0 restarted (Ray) while answering t0
            Stats(stage="reasoning-1", pid=200),
        ],
    )
    failed = [s.message for s in run.sent if s.to.channel == "clients" and isinstance(s.message, AnswerDone)]
    assert [(d.turn, "restarted" in d.error) for d in failed] == [("t0", True)]
    assert "t1" in stage.pending and "t0" not in stage.pending  # replica 1's answer goes on


def test_a_replica_keeps_its_sessions_messages_and_every_replica_the_shutdown(monkeypatch) -> None:
    from collections import defaultdict
    from types import SimpleNamespace

    from omnistream.app.cluster import shard_filter
    from omnistream.protocol import runtime
    from omnistream.protocol.messages import Ask, Record, Shutdown

    names = [f"s{i}" for i in range(50)]
    mine, theirs = (next(n for n in names if owner(n, 2) == i) for i in (1, 0))
    bus = [
        Record(session=mine, item_id=1, kind="clip", t0=0.0, text="a"),
        Record(session=theirs, item_id=2, kind="clip", t0=0.0, text="b"),
        Ask(session=theirs, turn="t", question="?"),
        Ask(session=mine, turn="u", question="?"),
        Shutdown(session=theirs),
    ]
    monkeypatch.setattr(runtime.Runtime, "_drain", lambda self, sock, latest_only: list(bus))
    monkeypatch.setattr(runtime.Runtime, "__init__", runtime.Runtime.__init__)
    shard_filter(1, 2)
    memory_socket = object()
    replica = SimpleNamespace(memory=memory_socket, counters=defaultdict(float))
    kept = runtime.Runtime._drain(replica, "bus socket", False)
    assert [(type(m).__name__, m.session) for m in kept] == [
        ("Record", mine),
        ("Ask", mine),
        ("Shutdown", theirs),
    ]
    assert replica.counters["not_my_shard"] == 2
    assert runtime.Runtime._drain(replica, memory_socket, False) == bus  # replies to its own requests
