"""`omnistream up --ray`: the system placed across a local two-node Ray cluster (real processes,
the fast LLM), a replay answered, then the reasoning replica that owns the session killed and the
session answered again once Ray has restarted it (what memory acknowledged is not lost).

Node A (``ray start --head``) offers the edge resources (bus, gateway, perception, memory), node B
the reasoning one, as a camera box and a GPU box would. Skipped when Ray (the cluster extra) is not
installed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omnistream.app.client import Client
from omnistream.app.models import prepare_llm_cache
from omnistream.app.replay import DEFAULT_SAMPLE, Replayer, ScheduledAsk

from ..conftest import make_config

pytestmark = pytest.mark.slow
ray = pytest.importorskip(
    "ray",
    reason="Ray is not installed: the cluster extra (pip install 'omnistream[cluster]' or install.sh --cluster)",
)

from omnistream.app.cluster import ClusterSystem, owner  # noqa: E402

QUESTION = "Which animal was on screen?"
EDGE = {"omnistream_bus": 1, "omnistream_gateway": 1, "omnistream_perception": 1, "omnistream_memory": 1}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_start(*args: str) -> None:
    ray_bin = Path(sys.executable).parent / "ray"
    done = subprocess.run(
        [str(ray_bin), "start", "--disable-usage-stats", *args], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def cluster_address():
    port = free_port()
    temp = f"/tmp/ray-os-{os.getpid()}"
    common = ["--num-cpus", "2", "--include-dashboard=false"]
    ray_start("--head", "--port", str(port), "--temp-dir", temp, "--resources", json.dumps(EDGE), *common)
    address = f"127.0.0.1:{port}"
    try:
        ray_start(
            "--address",
            address,
            "--resources",
            json.dumps({"omnistream_reasoning": 1}),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--num-cpus",
            "2",
        )
        yield address
    finally:
        ray_bin = Path(sys.executable).parent / "ray"
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True)


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(1.0)
    raise AssertionError(f"{what} after {timeout_s:.0f} s")


def test_gateway_and_memory_over_curve_and_memory_restarted_on_its_node(
    cluster_address: str, tmp_path: Path
) -> None:
    """No models: the gateway reaches memory over tcp + CURVE through addresses found in the
    cluster; memory's actor killed, Ray restarts it on its node with the same port, and the
    gateway's requests are answered again without the gateway restarting."""
    config = make_config(tmp_path, ("gateway", "memory"))
    run_dir = Path("/tmp") / f"os-cm-{os.getpid()}"
    system = ClusterSystem(config, cluster_address, run_dir)
    try:
        system.start()
        rows = {row["stage"]: row for row in system.status_rows()}
        assert set(rows) == {"bus", "memory", "gateway"} and all(r["state"] == "ready" for r in rows.values())
        with Client.connect(run_dir, timeout_s=30) as client:
            assert client.history().items == []
            os.kill(rows["memory"]["actor_pid"], signal.SIGKILL)

            def restarted():
                row = {r["stage"]: r for r in system.status_rows()}["memory"]
                return row if row["state"] == "ready" and row["restarts"] == 1 else None

            row = wait_for(restarted, 120, "memory not restarted by Ray")
            assert row["node"] == rows["memory"]["node"] and row["pid"] != rows["memory"]["pid"]
            assert client.history().items == []  # the gateway's socket reconnected by itself
        after = {r["stage"]: r for r in system.status_rows()}
        assert after["gateway"]["restarts"] == 0 and after["gateway"]["pid"] == rows["gateway"]["pid"]
    finally:
        system.shutdown()
        ray.shutdown()


@pytest.mark.extended  # whole system, two LLM replicas: minutes (bash scripts/test.sh --extended)
def test_placed_across_two_nodes_answered_and_a_killed_replica_restarted_by_ray(
    cluster_address: str, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path,
        ("gateway", "perception", "memory", "reasoning"),
        **{
            "reasoning.model": "qwen2.5-coder-0.5b",
            "reasoning.max_new_tokens": 24,
            "cluster.reasoning_replicas": 2,
        },
    )
    prepare_llm_cache(config, progress=False)
    run_dir = Path("/tmp") / f"os-cl-{os.getpid()}"
    system = ClusterSystem(config, cluster_address, run_dir)
    try:
        system.start()
        rows = {row["stage"]: row for row in system.status_rows()}
        assert set(rows) == {"bus", "memory", "gateway", "perception", "reasoning-0", "reasoning-1"}
        assert all(row["state"] == "ready" and row["pid"] > 0 for row in rows.values()), rows
        # placed by resources: both replicas on node B, the edge stages on node A
        edge_nodes = {rows[name]["node"] for name in ("bus", "gateway", "perception", "memory")}
        reasoning_nodes = {rows["reasoning-0"]["node"], rows["reasoning-1"]["node"]}
        assert len(edge_nodes) == 1 and len(reasoning_nodes) == 1 and edge_nodes != reasoning_nodes, rows

        with Client.connect(run_dir, timeout_s=60) as client:
            [answer] = Replayer(client, speak=False).run(
                DEFAULT_SAMPLE, [ScheduledAsk(30.0, QUESTION)], speed=3.0, answer_timeout_s=240
            )
        assert answer.done is not None and not answer.done.error, answer.done
        assert "butterfly" in answer.text.lower() or "monarch" in answer.text.lower(), answer.text

        mine = f"reasoning-{owner('default', 2)}"
        killed = rows[mine]
        os.kill(killed["actor_pid"], signal.SIGKILL)  # the replica's actor (its stage dies with it)

        def restarted():
            row = {r["stage"]: r for r in system.status_rows()}[mine]
            return (
                row
                if row["state"] == "ready" and row["restarts"] == 1 and row["pid"] != killed["pid"]
                else None
            )

        row = wait_for(restarted, 300, f"{mine} not restarted by Ray")
        assert row["node"] == killed["node"]
        others = {r["stage"]: r for r in system.status_rows()}
        assert all(others[name]["restarts"] == 0 for name in others if name != mine), others

        with Client.connect(run_dir, timeout_s=60) as client:
            text = "".join(client.ask(QUESTION, ts=31.0, timeout_s=240)).lower()
            assert client.last_done is not None and not client.last_done.error, client.last_done
        assert "butterfly" in text or "monarch" in text, text
    finally:
        system.shutdown()
        ray.shutdown()
