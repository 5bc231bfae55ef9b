"""The cluster placement's pieces that need no Ray but other processes: the session shard owner is
the same in every process, and tcp between stages is CURVE admitting only the cluster key.
(In-process: tests/unit/test_cluster.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import zmq

from omnistream.app.cluster import owner

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
