/**
 * What is happening now: the actions in flight and the live narration (live.ts, the rules; the
 * ClientStream, which applies them to the transient messages and the hellos; the client, end to
 * end over a fake WebSocket), and a refused handshake that ends the retry loop.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { beforeEach, describe, it } from "node:test";
import { fileURLToPath } from "node:url";

import {
  PartySyncClient,
  retryAfter,
  type FetchLike,
  type PartySyncClientOptions,
} from "../src/client.js";
import type { ConnectionChange, PartySyncEvents } from "../src/events.js";
import {
  applyDelta,
  RecentIds,
  restateNarration,
  settleNarration,
  withAccepted,
  withoutAction,
  type Narration,
  type NarrationChange,
} from "../src/live.js";
import {
  ClientStream,
  MAX_BLOCK_WAIT_MS,
  type Output,
  type StreamOptions,
} from "../src/stream.js";
import type { NarrationDeltaPayload, NarrationStream, PartyEvent } from "../src/types.js";
import { validateMessage } from "./contracts.js";
import {
  accepted,
  delta,
  failed,
  FakeSocket,
  FakeTimers,
  hello,
  result,
  scene,
  tick,
} from "./fake.js";

// --- helpers -------------------------------------------------------------------------------------

/** mulberry32: a seedable PRNG with numbers in [0, 1). */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function forSeeds(cases: number, check: (random: () => number) => void): void {
  for (let seed = 1; seed <= cases; seed++) {
    try {
      check(prng(seed));
    } catch (error) {
      if (error instanceof Error) error.message = `seed ${seed}: ${error.message}`;
      throw error;
    }
  }
}

function kinds(out: readonly Output[]): string[] {
  return out.map((o) => (o.type === "emit" ? `emit:${o.name}` : o.type));
}

function emitted<K extends keyof PartySyncEvents>(
  out: readonly Output[],
  name: K,
): Array<PartySyncEvents[K]> {
  return out.flatMap((o) =>
    o.type === "emit" && o.name === name ? [o.value as PartySyncEvents[K]] : [],
  );
}

function changes(out: readonly Output[]): Array<[NarrationChange["kind"], string, string]> {
  return emitted(out, "narration").map((c) => [c.kind, c.stream.streamId, c.piece]);
}

function statuses(out: readonly Output[]): ConnectionChange[] {
  return out.flatMap((o) => (o.type === "status" ? [o.change] : []));
}

function frame(message: unknown): string {
  return JSON.stringify(message);
}

function piece(
  streamId: string,
  index: number,
  text: string,
  done = false,
  actionId?: string,
): NarrationDeltaPayload {
  const payload: NarrationDeltaPayload = { stream_id: streamId, index, text, done };
  if (actionId !== undefined) payload.action_id = actionId;
  return payload;
}

const never = (): boolean => false;

function stream(streamId: string, text: string, index: number, extra: Partial<Narration> = {}) {
  return { streamId, text, index, done: false, incomplete: false, ...extra } satisfies Narration;
}

function makeStream(options: Partial<StreamOptions> = {}): ClientStream {
  return new ClientStream({ token: "token-1", canRefreshToken: false, random: () => 0.5, ...options });
}

function online(s: ClientStream, overrides: Parameters<typeof hello>[1] = {}, seq = 0): Output[] {
  s.start();
  s.dial();
  return s.receive(frame(hello(seq, overrides)));
}

/** The connection drops after its hello; the reconnect falls due and is dialled. */
function redial(s: ClientStream): void {
  s.closed(1006, "");
  s.timerFired("reconnect");
  s.dial();
}

function deliver(s: ClientStream, ...messages: unknown[]): Output[] {
  return messages.flatMap((m) => s.receive(frame(m)));
}

/**
 * A screen as an application would build it from the `narration` events alone: it appends each
 * `append`/`done` piece, replaces the text on `restate`, forgets the stream on `remove`.
 */
class Screen {
  readonly text = new Map<string, string>();
  readonly removed: string[] = [];

  see(change: NarrationChange): void {
    const id = change.stream.streamId;
    switch (change.kind) {
      case "append":
      case "done":
        this.text.set(id, (this.text.get(id) ?? "") + change.piece);
        break;
      case "restate":
        this.text.set(id, change.stream.text);
        break;
      case "incomplete":
        this.text.set(id, change.stream.text);
        break;
      case "remove":
        this.text.delete(id);
        this.removed.push(id);
        break;
    }
  }

  seeAll(out: readonly Output[]): void {
    for (const change of emitted(out, "narration")) this.see(change);
  }
}

// --- live.ts: the rules --------------------------------------------------------------------------

describe("narration pieces (live.ts)", () => {
  it("appends the next piece, ignores a repeat, and ends with the done piece", () => {
    let list: readonly Narration[] = [];
    const step = (p: NarrationDeltaPayload): NarrationChange | null => {
      const applied = applyDelta(list, p, never);
      list = applied.narration;
      return applied.change;
    };
    assert.deepEqual(step(piece("n", 0, "The gate ", false, "a-1")), {
      kind: "append",
      stream: stream("n", "The gate ", 0, { actionId: "a-1" }),
      piece: "The gate ",
    });
    assert.equal(step(piece("n", 0, "The gate ")), null, "a repeat is ignored");
    assert.equal(step(piece("n", 1, "gives way"))?.kind, "append");
    const before = list;
    assert.equal(step(piece("n", 1, "gives way")), null);
    assert.equal(list, before, "a repeat leaves the same list");
    assert.deepEqual(step(piece("n", 2, ".", true)), {
      kind: "done",
      stream: stream("n", "The gate gives way.", 2, { actionId: "a-1", done: true }),
      piece: ".",
    });
    assert.equal(step(piece("n", 3, " more")), null, "nothing after done");
    assert.equal(list[0]?.text, "The gate gives way.");
  });

  it("a missing piece freezes the text (never shown with a hole) until done", () => {
    let list: readonly Narration[] = [];
    list = applyDelta(list, piece("n", 0, "A"), never).narration;
    const gap = applyDelta(list, piece("n", 2, "C"), never);
    assert.equal(gap.change?.kind, "incomplete");
    assert.deepEqual(gap.change?.stream, stream("n", "A", 0, { incomplete: true }));
    list = gap.narration;
    assert.equal(applyDelta(list, piece("n", 3, "D"), never).change, null, "frozen");
    assert.equal(applyDelta(list, piece("n", 1, "B"), never).change, null, "too late");
    const end = applyDelta(list, piece("n", 4, "", true), never);
    assert.deepEqual(end.change, {
      kind: "done",
      stream: stream("n", "A", 0, { incomplete: true, done: true }),
      piece: "",
    });
  });

  it("a stream first seen mid-way waits for its final text; one seen ending is not kept", () => {
    const mid = applyDelta([], piece("n", 4, "late"), never);
    assert.deepEqual(mid.change, {
      kind: "incomplete",
      stream: stream("n", "", -1, { incomplete: true }),
      piece: "",
    });
    assert.deepEqual(applyDelta([], piece("n", 4, "", true), never), {
      narration: [],
      change: null,
    });
    const single = applyDelta([], piece("n", 0, "All at once.", true), never);
    assert.equal(single.change?.kind, "done");
    assert.equal(single.change?.stream.text, "All at once.");
  });

  it("a finished stream never comes back", () => {
    const finished = (id: string) => id === "n";
    assert.deepEqual(applyDelta([], piece("n", 0, "again"), finished), {
      narration: [],
      change: null,
    });
  });

  it("whatever the repeats, the text is every piece once, in order (property)", () => {
    forSeeds(200, (random) => {
      const count = 1 + Math.floor(random() * 12);
      const pieces = Array.from({ length: count }, (_, i) => `p${i}.`);
      let list: readonly Narration[] = [];
      const screen = new Screen();
      let sent = 0;
      while (sent < count) {
        // The server sends the next piece; the network repeats any already sent at random.
        const index = sent > 0 && random() < 0.4 ? Math.floor(random() * sent) : sent++;
        const applied = applyDelta(
          list,
          piece("n", index, pieces[index] ?? "", index === count - 1),
          never,
        );
        list = applied.narration;
        if (applied.change !== null) screen.see(applied.change);
      }
      assert.equal(list[0]?.text, pieces.join(""));
      assert.equal(screen.text.get("n"), pieces.join(""));
      assert.equal(list[0]?.done, true);
    });
  });

  it("a hello restates its open streams and removes the others", () => {
    const had = [stream("a", "Half", 1), stream("b", "Gone", 0), stream("c", "Same", 2)];
    const open: NarrationStream[] = [
      { stream_id: "a", index: 3, text: "Half and more" },
      { stream_id: "c", index: 2, text: "Same" },
      { stream_id: "d", index: 0, text: "New", action_id: "a-9" },
    ];
    const { narration, changes: out } = restateNarration(had, open);
    assert.deepEqual(narration, [
      stream("a", "Half and more", 3),
      stream("c", "Same", 2),
      stream("d", "New", 0, { actionId: "a-9" }),
    ]);
    assert.deepEqual(
      out.map((c) => [c.kind, c.stream.streamId]),
      [
        ["remove", "b"],
        ["restate", "a"],
        ["restate", "d"],
      ],
    );
  });

  it("finished streams end with their final text; open ones stay", () => {
    const list = [
      stream("open", "…", 0, { actionId: "a-1" }),
      stream("mine", "Done.", 1, { actionId: "a-1", done: true }),
      stream("other", "Done too.", 1, { actionId: "a-2", done: true }),
      stream("free", "Free.", 0, { done: true }),
    ];
    const byResult = settleNarration(list, { kind: "result", actionId: "a-1" });
    assert.deepEqual(
      byResult.removed.map((s) => s.streamId),
      ["mine", "free"],
    );
    assert.deepEqual(
      byResult.narration.map((s) => s.streamId),
      ["open", "other"],
    );
    const byScene = settleNarration(list, { kind: "scene" });
    assert.deepEqual(
      byScene.narration.map((s) => s.streamId),
      ["open"],
    );
    const none = settleNarration([list[0] as Narration], { kind: "scene" });
    assert.equal(none.removed.length, 0);
  });

  it("actions in flight: a set by action_id, in the order accepted", () => {
    const one = withAccepted([], accepted("a-1").payload);
    const two = withAccepted(one, accepted("a-2", "borin", "combat").payload);
    assert.equal(withAccepted(two, accepted("a-1").payload), two, "a repeat changes nothing");
    assert.deepEqual(
      two.map((a) => [a.action_id, a.character_id, a.action_type]),
      [
        ["a-1", "aria", "choice"],
        ["a-2", "borin", "combat"],
      ],
    );
    assert.deepEqual(
      withoutAction(two, "a-1").map((a) => a.action_id),
      ["a-2"],
    );
    assert.equal(withoutAction(two, "a-3"), two);
  });

  it("live.ts names no socket, timer, clock or random source", () => {
    // dist/test/test/live.test.js → clients/js/src/live.ts
    const here = dirname(fileURLToPath(import.meta.url));
    const source = readFileSync(resolve(here, "..", "..", "..", "src", "live.ts"), "utf8");
    const code = source.replace(/\/\*[\s\S]*?\*\//g, "").replace(/\/\/.*$/gm, "");
    for (const name of ["WebSocket", "setTimeout", "Date", "Math.random", "fetch", "crypto"]) {
      assert.ok(!code.includes(name), `live.ts uses ${name}`);
    }
  });

  it("RecentIds remembers the last ones only", () => {
    const ids = new RecentIds(2);
    ids.add("a");
    ids.add("b");
    ids.add("a"); // refreshed: b is now the oldest
    ids.add("c");
    assert.deepEqual(
      ["a", "b", "c"].map((id) => ids.has(id)),
      [true, false, true],
    );
  });
});

// --- the stream: transient messages --------------------------------------------------------------

describe("ClientStream: actions in flight", () => {
  it("action.accepted adds one (a repeat does not); its action.result removes it", () => {
    const s = makeStream();
    online(s);
    const out = deliver(s, accepted("a-1", "borin", "combat"));
    assert.deepEqual(kinds(out), ["emit:actionAccepted", "publish", "emit:inFlight", "emit:state"]);
    assert.deepEqual(emitted(out, "inFlight"), [
      [{ action_id: "a-1", character_id: "borin", action_type: "combat" }],
    ]);
    assert.deepEqual(deliver(s, accepted("a-1", "borin", "combat")), [], "a repeat");
    const done = deliver(s, result(1, "a-1", "borin"));
    assert.deepEqual(emitted(done, "inFlight"), [[]]);
    assert.deepEqual(s.state?.actionsInFlight, []);
    assert.deepEqual(deliver(s, accepted("a-1", "borin")), [], "late: it was answered already");
  });

  it("action.failed removes it, whoever acted, and is reported", () => {
    const s = makeStream();
    online(s, { actions_in_flight: [{ action_id: "a-1", character_id: "borin", action_type: "choice" }] });
    assert.equal(s.state?.actionsInFlight.length, 1);
    const out = deliver(s, failed("a-1", "borin", "engine_unavailable"));
    assert.deepEqual(
      emitted(out, "actionFailed").map((m) => m.payload.code),
      ["engine_unavailable"],
    );
    assert.deepEqual(emitted(out, "inFlight"), [[]]);
    assert.deepEqual(s.state?.actionsInFlight, []);
  });

  it("every hello replaces the set: a resume, a snapshot", () => {
    const s = makeStream();
    online(s);
    deliver(s, accepted("a-1"), accepted("a-2"));
    redial(s);
    const resumed = s.receive(
      frame(
        hello(0, {
          resumed_from: 0,
          actions_in_flight: [{ action_id: "a-2", character_id: "aria", action_type: "choice" }],
        }),
      ),
    );
    assert.deepEqual(
      emitted(resumed, "inFlight").map((list) => list.map((a) => a.action_id)),
      [["a-2"]],
    );
    redial(s);
    s.receive(frame(hello(0, { epoch: "ep-2" })));
    assert.deepEqual(s.state?.actionsInFlight, []);
  });

  it("transient messages before this connection's hello are not applied", () => {
    const s = makeStream();
    s.start();
    s.dial();
    assert.deepEqual(deliver(s, accepted("a-1"), delta("n", 0, "x")), []);
    online(s);
    redial(s);
    assert.deepEqual(deliver(s, accepted("a-2")), [], "the new connection has no hello yet");
  });
});

describe("ClientStream: live narration", () => {
  it("pieces are appended and reported once; done; the scene.update then removes it", () => {
    const s = makeStream();
    online(s);
    const screen = new Screen();
    const out = deliver(
      s,
      delta("n-1", 0, "Waves "),
      delta("n-1", 0, "Waves "),
      delta("n-1", 1, "crash."),
      delta("n-1", 1, "crash."),
      delta("n-1", 2, "", { done: true }),
    );
    screen.seeAll(out);
    assert.deepEqual(changes(out), [
      ["append", "n-1", "Waves "],
      ["append", "n-1", "crash."],
      ["done", "n-1", ""],
    ]);
    assert.equal(screen.text.get("n-1"), "Waves crash.");
    assert.deepEqual(s.state?.narration, [stream("n-1", "Waves crash.", 2, { done: true })]);
    const final = deliver(s, scene(1, 1));
    assert.deepEqual(changes(final), [["remove", "n-1", ""]]);
    assert.deepEqual(s.state?.narration, []);
    assert.deepEqual(deliver(s, delta("n-1", 2, "", { done: true })), [], "it never comes back");
  });

  it("a stream of an action ends with that action's result; one finished after it, at once", () => {
    const s = makeStream();
    online(s, { actions_in_flight: [{ action_id: "a-1", character_id: "aria", action_type: "choice" }] });
    deliver(s, delta("n-1", 0, "Aria swings.", { actionId: "a-1", done: true }));
    deliver(s, delta("n-2", 0, "Borin ", { actionId: "a-2" }));
    const out = deliver(s, result(1, "a-1"));
    assert.deepEqual(changes(out), [["remove", "n-1", ""]]);
    assert.deepEqual(
      s.state?.narration.map((n) => n.streamId),
      ["n-2"],
    );
    deliver(s, accepted("a-2", "borin"), result(2, "a-2", "borin"));
    assert.equal(s.state?.narration[0]?.done, false, "still open: its pieces keep coming");
    const end = deliver(s, delta("n-2", 1, "parries.", { actionId: "a-2", done: true }));
    assert.deepEqual(changes(end), [
      ["done", "n-2", "parries."],
      ["remove", "n-2", ""],
    ]);
    assert.deepEqual(s.state?.narration, []);
  });

  it("the finished stream of a failed action is removed", () => {
    const s = makeStream();
    online(s);
    deliver(s, accepted("a-1"), delta("n-1", 0, "Aria tries", { actionId: "a-1", done: true }));
    const out = deliver(s, failed("a-1"));
    assert.deepEqual(changes(out), [["remove", "n-1", ""]]);
  });

  it("a reconnect mid-stream: the hello's text once, then the live pieces, repeats ignored", () => {
    for (const resume of [true, false]) {
      const s = makeStream();
      const screen = new Screen();
      screen.seeAll(online(s));
      screen.seeAll(deliver(s, delta("n-1", 0, "The iron "), delta("n-1", 1, "groans ")));
      redial(s);
      // While this client was away the stream went on to piece 3; the hello says so.
      const open = [{ stream_id: "n-1", index: 3, text: "The iron groans and bends " }];
      const again = s.receive(
        frame(resume ? hello(0, { resumed_from: 0, narration: open }) : hello(0, { narration: open })),
      );
      assert.deepEqual(changes(again), [["restate", "n-1", ""]], `resume=${resume}`);
      screen.seeAll(again);
      // The server's pieces continue at 4; repeats of 2 and 3 (sent before the hello) are ignored.
      const live = deliver(
        s,
        delta("n-1", 2, "and "),
        delta("n-1", 3, "bends "),
        delta("n-1", 4, "apart."),
        delta("n-1", 4, "apart."),
        delta("n-1", 5, "", { done: true }),
      );
      screen.seeAll(live);
      assert.deepEqual(changes(live), [
        ["append", "n-1", "apart."],
        ["done", "n-1", ""],
      ]);
      const whole = "The iron groans and bends apart.";
      assert.equal(screen.text.get("n-1"), whole);
      assert.equal(s.state?.narration[0]?.text, whole);
    }
  });

  it("a stream that ended while away is removed by the hello (its final text follows)", () => {
    const s = makeStream();
    online(s);
    deliver(s, delta("n-1", 0, "Half"));
    redial(s);
    const out = s.receive(frame(hello(0, { resumed_from: 0 })));
    assert.deepEqual(changes(out), [["remove", "n-1", ""]]);
    assert.deepEqual(deliver(s, delta("n-1", 1, " more")), [], "a late piece is not shown");
  });

  it("the first hello's open streams are reported as restated", () => {
    const s = makeStream();
    const out = online(s, { narration: [{ stream_id: "n-1", index: 0, text: "Once" }] });
    assert.deepEqual(changes(out), [["restate", "n-1", ""]]);
    assert.deepEqual(s.state?.narration, [stream("n-1", "Once", 0)]);
  });
});

// --- the stream: a refused handshake -------------------------------------------------------------

describe("ClientStream: a refused handshake stops the retries", () => {
  function failedHandshake(s: ClientStream): Output[] {
    return s.closed(1006, "");
  }

  it("probes a handshake that failed before any hello, when the shell can", () => {
    const s = makeStream({ probeHandshakes: true });
    s.start();
    s.dial();
    const out = failedHandshake(s);
    assert.deepEqual(kinds(out), ["status", "arm", "probe"]);
    assert.deepEqual(out[2], { type: "probe", connection: 1 });
    // After a hello, a lost connection is the network's: no probe.
    s.timerFired("reconnect");
    s.dial();
    s.receive(frame(hello(0)));
    assert.deepEqual(kinds(s.closed(1006, "")), ["status", "arm"]);
    const quiet = makeStream();
    quiet.start();
    quiet.dial();
    assert.deepEqual(kinds(failedHandshake(quiet)), ["status", "arm"], "not without the option");
  });

  it("401 without a token hook stops: unauthorized, with the status", () => {
    const s = makeStream({ probeHandshakes: true });
    s.start();
    s.dial();
    failedHandshake(s);
    const out = s.probed(1, 401);
    assert.deepEqual(kinds(out), ["disarm", "hangUp", "status", "stopped"]);
    assert.deepEqual(statuses(out), [
      { status: "closed", attempt: 1, closedReason: "unauthorized", httpStatus: 401 },
    ]);
    assert.equal(s.closedReason, "unauthorized");
    assert.deepEqual(s.timerFired("reconnect"), [], "no more attempts");
  });

  it("401 with a hook fetches a fresh token once; refused again, it stops", () => {
    const s = makeStream({ probeHandshakes: true, canRefreshToken: true });
    s.start();
    s.dial();
    failedHandshake(s);
    assert.deepEqual(s.probed(1, 401), []);
    assert.equal(s.tokenRequest(0), "rejected");
    s.timerFired("reconnect");
    s.tokenArrived("token-2");
    s.dial();
    failedHandshake(s);
    assert.equal(s.probed(2, 401).at(-1)?.type, "stopped");
    assert.equal(s.closedReason, "unauthorized");
  });

  it("403 and 404 stop (refused); 400, 408, 426, 429, 5xx and no answer do not", () => {
    for (const status of [400, 408, 426, 429, 500, 503, null]) {
      const s = makeStream({ probeHandshakes: true });
      s.start();
      s.dial();
      failedHandshake(s);
      assert.deepEqual(s.probed(1, status), [], String(status));
      assert.equal(s.status, "reconnecting");
    }
    for (const status of [403, 404]) {
      const s = makeStream({ probeHandshakes: true });
      s.start();
      s.dial();
      failedHandshake(s);
      s.probed(1, status);
      assert.equal(s.closedReason, "refused");
    }
  });

  it("a 403 with Retry-After (an operator's block until a time) tries again then", () => {
    const s = makeStream({ probeHandshakes: true });
    s.start();
    s.dial();
    failedHandshake(s);
    const out = s.probed(1, 403, 60_000);
    assert.equal(s.status, "reconnecting", "not stopped: the block ends");
    const arm = out.find((o) => o.type === "arm");
    assert.ok(arm !== undefined && arm.type === "arm" && arm.timer === "reconnect");
    assert.ok(arm.delayMs >= 60_000 && arm.delayMs < 61_000, String(arm.delayMs));
    const change = statuses(out)[0];
    assert.equal(change?.httpStatus, 403);
    // It comes back when the block has ended: the attempt, then a hello.
    s.timerFired("reconnect");
    s.dial();
    s.receive(frame(hello(0)));
    assert.equal(s.status, "open");
    // A block longer than a day, or a 403 without a time, stops it as refused.
    for (const wait of [MAX_BLOCK_WAIT_MS + 1, null]) {
      const t = makeStream({ probeHandshakes: true });
      t.start();
      t.dial();
      failedHandshake(t);
      t.probed(1, 403, wait);
      assert.equal(t.closedReason, "refused", String(wait));
    }
  });

  it("reads Retry-After as seconds or an HTTP date", () => {
    const now = Date.parse("2026-12-07T12:00:00Z");
    assert.equal(retryAfter("60", now), 60_000);
    assert.equal(retryAfter(" 0 ", now), 0);
    assert.equal(retryAfter("Mon, 07 Dec 2026 12:01:30 GMT", now), 90_000);
    assert.equal(retryAfter("Mon, 07 Dec 2026 11:00:00 GMT", now), 0);
    assert.equal(retryAfter("soon", now), null);
    assert.equal(retryAfter(null, now), null);
  });

  it("an answer about an older attempt, or after a hello, changes nothing", () => {
    const s = makeStream({ probeHandshakes: true });
    s.start();
    s.dial();
    failedHandshake(s);
    s.timerFired("reconnect");
    s.dial();
    failedHandshake(s);
    assert.deepEqual(s.probed(1, 401), [], "the second attempt's probe counts");
    s.timerFired("reconnect");
    s.dial();
    s.receive(frame(hello(0)));
    assert.deepEqual(s.probed(2, 401), [], "connected since");
    assert.equal(s.status, "open");
  });
});

// --- the client, end to end ----------------------------------------------------------------------

function makeClient(options: Partial<PartySyncClientOptions> = {}): {
  client: PartySyncClient;
  timers: FakeTimers;
} {
  const timers = new FakeTimers();
  const client = new PartySyncClient({
    url: "ws://game.test/ws",
    token: "token-1",
    WebSocket: FakeSocket,
    timers,
    now: () => timers.now,
    random: () => 0.5,
    fetch: null,
    ...options,
  });
  return { client, timers };
}

beforeEach(() => FakeSocket.reset());

describe("PartySyncClient: narration and actions in flight", () => {
  it("two members see the same text, once, across a reconnect in the middle of a stream", async () => {
    const { client, timers } = makeClient();
    const screen = new Screen();
    const inFlight: string[][] = [];
    client.on("narration", (change) => screen.see(change));
    client.on("inFlight", (list) => inFlight.push(list.map((a) => a.action_id)));
    void client.connect();
    await tick();
    FakeSocket.last().deliver(hello(0));
    FakeSocket.last().deliver(accepted("a-1", "borin"));
    FakeSocket.last().deliver(delta("n-1", 0, "Borin ", { actionId: "a-1" }));
    FakeSocket.last().deliver(delta("n-1", 1, "heaves ", { actionId: "a-1" }));
    assert.equal(client.narration[0]?.text, "Borin heaves ");
    FakeSocket.last().drop(1006);
    timers.advance(60_000);
    await tick();
    const socket = FakeSocket.last();
    assert.equal(socket.query.get("last_seq"), "0");
    const back = hello(0, {
      resumed_from: 0,
      actions_in_flight: [{ action_id: "a-1", character_id: "borin", action_type: "choice" }],
      narration: [{ stream_id: "n-1", index: 2, text: "Borin heaves at ", action_id: "a-1" }],
    });
    assert.deepEqual(validateMessage(back as unknown as Record<string, unknown>), []);
    socket.deliver(back);
    socket.deliver(delta("n-1", 2, "at ", { actionId: "a-1" })); // already in the hello's text
    socket.deliver(delta("n-1", 3, "the bars.", { actionId: "a-1", done: true }));
    assert.equal(screen.text.get("n-1"), "Borin heaves at the bars.");
    assert.equal(client.narration[0]?.done, true);
    socket.deliver(result(1, "a-1", "borin"));
    assert.deepEqual(client.narration, []);
    assert.deepEqual(screen.removed, ["n-1"]);
    assert.deepEqual(inFlight, [[], ["a-1"], ["a-1"], []]);
    assert.deepEqual(client.actionsInFlight, []);
    client.close();
  });

  it("a scene.update ends the finished streams and is the final text", async () => {
    const { client } = makeClient();
    void client.connect();
    await tick();
    FakeSocket.last().deliver(hello(0));
    FakeSocket.last().deliver(delta("n-1", 0, "A new place.", { done: true }));
    const finalText: string[] = [];
    client.on("scene", (s) => finalText.push(s.narration));
    FakeSocket.last().deliver(scene(1, 1) as PartyEvent);
    assert.deepEqual(finalText, ["Narration of Scene 1."]);
    assert.deepEqual(client.narration, []);
    client.close();
  });
});

describe("PartySyncClient: a refused handshake", () => {
  /** A fetch that answers `status` and records what it was asked. */
  function fakeFetch(status: number | Error): { fetch: FetchLike; asked: string[] } {
    const asked: string[] = [];
    return {
      asked,
      fetch: (url) => {
        asked.push(url);
        return status instanceof Error ? Promise.reject(status) : Promise.resolve({ status });
      },
    };
  }

  it("an invalid token (401) stops the client with a reason, not Reconnecting… forever", async () => {
    const probe = fakeFetch(401);
    const { client, timers } = makeClient({ token: "bad", fetch: probe.fetch });
    const seen: ConnectionChange[] = [];
    client.on("connection", (c) => seen.push(c));
    const ready = assert.rejects(client.connect(), {
      name: "ClientClosedError",
      reason: "unauthorized",
    });
    await tick();
    FakeSocket.last().drop(1006); // what a browser reports for a handshake answered 401
    await tick();
    assert.deepEqual(probe.asked, ["http://game.test/ws?token=bad"]);
    await ready;
    assert.equal(client.status, "closed");
    assert.equal(client.closedReason, "unauthorized");
    assert.equal(seen.at(-1)?.httpStatus, 401);
    timers.advance(60_000);
    await tick();
    assert.equal(FakeSocket.all.length, 1, "no more attempts");
  });

  it("with getToken, a refused token is replaced once, then it connects", async () => {
    const probe = fakeFetch(401);
    let n = 0;
    const reasons: string[] = [];
    const { client, timers } = makeClient({
      token: "stale",
      fetch: probe.fetch,
      getToken: (reason) => {
        reasons.push(reason);
        return `fresh-${++n}`;
      },
    });
    void client.connect();
    await tick();
    FakeSocket.last().drop(1006);
    await tick();
    timers.advance(60_000);
    await tick();
    assert.deepEqual(reasons, ["rejected"]);
    assert.equal(FakeSocket.last().query.get("token"), "fresh-1");
    FakeSocket.last().deliver(hello(0));
    assert.equal(client.status, "open");
    client.close();
  });

  it("a server that cannot be reached is not a refusal: it keeps retrying", async () => {
    const probe = fakeFetch(new TypeError("Failed to fetch"));
    const { client, timers } = makeClient({ url: "wss://game.test/ws", fetch: probe.fetch });
    void client.connect().catch(() => undefined); // never connects: close() rejects it
    await tick();
    FakeSocket.last().drop(1006);
    await tick();
    assert.deepEqual(probe.asked, ["https://game.test/ws?token=token-1"]);
    assert.equal(client.status, "reconnecting");
    timers.advance(60_000);
    await tick();
    assert.equal(FakeSocket.all.length, 2);
    client.close();
  });
});
