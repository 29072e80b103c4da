/**
 * `PartySyncClient`: one player's connection to one party of party_sync (docs/protocol.md).
 *
 * What it takes care of:
 * - connecting with a token, or with a `getToken()` hook called on the first connect, when the
 *   server closes with 4001 (token expired), when the token's `exp` has passed, and when
 *   handshakes keep failing (a browser cannot see the HTTP 401 of a refused token);
 * - reconnecting with exponential backoff and full jitter, except after 1000 (left) and 1008
 *   (policy), where it stops;
 * - resuming: it remembers the epoch and the last seq it applied and reconnects with
 *   `epoch`/`last_seq`; a resumed hello keeps the local state and the replay is applied as usual;
 *   a snapshot hello replaces it;
 * - sequencing: an event with `seq == last + 1` is applied, `seq <= last` is a duplicate (ignored),
 *   `seq > last + 1` is a gap: the client drops the connection and resyncs (reconnects without
 *   resuming, for a fresh snapshot); close code 4003 does the same;
 * - actions: `sendAction()` makes the `action_id`, sends one action at a time (the server allows
 *   one in flight per character) and resolves with its `action.result` (or rejects with the
 *   `system.error` about it). After a reconnect the unanswered action is sent again with the same
 *   `action_id`: the server answers a finished one with its original result (a duplicate seq,
 *   still matched) and an in-flight one with `action_in_flight` (the client keeps waiting);
 * - votes: `castVote()` resolves with the `vote.update` the ballot caused; unconfirmed ballots are
 *   cast again after a reconnect (the latest ballot counts, so a repeat is harmless);
 * - the party's state (`state`) and typed events for presence, scene, combat, votes, action
 *   results, errors and the connection.
 */
import {
  DEFAULT_BACKOFF_BASE_MS,
  DEFAULT_BACKOFF_CAP_MS,
  fullJitterDelay,
  type BackoffOptions,
} from "./backoff.js";
import { Emitter } from "./emitter.js";
import { ClientClosedError, PartySyncError, type ClosedReason } from "./errors.js";
import {
  isSequenced,
  parseServerMessage,
  ProtocolParseError,
  type UnknownPartyEvent,
  type UnknownServerMessage,
} from "./parse.js";
import { applyEvent, fromHello, withOwnBallot, type OpenVote, type PartySnapshot } from "./state.js";
import type {
  ActionRequestMessage,
  ActionResultMessage,
  ActionType,
  ClientMessage,
  Combat,
  Member,
  PartyEvent,
  PartyState,
  Scene,
  SystemErrorMessage,
  SystemHelloMessage,
  VoteFinishedPayload,
  VoteUpdateMessage,
} from "./types.js";

// --- the environment, injectable for tests -------------------------------------------------------

/** The part of a WebSocket the client uses (the browser's `WebSocket` fits). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: never) => unknown) | null;
  onmessage: ((event: never) => unknown) | null;
  onerror: ((event: never) => unknown) | null;
  onclose: ((event: never) => unknown) | null;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface Timers {
  setTimeout(callback: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

const defaultTimers: Timers = {
  setTimeout: (callback, ms) => globalThis.setTimeout(callback, ms),
  clearTimeout: (handle) => globalThis.clearTimeout(handle as ReturnType<typeof setTimeout>),
};

/** A random UUID v4: `crypto.randomUUID()`, or `getRandomValues` outside secure contexts. */
export function randomId(): string {
  const c = globalThis.crypto;
  if (typeof c?.randomUUID === "function") return c.randomUUID();
  const bytes = new Uint8Array(16);
  c.getRandomValues(bytes);
  bytes[6] = ((bytes[6] ?? 0) & 0x0f) | 0x40;
  bytes[8] = ((bytes[8] ?? 0) & 0x3f) | 0x80;
  const hex = [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
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

// --- options and events ------------------------------------------------------------------------

/** Why `getToken` is called. */
export type TokenReason =
  /** The first connection (no `token` option given). */
  | "initial"
  /** The server closed with 4001, or the token's `exp` has passed. */
  | "expired"
  /** Handshakes kept failing before any hello: the token may have been refused (HTTP 401). */
  | "rejected";

export interface PartySyncClientOptions {
  /** The WebSocket endpoint, e.g. `wss://game.example/ws` (the token is added as `?token=`). */
  url: string | URL;
  /** A connection token (JWT) to start with. */
  token?: string;
  /** Fetches a fresh token; required when no `token` is given. */
  getToken?: (reason: TokenReason) => string | Promise<string>;
  /** Reconnect backoff: full jitter between 0 and min(cap, base · 2^attempt). */
  backoff?: BackoffOptions;
  /** Consecutive failed handshakes after which the token is fetched again (default 2). */
  refreshTokenAfterFailures?: number;
  /** Injectable for tests: the WebSocket class (default: the global one). */
  WebSocket?: WebSocketConstructor;
  /** Injectable for tests: a number in [0, 1) (default Math.random). */
  random?: () => number;
  /** Injectable for tests: setTimeout/clearTimeout. */
  timers?: Timers;
  /** Injectable for tests: the clock in milliseconds (default Date.now). */
  now?: () => number;
  /** Injectable for tests: makes action ids and trace ids (default crypto.randomUUID). */
  makeId?: () => string;
}

export type ConnectionStatus =
  /** Not started (`connect()` not called yet). */
  | "idle"
  /** The first connection is being made. */
  | "connecting"
  /** Connected: the hello arrived, events flow. */
  | "open"
  /** The connection was lost; another attempt is scheduled (`delayMs`) or under way. */
  | "reconnecting"
  /** Stopped for good (`closedReason` says why). */
  | "closed";

export interface ConnectionChange {
  status: ConnectionStatus;
  /** Consecutive failed attempts since the last successful connection. */
  attempt: number;
  /** When `reconnecting`: the delay before the next attempt, in milliseconds. */
  delayMs?: number;
  /** The close code that caused this change, if any. */
  code?: number;
  reason?: string;
  /** Whether the next (or current) connection asks to resume. */
  resume?: boolean;
  /** When `closed`: why. */
  closedReason?: ClosedReason;
}

export interface HelloInfo {
  message: SystemHelloMessage;
  /** true: a resume (the local state was kept; missed events follow). false: a new snapshot. */
  resumed: boolean;
}

export interface PresenceChange {
  kind: "join" | "leave";
  characterId: string;
  displayName: string;
  /** For a leave: `left` (removed from the roster), `disconnected` or `expired` (offline). */
  reason?: "left" | "disconnected" | "expired";
  members: readonly Member[];
}

export interface VoteChange {
  kind: "started" | "update" | "finished";
  /** The open vote after this event (null once finished). */
  vote: OpenVote | null;
  /** For `finished`: the result. */
  result?: VoteFinishedPayload;
}

export interface ResyncInfo {
  /** `gap`: an event skipped a seq; `server`: close code 4003; `mismatch`: a resume the client
   *  did not ask for. */
  reason: "gap" | "server" | "mismatch";
  expected?: number;
  got?: number;
}

export interface PartySyncEvents {
  connection: ConnectionChange;
  hello: HelloInfo;
  /** Every party event applied, in seq order (duplicates are not repeated here). Emitted just
   *  before the event is applied: `client.state` is still the state before it. */
  event: PartyEvent | UnknownPartyEvent;
  presence: PresenceChange;
  scene: Scene;
  combat: Combat;
  partyState: PartyState;
  vote: VoteChange;
  /** Every applied action.result, whoever acted. */
  actionResult: ActionResultMessage;
  /** Every system.error this connection received. */
  error: SystemErrorMessage;
  /** The party state after every change (a new object each time). */
  state: PartySnapshot;
  resync: ResyncInfo;
  /** A frame the client could not parse (it is ignored). */
  protocolError: ProtocolParseError;
  /** `getToken` failed (the client retries with backoff). */
  tokenError: unknown;
}

/** The `payload` of each action type (the reference engine's; others may take more keys). */
export interface ActionPayloads {
  choice: { option: string; [key: string]: unknown };
  combat: { move?: "attack" | "defend"; target?: string; [key: string]: unknown };
  skill_check: { skill?: string; [key: string]: unknown };
}

export interface SendActionOptions {
  /** Reuse an action id (e.g. to retry an action refused with a retryable error). */
  actionId?: string;
  traceId?: string;
}

interface PendingAction {
  actionId: string;
  type: ActionType;
  payload: Record<string, unknown>;
  traceId: string;
  /** The connection generation it was last sent on (0: never sent). */
  sentOn: number;
  resolve: (result: ActionResultMessage) => void;
  reject: (error: Error) => void;
}

interface PendingVote {
  voteId: string;
  option: string;
  traceId: string;
  sentOn: number;
  resolve: (update: VoteUpdateMessage) => void;
  reject: (error: Error) => void;
}

const CLOSE_NORMAL = 1000;
const CLOSE_POLICY = 1008;
const CLOSE_TOKEN_EXPIRED = 4001;
const CLOSE_RESYNC = 4003;
/** The code this client closes with when it drops a connection to resync. */
export const CLIENT_CLOSE_RESYNC = 4000;
const OPEN = 1;

export class PartySyncClient extends Emitter<PartySyncEvents> {
  readonly #url: URL;
  readonly #getToken: ((reason: TokenReason) => string | Promise<string>) | undefined;
  readonly #WebSocket: WebSocketConstructor;
  readonly #random: () => number;
  readonly #timers: Timers;
  readonly #now: () => number;
  readonly #makeId: () => string;
  readonly #baseMs: number;
  readonly #capMs: number;
  readonly #refreshAfter: number;

  #token: string | null;
  #tokenReason: TokenReason | null;
  #status: ConnectionStatus = "idle";
  #closedReason: ClosedReason | null = null;
  #ws: WebSocketLike | null = null;
  /** Connection generation: bumped for every attempt; stale callbacks compare and bail out. */
  #generation = 0;
  #helloOn = 0;
  #attempt = 0;
  #failedHandshakes = 0;
  #timer: unknown = null;
  #resumeNext = true;
  #epoch: string | null = null;
  #lastSeq: number | null = null;
  /** After a resumed hello: the seq the replay reaches; pending requests wait until then. */
  #catchUpTo: number | null = null;
  #state: PartySnapshot | null = null;
  readonly #actions = new Map<string, PendingAction>();
  readonly #votes: PendingVote[] = [];
  #connectWaiters: Array<{ resolve: () => void; reject: (e: Error) => void }> = [];
  #leaveWaiters: Array<() => void> = [];
  #leaving = false;

  constructor(options: PartySyncClientOptions) {
    super();
    if (options.token === undefined && options.getToken === undefined) {
      throw new TypeError("PartySyncClient needs a token or a getToken hook");
    }
    const WS =
      options.WebSocket ??
      (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket ??
      undefined;
    if (WS === undefined) throw new TypeError("no WebSocket: pass options.WebSocket");
    this.#url = new URL(options.url);
    this.#getToken = options.getToken;
    this.#token = options.token ?? null;
    this.#tokenReason = options.token === undefined ? "initial" : null;
    this.#WebSocket = WS;
    this.#random = options.random ?? Math.random;
    this.#timers = options.timers ?? defaultTimers;
    this.#now = options.now ?? Date.now;
    this.#makeId = options.makeId ?? randomId;
    this.#baseMs = options.backoff?.baseMs ?? DEFAULT_BACKOFF_BASE_MS;
    this.#capMs = options.backoff?.capMs ?? DEFAULT_BACKOFF_CAP_MS;
    this.#refreshAfter = Math.max(1, options.refreshTokenAfterFailures ?? 2);
  }

  // --- public API --------------------------------------------------------------------------------

  /** The connection status. */
  get status(): ConnectionStatus {
    return this.#status;
  }

  /** Why the client stopped, once `status` is `closed`. */
  get closedReason(): ClosedReason | null {
    return this.#closedReason;
  }

  /** The party state (null before the first hello). */
  get state(): PartySnapshot | null {
    return this.#state;
  }

  /** Where a resume would start: the epoch and the last seq applied. */
  get position(): { epoch: string; lastSeq: number } | null {
    return this.#epoch === null || this.#lastSeq === null
      ? null
      : { epoch: this.#epoch, lastSeq: this.#lastSeq };
  }

  /** Actions sent or queued and not answered yet. */
  get pendingActions(): number {
    return this.#actions.size;
  }

  /**
   * Start connecting (and keep reconnecting). Resolves at the next `system.hello`; rejects if the
   * client stops for good first.
   */
  connect(): Promise<void> {
    if (this.#status === "closed") {
      return Promise.reject(new ClientClosedError(this.#closedReason ?? "closed"));
    }
    const ready = new Promise<void>((resolve, reject) => {
      if (this.#status === "open") resolve();
      else this.#connectWaiters.push({ resolve, reject });
    });
    if (this.#status === "idle") {
      this.#setStatus("connecting", { resume: false });
      void this.#open();
    }
    return ready;
  }

  /**
   * Send a player action; resolves with its `action.result`, rejects with a `PartySyncError`
   * (the `system.error` about it) or a `ClientClosedError`. Actions are sent one at a time, in
   * order; one made while disconnected waits for the connection.
   */
  sendAction<T extends ActionType>(
    type: T,
    payload: ActionPayloads[T],
    options: SendActionOptions = {},
  ): Promise<ActionResultMessage> {
    if (this.#status === "closed") {
      return Promise.reject(new ClientClosedError(this.#closedReason ?? "closed"));
    }
    const actionId = options.actionId ?? this.#makeId();
    if (this.#actions.has(actionId)) {
      return Promise.reject(new Error(`action ${actionId} is already pending`));
    }
    return new Promise<ActionResultMessage>((resolve, reject) => {
      this.#actions.set(actionId, {
        actionId,
        type,
        payload: { ...payload },
        traceId: options.traceId ?? this.#makeId(),
        sentOn: 0,
        resolve,
        reject,
      });
      this.#pump();
    });
  }

  /** Vote for `option` in the open vote `voteId`; resolves with the `vote.update` it caused. */
  castVote(voteId: string, option: string): Promise<VoteUpdateMessage> {
    if (this.#status === "closed") {
      return Promise.reject(new ClientClosedError(this.#closedReason ?? "closed"));
    }
    return new Promise<VoteUpdateMessage>((resolve, reject) => {
      this.#votes.push({ voteId, option, traceId: this.#makeId(), sentOn: 0, resolve, reject });
      this.#pump();
    });
  }

  /**
   * Leave the party for good (`party.leave`): the server removes this character from the roster
   * and closes with 1000. Resolves once closed; the client does not reconnect.
   */
  leave(): Promise<void> {
    if (this.#status === "closed") return Promise.resolve();
    const done = new Promise<void>((resolve) => this.#leaveWaiters.push(resolve));
    this.#leaving = true;
    const ws = this.#ws;
    if (ws !== null && this.#helloOn === this.#generation && this.#state !== null) {
      this.#send({ type: "party.leave", payload: { character_id: this.#state.you } });
      // The server closes with 1000; should it not, stop anyway after a while.
      this.#clearTimer();
      this.#timer = this.#timers.setTimeout(() => this.#stop("left", CLOSE_NORMAL), 5000);
    } else {
      this.#stop("left");
    }
    return done;
  }

  /** Disconnect and stop (without leaving the party: it sees this character go offline). */
  close(): void {
    this.#stop("closed", CLOSE_NORMAL);
  }

  // --- connecting --------------------------------------------------------------------------------

  async #open(): Promise<void> {
    const generation = ++this.#generation;
    let token: string;
    try {
      token = await this.#currentToken();
    } catch (error) {
      if (generation !== this.#generation || this.#status === "closed") return;
      this.emit("tokenError", error);
      this.#scheduleReconnect({});
      return;
    }
    if (generation !== this.#generation || this.#status === "closed") return;
    const url = new URL(this.#url);
    url.searchParams.set("token", token);
    const resume = this.#resumeNext && this.#epoch !== null && this.#lastSeq !== null;
    if (resume) {
      url.searchParams.set("epoch", this.#epoch ?? "");
      url.searchParams.set("last_seq", String(this.#lastSeq));
    }
    let ws: WebSocketLike;
    try {
      ws = new this.#WebSocket(url.toString());
    } catch {
      this.#failedHandshakes += 1;
      this.#scheduleReconnect({});
      return;
    }
    this.#ws = ws;
    ws.onmessage = ((event: { data: unknown }) => {
      if (this.#ws === ws) this.#onFrame(event.data, generation);
    }) as (event: never) => unknown;
    ws.onclose = ((event: { code?: number; reason?: string }) => {
      if (this.#ws !== ws) return;
      this.#ws = null;
      this.#onClose(event.code ?? 1006, event.reason ?? "", generation);
    }) as (event: never) => unknown;
    ws.onerror = null; // a close event always follows an error
    ws.onopen = null; // the hello, not the upgrade, makes a connection usable
  }

  async #currentToken(): Promise<string> {
    let reason = this.#tokenReason;
    if (reason === null && this.#token !== null && this.#getToken !== undefined) {
      const expiry = tokenExpiry(this.#token);
      if (expiry !== null && expiry <= this.#now()) reason = "expired";
    }
    if (reason !== null && this.#getToken !== undefined) {
      const token = await this.#getToken(reason);
      if (typeof token !== "string" || token === "") throw new Error("getToken gave no token");
      this.#token = token;
      this.#tokenReason = null;
      this.#failedHandshakes = 0;
    }
    if (this.#token === null) throw new Error("no token");
    return this.#token;
  }

  #scheduleReconnect(info: { code?: number; reason?: string }): void {
    if (this.#status === "closed") return;
    const delay = fullJitterDelay(this.#attempt, this.#random, this.#baseMs, this.#capMs);
    this.#attempt += 1;
    const resume = this.#resumeNext && this.#epoch !== null;
    this.#setStatus("reconnecting", { ...info, delayMs: delay, resume });
    this.#clearTimer();
    this.#timer = this.#timers.setTimeout(() => {
      this.#timer = null;
      void this.#open();
    }, delay);
  }

  #onClose(code: number, reason: string, generation: number): void {
    const hadHello = this.#helloOn === generation;
    if (this.#status === "closed") return;
    if (code === CLOSE_NORMAL || this.#leaving) {
      this.#stop("left", undefined, code, reason);
      return;
    }
    if (code === CLOSE_POLICY) {
      this.#stop("policy", undefined, code, reason);
      return;
    }
    if (code === CLOSE_TOKEN_EXPIRED) {
      if (this.#getToken === undefined) {
        this.#stop("token_expired", undefined, code, reason);
        return;
      }
      this.#tokenReason = "expired";
    } else if (!hadHello) {
      this.#failedHandshakes += 1;
      if (this.#getToken !== undefined && this.#failedHandshakes >= this.#refreshAfter) {
        this.#tokenReason = "rejected";
      }
    }
    if (code === CLOSE_RESYNC) {
      this.#resumeNext = false;
      this.emit("resync", { reason: "server" });
    }
    this.#scheduleReconnect({ code, reason });
  }

  #stop(reason: ClosedReason, closeCode?: number, code?: number, text?: string): void {
    if (this.#status === "closed") return;
    this.#clearTimer();
    const ws = this.#ws;
    this.#ws = null;
    this.#generation += 1;
    if (ws !== null && closeCode !== undefined) {
      try {
        ws.close(closeCode);
      } catch {
        // already closing
      }
    }
    this.#closedReason = reason;
    const change: Partial<ConnectionChange> = { closedReason: reason };
    if (code !== undefined) change.code = code;
    if (text !== undefined) change.reason = text;
    this.#setStatus("closed", change);
    const error = new ClientClosedError(reason);
    for (const action of this.#actions.values()) action.reject(error);
    this.#actions.clear();
    for (const vote of this.#votes.splice(0)) vote.reject(error);
    for (const waiter of this.#connectWaiters.splice(0)) waiter.reject(error);
    for (const resolve of this.#leaveWaiters.splice(0)) resolve();
  }

  #clearTimer(): void {
    if (this.#timer !== null) {
      this.#timers.clearTimeout(this.#timer);
      this.#timer = null;
    }
  }

  #setStatus(status: ConnectionStatus, details: Partial<ConnectionChange> = {}): void {
    this.#status = status;
    this.emit("connection", { status, attempt: this.#attempt, ...details });
  }

  /** Drop the connection and reconnect without resuming, for a fresh snapshot. */
  #resync(info: ResyncInfo): void {
    this.emit("resync", info);
    this.#resumeNext = false;
    const ws = this.#ws;
    this.#ws = null;
    this.#generation += 1;
    try {
      ws?.close(CLIENT_CLOSE_RESYNC, "resync");
    } catch {
      // already closing
    }
    this.#scheduleReconnect({ code: CLIENT_CLOSE_RESYNC, reason: info.reason });
  }

  // --- receiving ---------------------------------------------------------------------------------

  #onFrame(data: unknown, generation: number): void {
    let message: ReturnType<typeof parseServerMessage>;
    try {
      message = parseServerMessage(data);
    } catch (error) {
      if (error instanceof ProtocolParseError) {
        this.emit("protocolError", error);
        return;
      }
      throw error;
    }
    if (message.type === "system.hello" && !("unknown" in message)) {
      this.#onHello(message as SystemHelloMessage, generation);
    } else if (message.type === "system.error" && !("unknown" in message)) {
      this.#onError(message as SystemErrorMessage);
    } else if (isSequenced(message as PartyEvent | UnknownServerMessage)) {
      if (this.#helloOn !== generation) return; // events before the hello: not ours to apply
      this.#onEvent(message as PartyEvent | UnknownPartyEvent);
    }
  }

  #onHello(hello: SystemHelloMessage, generation: number): void {
    const p = hello.payload;
    const resumed =
      p.resumed === true &&
      this.#state !== null &&
      this.#epoch === p.epoch &&
      this.#lastSeq === p.resumed_from;
    if (p.resumed === true && !resumed) {
      this.#resync({ reason: "mismatch" });
      return;
    }
    this.#helloOn = generation;
    this.#attempt = 0;
    this.#failedHandshakes = 0;
    this.#resumeNext = true;
    if (resumed && this.#state !== null) {
      this.#state = { ...this.#state, limits: { ...p.limits } };
      this.#catchUpTo = p.seq > (this.#lastSeq ?? 0) ? p.seq : null;
    } else {
      this.#state = fromHello(p);
      this.#epoch = p.epoch;
      this.#lastSeq = p.seq;
      this.#catchUpTo = null;
      // A new snapshot: an own ballot is known from the hello; unconfirmed ones are re-cast.
    }
    this.#setStatus("open", { resume: resumed });
    this.emit("hello", { message: hello, resumed });
    this.emit("state", this.#state);
    for (const waiter of this.#connectWaiters.splice(0)) waiter.resolve();
    this.#pump();
  }

  #onError(error: SystemErrorMessage): void {
    this.emit("error", error);
    const p = error.payload;
    const actionId = p.in_reply_to.action_id;
    if (actionId !== undefined) {
      const pending = this.#actions.get(actionId);
      if (pending !== undefined && p.code !== "action_in_flight") {
        this.#actions.delete(actionId);
        pending.reject(new PartySyncError(error));
        this.#pump();
      }
      return;
    }
    const traceId = p.in_reply_to.trace_id;
    if (p.in_reply_to.type === "vote.cast" && traceId !== null) {
      const index = this.#votes.findIndex((v) => v.traceId === traceId);
      const vote = this.#votes[index];
      if (vote !== undefined) {
        this.#votes.splice(index, 1);
        vote.reject(new PartySyncError(error));
      }
    }
  }

  #onEvent(event: PartyEvent | UnknownPartyEvent): void {
    // A result for a pending action settles it whatever its seq: the server answers a repeated
    // action_id with the original result, whose seq this client has already applied.
    if (event.type === "action.result" && !("unknown" in event)) {
      this.#settleAction(event as ActionResultMessage);
    }
    const last = this.#lastSeq ?? 0;
    if (event.seq <= last) return; // a duplicate
    if (event.seq !== last + 1) {
      this.#resync({ reason: "gap", expected: last + 1, got: event.seq });
      return;
    }
    this.#lastSeq = event.seq;
    if (this.#state !== null) {
      if ("unknown" in event) {
        this.emit("event", event);
        this.#state = { ...this.#state, lastSeq: event.seq };
        this.emit("state", this.#state);
      } else {
        this.#apply(event);
      }
    }
    if (this.#catchUpTo !== null && event.seq >= this.#catchUpTo) {
      this.#catchUpTo = null;
      this.#pump();
    }
  }

  #apply(event: PartyEvent): void {
    const before = this.#state;
    if (before === null) return;
    let state = applyEvent(before, event);
    if (event.type === "vote.update") {
      const mine = this.#votes.findIndex((v) => v.traceId === event.trace_id);
      const vote = this.#votes[mine];
      if (vote !== undefined) {
        this.#votes.splice(mine, 1);
        state = withOwnBallot(state, vote.voteId, vote.option);
        vote.resolve(event);
      }
    }
    // `event` listeners still see the state before the event; all the others see it after.
    this.emit("event", event);
    this.#state = state;
    switch (event.type) {
      case "party.join":
        this.emit("presence", {
          kind: "join",
          characterId: event.payload.character_id,
          displayName: event.payload.display_name,
          members: state.members,
        });
        break;
      case "party.leave": {
        const who = before.members.find((m) => m.character_id === event.payload.character_id);
        this.emit("presence", {
          kind: "leave",
          characterId: event.payload.character_id,
          displayName: who?.display_name ?? event.payload.character_id,
          reason: event.payload.reason,
          members: state.members,
        });
        break;
      }
      case "scene.update":
        this.emit("scene", event.payload);
        break;
      case "combat.update":
        this.emit("combat", event.payload);
        break;
      case "party.state":
        this.emit("partyState", event.payload);
        break;
      case "vote.started":
      case "vote.update":
        this.emit("vote", { kind: event.type === "vote.started" ? "started" : "update", vote: state.vote });
        break;
      case "vote.finished":
        this.emit("vote", { kind: "finished", vote: state.vote, result: event.payload });
        break;
      case "action.result":
        this.emit("actionResult", event);
        break;
    }
    this.emit("state", state);
  }

  #settleAction(result: ActionResultMessage): void {
    const pending = this.#actions.get(result.payload.action_id);
    if (pending === undefined) return;
    this.#actions.delete(pending.actionId);
    pending.resolve(result);
    this.#pump();
  }

  // --- sending -----------------------------------------------------------------------------------

  /** Send what is due on the current connection, once it is live and caught up. */
  #pump(): void {
    const ws = this.#ws;
    const state = this.#state;
    if (ws === null || state === null || this.#helloOn !== this.#generation) return;
    if (this.#catchUpTo !== null || ws.readyState !== OPEN) return;
    const generation = this.#generation;
    // One action in flight at a time: the oldest unanswered one.
    const head = this.#actions.values().next();
    if (!head.done && head.value.sentOn !== generation) {
      const action = head.value;
      action.sentOn = generation;
      const message = {
        type: "action.request",
        trace_id: action.traceId,
        payload: {
          action_id: action.actionId,
          character_id: state.you,
          campaign_run_id: state.campaignRunId,
          action_type: action.type,
          payload: action.payload,
        },
      } as ActionRequestMessage;
      this.#send(message);
    }
    for (const vote of this.#votes) {
      if (vote.sentOn === generation) continue;
      vote.sentOn = generation;
      this.#send({
        type: "vote.cast",
        trace_id: vote.traceId,
        payload: { vote_id: vote.voteId, option: vote.option },
      });
    }
  }

  #send(message: ClientMessage): void {
    try {
      this.#ws?.send(JSON.stringify(message));
    } catch {
      // the connection is going away: its close event reconnects and sends again
    }
  }
}
