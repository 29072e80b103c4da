"""One exception root and the stable error codes of ``system.error`` (docs/protocol.md).

Exception tree::

    PartySyncError
    ├── ProtocolError      a client message was refused; carries an ErrorCode, becomes system.error
    ├── InvalidEvent       an engine tried to publish an event that breaks its schema
    ├── AuthError          a handshake was refused (HTTP 401 / 403)
    ├── BackendUnavailable the backend (Redis) cannot be reached; retryable
    ├── VoteConflict       a party already has an open vote
    └── ConfigError        the configuration is unusable

Foreign exceptions (redis, jsonschema_rs, jwt, aiohttp) are converted to these at the edge, so
nothing internal ever reaches a client: a client sees only ``code`` and a human ``message``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class ErrorCode(StrEnum):
    """Stable, machine-readable codes; the schema ``common.json#/$defs/error_code`` lists them."""

    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    SERVER_ONLY_TYPE = "server_only_type"
    SCHEMA_VIOLATION = "schema_violation"
    MESSAGE_TOO_LARGE = "message_too_large"
    TOO_DEEP = "too_deep"  # JSON nested deeper than codec.MAX_DEPTH (64) levels
    FORBIDDEN = "forbidden"
    ACTION_IN_FLIGHT = "action_in_flight"
    CHARACTER_BUSY = "character_busy"
    ACTION_TIMEOUT = "action_timeout"
    ACTION_REJECTED = "action_rejected"
    ENGINE_ERROR = "engine_error"
    ENGINE_UNAVAILABLE = "engine_unavailable"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    RATE_LIMITED = "rate_limited"
    VOTE_UNKNOWN = "vote_unknown"
    VOTE_CLOSED = "vote_closed"
    VOTE_BAD_OPTION = "vote_bad_option"
    TOKEN_EXPIRED = "token_expired"  # noqa: S105 (an error code, not a secret)
    INTERNAL_ERROR = "internal_error"


#: Codes after which sending the same message again may succeed.
RETRYABLE: Final = frozenset(
    {
        ErrorCode.ACTION_TIMEOUT,
        ErrorCode.ENGINE_ERROR,
        ErrorCode.ENGINE_UNAVAILABLE,
        ErrorCode.BACKEND_UNAVAILABLE,
        ErrorCode.RATE_LIMITED,
        ErrorCode.INTERNAL_ERROR,
        ErrorCode.CHARACTER_BUSY,
    }
)

#: Codes that count as *bad input* towards the per-connection abuse limit.
BAD_INPUT: Final = frozenset(
    {
        ErrorCode.BAD_JSON,
        ErrorCode.BAD_MESSAGE,
        ErrorCode.UNKNOWN_TYPE,
        ErrorCode.SERVER_ONLY_TYPE,
        ErrorCode.SCHEMA_VIOLATION,
        ErrorCode.MESSAGE_TOO_LARGE,
        ErrorCode.TOO_DEEP,
        ErrorCode.FORBIDDEN,
    }
)


class CloseCode:
    """WebSocket close codes party_sync uses (RFC 6455 §7.4 and the private 4000–4999 range)."""

    NORMAL = 1000  # after a voluntary party.leave
    GOING_AWAY = 1001  # server shutdown: reconnect (and resume) elsewhere
    POLICY_VIOLATION = 1008  # flooding or too much bad input
    MESSAGE_TOO_BIG = 1009  # a frame far beyond the size limit (the transport refused it)
    INTERNAL_ERROR = 1011
    TOKEN_EXPIRED = 4001  # fetch a fresh token, then reconnect
    SLOW_CONSUMER = 4002  # the client could not keep up: reconnect and resume
    RESYNC = 4003  # the server lost continuity: reconnect without resume, take the snapshot
    DISCONNECTED = 4004  # an operator closed the character's connections (admin API)


class PartySyncError(Exception):
    """Root of every exception party_sync raises on purpose."""


class ProtocolError(PartySyncError):
    """A client message refused with a stable code; the gateway turns it into ``system.error``."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        action_id: str | None = None,
        vote_id: str | None = None,
        trace_id: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.action_id = action_id
        self.vote_id = vote_id
        self.trace_id = trace_id  # the offending message's trace_id, when it had one
        self.type = type  # the offending message's type, when it had one

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


class InvalidEvent(PartySyncError):
    """An event (from an engine or the HTTP API) that breaks its schema or is not publishable."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AuthError(PartySyncError):
    """A refused handshake. ``status`` is the HTTP status to answer (401 or 403)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class BackendUnavailable(PartySyncError):
    """The backend cannot be reached right now (e.g. Redis is down); the caller may retry."""


class VoteConflict(PartySyncError):
    """A party already has an open vote (the API answers 409)."""


class ConfigError(PartySyncError):
    """The configuration is unusable; the message says which setting and why."""
