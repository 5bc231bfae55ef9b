"""The Node.js client (examples/node) against the whole real system, over CURVE.

Every process and default model runs with the gateway served beyond loopback (CURVE keys written
by ``generate_keys``, read by the Node client from the same files). A Node script registers a
watch, pushes the bundled recording's frames and audio (decoded here into raw RGB and PCM, half
of the audio chunks float32 and half int16), asks what was seen and heard, interrupts a second
answer, and reads history and status. What it printed is checked here: the answer names the
butterfly and the reader's "amiable", the alert came, the interrupted answer says so, history
holds the transcript, and the gateway counted every frame and chunk the script pushed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from omnistream.app.launcher import Launcher
from omnistream.app.models import prepare_llm_cache
from omnistream.app.replay import DEFAULT_SAMPLE
from omnistream.perception.sources import AUDIO_RATE, MediaReader

from ..conftest import make_config
from ..util import curve_settings

# Slow and long: in the extended set (bash scripts/test.sh --extended), not the default suite.
pytestmark = [pytest.mark.slow, pytest.mark.extended]

NODE_DIR = Path(__file__).resolve().parents[2] / "examples" / "node"
FPS = 5.0
SPEED = 3.0
QUESTION = "Which animal was on screen, and what did the reader say he might even have been made?"
LONG_QUESTION = "Describe in great detail, in at least fifteen sentences, everything you saw and heard."

SESSION = r"""
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Client } from "./omnistream.mjs";

const [runDir, keysDir, mediaDir] = process.argv.slice(1);
const out = (record) => console.log(JSON.stringify(record));
const client = await Client.connect(runDir, { keysDir, keyName: "node", session: "node", timeoutMs: 60000 });
out({ connected: true, curve: client.addresses.curve });

const errors = [];
const seen = {};
client.onEvent((event) => {
  seen[event.type] = (seen[event.type] || 0) + 1;
  if (event.type === "Error") errors.push(event);
});
const watchId = await client.watch("a butterfly appears on screen");
const alerts = [];
const watching = (async () => {
  for await (const alert of client.alerts(watchId, { timeoutMs: 180000 })) {
    alerts.push(alert);
    break;
  }
})();

// The recording, paced at SPEED x real time: frames as RGB bytes, audio float32 or int16.
const index = JSON.parse(readFileSync(join(mediaDir, "media.json"), "utf8"));
const media = readFileSync(join(mediaDir, "media.bin"));
const start = Date.now();
let frames = 0, chunks = 0, pushed = 0, lastTs = 0;
for (const [kind, ts, offset, nbytes, shape] of index) {
  const wait = start + (ts * 1000) / SPEED - Date.now();
  if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
  const bytes = media.subarray(offset, offset + nbytes);
  if (kind === "video") {
    pushed += await client.pushFrame(new Uint8Array(bytes), shape[1], shape[0], ts, { index: frames++ });
  } else {
    const copy = new Uint8Array(bytes).buffer; // aligned for the typed array
    const pcm = kind === "f4" ? new Float32Array(copy) : new Int16Array(copy);
    pushed += await client.pushAudio(pcm, AUDIO_RATE, ts, { channel: "scene" });
    chunks++;
  }
  lastTs = ts;
}
out({ frames, chunks, pushed, framesDropped: client.framesDropped, audioDropped: client.audioDropped });

const answer = client.ask(QUESTION, { ts: lastTs, timeoutMs: 240000 });
const deltas = [];
let step = await answer.next();
while (!step.done) {
  deltas.push(step.value);
  step = await answer.next();
}
out({ turn: answer.turn, deltas, done: step.value });

const long = client.ask(LONG_QUESTION, { ts: lastTs, timeoutMs: 240000 });
const first = await long.next();
await client.interrupt(long.turn);
let rest = await long.next();
let more = 0;
while (!rest.done) {
  more++;
  rest = await long.next();
}
out({ interruptedFirst: first.value, deltasAfterInterrupt: more, interrupted: rest.value });

await Promise.race([watching, new Promise((resolve) => setTimeout(resolve, 60000))]);
await client.cancelWatch(watchId);
out({ alerts, errors, cancelled: watchId, seen });

const history = await client.history(0, 1e12, ["clip", "transcript"]);
const newest = await client.history(0, 1e12, [], { limit: 1, newest: true });
out({ history: history.items, truncated: history.truncated, newest: newest.items });
const status = await client.status();
const counters = Object.fromEntries(Object.entries(status.stages).map(([name, stats]) => [name, stats.counters]));
out({ stages: Object.keys(status.stages).sort(), gateway: status.stages.gateway.counters, counters });
client.close();
"""


def write_media(directory: Path) -> tuple[int, int]:
    """The bundled recording as raw media: media.bin and its index media.json."""
    index, offset = [], 0
    chunks = 0
    with (directory / "media.bin").open("wb") as out:
        for event in MediaReader(DEFAULT_SAMPLE, max_fps=FPS):
            if event.kind == "video":
                data, kind, shape = (
                    np.ascontiguousarray(event.data, np.uint8),
                    "video",
                    list(event.data.shape),
                )
            else:
                pcm = np.asarray(event.data, np.float32)
                if chunks % 2:  # every other chunk as int16 PCM
                    data, kind = (np.clip(pcm, -1, 1) * 32767).astype("<i2"), "i2"
                else:
                    data, kind = pcm.astype("<f4"), "f4"
                shape = [len(pcm)]
                chunks += 1
            raw = data.tobytes()
            out.write(raw)
            index.append([kind, round(float(event.ts), 3), offset, len(raw), shape])
            offset += len(raw)
    (directory / "media.json").write_text(json.dumps(index))
    return sum(1 for e in index if e[0] == "video"), chunks


def test_node_client_over_curve_pushes_asks_interrupts_watches_and_reads_history(short_tmp: Path) -> None:
    if not shutil.which("node"):
        pytest.skip("Node.js is missing: scripts/install.sh installs it")
    if not (NODE_DIR / "node_modules" / "zeromq").is_dir():
        pytest.skip("examples/node/node_modules is missing: run scripts/install.sh (npm ci in examples/node)")
    n_frames, n_chunks = write_media(short_tmp)
    keys_dir = short_tmp / "keys"
    curve = curve_settings(keys_dir, "node")
    config = make_config(short_tmp, ("gateway", "perception", "memory", "reasoning", "speech"), **curve)
    prepare_llm_cache(config, progress=False)
    launcher = Launcher(config, short_tmp / "run")
    script = (
        SESSION.replace("SPEED", repr(SPEED))
        .replace("AUDIO_RATE", str(AUDIO_RATE))
        .replace("LONG_QUESTION", json.dumps(LONG_QUESTION))
        .replace("QUESTION", json.dumps(QUESTION))
    )
    try:
        launcher.start()
        node = subprocess.Popen(
            [
                "node",
                "--input-type=module",
                "-e",
                script,
                str(launcher.run_dir),
                str(keys_dir),
                str(short_tmp),
            ],
            cwd=NODE_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMNISTREAM_KEYS_DIR": str(short_tmp / "nowhere")},
        )
        deadline = time.monotonic() + 400
        while node.poll() is None and time.monotonic() < deadline:
            launcher.step(timeout_ms=100)  # supervise the stages while the script runs
        if node.poll() is None:
            node.kill()
        stdout, stderr = node.communicate(timeout=10)
    finally:
        launcher.shutdown()
    assert node.returncode == 0, f"node failed ({node.returncode}):\n{stderr}\n{stdout}"
    lines = {key: value for line in stdout.splitlines() for key, value in json.loads(line).items()}

    assert lines["connected"] and lines["curve"] is True
    # Every frame and chunk reached the gateway over CURVE, decoded, and was counted.
    assert (lines["frames"], lines["chunks"]) == (n_frames, n_chunks)
    assert lines["pushed"] == n_frames + n_chunks and lines["framesDropped"] == lines["audioDropped"] == 0
    assert lines["gateway"]["in_VideoFrame"] == n_frames
    assert lines["gateway"]["in_AudioChunk"] == n_chunks

    done = lines["done"]
    text = done["text"].lower()
    assert done["type"] == "AnswerDone" and done["turn"] == lines["turn"] and not done["error"]
    assert "".join(lines["deltas"]).strip().lower() == text.strip()
    assert "butterfly" in text, text
    assert "amiable" in text, text  # heard through the pushed audio (float32 and int16 chunks)
    assert done["context"] and all(t0 <= t1 <= 31 for t0, t1 in done["context"])  # its citations

    interrupted = lines["interrupted"]
    assert interrupted["error"] == "interrupted", interrupted
    assert lines["interruptedFirst"]  # it had started answering

    transcripts = " ".join(i["text"] for i in lines["history"] if i["kind"] == "transcript").lower()
    assert "amiable" in transcripts, lines["history"]
    assert any(i["kind"] == "clip" for i in lines["history"])
    [newest] = lines["newest"]
    assert newest["t1"] == max(i["t1"] for i in lines["history"] + lines["newest"])
    assert {"gateway", "perception", "memory", "reasoning", "speech"} <= set(lines["stages"])
    assert lines["cancelled"]  # memory acknowledged the watch's cancel

    # The watch fired on the butterfly clip (reasoning checks every record it streams).
    clips = [i["text"] for i in lines["history"] if i["kind"] == "clip"]
    why = {"clips": clips, "errors": lines["errors"], "events": lines["seen"], "counters": lines["counters"]}
    assert len(lines["alerts"]) == 1, json.dumps(why)
    [alert] = lines["alerts"]
    assert alert["type"] == "Alert" and alert["session"] == "node" and alert["watch_id"] == lines["cancelled"]
    assert "butterfly" in alert["text"].lower() or "monarch" in alert["text"].lower(), alert
