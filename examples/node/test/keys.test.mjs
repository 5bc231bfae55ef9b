// CURVE certificates in the format of protocol/security.py (tests/integration/test_client_node_gateway.py also
// reads the files Python's `generate_keys` writes).

import assert from "node:assert/strict";
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { curveKeyPair } from "zeromq";
import { loadCertificate, loadClientKeys } from "../lib/keys.mjs";

const dir = mkdtempSync(join(tmpdir(), "os-keys-"));
after(() => rmSync(dir, { recursive: true, force: true }));

function certificate(path, publicKey, secretKey, mode = 0o600) {
  const lines = ["#   ZeroMQ CURVE Certificate", "", "metadata", "curve", `    public-key = "${publicKey}"`];
  if (secretKey) lines.push(`    secret-key = "${secretKey}"`);
  writeFileSync(path, lines.join("\n") + "\n", { mode });
  chmodSync(path, mode);
}

test("a client's pair and the server's public key are read from the keys directory", () => {
  const client = curveKeyPair();
  const server = curveKeyPair();
  certificate(join(dir, "laptop.key_secret"), client.publicKey, client.secretKey);
  certificate(join(dir, "server.key"), server.publicKey, null, 0o644);
  assert.deepEqual(loadClientKeys(dir, "laptop"), {
    publicKey: client.publicKey,
    secretKey: client.secretKey,
    serverPublicKey: server.publicKey,
  });
});

test("missing, unsafe and broken key files are refused by name", () => {
  const pair = curveKeyPair();
  assert.throws(() => loadClientKeys(dir, "nobody"), /missing key file .*nobody\.key_secret; create keys with `omnistream keys`/);
  certificate(join(dir, "open.key_secret"), pair.publicKey, pair.secretKey, 0o644);
  assert.throws(() => loadClientKeys(dir, "open"), /readable by others \(mode 644\); chmod 600 it/);
  certificate(join(dir, "half.key_secret"), pair.publicKey, null);
  assert.throws(() => loadClientKeys(dir, "half"), /holds no secret key/);
  certificate(join(dir, "bad.key"), "short", null);
  assert.throws(() => loadCertificate(join(dir, "bad.key")), /public-key is not a 40-character Z85 key/);
});
