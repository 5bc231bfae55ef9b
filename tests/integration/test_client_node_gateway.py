"""The Node.js example client (examples/node) against real omnistream processes.

It is written from docs/protocol.md alone, so these tests check that the documented wire protocol
is enough for a client in another language: status, frames pushed as ndarray buffers, errors with
their codes, and a question answered by the real LLM with the answer streamed as deltas. Its own
tests (``node --test``: the codec against messages encoded by protocol/codec.py, the key files)
run here too, with a check that its generated schema and fixtures match protocol/messages.py, and
it reaches a CURVE gateway with the keys Python wrote. The whole system from Node (frames, audio,
ask, interrupt, watch, history) is tests/integration/test_client_node.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from omnistream.app.client import Client
from omnistream.app.launcher import Launcher
from omnistream.protocol.security import write_keypair

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


def test_node_schema_and_fixtures_match_protocol_messages() -> None:
    """lib/messages.mjs and test/fixtures/codec.json are generated from the Python side; a change
    to protocol/messages.py or protocol/codec.py needs them generated again."""
    spec = importlib.util.spec_from_file_location("node_generate", NODE_DIR / "tools" / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    for path, text in generate.outputs().items():
        assert path.read_text() == text, (
            f"{path.relative_to(NODE_DIR)} is stale: run .venv/bin/python -P examples/node/tools/generate.py"
        )


def test_node_client_own_tests_pass() -> None:
    result = node("--test", "test/", timeout_s=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout


CURVE_SESSION = """
import { Client } from "./omnistream.mjs";
const [runDir, keysDir, endpoint, strangerDir] = process.argv.slice(1);
const out = (record) => console.log(JSON.stringify(record));
const client = await Client.connect(runDir, { keysDir, keyName: "node", timeoutMs: 20000 });
const pushed = [
  await client.pushAudio(new Int16Array([0, 1000, -1000, 32767]), 16000, 0.5, { channel: "scene" }),
  await client.pushAudio(new Float32Array(1600).fill(0.25), 16000, 0.75),
  await client.pushFrame(new Uint8Array(8 * 4 * 3).fill(200), 4, 8, 1.0, { index: 1 }),
];
await client.interrupt("no-such-turn");
const status = await client.status();
out({ curve: client.addresses.curve, pushed, gateway: status.stages.gateway.counters });
try { await client.pushFrame(new Uint8Array(3), 1, 9000, 2.0); } catch (err) { out({ frame: err.code }); }
client.close();
const remote = await Client.connect(undefined, { endpoint, keysDir, keyName: "node", timeoutMs: 20000 });
out({ remote: Object.keys((await remote.status()).stages) });
remote.close();
for (const [dir, name] of [[strangerDir, "client"], [keysDir + "/nowhere", "node"]]) {
  try {
    (await Client.connect(undefined, { endpoint, keysDir: dir, keyName: name, timeoutMs: 3000 })).close();
    out({ refused: null });
  } catch (err) { out({ refused: err.code, message: err.message }); }
}
"""


def test_node_client_reaches_a_curve_gateway_with_the_keys_python_wrote(
    short_tmp: Path, curve_gateway
) -> None:
    launcher, keys_dir, port = curve_gateway("node")
    stranger = short_tmp / "stranger"
    write_keypair(stranger, "client")  # well-formed, not authorised
    (stranger / "server.key").write_text((keys_dir / "server.key").read_text())
    endpoint = f"tcp://127.0.0.1:{port}"
    args = (str(launcher.run_dir), str(keys_dir), endpoint, str(stranger))
    result = node("--input-type=module", "-e", CURVE_SESSION, *args, timeout_s=90)
    curve_args = ("--endpoint", endpoint, "--keys-dir", str(keys_dir), "--key-name", "node")
    refused = node("ask.mjs", "   ", *curve_args, timeout_s=60)  # reached over CURVE, then refused
    assert refused.returncode == 2 and "[invalid] Ask.question must have" in refused.stderr, refused.stderr
    assert result.returncode == 0, result.stderr
    first, frame, remote, stranger_refused, no_keys = [
        json.loads(line) for line in result.stdout.splitlines()
    ]
    assert first["curve"] is True and first["pushed"] == [True, True, True]
    # The gateway decoded both PCM types and the frame (it counts what it accepted).
    assert first["gateway"]["in_AudioChunk"] == 2 and first["gateway"]["in_VideoFrame"] == 1
    assert first["gateway"]["in_Interrupt"] == 1
    assert frame == {"frame": "too_large"}  # refused before sending: 9000 px is over the limit
    assert "gateway" in remote["remote"]  # tcp://127.0.0.1:PORT with keysDir: CURVE on loopback
    assert stranger_refused["refused"] in ("timeout", "unreachable"), stranger_refused  # ZAP refused it
    assert no_keys["refused"] == "keys" and "requires CURVE keys" in no_keys["message"], no_keys
