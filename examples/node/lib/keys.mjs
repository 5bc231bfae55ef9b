// CURVE keys in the files `omnistream keys` writes (protocol/security.py): ZeroMQ certificates
//
//   metadata
//   curve
//       public-key = "<40 Z85 characters>"
//       secret-key = "<40 Z85 characters>"      (only in *.key_secret)
//
// in a keys directory: server.key (the gateway's public key), NAME.key_secret (this client's pair).

import { readFileSync, statSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { OmnistreamError } from "./codec.mjs";

/**
 * The keys a client needs, as the Z85 strings the zeromq package takes.
 * @typedef {object} ClientKeys
 * @property {string} publicKey      this client's public key
 * @property {string} secretKey      this client's secret key
 * @property {string} serverPublicKey  the gateway's public key
 */

/** `$OMNISTREAM_KEYS_DIR`, or `keys` in the config folder (`$XDG_CONFIG_HOME/omnistream`, default
 * `~/.config/omnistream`): where `omnistream keys` writes.
 * @returns {string} */
export function defaultKeysDir() {
  if (process.env.OMNISTREAM_KEYS_DIR) return process.env.OMNISTREAM_KEYS_DIR;
  return join(process.env.XDG_CONFIG_HOME || join(homedir(), ".config"), "omnistream", "keys");
}

const Z85_KEY = /^[0-9a-zA-Z.\-:+=^!/*?&<>()[\]{}@%$#]{40}$/;

/**
 * Read a ZeroMQ certificate file: its public key and, in a secret file, its secret key. A secret
 * file readable by group or others is refused (as the Python client does).
 * @param {string} path
 * @param {boolean} [needSecret]
 * @returns {{publicKey: string, secretKey: string | null}}
 */
export function loadCertificate(path, needSecret = false) {
  let text;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    if (err.code === "ENOENT") throw new OmnistreamError("keys", `missing key file ${path}; create keys with \`omnistream keys\``);
    throw new OmnistreamError("keys", `cannot read key file ${path}: ${err.message}`);
  }
  const mode = statSync(path).mode & 0o777;
  if (needSecret && mode & 0o077) {
    throw new OmnistreamError("keys", `secret key file ${path} is readable by others (mode ${mode.toString(8)}); chmod 600 it`);
  }
  /** @type {Record<string, string>} */
  const keys = {};
  for (const line of text.split(/\r?\n/)) {
    const match = /^\s*(public-key|secret-key)\s*=\s*"([^"]*)"\s*$/.exec(line);
    if (match) keys[match[1]] = match[2];
  }
  for (const [name, value] of Object.entries(keys)) {
    if (!Z85_KEY.test(value)) throw new OmnistreamError("keys", `key file ${path}: ${name} is not a 40-character Z85 key`);
  }
  if (!keys["public-key"]) throw new OmnistreamError("keys", `key file ${path} holds no public key`);
  if (needSecret && !keys["secret-key"]) throw new OmnistreamError("keys", `key file ${path} holds no secret key`);
  return { publicKey: keys["public-key"], secretKey: keys["secret-key"] ?? null };
}

/**
 * This client's pair (`NAME.key_secret`) and the gateway's public key (`server.key`).
 * @param {string} [keysDir]  default: defaultKeysDir()
 * @param {string} [name]     the client's key name (`omnistream keys --client NAME`), default "client"
 * @returns {ClientKeys}
 */
export function loadClientKeys(keysDir = defaultKeysDir(), name = "client") {
  const own = loadCertificate(join(keysDir, `${name}.key_secret`), true);
  const server = loadCertificate(join(keysDir, "server.key"));
  return { publicKey: own.publicKey, secretKey: /** @type {string} */ (own.secretKey), serverPublicKey: server.publicKey };
}
