/**
 * ClientStream, the client's protocol core, without a socket, a timer or a clock: inputs in,
 * outputs out. Where the inputs are open (delivery orders, duplicates, gap sizes, interleavings of
 * requests and answers, random draws) the tests generate many cases from a seeded generator, so a
 * failure names the seed that reproduces it.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { describe, it } from "node:test";
import { fileURLToPath } from "node:url";

import type { ConnectionChange, PartySyncEvents } from "../src/events.js";
import {
  CLIENT_CLOSE_RESYNC,
  ClientStream,
  LEAVE_WAIT_MS,
  type ActionRequest,
  type BallotRequest,
  type Output,
  type StreamOptions,
} from "../src/stream.js";
import type { ClientMessage, PartyEvent } from "../src/types.js";
import { event, fakeToken, hello, result, scene, systemError } from "./fake.js";

// --- a seeded generator --------------------------------------------------------------------------

/** mulberry32: a small, fast, seedable PRNG with numbers in [0, 1). */
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

function int(random: () => number, min: number, max: number): number {
  return min + Math.floor(random() * (max - min + 1));
}

/** Run `check` for `cases` seeds; a failure says which seed. */
function forSeeds(cases: number, check: (random: () => number, seed: number) => void): void {
  for (let seed = 1; seed <= cases; seed++) {
    try {
      check(prng(seed), seed);
    } catch (error) {
      if (error instanceof Error) error.message = `seed ${seed}: ${error.message}`;
      throw error;
    }
  }
}

// --- reading outputs -----------------------------------------------------------------------------

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

function applied(out: readonly Output[]): number[] {
  return emitted(out, "event").map((e) => e.seq);
}

function sent(out: readonly Output[]): ClientMessage[] {
  return out.flatMap((o) => (o.type === "send" ? [o.message] : []));
}

function statuses(out: readonly Output[]): ConnectionChange[] {
  return out.flatMap((o) => (o.type === "status" ? [o.change] : []));
}

function sentActionIds(out: readonly Output[]): string[] {
  return sent(out).flatMap((m) => (m.type === "action.request" ? [m.payload.action_id] : []));
}

function frame(message: unknown): string {
  return JSON.stringify(message);
}

// --- driving a stream ----------------------------------------------------------------------------

/** A stream whose `flush` outputs are carried out at once (the requests due, in their place). */
class Stream extends ClientStream {
  #expand(out: Output[]): Output[] {
    return out.flatMap((o) => (o.type === "flush" ? this.due() : [o]));
  }
  override start(): Output[] {
    return this.#expand(super.start());
  }
  override addAction(request: ActionRequest): Output[] {
    return this.#expand(super.addAction(request));
  }
  override addVote(request: BallotRequest): Output[] {
    return this.#expand(super.addVote(request));
  }
  override receive(data: unknown): Output[] {
    return this.#expand(super.receive(data));
  }
}

function makeStream(options: Partial<StreamOptions> = {}): ClientStream {
  return new Stream({ token: "token-1", canRefreshToken: false, random: () => 0.5, ...options });
}

/** start → dial → hello at `seq`: the outputs of the hello. */
function online(s: ClientStream, seq = 0, overrides: Parameters<typeof hello>[1] = {}): Output[] {
  s.start();
  assert.equal(s.dial(), null, "the first connection asks for a snapshot");
  return s.receive(frame(hello(seq, overrides)));
}

/** The connection drops (1006) and the reconnect falls due: the resume point of the next dial. */
function redial(s: ClientStream, code = 1006): ReturnType<ClientStream["dial"]> {
  const out = s.closed(code, "");
  assert.deepEqual(kinds(out).slice(-2), ["status", "arm"], kinds(out).join());
  assert.deepEqual(kinds(s.timerFired("reconnect")), ["open"]);
  return s.dial();
}

function deliver(s: ClientStream, ...events: PartyEvent[]): Output[] {
  return events.flatMap((e) => s.receive(frame(e)));
}

// --- tests ---------------------------------------------------------------------------------------

describe("ClientStream: delivery in order", () => {
  it("a hello publishes the snapshot, opens, resolves connect(); events apply in seq order", () => {
    const s = makeStream();
    assert.deepEqual(kinds(s.start()), ["status", "open"]);
    assert.equal(s.status, "connecting");
    s.dial();
    const out = s.receive(frame(hello(4)));
    assert.deepEqual(kinds(out), [
      "publish",
      "status",
      "emit:hello",
      "emit:inFlight",
      "emit:state",
      "ready",
    ]);
    assert.deepEqual(statuses(out), [{ status: "open", attempt: 0, resume: false }]);
    assert.deepEqual(s.position, { epoch: "ep-1", lastSeq: 4 });
    const next = s.receive(frame(scene(5, 1)));
    assert.deepEqual(kinds(next), ["emit:event", "publish", "emit:scene", "emit:state"]);
    assert.equal(s.state?.scene?.title, "Scene 1");
    assert.deepEqual(s.position, { epoch: "ep-1", lastSeq: 5 });
  });

  it("publishes the new state after the `event` emit: its listeners see the state before", () => {
    const s = makeStream();
    online(s);
    const out = s.receive(frame(scene(1, 1)));
    const at = (kind: string) => kinds(out).indexOf(kind);
    assert.ok(at("emit:event") < at("publish") && at("publish") < at("emit:scene"));
  });

  it("applies every seq once, in order, whatever the duplicates (property)", () => {
    forSeeds(200, (random) => {
      const s = makeStream();
      const start = int(random, 0, 50);
      online(s, start);
      const count = int(random, 1, 40);
      const log: number[] = [];
      let next = start + 1;
      while (next <= start + count) {
        // Either the next event, or a repeat of any seq already applied (or of the hello's).
        const repeat = next - 1 >= 1 && random() < 0.4;
        const seq = repeat ? int(random, Math.max(1, start - 3), next - 1) : next++;
        const out = s.receive(frame(scene(seq, seq)));
        if (repeat) assert.deepEqual(out, [], `seq ${seq} is a duplicate`);
        else assert.deepEqual(applied(out), [seq]);
        log.push(...applied(out));
      }
      assert.deepEqual(log, Array.from({ length: count }, (_, i) => start + 1 + i));
      assert.deepEqual(s.position, { epoch: "ep-1", lastSeq: start + count });
      assert.equal(s.state?.lastSeq, start + count);
    });
  });

  it("an event of an unknown type still advances the sequence", () => {
    const s = makeStream();
    online(s);
    const emote = { type: "party.emote", seq: 1, timestamp: "x", trace_id: "t", payload: {} };
    const out = s.receive(frame(emote));
    assert.deepEqual(kinds(out), ["emit:event", "publish", "emit:state"]);
    assert.deepEqual(applied(deliver(s, scene(2, 1))), [2]);
  });

  it("ignores events before this connection's hello, and reports unparsable frames", () => {
    const s = makeStream();
    s.start();
    s.dial();
    assert.deepEqual(s.receive(frame(scene(1, 1))), []);
    assert.deepEqual(kinds(s.receive("{not json")), ["emit:protocolError"]);
    assert.equal(s.state, null);
    s.receive(frame(hello(0)));
    redial(s);
    assert.deepEqual(s.receive(frame(scene(1, 1))), [], "not applied to the old state");
    assert.deepEqual(s.position, { epoch: "ep-1", lastSeq: 0 });
  });
});

describe("ClientStream: gaps and resync", () => {
  it("a gap drops the connection and reconnects without a resume point (property)", () => {
    forSeeds(100, (random) => {
      const s = makeStream({ random });
      const start = int(random, 0, 30);
      online(s, start);
      const good = int(random, 0, 10);
      for (let seq = start + 1; seq <= start + good; seq++) deliver(s, scene(seq, seq));
      const last = start + good;
      const got = last + int(random, 2, 1000);
      const out = s.receive(frame(scene(got, got)));
      assert.deepEqual(kinds(out), ["emit:resync", "hangUp", "status", "arm"]);
      assert.deepEqual(emitted(out, "resync"), [{ reason: "gap", expected: last + 1, got }]);
      assert.deepEqual(out[1], { type: "hangUp", code: CLIENT_CLOSE_RESYNC, reason: "resync" });
      const [change] = statuses(out);
      assert.equal(change?.status, "reconnecting");
      assert.equal(change?.resume, false);
      assert.equal(change?.code, CLIENT_CLOSE_RESYNC);
      assert.equal(s.state?.lastSeq, last, "the event after the gap is not applied");
      // Late frames of the dropped connection are ignored; its close too.
      assert.deepEqual(s.receive(frame(scene(last + 1, 0))), []);
      assert.deepEqual(s.closed(1006, ""), []);
      assert.deepEqual(kinds(s.timerFired("reconnect")), ["open"]);
      assert.equal(s.dial(), null, "no resume after a gap");
      const snapshot = got + int(random, 0, 5);
      const hi = s.receive(frame(hello(snapshot)));
      assert.deepEqual(emitted(hi, "hello").map((h) => h.resumed), [false]);
      assert.deepEqual(s.position, { epoch: "ep-1", lastSeq: snapshot });
      assert.deepEqual(redial(s), { epoch: "ep-1", lastSeq: snapshot }, "resumes after it");
    });
  });

  it("close code 4003 resyncs", () => {
    const s = makeStream();
    online(s, 5);
    const out = s.closed(4003, "");
    assert.deepEqual(kinds(out), ["emit:resync", "status", "arm"]);
    assert.deepEqual(emitted(out, "resync"), [{ reason: "server" }]);
    s.timerFired("reconnect");
    assert.equal(s.dial(), null);
  });

  it("a resumed hello that does not match the resume point asked for forces a resync", () => {
    for (const mismatch of [{ resumed_from: 3 }, { resumed_from: 5, epoch: "ep-2" }]) {
      const s = makeStream();
      online(s, 5);
      assert.deepEqual(redial(s), { epoch: "ep-1", lastSeq: 5 });
      const out = s.receive(frame(hello(9, mismatch)));
      assert.deepEqual(emitted(out, "resync"), [{ reason: "mismatch" }]);
      assert.deepEqual(out[1], { type: "hangUp", code: CLIENT_CLOSE_RESYNC, reason: "resync" });
      s.timerFired("reconnect");
      assert.equal(s.dial(), null);
    }
  });
});

describe("ClientStream: resume after a reconnect", () => {
  it("resumes from the last seq; a resumed hello keeps the state and the replay follows", () => {
    const s = makeStream();
    online(s, 2);
    deliver(s, scene(3, 1), result(4, "x", "borin"));
    assert.deepEqual(redial(s), { epoch: "ep-1", lastSeq: 4 });
    const out = s.receive(frame(hello(6, { resumed_from: 4, scene: null })));
    assert.deepEqual(emitted(out, "hello").map((h) => h.resumed), [true]);
    assert.deepEqual(statuses(out), [{ status: "open", attempt: 0, resume: true }]);
    assert.equal(s.state?.scene?.title, "Scene 1", "a resumed hello keeps the state");
    assert.deepEqual(applied(deliver(s, result(5, "y", "borin"), scene(6, 2))), [5, 6]);
    assert.equal(s.state?.scene?.title, "Scene 2");
  });

  it("a snapshot hello with a new epoch replaces the state and the resume point", () => {
    const s = makeStream();
    online(s, 0);
    deliver(s, scene(1, 1));
    assert.deepEqual(redial(s, 4002), { epoch: "ep-1", lastSeq: 1 });
    const out = s.receive(frame(hello(40, { epoch: "ep-2", scene_number: 7 })));
    assert.deepEqual(emitted(out, "hello").map((h) => h.resumed), [false]);
    assert.equal(s.state?.scene, null);
    assert.equal(s.state?.epoch, "ep-2");
    assert.deepEqual(s.position, { epoch: "ep-2", lastSeq: 40 });
    assert.deepEqual(applied(deliver(s, scene(41, 8))), [41]);
  });

  it("an epoch change restarting the seqs lower is a new history, not a run of duplicates", () => {
    const s = makeStream();
    online(s, 40);
    assert.deepEqual(redial(s), { epoch: "ep-1", lastSeq: 40 });
    s.receive(frame(hello(3, { epoch: "ep-2" })));
    assert.deepEqual(s.position, { epoch: "ep-2", lastSeq: 3 });
    assert.deepEqual(applied(deliver(s, scene(4, 1), scene(5, 2))), [4, 5]);
    assert.deepEqual(redial(s), { epoch: "ep-2", lastSeq: 5 });
  });

  it("resumes from wherever the stream stopped, over any number of reconnects (property)", () => {
    forSeeds(100, (random) => {
      const s = makeStream({ random });
      let epoch = "ep-1";
      let last = int(random, 0, 20);
      online(s, last);
      const seen: number[] = [];
      for (let round = 0; round < 8; round++) {
        const more = int(random, 0, 4);
        for (let i = 0; i < more; i++) seen.push(...applied(deliver(s, scene(++last, last))));
        assert.deepEqual(redial(s, random() < 0.5 ? 1006 : 1001), { epoch, lastSeq: last });
        if (random() < 0.7) {
          // Resumed: the replay brings what was missed.
          const missed = int(random, 0, 3);
          s.receive(frame(hello(last + missed, { resumed_from: last, epoch })));
          for (let i = 0; i < missed; i++) seen.push(...applied(deliver(s, scene(++last, last))));
        } else {
          // The server could not resume: a snapshot, maybe of a new history.
          if (random() < 0.5) epoch = `ep-${round + 2}`;
          last = int(random, 0, 60);
          s.receive(frame(hello(last, { epoch })));
          seen.length = 0;
        }
        assert.deepEqual(s.position, { epoch, lastSeq: last });
      }
      for (let i = 1; i < seen.length; i++) assert.equal(seen[i], (seen[i - 1] ?? 0) + 1);
    });
  });
});

describe("ClientStream: pending actions", () => {
  const action = (actionId: string) => ({
    actionId,
    type: "skill_check" as const,
    payload: {},
    traceId: `t-${actionId}`,
  });

  it("sends one at a time; its result settles it and sends the next", () => {
    const s = makeStream();
    online(s);
    assert.deepEqual(sent(s.addAction(action("a"))), [
      {
        type: "action.request",
        trace_id: "t-a",
        payload: {
          action_id: "a",
          character_id: "aria",
          campaign_run_id: "run-42",
          action_type: "skill_check",
          payload: {},
        },
      },
    ]);
    assert.deepEqual(s.addAction(action("b")), [], "one in flight");
    const out = deliver(s, result(1, "a"));
    assert.deepEqual(kinds(out).slice(0, 2), ["actionDone", "send"]);
    assert.deepEqual(sentActionIds(out), ["b"]);
    assert.equal(s.pendingActions, 1);
    deliver(s, result(2, "b"));
    assert.equal(s.pendingActions, 0);
  });

  it("a system.error about it settles it, except action_in_flight", () => {
    const s = makeStream();
    online(s);
    s.addAction(action("a"));
    s.addAction(action("b"));
    const reply = (code: Parameters<typeof systemError>[0], id: string) =>
      s.receive(
        frame(systemError(code, { trace_id: `t-${id}`, type: "action.request", action_id: id })),
      );
    assert.deepEqual(kinds(reply("action_in_flight", "a")), ["emit:error"]);
    assert.ok(s.hasAction("a"), "still waiting for the first attempt");
    // The server's action timeout answers it (retryable): settled, and the next one goes out.
    const timedOut = reply("action_timeout", "a");
    assert.deepEqual(kinds(timedOut), ["emit:error", "actionFailed", "send"]);
    const failed = timedOut[1];
    assert.ok(failed?.type === "actionFailed" && failed.error.payload.retryable);
    assert.deepEqual(sentActionIds(timedOut), ["b"]);
    assert.deepEqual(kinds(reply("action_rejected", "b")), ["emit:error", "actionFailed"]);
    assert.deepEqual(kinds(reply("action_rejected", "zzz")), ["emit:error"], "not pending");
    assert.equal(s.pendingActions, 0);
  });

  it("an action larger than the server's limit fails here, and the next one goes out", () => {
    // clients probe class: over 4x the limit the server closes (1009), and the resend after each
    // reconnect was closed again, for ever
    const s = makeStream();
    online(s);
    const big = { ...action("big"), payload: { skill: "x".repeat(70_000) } };
    s.addAction(big);
    assert.equal(s.pendingActions, 0);
    const out = s.addAction(action("b"));
    assert.deepEqual(sentActionIds(out), ["b"]);
    const failedHere = makeStream();
    online(failedHere);
    const early = failedHere.addAction(big);
    assert.deepEqual(kinds(early), ["actionTooLarge"]);
    const failed = early[0];
    assert.ok(failed?.type === "actionTooLarge" && failed.actionId === "big");
    assert.equal(failed.limit, 65536);
    assert.ok(failed.size > 70_000);
  });

  it("an error naming no action_id settles the action sent with its trace_id", () => {
    // clients probe: a schema_violation about an action.request whose action_id broke the rule
    // names it by trace_id only; the action (and every one behind it) waited for ever
    const s = makeStream();
    online(s);
    s.addAction(action("a"));
    s.addAction(action("b"));
    const out = s.receive(
      frame(systemError("schema_violation", { trace_id: "t-a", type: "action.request" })),
    );
    assert.deepEqual(kinds(out), ["emit:error", "actionFailed", "send"]);
    const failed = out[1];
    assert.ok(failed?.type === "actionFailed" && failed.actionId === "a");
    assert.deepEqual(sentActionIds(out), ["b"]);
    // another message's error with that trace_id settles nothing
    const other = s.receive(
      frame(systemError("schema_violation", { trace_id: "t-b", type: "vote.cast" })),
    );
    assert.deepEqual(kinds(other), ["emit:error"]);
    assert.ok(s.hasAction("b"));
  });

  it("re-sends the unanswered one with the same id on each new connection, once caught up", () => {
    const s = makeStream();
    online(s);
    s.addAction(action("a"));
    redial(s);
    const out = s.receive(frame(hello(2, { resumed_from: 0 })));
    assert.deepEqual(sent(out), [], "waits for the replay");
    assert.deepEqual(sentActionIds(deliver(s, scene(1, 1))), []);
    assert.deepEqual(sentActionIds(deliver(s, scene(2, 2))), ["a"], "caught up");
  });

  it("an action made while offline goes out at the next hello", () => {
    const s = makeStream();
    online(s);
    s.closed(1006, "");
    assert.deepEqual(s.addAction(action("a")), []);
    s.timerFired("reconnect");
    s.dial();
    assert.deepEqual(sentActionIds(s.receive(frame(hello(0, { resumed_from: 0 })))), ["a"]);
  });

  it("a duplicate (old seq) result settles the re-sent action without being applied", () => {
    const s = makeStream();
    online(s);
    s.addAction(action("a"));
    redial(s);
    s.receive(frame(hello(3)));
    const out = deliver(s, result(2, "a"));
    assert.deepEqual(kinds(out), ["actionDone"]);
    assert.equal(s.state?.lastSeq, 3);
  });

  it("settles every action exactly once and keeps at most one in flight (property)", () => {
    forSeeds(150, (random) => {
      const s = makeStream({ random });
      online(s);
      let seq = 0;
      let made = 0;
      const queue: string[] = []; // made and not settled, oldest first
      const settled: string[] = [];
      let inFlight: string | null = null; // sent on this connection and not answered
      const take = (out: Output[]) => {
        for (const o of out) {
          if (o.type === "actionDone" || o.type === "actionFailed") {
            settled.push(o.actionId);
            assert.equal(queue.shift(), o.actionId, "settled in order");
            if (inFlight === o.actionId) inFlight = null;
          }
        }
        const ids = sentActionIds(out);
        assert.ok(ids.length <= 1, "one at a time");
        for (const id of ids) {
          assert.equal(inFlight, null, `${id} sent while ${inFlight} is in flight`);
          assert.equal(id, queue[0], "the oldest unanswered goes first");
          inFlight = id;
        }
      };
      for (let step = 0; step < 60; step++) {
        const r = random();
        if (r < 0.35) {
          const id = `a${made++}`;
          queue.push(id);
          take(s.addAction(action(id)));
        } else if (r < 0.6 && inFlight !== null) {
          take(deliver(s, result(++seq, inFlight)));
        } else if (r < 0.7 && inFlight !== null) {
          const id: string = inFlight;
          const code = random() < 0.5 ? "action_timeout" : "action_rejected";
          const about = { trace_id: null, type: "action.request" as const, action_id: id };
          take(s.receive(frame(systemError(code, about))));
        } else if (r < 0.8) {
          take(deliver(s, scene(++seq, seq)));
        } else if (r < 0.9) {
          s.closed(1006, "");
          inFlight = null;
          s.timerFired("reconnect");
          s.dial();
          take(s.receive(frame(hello(seq, { resumed_from: seq }))));
        } else if (inFlight !== null && seq >= 1) {
          // A repeat of a result already applied, for a re-sent action: still matched.
          take(deliver(s, result(Math.max(1, seq), inFlight)));
        }
      }
      assert.equal(s.pendingActions, queue.length);
      assert.equal(new Set(settled).size, settled.length, "each settled once");
    });
  });
});

describe("ClientStream: ballots", () => {
  const started = event("vote.started", 1, {
    vote_id: "v1",
    question: "Which way?",
    options: [
      { id: "left", label: "Left" },
      { id: "right", label: "Right" },
    ],
    timeout_s: 30,
    deadline: "2026-11-25T21:00:30.000Z",
    tie_rule: "first_listed",
  });

  it("the vote.update a ballot caused confirms it and records this character's vote", () => {
    const s = makeStream();
    online(s);
    deliver(s, started);
    assert.deepEqual(sent(s.addVote({ voteId: "v1", option: "right", traceId: "b1" })), [
      { type: "vote.cast", trace_id: "b1", payload: { vote_id: "v1", option: "right" } },
    ]);
    const tallies = { left: 0, right: 1 };
    const update = event("vote.update", 2, { vote_id: "v1", tallies, voted: 1, eligible: 2 }, "b1");
    const out = deliver(s, update);
    assert.equal(kinds(out)[0], "voteDone");
    assert.equal(s.state?.vote?.your_vote, "right");
  });

  it("a ballot is cast once per connection", () => {
    const s = makeStream();
    online(s);
    deliver(s, started);
    assert.equal(sent(s.addVote({ voteId: "v1", option: "left", traceId: "b1" })).length, 1);
    const later = [
      ...s.addVote({ voteId: "v1", option: "right", traceId: "b2" }),
      ...s.addAction({ actionId: "a", type: "choice", payload: { option: "x" }, traceId: "t" }),
      ...deliver(s, scene(2, 1)),
    ];
    assert.deepEqual(
      sent(later).map((m) => m.trace_id),
      ["b2", "t"],
    );
  });

  it("a hello ends with a flush: a ballot a listener casts goes out after the re-cast one", () => {
    const s = new ClientStream({ token: "t", canRefreshToken: false, random: () => 0.5 });
    s.start();
    s.dial();
    s.receive(frame(hello(0)));
    s.addVote({ voteId: "v1", option: "left", traceId: "old" });
    s.closed(1006, "");
    s.timerFired("reconnect");
    s.dial();
    const batch = s.receive(frame(hello(0, { resumed_from: 0 })));
    assert.deepEqual(batch.at(-1), { type: "flush" });
    assert.equal(sent(batch).length, 0, "nothing decided before the listeners ran");
    // A `hello` listener changes its mind: the new ballot replaces the older one, not sent.
    const fromListener = s.addVote({ voteId: "v1", option: "right", traceId: "new" });
    assert.deepEqual(sent(fromListener).map((m) => m.trace_id), ["new"]);
    assert.deepEqual(s.due(), [], "the batch's flush finds nothing left");
  });

  it("ballots cast offline: only the last for each vote is sent, and the others settle with it", () => {
    const s = makeStream();
    online(s);
    deliver(s, started);
    s.closed(1006, "");
    for (const [option, traceId] of [["left", "b1"], ["right", "b2"], ["left", "b3"]] as const) {
      s.addVote({ voteId: "v1", option, traceId });
    }
    s.addVote({ voteId: "v2", option: "yes", traceId: "c1" });
    s.timerFired("reconnect");
    s.dial();
    const after = s.receive(frame(hello(1, { resumed_from: 1 })));
    assert.deepEqual(sent([...after, ...s.due()]).map((m) => m.trace_id), ["b3", "c1"]);
    const update = event("vote.update", 2, { vote_id: "v1", tallies: { left: 1, right: 0 }, voted: 1, eligible: 2 }, "b3");
    const done = deliver(s, update).filter((o) => o.type === "voteDone");
    assert.deepEqual(done.map((o) => (o.type === "voteDone" ? o.traceId : "")), ["b3", "b1", "b2"]);
    assert.equal(s.state?.vote?.your_vote, "left");
    // a refusal of the last settles the ones it replaced the same way
    s.closed(1006, "");
    s.addVote({ voteId: "v1", option: "right", traceId: "d1" });
    s.addVote({ voteId: "v1", option: "left", traceId: "d2" });
    s.timerFired("reconnect");
    s.dial();
    const again = s.receive(frame(hello(2, { resumed_from: 2 })));
    assert.deepEqual(sent([...again, ...s.due()]).map((m) => m.trace_id), ["c1", "d2"]);
    const refused = s.receive(
      frame(systemError("vote_closed", { type: "vote.cast", trace_id: "d2", vote_id: "v1" })),
    );
    assert.deepEqual(
      refused.filter((o) => o.type === "voteFailed").map((o) => (o.type === "voteFailed" ? o.traceId : "")),
      ["d2", "d1"],
    );
  });

  it("an unconfirmed ballot is cast again on the next connection; a refusal settles it", () => {
    const s = makeStream();
    online(s);
    s.addVote({ voteId: "v9", option: "x", traceId: "b9" });
    redial(s);
    const out = s.receive(frame(hello(0, { resumed_from: 0 })));
    assert.deepEqual(sent(out).map((m) => m.type), ["vote.cast"]);
    const about = { trace_id: "b9", type: "vote.cast" as const, vote_id: "v9" };
    const refused = s.receive(frame(systemError("vote_unknown", about)));
    assert.deepEqual(kinds(refused), ["emit:error", "voteFailed"]);
  });
});

describe("ClientStream: close codes, tokens and backoff", () => {
  it("stops after 1000 (left), 1008 (policy) and 4001 without a token hook", () => {
    for (const [code, reason] of [
      [1000, "left"],
      [1008, "policy"],
      [4001, "token_expired"],
    ] as const) {
      const s = makeStream();
      online(s);
      s.addAction({ actionId: "a", type: "choice", payload: { option: "x" }, traceId: "t" });
      const out = s.closed(code, "bye");
      assert.deepEqual(kinds(out), ["disarm", "hangUp", "status", "stopped"]);
      assert.deepEqual(statuses(out), [
        { status: "closed", attempt: 0, closedReason: reason, code, reason: "bye" },
      ]);
      assert.deepEqual(out[3], { type: "stopped", reason });
      assert.equal(s.pendingActions, 0);
      assert.deepEqual(s.timerFired("reconnect"), [], "no reconnect once stopped");
    }
  });

  it("4001 with a hook fetches a fresh token and resumes", () => {
    const s = makeStream({ canRefreshToken: true });
    online(s, 3);
    assert.equal(s.tokenRequest(0), null);
    s.closed(4001, "");
    assert.equal(s.tokenRequest(0), "expired");
    s.tokenArrived("token-2");
    assert.equal(s.tokenRequest(0), null);
    assert.equal(s.token, "token-2");
    s.timerFired("reconnect");
    assert.deepEqual(s.dial(), { epoch: "ep-1", lastSeq: 3 });
  });

  it("wants a first token, one past its exp (by the clock given), one after failures", () => {
    const first = makeStream({ token: null, canRefreshToken: true });
    assert.equal(first.tokenRequest(0), "initial");
    const expiring = makeStream({ token: fakeToken("x", 1000), canRefreshToken: true });
    assert.equal(expiring.tokenRequest(999_999), null);
    assert.equal(expiring.tokenRequest(1_000_000), "expired");
    const noHook = makeStream({ token: fakeToken("x", 1000) });
    assert.equal(noHook.tokenRequest(2e6), null, "no hook: use it");
    const refused = makeStream({ canRefreshToken: true, refreshTokenAfterFailures: 3 });
    refused.start();
    for (let failures = 1; failures <= 3; failures++) {
      refused.dial();
      refused.closed(1006, "");
      refused.timerFired("reconnect");
      assert.equal(refused.tokenRequest(0), failures >= 3 ? "rejected" : null, `after ${failures}`);
    }
  });

  it("a failed token fetch is reported and retried with backoff", () => {
    const s = makeStream({ token: null, canRefreshToken: true });
    s.start();
    const error = new Error("sign-in unavailable");
    const out = s.tokenFailed(error, 0);
    assert.deepEqual(kinds(out), ["emit:tokenError", "status", "arm"]);
    assert.deepEqual(emitted(out, "tokenError"), [error]);
    assert.equal(s.tokenRequest(0), "initial", "still wanted");
  });

  it("a failed fetch after failed handshakes goes on with the current token until its exp", () => {
    for (const [exp, now, fallsBack] of [
      [undefined, 5e9, true], // no exp: still good
      [1000, 999_999, true], // exp not passed yet
      [1000, 1_000_000, false], // exp passed: a fresh one is still wanted
    ] as const) {
      const s = makeStream({ token: fakeToken("x", exp), canRefreshToken: true });
      s.start();
      for (let i = 0; i < 2; i++) {
        s.dial();
        s.closed(1006, ""); // the server is down: a browser cannot tell it from a 401
        s.timerFired("reconnect");
      }
      assert.equal(s.tokenRequest(0), "rejected", "the guess after 2 failed handshakes");
      const out = s.tokenFailed(new Error("init_data_expired"), now);
      assert.deepEqual(kinds(out), ["emit:tokenError", "status", "arm"]);
      assert.equal(s.tokenRequest(0) === null, fallsBack, `exp ${exp}, now ${now}`);
      if (!fallsBack) continue;
      // Two more failed handshakes and it asks again.
      s.timerFired("reconnect");
      s.dial();
      s.closed(1006, "");
      assert.equal(s.tokenRequest(0), null);
      s.timerFired("reconnect");
      s.dial();
      s.closed(1006, "");
      assert.equal(s.tokenRequest(0), "rejected");
    }
  });

  it("a 401 the probe learnt is not a guess: a failed fetch does not go back to the token", () => {
    const s = makeStream({ token: fakeToken("x"), canRefreshToken: true, probeHandshakes: true });
    s.start();
    s.dial();
    const out = s.closed(1006, "");
    const probe = out.find((o) => o.type === "probe");
    assert.ok(probe !== undefined && probe.type === "probe");
    s.probed(probe.connection, 401);
    assert.equal(s.tokenRequest(0), "rejected");
    s.tokenFailed(new Error("sign-in down"), 0);
    assert.equal(s.tokenRequest(0), "rejected", "still wanted");
  });

  it("backoff delays stay in [0, min(cap, base·2^n)) and restart after a hello (property)", () => {
    forSeeds(200, (random, seed) => {
      const baseMs = int(random, 1, 2000);
      const capMs = baseMs * int(random, 1, 100);
      const draws = prng(seed * 7919);
      let lastDraw = 0;
      const s = makeStream({
        baseMs,
        capMs,
        random: () => (lastDraw = random() < 0.1 ? 1 - 1e-12 : draws()),
      });
      s.start();
      s.dial();
      s.receive(frame(hello(0)));
      for (let round = 0; round < 3; round++) {
        const failures = int(random, 1, 25);
        for (let n = 0; n < failures; n++) {
          if (n > 0) s.dial(); // refused before any hello
          const out = s.closed(1006, "");
          const arm = out.at(-1);
          assert.ok(arm?.type === "arm" && arm.timer === "reconnect");
          const ceiling = Math.min(capMs, baseMs * 2 ** n);
          assert.ok(arm.delayMs >= 0 && arm.delayMs < ceiling, `${arm.delayMs} in [0, ${ceiling})`);
          assert.equal(arm.delayMs, Math.floor(lastDraw * ceiling), "drawn from the random given");
          assert.equal(statuses(out)[0]?.attempt, n + 1);
          assert.equal(statuses(out)[0]?.delayMs, arm.delayMs);
          assert.deepEqual(kinds(s.timerFired("reconnect")), ["open"]);
        }
        assert.equal(s.attempt, failures);
        s.dial();
        s.receive(frame(hello(0)));
        assert.equal(s.attempt, 0, "a hello resets the count");
      }
    });
  });

  it("a connection that cannot even be created counts as a failed attempt", () => {
    const s = makeStream();
    s.start();
    s.dial();
    const out = s.dialFailed();
    assert.deepEqual(kinds(out), ["status", "arm"]);
    assert.deepEqual(statuses(out), [
      { status: "reconnecting", attempt: 1, delayMs: 250, resume: false },
    ]);
    assert.deepEqual(s.closed(1006, ""), [], "no connection to close");
    assert.deepEqual(s.receive(frame(hello(0))), [], "no connection to receive on");
  });

  it("only the timer armed last counts", () => {
    const s = makeStream();
    online(s);
    s.closed(1006, "");
    assert.deepEqual(s.timerFired("leave"), []);
    assert.deepEqual(kinds(s.timerFired("reconnect")), ["open"]);
    assert.deepEqual(s.timerFired("reconnect"), [], "fired once");
  });
});

describe("ClientStream: leaving and closing", () => {
  it("leave() online says party.leave and waits for the 1000; the wait ending says it again", () => {
    const s = makeStream();
    online(s);
    const out = s.leave();
    const leaveMessage = { type: "party.leave", payload: { character_id: "aria" } };
    assert.deepEqual(out, [
      { type: "send", message: leaveMessage },
      { type: "arm", timer: "leave", delayMs: LEAVE_WAIT_MS },
    ]);
    assert.deepEqual(s.leave(), [], "said once per connection");
    // No 1000 in time: the link is taken for dead, not the leave for done.
    const end = s.timerFired("leave");
    assert.deepEqual(kinds(end), ["hangUp", "status", "arm"]);
    assert.equal(s.status, "reconnecting");
    assert.equal(s.closedReason, null);
    assert.deepEqual(kinds(s.timerFired("reconnect")), ["open"]);
    assert.notEqual(s.dial(), null, "resumes");
    const again = s.receive(frame(hello(0, { resumed_from: 0 })));
    assert.deepEqual(sent(again), [leaveMessage], "said again on the next connection");
    assert.deepEqual(statuses(s.closed(1000, "")).map((c) => c.closedReason), ["left"]);
  });

  it("leave() online then a close other than 1000 reconnects and says it again", () => {
    const s = makeStream();
    online(s);
    s.leave();
    const out = s.closed(1006, "");
    assert.deepEqual(statuses(out).map((c) => c.status), ["reconnecting"]);
    assert.deepEqual(kinds(s.timerFired("reconnect")), ["open"]);
    s.dial();
    const again = s.receive(frame(hello(0, { resumed_from: 0 })));
    assert.deepEqual(
      sent(again).map((m) => m.type),
      ["party.leave"],
    );
    assert.deepEqual(statuses(s.closed(1000, "")).map((c) => c.closedReason), ["left"]);
  });

  it("leave() offline says party.leave once reconnected and stops only at the 1000", () => {
    const s = makeStream();
    online(s);
    s.closed(1006, "");
    assert.deepEqual(s.leave(), [], "nothing to send on, and not stopped");
    assert.equal(s.status, "reconnecting");
    assert.equal(s.closedReason, null);
    s.timerFired("reconnect");
    s.dial();
    const out = s.receive(frame(hello(0, { resumed_from: 0 })));
    assert.deepEqual(sent(out), [
      { type: "party.leave", payload: { character_id: "aria" } },
    ]);
    assert.ok(out.some((o) => o.type === "arm" && o.timer === "leave"));
    assert.deepEqual(statuses(s.closed(1000, "")).map((c) => c.closedReason), ["left"]);
  });

  it("leave() before connect() connects first; a refused handshake stops it as refused", () => {
    const s = makeStream({ probeHandshakes: true });
    assert.deepEqual(statuses(s.leave()).map((c) => c.status), ["connecting"]);
    s.dial();
    s.closed(1006, "");
    const out = s.probed(1, 403);
    assert.deepEqual(statuses(out).map((c) => [c.closedReason, c.httpStatus]), [["refused", 403]]);
    assert.equal(s.closedReason, "refused", "not left: the leave was never said");
  });

  it("close() closes with 1000 and every later input is void", () => {
    const s = makeStream();
    online(s);
    const out = s.close();
    assert.deepEqual(out[1], { type: "hangUp", code: 1000 });
    assert.equal(s.status, "closed");
    const lifecycle = s.lifecycle;
    assert.deepEqual(s.close(), []);
    assert.deepEqual(s.leave(), []);
    assert.deepEqual(s.receive(frame(scene(1, 1))), []);
    assert.deepEqual(s.closed(1006, ""), []);
    assert.deepEqual(s.tokenFailed(new Error("x"), 0), []);
    assert.equal(s.lifecycle, lifecycle);
  });

  it("every status change moves the lifecycle on", () => {
    const s = makeStream();
    const seen = [s.lifecycle];
    online(s);
    seen.push(s.lifecycle);
    s.closed(1006, "");
    seen.push(s.lifecycle);
    s.close();
    seen.push(s.lifecycle);
    assert.deepEqual(seen, [0, 2, 3, 4]); // connecting + open, reconnecting, closed
  });
});

describe("ClientStream: no I/O", () => {
  it("decides the same from the same inputs, with no clock, timer or random of its own", () => {
    const run = (): unknown[] => {
      const s = makeStream({ random: prng(42), token: fakeToken("x", 5), canRefreshToken: true });
      const log: unknown[] = [...s.start(), s.tokenRequest(10_000)];
      s.tokenArrived("t2");
      s.dial();
      log.push(...s.receive(frame(hello(0))), ...deliver(s, scene(1, 1)));
      log.push(
        ...s.addAction({ actionId: "a", type: "choice", payload: { option: "x" }, traceId: "t" }),
      );
      for (let i = 0; i < 5; i++) {
        log.push(...s.closed(1006, ""), ...s.timerFired("reconnect"), s.dial());
      }
      log.push(...s.receive(frame(hello(1, { resumed_from: 1 }))), ...deliver(s, scene(3, 3)));
      return log;
    };
    const saved = { random: Math.random, now: Date.now, setTimeout: globalThis.setTimeout };
    const forbidden = (name: string) => () => {
      throw new Error(`the stream used ${name}`);
    };
    Math.random = forbidden("Math.random");
    Date.now = forbidden("Date.now");
    globalThis.setTimeout = forbidden("setTimeout") as unknown as typeof setTimeout;
    let first: unknown[];
    let second: unknown[];
    try {
      first = run();
      second = run();
    } finally {
      Math.random = saved.random;
      Date.now = saved.now;
      globalThis.setTimeout = saved.setTimeout;
    }
    assert.deepEqual(first, second);
    assert.ok(first.includes("expired"), "the clock given decides the token's expiry");
    const outputs = first.filter(
      (o): o is Output => typeof o === "object" && o !== null && "type" in o,
    );
    assert.equal(emitted(outputs, "resync").length, 1, "the run reaches a gap");
  });

  it("its source names no socket, timer, clock or random source", () => {
    // dist/test/test/stream.test.js → clients/js/src/stream.ts
    const here = dirname(fileURLToPath(import.meta.url));
    const source = readFileSync(resolve(here, "..", "..", "..", "src", "stream.ts"), "utf8");
    const code = source.replace(/\/\*[\s\S]*?\*\//g, "").replace(/\/\/.*$/gm, "");
    const io = ["WebSocket", "setTimeout", "clearTimeout", "Date", "Math.random", "performance"];
    for (const name of [...io, "crypto", "fetch"]) {
      assert.ok(!code.includes(name), `stream.ts uses ${name}`);
    }
  });
});

describe("ClientStream: reconnecting now", () => {
  it("retryNow opens a waiting reconnect at once, once; not the server's wait, not when open", () => {
    const s = makeStream();
    online(s, 2);
    assert.deepEqual(s.retryNow(), [], "open: nothing to do");
    s.closed(1006, "");
    assert.deepEqual(kinds(s.retryNow()), ["disarm", "open"]);
    assert.deepEqual(s.retryNow(), [], "the attempt is under way");
    assert.deepEqual(s.timerFired("reconnect"), [], "the cancelled timer does nothing");
    assert.deepEqual(s.dial(), { epoch: "ep-1", lastSeq: 2 }, "it resumes as the timer would");
    s.closed(4004, "operator");
    assert.deepEqual(s.retryNow(), [], "an operator's disconnect waits as the server asked");
    assert.deepEqual(kinds(s.timerFired("reconnect")), ["open"]);
  });
});
