/** PartySyncClient against a fake WebSocket, with injected timers and randomness. */
import assert from "node:assert/strict";
import { beforeEach, describe, it } from "node:test";

import { fullJitterDelay } from "../src/backoff.js";
import {
  PartySyncClient,
  tokenExpiry,
  type ConnectionChange,
  type PartySyncClientOptions,
  type TokenReason,
} from "../src/client.js";
import { ClientClosedError, PartySyncError } from "../src/errors.js";
import type { ActionResultMessage, PartyEvent, VoteUpdateMessage } from "../src/types.js";
import { validateMessage } from "./contracts.js";
import {
  event,
  FakeSocket,
  FakeTimers,
  fakeToken,
  hello,
  result,
  scene,
  systemError,
  tick,
} from "./fake.js";

interface Harness {
  client: PartySyncClient;
  timers: FakeTimers;
  connections: ConnectionChange[];
  events: PartyEvent[];
  tokenCalls: TokenReason[];
  /** The socket of the current connection attempt. */
  socket: () => FakeSocket;
}

/** `noToken`: start without a token (getToken gives the first one). */
function harness(
  { noToken, ...options }: Partial<PartySyncClientOptions> & { noToken?: boolean } = {},
): Harness {
  FakeSocket.reset();
  const timers = new FakeTimers();
  let ids = 0;
  const tokenCalls: TokenReason[] = [];
  const client = new PartySyncClient({
    url: "ws://game.test/ws",
    ...(noToken ? {} : { token: "token-1" }),
    WebSocket: FakeSocket,
    timers,
    now: () => timers.now,
    random: () => 0.5,
    makeId: () => `id-${++ids}`,
    fetch: null,
    pingIntervalMs: 0, // the liveness checks have tests of their own
    connectTimeoutMs: 0,
    ...options,
    ...(options.getToken !== undefined
      ? {
          getToken: (reason: TokenReason) => {
            tokenCalls.push(reason);
            return options.getToken?.(reason) ?? "";
          },
        }
      : {}),
  });
  const connections: ConnectionChange[] = [];
  const events: PartyEvent[] = [];
  client.on("connection", (c) => connections.push(c));
  client.on("event", (e) => {
    if (!("unknown" in e)) events.push(e);
  });
  return { client, timers, connections, events, tokenCalls, socket: () => FakeSocket.last() };
}

/** Connect and deliver a hello at `seq` (plus `events`). */
async function joined(h: Harness, seq = 0, ...events: PartyEvent[]): Promise<void> {
  const ready = h.client.connect();
  await tick();
  h.socket().deliver(hello(seq));
  for (const e of events) h.socket().deliver(e);
  await ready;
}

/** Let the scheduled reconnect happen. */
async function reconnect(h: Harness): Promise<FakeSocket> {
  const before = FakeSocket.all.length;
  h.timers.advance(60_000);
  await tick();
  assert.equal(FakeSocket.all.length, before + 1, "a new connection attempt");
  return h.socket();
}

function assertValidClientMessages(socket: FakeSocket): void {
  for (const message of socket.sent) assert.deepEqual(validateMessage(message), [], JSON.stringify(message));
}

beforeEach(() => FakeSocket.reset());

describe("connecting", () => {
  it("connects with the token and becomes open at the hello", async () => {
    const h = harness();
    assert.equal(h.client.status, "idle");
    const ready = h.client.connect();
    await tick();
    assert.equal(h.socket().query.get("token"), "token-1");
    assert.equal(h.socket().query.get("epoch"), null);
    assert.equal(h.client.status, "connecting");
    h.socket().deliver(hello(4));
    await ready;
    assert.equal(h.client.status, "open");
    assert.equal(h.client.state?.lastSeq, 4);
    assert.deepEqual(h.client.position, { epoch: "ep-1", lastSeq: 4 });
    assert.deepEqual(
      h.connections.map((c) => c.status),
      ["connecting", "open"],
    );
  });

  it("asks getToken for the first token", async () => {
    const h = harness({ noToken: true, getToken: () => "from-hook" });
    await joined(h);
    assert.deepEqual(h.tokenCalls, ["initial"]);
    assert.equal(h.socket().query.get("token"), "from-hook");
  });

  it("needs a token or a hook", () => {
    assert.throws(() => new PartySyncClient({ url: "ws://x/ws", WebSocket: FakeSocket }), TypeError);
  });
});

describe("reconnecting with backoff and full jitter", () => {
  it("delays are uniform in [0, min(cap, base·2^n)) and drawn from the injected random", () => {
    assert.equal(fullJitterDelay(0, () => 0.5, 500, 30_000), 250);
    assert.equal(fullJitterDelay(3, () => 0.5, 500, 30_000), 2000);
    assert.equal(fullJitterDelay(10, () => 0.999, 500, 30_000), 29_970);
    assert.equal(fullJitterDelay(60, () => 0.5, 500, 30_000), 15_000);
    assert.equal(fullJitterDelay(5, () => 0, 500, 30_000), 0);
  });

  it("retries with growing, jittered delays until a hello resets the attempt count", async () => {
    const draws = [0.5, 0.25, 1 - 1e-9, 0.1, 0.5];
    const h = harness({
      random: () => draws.shift() ?? 0.5,
      backoff: { baseMs: 100, capMs: 500 },
    });
    await joined(h);
    h.socket().drop(1006);
    for (let i = 0; i < 4; i++) {
      const socket = await reconnect(h);
      socket.drop(1006); // refused before any hello
    }
    // ceilings 100, 200, 400, 500 (cap), 500; delays = random × ceiling
    const delays = () => h.connections.filter((c) => c.delayMs !== undefined).map((c) => c.delayMs);
    assert.deepEqual(delays(), [50, 50, 399, 50, 250]);
    const socket = await reconnect(h);
    socket.deliver(hello(0));
    assert.equal(h.client.status, "open");
    socket.drop(1001);
    assert.equal(delays().at(-1), 50, "back to the base ceiling after a hello");
    const statuses = h.connections.map((c) => c.status);
    assert.equal(statuses.at(-1), "reconnecting");
    assert.equal(h.connections.at(-1)?.code, 1001);
  });

  it("does not reconnect after 1000 (left) or 1008 (policy), and rejects what was pending", async () => {
    for (const [code, reason] of [
      [1000, "left"],
      [1008, "policy"],
    ] as const) {
      const h = harness();
      await joined(h);
      const action = h.client.sendAction("skill_check", {});
      h.socket().drop(code);
      assert.equal(h.client.status, "closed");
      assert.equal(h.client.closedReason, reason);
      await assert.rejects(action, (e: unknown) => e instanceof ClientClosedError && e.reason === reason);
      h.timers.advance(120_000);
      await tick();
      assert.equal(FakeSocket.all.length, 1, `no reconnect after ${code}`);
    }
  });
});

describe("a link gone silent", () => {
  it("pings after an idle interval; anything heard keeps the link, silence drops and resumes", async () => {
    const h = harness({ pingIntervalMs: 20_000, pongTimeoutMs: 10_000 });
    await joined(h, 3);
    const first = h.socket();
    h.timers.advance(19_999);
    assert.equal(first.sentOfType("system.ping").length, 0);
    h.timers.advance(1);
    assert.equal(first.sentOfType("system.ping").length, 1);
    assertValidClientMessages(first);
    first.deliver({ type: "system.pong", timestamp: "2026-11-25T21:00:30.000Z", trace_id: "t", payload: {} });
    h.timers.advance(19_999); // the pong started a new idle interval
    assert.equal(first.sentOfType("system.ping").length, 1);
    h.timers.advance(1);
    assert.equal(first.sentOfType("system.ping").length, 2);
    h.timers.advance(10_000); // no answer at all: the link is dead
    assert.ok(first.closedByClient !== null, "the dead socket is closed");
    assert.equal(h.client.status, "reconnecting");
    assert.equal(h.connections.at(-1)?.code, 1006);
    const second = await reconnect(h);
    assert.equal(second.query.get("last_seq"), "3", "it resumes");
    first.drop(1006); // the dead socket's late close changes nothing
    assert.equal(FakeSocket.all.length, 2);
  });

  it("checkNow pings at once: an answer keeps the link, silence drops it and resumes", async () => {
    const h = harness({ pingIntervalMs: 20_000, pongTimeoutMs: 10_000 });
    await joined(h, 3);
    const first = h.socket();
    h.timers.advance(1_000);
    h.client.checkNow(3_000); // the browser went offline
    assert.equal(first.sentOfType("system.ping").length, 1);
    assertValidClientMessages(first);
    h.client.checkNow(3_000); // a check under way: not a second ping
    assert.equal(first.sentOfType("system.ping").length, 1);
    first.deliver({ type: "system.pong", timestamp: "2026-11-25T21:00:30.000Z", trace_id: "t", payload: {} });
    h.timers.advance(5_000);
    assert.equal(h.client.status, "open", "answered: the link stays");
    h.client.checkNow(3_000);
    assert.equal(first.sentOfType("system.ping").length, 2);
    h.timers.advance(2_999);
    assert.equal(h.client.status, "open");
    h.timers.advance(1); // no answer within the check's timeout: lost, well before 20 s + 10 s
    assert.ok(first.closedByClient !== null, "the dead socket is closed");
    assert.equal(h.client.status, "reconnecting");
    assert.equal(h.connections.at(-1)?.code, 1006);
    const second = await reconnect(h);
    assert.equal(second.query.get("last_seq"), "3", "it resumes");
  });

  it("checkNow with a shorter timeout shortens the wait of a check under way, no second ping", async () => {
    const h = harness({ pingIntervalMs: 20_000, pongTimeoutMs: 10_000 });
    await joined(h, 3);
    const socket = h.socket();
    h.client.checkNow(); // the page shown again: 10 s for an answer
    h.timers.advance(1_000);
    h.client.checkNow(3_000); // then the device offline: 3 s from now, not 9
    h.client.checkNow(5_000); // a longer one changes nothing
    assert.equal(socket.sentOfType("system.ping").length, 1);
    h.timers.advance(2_999);
    assert.equal(h.client.status, "open");
    h.timers.advance(1);
    assert.equal(h.client.status, "reconnecting");
  });

  it("checkNow while waiting to reconnect tries at once; before a hello it does nothing", async () => {
    const h = harness({ pingIntervalMs: 20_000, pongTimeoutMs: 10_000 });
    void h.client.connect();
    await tick();
    const socket = h.socket();
    h.client.checkNow(); // the handshake has its own watch
    assert.equal(socket.sentOfType("system.ping").length, 0);
    socket.deliver(hello(0));
    socket.drop(1006);
    assert.equal(h.client.status, "reconnecting");
    const before = FakeSocket.all.length;
    h.client.checkNow();
    await tick();
    assert.equal(FakeSocket.all.length, before + 1, "dialled at once, not after the backoff");
  });

  it("the ping waits for a whole interval of silence, however the messages fall", async () => {
    const h = harness({ pingIntervalMs: 20_000, pongTimeoutMs: 10_000 });
    await joined(h, 0); // heard at 0
    const socket = h.socket();
    const pong = { type: "system.pong", timestamp: "2026-11-25T21:00:30.000Z", trace_id: "t", payload: {} };
    h.timers.advance(5_000);
    socket.deliver(pong); // heard at 5 s: the timer due at 20 s waits until 25 s
    h.timers.advance(19_000);
    socket.deliver(pong); // heard at 24 s, just before that
    h.timers.advance(19_999); // 43.999 s: not 20 s of silence yet
    assert.equal(socket.sentOfType("system.ping").length, 0);
    h.timers.advance(1); // 44 s: 20 s since the last message
    assert.equal(socket.sentOfType("system.ping").length, 1);
  });

  it("an action sent into a silent link is sent again on the next connection, same id", async () => {
    const h = harness({ pingIntervalMs: 5_000, pongTimeoutMs: 2_000 });
    await joined(h);
    const pending = h.client.sendAction("skill_check", {});
    const first = h.socket();
    assert.equal(first.sentOfType("action.request").length, 1);
    h.timers.advance(7_000);
    const second = await reconnect(h);
    second.deliver(hello(0));
    const resent = second.sentOfType("action.request");
    assert.equal(resent[0]?.["payload"] && (resent[0]["payload"] as { action_id: string }).action_id, "id-1");
    second.deliver(result(1, "id-1"));
    assert.equal((await pending).payload.action_id, "id-1");
  });

  it("a handshake with no answer is dropped after connectTimeoutMs; 0 turns pings off", async () => {
    const h = harness({ connectTimeoutMs: 15_000, pingIntervalMs: 0 });
    void h.client.connect();
    await tick();
    h.timers.advance(15_000);
    assert.equal(h.client.status, "reconnecting");
    const socket = await reconnect(h);
    socket.deliver(hello(0));
    h.timers.advance(600_000);
    assert.equal(socket.sentOfType("system.ping").length, 0);
    assert.equal(h.client.status, "open");
  });

  it("an error event with no close after it (Node 20's WebSocket) still reconnects", async () => {
    const h = harness();
    void h.client.connect();
    await tick();
    const socket = h.socket();
    (socket.onerror as ((e: unknown) => void) | null)?.({}); // and never a close event
    h.timers.advance(1_000);
    assert.equal(h.client.status, "reconnecting");
    await reconnect(h);
  });
});

describe("an operator's disconnect", () => {
  it("4004 reconnects and resumes, after half to all of the backoff's cap", async () => {
    const h = harness({ backoff: { baseMs: 500, capMs: 30_000 } });
    await joined(h, 2);
    h.socket().drop(4004, "disconnected by an operator");
    const change = h.connections.at(-1);
    assert.equal(change?.status, "reconnecting");
    assert.equal(change?.delayMs, 22_500); // 30 000 × (0.5 + 0.5 × random 0.5)
    h.timers.advance(22_499);
    await tick();
    assert.equal(FakeSocket.all.length, 1);
    h.timers.advance(1);
    await tick();
    assert.equal(h.socket().query.get("last_seq"), "2");
  });
});

describe("resume", () => {
  it("reconnects with epoch and last_seq and applies the replay on the kept state", async () => {
    const h = harness();
    await joined(h, 2, scene(3, 1), result(4, "x", "borin"));
    assert.equal(h.client.state?.scene?.title, "Scene 1");
    h.socket().drop(1006);
    const socket = await reconnect(h);
    assert.equal(socket.query.get("epoch"), "ep-1");
    assert.equal(socket.query.get("last_seq"), "4");
    const resumedHello = hello(6, { resumed_from: 4, scene: null });
    socket.deliver(resumedHello);
    assert.equal(h.client.state?.scene?.title, "Scene 1", "a resumed hello keeps the state");
    socket.deliver(result(5, "y", "borin"));
    socket.deliver(scene(6, 2));
    assert.equal(h.client.state?.scene?.title, "Scene 2");
    assert.deepEqual(
      h.events.map((e) => e.seq),
      [3, 4, 5, 6],
    );
    assert.equal(h.client.state?.lastSeq, 6);
  });

  it("takes a fresh snapshot when the server cannot resume", async () => {
    const h = harness();
    await joined(h, 0, scene(1, 1));
    h.socket().drop(4002);
    const socket = await reconnect(h);
    assert.equal(socket.query.get("last_seq"), "1");
    socket.deliver(hello(40, { epoch: "ep-2", scene_number: 7 }));
    assert.equal(h.client.state?.scene, null);
    assert.equal(h.client.state?.sceneNumber, 7);
    assert.deepEqual(h.client.position, { epoch: "ep-2", lastSeq: 40 });
    socket.deliver(scene(41, 8));
    assert.equal(h.client.state?.sceneNumber, 8);
  });

  it("ignores duplicates (seq <= last) for state and events", async () => {
    const h = harness();
    await joined(h, 0, scene(1, 1), scene(2, 2));
    h.socket().deliver(scene(2, 99));
    h.socket().deliver(scene(1, 98));
    assert.equal(h.client.state?.sceneNumber, 2);
    assert.deepEqual(
      h.events.map((e) => e.seq),
      [1, 2],
    );
    assert.equal(FakeSocket.all.length, 1);
  });
});

describe("gap detection and resync", () => {
  it("a gap drops the connection and reconnects without resume for a fresh snapshot", async () => {
    const h = harness();
    const resyncs: unknown[] = [];
    h.client.on("resync", (r) => resyncs.push(r));
    await joined(h, 0, scene(1, 1));
    const first = h.socket();
    first.deliver(scene(3, 3));
    assert.deepEqual(first.closedByClient, { code: 4000, reason: "resync" });
    assert.deepEqual(resyncs, [{ reason: "gap", expected: 2, got: 3 }]);
    assert.equal(h.client.state?.sceneNumber, 1, "the event after the gap is not applied");
    first.deliver(scene(2, 2)); // a late frame of the dropped connection is ignored
    assert.equal(h.client.state?.lastSeq, 1);
    const socket = await reconnect(h);
    assert.equal(socket.query.get("epoch"), null, "no resume after a gap");
    assert.equal(socket.query.get("last_seq"), null);
    socket.deliver(hello(3, { scene_number: 3 }));
    assert.equal(h.client.state?.sceneNumber, 3);
    socket.drop(1006);
    const next = await reconnect(h);
    assert.equal(next.query.get("last_seq"), "3", "resumes again after the snapshot");
  });

  it("close code 4003 resyncs too", async () => {
    const h = harness();
    await joined(h, 5);
    h.socket().drop(4003);
    const socket = await reconnect(h);
    assert.equal(socket.query.get("epoch"), null);
  });

  it("a resumed hello the client did not ask for forces a resync", async () => {
    const h = harness();
    await joined(h, 5);
    h.socket().drop(1006);
    const socket = await reconnect(h);
    socket.deliver(hello(9, { resumed_from: 3 }));
    assert.deepEqual(socket.closedByClient, { code: 4000, reason: "resync" });
    const next = await reconnect(h);
    assert.equal(next.query.get("epoch"), null);
  });
});

describe("actions", () => {
  it("sendAction makes the action_id and resolves with its action.result", async () => {
    const h = harness();
    await joined(h);
    const promise = h.client.sendAction("choice", { option: "left" });
    const [sent] = h.socket().sentOfType("action.request");
    assert.deepEqual(sent, {
      type: "action.request",
      trace_id: "id-2",
      payload: {
        action_id: "id-1",
        character_id: "aria",
        campaign_run_id: "run-42",
        action_type: "choice",
        payload: { option: "left" },
      },
    });
    assertValidClientMessages(h.socket());
    h.socket().deliver(result(1, "id-1"));
    const answer: ActionResultMessage = await promise;
    assert.equal(answer.seq, 1);
  });

  it("the same actionId again while pending joins the pending call (sent once)", async () => {
    const h = harness();
    await joined(h);
    const first = h.client.sendAction("skill_check", {}, { actionId: "dup-1" });
    const again = h.client.sendAction("skill_check", {}, { actionId: "dup-1" });
    assert.equal(again, first);
    assert.equal(h.socket().sentOfType("action.request").length, 1);
    h.socket().deliver(result(1, "dup-1"));
    assert.equal((await again).payload.action_id, "dup-1");
    // answered: the same id is a new call (answered by the server from its ledger)
    const later = h.client.sendAction("skill_check", {}, { actionId: "dup-1" });
    assert.notEqual(later, first);
    assert.equal(h.socket().sentOfType("action.request").length, 2);
  });

  it("uses crypto.randomUUID by default", async () => {
    FakeSocket.reset();
    const client = new PartySyncClient({ url: "ws://x/ws", token: "t", WebSocket: FakeSocket });
    void client.connect();
    await tick();
    FakeSocket.last().deliver(hello(0));
    void client.sendAction("skill_check", {}).catch(() => undefined);
    const id = (FakeSocket.last().sent[0]?.["payload"] as { action_id: string }).action_id;
    assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    client.close();
  });

  it("refuses an action_id that breaks the id rule, or too large an action, unsent", async () => {
    // clients probe: the server's schema_violation could not name it, and it waited for ever
    const h = harness();
    await joined(h);
    for (const bad of ["x".repeat(65), "bad id!", ""]) {
      await assert.rejects(h.client.sendAction("skill_check", {}, { actionId: bad }), TypeError);
    }
    await assert.rejects(
      h.client.sendAction("skill_check", {}, { traceId: "t".repeat(129) }),
      TypeError,
    );
    // larger than the hello's limits.max_message_bytes: refused as the server would, unsent
    await assert.rejects(
      h.client.sendAction("skill_check", { skill: "x".repeat(300_000) }),
      (e: unknown) => e instanceof PartySyncError && e.code === "message_too_large" && !e.retryable,
    );
    await assert.rejects(h.client.castVote("v-1", "x".repeat(300_000)), TypeError);
    await assert.rejects(h.client.castVote("bad vote", "A"), TypeError);
    assert.deepEqual(h.socket().sentOfType("vote.cast"), []);
    assert.deepEqual(h.socket().sentOfType("action.request"), []);
    const ok = h.client.sendAction("skill_check", {}, { actionId: "a.b:c-d_9" });
    assert.equal(h.socket().sentOfType("action.request").length, 1);
    h.socket().deliver(result(1, "a.b:c-d_9"));
    await ok;
  });

  it("is rejected with the system.error about its action_id", async () => {
    const h = harness();
    await joined(h);
    const promise = h.client.sendAction("combat", { move: "attack" });
    h.socket().deliver(
      systemError("action_rejected", { trace_id: "id-2", type: "action.request", action_id: "id-1" }),
    );
    await assert.rejects(promise, (e: unknown) => {
      assert.ok(e instanceof PartySyncError);
      assert.equal(e.code, "action_rejected");
      assert.equal(e.retryable, false);
      assert.equal(e.actionId, "id-1");
      return true;
    });
  });

  it("sends one action at a time, the next after the previous is answered", async () => {
    const h = harness();
    await joined(h);
    const a = h.client.sendAction("skill_check", {});
    const b = h.client.sendAction("choice", { option: "right" });
    assert.equal(h.socket().sentOfType("action.request").length, 1);
    h.socket().deliver(result(1, "id-1"));
    await a;
    const sent = h.socket().sentOfType("action.request");
    assert.equal(sent.length, 2);
    assert.equal((sent[1]?.["payload"] as { action_id: string }).action_id, "id-3");
    h.socket().deliver(result(2, "id-3"));
    await b;
    assert.equal(h.client.pendingActions, 0);
  });

  it("re-sends a pending action after a reconnect with the same action_id; in flight: keeps waiting", async () => {
    const h = harness();
    await joined(h);
    const promise = h.client.sendAction("skill_check", { skill: "wits" });
    const firstId = (h.socket().sentOfType("action.request")[0]?.["payload"] as { action_id: string })
      .action_id;
    h.socket().drop(1006);
    const socket = await reconnect(h);
    socket.deliver(hello(0, { resumed_from: 0 }));
    const [again] = socket.sentOfType("action.request");
    assert.equal((again?.["payload"] as { action_id: string }).action_id, firstId);
    assert.equal(again?.["trace_id"], "id-2", "same trace id too");
    socket.deliver(
      systemError("action_in_flight", { trace_id: "id-2", type: "action.request", action_id: firstId }),
    );
    let settled = false;
    void promise.then(() => (settled = true));
    await tick();
    assert.equal(settled, false, "action_in_flight keeps the promise pending");
    socket.deliver(result(1, firstId));
    assert.equal((await promise).payload.action_id, firstId);
  });

  it("a finished action re-sent after a reconnect is resolved by the original (duplicate) result", async () => {
    const h = harness();
    await joined(h);
    const promise = h.client.sendAction("skill_check", {});
    h.socket().drop(1006);
    const socket = await reconnect(h);
    // The result (seq 1..3) was broadcast while we were away, and the server could not resume:
    socket.deliver(hello(3, { epoch: "ep-1" }));
    assert.equal(socket.sentOfType("action.request").length, 1, "re-sent after the snapshot");
    socket.deliver(result(2, "id-1")); // the original result, to us only: seq 2 <= last 3
    const answer = await promise;
    assert.equal(answer.seq, 2);
    assert.deepEqual(h.events, [], "a duplicate is not applied");
    assert.equal(h.client.state?.lastSeq, 3);
  });

  it("a result in the resumed replay settles the action before it is re-sent", async () => {
    const h = harness();
    await joined(h);
    const promise = h.client.sendAction("skill_check", {});
    h.socket().drop(1006);
    const socket = await reconnect(h);
    socket.deliver(hello(2, { resumed_from: 0 }));
    assert.equal(socket.sentOfType("action.request").length, 0, "waits for the replay");
    socket.deliver(result(1, "id-1"));
    socket.deliver(scene(2, 1));
    await promise;
    assert.equal(socket.sentOfType("action.request").length, 0, "nothing left to re-send");
  });

  it("an action made while disconnected is sent once connected", async () => {
    const h = harness();
    await joined(h);
    h.socket().drop(1006);
    const promise = h.client.sendAction("skill_check", {});
    const socket = await reconnect(h);
    assert.equal(socket.sent.length, 0);
    socket.deliver(hello(0, { resumed_from: 0 }));
    assert.equal(socket.sentOfType("action.request").length, 1);
    socket.deliver(result(1, "id-1"));
    await promise;
  });
});

describe("tokens", () => {
  it("4001 fetches a fresh token and resumes with it", async () => {
    let n = 0;
    const h = harness({ noToken: true, getToken: () => `tok-${++n}` });
    await joined(h, 0, scene(1, 1));
    h.socket().deliver(systemError("token_expired", { trace_id: null, type: null }));
    h.socket().drop(4001);
    const socket = await reconnect(h);
    assert.deepEqual(h.tokenCalls, ["initial", "expired"]);
    assert.equal(socket.query.get("token"), "tok-2");
    assert.equal(socket.query.get("last_seq"), "1");
  });

  it("4001 without a hook stops the client", async () => {
    const h = harness();
    await joined(h);
    h.socket().drop(4001);
    assert.equal(h.client.status, "closed");
    assert.equal(h.client.closedReason, "token_expired");
  });

  it("refreshes the token after repeated failed handshakes (a refused token)", async () => {
    let n = 0;
    const h = harness({ noToken: true, getToken: () => `tok-${++n}` });
    void h.client.connect();
    await tick();
    h.socket().drop(1006); // HTTP 401: the browser sees only a failed connection
    (await reconnect(h)).drop(1006);
    const socket = await reconnect(h);
    assert.deepEqual(h.tokenCalls, ["initial", "rejected"]);
    assert.equal(socket.query.get("token"), "tok-2");
  });

  it("refreshes a token whose exp has passed before connecting", async () => {
    const h = harness({
      token: fakeToken("old", 1000),
      getToken: () => fakeToken("new", 99_999_999),
    });
    await joined(h);
    assert.deepEqual(h.tokenCalls, ["expired"]);
    assert.equal(tokenExpiry(h.socket().query.get("token") ?? ""), 99_999_999_000);
  });

  it("a failing getToken is retried with backoff", async () => {
    let fail = true;
    const h = harness({
      noToken: true,
      getToken: () => {
        if (fail) throw new Error("sign-in unavailable");
        return "ok";
      },
    });
    const errors: unknown[] = [];
    h.client.on("tokenError", (e) => errors.push(e));
    void h.client.connect();
    await tick();
    assert.equal(FakeSocket.all.length, 0);
    assert.equal(errors.length, 1);
    fail = false;
    await reconnect(h);
    assert.equal(h.socket().query.get("token"), "ok");
  });
});

describe("a server that was down and a sign-in that fails", () => {
  it("dials again with the token it has while its exp has not passed", async () => {
    const h = harness({
      token: fakeToken("good", 99_999_999),
      getToken: () => {
        throw new Error("init_data_expired");
      },
    });
    const errors: unknown[] = [];
    const wanted: (TokenReason | null)[] = [];
    h.client.on("tokenError", (e) => {
      errors.push(e);
      wanted.push(h.client.tokenWanted);
    });
    await joined(h);
    h.socket().drop(); // the server went away
    for (let i = 0; i < 2; i++) (await reconnect(h)).drop(); // refused while it restarts
    // The guess that the token was refused: getToken fails, the next attempt uses the old one.
    h.timers.advance(60_000);
    await tick();
    assert.deepEqual(h.tokenCalls, ["rejected"]);
    assert.equal(errors.length, 1);
    assert.deepEqual(wanted, [null], "the listener learns that the client goes on");
    const back = await reconnect(h);
    assert.equal(tokenExpiry(back.query.get("token") ?? ""), 99_999_999_000);
    back.deliver(hello(0));
    await tick();
    assert.equal(h.client.status, "open");
  });

  it("a token past its exp is still wanted after a failed fetch (tokenWanted says so)", async () => {
    const h = harness({
      token: fakeToken("old", 1000), // exp in 1970: past by the harness's clock too
      getToken: () => {
        throw new Error("init_data_expired");
      },
    });
    const wanted: (TokenReason | null)[] = [];
    h.client.on("tokenError", () => wanted.push(h.client.tokenWanted));
    void h.client.connect();
    await tick();
    assert.deepEqual(wanted, ["expired"]);
    assert.equal(FakeSocket.all.length, 0, "never dialled with the expired token");
  });
});

describe("party state and typed events", () => {
  it("maintains the members from presence events", async () => {
    const h = harness();
    const presence: string[] = [];
    h.client.on("presence", (p) => presence.push(`${p.kind}:${p.characterId}:${p.reason ?? ""}`));
    await joined(h, 0);
    const s = h.socket();
    s.deliver(event("party.join", 1, { character_id: "cora", display_name: "Cora" }));
    s.deliver(event("party.leave", 2, { character_id: "borin", reason: "disconnected" }));
    s.deliver(event("party.leave", 3, { character_id: "aria", reason: "left" }));
    assert.deepEqual(presence, ["join:cora:", "leave:borin:disconnected", "leave:aria:left"]);
    assert.deepEqual(h.client.state?.members, [
      { character_id: "borin", display_name: "Borin", online: false },
      { character_id: "cora", display_name: "Cora", online: true },
    ]);
  });

  it("maintains the open vote and confirms this character's ballot", async () => {
    const h = harness();
    const kinds: string[] = [];
    h.client.on("vote", (v) => kinds.push(v.kind));
    await joined(h, 0);
    const s = h.socket();
    s.deliver(
      event("vote.started", 1, {
        vote_id: "v1",
        question: "Which way?",
        options: [
          { id: "left", label: "Left" },
          { id: "right", label: "Right" },
        ],
        timeout_s: 30,
        deadline: "2026-11-25T21:00:30.000Z",
        tie_rule: "first_listed",
      }),
    );
    assert.deepEqual(h.client.state?.vote?.tallies, { left: 0, right: 0 });
    const cast = h.client.castVote("v1", "right");
    const [sent] = s.sentOfType("vote.cast");
    assert.deepEqual(sent?.["payload"], { vote_id: "v1", option: "right" });
    assertValidClientMessages(s);
    s.deliver(
      event("vote.update", 2, { vote_id: "v1", tallies: { left: 0, right: 1 }, voted: 1, eligible: 2 }, String(sent?.["trace_id"])),
    );
    const update: VoteUpdateMessage = await cast;
    assert.equal(update.seq, 2);
    assert.equal(h.client.state?.vote?.your_vote, "right");
    assert.equal(h.client.state?.vote?.voted, 1);
    s.deliver(
      event("vote.finished", 3, {
        vote_id: "v1",
        winner: "right",
        tallies: { left: 0, right: 2 },
        reason: "all_voted",
        tie_broken: false,
        applied: { action_id: "vote:v1", action_type: "choice", option: "right", character_id: "party" },
      }),
    );
    assert.equal(h.client.state?.vote, null);
    assert.equal(h.client.state?.lastVoteResult?.winner, "right");
    assert.deepEqual(kinds, ["started", "update", "finished"]);
  });

  it("a refused ballot rejects castVote", async () => {
    const h = harness();
    await joined(h);
    const cast = h.client.castVote("v9", "x");
    const traceId = String(h.socket().sentOfType("vote.cast")[0]?.["trace_id"]);
    h.socket().deliver(systemError("vote_unknown", { trace_id: traceId, type: "vote.cast", vote_id: "v9" }));
    await assert.rejects(cast, (e: unknown) => e instanceof PartySyncError && e.code === "vote_unknown");
  });

  it("emits scene, combat, partyState, actionResult, error and state", async () => {
    const h = harness();
    const seen: string[] = [];
    for (const name of ["scene", "combat", "partyState", "actionResult", "error"] as const) {
      h.client.on(name, () => seen.push(name));
    }
    let states = 0;
    h.client.on("state", () => (states += 1));
    await joined(h, 0);
    const s = h.socket();
    s.deliver(scene(1, 1));
    s.deliver(
      event("combat.update", 2, {
        active: true,
        round: 1,
        combatants: [{ id: "x", name: "X", side: "enemy", hp: 3, max_hp: 5 }],
      }),
    );
    s.deliver(event("party.state", 3, { status: "active", run_status: "finished", scene_number: 1 }));
    s.deliver(result(4, "other", "borin"));
    s.deliver(systemError("rate_limited", { trace_id: null, type: null }));
    assert.deepEqual(seen, ["scene", "combat", "partyState", "actionResult", "error"]);
    assert.equal(states, 5, "one for the hello, one per event");
    assert.equal(h.client.state?.runStatus, "finished");
    assert.equal(h.client.state?.combat?.combatants[0]?.hp, 3);
  });

  it("an unknown event type still advances the sequence", async () => {
    const h = harness();
    await joined(h, 0);
    h.socket().deliver({ type: "party.emote", seq: 1, timestamp: "x", trace_id: "t", payload: {} });
    h.socket().deliver(scene(2, 1));
    assert.equal(h.client.state?.lastSeq, 2);
    assert.equal(FakeSocket.all.length, 1);
  });
});

describe("leaving and closing", () => {
  it("leave() sends party.leave, and the 1000 that follows stops the client", async () => {
    const h = harness();
    await joined(h);
    const left = h.client.leave();
    const [sent] = h.socket().sentOfType("party.leave");
    assert.deepEqual(sent?.["payload"], { character_id: "aria" });
    assertValidClientMessages(h.socket());
    h.socket().drop(1000);
    await left;
    assert.equal(h.client.status, "closed");
    assert.equal(h.client.closedReason, "left");
    h.timers.advance(60_000);
    await tick();
    assert.equal(FakeSocket.all.length, 1);
  });

  it("leave() while offline reconnects, sends party.leave and settles only at the 1000", async () => {
    const h = harness();
    await joined(h);
    h.socket().drop(1006);
    assert.equal(h.client.status, "reconnecting");
    let settled = false;
    const left = h.client.leave().then(() => (settled = true));
    await tick();
    assert.equal(settled, false, "not settled while the server has not heard of it");
    assert.notEqual(h.client.status, "closed");
    const socket = await reconnect(h);
    assert.deepEqual(socket.sentOfType("party.leave"), [], "not before the hello");
    socket.deliver(hello(0, { resumed_from: 0 }));
    const [sent] = socket.sentOfType("party.leave");
    assert.deepEqual(sent?.["payload"], { character_id: "aria" });
    assertValidClientMessages(socket);
    await tick();
    assert.equal(settled, false, "still waiting for the 1000");
    socket.drop(1000);
    await left;
    assert.equal(h.client.closedReason, "left");
    h.timers.advance(60_000);
    await tick();
    assert.equal(FakeSocket.all.length, 2, "no reconnect after the 1000");
  });

  it("leave() whose reconnect is refused settles with the refusal, not as left", async () => {
    const h = harness({ fetch: async () => ({ status: 403 }) });
    await joined(h);
    h.socket().drop(1006);
    const left = h.client.leave();
    const socket = await reconnect(h);
    socket.drop(1006); // the handshake failed: the probe learns 403
    await left;
    assert.equal(h.client.status, "closed");
    assert.equal(h.client.closedReason, "refused");
  });

  it("a listener that closes the client midway stops it: no reconnect", async () => {
    // The demo page closes the client from its tokenError listener when sign-in is refused.
    const h = harness({
      noToken: true,
      getToken: () => {
        throw new Error("refused");
      },
    });
    h.client.on("tokenError", () => h.client.close());
    const ready = h.client.connect();
    await assert.rejects(ready, ClientClosedError);
    assert.deepEqual(
      h.connections.map((c) => c.status),
      ["connecting", "closed"],
    );
    assert.equal(h.timers.pendingCount, 0);
    // The same from a resync listener: the socket is closed with 1000, not dropped to resync.
    const g = harness();
    g.client.on("resync", () => g.client.close());
    await joined(g, 0);
    g.socket().deliver(scene(2, 2));
    assert.deepEqual(g.socket().closedByClient, { code: 1000, reason: undefined });
    assert.deepEqual(
      g.connections.map((c) => c.status),
      ["connecting", "open", "closed"],
    );
    g.timers.advance(120_000);
    await tick();
    assert.equal(FakeSocket.all.length, 1);
  });

  it("close() disconnects without reconnecting", async () => {
    const h = harness();
    await joined(h);
    h.client.close();
    assert.deepEqual(h.socket().closedByClient, { code: 1000, reason: undefined });
    h.timers.advance(60_000);
    await tick();
    assert.equal(FakeSocket.all.length, 1);
    await assert.rejects(h.client.sendAction("skill_check", {}), ClientClosedError);
  });
});
