/** Reconnect delays: exponential backoff with full jitter. */

export interface BackoffOptions {
  /** The first ceiling, in milliseconds (default 500). */
  baseMs?: number;
  /** The largest ceiling, in milliseconds (default 30 000). */
  capMs?: number;
}

export const DEFAULT_BACKOFF_BASE_MS = 500;
export const DEFAULT_BACKOFF_CAP_MS = 30_000;

/**
 * "Full jitter": a uniformly random delay in `[0, min(cap, base · 2^attempt))`.
 *
 * Clients that lost the server together (a deploy, a network blip) spread their reconnects over
 * the whole window instead of arriving in waves. `attempt` counts the failures since the last
 * successful connection (0 for the first retry); `random` returns a number in `[0, 1)`.
 */
export function fullJitterDelay(
  attempt: number,
  random: () => number,
  baseMs: number = DEFAULT_BACKOFF_BASE_MS,
  capMs: number = DEFAULT_BACKOFF_CAP_MS,
): number {
  const exponent = Math.min(Math.max(0, Math.floor(attempt)), 52);
  const ceiling = Math.min(capMs, baseMs * 2 ** exponent);
  const r = Math.min(Math.max(random(), 0), 1);
  return Math.floor(r * ceiling);
}
