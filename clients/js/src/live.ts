/**
 * What the party is doing right now, as the transient messages tell it (docs/protocol.md): the
 * game master's live narration (`narration.delta`) and the actions being resolved
 * (`action.accepted`, ended by `action.result` or `action.failed`). Neither is part of the
 * sequenced history: `system.hello` restates both on every connection, and the client replaces
 * what it had with that.
 *
 * Pure functions over immutable values, like `state.ts`: every change makes new arrays and
 * objects, and says what changed, so the protocol core (`stream.ts`) can tell the application.
 *
 * The narration rule (spec of `narration.delta`): pieces of a stream come with index 0, 1, 2, …;
 * a piece whose index is the last one + 1 is appended, one at or below the last is a repeat and
 * ignored (never shown twice), and the piece with `done: true` is the last. A jump (a piece went
 * missing, which the server never does) freezes the text where it is: the stream is `incomplete`
 * and its text is not extended any more (never shown with a hole), until the final, authoritative
 * text arrives in the sequenced `scene.update` or `action.result`.
 */
import type {
  ActionAcceptedPayload,
  ActionInFlight,
  NarrationDeltaPayload,
  NarrationStream,
} from "./types.js";

/** One narration stream as this client has it. */
export interface Narration {
  streamId: string;
  /** The action whose resolution it narrates, when the engine named it. */
  actionId?: string;
  /** The text so far: every piece up to `index`, each once, in order. */
  text: string;
  /** The index of the last piece in `text` (-1: none yet). */
  index: number;
  /** The last piece arrived (or the server closed the stream): no more text will come. */
  done: boolean;
  /** A piece went missing: `text` stops before it and is not extended; the final text (the next
   *  `scene.update` / `action.result`) is the whole one. */
  incomplete: boolean;
}

/** What happened to a stream. */
export interface NarrationChange {
  /**
   * - `append`: a piece was added to `stream.text` (`piece`); more will come;
   * - `done`: the last piece was added (`piece`, may be empty): the stream is finished;
   * - `incomplete`: a piece went missing; `stream.text` stays as it is until the final text;
   * - `restate`: a `system.hello` gave the stream's whole text so far: show `stream.text`
   *   instead of what was shown (a reconnect mid-stream; the pieces that follow are appended);
   * - `remove`: the stream is gone from `state.narration`: the final text has arrived (the
   *   `scene.update` or the `action.result` it led to), its action failed, or a new connection's
   *   hello no longer lists it.
   */
  kind: "append" | "done" | "incomplete" | "restate" | "remove";
  stream: Narration;
  /** For `append` and `done`: the text added to the end of `stream.text` (else ""). */
  piece: string;
}

/** An open stream as a hello restates it. */
export function narrationOf(s: NarrationStream): Narration {
  const stream: Narration = {
    streamId: s.stream_id,
    text: s.text,
    index: s.index,
    done: false,
    incomplete: false,
  };
  if (s.action_id !== undefined) stream.actionId = s.action_id;
  return stream;
}

function same(a: Narration, b: Narration): boolean {
  return (
    a.text === b.text &&
    a.index === b.index &&
    a.done === b.done &&
    a.incomplete === b.incomplete &&
    a.actionId === b.actionId
  );
}

/**
 * A hello's open streams replace the ones this client had: the ones it lists are restated (when
 * they differ from what the client has), the others removed (they ended while this client was
 * away, or before it came: their final text is in the snapshot or the replay that follows).
 */
export function restateNarration(
  current: readonly Narration[],
  open: readonly NarrationStream[],
): { narration: Narration[]; changes: NarrationChange[] } {
  const narration = open.map(narrationOf);
  const ids = new Set(narration.map((s) => s.streamId));
  const changes: NarrationChange[] = [];
  for (const stream of current) {
    if (!ids.has(stream.streamId)) changes.push({ kind: "remove", stream, piece: "" });
  }
  for (const stream of narration) {
    const had = current.find((s) => s.streamId === stream.streamId);
    if (had === undefined || !same(had, stream)) {
      changes.push({ kind: "restate", stream, piece: "" });
    }
  }
  return { narration, changes };
}

/**
 * Apply one `narration.delta`. `finished(streamId)` says whether this client saw the stream end
 * and dropped it already (a late repeat of its pieces must not bring it back). Returns the new
 * list and what changed (null: nothing, e.g. a repeated piece).
 */
export function applyDelta(
  current: readonly Narration[],
  delta: NarrationDeltaPayload,
  finished: (streamId: string) => boolean,
): { narration: readonly Narration[]; change: NarrationChange | null } {
  const position = current.findIndex((s) => s.streamId === delta.stream_id);
  const had = current[position];
  let stream: Narration;
  let change: NarrationChange["kind"];
  let piece = "";
  if (had === undefined) {
    if (finished(delta.stream_id)) return { narration: current, change: null };
    stream = { streamId: delta.stream_id, text: "", index: -1, done: false, incomplete: false };
    if (delta.action_id !== undefined) stream.actionId = delta.action_id;
    if (delta.index === 0) {
      stream.text = delta.text;
      stream.index = 0;
      stream.done = delta.done;
      piece = delta.text;
      change = delta.done ? "done" : "append";
    } else if (delta.done) {
      // The end of a stream this client never saw: nothing to show (its final text follows).
      return { narration: current, change: null };
    } else {
      stream.incomplete = true; // its beginning was missed: wait for the final text
      change = "incomplete";
    }
    return { narration: [...current, stream], change: { kind: change, stream, piece } };
  }
  if (had.done || delta.index <= had.index) return { narration: current, change: null };
  if (had.incomplete || delta.index !== had.index + 1) {
    if (had.incomplete && !delta.done) return { narration: current, change: null };
    stream = { ...had, incomplete: true, done: delta.done };
    change = delta.done ? "done" : "incomplete";
  } else {
    stream = { ...had, text: had.text + delta.text, index: delta.index, done: delta.done };
    piece = delta.text;
    change = delta.done ? "done" : "append";
  }
  const narration = current.map((s, i) => (i === position ? stream : s));
  return { narration, change: { kind: change, stream, piece } };
}

/**
 * Remove the finished streams whose final text has arrived: `scene.update` ends every finished
 * stream; `action.result` (`actionId`) ends the finished streams of that action and those that
 * named no action. Open streams stay (their pieces keep coming).
 */
export function settleNarration(
  current: readonly Narration[],
  by: { kind: "scene" } | { kind: "result"; actionId: string },
): { narration: readonly Narration[]; removed: Narration[] } {
  const ends = (s: Narration): boolean =>
    s.done &&
    (by.kind === "scene" || s.actionId === undefined || s.actionId === by.actionId);
  const removed = current.filter(ends);
  if (removed.length === 0) return { narration: current, removed };
  return { narration: current.filter((s) => !ends(s)), removed };
}

/** Remove every stream of a failed action that has finished (its text will never be final). */
export function dropActionNarration(
  current: readonly Narration[],
  actionId: string,
): { narration: readonly Narration[]; removed: Narration[] } {
  const ends = (s: Narration): boolean => s.done && s.actionId === actionId;
  const removed = current.filter(ends);
  if (removed.length === 0) return { narration: current, removed };
  return { narration: current.filter((s) => !ends(s)), removed };
}

// --- actions in flight ------------------------------------------------------------------------

/** Add an accepted action (a repeat changes nothing: returns the same array). */
export function withAccepted(
  current: readonly ActionInFlight[],
  accepted: ActionAcceptedPayload,
): readonly ActionInFlight[] {
  if (current.some((a) => a.action_id === accepted.action_id)) return current;
  const { action_id, character_id, action_type } = accepted;
  return [...current, { action_id, character_id, action_type }];
}

/** Remove an action that got its final answer (unchanged, the same array, if it was not there). */
export function withoutAction(
  current: readonly ActionInFlight[],
  actionId: string,
): readonly ActionInFlight[] {
  if (!current.some((a) => a.action_id === actionId)) return current;
  return current.filter((a) => a.action_id !== actionId);
}

/**
 * A bounded memory of ids that ended (streams dropped, actions settled): a late or repeated
 * transient message about one of them must not bring it back. Keeps the last `size` ids.
 */
export class RecentIds {
  readonly #ids = new Set<string>();

  constructor(readonly size = 256) {}

  add(id: string): void {
    this.#ids.delete(id);
    this.#ids.add(id);
    if (this.#ids.size > this.size) {
      const oldest = this.#ids.values().next();
      if (!oldest.done) this.#ids.delete(oldest.value);
    }
  }

  has(id: string): boolean {
    return this.#ids.has(id);
  }

  clear(): void {
    this.#ids.clear();
  }
}
