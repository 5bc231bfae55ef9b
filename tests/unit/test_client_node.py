"""The Node.js example client (examples/node) against real omnistream processes.

It is written from docs/protocol.md alone, so these tests check that the documented wire protocol
is enough for a client in another language: status, frames pushed as ndarray buffers, errors with
their codes, and a question answered by the real LLM with the answer streamed as deltas.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from omnistream.app.client import Client
from omnistream.app.launcher import Launcher

from ..conftest import make_config

NODE_DIR = Path(__file__).resolve().parents[2] / "examples" / "node"


def node(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    assert shutil.which("node"), "Node.js is missing: scripts/install.sh installs it"
    assert (NODE_DIR / "node_modules" / "zeromq").is_dir(), (
        "examples/node/node_modules is missing: run scripts/install.sh (npm ci in examples/node)"
    )
    return subprocess.run(
        ["node", *args], cwd=NODE_DIR, capture_output=True, text=True, timeout=timeout_s, check=False
    )


@pytest.fixture
def gateway_only(short_tmp: Path):
    launcher = Launcher(make_config(short_tmp, ("gateway",)), short_tmp / "run")
    launcher.start()
    yield launcher
    launcher.shutdown()


PUSH_AND_STATUS = """
import { Client } from "./omnistream.mjs";
const client = await Client.connect(process.argv[1]);
await client.pushFrame(new Uint8Array(4 * 6 * 3).fill(7), 6, 4, 1.5);
try { await client.history(5, 1); } catch (err) { console.log(JSON.stringify({ code: err.code })); }
const status = await client.status();
console.log(JSON.stringify({ stages: Object.keys(status.stages).sort(), pid: status.stages.gateway.pid }));
client.close();
"""


def test_node_client_speaks_the_protocol_to_a_real_gateway(gateway_only: Launcher) -> None:
    run_dir = str(gateway_only.run_dir)
    result = node("--input-type=module", "-e", PUSH_AND_STATUS, run_dir)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0] == {"code": "invalid"}  # HistoryRequest with t0 > t1, refused by name
    assert "gateway" in lines[1]["stages"]
    assert lines[1]["pid"] == gateway_only.children["gateway"].pid
    with Client.connect(gateway_only.run_dir, timeout_s=10) as client:
        counters = client.status().stages["gateway"].counters
    assert counters["in_VideoFrame"] == 1  # the 4x6 frame decoded and was accepted
    refused = node("ask.mjs", "   ", "--run-dir", run_dir)
    assert refused.returncode == 2
    assert "[invalid] Ask.question must have 1..2000 characters" in refused.stderr


def test_node_client_exit_codes_without_a_system(short_tmp: Path) -> None:
    missing = node("ask.mjs", "hello?", "--run-dir", str(short_tmp))
    assert missing.returncode == 3 and "no omnistream running" in missing.stderr
    usage = node("ask.mjs", "--bogus")
    assert usage.returncode == 2 and "unknown option --bogus" in usage.stderr


@pytest.mark.slow
def test_node_client_receives_a_streamed_answer_from_the_real_llm(short_tmp: Path) -> None:
    config = make_config(
        short_tmp, ("gateway", "memory", "reasoning"), **{"reasoning.model": "qwen2.5-coder-0.5b"}
    )
    launcher = Launcher(config, short_tmp / "run")
    try:
        launcher.start()
        result = node(
            "ask.mjs",
            "Count from one to five in words, separated by commas.",
            "--json",
            "--run-dir",
            str(launcher.run_dir),
            timeout_s=300,
        )
    finally:
        launcher.shutdown()
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    deltas = [e["delta"] for e in events if "delta" in e]
    done = events[-1]["done"]
    assert len(deltas) >= 3, events  # streamed, not one block
    assert "".join(deltas).strip() == done["text"].strip()
    assert done["type"] == "AnswerDone" and not done.get("error")
    words = done["text"].lower()
    # The system prompt asks for the number: the model may write the words or the digits.
    assert all(word in words for word in ("one", "three", "five")) or all(d in words for d in "135"), words
