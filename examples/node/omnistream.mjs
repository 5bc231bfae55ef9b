// The omnistream client for Node.js: the operations of the Python Client (app/client.py), over the
// wire protocol of docs/protocol.md.
//
//   import { Client } from "omnistream-node-client";
//   const client = await Client.connect();                // the run directory of `omnistream up`
//   for await (const delta of client.ask("What is on screen?")) process.stdout.write(delta);
//   client.close();
//
// Requests go over a DEALER to the gateway's ROUTER (replies matched by request id); events
// (answer deltas, alerts, transcripts, clips, stats, ...) come from the gateway's PUB to one SUB
// socket and are fanned out to every ask, subscription and listener. A gateway served beyond
// loopback needs CURVE keys: `keysDir` with `server.key` and this client's `NAME.key_secret`
// (`omnistream keys`). The message codec is lib/codec.mjs, the CURVE key files lib/keys.mjs.

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import * as zmq from "zeromq";
import { OmnistreamError, decodeMessage, encodeMessage, ndarray } from "./lib/codec.mjs";
import { defaultKeysDir, loadClientKeys } from "./lib/keys.mjs";

export { OmnistreamError, decodeMessage, encodeMessage, ndarray } from "./lib/codec.mjs";
export { STRUCTS } from "./lib/codec.mjs";
export { defaultKeysDir, loadCertificate, loadClientKeys } from "./lib/keys.mjs";

/** @typedef {import("./lib/codec.mjs").Message} Message */
/** @typedef {import("./lib/codec.mjs").NDArray} NDArray */
/** @typedef {import("./lib/keys.mjs").ClientKeys} ClientKeys */

/**
 * The gateway's two endpoints (from `addresses.json`, or a remote `tcp://HOST:PORT`).
 * @typedef {object} Addresses
 * @property {string} gateway      the ROUTER for requests
 * @property {string} gateway_pub  the PUB for events
 * @property {boolean} [curve]     both need CURVE keys (a gateway served beyond loopback)
 */

/**
 * @typedef {object} ClientOptions
 * @property {string} [session]    the memory the client's messages belong to (default "default")
 * @property {number} [timeoutMs]  how long a request waits for its reply (default 30000)
 * @property {string} [endpoint]   a gateway on another machine, `tcp://HOST:PORT` (its PUB at PORT + 1), instead of a run directory
 * @property {string} [keysDir]    CURVE keys (default $OMNISTREAM_KEYS_DIR or ~/.config/omnistream/keys); with `endpoint`, giving it turns CURVE on even on loopback
 * @property {string} [keyName]    this client's key name in keysDir (default "client")
 */

/**
 * @typedef {object} AskOptions
 * @property {number} [ts]          stream time the question is about (default 0: now)
 * @property {string[]} [choices]   options of a multiple-choice question ("A a cat", ...)
 * @property {boolean} [speak]      also synthesise the answer as AudioOut events (ask: false, sendAsk: true)
 * @property {"full" | "reprefill" | "recent" | "no_memory"} [mode]  "full", or an evaluation baseline
 * @property {number} [audioRate]   sample rate wanted for spoken answers (0: the voice's own)
 * @property {string} [turn]        the turn id (default: 32 random hex digits)
 * @property {number} [timeoutMs]   ask only: how long the whole answer may take (default 300000)
 */

/**
 * The answer to one question: an async generator of its text deltas whose return value is the
 * AnswerDone (also `client.lastDone`); `turn` is known at once, for `client.interrupt(turn)`.
 * @typedef {AsyncGenerator<string, Message, void> & {turn: string}} AnswerStream
 */

/**
 * @typedef {object} SubscribeOptions
 * @property {number} [timeoutMs]   stop after this long (default: never)
 * @property {AbortSignal} [signal] stop when aborted
 */

const RESEND_EVERY_MS = 2000; // status and history requests are sent again (harmless to repeat)
const LOST_AFTER_MS = 30000; // after a gateway restart, silence on a turn for this long means it was lost
const LISTENER_QUEUE = 10000;
// The gateway's frame limits (gateway.max_frame_side, gateway.max_frame_bytes, by default): it
// refuses a bigger frame, and one over its socket's message cap would cut the connection.
const MAX_FRAME_SIDE = 8192;
const MAX_FRAME_BYTES = 25 * 1024 * 1024;

const MAX_RUN_DIR_CHARS = 60; // ipc:// socket paths must stay under ~100 characters

/**
 * Where `omnistream up` runs, as protocol/config.py finds it: `$OMNISTREAM_RUN_DIR`; else
 * `$XDG_RUNTIME_DIR/omnistream` when that is set and short enough; else `run` in the data folder
 * (`$XDG_DATA_HOME/omnistream`, default `~/.local/share/omnistream`).
 * @returns {string}
 */
export function defaultRunDir() {
  if (process.env.OMNISTREAM_RUN_DIR) return process.env.OMNISTREAM_RUN_DIR;
  if (process.env.XDG_RUNTIME_DIR) {
    const runtime = join(process.env.XDG_RUNTIME_DIR, "omnistream");
    if (runtime.length <= MAX_RUN_DIR_CHARS) return runtime;
  }
  return join(process.env.XDG_DATA_HOME || join(homedir(), ".local", "share"), "omnistream", "run");
}

/**
 * The endpoints the launcher wrote into the run directory (`addresses.json`).
 * @param {string} [runDir]
 * @returns {Addresses}
 */
export function loadAddresses(runDir = defaultRunDir()) {
  try {
    return JSON.parse(readFileSync(join(runDir, "addresses.json"), "utf8"));
  } catch (err) {
    throw new OmnistreamError("not_running", `no omnistream running in ${runDir} (${err.code || err.message})`);
  }
}

/**
 * A gateway at `tcp://HOST:PORT` (its PUB at PORT + 1), with CURVE when `curve` or, when not
 * given, when HOST is not loopback.
 * @param {string} endpoint
 * @param {boolean} [curve]
 * @returns {Addresses}
 */
export function remoteAddresses(endpoint, curve) {
  const match = /^tcp:\/\/(.+):(\d+)$/.exec(endpoint);
  if (!match) throw new OmnistreamError("usage", `gateway endpoint ${JSON.stringify(endpoint)} must be tcp://HOST:PORT`);
  const host = match[1].replace(/^\[|\]$/g, "");
  const loopback = host === "localhost" || host === "ip6-localhost" || host === "::1" || /^127\./.test(host);
  return {
    gateway: endpoint,
    gateway_pub: `tcp://${match[1]}:${Number(match[2]) + 1}`,
    curve: curve ?? !loopback,
  };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class Client {
  /**
   * Sockets to the gateway at `addresses`, connected (not yet known to be served: use
   * `Client.connect`, or `waitConnected()`).
   * @param {Addresses} addresses
   * @param {Omit<ClientOptions, "endpoint">} [options]
   */
  constructor(addresses, { session = "default", timeoutMs = 30000, keysDir, keyName = "client" } = {}) {
    /** @type {ClientKeys | null} */
    let keys = null;
    if (addresses.curve) {
      try {
        keys = loadClientKeys(keysDir ?? defaultKeysDir(), keyName);
      } catch (err) {
        throw new OmnistreamError("keys", `the gateway at ${addresses.gateway} requires CURVE keys: ${err.message}`);
      }
    }
    const curve = keys
      ? { curveServerKey: keys.serverPublicKey, curvePublicKey: keys.publicKey, curveSecretKey: keys.secretKey }
      : {};
    const reconnect = { reconnectInterval: 100, reconnectMaxInterval: 1000 };
    /** @type {Addresses} */
    this.addresses = addresses;
    /** @type {string} */
    this.session = session;
    /** @type {number} */
    this.timeoutMs = timeoutMs;
    /** Frames and audio chunks dropped because the gateway was away or busy. */
    this.framesDropped = 0;
    this.audioDropped = 0;
    /** @type {Message | null} the AnswerDone of the last answer that finished */
    this.lastDone = null;
    /** The gateway's process id (from its Stats); a change means it restarted. */
    this.gatewayPid = 0;
    this.gatewayRestartedAt = 0;
    // sendTimeout 0: a send that cannot be queued at once (no live gateway: IMMEDIATE) fails with
    // EAGAIN instead of waiting, as the Python client's NOBLOCK sends.
    this.dealer = new zmq.Dealer({ linger: 0, immediate: true, sendHighWaterMark: 64, sendTimeout: 0, ...reconnect, ...curve });
    this.sub = new zmq.Subscriber({ linger: 0, receiveHighWaterMark: 10000, ...reconnect, ...curve });
    this.dealer.connect(addresses.gateway);
    this.sub.connect(addresses.gateway_pub);
    this.sub.subscribe(); // every topic
    /** @type {Map<string, (reply: Message) => void>} */
    this.replyWaiters = new Map();
    /** @type {Set<(event: Message) => void>} */
    this.listeners = new Set();
    this.closed = false;
    this.readers = [this.#readReplies(), this.#readEvents()];
  }

  /**
   * Connect to the system of `runDir` (this machine), or to the gateway at `options.endpoint`,
   * and wait until it answers and its events flow.
   * @param {string} [runDir]  default: defaultRunDir()
   * @param {ClientOptions} [options]
   * @returns {Promise<Client>}
   */
  static async connect(runDir, options = {}) {
    const { endpoint, ...rest } = options;
    const addresses = endpoint ? remoteAddresses(endpoint, options.keysDir ? true : undefined) : loadAddresses(runDir);
    const client = new Client(addresses, rest);
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
        let reply;
        try {
          reply = decodeMessage(frames);
        } catch {
          continue; // a message this client cannot read: skipped, as the Python client does
        }
        const id = reply.request_id || "";
        const waiter =
          this.replyWaiters.get(id) ||
          (reply.type === "Error" && !id && this.replyWaiters.size === 1 ? [...this.replyWaiters.values()][0] : undefined);
        if (waiter) waiter(reply);
      }
    } catch (err) {
      if (!this.closed) throw err;
    }
  }

  async #readEvents() {
    try {
      for await (const frames of this.sub) {
        let event;
        try {
          event = decodeMessage(frames);
        } catch {
          continue;
        }
        if (event.type === "Stats" && event.stage === "gateway") this.#noteGatewayPid(event);
        for (const listener of this.listeners) listener(event);
      }
    } catch (err) {
      if (!this.closed) throw err;
    }
  }

  #noteGatewayPid(stats) {
    if (!stats || stats.state !== "running" || !stats.pid) return;
    if (this.gatewayPid && stats.pid !== this.gatewayPid) this.gatewayRestartedAt = Date.now();
    this.gatewayPid = stats.pid;
  }

  /** Send without waiting, retrying while there is no live connection, until `deadline` (ms). */
  async #sendUntil(frames, deadline) {
    while (true) {
      try {
        await this.dealer.send(frames);
        return;
      } catch (err) {
        if (err.code !== "EAGAIN" || this.closed) throw err;
        if (Date.now() >= deadline) {
          throw new OmnistreamError("unreachable", `gateway at ${this.addresses.gateway} unreachable for ${Math.round(this.timeoutMs / 1000)} s`);
        }
        await sleep(50);
      }
    }
  }

  /** Send once without waiting; false if it could not be queued (gateway away or busy). */
  async #sendNow(frames) {
    try {
      await this.dealer.send(frames);
      return true;
    } catch (err) {
      if (err.code === "EAGAIN") return false;
      throw err;
    }
  }

  /**
   * Send a request and wait for the reply that names `requestId` (an Error rejects with its code).
   * @param {string} type
   * @param {Record<string, any>} fields  without `session` (the client's is added)
   * @param {string} requestId
   * @param {{resend?: boolean}} [options]  send again every 2 s until answered (only for harmless requests)
   * @returns {Promise<Message>}
   */
  async request(type, fields, requestId, { resend = false } = {}) {
    const frames = encodeMessage(type, { session: this.session, ...fields });
    const deadline = Date.now() + this.timeoutMs;
    let resolveReply;
    const reply = new Promise((resolve) => (resolveReply = resolve));
    this.replyWaiters.set(requestId, resolveReply);
    try {
      await this.#sendUntil(frames, deadline);
      while (true) {
        const left = deadline - Date.now();
        if (this.closed) throw new OmnistreamError("closed", `the client was closed before ${type} was answered`);
        if (left <= 0) throw new OmnistreamError("timeout", `no reply to ${type} from the gateway within ${Math.round(this.timeoutMs / 1000)} s`);
        let timer;
        const wait = resend ? Math.min(left, RESEND_EVERY_MS) : left;
        const got = await Promise.race([reply, new Promise((resolve) => (timer = setTimeout(resolve, wait)))]);
        clearTimeout(timer);
        if (got) {
          if (got.type === "Error") throw new OmnistreamError(got.code, got.message);
          return got;
        }
        if (resend && deadline > Date.now()) await this.#sendUntil(frames, deadline);
      }
    } finally {
      this.replyWaiters.delete(requestId);
    }
  }

  /**
   * Call `listener` with every event from the gateway until the returned function is called.
   * @param {(event: Message) => void} listener
   * @returns {() => void} unsubscribe
   */
  onEvent(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /**
   * Resolve with the first event for which `pick(event)` returns something other than undefined.
   * @template T
   * @param {(event: Message) => T | undefined} pick
   * @param {number} [timeoutMs]
   * @returns {Promise<T>}
   */
  nextEvent(pick, timeoutMs = this.timeoutMs) {
    return new Promise((resolve, reject) => {
      const listener = (event) => {
        const value = pick(event);
        if (value !== undefined) {
          clearTimeout(timer);
          this.listeners.delete(listener);
          resolve(value);
        }
      };
      const timer = setTimeout(() => {
        this.listeners.delete(listener);
        reject(new OmnistreamError("timeout", `no matching event within ${timeoutMs} ms`));
      }, timeoutMs);
      this.listeners.add(listener);
    });
  }

  /**
   * Events of `types` (all types if empty) as they arrive, until `timeoutMs` passes or `signal`
   * aborts (or forever). A consumer that stops reading loses its oldest events beyond 10000.
   * @param {string[]} [types]  message type names ("Alert", "Transcript", "Clip", ...)
   * @param {SubscribeOptions} [options]
   * @returns {AsyncGenerator<Message, void, void>}
   */
  async *subscribe(types = [], { timeoutMs, signal } = {}) {
    /** @type {Message[]} */
    const queue = [];
    let wake = () => {};
    const unsubscribe = this.onEvent((event) => {
      if (types.length && !types.includes(event.type)) return;
      if (queue.length >= LISTENER_QUEUE) queue.shift();
      queue.push(event);
      wake();
    });
    const onAbort = () => wake();
    signal?.addEventListener("abort", onAbort);
    const deadline = timeoutMs === undefined ? Infinity : Date.now() + timeoutMs;
    try {
      while (!signal?.aborted && !this.closed) {
        if (queue.length) {
          yield /** @type {Message} */ (queue.shift());
          continue;
        }
        const left = deadline - Date.now();
        if (left <= 0) return;
        await new Promise((resolve) => {
          const timer = setTimeout(resolve, Math.min(left, 1000));
          wake = () => {
            clearTimeout(timer);
            resolve(undefined);
          };
        });
      }
    } finally {
      signal?.removeEventListener("abort", onAbort);
      unsubscribe();
    }
  }

  /**
   * Return once the gateway answers a status request and its event stream is flowing (the SUB
   * only receives what is published after its subscription reached the gateway).
   * @returns {Promise<Message>} the Status
   */
  async waitConnected() {
    const flowing = this.nextEvent((event) => (event.type === "Stats" ? true : undefined));
    flowing.catch(() => {}); // awaited below, after the status
    const status = await this.status();
    try {
      await flowing;
    } catch {
      throw new OmnistreamError("timeout", "connected to the gateway but its event stream is silent");
    }
    return status;
  }

  /**
   * The latest Stats of every stage, as the gateway last saw them: `{stages: {name: Stats}}`.
   * @returns {Promise<Message>}
   */
  async status() {
    const requestId = randomUUID().replaceAll("-", "");
    const status = await this.request("StatusRequest", { request_id: requestId }, requestId, { resend: true });
    this.#noteGatewayPid(status.stages.gateway);
    return status;
  }

  /**
   * What memory recorded in this session over stream times [t0, t1]: `{items: MemoryRecord[],
   * truncated}`, oldest first; clips, transcripts and sightings unless `kinds` says otherwise;
   * the first `limit` records, or the last with `newest`.
   * @param {number} [t0]
   * @param {number} [t1]
   * @param {Array<"clip" | "transcript" | "sighting" | "event" | "synopsis">} [kinds]
   * @param {{limit?: number, newest?: boolean}} [options]
   * @returns {Promise<Message>} the History
   */
  history(t0 = 0, t1 = 1e12, kinds = [], { limit = 500, newest = false } = {}) {
    const requestId = randomUUID().replaceAll("-", "");
    const fields = { request_id: requestId, t0, t1, kinds, limit, newest };
    return this.request("HistoryRequest", fields, requestId, { resend: true });
  }

  /**
   * Send one RGB frame without waiting; false if it was dropped (gateway away or busy).
   * @param {Uint8Array} rgb  height * width * 3 bytes, top row first
   * @param {number} width
   * @param {number} height
   * @param {number} ts  stream time (s)
   * @param {{index?: number, source?: string}} [options]
   * @returns {Promise<boolean>}
   */
  async pushFrame(rgb, width, height, ts, { index = 0, source = "client" } = {}) {
    if (Math.max(width, height) > MAX_FRAME_SIDE || rgb.byteLength > MAX_FRAME_BYTES) {
      throw new OmnistreamError(
        "too_large",
        `a ${width}x${height} frame (${(rgb.byteLength / 1e6).toFixed(1)} MB) is over the gateway's limits ` +
          `(${MAX_FRAME_SIDE} px a side, ${(MAX_FRAME_BYTES / 1e6).toFixed(1)} MB): scale it down first`,
      );
    }
    const image = ndarray(rgb, [height, width, 3], "|u1");
    const sent = await this.#sendNow(encodeMessage("VideoFrame", { session: this.session, ts, image, index, source }));
    if (!sent) this.framesDropped++;
    return sent;
  }

  /**
   * Send mono PCM without waiting; false if it was dropped (gateway away or busy).
   * @param {Float32Array | Int16Array} pcm  float32 in [-1, 1] or int16 samples; 20-100 ms a chunk
   * @param {number} sampleRate  Hz (16000 preferred)
   * @param {number} ts  stream time of the first sample (s)
   * @param {{channel?: "user" | "scene"}} [options]  "user" (the microphone: speech can become questions) or "scene" (the watched stream's sound)
   * @returns {Promise<boolean>}
   */
  async pushAudio(pcm, sampleRate, ts, { channel = "user" } = {}) {
    if (!(pcm instanceof Float32Array || pcm instanceof Int16Array)) {
      throw new OmnistreamError("invalid", "AudioChunk.pcm must be a Float32Array or an Int16Array");
    }
    const fields = { session: this.session, ts, pcm: ndarray(pcm), sample_rate: sampleRate, channel };
    const sent = await this.#sendNow(encodeMessage("AudioChunk", fields));
    if (!sent) this.audioDropped++;
    return sent;
  }

  /**
   * Send a question; resolves with its turn once the gateway accepted it (an `OmnistreamError`
   * with code "busy" when too many questions wait: ask again later).
   * @param {string} question
   * @param {AskOptions} [options]
   * @returns {Promise<string>}
   */
  async sendAsk(question, { ts = 0, choices = [], speak = true, mode = "full", audioRate = 0, turn } = {}) {
    const id = turn ?? randomUUID().replaceAll("-", "");
    const fields = { turn: id, question, ts, choices, speak, mode, audio_rate: audioRate };
    await this.request("Ask", fields, id);
    return id;
  }

  /**
   * Ask a question and stream its answer: yields the text deltas in order and returns the
   * AnswerDone (`text`, `context`: the [t0, t1] stream-time spans the answer was given from,
   * `first_token_s`, `total_s`; `error` "interrupted" when `interrupt` stopped it). An answer that
   * failed throws an OmnistreamError with code "answer_failed".
   * @param {string} question
   * @param {AskOptions} [options]
   * @returns {AnswerStream}
   */
  ask(question, options = {}) {
    const turn = options.turn ?? randomUUID().replaceAll("-", "");
    const stream = /** @type {AnswerStream} */ (this.#answer(question, { speak: false, ...options, turn }));
    stream.turn = turn;
    return stream;
  }

  async *#answer(question, { timeoutMs = 300000, ...options }) {
    const turn = /** @type {string} */ (options.turn);
    /** @type {Message[]} */
    const queue = [];
    let wake = () => {};
    const unsubscribe = this.onEvent((event) => {
      if ((event.type === "AnswerDelta" || event.type === "AnswerDone") && event.turn === turn) {
        queue.push(event);
        wake();
      }
    }); // listening before asking: the first delta may come at once
    const deadline = Date.now() + timeoutMs;
    const restartsSeen = this.gatewayRestartedAt;
    try {
      await this.sendAsk(question, options);
      let heard = Date.now();
      while (true) {
        while (queue.length) {
          const event = /** @type {Message} */ (queue.shift());
          heard = Date.now();
          if (event.type === "AnswerDelta") {
            yield event.text;
            continue;
          }
          this.lastDone = event;
          if (event.error && event.error !== "interrupted") throw new OmnistreamError("answer_failed", `answer failed: ${event.error}`);
          return event;
        }
        if (this.closed) throw new OmnistreamError("closed", "the client was closed while answering");
        if (this.gatewayRestartedAt !== restartsSeen && Date.now() - Math.max(heard, this.gatewayRestartedAt) > LOST_AFTER_MS) {
          throw new OmnistreamError("lost", `the gateway restarted while answering and nothing more came for ${LOST_AFTER_MS / 1000} s; ask again`);
        }
        const left = deadline - Date.now();
        if (left <= 0) throw new OmnistreamError("timeout", `no complete answer within ${Math.round(timeoutMs / 1000)} s`);
        await new Promise((resolve) => {
          const timer = setTimeout(resolve, Math.min(left, 1000));
          wake = () => {
            clearTimeout(timer);
            resolve(undefined);
          };
        });
      }
    } finally {
      unsubscribe();
    }
  }

  /**
   * Stop answering (and speaking) `turn`, or whatever is being answered; its AnswerDone follows
   * with `error` "interrupted".
   * @param {string} [turn]
   * @param {{ts?: number, reason?: string}} [options]
   * @returns {Promise<void>}
   */
  async interrupt(turn = "", { ts = 0, reason = "client" } = {}) {
    const frames = encodeMessage("Interrupt", { session: this.session, ts, turn, reason });
    await this.#sendUntil(frames, Date.now() + this.timeoutMs);
  }

  /**
   * Register a standing question ("tell me when a person enters"); resolves with its watch id
   * once accepted. Its Alerts arrive as events: `alerts(watchId)`.
   * @param {string} condition
   * @param {{ts?: number, watchId?: string}} [options]
   * @returns {Promise<string>}
   */
  async watch(condition, { ts = 0, watchId } = {}) {
    const id = watchId ?? randomUUID().replaceAll("-", "");
    await this.request("Watch", { watch_id: id, condition, ts }, id);
    return id;
  }

  /**
   * Remove the watch `watchId` (memory forgets it, reasoning stops checking it); resolves once
   * memory acknowledged it.
   * @param {string} watchId
   * @param {{ts?: number}} [options]
   * @returns {Promise<void>}
   */
  async cancelWatch(watchId, { ts = 0 } = {}) {
    await this.request("Watch", { watch_id: watchId, condition: "", cancel: true, ts }, watchId);
  }

  /**
   * The Alerts of `watchId` (of every watch if not given) as they arrive: `{watch_id, text, ts}`.
   * @param {string} [watchId]
   * @param {SubscribeOptions} [options]
   * @returns {AsyncGenerator<Message, void, void>}
   */
  async *alerts(watchId, options = {}) {
    for await (const alert of this.subscribe(["Alert"], options)) {
      if (!watchId || alert.watch_id === watchId) yield alert;
    }
  }

  /** Close both sockets (pending requests and answers end with an error). */
  close() {
    if (this.closed) return;
    this.closed = true;
    this.dealer.close();
    this.sub.close();
  }
}
