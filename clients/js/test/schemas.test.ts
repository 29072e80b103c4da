/**
 * The generated types and the client's parser against the JSON Schemas (the source of truth):
 * every example of every schema validates, the client's parser accepts every server example, the
 * typed examples (test/schema-examples.ts, type-checked by tsc) are the schemas' examples, and the
 * generated constants agree with the schemas.
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { PartySyncClient } from "../src/client.js";
import { isSequenced, parseServerMessage, ProtocolParseError } from "../src/parse.js";
import {
  CLIENT_TYPES,
  ERROR_CODES,
  PARTY_EVENT_TYPES,
  RETRYABLE_ERROR_CODES,
  SYSTEM_TYPES,
  TRANSIENT_TYPES,
  type PartyEvent,
} from "../src/types.js";
import { schemas, validateDef, validateMessage } from "./contracts.js";
import { accepted, delta, failed, FakeSocket, FakeTimers, hello, tick } from "./fake.js";
import { envelopeExamples, memberExamples, messageExamples } from "./schema-examples.js";

type Json = Record<string, unknown>;

const messageFiles = Object.keys(schemas).filter(
  (f) => f !== "common.json" && f !== "envelope.json",
);

function examplesOf(file: string): Json[] {
  return (schemas[file]?.["examples"] ?? []) as Json[];
}

describe("schema examples", () => {
  it("every schema has examples and every example validates", () => {
    for (const file of messageFiles) {
      const examples = examplesOf(file);
      assert.ok(examples.length > 0, `${file} has no examples`);
      for (const example of examples) {
        assert.deepEqual(validateMessage(example), [], `${file}: ${JSON.stringify(example)}`);
      }
    }
    for (const member of examplesOf("common.json")) {
      assert.deepEqual(validateDef("member", member), []);
    }
  });

  it("the typed examples checked by tsc are exactly the schemas' examples", () => {
    for (const file of messageFiles) {
      const type = file.replace(/\.json$/, "") as keyof typeof messageExamples;
      assert.deepEqual(messageExamples[type], examplesOf(file), file);
    }
    assert.deepEqual(memberExamples, examplesOf("common.json"));
    assert.deepEqual(envelopeExamples, examplesOf("envelope.json"));
  });

  it("the client's parser accepts every server → client example", () => {
    let count = 0;
    for (const file of messageFiles) {
      for (const example of examplesOf(file)) {
        const type = example["type"] as string;
        const fromServer =
          (SYSTEM_TYPES as readonly string[]).includes(type) ||
          (TRANSIENT_TYPES as readonly string[]).includes(type) ||
          ((PARTY_EVENT_TYPES as readonly string[]).includes(type) && "seq" in example);
        if (!fromServer) continue;
        const parsed = parseServerMessage(JSON.stringify(example));
        assert.deepEqual(parsed, example);
        assert.equal(isSequenced(parsed), "seq" in example);
        count += 1;
      }
    }
    assert.ok(count >= 28, `only ${count} server examples`);
  });

  it("the parser refuses what is not a server message", () => {
    const bad: unknown[] = [
      "{nope",
      "[]",
      JSON.stringify({ type: "party.join", payload: {} }), // an event without seq
      JSON.stringify({ type: "party.join", seq: 0, payload: { character_id: "a" } }),
      JSON.stringify({ type: "system.hello", seq: 3, payload: {} }),
      JSON.stringify({ type: "scene.update", seq: 2, payload: { options: "x" } }),
      JSON.stringify({ type: "Bad Type", payload: {} }),
      JSON.stringify({ type: "party.join", seq: 1 }),
      // the transient messages carry no seq, and the fields the client reads
      JSON.stringify({ type: "narration.delta", seq: 3, payload: { stream_id: "n", index: 0, text: "", done: false } }),
      JSON.stringify({ type: "narration.delta", payload: { stream_id: "n", index: -1, text: "", done: false } }),
      JSON.stringify({ type: "narration.delta", payload: { stream_id: "n", index: 0, text: 3, done: false } }),
      JSON.stringify({ type: "narration.delta", payload: { stream_id: "n", index: 0, text: "" } }),
      JSON.stringify({ type: "action.accepted", payload: { character_id: "a", action_type: "choice" } }),
      JSON.stringify({ type: "action.failed", payload: { action_id: "x", character_id: "a" } }),
      // a hello restates the actions in flight and the open streams
      JSON.stringify({ ...hello(0), payload: { ...hello(0).payload, narration: undefined } }),
      JSON.stringify({ ...hello(0), payload: { ...hello(0).payload, actions_in_flight: {} } }),
      JSON.stringify({
        ...hello(0),
        payload: { ...hello(0).payload, narration: [{ stream_id: "n", text: "x" }] },
      }),
    ];
    for (const frame of bad) {
      assert.throws(() => parseServerMessage(frame), ProtocolParseError, String(frame));
    }
  });

  it("an unknown type is passed through, counted in the sequence if it has a seq", () => {
    const parsed = parseServerMessage(
      JSON.stringify({ type: "party.emote", seq: 4, payload: { emote: "wave" } }),
    );
    assert.equal(parsed.type, "party.emote");
    assert.ok("unknown" in parsed);
    assert.ok(isSequenced(parsed));
  });

  it("the generated constants agree with the schemas", () => {
    const common = schemas["common.json"] as { $defs: { error_code: { enum: string[] } } };
    assert.deepEqual([...ERROR_CODES], common.$defs.error_code.enum);
    for (const type of PARTY_EVENT_TYPES) {
      for (const example of examplesOf(`${type}.json`).filter((e) => "seq" in e)) {
        assert.equal(typeof example["seq"], "number");
      }
      const required = (schemas[`${type}.json`]?.["required"] ?? []) as string[];
      const conditional = ((schemas[`${type}.json`]?.["if"] as Json | undefined)?.["required"] ??
        []) as string[];
      assert.ok(required.includes("seq") || conditional.includes("seq"), type);
    }
    assert.deepEqual([...SYSTEM_TYPES].sort(), ["system.error", "system.hello", "system.pong"]);
    assert.deepEqual([...CLIENT_TYPES].sort(), [
      "action.request",
      "party.leave",
      "system.ping",
      "vote.cast",
    ]);
    assert.deepEqual([...TRANSIENT_TYPES].sort(), [
      "action.accepted",
      "action.failed",
      "narration.delta",
    ]);
    for (const type of TRANSIENT_TYPES) {
      const schema = schemas[`${type}.json`] as Json;
      assert.equal((schema["properties"] as Json)["seq"], false, `${type} has no seq`);
      assert.match(String(schema["description"]), /^Server → client, no seq/, type);
    }
    for (const code of RETRYABLE_ERROR_CODES) assert.ok(ERROR_CODES.includes(code));
    assert.equal(
      messageFiles.length,
      PARTY_EVENT_TYPES.length +
        SYSTEM_TYPES.length +
        TRANSIENT_TYPES.length +
        // the client-only requests (party.leave is an event too)
        CLIENT_TYPES.filter((t) => !(PARTY_EVENT_TYPES as readonly string[]).includes(t)).length,
    );
  });

  it("the client applies every example event in order without error", async () => {
    FakeSocket.reset();
    const timers = new FakeTimers();
    const client = new PartySyncClient({
      url: "ws://test/ws",
      token: "t",
      WebSocket: FakeSocket,
      timers,
      now: () => timers.now,
    });
    const applied: number[] = [];
    client.on("event", (e) => applied.push(e.seq));
    client.on("protocolError", (e) => assert.fail(e));
    void client.connect();
    await tick();
    const helloExample = messageExamples["system.hello"][0];
    assert.ok(helloExample !== undefined);
    FakeSocket.last().deliver({ ...helloExample, payload: { ...helloExample.payload, seq: 0 } });
    const events: PartyEvent[] = [];
    for (const type of PARTY_EVENT_TYPES) {
      for (const example of examplesOf(`${type}.json`)) {
        if ("seq" in example) events.push(example as unknown as PartyEvent);
      }
    }
    events.forEach((e, i) => FakeSocket.last().deliver({ ...e, seq: i + 1 }));
    assert.deepEqual(
      applied,
      events.map((_, i) => i + 1),
    );
    assert.equal(client.state?.lastSeq, events.length);
    assert.equal(FakeSocket.all.length, 1, "no reconnect, no resync");
    client.close();
  });

  it("hello() test fixtures are valid hellos", () => {
    assert.deepEqual(validateMessage(hello(3) as unknown as Json), []);
    assert.deepEqual(validateMessage(hello(3, { resumed_from: 1 }) as unknown as Json), []);
  });

  it("the transient fixtures are valid messages", () => {
    for (const message of [
      delta("n-1", 0, "The gate ", { actionId: "a-1" }),
      delta("n-1", 1, "", { done: true }),
      accepted("a-1", "borin", "combat"),
      failed("a-1", "borin", "engine_unavailable"),
    ]) {
      assert.deepEqual(validateMessage(message as unknown as Json), [], JSON.stringify(message));
    }
  });

  it("the client applies every transient example (hello's live state, then the pieces)", async () => {
    FakeSocket.reset();
    const timers = new FakeTimers();
    const client = new PartySyncClient({
      url: "ws://test/ws",
      token: "t",
      WebSocket: FakeSocket,
      timers,
      now: () => timers.now,
      fetch: null,
    });
    client.on("protocolError", (e) => assert.fail(e));
    const acceptedIds: string[] = [];
    const failedIds: string[] = [];
    client.on("actionAccepted", (m) => acceptedIds.push(m.payload.action_id));
    client.on("actionFailed", (m) => failedIds.push(m.payload.action_id));
    void client.connect();
    await tick();
    const helloExample = messageExamples["system.hello"][0];
    assert.ok(helloExample !== undefined);
    FakeSocket.last().deliver(helloExample);
    // The example hello has borin's action in flight and its stream open at piece 2.
    assert.deepEqual(client.actionsInFlight, helloExample.payload.actions_in_flight);
    const open = helloExample.payload.narration[0];
    assert.ok(open !== undefined);
    assert.equal(client.narration[0]?.text, open.text);
    for (const example of messageExamples["action.accepted"]) FakeSocket.last().deliver(example);
    assert.deepEqual(acceptedIds, ["a-1f3c", "vote:v-3-1"]);
    for (const example of messageExamples["narration.delta"]) FakeSocket.last().deliver(example);
    const stream = client.narration.find((s) => s.streamId === "n-a-1f3c");
    assert.equal(stream?.text, "The gate gives way with a shriek of iron.");
    assert.equal(stream?.done, true);
    for (const example of messageExamples["action.failed"]) FakeSocket.last().deliver(example);
    assert.deepEqual(failedIds, ["a-1f3c"]);
    assert.deepEqual(
      client.actionsInFlight.map((a) => a.action_id),
      ["a-9c1e", "vote:v-3-1"],
    );
    assert.equal(
      client.narration.find((s) => s.streamId === "n-a-1f3c"),
      undefined,
      "the finished stream of the failed action is gone",
    );
    assert.equal(FakeSocket.all.length, 1);
    client.close();
  });
});
