/**
 * Parsing of server → client frames.
 *
 * The server validates everything it sends against the JSON Schemas, so the client checks only
 * what it relies on (the envelope, seq, and the fields its state machine reads) and fails with a
 * `ProtocolParseError` rather than crash on a malformed frame. Message types this client does not
 * know (a later protocol version may add some) are returned as `UnknownServerMessage`: if they
 * carry a seq they still count in the party's sequence. The transient messages (`action.accepted`,
 * `action.failed`, `narration.delta`) must come without seq, like the system ones.
 */
import {
  PARTY_EVENT_TYPES,
  SYSTEM_TYPES,
  TRANSIENT_TYPES,
  type PartyEvent,
  type PartyEventType,
  type ServerMessage,
  type SystemType,
  type TransientMessage,
  type TransientType,
} from "./types.js";

export class ProtocolParseError extends Error {
  override readonly name = "ProtocolParseError";
}

/** A server message of a type this version of the client does not know. */
export interface UnknownServerMessage {
  type: string;
  timestamp?: string;
  trace_id?: string;
  seq?: number;
  payload: Record<string, unknown>;
  /** Marks a message of an unknown type (never set on known ones). */
  unknown: true;
}

/** A party event of an unknown type: it has a seq, so it advances the sequence. */
export type UnknownPartyEvent = UnknownServerMessage & { seq: number };

const EVENT_TYPES: ReadonlySet<string> = new Set(PARTY_EVENT_TYPES);
const SYSTEMS: ReadonlySet<string> = new Set(SYSTEM_TYPES);
const TRANSIENTS: ReadonlySet<string> = new Set(TRANSIENT_TYPES);

export function isPartyEventType(type: string): type is PartyEventType {
  return EVENT_TYPES.has(type);
}

export function isSystemType(type: string): type is SystemType {
  return SYSTEMS.has(type);
}

/** A server → client message to every member without seq (`action.accepted`, …). */
export function isTransientType(type: string): type is TransientType {
  return TRANSIENTS.has(type);
}

/** True for a known party event or an unknown message that carries a seq. */
export function isSequenced(
  message: ServerMessage | UnknownServerMessage,
): message is PartyEvent | UnknownPartyEvent {
  return typeof message.seq === "number";
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function isSeq(value: unknown, minimum: number): value is number {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= minimum;
}

function need(condition: boolean, what: string): asserts condition {
  if (!condition) throw new ProtocolParseError(what);
}

function checkHello(payload: Record<string, unknown>): void {
  need(isSeq(payload["seq"], 0), "system.hello: seq must be an integer >= 0");
  need(typeof payload["epoch"] === "string", "system.hello: epoch must be a string");
  need(typeof payload["resumed"] === "boolean", "system.hello: resumed must be a boolean");
  if (payload["resumed"] === true) {
    need(isSeq(payload["resumed_from"], 0), "system.hello: resumed_from must be an integer");
  }
  need(typeof payload["you"] === "string", "system.hello: you must be a string");
  need(typeof payload["campaign_run_id"] === "string", "system.hello: campaign_run_id");
  need(Array.isArray(payload["members"]), "system.hello: members must be an array");
  for (const key of ["scene", "combat", "party_state", "vote"]) {
    need(payload[key] === null || isObject(payload[key]), `system.hello: ${key}`);
  }
  const inFlight = payload["actions_in_flight"];
  need(Array.isArray(inFlight), "system.hello: actions_in_flight must be an array");
  for (const action of inFlight) {
    need(isObject(action) && typeof action["action_id"] === "string", "system.hello: actions_in_flight");
  }
  const narration = payload["narration"];
  need(Array.isArray(narration), "system.hello: narration must be an array");
  for (const stream of narration) {
    need(
      isObject(stream) &&
        typeof stream["stream_id"] === "string" &&
        isSeq(stream["index"], 0) &&
        typeof stream["text"] === "string",
      "system.hello: narration streams need stream_id, index and text",
    );
  }
  need(isObject(payload["limits"]), "system.hello: limits must be an object");
}

function checkError(payload: Record<string, unknown>): void {
  need(typeof payload["code"] === "string", "system.error: code must be a string");
  need(isObject(payload["in_reply_to"]), "system.error: in_reply_to must be an object");
}

function checkTransient(type: TransientType, payload: Record<string, unknown>): void {
  need(typeof payload["action_id"] === "string" || type === "narration.delta", `${type}: action_id`);
  switch (type) {
    case "action.accepted":
      need(typeof payload["character_id"] === "string", "action.accepted: character_id");
      need(typeof payload["action_type"] === "string", "action.accepted: action_type");
      return;
    case "action.failed":
      need(typeof payload["character_id"] === "string", "action.failed: character_id");
      need(typeof payload["code"] === "string", "action.failed: code");
      return;
    case "narration.delta":
      need(typeof payload["stream_id"] === "string", "narration.delta: stream_id");
      need(isSeq(payload["index"], 0), "narration.delta: index must be an integer >= 0");
      need(typeof payload["text"] === "string", "narration.delta: text must be a string");
      need(typeof payload["done"] === "boolean", "narration.delta: done must be a boolean");
      need(
        payload["action_id"] === undefined || typeof payload["action_id"] === "string",
        "narration.delta: action_id",
      );
      return;
  }
}

function checkEvent(type: PartyEventType, payload: Record<string, unknown>): void {
  switch (type) {
    case "action.result":
      need(typeof payload["action_id"] === "string", "action.result: action_id");
      need(typeof payload["character_id"] === "string", "action.result: character_id");
      return;
    case "party.join":
    case "party.leave":
      need(typeof payload["character_id"] === "string", `${type}: character_id`);
      return;
    case "scene.update":
      need(Array.isArray(payload["options"]), "scene.update: options must be an array");
      return;
    case "combat.update":
      need(Array.isArray(payload["combatants"]), "combat.update: combatants must be an array");
      return;
    case "vote.started":
      need(Array.isArray(payload["options"]), "vote.started: options must be an array");
      need(typeof payload["vote_id"] === "string", "vote.started: vote_id");
      return;
    case "vote.update":
    case "vote.finished":
      need(typeof payload["vote_id"] === "string", `${type}: vote_id`);
      need(isObject(payload["tallies"]), `${type}: tallies must be an object`);
      return;
    case "party.state":
      return;
  }
}

/**
 * Parse one frame (a string, or an already decoded value) into a server message.
 * Throws `ProtocolParseError` for anything that is not a well-formed server message.
 */
export function parseServerMessage(data: unknown): ServerMessage | UnknownServerMessage {
  let value: unknown = data;
  if (typeof data === "string") {
    try {
      value = JSON.parse(data);
    } catch {
      throw new ProtocolParseError("frame is not JSON");
    }
  }
  need(isObject(value), "a message must be a JSON object");
  const { type, payload, seq } = value;
  need(typeof type === "string" && /^[a-z]+\.[a-z_]+$/.test(type), "type must be a.b");
  need(isObject(payload), `${type}: payload must be an object`);
  if (isSystemType(type)) {
    need(seq === undefined, `${type} must not carry seq`);
    if (type === "system.hello") checkHello(payload);
    else if (type === "system.error") checkError(payload);
    return value as unknown as ServerMessage;
  }
  if (isTransientType(type)) {
    need(seq === undefined, `${type} must not carry seq`);
    checkTransient(type, payload);
    return value as unknown as TransientMessage;
  }
  if (isPartyEventType(type)) {
    need(isSeq(seq, 1), `${type}: seq must be an integer >= 1`);
    checkEvent(type, payload);
    return value as unknown as PartyEvent;
  }
  need(seq === undefined || isSeq(seq, 1), `${type}: seq must be an integer >= 1`);
  return { ...(value as Omit<UnknownServerMessage, "unknown">), unknown: true };
}
