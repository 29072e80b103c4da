"""Per-connection rate limits: token buckets with time passed in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens a second up to ``burst``; ``take`` spends one if there is one."""

    rate: float
    burst: float
    tokens: float = -1.0
    updated: float = 0.0

    def take(self, now: float, cost: float = 1.0) -> bool:
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


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """Messages per second (with a burst), and how much refused or bad input ends a connection."""

    messages_per_s: float = 30.0
    message_burst: float = 60.0
    strikes_per_s: float = 1.0
    strike_burst: float = 20.0


class ConnectionLimits:
    """A connection's two buckets: one for all messages, one for strikes (refused or bad input).

    ``admit`` says whether to process a message; ``strike`` records a refusal and says whether the
    connection has earned a policy close (1008).
    """

    def __init__(self, policy: LimitPolicy) -> None:
        self._messages = TokenBucket(policy.messages_per_s, policy.message_burst)
        self._strikes = TokenBucket(policy.strikes_per_s, policy.strike_burst)

    def admit(self, now: float) -> bool:
        return self._messages.take(now)

    def strike(self, now: float) -> bool:
        """Count one bad or refused message; True when the connection must be closed."""
        return not self._strikes.take(now)
