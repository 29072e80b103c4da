/** Test doubles: a scriptable WebSocket, manual timers, and message builders. */
import type { Timers, WebSocketLike } from "../src/client.js";
import type {
  ActionAcceptedMessage,
  ActionFailedMessage,
  ActionType,
  ErrorCode,
  Member,
  NarrationDeltaMessage,
  PartyEvent,
  PartyEventMap,
  PartyEventType,
  SystemErrorMessage,
  SystemHelloMessage,
  SystemHelloPayload,
} from "../src/types.js";

type Handler = ((event: never) => unknown) | null;

/** A WebSocket the test plays the server of. Every instance is recorded in `FakeSocket.all`. */
export class FakeSocket implements WebSocketLike {
  static all: FakeSocket[] = [];
  readyState = 0;
  readonly sent: Array<Record<string, unknown>> = [];
  closedByClient: { code: number | undefined; reason: string | undefined } | null = null;
  onopen: Handler = null;
  onmessage: Handler = null;
  onerror: Handler = null;
  onclose: Handler = null;

  constructor(readonly url: string) {
    FakeSocket.all.push(this);
  }

  static reset(): void {
    FakeSocket.all = [];
  }

  static last(): FakeSocket {
    const socket = FakeSocket.all[FakeSocket.all.length - 1];
    if (socket === undefined) throw new Error("no socket was opened");
    return socket;
  }

  get query(): URLSearchParams {
    return new URL(this.url).searchParams;
  }

  send(data: string): void {
    if (this.readyState !== 1) throw new Error("send on a socket that is not open");
    this.sent.push(JSON.parse(data) as Record<string, unknown>);
  }

  close(code?: number, reason?: string): void {
    this.closedByClient = { code, reason };
    this.readyState = 3;
  }

  /** The server upgrades the connection. */
  accept(): void {
    this.readyState = 1;
    (this.onopen as ((e: unknown) => void) | null)?.({});
  }

  /** The server sends a message (accepting the connection first if needed). */
  deliver(message: unknown): void {
    if (this.readyState === 0) this.accept();
    (this.onmessage as ((e: { data: unknown }) => void) | null)?.({
      data: typeof message === "string" ? message : JSON.stringify(message),
    });
  }

  /** The server (or the network) closes the connection. */
  drop(code = 1006, reason = ""): void {
    this.readyState = 3;
    (this.onerror as ((e: unknown) => void) | null)?.({});
    (this.onclose as ((e: { code: number; reason: string }) => void) | null)?.({ code, reason });
  }

  sentOfType(type: string): Array<Record<string, unknown>> {
    return this.sent.filter((m) => m["type"] === type);
  }
}

/** Manual timers: nothing runs until `advance()`. */
export class FakeTimers implements Timers {
  now = 1_000_000;
  readonly requested: number[] = [];
  #next = 1;
  #pending = new Map<number, { at: number; callback: () => void }>();

  setTimeout(callback: () => void, ms: number): unknown {
    const id = this.#next++;
    this.requested.push(ms);
    this.#pending.set(id, { at: this.now + ms, callback });
    return id;
  }

  clearTimeout(handle: unknown): void {
    this.#pending.delete(handle as number);
  }

  get pendingCount(): number {
    return this.#pending.size;
  }

  /** Move the clock forward, running every timer that falls due, in order. */
  advance(ms: number): void {
    const until = this.now + ms;
    for (;;) {
      let due: [number, { at: number; callback: () => void }] | undefined;
      for (const entry of this.#pending) {
        if (entry[1].at <= until && (due === undefined || entry[1].at < due[1].at)) due = entry;
      }
      if (due === undefined) break;
      this.#pending.delete(due[0]);
      this.now = due[1].at;
      due[1].callback();
    }
    this.now = until;
  }
}

/** Let pending promise callbacks (the client's async connect) run. */
export function tick(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

export const MEMBERS: Member[] = [
  { character_id: "aria", display_name: "Aria", online: true },
  { character_id: "borin", display_name: "Borin", online: true },
];

const TS = "2026-11-25T21:00:00.000Z";

export function hello(
  seq: number,
  overrides: Partial<Omit<SystemHelloPayload, "resumed" | "resumed_from">> & {
    resumed_from?: number;
  } = {},
): SystemHelloMessage {
  const { resumed_from, ...rest } = overrides;
  const base = {
    protocol: 1 as const,
    party_id: "p-7",
    campaign_run_id: "run-42",
    you: "aria",
    status: "active",
    run_status: "in_progress",
    members: MEMBERS,
    scene_number: 0,
    seq,
    epoch: "ep-1",
    scene: null,
    combat: null,
    party_state: null,
    vote: null,
    actions_in_flight: [],
    narration: [],
    limits: {
      max_message_bytes: 65536,
      action_timeout_ms: 10000,
      heartbeat_ms: 20000,
      narration_idle_ms: 30000,
    },
    ...rest,
  };
  const payload: SystemHelloPayload =
    resumed_from === undefined
      ? { ...base, resumed: false }
      : { ...base, resumed: true, resumed_from };
  return { type: "system.hello", timestamp: TS, trace_id: "t-hello", payload };
}

export function event<K extends PartyEventType>(
  type: K,
  seq: number,
  payload: PartyEventMap[K]["payload"],
  traceId = `t-${seq}`,
): PartyEventMap[K] {
  return { type, seq, timestamp: TS, trace_id: traceId, payload } as PartyEventMap[K];
}

export function scene(seq: number, number: number, title = `Scene ${number}`): PartyEvent {
  return event("scene.update", seq, {
    scene_number: number,
    scene_id: `s-${number}`,
    title,
    narration: `Narration of ${title}.`,
    options: [
      { id: "left", label: "Go left" },
      { id: "right", label: "Go right" },
    ],
    kind: "story",
  });
}

export function result(seq: number, actionId: string, characterId = "aria"): PartyEvent {
  return event("action.result", seq, {
    action_id: actionId,
    character_id: characterId,
    action_type: "skill_check",
    outcome: "success",
    state: { hp: 20, max_hp: 20, effects: [], scene_flags: {} },
  });
}

export function systemError(
  code: SystemErrorMessage["payload"]["code"],
  inReplyTo: SystemErrorMessage["payload"]["in_reply_to"],
): SystemErrorMessage {
  const retryable = [
    "character_busy",
    "action_timeout",
    "engine_error",
    "engine_unavailable",
    "backend_unavailable",
    "rate_limited",
    "internal_error",
  ].includes(code);
  return {
    type: "system.error",
    timestamp: TS,
    trace_id: "t-error",
    payload: { code, message: `${code}!`, retryable, in_reply_to: inReplyTo },
  } as SystemErrorMessage;
}

/** A JWT-shaped token (unsigned) with the given exp, in seconds. */
export function fakeToken(name: string, expSeconds?: number): string {
  const b64 = (value: unknown) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const claims = expSeconds === undefined ? { sub: name } : { sub: name, exp: expSeconds };
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}.sig-${name}`;
}

/** A `narration.delta` (no seq). */
export function delta(
  streamId: string,
  index: number,
  text: string,
  { done = false, actionId }: { done?: boolean; actionId?: string } = {},
): NarrationDeltaMessage {
  const payload: NarrationDeltaMessage["payload"] = { stream_id: streamId, index, text, done };
  if (actionId !== undefined) payload.action_id = actionId;
  return { type: "narration.delta", timestamp: TS, trace_id: `t-${streamId}`, payload };
}

/** An `action.accepted` (no seq). */
export function accepted(
  actionId: string,
  characterId = "aria",
  actionType: ActionType = "choice",
): ActionAcceptedMessage {
  return {
    type: "action.accepted",
    timestamp: TS,
    trace_id: `t-${actionId}`,
    payload: { action_id: actionId, character_id: characterId, action_type: actionType },
  };
}

/** An `action.failed` (no seq). */
export function failed(
  actionId: string,
  characterId = "aria",
  code: ErrorCode = "action_rejected",
): ActionFailedMessage {
  return {
    type: "action.failed",
    timestamp: TS,
    trace_id: `t-${actionId}`,
    payload: { action_id: actionId, character_id: characterId, code },
  };
}
