/**
 * @rpg-bot/party-sync-client: the browser client of party_sync (protocol v1).
 *
 * ```ts
 * import { PartySyncClient } from "@rpg-bot/party-sync-client";
 * const client = new PartySyncClient({ url: "wss://game.example/ws", getToken });
 * client.on("scene", (scene) => render(scene));
 * client.on("narration", ({ stream }) => showLive(stream.streamId, stream.text, stream.done));
 * client.on("inFlight", (actions) => showResolving(actions));
 * await client.connect();
 * const result = await client.sendAction("choice", { option: "row" });
 * ```
 */
export {
  PartySyncClient,
  CLIENT_CLOSE_RESYNC,
  PROBE_TIMEOUT_MS,
  randomId,
  tokenExpiry,
  type ActionPayloads,
  type ConnectionChange,
  type ConnectionStatus,
  type FetchLike,
  type HelloInfo,
  type PartySyncClientOptions,
  type PartySyncEvents,
  type PresenceChange,
  type ResyncInfo,
  type SendActionOptions,
  type Timers,
  type TokenReason,
  type VoteChange,
  type WebSocketConstructor,
  type WebSocketLike,
} from "./client.js";
export {
  DEFAULT_BACKOFF_BASE_MS,
  DEFAULT_BACKOFF_CAP_MS,
  fullJitterDelay,
  type BackoffOptions,
} from "./backoff.js";
export { Emitter, type Listener } from "./emitter.js";
export { ClientClosedError, PartySyncError, type ClosedReason } from "./errors.js";
export {
  isPartyEventType,
  isSequenced,
  isSystemType,
  isTransientType,
  parseServerMessage,
  ProtocolParseError,
  type UnknownPartyEvent,
  type UnknownServerMessage,
} from "./parse.js";
export { applyEvent, fromHello, type Limits, type OpenVote, type PartySnapshot } from "./state.js";
export {
  applyDelta,
  restateNarration,
  settleNarration,
  withAccepted,
  withoutAction,
  type Narration,
  type NarrationChange,
} from "./live.js";
export * from "./types.js";
