/** Errors the client rejects its promises with. */
import type { ErrorCode, SystemErrorMessage } from "./types.js";

/** The server refused a request of this client: the `system.error` that answered it. */
export class PartySyncError extends Error {
  override readonly name = "PartySyncError";
  readonly code: ErrorCode;
  readonly retryable: boolean;
  readonly actionId: string | undefined;
  readonly voteId: string | undefined;

  constructor(readonly error: SystemErrorMessage) {
    super(`${error.payload.code}: ${error.payload.message}`);
    this.code = error.payload.code;
    this.retryable = error.payload.retryable;
    this.actionId = error.payload.in_reply_to.action_id;
    this.voteId = error.payload.in_reply_to.vote_id;
  }
}

/** Why a client stopped for good (it will not reconnect by itself). */
export type ClosedReason =
  /** The server closed with 1000: this character left the party (by `leave()`, or elsewhere).
   *  Only this reason says the character was removed from the roster. */
  | "left"
  /** `close()` was called. */
  | "closed"
  /** The server closed with 1008 (flooding or bad input): fix the client, do not retry at once. */
  | "policy"
  /** The token expired (4001) and no `getToken` hook can fetch a new one. */
  | "token_expired"
  /** The server refused the token (the handshake was answered 401: invalid, expired, for
   *  another server) and no `getToken` hook could give one it accepts. */
  | "unauthorized"
  /** The server refused the connection for good: the client's HTTP probe of the failed
   *  handshake was answered 403, 404 or 410 (an operator's block, no such endpoint).
   *  `httpStatus` says which. Never for an `Origin` outside `allowed_origins`: the browser sends
   *  no `Origin` with the probe's same-origin GET (answered 400), and a page on another origin
   *  cannot read the answer (no CORS), so such a page keeps reconnecting. */
  | "refused";

/** The client stopped (see `reason`) before the request could be answered. */
export class ClientClosedError extends Error {
  override readonly name = "ClientClosedError";

  constructor(readonly reason: ClosedReason) {
    super(`the party_sync client is closed (${reason})`);
  }
}

