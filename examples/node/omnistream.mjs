// A minimal omnistream client in Node.js, written from docs/protocol.md only.
//
// Wire format: every message is a multipart ZeroMQ message [topic, header, ...buffers]:
//   topic   the message type name in ASCII ("Ask", "AnswerDelta", ...)
//   header  a msgpack map with "type" = the same name plus the message's fields
//   buffers the raw bytes of each ndarray field, referenced from the header as
//           {nd: index, dtype: "|u1" | "<f4" | ..., shape: [...]}
// Requests go over a DEALER to the gateway's ROUTER; events come from the gateway's PUB.

import { readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { randomUUID } from "node:crypto";
import { decode, encode } from "@msgpack/msgpack";
import * as zmq from "zeromq";

export class OmnistreamError extends Error {
  constructor(code, message) {
    super(`[${code}] ${message}`);
    this.code = code;
  }
}

export function defaultRunDir() {
  return process.env.OMNISTREAM_RUN_DIR || join(homedir(), ".local", "share", "omnistream", "run");
}

// Read the endpoints the launcher wrote ({gateway, gateway_pub, ...}).
export function loadAddresses(runDir = defaultRunDir()) {
  try {
    return JSON.parse(readFileSync(join(runDir, "addresses.json"), "utf8"));
  } catch (err) {
    throw new OmnistreamError("not_running", `no omnistream running in ${runDir} (${err.code || err.message})`);
  }
}

// Encode a message: fields with ndarray values become references to trailing buffers.
export function encodeMessage(type, fields) {
  const buffers = [];
  const header = { type };
  for (const [name, value] of Object.entries(fields)) {
    if (value && value.ndarray) {
      header[name] = { nd: buffers.length, dtype: value.dtype, shape: value.shape };
      buffers.push(Buffer.from(value.data.buffer, value.data.byteOffset, value.data.byteLength));
    } else {
      header[name] = value;
    }
  }
  return [Buffer.from(type, "ascii"), Buffer.from(encode(header)), ...buffers];
}

// Decode [topic, header, ...buffers]; ndarray references are replaced by {dtype, shape, data: Buffer}.
export function decodeMessage(frames) {
  const [topic, header, ...buffers] = frames;
  const message = decode(header);
  if (message.type !== topic.toString("ascii")) {
    throw new OmnistreamError("topic_mismatch", `topic ${topic} carries a ${message.type}`);
  }
  for (const [name, value] of Object.entries(message)) {
    if (value && typeof value === "object" && "nd" in value && "dtype" in value && "shape" in value) {
      message[name] = { dtype: value.dtype, shape: value.shape, data: buffers[value.nd] };
    }
  }
  return message;
}

export class Client {
  constructor(addresses, { session = "default", timeoutMs = 30000 } = {}) {
    this.session = session;
    this.timeoutMs = timeoutMs;
    this.dealer = new zmq.Dealer({ linger: 0, immediate: true });
    this.dealer.connect(addresses.gateway);
    this.sub = new zmq.Subscriber({ linger: 0 });
    this.sub.connect(addresses.gateway_pub);
    this.sub.subscribe(); // every topic; filter by prefix ("Answer", "Alert") to receive less
    this.replyWaiters = new Map(); // request_id -> resolve
    this.eventWaiters = new Set(); // callbacks receiving every event
    this.closed = false;
    this.readers = [this.#readReplies(), this.#readEvents()];
  }

  static async connect(runDir, options) {
    const client = new Client(loadAddresses(runDir), options);
    try {
      await client.waitConnected();
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  async #readReplies() {
    try {
      for await (const frames of this.dealer) {
        const reply = decodeMessage(frames);
        const id = reply.request_id || "";
        const waiter = this.replyWaiters.get(id) || (reply.type === "Error" && this.replyWaiters.size === 1
          ? [...this.replyWaiters.values()][0] : undefined);
        if (waiter) waiter(reply);
      }
    } catch (err) {
      if (!this.closed) throw err;
    }
  }

  async #readEvents() {
    try {
      for await (const frames of this.sub) {
        const event = decodeMessage(frames);
        for (const callback of this.eventWaiters) callback(event);
      }
    } catch (err) {
      if (!this.closed) throw err;
    }
  }

  // Send a request and wait for the reply carrying its request_id (an Error rejects).
  async request(type, fields, requestId) {
    const reply = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.replyWaiters.delete(requestId);
        reject(new OmnistreamError("timeout", `no reply to ${type} within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      this.replyWaiters.set(requestId, (message) => {
        clearTimeout(timer);
        this.replyWaiters.delete(requestId);
        if (message.type === "Error") reject(new OmnistreamError(message.code, message.message));
        else resolve(message);
      });
    });
    await this.dealer.send(encodeMessage(type, { session: this.session, ...fields }));
    return reply;
  }

  // Resolve with the first event for which pick(event) returns something other than undefined.
  nextEvent(pick, timeoutMs = this.timeoutMs) {
    return new Promise((resolve, reject) => {
      const callback = (event) => {
        const value = pick(event);
        if (value !== undefined) {
          clearTimeout(timer);
          this.eventWaiters.delete(callback);
          resolve(value);
        }
      };
      const timer = setTimeout(() => {
        this.eventWaiters.delete(callback);
        reject(new OmnistreamError("timeout", `no matching event within ${timeoutMs} ms`));
      }, timeoutMs);
      this.eventWaiters.add(callback);
    });
  }

  status() {
    const requestId = randomUUID();
    return this.request("StatusRequest", { request_id: requestId }, requestId);
  }

  // The SUB socket only receives what is published after its subscription reached the gateway:
  // wait for one periodic Stats event before asking anything.
  async waitConnected() {
    const flowing = this.nextEvent((event) => (event.type === "Stats" ? true : undefined));
    const status = await this.status();
    await flowing;
    return status;
  }

  history(t0 = 0, t1 = 1e12, kinds = []) {
    const requestId = randomUUID();
    return this.request("HistoryRequest", { request_id: requestId, t0, t1, kinds }, requestId);
  }

  // Push one RGB frame: data is a Uint8Array of height * width * 3 bytes.
  async pushFrame(data, width, height, ts) {
    const image = { ndarray: true, dtype: "|u1", shape: [height, width, 3], data };
    await this.dealer.send(encodeMessage("VideoFrame", { session: this.session, ts, image }));
  }

  // Ask a question; yields the answer's text deltas in order, returns the AnswerDone.
  async *ask(question, { ts = 0, speak = false, timeoutMs = 300000 } = {}) {
    const turn = randomUUID().replaceAll("-", "");
    const queue = [];
    let wake = () => {};
    const callback = (event) => {
      if ((event.type === "AnswerDelta" || event.type === "AnswerDone") && event.turn === turn) {
        queue.push(event);
        wake();
      }
    };
    this.eventWaiters.add(callback);
    const deadline = Date.now() + timeoutMs;
    try {
      await this.request("Ask", { turn, question, ts, speak }, turn);
      while (true) {
        while (queue.length) {
          const event = queue.shift();
          if (event.type === "AnswerDelta") yield event.text;
          else if (event.error) throw new OmnistreamError("answer_failed", event.error);
          else return event;
        }
        const left = deadline - Date.now();
        if (left <= 0) throw new OmnistreamError("timeout", `no complete answer within ${timeoutMs} ms`);
        await new Promise((resolve) => {
          const timer = setTimeout(resolve, left);
          wake = () => {
            clearTimeout(timer);
            resolve();
          };
        });
      }
    } finally {
      this.eventWaiters.delete(callback);
    }
  }

  close() {
    this.closed = true;
    this.dealer.close();
    this.sub.close();
  }
}
