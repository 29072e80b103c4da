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
 *   answers a repeated `action_id` with its result as a repeat, a seq at or below the last), a `system.error` about it too,
 *   except `action_in_flight` (the first attempt is still running: keep waiting);
 * - `leave()` sends `party.leave` on the live connection, or (offline) on the next one once it has
 *   caught up, and again on every later one until the server's 1000 stops the client (`left`);
 *   no 1000 within `LEAVE_WAIT_MS` drops the link and reconnects to say it again;
 * - after a close: 1000 and 1008 stop, 4001 fetches a fresh token (or stops without a hook),
 *   4004 (an operator's disconnect) reconnects after half to all of the backoff's cap, anything
 *   else after `fullJitterDelay(attempt)`; a hello resets the attempt count;
 *   failed handshakes in a row (a browser cannot see the HTTP 401 of a refused token) fetch a
 *   fresh token too;
 * - a handshake that failed (closed with 1006 before any hello) is probed when the shell can
 *   (`probeHandshakes`): the shell asks the same URL over HTTP and says the status it got. 401
 *   fetches a fresh token once (with a hook), else stops (`unauthorized`); a 403 with a
 *   `Retry-After` (an operator's block until a time, up to a day) tries again then; 403, 404 and
 *   410 stop (`refused`); anything else changes nothing (the reconnect is already armed): 400 and 426 say
 *   only that a plain GET is not a WebSocket request, 408, 429 and 5xx pass;
 * - the transient messages (`action.accepted`, `action.failed`, `narration.delta`: no seq, never
 *   replayed) update the actions in flight and the narration streams (`live.ts`); every hello
 *   replaces both with its own (`actions_in_flight`, `narration`).
 */
import { DEFAULT_BACKOFF_BASE_MS, DEFAULT_BACKOFF_CAP_MS, fullJitterDelay } from "./backoff.js";
import type { ClosedReason } from "./errors.js";
import {
  applyDelta,
  dropActionNarration,
  RecentIds,
  restateNarration,
  withAccepted,
  withoutAction,
  type Narration,
  type NarrationChange,
} from "./live.js";
import type {
  ConnectionChange,
  ConnectionStatus,
  PartySyncEvents,
  ResyncInfo,
  TokenReason,
} from "./events.js";
import {
  isSequenced,
  isTransientType,
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
  NarrationDeltaPayload,
  PartyEvent,
  SystemErrorMessage,
  SystemHelloMessage,
  TransientMessage,
  VoteUpdateMessage,
} from "./types.js";

export const CLOSE_NORMAL = 1000;
export const CLOSE_POLICY = 1008;
export const CLOSE_TOKEN_EXPIRED = 4001;
export const CLOSE_RESYNC = 4003;
/** An operator disconnected this character: reconnect, but not at once. */
export const CLOSE_OPERATOR = 4004;
/** What a browser reports for a connection that failed, a refused handshake included. */
export const CLOSE_ABNORMAL = 1006;
/** The code this client closes with when it drops a connection to resync. */
export const CLIENT_CLOSE_RESYNC = 4000;
/**
 * After a `party.leave` went out, how long to wait for the server's 1000 before taking the link
 * for dead: it is dropped and the leave is said again on the next connection.
 */
export const LEAVE_WAIT_MS = 5000;

/**
 * The longest `Retry-After` of a 403 (an operator's block until a time) the client waits for
 * before it tries again; a longer one stops it (`refused`) as a 403 without one does.
 */
export const MAX_BLOCK_WAIT_MS = 24 * 3600 * 1000;

/** Statuses of a probed handshake that stop the client (`refused`): forbidden, no such endpoint. */
const REFUSED_STATUSES: ReadonlySet<number> = new Set([403, 404, 410]);

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
  /**
   * The handshake of `connection` failed: ask its URL over HTTP and call
   * `probed(connection, status)` with the status (null if no answer).
   */
  | { type: "probe"; connection: number }
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
  /** An action larger than the server's limit (the hello's): failed without being sent. */
  | { type: "actionTooLarge"; actionId: string; traceId: string; size: number; limit: number }
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
/** Measures an action's encoded size against the hello's `limits.max_message_bytes`. */
const UTF8 = new TextEncoder();

export const CONNECTION_OUTPUTS: ReadonlySet<Output["type"]> = new Set([
  "status",
  "send",
  "flush",
  "open",
  "probe",
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
  /** Whether the shell can learn a failed handshake's HTTP status (`probe` outputs). */
  probeHandshakes?: boolean | undefined;
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
  readonly #probe: boolean;

  #token: string | null;
  /** The token the current connection was dialled with. */
  #dialledWith: string | null = null;
  /** The last failed handshake probed: its connection and the token it was refused with. */
  #probing: { connection: number; token: string | null } | null = null;
  /** Tokens fetched because one was refused, since the last hello. */
  #rejectedRefreshes = 0;
  #tokenReason: TokenReason | null;
  /** The "rejected" reason is only a guess from failed handshakes (no 401 was seen). */
  #rejectionGuessed = false;
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
  #serverWait = false; // the armed reconnect waits as the server asked (4004): not cut short
  #resumeNext = true;
  /** `leave()` was called: a `party.leave` goes out on every connection until the server's 1000. */
  #leaving = false;
  /** The connection the `party.leave` was last sent on (0: never sent). */
  #leaveSentOn = 0;
  #epoch: string | null = null;
  #lastSeq: number | null = null;
  /** After a resumed hello: the seq the replay reaches; requests wait until then. */
  #catchUpTo: number | null = null;
  #state: PartySnapshot | null = null;
  readonly #actions = new Map<string, Pending<ActionRequest>>();
  readonly #votes: Array<Pending<BallotRequest>> = [];
  /**
   * Ballots never sent on a connection because a later one for the same vote was pending too
   * (cast offline, or before a reconnect): only the later one goes, and these settle with its
   * answer. Keyed by the trace id of the ballot that replaced them.
   */
  readonly #replaced = new Map<string, BallotRequest[]>();
  /** Streams this client dropped and actions it saw answered: a late repeat changes nothing. */
  readonly #finishedStreams = new RecentIds();
  readonly #settledActions = new RecentIds();

  constructor(options: StreamOptions) {
    this.#random = options.random;
    this.#canRefresh = options.canRefreshToken;
    this.#baseMs = options.baseMs ?? DEFAULT_BACKOFF_BASE_MS;
    this.#capMs = options.capMs ?? DEFAULT_BACKOFF_CAP_MS;
    this.#refreshAfter = Math.max(1, options.refreshTokenAfterFailures ?? 2);
    this.#probe = options.probeHandshakes ?? false;
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

  /**
   * `leave()`: say `party.leave` and wait for the server's 1000 (which stops the client as
   * `left`). Offline, it (re)connects and says it once the connection is live, like the Python
   * client: only the server's 1000 means the character left. Should the client stop for another
   * reason first (a refused handshake, 1008, `close()`), `closedReason` says which.
   */
  leave(): Output[] {
    if (this.#status === "closed") return [];
    this.#leaving = true;
    if (this.#socket && this.#helloOn === this.#connection && this.#state !== null) {
      return this.#sendLeave(this.#state.you);
    }
    // Not live: said by `due()` once the next connection has caught up with its hello.
    return this.#status === "idle" ? this.start() : [];
  }

  #sendLeave(you: string): Output[] {
    if (this.#leaveSentOn === this.#connection) return [];
    this.#leaveSentOn = this.#connection;
    this.#armed = "leave";
    const message: ClientMessage = { type: "party.leave", payload: { character_id: you } };
    return [
      { type: "send", message },
      { type: "arm", timer: "leave", delayMs: LEAVE_WAIT_MS },
    ];
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
    if (this.#tokenReason === "rejected") this.#rejectedRefreshes += 1;
    this.#token = token;
    this.#tokenReason = null;
    this.#rejectionGuessed = false;
    this.#failedHandshakes = 0;
  }

  /**
   * No token could be had: tell the application and try again later (`now` as in
   * `tokenRequest`). When the fresh token was wanted only because handshakes failed (the server
   * may just have been down: a browser cannot tell a refused connection from a refused token)
   * and the current token's `exp` has not passed, the next attempt dials with the current token,
   * and a fresh one is asked for again after as many failed handshakes: a sign-in that fails
   * (an old `initData`) never keeps a player with a good token out.
   */
  tokenFailed(error: unknown, now: number): Output[] {
    if (this.#status === "closed") return [];
    if (this.#tokenReason === "rejected" && this.#rejectionGuessed && this.#token !== null) {
      const expiry = tokenExpiry(this.#token);
      if (expiry === null || expiry > now) {
        this.#tokenReason = null;
        this.#rejectionGuessed = false;
        this.#failedHandshakes = 0;
      }
    }
    return [emit("tokenError", error), ...this.#scheduleReconnect({})];
  }

  /** A connection attempt starts now: the resume point to ask for, or null for a snapshot. */
  dial(): Position | null {
    this.#connection += 1;
    this.#socket = true;
    this.#dialledWith = this.#token;
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
    // Only the 1000 says the character left: after any other close a leave is said again.
    if (code === CLOSE_NORMAL) return this.#stop("left", undefined, code, reason);
    if (code === CLOSE_POLICY) return this.#stop("policy", undefined, code, reason);
    if (code === CLOSE_TOKEN_EXPIRED) {
      if (!this.#canRefresh) return this.#stop("token_expired", undefined, code, reason);
      this.#tokenReason = "expired";
    } else if (!hadHello) {
      this.#failedHandshakes += 1;
      if (this.#canRefresh && this.#failedHandshakes >= this.#refreshAfter) {
        if (this.#tokenReason !== "rejected") this.#rejectionGuessed = true;
        this.#tokenReason = "rejected";
      }
    }
    const out: Output[] = [];
    if (code === CLOSE_RESYNC) {
      this.#resumeNext = false;
      out.push(emit("resync", { reason: "server" }));
    }
    const longWait =
      code === CLOSE_OPERATOR ? Math.floor(this.#capMs * (0.5 + 0.5 * this.#random())) : null;
    out.push(...this.#scheduleReconnect({ code, reason }, longWait));
    if (this.#probe && !hadHello && code === CLOSE_ABNORMAL) {
      this.#probing = { connection: this.#connection, token: this.#dialledWith };
      out.push({ type: "probe", connection: this.#connection });
    }
    return out;
  }

  /**
   * The HTTP status the URL of `connection`'s failed handshake answered (`probe`), or null if
   * it could not be learnt. Ignored once a hello arrived on that connection or a later one.
   */
  probed(connection: number, status: number | null, retryAfterMs: number | null = null): Output[] {
    const probing = this.#probing;
    if (probing === null || probing.connection !== connection) return []; // a later one counts
    this.#probing = null;
    if (status === null || this.#status === "closed" || this.#helloOn >= connection) return [];
    if (status === 401) {
      if (this.#token !== probing.token) return []; // a fresh token is in use already
      if (this.#canRefresh && this.#rejectedRefreshes === 0) {
        this.#tokenReason = "rejected"; // the next attempt fetches a fresh one
        this.#rejectionGuessed = false; // a 401: the server said so
        return [];
      }
      return this.#stop("unauthorized", CLOSE_NORMAL, undefined, undefined, status);
    }
    // Only what the upgrade would have been answered too: 400 and 426 say "not a WebSocket
    // request" (the server would have taken this one), 408 and 429 pass.
    if (status === 403 && retryAfterMs !== null && retryAfterMs <= MAX_BLOCK_WAIT_MS) {
      // Refused until a time the server names (an operator's block, `Retry-After`): the next
      // attempt is made then, not never (browser probe: a player blocked for a minute was told
      // the link did not work, for good, until a reload).
      const wait = Math.max(0, retryAfterMs) + Math.floor(this.#random() * 1000);
      return this.#scheduleReconnect({ httpStatus: 403 }, wait);
    }
    if (REFUSED_STATUSES.has(status)) {
      return this.#stop("refused", CLOSE_NORMAL, undefined, undefined, status);
    }
    return [];
  }

  /** The timer armed last fell due. */
  timerFired(timer: Timer): Output[] {
    if (this.#armed !== timer || this.#status === "closed") return [];
    this.#armed = null;
    if (timer === "reconnect") return [{ type: "open" }];
    // No 1000 after the party.leave: take the link for dead and say the leave again.
    this.#socket = false;
    return [
      { type: "hangUp", code: CLOSE_NORMAL, reason: "leave unconfirmed" },
      ...this.#scheduleReconnect({ reason: "leave unconfirmed" }),
    ];
  }

  /**
   * Try the reconnect now instead of at the end of its backoff (the network is back: the page's
   * `online` event). Nothing if no reconnect waits, or if the wait is the server's (after an
   * operator's disconnect, 4004).
   */
  retryNow(): Output[] {
    if (this.#armed !== "reconnect" || this.#status !== "reconnecting" || this.#serverWait) {
      return [];
    }
    this.#armed = null;
    return [{ type: "disarm" }, { type: "open" }];
  }

  #scheduleReconnect(
    info: { code?: number; reason?: string; httpStatus?: number },
    wait: number | null = null,
  ): Output[] {
    if (this.#status === "closed") return [];
    const delayMs =
      wait ?? fullJitterDelay(this.#attempt, this.#random, this.#baseMs, this.#capMs);
    this.#serverWait = wait !== null;
    this.#attempt += 1;
    const resume = this.#resumeNext && this.#epoch !== null;
    this.#armed = "reconnect";
    return [
      this.#setStatus("reconnecting", { ...info, delayMs, resume }),
      { type: "arm", timer: "reconnect", delayMs },
    ];
  }

  #stop(
    reason: ClosedReason,
    closeCode?: number,
    code?: number,
    text?: string,
    httpStatus?: number,
  ): Output[] {
    if (this.#status === "closed") return [];
    this.#armed = null;
    this.#socket = false;
    this.#closedReason = reason;
    const change: Partial<ConnectionChange> = { closedReason: reason };
    if (code !== undefined) change.code = code;
    if (text !== undefined) change.reason = text;
    if (httpStatus !== undefined) change.httpStatus = httpStatus;
    this.#actions.clear();
    this.#votes.length = 0;
    this.#replaced.clear();
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
    if (isTransientType(message.type) && !("unknown" in message)) {
      if (this.#helloOn !== this.#connection) return []; // before the hello: it restates them
      return this.#transient(message as TransientMessage);
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
    this.#rejectedRefreshes = 0;
    this.#resumeNext = true;
    // What is happening now is the hello's: its actions in flight and open streams replace ours.
    const restated = restateNarration(this.#state?.narration ?? [], p.narration);
    const changes = this.#finish(restated.changes);
    let state: PartySnapshot;
    if (resumed && this.#state !== null) {
      state = {
        ...this.#state,
        limits: { ...p.limits },
        actionsInFlight: p.actions_in_flight.map((a) => ({ ...a })),
        narration: restated.narration,
      };
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
      emit("inFlight", state.actionsInFlight),
      ...changes.map((change) => emit("narration", change)),
      emit("state", state),
      { type: "ready" },
      FLUSH,
    ];
  }

  /** Remember the streams `changes` remove (a late piece must not bring one back). */
  #finish(changes: NarrationChange[]): NarrationChange[] {
    for (const change of changes) {
      if (change.kind === "remove") this.#finishedStreams.add(change.stream.streamId);
    }
    return changes;
  }

  /** The `remove` changes of the streams in `before` that are no longer in `after`. */
  #removed(before: readonly Narration[], after: readonly Narration[]): NarrationChange[] {
    if (before === after) return [];
    const kept = new Set(after.map((s) => s.streamId));
    return this.#finish(
      before
        .filter((s) => !kept.has(s.streamId))
        .map((stream) => ({ kind: "remove" as const, stream, piece: "" })),
    );
  }

  #transient(message: TransientMessage): Output[] {
    const before = this.#state;
    if (before === null) return [];
    let state: PartySnapshot;
    const out: Output[] = [];
    switch (message.type) {
      case "narration.delta":
        return this.#delta(before, message.payload);
      case "action.accepted": {
        const actionId = message.payload.action_id;
        if (this.#settledActions.has(actionId)) return []; // late: its answer came already
        const actionsInFlight = withAccepted(before.actionsInFlight, message.payload);
        if (actionsInFlight === before.actionsInFlight) return []; // a repeat
        state = { ...before, actionsInFlight };
        out.push(emit("actionAccepted", message), { type: "publish", state });
        out.push(emit("inFlight", actionsInFlight));
        break;
      }
      case "action.failed": {
        const actionId = message.payload.action_id;
        this.#settledActions.add(actionId);
        const actionsInFlight = withoutAction(before.actionsInFlight, actionId);
        const narration = dropActionNarration(before.narration, actionId).narration;
        state = { ...before, actionsInFlight, narration };
        out.push(emit("actionFailed", message), { type: "publish", state });
        if (actionsInFlight !== before.actionsInFlight) out.push(emit("inFlight", actionsInFlight));
        out.push(...this.#removed(before.narration, narration).map((c) => emit("narration", c)));
        break;
      }
    }
    this.#state = state;
    out.push(emit("state", state));
    return out;
  }

  #delta(before: PartySnapshot, delta: NarrationDeltaPayload): Output[] {
    const applied = applyDelta(before.narration, delta, (id) => this.#finishedStreams.has(id));
    const change = applied.change;
    if (change === null) return [];
    const changes: NarrationChange[] = [change];
    let narration = applied.narration;
    const actionId = change.stream.actionId;
    if (
      change.kind === "done" &&
      actionId !== undefined &&
      this.#settledActions.has(actionId) &&
      !before.actionsInFlight.some((a) => a.action_id === actionId)
    ) {
      // Its action's final answer came before its last piece: nothing more to wait for.
      narration = narration.filter((s) => s.streamId !== change.stream.streamId);
      changes.push(...this.#finish([{ kind: "remove", stream: change.stream, piece: "" }]));
    }
    const state: PartySnapshot = { ...before, narration };
    this.#state = state;
    return [
      { type: "publish", state },
      ...changes.map((c) => emit("narration", c)),
      emit("state", state),
    ];
  }

  #error(error: SystemErrorMessage): Output[] {
    const out: Output[] = [emit("error", error)];
    const p = error.payload;
    // An error about an action.request whose action_id the server could not read (it broke the
    // schema) names it by the request's trace_id only: matched so, it settles that action
    // instead of leaving it, and every action behind it, waiting for ever (clients probe).
    const actionId =
      p.in_reply_to.action_id ??
      (p.in_reply_to.type === "action.request" && p.in_reply_to.trace_id !== null
        ? this.#actionByTrace(p.in_reply_to.trace_id)
        : undefined);
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
        for (const old of this.#takeReplaced(traceId)) {
          out.push({ type: "voteFailed", traceId: old.traceId, error });
        }
      }
    }
    return out;
  }

  /** The pending action sent with `traceId`, if any. */
  #actionByTrace(traceId: string): string | undefined {
    for (const [actionId, pending] of this.#actions) {
      if (pending.request.traceId === traceId) return actionId;
    }
    return undefined;
  }

  /** The ballots the one with `traceId` replaced (they settle with its answer). */
  #takeReplaced(traceId: string): BallotRequest[] {
    const behind = this.#replaced.get(traceId) ?? [];
    this.#replaced.delete(traceId);
    return behind;
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
    if (event.type === "action.result") this.#settledActions.add(event.payload.action_id);
    let state = applyEvent(before, event);
    if (event.type === "vote.update") {
      const mine = this.#votes.findIndex((v) => v.request.traceId === event.trace_id);
      const vote = this.#votes[mine];
      if (vote !== undefined) {
        this.#votes.splice(mine, 1);
        state = withOwnBallot(state, vote.request.voteId, vote.request.option);
        out.push({ type: "voteDone", traceId: vote.request.traceId, update: event });
        for (const old of this.#takeReplaced(vote.request.traceId)) {
          out.push({ type: "voteDone", traceId: old.traceId, update: event });
        }
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
    if (state.actionsInFlight !== before.actionsInFlight) {
      out.push(emit("inFlight", state.actionsInFlight));
    }
    for (const change of this.#removed(before.narration, state.narration)) {
      out.push(emit("narration", change));
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
    for (;;) {
      const head = this.#actions.values().next();
      if (head.done || head.value.sentOn === connection) break;
      const { request } = head.value;
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
      const size = UTF8.encode(JSON.stringify(message)).length;
      if (size > state.limits.max_message_bytes) {
        // One the server could never take (over 4x its limit it closes the connection, and the
        // resend after each reconnect was closed again, for ever): failed here, as the server
        // says it of one under that bound, and the next action goes out.
        this.#actions.delete(request.actionId);
        const limit = state.limits.max_message_bytes;
        const { actionId, traceId } = request;
        out.push({ type: "actionTooLarge", actionId, traceId, size, limit });
        continue;
      }
      head.value.sentOn = connection;
      out.push({ type: "send", message });
      break;
    }
    // One ballot per vote: a later one for the same vote replaces those not sent on this
    // connection (the server counts the last ballot only; sending them all after a reconnect
    // would only spend the character's ballots, or make refusals: vote_closed, say).
    const latest = new Map<string, Pending<BallotRequest>>();
    for (const vote of this.#votes) latest.set(vote.request.voteId, vote);
    for (let i = this.#votes.length - 1; i >= 0; i--) {
      const vote = this.#votes[i]!;
      const last = latest.get(vote.request.voteId)!;
      if (vote === last || vote.sentOn === connection) continue;
      this.#votes.splice(i, 1);
      const behind = this.#replaced.get(last.request.traceId) ?? [];
      behind.unshift(vote.request, ...(this.#replaced.get(vote.request.traceId) ?? []));
      this.#replaced.delete(vote.request.traceId);
      this.#replaced.set(last.request.traceId, behind);
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
    if (this.#leaving) out.push(...this.#sendLeave(state.you));
    return out;
  }
}
