"""The cluster placement's pieces that need no Ray: the session shard owner, CURVE between stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import zmq

from omnistream.app.cluster import ClusterSystem, owner
from omnistream.protocol.config import load_config

PEER = textwrap.dedent(
    """
    import json, sys, time, zmq
    from pathlib import Path
    from omnistream.app.cluster import secure_tcp
    keys = json.loads(sys.argv[2])
    secure_tcp(keys, Path(sys.argv[3]))
    ctx = zmq.Context()
    if sys.argv[1] == "server":
        sock = ctx.socket(zmq.PULL)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        print(port, flush=True)
        got = []
        deadline = time.monotonic() + float(sys.argv[4])
        while time.monotonic() < deadline:
            if sock.poll(100):
                got.append(sock.recv().decode())
        print(json.dumps(got), flush=True)
    else:
        sock = ctx.socket(zmq.PUSH)
        sock.connect(f"tcp://127.0.0.1:{sys.argv[4]}")
        sock.send(sys.argv[5].encode())
        time.sleep(1.0)
    sock.close(0)
    ctx.term()
    """
)


def keys() -> dict[str, str]:
    server, client = zmq.curve_keypair(), zmq.curve_keypair()
    return {
        "server_public": server[0].decode(),
        "server_secret": server[1].decode(),
        "client_public": client[0].decode(),
        "client_secret": client[1].decode(),
    }


def peer(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-P", "-c", PEER, *args], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )


def test_a_session_always_has_the_same_owner_spread_over_the_replicas() -> None:
    sessions = [f"cam{i}" for i in range(400)]
    owners = [owner(s, 4) for s in sessions]
    assert owners == [owner(s, 4) for s in sessions] and set(owners) == {0, 1, 2, 3}
    assert min(Counter(owners).values()) > 60  # about 100 each
    assert all(owner(s, 1) == 0 for s in sessions[:20])
    # the same in another process (Python's own hash() is salted per process)
    code = "from omnistream.app.cluster import owner; print([owner(f'cam{i}', 4) for i in range(400)])"
    other = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(other.stdout) == owners


def test_tcp_between_stages_is_curve_and_admits_only_the_cluster_key(tmp_path: Path) -> None:
    cluster = keys()
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "cluster.key").write_text(
        f'metadata\ncurve\n    public-key = "{cluster["client_public"]}"\n'
    )
    server = peer("server", json.dumps(cluster), str(authorized), "6")
    assert server.stdout is not None
    port = server.stdout.readline().strip()
    member = peer("client", json.dumps(cluster), str(authorized), port, "member")
    stranger_keys = {**keys(), "server_public": cluster["server_public"]}  # knows the server, not admitted
    stranger = peer("client", json.dumps(stranger_keys), str(authorized), port, "stranger")
    ctx = zmq.Context()
    plain = ctx.socket(zmq.PUSH)  # no CURVE at all
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(f"tcp://127.0.0.1:{port}")
    plain.send(b"plain", flags=zmq.NOBLOCK)
    member.wait(30)
    stranger.wait(30)
    got = json.loads(server.stdout.readline())
    server.wait(30)
    plain.close(0)
    ctx.term()
    assert got == ["member"]


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
