/**
 * `PartySyncClient`: one player's connection to one party of party_sync (docs/protocol.md).
 *
 * What it takes care of:
 * - connecting with a token, or with a `getToken()` hook called on the first connect, when the
 *   server closes with 4001 (token expired), when the token's `exp` has passed, and when
 *   handshakes keep failing (a browser cannot see the HTTP 401 of a refused token);
 * - a refused handshake: a browser's WebSocket reports only a failed connection (1006), so the
 *   client asks the same URL once over HTTP (`fetch`) to learn the status: 401 (a token refused)
 *   and 403 (refused) stop it with a reason the page can put in words, instead of retrying
 *   forever. Only a status the page can read counts: not across origins (the server adds no
 *   CORS headers), and not an `Origin` outside `allowed_origins` (a same-origin GET carries no
 *   `Origin`, so the probe gets 400): a page kept out by that list keeps reconnecting;
 * - reconnecting with exponential backoff and full jitter, except after 1000 (left) and 1008
 *   (policy), where it stops; after an operator's disconnect (4004) it waits long first;
 * - a link gone silent: a browser's WebSocket hides the server's pings, so after
 *   `pingIntervalMs` without a message the client sends a `system.ping` and, if nothing at all
 *   comes back within `pongTimeoutMs`, drops the connection and reconnects (resuming); a
 *   handshake with no answer within `connectTimeoutMs` is dropped too;
 * - resuming: it remembers the epoch and the last seq it applied and reconnects with
 *   `epoch`/`last_seq`; a resumed hello keeps the local state and the replay is applied as usual;
 *   a snapshot hello replaces it;
 * - sequencing: an event with `seq == last + 1` is applied, `seq <= last` is a duplicate (ignored),
 *   `seq > last + 1` is a gap: the client drops the connection and resyncs (reconnects without
 *   resuming, for a fresh snapshot); close code 4003 does the same;
 * - actions: `sendAction()` makes the `action_id`, sends one action at a time (the server allows
 *   one in flight per character) and resolves with its `action.result` (or rejects with the
 *   `system.error` about it). After a reconnect the unanswered action is sent again with the same
 *   `action_id`: the server answers a finished one with its result as a repeat (a seq at or below
 *   the last one: still matched, never applied) and an in-flight one with `action_in_flight` (the client keeps waiting);
 * - votes: `castVote()` resolves with the `vote.update` the ballot caused; unconfirmed ballots are
 *   cast again after a reconnect (the latest ballot counts, so a repeat is harmless);
 * - what is happening now: the actions in flight (`action.accepted` … `action.result` /
 *   `action.failed`) and the game master's live narration (`narration.delta`), each piece shown
 *   once, restated by the hello after a reconnect;
 * - the party's state (`state`) and typed events for presence, scene, combat, votes, action
 *   results, actions in flight, narration, errors and the connection.
 *
 * Those rules are decided by `ClientStream` (`stream.ts`), which does no I/O. This class is its
 * shell: it owns the WebSocket, the timer, the clock, the random source, the `getToken` hook and
 * the promises; it feeds the stream every input and carries out its outputs, in order.
 */
import type { BackoffOptions } from "./backoff.js";
import { Emitter } from "./emitter.js";
import { ClientClosedError, PartySyncError, type ClosedReason } from "./errors.js";
import type { ConnectionStatus, PartySyncEvents, TokenReason } from "./events.js";
import type { Narration } from "./live.js";
import type { PartySnapshot } from "./state.js";
import { ClientStream, CONNECTION_OUTPUTS, type Output, type Timer } from "./stream.js";
import type {
  ActionInFlight,
  ActionResultMessage,
  ActionType,
  ClientMessage,
  SystemErrorMessage,
  VoteUpdateMessage,
} from "./types.js";

export type {
  ConnectionChange,
  ConnectionStatus,
  HelloInfo,
  PartySyncEvents,
  PresenceChange,
  ResyncInfo,
  TokenReason,
  VoteChange,
} from "./events.js";
export { CLIENT_CLOSE_RESYNC, tokenExpiry } from "./stream.js";

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

/** The part of `fetch` the client uses to learn a failed handshake's HTTP status. */
export type FetchLike = (
  url: string,
  init: { method: "GET"; cache: "no-store"; credentials: "omit"; signal?: AbortSignal },
) => Promise<{ status: number; headers?: { get(name: string): string | null } }>;

/**
 * A `Retry-After` header's wait in milliseconds (RFC 9110 §10.2.3: delay-seconds or an
 * HTTP-date), or null when there is none or it cannot be read.
 */
export function retryAfter(value: string | null, now: number): number | null {
  if (value === null) return null;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  const at = Date.parse(text);
  return Number.isNaN(at) ? null : Math.max(0, at - now);
}

/** How long the client waits for the answer to a handshake probe. */
export const PROBE_TIMEOUT_MS = 5000;
/** Defaults of the liveness checks (`PartySyncClientOptions`). */
export const DEFAULT_PING_INTERVAL_MS = 20_000;
export const DEFAULT_PONG_TIMEOUT_MS = 10_000;
export const DEFAULT_CONNECT_TIMEOUT_MS = 15_000;

export interface Timers {
  setTimeout(callback: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

const defaultTimers: Timers = {
  setTimeout: (callback, ms) => globalThis.setTimeout(callback, ms),
  clearTimeout: (handle) => globalThis.clearTimeout(handle as ReturnType<typeof setTimeout>),
};

/**
 * Why `value` breaks the protocol's id rule (docs/protocol.md: the id alphabet, 1–64 characters;
 * a trace id up to 128), or null. An id breaking it is refused before it is sent: the server's
 * `schema_violation` could not name the request, and a huge one was resent after every 1009.
 */
function badId(name: string, value: string, most = 64): TypeError | null {
  if (value.length <= most && /^[A-Za-z0-9._:-]+$/.test(value)) return null;
  const shown = JSON.stringify(value.slice(0, 80));
  return new TypeError(`${name} must be 1-${most} of [A-Za-z0-9._:-], got ${shown}`);
}

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

// --- options -----------------------------------------------------------------------------------

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
  /**
   * Asks a failed handshake's URL over HTTP to learn why it failed (default: the global `fetch`;
   * null: never, then a refused token is only guessed from repeated failures).
   */
  fetch?: FetchLike | null;
  /**
   * After this many milliseconds without a message from the server, send a `system.ping`
   * (default 20000; 0: never). A browser cannot see the server's WebSocket pings, so this is how
   * a page finds a link gone silent (a phone that changed networks): no FIN, no error, nothing.
   */
  pingIntervalMs?: number;
  /** A ping not answered (by anything) within this many milliseconds drops the link (10000). */
  pongTimeoutMs?: number;
  /** A connection with no hello (nor close) within this many milliseconds is dropped (15000;
   * 0: never). */
  connectTimeoutMs?: number;
  /**
   * The WebSocket class (default: the global one). Browsers, Deno, Bun and Node 22+ have one;
   * on Node 18–21 pass the `ws` package's (`import WebSocket from "ws"`).
   */
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

interface Waiter<T> {
  resolve: (value: T) => void;
  reject: (error: Error) => void;
}

const OPEN = 1;
type WatchPhase = "connect" | "idle" | "pong" | "error";
/** After an error event, how long to wait for the close event before acting without it. */
const ERROR_CLOSE_GRACE_MS = 1000;

export class PartySyncClient extends Emitter<PartySyncEvents> {
  readonly #url: URL;
  readonly #getToken: ((reason: TokenReason) => string | Promise<string>) | undefined;
  readonly #WebSocket: WebSocketConstructor;
  readonly #timers: Timers;
  readonly #now: () => number;
  readonly #makeId: () => string;
  readonly #fetch: FetchLike | null;
  readonly #stream: ClientStream;
  /** The URL of the last connection attempt (without its resume point), for a probe. */
  #dialUrl: string | null = null;

  /**
   * What the application sees: the status, state and pending actions as carried out so far. The
   * stream decides a whole batch at once; these follow its outputs one by one, so a listener sees
   * what was announced before it (an `event` listener, the state before the event).
   */
  #status: ConnectionStatus = "idle";
  #closedReason: ClosedReason | null = null;
  #state: PartySnapshot | null = null;
  #ws: WebSocketLike | null = null;
  /** Bumped for every attempt and hang-up: a stale async continuation compares and bails out. */
  #generation = 0;
  #timer: unknown = null;
  /** The liveness timer of the current connection (`#watch`), apart from the stream's timer. */
  #watchTimer: unknown = null;
  #watchPhase: WatchPhase | null = null;
  #watchDue = 0; // when the armed liveness timer fires (the clock of `now`)
  /** When the current connection last brought a message (`#now()`): the idle timer checks it
   * when it fires, instead of being re-armed for every message. */
  #heardAt = 0;
  readonly #pingIntervalMs: number;
  readonly #pongTimeoutMs: number;
  readonly #connectTimeoutMs: number;
  readonly #actions = new Map<
    string,
    Waiter<ActionResultMessage> & { promise: Promise<ActionResultMessage> }
  >();
  readonly #votes = new Map<string, Waiter<VoteUpdateMessage>>();
  #connectWaiters: Array<Waiter<void>> = [];
  #leaveWaiters: Array<() => void> = [];

  constructor(options: PartySyncClientOptions) {
    super();
    if (options.token === undefined && options.getToken === undefined) {
      throw new TypeError("PartySyncClient needs a token or a getToken hook");
    }
    const WS =
      options.WebSocket ??
      (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket ??
      undefined;
    if (WS === undefined) {
      throw new TypeError(
        "no WebSocket in this runtime: pass options.WebSocket (on Node 18-21, the ws package's)",
      );
    }
    this.#pingIntervalMs = Math.max(0, options.pingIntervalMs ?? DEFAULT_PING_INTERVAL_MS);
    this.#pongTimeoutMs = Math.max(1, options.pongTimeoutMs ?? DEFAULT_PONG_TIMEOUT_MS);
    this.#connectTimeoutMs = Math.max(0, options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS);
    this.#url = new URL(options.url);
    this.#getToken = options.getToken;
    this.#WebSocket = WS;
    this.#timers = options.timers ?? defaultTimers;
    this.#now = options.now ?? Date.now;
    this.#makeId = options.makeId ?? randomId;
    const globalFetch = (globalThis as { fetch?: FetchLike }).fetch;
    this.#fetch =
      options.fetch !== undefined
        ? options.fetch
        : typeof globalFetch === "function"
          ? (url, init) => globalFetch(url, init)
          : null;
    this.#stream = new ClientStream({
      token: options.token ?? null,
      canRefreshToken: options.getToken !== undefined,
      random: options.random ?? Math.random,
      baseMs: options.backoff?.baseMs,
      capMs: options.backoff?.capMs,
      refreshTokenAfterFailures: options.refreshTokenAfterFailures,
      probeHandshakes: this.#fetch !== null,
    });
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

  /**
   * Why the next connection attempt fetches a fresh token first (`getToken(reason)`), or null
   * when it dials with the token it has. Read in a `tokenError` listener: null there means the
   * failed fetch was not needed (the handshakes that failed may have been a server that was down,
   * and the current token's `exp` has not passed): the client goes on with its token.
   */
  get tokenWanted(): TokenReason | null {
    return this.#stream.tokenRequest(this.#now());
  }

  /** The party state (null before the first hello). */
  get state(): PartySnapshot | null {
    return this.#state;
  }

  /** Where a resume would start: the epoch and the last seq applied. */
  get position(): { epoch: string; lastSeq: number } | null {
    return this.#stream.position;
  }

  /** Actions sent or queued and not answered yet. */
  get pendingActions(): number {
    return this.#actions.size;
  }

  /** The party's actions being resolved now (anyone's), oldest first: `state.actionsInFlight`. */
  get actionsInFlight(): readonly ActionInFlight[] {
    return this.#state?.actionsInFlight ?? [];
  }

  /** The live narration streams with their text so far: `state.narration`. */
  get narration(): readonly Narration[] {
    return this.#state?.narration ?? [];
  }

  /**
   * Start connecting (and keep reconnecting). Resolves at the next `system.hello`; rejects if the
   * client stops for good first.
   */
  connect(): Promise<void> {
    if (this.status === "closed") return this.#closedError();
    const ready = new Promise<void>((resolve, reject) => {
      if (this.status === "open") resolve();
      else this.#connectWaiters.push({ resolve, reject });
    });
    this.#run(this.#stream.start());
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
    if (this.status === "closed") return this.#closedError();
    const actionId = options.actionId ?? this.#makeId();
    const traceId = options.traceId ?? this.#makeId();
    const bad = badId("action_id", actionId) ?? badId("trace_id", traceId, 128);
    if (bad !== null) return Promise.reject(bad);
    // The same action again while it is pending (a double click): it joins the pending call,
    // as the Python client's does (it was a plain Error, which the README's own error handling
    // took for fatal: client probe).
    const pending = this.#actions.get(actionId);
    if (pending !== undefined) return pending.promise;
    let settle: Waiter<ActionResultMessage> = { resolve: () => {}, reject: () => {} };
    const promise = new Promise<ActionResultMessage>((resolve, reject) => {
      settle = { resolve, reject };
    });
    this.#actions.set(actionId, { ...settle, promise });
    this.#run(this.#stream.addAction({ actionId, type, payload: { ...payload }, traceId }));
    return promise;
  }

  /**
   * Reconnect now if a reconnect waits on its backoff (e.g. on the browser's `online` event: the
   * network is back); nothing otherwise, nor while the server asked the client to wait (after an
   * operator's disconnect).
   */
  reconnectNow(): void {
    this.#run(this.#stream.retryNow());
  }

  /**
   * Check the link now instead of at the end of its idle interval (e.g. on the browser's
   * `offline` event, or when the page is shown again after the phone slept): a connected client
   * sends a `system.ping`, and if nothing at all comes back within `timeoutMs` (default
   * `pongTimeoutMs`) it drops the link as lost, then reconnects and resumes as after any lost
   * link; a client waiting to reconnect tries now (`reconnectNow`). A check under way is
   * shortened to `timeoutMs` if that ends sooner (no second ping); nothing during a handshake.
   */
  checkNow(timeoutMs?: number): void {
    const ws = this.#ws;
    if (ws === null) {
      this.reconnectNow();
      return;
    }
    if (this.status !== "open" || ws.readyState !== OPEN) return; // (a handshake has its own watch)
    if (this.#watchPhase === "error") return;
    const wait = Math.max(1, timeoutMs ?? this.#pongTimeoutMs);
    if (this.#watchPhase === "pong") {
      // A ping is out already: its answer is waited for no longer than this check asks (the
      // page shown again, then the device offline: the offline check's 3 s, not the 10 s of
      // the check before it: re-check probe).
      if (this.#now() + wait < this.#watchDue) this.#watch(ws, "pong", wait);
      return;
    }
    this.#send({ type: "system.ping", payload: {} });
    this.#watch(ws, "pong", wait);
  }

  /** Vote for `option` in the open vote `voteId`; resolves with the `vote.update` it caused. */
  castVote(voteId: string, option: string): Promise<VoteUpdateMessage> {
    if (this.status === "closed") return this.#closedError();
    const bad = badId("voteId", voteId) ?? badId("option", option);
    if (bad !== null) return Promise.reject(bad);
    return new Promise<VoteUpdateMessage>((resolve, reject) => {
      const traceId = this.#makeId();
      this.#votes.set(traceId, { resolve, reject });
      this.#run(this.#stream.addVote({ voteId, option, traceId }));
    });
  }

  /**
   * Leave the party for good (`party.leave`): the server removes this character from the roster
   * and closes with 1000. Resolves once closed; the client does not reconnect.
   */
  leave(): Promise<void> {
    if (this.status === "closed") return Promise.resolve();
    const done = new Promise<void>((resolve) => this.#leaveWaiters.push(resolve));
    this.#run(this.#stream.leave());
    return done;
  }

  /** Disconnect and stop (without leaving the party: it sees this character go offline). */
  close(): void {
    this.#run(this.#stream.close());
  }

  #closedError(): Promise<never> {
    return Promise.reject(new ClientClosedError(this.#closedReason ?? "closed"));
  }

  // --- carrying out the stream's outputs ---------------------------------------------------------

  /**
   * Carry out `outputs` in order. Listeners run in between and may call back into the client;
   * should one stop it, the connection outputs that follow are void (`CONNECTION_OUTPUTS`).
   */
  #run(outputs: readonly Output[]): void {
    const lifecycle = this.#stream.lifecycle;
    for (const output of outputs) {
      if (this.#stream.lifecycle !== lifecycle && CONNECTION_OUTPUTS.has(output.type)) continue;
      this.#carryOut(output);
    }
  }

  #carryOut(output: Output): void {
    switch (output.type) {
      case "emit":
        this.emit(output.name, output.value);
        return;
      case "publish":
        this.#state = output.state;
        return;
      case "status":
        this.#status = output.change.status;
        this.#closedReason = output.change.closedReason ?? this.#closedReason;
        this.emit("connection", output.change);
        return;
      case "send":
        this.#send(output.message);
        return;
      case "flush":
        this.#run(this.#stream.due());
        return;
      case "open":
        void this.#open();
        return;
      case "probe":
        void this.#probe(output.connection);
        return;
      case "arm":
        this.#arm(output.timer, output.delayMs);
        return;
      case "disarm":
        this.#disarm();
        return;
      case "hangUp":
        this.#hangUp(output.code, output.reason);
        return;
      case "ready":
        for (const waiter of this.#connectWaiters.splice(0)) waiter.resolve();
        return;
      case "actionDone":
        this.#takeAction(output.actionId)?.resolve(output.result);
        return;
      case "actionFailed":
        this.#takeAction(output.actionId)?.reject(new PartySyncError(output.error));
        return;
      case "actionTooLarge":
        this.#takeAction(output.actionId)?.reject(new PartySyncError(tooLarge(output)));
        return;
      case "voteDone":
        this.#takeVote(output.traceId)?.resolve(output.update);
        return;
      case "voteFailed":
        this.#takeVote(output.traceId)?.reject(new PartySyncError(output.error));
        return;
      case "stopped":
        this.#rejectAll(new ClientClosedError(output.reason));
        return;
      default:
        output satisfies never; // every output is carried out
    }
  }

  #takeAction(actionId: string): Waiter<ActionResultMessage> | undefined {
    const waiter = this.#actions.get(actionId);
    this.#actions.delete(actionId);
    return waiter;
  }

  #takeVote(traceId: string): Waiter<VoteUpdateMessage> | undefined {
    const waiter = this.#votes.get(traceId);
    this.#votes.delete(traceId);
    return waiter;
  }

  #rejectAll(error: ClientClosedError): void {
    for (const action of this.#actions.values()) action.reject(error);
    this.#actions.clear();
    for (const vote of this.#votes.values()) vote.reject(error);
    this.#votes.clear();
    for (const waiter of this.#connectWaiters.splice(0)) waiter.reject(error);
    for (const resolve of this.#leaveWaiters.splice(0)) resolve();
  }

  // --- I/O ---------------------------------------------------------------------------------------

  async #open(): Promise<void> {
    const generation = ++this.#generation;
    try {
      await this.#fetchToken(this.#stream.tokenRequest(this.#now()));
    } catch (error) {
      if (generation !== this.#generation || this.status === "closed") return;
      this.#run(this.#stream.tokenFailed(error, this.#now()));
      return;
    }
    if (generation !== this.#generation || this.status === "closed") return;
    const token = this.#stream.token ?? "";
    const resume = this.#stream.dial();
    const url = new URL(this.#url);
    url.searchParams.set("token", token);
    this.#dialUrl = url.toString();
    if (resume !== null) {
      url.searchParams.set("epoch", resume.epoch);
      url.searchParams.set("last_seq", String(resume.lastSeq));
    }
    let ws: WebSocketLike;
    try {
      ws = new this.#WebSocket(url.toString());
    } catch {
      this.#run(this.#stream.dialFailed());
      return;
    }
    this.#ws = ws;
    this.#watch(ws, "connect", this.#connectTimeoutMs);
    ws.onmessage = ((event: { data: unknown }) => {
      if (this.#ws !== ws) return;
      this.#heardAt = this.#now(); // anything heard proves the link
      if (this.#watchPhase !== "idle") this.#watch(ws, "idle", this.#pingIntervalMs);
      this.#run(this.#stream.receive(event.data));
    }) as (event: never) => unknown;
    ws.onclose = ((event: { code?: number; reason?: string }) => {
      if (this.#ws !== ws) return;
      this.#ws = null;
      this.#unwatch();
      this.#run(this.#stream.closed(event.code ?? 1006, event.reason ?? ""));
    }) as (event: never) => unknown;
    // A close event follows an error in browsers; some runtimes (Node 20's undici after a
    // refused handshake) fire the error alone. Give the close a moment, then act without it.
    ws.onerror = (() => {
      if (this.#ws === ws) this.#watch(ws, "error", ERROR_CLOSE_GRACE_MS);
    }) as (event: never) => unknown;
    ws.onopen = null; // the hello, not the upgrade, makes a connection usable
  }

  /**
   * Arm the liveness timer of `ws` (replacing the one before): an `idle` link silent for `ms`
   * gets a `system.ping` and `pongTimeoutMs` more (one that heard something meanwhile waits out
   * the rest of its interval); a `connect`, `error` or `pong` wait that runs out drops the link
   * as a network failure (1006). `ms` = 0: no timer.
   */
  #watch(ws: WebSocketLike, phase: WatchPhase, ms: number): void {
    this.#unwatch();
    if (ms <= 0) return;
    this.#watchPhase = phase;
    this.#watchDue = this.#now() + ms;
    this.#watchTimer = this.#timers.setTimeout(() => {
      this.#watchTimer = null;
      this.#watchPhase = null;
      if (this.#ws !== ws) return;
      const quiet = this.#now() - this.#heardAt;
      if (phase === "idle" && quiet < this.#pingIntervalMs) {
        this.#watch(ws, "idle", this.#pingIntervalMs - quiet);
        return;
      }
      if (phase === "idle" && ws.readyState === OPEN) {
        this.#send({ type: "system.ping", payload: {} });
        this.#watch(ws, "pong", this.#pongTimeoutMs);
        return;
      }
      this.#ws = null;
      try {
        ws.close();
      } catch {
        // already closing
      }
      const why = phase === "connect" ? "no answer to the handshake" : "no answer: link lost";
      this.#run(this.#stream.closed(1006, phase === "error" ? "" : why));
    }, ms);
  }

  #unwatch(): void {
    this.#watchPhase = null;
    if (this.#watchTimer !== null) {
      this.#timers.clearTimeout(this.#watchTimer);
      this.#watchTimer = null;
    }
  }

  /**
   * Ask the URL of a failed handshake over HTTP (the same GET, without the upgrade): the server
   * answers it as it answered the handshake, 401 for a refused token, 403 for a refused
   * connection, 400 (not a WebSocket request) when it would have accepted it. Except for the
   * `Origin`: the handshake carries the page's, a same-origin GET none, so a handshake refused
   * for its origin is answered 400 here (and on another origin no answer can be read at all).
   */
  async #probe(connection: number): Promise<void> {
    const fetchStatus = this.#fetch;
    if (fetchStatus === null || this.#dialUrl === null) return;
    const url = new URL(this.#dialUrl);
    url.protocol = url.protocol === "wss:" ? "https:" : "http:";
    let status: number | null = null;
    let retryAfterMs: number | null = null;
    try {
      const init: Parameters<FetchLike>[1] = {
        method: "GET",
        cache: "no-store",
        credentials: "omit",
      };
      if (typeof AbortSignal !== "undefined" && typeof AbortSignal.timeout === "function") {
        init.signal = AbortSignal.timeout(PROBE_TIMEOUT_MS);
      }
      const response = await fetchStatus(url.toString(), init);
      status = response.status;
      retryAfterMs = retryAfter(response.headers?.get("Retry-After") ?? null, Date.now());
    } catch {
      status = null; // unreachable, blocked (another origin without CORS), timed out
    }
    this.#run(this.#stream.probed(connection, status === 0 ? null : status, retryAfterMs));
  }

  /** Ask `getToken` for a fresh token when the stream wants one (`reason`). */
  async #fetchToken(reason: TokenReason | null): Promise<void> {
    if (reason !== null && this.#getToken !== undefined) {
      const token = await this.#getToken(reason);
      if (typeof token !== "string" || token === "") throw new Error("getToken gave no token");
      this.#stream.tokenArrived(token);
    }
    if (this.#stream.token === null) throw new Error("no token");
  }

  #arm(timer: Timer, delayMs: number): void {
    this.#disarm();
    this.#timer = this.#timers.setTimeout(() => {
      this.#timer = null;
      this.#run(this.#stream.timerFired(timer));
    }, delayMs);
  }

  #disarm(): void {
    if (this.#timer !== null) {
      this.#timers.clearTimeout(this.#timer);
      this.#timer = null;
    }
  }

  #hangUp(code: number | undefined, reason: string | undefined): void {
    const ws = this.#ws;
    this.#ws = null;
    this.#unwatch();
    this.#generation += 1;
    if (ws === null || code === undefined) return;
    try {
      if (reason === undefined) ws.close(code);
      else ws.close(code, reason);
    } catch {
      // already closing
    }
  }

  #send(message: ClientMessage): void {
    const ws = this.#ws;
    if (ws === null || ws.readyState !== OPEN) return; // sent again on the next connection
    try {
      ws.send(JSON.stringify(message));
    } catch {
      // the connection is going away: its close event reconnects and sends again
    }
  }
}

/** The `message_too_large` refusal of an action too large for this server (the hello's
 * `limits`), made here: the words and shape the server gives one under 4x its limit (over that,
 * it closes the connection, and the resend after each reconnect was closed again, for ever). */
function tooLarge(too: {
  actionId: string;
  traceId: string;
  size: number;
  limit: number;
}): SystemErrorMessage {
  return {
    type: "system.error",
    timestamp: new Date().toISOString(),
    trace_id: too.traceId,
    payload: {
      code: "message_too_large",
      message:
        `the action is ${too.size} bytes encoded; this server takes messages of at most ` +
        `${too.limit} bytes (system.hello limits.max_message_bytes)`,
      retryable: false,
      in_reply_to: { trace_id: too.traceId, type: "action.request", action_id: too.actionId },
    },
  };
}
