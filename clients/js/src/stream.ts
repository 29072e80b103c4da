/**
 * The client's side of the protocol as a state machine: inputs in, outputs out, no I/O.
 *
 * `ClientStream` holds what survives reconnects (the party state, the resume point `epoch` +
 * `lastSeq`, the pending actions and ballots, the attempt count, the token) and decides, for each
 * input (a frame, a close, a timer that fell due, a call of the application), what the client
 * must do: emit an event, send a message, settle a request, open or drop a connection, arm a
 * timer, stop. It opens no socket, arms no timer and reads no clock or random source of its own:
 * the time comes in as an argument (`tokenRequest(now)`) and the backoff's random draw from the
 * injected `random`. `PartySyncClient` (`client.ts`) is the shell that feeds it and carries out
 * its outputs, in order; the Python client's `ClientStream` is built the same way.
 *
 * Rules (docs/protocol.md: "Resuming", gap detection in "The envelope", "Close codes", "Actions
 * and idempotency"):
 *
 * - after a hello, an event with `seq == last + 1` is applied, `seq <= last` is a duplicate
 *   (dropped), `seq > last + 1` is a gap: drop the connection and resync (reconnect without a
 *   resume point, for a fresh snapshot); close code 4003 resyncs too;
 * - a resumed hello keeps the state (the replay follows); a snapshot hello replaces it and its
 *   epoch; a resumed hello that does not match the resume point asked for forces a resync;
 * - requests wait until the connection has caught up with its hello: then one action at a time
 *   (the oldest unanswered, re-sent with its same `action_id` on every new connection) and every
 *   unconfirmed ballot go out; an `action.result` settles its action whatever its seq (the server
 *   answers a repeated `action_id` with the original result), a `system.error` about it too,
 *   except `action_in_flight` (the first attempt is still running: keep waiting);
 * - after a close: 1000 and 1008 stop, 4001 fetches a fresh token (or stops without a hook),
 *   anything else reconnects after `fullJitterDelay(attempt)`; a hello resets the attempt count;
 *   failed handshakes in a row (a browser cannot see the HTTP 401 of a refused token) fetch a
 *   fresh token too.
 */
import { DEFAULT_BACKOFF_BASE_MS, DEFAULT_BACKOFF_CAP_MS, fullJitterDelay } from "./backoff.js";
import type { ClosedReason } from "./errors.js";
import type {
  ConnectionChange,
  ConnectionStatus,
  PartySyncEvents,
  ResyncInfo,
  TokenReason,
} from "./events.js";
import {
  isSequenced,
  parseServerMessage,
  ProtocolParseError,
  type UnknownPartyEvent,
  type UnknownServerMessage,
} from "./parse.js";
import { applyEvent, fromHello, withOwnBallot, type PartySnapshot } from "./state.js";
import type {
  ActionRequestMessage,
  ActionResultMessage,
  ActionType,
  ClientMessage,
  PartyEvent,
  SystemErrorMessage,
  SystemHelloMessage,
  VoteUpdateMessage,
} from "./types.js";

export const CLOSE_NORMAL = 1000;
export const CLOSE_POLICY = 1008;
export const CLOSE_TOKEN_EXPIRED = 4001;
export const CLOSE_RESYNC = 4003;
/** The code this client closes with when it drops a connection to resync. */
export const CLIENT_CLOSE_RESYNC = 4000;
/** After `leave()`, how long to wait for the server's 1000 before stopping anyway. */
export const LEAVE_WAIT_MS = 5000;

/** The one timer the client has at a time: the next connection attempt, or the end of a leave. */
export type Timer = "reconnect" | "leave";

/** Where a resume starts: the epoch and the last seq applied. */
export interface Position {
  epoch: string;
  lastSeq: number;
}

/** Emit `name` with `value` to the application's listeners. */
export type Emit = {
  [K in keyof PartySyncEvents]: { type: "emit"; name: K; value: PartySyncEvents[K] };
}[keyof PartySyncEvents];

/** What the shell must do, in the order given. */
export type Output =
  | Emit
  /** From now on `client.state` is `state` (the `event` listeners see the state before it). */
  | { type: "publish"; state: PartySnapshot }
  /** The status changed: emit `connection` with `change`. */
  | { type: "status"; change: ConnectionChange }
  /** Send `message` on the current connection. */
  | { type: "send"; message: ClientMessage }
  /**
   * Send what is due now: carry out `due()`. Ends a batch whose emits come first, so a request a
   * listener made in between goes out in its turn (a ballot cast from a `hello` listener after
   * the re-cast of an older one: the latest ballot counts).
   */
  | { type: "flush" }
  /** Start a connection attempt: fetch a token if `tokenRequest` says so, then `dial()`. */
  | { type: "open" }
  /** Call `timerFired(timer)` after `delayMs` (replacing the timer armed before, if any). */
  | { type: "arm"; timer: Timer; delayMs: number }
  /** Cancel the armed timer. */
  | { type: "disarm" }
  /** Forget the current connection; close it with `code` (and `reason`) if a code is given. */
  | { type: "hangUp"; code?: number; reason?: string }
  /** A hello arrived: resolve the `connect()` promises. */
  | { type: "ready" }
  | { type: "actionDone"; actionId: string; result: ActionResultMessage }
  | { type: "actionFailed"; actionId: string; error: SystemErrorMessage }
  | { type: "voteDone"; traceId: string; update: VoteUpdateMessage }
  | { type: "voteFailed"; traceId: string; error: SystemErrorMessage }
  /** Stopped for good: reject what is still waiting with `ClientClosedError(reason)`. */
  | { type: "stopped"; reason: ClosedReason };

/**
 * The outputs that act on the connection. Each belongs to the status it was decided in: when a
 * listener called during the same batch stops the client (`close()` or `leave()` from inside an
 * event), the status moves on (`lifecycle` changes) and the rest of these are void, so a stopped
 * client neither reports `reconnecting` nor dials again.
 */
export const CONNECTION_OUTPUTS: ReadonlySet<Output["type"]> = new Set([
  "status",
  "send",
  "flush",
  "open",
  "arm",
  "disarm",
  "hangUp",
]);

export interface ActionRequest {
  actionId: string;
  type: ActionType;
  payload: Record<string, unknown>;
  traceId: string;
}

export interface BallotRequest {
  voteId: string;
  option: string;
  traceId: string;
}

export interface StreamOptions {
  /** The token to start with; null: fetch one (`initial`) before the first connection. */
  token: string | null;
  /** Whether fresh tokens can be fetched (the client has a `getToken` hook). */
  canRefreshToken: boolean;
  /** A number in [0, 1): the backoff's jitter. */
  random: () => number;
  /** The backoff (defaults: `DEFAULT_BACKOFF_BASE_MS`, `DEFAULT_BACKOFF_CAP_MS`). */
  baseMs?: number | undefined;
  capMs?: number | undefined;
  /** Consecutive failed handshakes after which the token is fetched again (default 2). */
  refreshTokenAfterFailures?: number | undefined;
}

interface Pending<T> {
  request: T;
  /** The connection it was last sent on (0: never sent). */
  sentOn: number;
}

/** The `exp` claim of a JWT in milliseconds, or null if it has none or is not a JWT. */
export function tokenExpiry(token: string): number | null {
  const part = token.split(".")[1];
  if (part === undefined) return null;
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const json: unknown = JSON.parse(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)));
    if (typeof json === "object" && json !== null && "exp" in json) {
      const exp = (json as { exp: unknown }).exp;
      return typeof exp === "number" ? exp * 1000 : null;
    }
  } catch {
    return null;
  }
  return null;
}

const FLUSH: Output = { type: "flush" };

function emit<K extends keyof PartySyncEvents>(name: K, value: PartySyncEvents[K]): Output {
  return { type: "emit", name, value } as Emit;
}

export class ClientStream {
  readonly #random: () => number;
  readonly #canRefresh: boolean;
  readonly #baseMs: number;
  readonly #capMs: number;
  readonly #refreshAfter: number;

  #token: string | null;
  #tokenReason: TokenReason | null;
  #status: ConnectionStatus = "idle";
  #lifecycle = 0;
  #closedReason: ClosedReason | null = null;
  /** Connection attempts made (bumped by `dial`): tells a request sent on this one from before. */
  #connection = 0;
  /** Whether the connection `#connection` is current (dialled, not closed nor dropped). */
  #socket = false;
  /** The connection the last hello arrived on. */
  #helloOn = -1;
  #attempt = 0;
  #failedHandshakes = 0;
  #armed: Timer | null = null;
  #resumeNext = true;
  #leaving = false;
  #epoch: string | null = null;
  #lastSeq: number | null = null;
  /** After a resumed hello: the seq the replay reaches; requests wait until then. */
  #catchUpTo: number | null = null;
  #state: PartySnapshot | null = null;
  readonly #actions = new Map<string, Pending<ActionRequest>>();
  readonly #votes: Array<Pending<BallotRequest>> = [];

  constructor(options: StreamOptions) {
    this.#random = options.random;
    this.#canRefresh = options.canRefreshToken;
    this.#baseMs = options.baseMs ?? DEFAULT_BACKOFF_BASE_MS;
    this.#capMs = options.capMs ?? DEFAULT_BACKOFF_CAP_MS;
    this.#refreshAfter = Math.max(1, options.refreshTokenAfterFailures ?? 2);
    this.#token = options.token;
    this.#tokenReason = options.token === null ? "initial" : null;
  }

  // --- what the shell reads ---------------------------------------------------------------------

  get status(): ConnectionStatus {
    return this.#status;
  }

  /** Bumped by every status change; see `CONNECTION_OUTPUTS`. */
  get lifecycle(): number {
    return this.#lifecycle;
  }

  get closedReason(): ClosedReason | null {
    return this.#closedReason;
  }

  /** The party state as applied so far (null before the first hello). */
  get state(): PartySnapshot | null {
    return this.#state;
  }

  /** Where a resume would start, or null before the first hello. */
  get position(): Position | null {
    return this.#epoch === null || this.#lastSeq === null
      ? null
      : { epoch: this.#epoch, lastSeq: this.#lastSeq };
  }

  /** Consecutive failed attempts since the last hello. */
  get attempt(): number {
    return this.#attempt;
  }

  get pendingActions(): number {
    return this.#actions.size;
  }

  hasAction(actionId: string): boolean {
    return this.#actions.has(actionId);
  }

  /** The token the next connection uses. */
  get token(): string | null {
    return this.#token;
  }

  // --- the application ---------------------------------------------------------------------------

  /** `connect()`: start connecting (only the first call does anything). */
  start(): Output[] {
    if (this.#status !== "idle") return [];
    return [this.#setStatus("connecting", { resume: false }), { type: "open" }];
  }

  /** Track an action (not after the client stopped); sent when it is the oldest unanswered. */
  addAction(request: ActionRequest): Output[] {
    this.#actions.set(request.actionId, { request, sentOn: 0 });
    return this.due();
  }

  /** Track a ballot (not after the client stopped); sent as soon as the connection is live. */
  addVote(request: BallotRequest): Output[] {
    this.#votes.push({ request, sentOn: 0 });
    return this.due();
  }

  /** `leave()`: say `party.leave` and wait for the server's 1000, or stop at once if offline. */
  leave(): Output[] {
    if (this.#status === "closed") return [];
    this.#leaving = true;
    if (this.#socket && this.#helloOn === this.#connection && this.#state !== null) {
      this.#armed = "leave";
      const message: ClientMessage = {
        type: "party.leave",
        payload: { character_id: this.#state.you },
      };
      return [
        { type: "send", message },
        { type: "arm", timer: "leave", delayMs: LEAVE_WAIT_MS },
      ];
    }
    return this.#stop("left");
  }

  /** `close()`: disconnect and stop. */
  close(): Output[] {
    return this.#stop("closed", CLOSE_NORMAL);
  }

  // --- connecting --------------------------------------------------------------------------------

  /**
   * Before dialling: why a fresh token must be fetched first (`now` is the clock in milliseconds,
   * to see whether the token's `exp` has passed), or null to use `token` as it is.
   */
  tokenRequest(now: number): TokenReason | null {
    if (!this.#canRefresh) return null;
    let reason = this.#tokenReason;
    if (reason === null && this.#token !== null) {
      const expiry = tokenExpiry(this.#token);
      if (expiry !== null && expiry <= now) reason = "expired";
    }
    return reason;
  }

  /** A fresh token arrived. */
  tokenArrived(token: string): void {
    this.#token = token;
    this.#tokenReason = null;
    this.#failedHandshakes = 0;
  }

  /** No token could be had: tell the application and try again later. */
  tokenFailed(error: unknown): Output[] {
    if (this.#status === "closed") return [];
    return [emit("tokenError", error), ...this.#scheduleReconnect({})];
  }

  /** A connection attempt starts now: the resume point to ask for, or null for a snapshot. */
  dial(): Position | null {
    this.#connection += 1;
    this.#socket = true;
    return this.#resumeNext ? this.position : null;
  }

  /** The connection could not even be created (a malformed URL, a blocked port). */
  dialFailed(): Output[] {
    this.#socket = false;
    this.#failedHandshakes += 1;
    return this.#scheduleReconnect({});
  }

  /** The current connection closed (by the server or the network) with `code`. */
  closed(code: number, reason: string): Output[] {
    if (!this.#socket) return [];
    this.#socket = false;
    const hadHello = this.#helloOn === this.#connection;
    if (this.#status === "closed") return [];
    if (code === CLOSE_NORMAL || this.#leaving) return this.#stop("left", undefined, code, reason);
    if (code === CLOSE_POLICY) return this.#stop("policy", undefined, code, reason);
    if (code === CLOSE_TOKEN_EXPIRED) {
      if (!this.#canRefresh) return this.#stop("token_expired", undefined, code, reason);
      this.#tokenReason = "expired";
    } else if (!hadHello) {
      this.#failedHandshakes += 1;
      if (this.#canRefresh && this.#failedHandshakes >= this.#refreshAfter) {
        this.#tokenReason = "rejected";
      }
    }
    const out: Output[] = [];
    if (code === CLOSE_RESYNC) {
      this.#resumeNext = false;
      out.push(emit("resync", { reason: "server" }));
    }
    out.push(...this.#scheduleReconnect({ code, reason }));
    return out;
  }

  /** The timer armed last fell due. */
  timerFired(timer: Timer): Output[] {
    if (this.#armed !== timer || this.#status === "closed") return [];
    this.#armed = null;
    return timer === "reconnect" ? [{ type: "open" }] : this.#stop("left", CLOSE_NORMAL);
  }

  #scheduleReconnect(info: { code?: number; reason?: string }): Output[] {
    if (this.#status === "closed") return [];
    const delayMs = fullJitterDelay(this.#attempt, this.#random, this.#baseMs, this.#capMs);
    this.#attempt += 1;
    const resume = this.#resumeNext && this.#epoch !== null;
    this.#armed = "reconnect";
    return [
      this.#setStatus("reconnecting", { ...info, delayMs, resume }),
      { type: "arm", timer: "reconnect", delayMs },
    ];
  }

  #stop(reason: ClosedReason, closeCode?: number, code?: number, text?: string): Output[] {
    if (this.#status === "closed") return [];
    this.#armed = null;
    this.#socket = false;
    this.#closedReason = reason;
    const change: Partial<ConnectionChange> = { closedReason: reason };
    if (code !== undefined) change.code = code;
    if (text !== undefined) change.reason = text;
    this.#actions.clear();
    this.#votes.length = 0;
    return [
      { type: "disarm" },
      closeCode === undefined ? { type: "hangUp" } : { type: "hangUp", code: closeCode },
      this.#setStatus("closed", change),
      { type: "stopped", reason },
    ];
  }

  #setStatus(status: ConnectionStatus, details: Partial<ConnectionChange>): Output {
    this.#status = status;
    this.#lifecycle += 1;
    return { type: "status", change: { status, attempt: this.#attempt, ...details } };
  }

  /** Drop the connection and reconnect without resuming, for a fresh snapshot. */
  #resync(info: ResyncInfo): Output[] {
    this.#resumeNext = false;
    this.#socket = false;
    return [
      emit("resync", info),
      { type: "hangUp", code: CLIENT_CLOSE_RESYNC, reason: "resync" },
      ...this.#scheduleReconnect({ code: CLIENT_CLOSE_RESYNC, reason: info.reason }),
    ];
  }

  // --- receiving ---------------------------------------------------------------------------------

  /** A frame of the current connection (its raw `data`). */
  receive(data: unknown): Output[] {
    if (!this.#socket) return [];
    let message: ReturnType<typeof parseServerMessage>;
    try {
      message = parseServerMessage(data);
    } catch (error) {
      if (error instanceof ProtocolParseError) return [emit("protocolError", error)];
      throw error;
    }
    if (message.type === "system.hello" && !("unknown" in message)) {
      return this.#hello(message as SystemHelloMessage);
    }
    if (message.type === "system.error" && !("unknown" in message)) {
      return this.#error(message as SystemErrorMessage);
    }
    if (isSequenced(message as PartyEvent | UnknownServerMessage)) {
      if (this.#helloOn !== this.#connection) return []; // before the hello: not ours to apply
      return this.#event(message as PartyEvent | UnknownPartyEvent);
    }
    return [];
  }

  #hello(hello: SystemHelloMessage): Output[] {
    const p = hello.payload;
    const resumed =
      p.resumed === true &&
      this.#state !== null &&
      this.#epoch === p.epoch &&
      this.#lastSeq === p.resumed_from;
    if (p.resumed === true && !resumed) return this.#resync({ reason: "mismatch" });
    this.#helloOn = this.#connection;
    this.#attempt = 0;
    this.#failedHandshakes = 0;
    this.#resumeNext = true;
    let state: PartySnapshot;
    if (resumed && this.#state !== null) {
      state = { ...this.#state, limits: { ...p.limits } };
      this.#catchUpTo = p.seq > (this.#lastSeq ?? 0) ? p.seq : null;
    } else {
      // A new snapshot: an own ballot is known from the hello; unconfirmed ones are re-cast.
      state = fromHello(p);
      this.#epoch = p.epoch;
      this.#lastSeq = p.seq;
      this.#catchUpTo = null;
    }
    this.#state = state;
    return [
      { type: "publish", state },
      this.#setStatus("open", { resume: resumed }),
      emit("hello", { message: hello, resumed }),
      emit("state", state),
      { type: "ready" },
      FLUSH,
    ];
  }

  #error(error: SystemErrorMessage): Output[] {
    const out: Output[] = [emit("error", error)];
    const p = error.payload;
    const actionId = p.in_reply_to.action_id;
    if (actionId !== undefined) {
      // action_in_flight: the first attempt is still running, its result will come.
      if (this.#actions.has(actionId) && p.code !== "action_in_flight") {
        this.#actions.delete(actionId);
        out.push({ type: "actionFailed", actionId, error }, FLUSH);
      }
      return out;
    }
    const traceId = p.in_reply_to.trace_id;
    if (p.in_reply_to.type === "vote.cast" && traceId !== null) {
      const index = this.#votes.findIndex((v) => v.request.traceId === traceId);
      if (index >= 0) {
        this.#votes.splice(index, 1);
        out.push({ type: "voteFailed", traceId, error });
      }
    }
    return out;
  }

  #event(event: PartyEvent | UnknownPartyEvent): Output[] {
    const out: Output[] = [];
    // A result for a pending action settles it whatever its seq: the server answers a repeated
    // action_id with the original result, whose seq this client has already applied.
    if (event.type === "action.result" && !("unknown" in event)) {
      const result = event as ActionResultMessage;
      const actionId = result.payload.action_id;
      if (this.#actions.delete(actionId)) {
        out.push({ type: "actionDone", actionId, result }, ...this.due());
      }
    }
    const last = this.#lastSeq ?? 0;
    if (event.seq <= last) return out; // a duplicate
    if (event.seq !== last + 1) {
      out.push(...this.#resync({ reason: "gap", expected: last + 1, got: event.seq }));
      return out;
    }
    this.#lastSeq = event.seq;
    const before = this.#state;
    if (before !== null) {
      if ("unknown" in event) {
        const state = { ...before, lastSeq: event.seq };
        this.#state = state;
        out.push(emit("event", event), { type: "publish", state }, emit("state", state));
      } else {
        this.#apply(before, event, out);
      }
    }
    if (this.#catchUpTo !== null && event.seq >= this.#catchUpTo) {
      this.#catchUpTo = null;
      out.push(FLUSH);
    }
    return out;
  }

  #apply(before: PartySnapshot, event: PartyEvent, out: Output[]): void {
    let state = applyEvent(before, event);
    if (event.type === "vote.update") {
      const mine = this.#votes.findIndex((v) => v.request.traceId === event.trace_id);
      const vote = this.#votes[mine];
      if (vote !== undefined) {
        this.#votes.splice(mine, 1);
        state = withOwnBallot(state, vote.request.voteId, vote.request.option);
        out.push({ type: "voteDone", traceId: vote.request.traceId, update: event });
      }
    }
    this.#state = state;
    // `event` listeners still see the state before the event; all the others see it after.
    out.push(emit("event", event), { type: "publish", state });
    switch (event.type) {
      case "party.join":
        out.push(
          emit("presence", {
            kind: "join",
            characterId: event.payload.character_id,
            displayName: event.payload.display_name,
            members: state.members,
          }),
        );
        break;
      case "party.leave": {
        const who = before.members.find((m) => m.character_id === event.payload.character_id);
        out.push(
          emit("presence", {
            kind: "leave",
            characterId: event.payload.character_id,
            displayName: who?.display_name ?? event.payload.character_id,
            reason: event.payload.reason,
            members: state.members,
          }),
        );
        break;
      }
      case "scene.update":
        out.push(emit("scene", event.payload));
        break;
      case "combat.update":
        out.push(emit("combat", event.payload));
        break;
      case "party.state":
        out.push(emit("partyState", event.payload));
        break;
      case "vote.started":
      case "vote.update":
        out.push(
          emit("vote", {
            kind: event.type === "vote.started" ? "started" : "update",
            vote: state.vote,
          }),
        );
        break;
      case "vote.finished":
        out.push(emit("vote", { kind: "finished", vote: state.vote, result: event.payload }));
        break;
      case "action.result":
        out.push(emit("actionResult", event));
        break;
    }
    out.push(emit("state", state));
  }

  // --- sending -----------------------------------------------------------------------------------

  /**
   * The requests due on the current connection, once it is live and caught up: the oldest
   * unanswered action unless it went out on this connection already, and every ballot not cast on
   * it yet. Marks them sent: the shell calls this when it meets a `flush`.
   */
  due(): Output[] {
    const state = this.#state;
    if (!this.#socket || state === null || this.#helloOn !== this.#connection) return [];
    if (this.#catchUpTo !== null) return [];
    const out: Output[] = [];
    const connection = this.#connection;
    // One action in flight at a time: the oldest unanswered one.
    const head = this.#actions.values().next();
    if (!head.done && head.value.sentOn !== connection) {
      const { request } = head.value;
      head.value.sentOn = connection;
      const message = {
        type: "action.request",
        trace_id: request.traceId,
        payload: {
          action_id: request.actionId,
          character_id: state.you,
          campaign_run_id: state.campaignRunId,
          action_type: request.type,
          payload: request.payload,
        },
      } as ActionRequestMessage;
      out.push({ type: "send", message });
    }
    for (const vote of this.#votes) {
      if (vote.sentOn === connection) continue;
      vote.sentOn = connection;
      const { voteId, option, traceId } = vote.request;
      out.push({
        type: "send",
        message: { type: "vote.cast", trace_id: traceId, payload: { vote_id: voteId, option } },
      });
    }
    return out;
  }
}
