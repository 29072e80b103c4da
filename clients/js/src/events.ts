/**
 * What `PartySyncClient` tells the application: its connection status and the typed events it
 * emits. Shared by the protocol core (`stream.ts`, which decides what to emit) and the client
 * (`client.ts`, which emits it).
 */
import type { ClosedReason } from "./errors.js";
import type { NarrationChange } from "./live.js";
import type { ProtocolParseError, UnknownPartyEvent } from "./parse.js";
import type { OpenVote, PartySnapshot } from "./state.js";
import type {
  ActionAcceptedMessage,
  ActionFailedMessage,
  ActionInFlight,
  ActionResultMessage,
  Combat,
  Member,
  PartyEvent,
  PartyState,
  Scene,
  SystemErrorMessage,
  SystemHelloMessage,
  VoteFinishedPayload,
} from "./types.js";

/** Why `getToken` is called. */
export type TokenReason =
  /** The first connection (no `token` option given). */
  | "initial"
  /** The server closed with 4001, or the token's `exp` has passed. */
  | "expired"
  /** Handshakes kept failing before any hello: the token may have been refused (HTTP 401). */
  | "rejected";

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
  /**
   * The HTTP status the server answered a failed handshake with, when the client could learn it
   * (a browser's WebSocket does not say: the client asks the same URL once over HTTP).
   */
  httpStatus?: number;
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
  /** An action of the party (anyone's, or a finished vote's choice) is being resolved: every
   *  `action.accepted` that was not in flight already. */
  actionAccepted: ActionAcceptedMessage;
  /** An accepted action of the party was refused for good (`action.failed`), whoever acted. */
  actionFailed: ActionFailedMessage;
  /** The actions in flight (`state.actionsInFlight`) after every change: one accepted, one
   *  answered (`action.result` / `action.failed`), or restated by a hello. */
  inFlight: readonly ActionInFlight[];
  /** A narration stream changed: a piece appended, the stream done, restated by a hello after a
   *  reconnect, or removed once its final text arrived (`state.narration` holds them all). */
  narration: NarrationChange;
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
