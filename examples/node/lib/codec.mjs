// The omnistream wire format (docs/protocol.md §2), byte for byte as protocol/codec.py writes it.
//
// A message is one multipart ZeroMQ message [topic, header, ...buffers]: the topic is the type
// name, the header a msgpack map {"type": name, field: value, ...} with the fields in the order
// and with the types of protocol/messages.py (lib/messages.mjs, generated from it), fields equal
// to their default left out, every float field as a float64 (as msgspec writes a Python float),
// and each ndarray field as {nd, dtype, shape} referring to a trailing frame of raw bytes.
// Decoding checks the topic, the types, missing fields and every buffer's length, fills in the
// defaults and returns plain objects; a violation throws OmnistreamError naming it. Fields and
// message types the schema does not know (a newer server) are passed through as they came.

import { endianness } from "node:os";
import { decode as decodeMsgpack } from "@msgpack/msgpack";
import { STRUCTS } from "./messages.mjs";

if (endianness() !== "LE") throw new Error("the omnistream Node client needs a little-endian machine");

/**
 * A field type as lib/messages.mjs describes it.
 * @typedef {"float" | "int" | "str" | "bool" | "nil" | "ndarray"
 *   | {literal: string[]} | {list: FieldType} | {map: FieldType}
 *   | {union: FieldType[]} | {struct: string}} FieldType
 */

/**
 * @typedef {object} FieldSchema
 * @property {string} name     the field's name on the wire
 * @property {FieldType} type
 * @property {*} [default]     absent: the field is required
 */

/**
 * @typedef {object} StructSchema
 * @property {string | null} tag       the message type name ("type" field); null for nested structs
 * @property {boolean} arrayLike       travels as a msgpack array of every field in order
 * @property {boolean} omitDefaults    fields equal to their default are left out
 * @property {FieldSchema[]} fields    in wire order
 */

/**
 * An ndarray field: C-order elements of `dtype` ("|u1", "<i2", "<f4", ...) with `shape`.
 * Decoded arrays hold a typed array of the dtype ("<f2": the raw Uint16Array; "|b1": Uint8Array).
 * @typedef {object} NDArray
 * @property {string} dtype
 * @property {number[]} shape
 * @property {ArrayBufferView} data
 */

/** A decoded or to-be-encoded message: `type` plus its fields (snake_case, as on the wire).
 * @typedef {{type: string, [field: string]: any}} Message */

/** An error with a stable `code` (the gateway's error codes, or "timeout", "not_running", ...). */
export class OmnistreamError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   */
  constructor(code, message) {
    super(`[${code}] ${message}`);
    this.name = "OmnistreamError";
    /** @type {string} */
    this.code = code;
  }
}

/** Every struct of the protocol, by name (message types and the nested Label, Box, MemoryRecord). */
export { STRUCTS };

/** @type {Record<string, {array: any, size: number}>} */
const DTYPES = {
  "|b1": { array: Uint8Array, size: 1 },
  "|i1": { array: Int8Array, size: 1 },
  "|u1": { array: Uint8Array, size: 1 },
  "<i2": { array: Int16Array, size: 2 },
  "<u2": { array: Uint16Array, size: 2 },
  "<i4": { array: Int32Array, size: 4 },
  "<u4": { array: Uint32Array, size: 4 },
  "<i8": { array: BigInt64Array, size: 8 },
  "<u8": { array: BigUint64Array, size: 8 },
  "<f2": { array: Uint16Array, size: 2 },
  "<f4": { array: Float32Array, size: 4 },
  "<f8": { array: Float64Array, size: 8 },
};

/** @type {Map<Function, string>} */
const DTYPE_OF = new Map([
  [Int8Array, "|i1"],
  [Uint8Array, "|u1"],
  [Uint8ClampedArray, "|u1"],
  [Int16Array, "<i2"],
  [Uint16Array, "<u2"],
  [Int32Array, "<i4"],
  [Uint32Array, "<u4"],
  [BigInt64Array, "<i8"],
  [BigUint64Array, "<u8"],
  [Float32Array, "<f4"],
  [Float64Array, "<f8"],
]);

/**
 * An NDArray of `data`: a typed array (1-D unless `shape` says otherwise; a Buffer is uint8).
 * @param {ArrayBufferView} data
 * @param {number[]} [shape]
 * @param {string} [dtype]
 * @returns {NDArray}
 */
export function ndarray(data, shape, dtype) {
  const type = dtype ?? (Buffer.isBuffer(data) ? "|u1" : DTYPE_OF.get(data.constructor));
  if (!type || !DTYPES[type]) throw new OmnistreamError("bad_dtype", `cannot send a ${data.constructor.name}`);
  const itemsize = DTYPES[type].size;
  return { dtype: type, shape: shape ?? [data.byteLength / itemsize], data };
}

function isNDArray(value) {
  return value !== null && typeof value === "object" && typeof value.dtype === "string" && "data" in value;
}

// -- msgpack writer: only what the protocol needs, in msgspec's formats --------------------------

class Writer {
  constructor() {
    this.buffer = Buffer.allocUnsafe(256);
    this.length = 0;
  }

  reserve(n) {
    if (this.length + n <= this.buffer.length) return;
    const bigger = Buffer.allocUnsafe(Math.max(this.buffer.length * 2, this.length + n));
    this.buffer.copy(bigger, 0, 0, this.length);
    this.buffer = bigger;
  }

  byte(b) {
    this.reserve(1);
    this.buffer[this.length++] = b;
  }

  head(b, n, bytes) {
    this.reserve(1 + bytes);
    this.buffer[this.length++] = b;
    if (bytes === 1) this.buffer.writeUInt8(n, this.length);
    else if (bytes === 2) this.buffer.writeUInt16BE(n, this.length);
    else if (bytes === 4) this.buffer.writeUInt32BE(n, this.length);
    this.length += bytes;
  }

  nil() {
    this.byte(0xc0);
  }

  bool(value) {
    this.byte(value ? 0xc3 : 0xc2);
  }

  float(value) {
    this.reserve(9);
    this.buffer[this.length++] = 0xcb;
    this.buffer.writeDoubleBE(value, this.length);
    this.length += 8;
  }

  int(value) {
    if (typeof value === "bigint") {
      this.reserve(9);
      this.buffer[this.length++] = value < 0n ? 0xd3 : 0xcf;
      if (value < 0n) this.buffer.writeBigInt64BE(value, this.length);
      else this.buffer.writeBigUInt64BE(value, this.length);
      this.length += 8;
    } else if (value >= 0) {
      if (value < 0x80) this.byte(value);
      else if (value < 0x100) this.head(0xcc, value, 1);
      else if (value < 0x10000) this.head(0xcd, value, 2);
      else if (value < 0x100000000) this.head(0xce, value, 4);
      else this.int(BigInt(value));
    } else if (value >= -32) this.byte(value & 0xff);
    else if (value >= -0x80) this.head(0xd0, value & 0xff, 1);
    else if (value >= -0x8000) this.head(0xd1, value & 0xffff, 2);
    else if (value >= -0x80000000) this.head(0xd2, value >>> 0, 4);
    else this.int(BigInt(value));
  }

  str(value) {
    const n = Buffer.byteLength(value, "utf8");
    if (n < 32) this.byte(0xa0 | n);
    else if (n < 0x100) this.head(0xd9, n, 1);
    else if (n < 0x10000) this.head(0xda, n, 2);
    else this.head(0xdb, n, 4);
    this.reserve(n);
    this.length += this.buffer.write(value, this.length, "utf8");
  }

  array(n) {
    if (n < 16) this.byte(0x90 | n);
    else if (n < 0x10000) this.head(0xdc, n, 2);
    else this.head(0xdd, n, 4);
  }

  map(n) {
    if (n < 16) this.byte(0x80 | n);
    else if (n < 0x10000) this.head(0xde, n, 2);
    else this.head(0xdf, n, 4);
  }

  bytes() {
    return this.buffer.subarray(0, this.length);
  }
}

function equal(a, b) {
  if (a === b) return true;
  if (Array.isArray(a) && Array.isArray(b)) return a.length === b.length && a.every((x, i) => equal(x, b[i]));
  if (a && b && typeof a === "object" && typeof b === "object" && !Array.isArray(a) && !Array.isArray(b)) {
    const keys = Object.keys(a);
    return keys.length === Object.keys(b).length && keys.every((k) => equal(a[k], b[k]));
  }
  return false;
}

function typeName(type) {
  if (typeof type === "string") return type;
  if (type.literal) return type.literal.map((v) => JSON.stringify(v)).join(" | ");
  if (type.list) return `list of ${typeName(type.list)}`;
  if (type.map) return `map of ${typeName(type.map)}`;
  if (type.union) return type.union.map(typeName).join(" | ");
  return type.struct;
}

/** Whether `value` can be written as `type` (for picking a union member). */
function fits(type, value) {
  if (type === "nil") return value === null || value === undefined;
  if (type === "float") return typeof value === "number";
  if (type === "int") return (typeof value === "number" && Number.isInteger(value)) || typeof value === "bigint";
  if (type === "str") return typeof value === "string";
  if (type === "bool") return typeof value === "boolean";
  if (type === "ndarray") return isNDArray(value) || ArrayBuffer.isView(value);
  if (type.literal) return type.literal.includes(value);
  if (type.list) return Array.isArray(value);
  if (type.map || type.struct) return value !== null && typeof value === "object" && !Array.isArray(value);
  if (type.union) return type.union.some((member) => fits(member, value));
  return false;
}

/**
 * @param {Writer} out
 * @param {FieldType} type
 * @param {*} value
 * @param {Buffer[]} buffers
 * @param {string} where
 */
function writeValue(out, type, value, buffers, where) {
  if (type.union) {
    const member = type.union.find((t) => fits(t, value));
    if (member === undefined) throw invalid(`${where} must be ${typeName(type)}`);
    return writeValue(out, member, value, buffers, where);
  }
  if (!fits(type, value)) throw invalid(`${where} must be ${typeName(type)}, got ${JSON.stringify(value)}`);
  if (type === "nil") out.nil();
  else if (type === "float") out.float(value);
  else if (type === "int") out.int(value);
  else if (type === "str") out.str(value);
  else if (type === "bool") out.bool(value);
  else if (type === "ndarray") writeArray(out, isNDArray(value) ? value : ndarray(value), buffers, where);
  else if (type.literal) out.str(value);
  else if (type.list) {
    out.array(value.length);
    value.forEach((item, i) => writeValue(out, type.list, item, buffers, `${where}[${i}]`));
  } else if (type.map) {
    const entries = Object.entries(value);
    out.map(entries.length);
    for (const [key, item] of entries) {
      out.str(key);
      writeValue(out, type.map, item, buffers, `${where}.${key}`);
    }
  } else writeStruct(out, type.struct, value, buffers, where);
}

function writeArray(out, array, buffers, where) {
  const spec = DTYPES[array.dtype];
  if (!spec) throw new OmnistreamError("bad_dtype", `${where}: dtype ${array.dtype} cannot be sent`);
  const count = array.shape.reduce((a, b) => a * b, 1);
  const data = array.data;
  if (count * spec.size !== data.byteLength) {
    throw invalid(`${where}: shape [${array.shape}] ${array.dtype} needs ${count * spec.size} bytes, data has ${data.byteLength}`);
  }
  out.map(3);
  out.str("nd");
  out.int(buffers.length);
  out.str("dtype");
  out.str(array.dtype);
  out.str("shape");
  out.array(array.shape.length);
  for (const dim of array.shape) out.int(dim);
  buffers.push(Buffer.from(data.buffer, data.byteOffset, data.byteLength));
}

function writeStruct(out, name, value, buffers, where) {
  const schema = STRUCTS[name];
  for (const key of Object.keys(value)) {
    if (key !== "type" && !schema.fields.some((f) => f.name === key)) {
      throw invalid(`${where} has no field ${JSON.stringify(key)}`);
    }
  }
  const present = schema.fields.filter((field) => {
    const v = value[field.name];
    if (v === undefined) {
      if (!("default" in field)) throw invalid(`${where}.${field.name} is required`);
      return schema.arrayLike;
    }
    return schema.arrayLike || !schema.omitDefaults || !("default" in field) || !equal(v, field.default);
  });
  if (schema.arrayLike) {
    out.array(present.length);
  } else {
    out.map(present.length + (schema.tag ? 1 : 0));
    if (schema.tag) {
      out.str("type");
      out.str(schema.tag);
    }
  }
  for (const field of present) {
    if (!schema.arrayLike) out.str(field.name);
    const v = value[field.name] === undefined ? field.default : value[field.name];
    writeValue(out, field.type, v, buffers, `${where}.${field.name}`);
  }
}

function invalid(message) {
  return new OmnistreamError("invalid", message);
}

/**
 * Encode a message as the frames [topic, header, ...buffers] (buffers are views of the arrays'
 * memory: do not change an array until the send has completed).
 * @param {string} type  a message type name ("Ask", "VideoFrame", ...)
 * @param {Record<string, any>} fields  its fields (snake_case); an ndarray field takes an NDArray or a typed array
 * @returns {Buffer[]}
 */
export function encodeMessage(type, fields) {
  const schema = STRUCTS[type];
  if (!schema || schema.tag !== type) throw invalid(`unknown message type ${JSON.stringify(type)}`);
  const out = new Writer();
  /** @type {Buffer[]} */
  const buffers = [];
  writeStruct(out, type, fields, buffers, type);
  return [Buffer.from(type, "ascii"), Buffer.from(out.bytes()), ...buffers];
}

// -- decoding ---------------------------------------------------------------------------------

function readValue(type, value, buffers, where) {
  if (type.union) {
    for (const member of type.union) {
      if (member === "nil" ? value === null : member === "ndarray" ? isReference(value) : fits(member, value)) {
        return readValue(member, value, buffers, where);
      }
    }
    throw invalid(`${where}: expected ${typeName(type)}, got ${describe(value)}`);
  }
  if (type === "ndarray") return readArray(value, buffers, where);
  if (typeof type === "string" || type.literal) {
    if (!fits(type, value) || (type === "int" && typeof value === "number" && !Number.isSafeInteger(value))) {
      throw invalid(`${where}: expected ${typeName(type)}, got ${describe(value)}`);
    }
    return type === "nil" ? null : value;
  }
  if (type.list) {
    if (!Array.isArray(value)) throw invalid(`${where}: expected ${typeName(type)}, got ${describe(value)}`);
    return value.map((item, i) => readValue(type.list, item, buffers, `${where}[${i}]`));
  }
  if (type.map) {
    if (!fits(type, value)) throw invalid(`${where}: expected ${typeName(type)}, got ${describe(value)}`);
    /** @type {Record<string, any>} */
    const result = {};
    for (const [key, item] of Object.entries(value)) result[key] = readValue(type.map, item, buffers, `${where}.${key}`);
    return result;
  }
  return readStruct(type.struct, value, buffers, where);
}

function describe(value) {
  if (value === null || value === undefined) return "nil";
  if (Array.isArray(value)) return "array";
  if (value instanceof Uint8Array) return "bin";
  return typeof value === "number" && !Number.isInteger(value) ? "float" : typeof value;
}

function isReference(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value) && "nd" in value;
}

function readArray(ref, buffers, where) {
  if (!isReference(ref) || Object.keys(ref).sort().join() !== "dtype,nd,shape") {
    throw invalid(`${where}: array reference must be {nd, dtype, shape}`);
  }
  const { nd, dtype, shape } = ref;
  if (!Number.isInteger(nd) || nd < 0 || nd >= buffers.length) {
    throw invalid(`${where}: array buffer index ${nd} out of range (${buffers.length} buffers)`);
  }
  const spec = DTYPES[dtype];
  if (!spec) throw invalid(`${where}: array dtype ${JSON.stringify(dtype)} not allowed`);
  if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) {
    throw invalid(`${where}: array shape must be a list of non-negative ints`);
  }
  const frame = buffers[nd];
  const expected = shape.reduce((a, b) => a * b, 1) * spec.size;
  if (expected !== frame.byteLength) {
    throw invalid(`${where}: array of shape [${shape}] ${dtype} needs ${expected} bytes, buffer has ${frame.byteLength}`);
  }
  // A typed array must start at a multiple of its item size: copy a frame that does not.
  const aligned = frame.byteOffset % spec.size === 0 ? frame : Uint8Array.prototype.slice.call(frame);
  const data = new spec.array(aligned.buffer, aligned.byteOffset, expected / spec.size);
  return { dtype, shape, data };
}

function readStruct(name, value, buffers, where) {
  const schema = STRUCTS[name];
  /** @type {Record<string, any>} */
  const result = {};
  if (schema.arrayLike) {
    if (!Array.isArray(value)) throw invalid(`${where}: expected an array (${name}), got ${describe(value)}`);
    if (value.length > schema.fields.length) throw invalid(`${where}: ${name} has ${schema.fields.length} fields, got ${value.length}`);
    schema.fields.forEach((field, i) => {
      if (i < value.length) result[field.name] = readValue(field.type, value[i], buffers, `${where}.${field.name}`);
      else if ("default" in field) result[field.name] = structuredClone(field.default);
      else throw invalid(`${where}: ${name} is missing required field ${field.name}`);
    });
    return result;
  }
  if (!fits({ struct: name }, value)) throw invalid(`${where}: expected a map (${name}), got ${describe(value)}`);
  if (schema.tag) {
    if (value.type !== schema.tag) throw invalid(`${where}: expected type ${schema.tag}, got ${JSON.stringify(value.type)}`);
    result.type = schema.tag;
  }
  for (const field of schema.fields) {
    if (field.name in value) result[field.name] = readValue(field.type, value[field.name], buffers, `${where}.${field.name}`);
    else if ("default" in field) result[field.name] = structuredClone(field.default);
    else throw invalid(`${where}: object missing required field ${JSON.stringify(field.name)}`);
  }
  // A field this schema does not know (a newer server) is kept as it came, not refused: the
  // event still reaches the client.
  for (const [key, item] of Object.entries(value)) if (!(key in result)) result[key] = item;
  return result;
}

/**
 * Decode the frames [topic, header, ...buffers] of one message. Every field is filled in
 * (defaults included); ndarray fields become NDArrays over the received bytes; Label and Box
 * (msgpack arrays on the wire) become objects.
 * @param {Uint8Array[]} frames
 * @returns {Message}
 */
export function decodeMessage(frames) {
  if (frames.length < 2) throw new OmnistreamError("malformed", `expected [topic, header, *buffers], got ${frames.length} frame(s)`);
  const [topicFrame, header, ...buffers] = frames;
  const topic = Buffer.from(topicFrame.buffer, topicFrame.byteOffset, topicFrame.byteLength).toString("ascii");
  let value;
  try {
    value = decodeMsgpack(header);
  } catch (err) {
    throw new OmnistreamError("malformed", `${topic}: header is not valid msgpack: ${err.message}`);
  }
  if (!value || typeof value !== "object" || Array.isArray(value) || typeof value.type !== "string") {
    throw new OmnistreamError("malformed", `${topic}: header is not a map with a "type"`);
  }
  const type = value.type;
  if (type !== topic) throw new OmnistreamError("topic_mismatch", `topic ${JSON.stringify(topic)} does not match message type ${JSON.stringify(type)}`);
  const schema = STRUCTS[type];
  // A type this schema does not know (a newer server): its header as it came, arrays unresolved.
  if (!schema || schema.tag !== type) return /** @type {Message} */ (value);
  return /** @type {Message} */ (readStruct(type, value, buffers, type));
}
