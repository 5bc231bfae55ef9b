// The Node codec against messages encoded by protocol/codec.py (test/fixtures/codec.json, written
// by tools/generate.py): requests encode to the same bytes, everything decodes to the same values.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { OmnistreamError, decodeMessage, encodeMessage, ndarray } from "../lib/codec.mjs";

const CASES = JSON.parse(readFileSync(new URL("./fixtures/codec.json", import.meta.url), "utf8"));
const TYPED = { "|u1": Uint8Array, "<i2": Int16Array, "<f4": Float32Array };

/** The fixture's message as a client would pass it: ndarrays as typed arrays. */
function input(message) {
  const { type, ...fields } = message;
  for (const [name, value] of Object.entries(fields)) {
    if (value && typeof value === "object" && "dtype" in value && "data" in value) {
      fields[name] = ndarray(TYPED[value.dtype].from(value.data), value.shape);
    }
  }
  return [type, fields];
}

/** A decoded message with its typed arrays as plain arrays, to compare with the fixture. */
function plain(value) {
  if (ArrayBuffer.isView(value)) return Array.from(value);
  if (Array.isArray(value)) return value.map(plain);
  if (value && typeof value === "object") return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]));
  return value;
}

const frames = (c) => c.frames.map((b64) => Buffer.from(b64, "base64"));

test("the fixtures cover every request a client sends and the replies and events it gets", () => {
  const types = new Set(CASES.map((c) => c.message.type));
  for (const type of ["Ask", "Watch", "StatusRequest", "HistoryRequest", "VideoFrame", "AudioChunk", "Interrupt"]) {
    assert.ok(CASES.some((c) => c.direction === "request" && c.message.type === type), type);
  }
  for (const type of ["Ack", "Error", "Status", "History", "AnswerDelta", "AnswerDone", "Alert", "AudioOut", "Percept", "Clip", "Transcript"]) {
    assert.ok(types.has(type), type);
  }
});

for (const c of CASES) {
  if (c.direction === "request") {
    test(`encodes ${c.name} to the bytes protocol/codec.py writes`, () => {
      const [type, fields] = input(c.message);
      const got = encodeMessage(type, fields);
      assert.deepEqual(got.map((f) => f.toString("hex")), frames(c).map((f) => f.toString("hex")));
    });
  }
  test(`decodes ${c.name} as protocol/codec.py does`, () => {
    assert.deepEqual(plain(decodeMessage(frames(c))), c.message);
  });
}

test("the worked example of docs/protocol.md §2", () => {
  const [topic, header] = encodeMessage("Ask", { turn: "t1", question: "What is on screen?", speak: false, ts: 12.5 });
  assert.equal(topic.toString(), "Ask");
  assert.equal(header.subarray(0, 10).toString("hex"), "85a474797065a341736b");
  assert.equal(header.subarray(-12).toString("hex"), "a27473cb4029000000000000"); // "ts": 12.5 as float64
});

test("a float field is a float64 even when its value is whole (as a Python float)", () => {
  const [, header] = encodeMessage("Watch", { watch_id: "w", condition: "c", ts: 2 });
  assert.equal(header.subarray(-12).toString("hex"), "a27473cb4000000000000000");
});

test("decoded arrays are typed arrays over the received bytes, copied only when misaligned", () => {
  const c = CASES.find((x) => x.name === "audio out");
  const [topic, header, pcm] = frames(c);
  const shifted = Buffer.alloc(pcm.length + 1).subarray(1);
  pcm.copy(shifted);
  const message = decodeMessage([topic, header, shifted]);
  assert.ok(message.pcm.data instanceof Float32Array);
  assert.deepEqual(Array.from(message.pcm.data), c.message.pcm.data);
});

test("bad messages are refused with the code and a message naming the problem", () => {
  const ask = frames(CASES.find((x) => x.name === "ask doc example"));
  const frame = frames(CASES.find((x) => x.name === "video frame"));
  const refused = (fn, code, pattern) =>
    assert.throws(fn, (err) => err instanceof OmnistreamError && err.code === code && pattern.test(err.message));
  refused(() => decodeMessage([Buffer.from("Watch"), ask[1]]), "topic_mismatch", /does not match/);
  refused(() => decodeMessage([ask[0]]), "malformed", /got 1 frame/);
  refused(() => decodeMessage([ask[0], Buffer.from([0xc1])]), "malformed", /not valid msgpack/);
  refused(() => decodeMessage([frame[0], frame[1], frame[2].subarray(1)]), "invalid", /needs 12 bytes, buffer has 11/);
  refused(() => decodeMessage([frame[0], frame[1]]), "invalid", /index 0 out of range/);
  refused(() => decodeMessage([Buffer.from("Alert"), Buffer.from([0x81, 0xa4, 0x74, 0x79, 0x70, 0x65, 0xa5, 0x41, 0x6c, 0x65, 0x72, 0x74])]), "invalid", /missing required field "watch_id"/);
  refused(() => encodeMessage("Ask", { turn: "t", question: "q", colour: "red" }), "invalid", /no field "colour"/);
  refused(() => encodeMessage("Ask", { question: "q" }), "invalid", /Ask.turn is required/);
  refused(() => encodeMessage("Ask", { turn: "t", question: "q", mode: "fast" }), "invalid", /Ask.mode must be "full"/);
  refused(() => encodeMessage("AudioChunk", { pcm: new Float32Array(4), sample_rate: 16000.5 }), "invalid", /sample_rate must be int/);
  refused(() => encodeMessage("Teleport", {}), "invalid", /unknown message type/);
  refused(() => encodeMessage("VideoFrame", { image: ndarray(new Uint8Array(5), [1, 2, 3]) }), "invalid", /needs 6 bytes/);
});

test("fields and types a newer server sends are passed through, not refused", async () => {
  const { encode } = await import("@msgpack/msgpack");
  const alert = decodeMessage([Buffer.from("Alert"), Buffer.from(encode({ type: "Alert", watch_id: "w", text: "t", evidence: [1, 2] }))]);
  assert.deepEqual(alert, { type: "Alert", watch_id: "w", text: "t", ts: 0, session: "default", evidence: [1, 2] });
  const future = decodeMessage([Buffer.from("Hologram"), Buffer.from(encode({ type: "Hologram", depth: 3 }))]);
  assert.deepEqual(future, { type: "Hologram", depth: 3 });
});
