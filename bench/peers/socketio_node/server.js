#!/usr/bin/env node
// The peer: Socket.IO v4 on Node.js with @socket.io/redis-adapter. A BASELINE, NOT THE PRODUCT.
//
// It plays the benchmark's scenario as bench/peers/socketio_server.py (python-socketio) does, so
// that party_sync is compared with what most teams would build instead:
//
// - a connection authenticates with the same JWT (Socket.IO `auth` = `{token}`; HS256, the secret
//   of bench/common.py, audience "party_sync", the binding claims party_id / campaign_run_id /
//   character_id required and checked against the id rule) and joins a room named after its party;
// - an `action.request` event is validated against the same JSON Schema
//   (contracts/jsonschema/party_sync/, compiled once at start with Ajv, draft 2020-12, formats on),
//   checked against the connection's character and run, and answered by the same engine logic as
//   bench/engine.py's BenchLogic (same payloads, key for key) with an `action.result` then a
//   `scene.update`;
// - each event gets a per-party `seq` (a counter in this process: correct for one process only),
//   is validated against its schema, and is emitted to the party's room through the Redis adapter
//   (every room broadcast is published to Redis, as the adapter does for every node to see it).
//
// What it does not do, because Socket.IO gives no building block for it: idempotency by
// action_id, one action in flight per character, event history and resume, presence events.
//
// Usage: node bench/peers/socketio_node/server.js --port N --redis-url redis://127.0.0.1:P/0
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const http = require("node:http");
const path = require("node:path");

const Ajv2020 = require("ajv/dist/2020").default;
const addFormats = require("ajv-formats").default;
const jwt = require("jsonwebtoken");
const { createClient } = require("redis");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");

const ROOT = path.resolve(__dirname, "..", "..", "..");
const AUDIENCE = "party_sync";
const LEEWAY_S = 30;
const ID = /^[A-Za-z0-9._:-]{1,64}$/;
const PARTY_ACTOR = "party";

// -- command line and configuration --------------------------------------------------------------
function parseArgs(argv) {
  const args = { host: "127.0.0.1", port: 0, redisUrl: "" };
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    const value = () => (inline !== undefined ? inline : argv[++i]);
    if (flag === "--host") args.host = value();
    else if (flag === "--port") args.port = Number(value());
    else if (flag === "--redis-url") args.redisUrl = value();
    else if (flag === "-h" || flag === "--help") {
      process.stdout.write("usage: server.js --port N --redis-url redis://host:port/db [--host H]\n");
      process.exit(0);
    } else {
      throw new Error(`unknown argument ${argv[i]}`);
    }
  }
  if (!Number.isInteger(args.port) || args.port <= 0) throw new Error("--port is required");
  if (!args.redisUrl) throw new Error("--redis-url is required");
  return args;
}

// The benchmark's JWT secret: $PARTY_SYNC_JWT_SECRET (bench/run.py sets it for every server), or
// SECRET in bench/common.py (the single source of truth) when run by hand.
function jwtSecret() {
  if (process.env.PARTY_SYNC_JWT_SECRET) return process.env.PARTY_SYNC_JWT_SECRET;
  const common = fs.readFileSync(path.join(ROOT, "bench", "common.py"), "utf8");
  const match = /^SECRET\s*=\s*"([^"]+)"/m.exec(common);
  if (!match) throw new Error("no SECRET in bench/common.py and no PARTY_SYNC_JWT_SECRET");
  return match[1];
}

// -- the contracts: one compiled validator per message type, as party_sync's Contracts ------------
function loadContracts() {
  const dir =
    process.env.PARTY_SYNC_CONTRACTS_DIR || path.join(ROOT, "contracts", "jsonschema", "party_sync");
  const ajv = new Ajv2020({ strict: false, allErrors: false, validateFormats: true });
  addFormats(ajv);
  const documents = {};
  for (const file of fs.readdirSync(dir).filter((f) => f.endsWith(".json")).sort()) {
    const doc = JSON.parse(fs.readFileSync(path.join(dir, file), "utf8"));
    documents[file.slice(0, -5)] = doc;
    ajv.addSchema(doc);
  }
  const validators = {};
  for (const [name, doc] of Object.entries(documents)) {
    if (name === "envelope" || name === "common") continue;
    validators[name] = ajv.getSchema(doc.$id);
  }
  for (const needed of ["action.request", "action.result", "scene.update", "system.error"]) {
    if (!validators[needed]) throw new Error(`no schema for ${needed} in ${dir}`);
  }
  return {
    // null when valid, else a short reason (as party_sync's SchemaViolation).
    check(type, message) {
      const validate = validators[type];
      if (validate(message)) return null;
      const e = validate.errors[0];
      return `${e.instancePath.replace(/^\//, "").replace(/\//g, ".")}: ${e.message}`.slice(0, 300);
    },
  };
}

// -- tokens: what party_sync's TokenVerifier accepts ----------------------------------------------
function verifier(secret) {
  return function verify(token) {
    if (typeof token !== "string" || !token) throw new Error("missing token");
    const claims = jwt.verify(token, secret, {
      algorithms: ["HS256"],
      audience: AUDIENCE,
      clockTolerance: LEEWAY_S,
    });
    if (typeof claims.exp !== "number") throw new Error("token lacks the 'exp' claim");
    for (const name of ["party_id", "campaign_run_id", "character_id"]) {
      if (typeof claims[name] !== "string" || !ID.test(claims[name])) {
        throw new Error(`token claim '${name}' is not a valid id`);
      }
    }
    if (claims.character_id === PARTY_ACTOR) throw new Error("character_id 'party' is reserved");
    return {
      party_id: claims.party_id,
      campaign_run_id: claims.campaign_run_id,
      character_id: claims.character_id,
    };
  };
}

// -- the engine: bench/engine.py's BenchLogic, payload for payload --------------------------------
const NARRATION =
  "Black water laps at a gate of rusted iron. Beyond it, the stair descends into the " +
  "flooded crypt. Something scrapes against the bars.";
const OPTIONS = [
  { id: "open-gate", label: "Force the rusted gate" },
  { id: "search-walls", label: "Search the walls for a hidden lever" },
  { id: "turn-back", label: "Turn back to Millbrook" },
];

class BenchLogic {
  constructor() {
    this.scenes = new Map();
  }

  // [action.result payload, scene.update payload] for one action.
  answer(partyId, actionId, characterId, actionType) {
    const sceneNumber = (this.scenes.get(partyId) || 0) + 1;
    this.scenes.set(partyId, sceneNumber);
    const result = {
      action_id: actionId,
      character_id: characterId,
      action_type: actionType,
      outcome: "success",
      state: { hp: 18, max_hp: 20, effects: [], scene_flags: { gate_seen: true } },
      roll: { die: "d20", value: 12, modifier: 3, total: 15, difficulty: 14 },
      narration: "Aria's fingers find a loose stone. Behind it, a corroded lever.",
    };
    return [result, scene(sceneNumber)];
  }
}

function scene(sceneNumber) {
  return {
    scene_number: sceneNumber,
    scene_id: `scene-${sceneNumber}`,
    title: "The Sunken Gate",
    narration: NARRATION,
    options: OPTIONS.map((option) => ({ ...option })),
    kind: "story",
    difficulty: 14,
  };
}

// A fresh W3C-style trace id (32 lowercase hex), as party_sync's codec.new_trace_id.
function newTraceId() {
  return crypto.randomBytes(16).toString("hex");
}

// -- the scenario on a Socket.IO server ----------------------------------------------------------
function partyRooms(io, contracts, verify) {
  const logic = new BenchLogic();
  const seqs = new Map();

  io.use((socket, next) => {
    const auth = socket.handshake.auth;
    try {
      socket.data.claims = verify(auth && typeof auth === "object" ? auth.token : "");
    } catch (exc) {
      next(new Error(exc.message || "bad token"));
      return;
    }
    next();
  });

  function error(socket, code, message, traceId) {
    const event = {
      type: "system.error",
      timestamp: new Date().toISOString(),
      trace_id: traceId,
      payload: {
        code,
        message: message.slice(0, 500) || code,
        retryable: false,
        in_reply_to: { trace_id: null, type: "action.request" },
      },
    };
    socket.emit("system.error", event);
  }

  function publish(partyId, type, payload, traceId) {
    const seq = (seqs.get(partyId) || 0) + 1;
    const event = {
      type,
      timestamp: new Date().toISOString(),
      trace_id: traceId,
      seq,
      payload,
    };
    const problem = contracts.check(type, event); // the engine's output is checked, as party_sync does
    if (problem !== null) throw new Error(`${type} does not match its schema: ${problem}`);
    seqs.set(partyId, seq);
    io.to(partyId).emit(type, event);
  }

  io.on("connection", (socket) => {
    const claims = socket.data.claims;
    socket.join(claims.party_id);
    socket.on("action.request", (message) => {
      const problem = contracts.check("action.request", message);
      if (problem !== null) {
        const reason = `action.request does not match its schema: ${problem}`;
        error(socket, "schema_violation", reason, newTraceId());
        return;
      }
      const p = message.payload;
      const trace = message.trace_id || newTraceId();
      if (p.character_id !== claims.character_id || p.campaign_run_id !== claims.campaign_run_id) {
        error(socket, "forbidden", "this connection cannot act for that character", trace);
        return;
      }
      const [result, sceneUpdate] = logic.answer(
        claims.party_id,
        p.action_id,
        claims.character_id,
        p.action_type,
      );
      try {
        publish(claims.party_id, "action.result", result, trace);
        publish(claims.party_id, "scene.update", sceneUpdate, trace);
      } catch (exc) {
        process.stderr.write(`socketio_node: ${exc.message}\n`); // a bug of this peer: say so
      }
    });
  });
}

// -- main ----------------------------------------------------------------------------------------
async function main() {
  const args = parseArgs(process.argv.slice(2));
  const contracts = loadContracts();
  const verify = verifier(jwtSecret());

  // The adapter's documented pairing with node-redis v4: a publishing client and its duplicate
  // for subscriptions.
  const pubClient = createClient({ url: args.redisUrl });
  const subClient = pubClient.duplicate();
  for (const client of [pubClient, subClient]) {
    client.on("error", (err) => process.stderr.write(`redis: ${err.message}\n`));
  }
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const httpServer = http.createServer();
  const io = new Server(httpServer, {
    path: "/socket.io/",
    serveClient: false,
    transports: ["websocket"], // the load generator speaks Engine.IO over a raw WebSocket only
    cors: { origin: "*" },
    adapter: createAdapter(pubClient, subClient),
  });
  partyRooms(io, contracts, verify);

  await new Promise((resolve, reject) => {
    httpServer.once("error", reject);
    httpServer.listen({ host: args.host, port: args.port, backlog: 4096 }, resolve);
  });

  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    setTimeout(() => process.exit(0), 3000).unref(); // bounded: never outlive the orchestrator
    io.close(() => {
      Promise.allSettled([pubClient.quit(), subClient.quit()]).then(() => process.exit(0));
    });
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  process.stderr.write(`socketio_node: ${err.stack || err}\n`);
  process.exit(1);
});
