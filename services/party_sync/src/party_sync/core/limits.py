"""Rate limits: token buckets with time passed in (per connection, and per key: a user's
handshakes)."""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens a second up to ``burst``; ``take`` spends one if there is one."""

    rate: float
    burst: float
    tokens: float = -1.0
    updated: float = 0.0

    def level(self, now: float) -> float:
        """The tokens there are at ``now`` (refilled since the last change; none taken)."""
        if self.tokens < 0:  # never used: full
            return self.burst
        return min(self.burst, self.tokens + max(0.0, now - self.updated) * self.rate)

    def take(self, now: float, cost: float = 1.0) -> bool:
        # ``level`` inlined: this runs for every client message
        if self.tokens < 0:  # first use: start full
            self.tokens = self.burst
            self.updated = now
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def give_back(self, cost: float = 1.0) -> None:
        """Return what ``take`` spent on something that turned out not to count (up to
        ``burst``)."""
        if self.tokens >= 0:
            self.tokens = min(self.burst, self.tokens + cost)


#: Bytes a message's frame may add to the message (its header, its mask; a few fragments).
FRAME_SLACK = 1024
#: Refused or bad messages a second a connection may send (with a burst) before it is closed.
STRIKES_PER_S = 1.0
STRIKE_BURST = 20.0


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """Messages per second (with a burst), and how much refused or bad input ends a connection."""

    messages_per_s: float = 30.0
    message_burst: float = 60.0
    strikes_per_s: float = STRIKES_PER_S
    strike_burst: float = STRIKE_BURST
    #: Bytes a second a connection may send (frames, headers and all), and their burst: see
    #: ``of``. Infinite: not counted.
    bytes_per_s: float = float("inf")
    byte_burst: float = float("inf")

    @classmethod
    def of(cls, messages_per_s: float, message_burst: float, max_message_bytes: int) -> LimitPolicy:
        """The message rate, and a byte rate that a client within it never meets: its messages
        at the largest size (and their frames' headers), and, on top, the messages refused as
        too large (up to four times the size, each a strike) at the strike rate; the same for the
        bursts, and a burst of at least 1 MiB. What it stops is a flood of frames that are no
        messages, which the message rate never sees (security probe: one connection's 27 million
        empty continuation frames in 10 s, one fragmented message, slowed every other party's
        answers to up to 1.9 s). A refused message on top of a full burst of the largest ones
        once met it (re-check probe: 1008 where ``message_too_large`` was due)."""
        per_message = max_message_bytes + FRAME_SLACK
        too_large = 4 * max_message_bytes + FRAME_SLACK  # the largest frame still answered
        return cls(  # (the strike rate and burst are fixed)
            messages_per_s,
            message_burst,
            bytes_per_s=messages_per_s * per_message + STRIKES_PER_S * too_large,
            byte_burst=max(message_burst * per_message + STRIKE_BURST * too_large, float(1 << 20)),
        )


class ConnectionLimits:
    """A connection's buckets: one for all messages, one for strikes (refused or bad input), one
    for the bytes it sends.

    ``admit`` says whether to process a message; ``strike`` records a refusal and says whether the
    connection has earned a policy close (1008).
    """

    __slots__ = ("_bytes", "_messages", "_strikes")

    def __init__(self, policy: LimitPolicy) -> None:
        self._messages = TokenBucket(policy.messages_per_s, policy.message_burst)
        self._strikes = TokenBucket(policy.strikes_per_s, policy.strike_burst)
        self._bytes = (
            TokenBucket(policy.bytes_per_s, policy.byte_burst)
            if math.isfinite(policy.bytes_per_s) and math.isfinite(policy.byte_burst)
            else None
        )

    def admit(self, now: float) -> bool:
        return self._messages.take(now)

    def admit_bytes(self, size: int, now: float) -> bool:
        """Whether ``size`` more bytes from the client are within its byte rate."""
        return self._bytes is None or self._bytes.take(now, size)

    def strike(self, now: float) -> bool:
        """Count one bad or refused message; True when the connection must be closed."""
        return not self._strikes.take(now)


class KeyedBuckets:
    """A ``TokenBucket`` per key (``rate`` a second up to ``burst``), for the keys seen lately.

    ``wait`` says how long until ``key`` has a token (0: it has one), ``spend`` takes one. Kept
    apart because a handshake is refused when its user has no token left, but spends one only
    once it opened a session (an attempt that failed, say during an outage, costs nothing). A
    full bucket is the same as no bucket, so the table forgets full ones when it grows past
    ``max_keys``, and then the least recently used.
    """

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[Hashable, TokenBucket] = {}  # least recently used first

    def __len__(self) -> int:
        return len(self._buckets)

    def wait(self, key: Hashable, now: float) -> float:
        """Seconds until ``key`` has a whole token (0.0: it has one now)."""
        bucket = self._buckets.get(key)
        tokens = self.burst if bucket is None else bucket.level(now)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def spend(self, key: Hashable, now: float) -> None:
        """Take one of ``key``'s tokens. Never below 0 (a negative level is ``TokenBucket``'s
        "never used"): two handshakes told ``wait`` 0 at once both open, the second for free."""
        bucket = self._buckets.pop(key, None)
        level = self.burst if bucket is None else bucket.level(now)
        self._buckets[key] = TokenBucket(self.rate, self.burst, max(0.0, level - 1.0), now)
        if len(self._buckets) > self.max_keys:
            self._collect(now)

    def _collect(self, now: float) -> None:
        buckets = self._buckets
        for key in [k for k, b in buckets.items() if b.level(now) >= self.burst]:
            del buckets[key]  # full: the same as no bucket
        while len(buckets) > self.max_keys:
            del buckets[next(iter(buckets))]


class RateGate:
    """At most one admission per ``interval`` (a pure decision: ``now`` is passed in); counts
    what it refuses and hands the count to the next admission."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = float("-inf")
        self._suppressed = 0

    def admit(self, now: float) -> int | None:
        """``None``: refused (counted). Else admitted, with the number refused since the last."""
        if now < self._next:
            self._suppressed += 1
            return None
        self._next = now + self.interval
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed
