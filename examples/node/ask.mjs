#!/usr/bin/env node
// Ask a running omnistream a question and print the answer as it streams.
//
//   node ask.mjs "What is on screen?" [--run-dir DIR] [--at SECONDS] [--session NAME] [--json]
//                [--endpoint tcp://HOST:PORT --keys-dir DIR --key-name NAME]   (another machine, CURVE)
//
// With --json, prints one JSON line per event ({"delta": ...}, then {"done": AnswerDone}).
// Exit codes (as the omnistream CLI): 0 answered, 1 failure, 2 bad usage, 3 no running system.

import { Client, OmnistreamError } from "./omnistream.mjs";

const USAGE =
  "usage: node ask.mjs QUESTION [--run-dir DIR] [--at SECONDS] [--session NAME] [--json]\n" +
  "                   [--endpoint tcp://HOST:PORT] [--keys-dir DIR] [--key-name NAME]";

function parseArgs(argv) {
  const options = { runDir: undefined, at: 0, session: "default", json: false, question: undefined };
  options.endpoint = options.keysDir = options.keyName = undefined;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--run-dir") options.runDir = argv[++i];
    else if (arg === "--at") options.at = Number(argv[++i]);
    else if (arg === "--session") options.session = argv[++i];
    else if (arg === "--json") options.json = true;
    else if (arg === "--endpoint") options.endpoint = argv[++i];
    else if (arg === "--keys-dir") options.keysDir = argv[++i];
    else if (arg === "--key-name") options.keyName = argv[++i];
    else if (arg === "--help" || arg === "-h") options.help = true;
    else if (arg.startsWith("--")) throw new OmnistreamError("usage", `unknown option ${arg}`);
    else if (options.question === undefined) options.question = arg;
    else throw new OmnistreamError("usage", `unexpected argument ${JSON.stringify(arg)}`);
  }
  if (!options.help && !options.question) throw new OmnistreamError("usage", "a question is required");
  if (!Number.isFinite(options.at)) throw new OmnistreamError("usage", "--at needs a number of seconds");
  return options;
}

async function main() {
  let options;
  try {
    options = parseArgs(process.argv.slice(2));
  } catch (err) {
    console.error(`${err.message}\n${USAGE}`);
    return 2;
  }
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  let client;
  try {
    const { session, endpoint, keysDir, keyName } = options;
    client = await Client.connect(options.runDir, { session, endpoint, keysDir, keyName, timeoutMs: 30000 });
  } catch (err) {
    console.error(err.message);
    return 3;
  }
  try {
    const answer = client.ask(options.question, { ts: options.at });
    let step = await answer.next();
    while (!step.done) {
      if (options.json) console.log(JSON.stringify({ delta: step.value }));
      else process.stdout.write(step.value);
      step = await answer.next();
    }
    if (options.json) console.log(JSON.stringify({ done: step.value }));
    else process.stdout.write("\n");
    return 0;
  } catch (err) {
    console.error(err.message);
    return err.code === "invalid" ? 2 : 1;
  } finally {
    client.close();
  }
}

process.exitCode = await main();
