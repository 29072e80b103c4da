"""What to do after a connection ends, and how long to wait before the next attempt (pure).

Close codes (docs/protocol.md, "Close codes"):

| Code | Next |
|---|---|
| 1000 (left the party, or closed by us) | stop |
| 1008 (policy violation: flooding, bad input) | stop: a client bug, retrying would repeat it |
| 4001 (token expired) | fetch a fresh token, reconnect and resume |
| 4003 (resync) | reconnect without a resume point |
| 4004 (disconnected by an operator) | resume after a long wait (half to all of the cap) |
| anything else (1001, 1006, 1009, 1011, 4002, ...) | reconnect and resume |

Handshake answers: 401 → fetch a fresh token (when there is a provider; once: a fresh token
refused again stops the client), 403 with ``Retry-After`` (an operator's block, until a time at
most ``MAX_BLOCK_WAIT`` away) → try again then (``blocked_for``), other 4xx → stop, anything else
(5xx, network errors) → retry.

Backoff is exponential with **full jitter** (AWS Architecture Blog, "Exponential Backoff and
Jitter"): attempt *n* waits ``uniform(0, min(cap, base * 2**n))``, so a crowd of clients cut off
at once does not come back in lockstep.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from enum import Enum

from party_sync.protocol.errors import CloseCode


class Next(Enum):
    STOP = "stop"
    RESUME = "resume"  # reconnect with epoch + last_seq
    RESYNC = "resync"  # reconnect without them
    REFRESH = "refresh"  # fetch a fresh token, then reconnect with epoch + last_seq
    LATER = "later"  # resume, after a long wait (``Backoff.long_delay``)


_AFTER_CLOSE = {
    CloseCode.NORMAL: Next.STOP,
    CloseCode.POLICY_VIOLATION: Next.STOP,
    CloseCode.TOKEN_EXPIRED: Next.REFRESH,
    CloseCode.RESYNC: Next.RESYNC,
    CloseCode.DISCONNECTED: Next.LATER,
}


#: What the server's handshake refusals mean (docs/protocol.md, "Connecting"); aiohttp's client
#: keeps the status and headers of a refused upgrade, not its body.
_HANDSHAKE_REASONS = {
    401: "the token was refused (missing, invalid, expired, or signed with another secret)",
    403: "forbidden (the page's Origin is not allowed, or an operator disconnected this player)",
    404: "no WebSocket endpoint at this URL (party_sync serves it at /ws: ws://host:port/ws)",
    429: "too many connections for this user on the node, or a cooldown after a 1008 close",
    503: "the node is not ready or is shutting down",
}


_DESCRIPTION = re.compile(r'error_description="((?:[^"\\]|\\.)*)"')
_ESCAPED = re.compile(r"\\(.)")


def handshake_reason(
    status: int, retry_after: str | None = None, fallback: str = "", challenge: str | None = None
) -> str:
    """A readable reason for a handshake refused with HTTP ``status`` (pure). ``challenge``: the
    401's ``WWW-Authenticate`` header, whose ``error_description`` says which check the token
    failed ("token expired", "bad token signature", ...)."""
    reason = _HANDSHAKE_REASONS.get(status, fallback or f"HTTP {status}")
    if status == 403 and retry_after:  # only an operator's block says until when
        reason = "an operator disconnected this player (disconnected_by_operator)"
    found = _DESCRIPTION.search(challenge) if challenge else None
    if found:
        said = _ESCAPED.sub(r"\1", found.group(1))
        reason = f"{said}: {reason}"
    return f"{reason}; retry after {retry_after} s" if retry_after else reason


#: The longest operator's block a client waits out (a 403's ``Retry-After``, seconds), as the
#: JavaScript client's ``MAX_BLOCK_WAIT_MS``; a longer one stops it, as any other 403.
MAX_BLOCK_WAIT = 86_400.0


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header (RFC 9110 §10.2.3: delay-seconds or an HTTP-date) as seconds from
    ``now`` (Unix seconds; the clock if None), at least 0; None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def blocked_for(status: int, retry_after: float | None) -> float | None:
    """Seconds to wait before trying again after a handshake refused with ``status`` and a
    ``Retry-After`` of ``retry_after`` seconds: an operator's block (403 until a time, at most
    ``MAX_BLOCK_WAIT`` away) is waited out; None for every other refusal (``after_handshake``).
    Clients probe: the Python client stopped for good on a one-minute block, which the
    JavaScript client waits out."""
    if status == 403 and retry_after is not None and 0 <= retry_after <= MAX_BLOCK_WAIT:
        return retry_after
    return None


def after_close(code: int | None) -> Next:
    """The next step after the server closed the connection with ``code`` (None: no code)."""
    return _AFTER_CLOSE.get(code or 0, Next.RESUME)


def after_handshake(status: int) -> Next:
    """The next step after the WebSocket handshake was answered with HTTP ``status``."""
    if status == 401:
        return Next.REFRESH
    if 400 <= status < 500 and status not in (408, 429):
        return Next.STOP
    return Next.RESUME


@dataclass(slots=True)
class Backoff:
    """Delays of successive attempts: ``random() * min(cap, base * 2**attempt)`` seconds."""

    base: float = 0.5
    cap: float = 30.0
    random: Callable[[], float] = field(default=random.random)

    def delay(self, attempt: int) -> float:
        """The wait before attempt ``attempt`` (0 = the first retry)."""
        ceiling = min(self.cap, self.base * 2.0 ** min(attempt, 64))
        return self.random() * ceiling

    def long_delay(self) -> float:
        """The wait after an operator's disconnect (4004): half to all of ``cap``."""
        return self.cap * (0.5 + 0.5 * self.random())
