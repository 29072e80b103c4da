"""One exception root and the stable error codes of ``system.error`` (docs/protocol.md).

Every exception party_sync raises on purpose derives from ``PartySyncError``; where a class lives
elsewhere (next to the code that raises it), its module is named. ``(ValueError)`` marks classes
that are also ``ValueError``s, for callers that catch that::

    PartySyncError
    ├── ProtocolError          a client message was refused; carries an ErrorCode, becomes
    │                          system.error
    ├── InvalidEvent           an event (from an engine or the HTTP API) breaks its schema or may
    │   │                      not be published
    │   └── NarrationConflict  a narration piece that cannot follow its stream
    ├── SchemaViolation        a message does not match its schema (protocol/schemas.py)
    ├── TooDeep (ValueError)   JSON nested deeper than allowed (protocol/codec.py)
    ├── AuthError              a WebSocket handshake was refused (HTTP 401 / 403)
    ├── InitDataError          Telegram initData refused (initdata.py)
    ├── BackendUnavailable     the backend (Redis) cannot be reached; retryable
    ├── VoteConflict           a party already has an open vote
    ├── SpecError (ValueError) a vote that cannot be started as asked (core/votes.py)
    ├── InvalidMembership (ValueError)
    │                          a membership that breaks the rules (backends/directory.py)
    ├── EngineRejected         an engine refused an action (re-exported by engine/interface.py)
    ├── ConfigError            the configuration is unusable
    ├── Refused                an HTTP request refused (problems.py); one class per answer:
    │   ├── Unauthorized, InvalidId, InvalidQuery, NotFound, InvalidDisplayName,
    │   │   OperatorBlocked, BodyTooLarge, BodyTimeout, BadJson          (the HTTP API)
    │   ├── TelegramNotConfigured, OriginNotAllowed, BadSignInRequest, MalformedInitData,
    │   │   InvalidInitData, ExpiredInitData, NotAMember                 (Telegram sign-in)
    │   └── InvalidDelivery, DeadlinePassed, EngineFailed                (the engine host)
    ├── _Unreached, _Retryable a delivery's outcome inside HttpEngineLink (engine/http_link.py)
    ├── ClientError            the Python client's errors (client/events.py): ActionFailed,
    │                          VoteRefused, ClientClosed, ConnectRefused
    ├── HandshakeRejected      the client's upgrade was refused (client/transport.py)
    └── TransportError         the client's connection could not be made (client/transport.py)

Where each one ends up is decided in one place per way out: ``ProtocolError.code`` is the
``system.error`` code (the gateway sends it); ``problems.PROBLEMS`` maps every class an HTTP route
raises to its status and stable code. Foreign exceptions (redis, jsonschema_rs, jwt, aiohttp) are
converted to these at the edge, so nothing internal ever reaches a client: a client sees only a
stable ``code`` and a human message.
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
    PROTOCOL_ERROR = 1002  # a frame breaks RFC 6455 (the transport refused it)
    ABNORMAL_CLOSURE = 1006  # no close frame: the heartbeat's pong did not come (dropped)
    INVALID_DATA = 1007  # a text frame that is not UTF-8 (the transport may refuse it so)
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


class NarrationConflict(InvalidEvent):
    """A narration piece that cannot follow its stream: an index past the next one (a gap), a
    piece after the stream's last (``done``), a stream over its length, or too many open streams
    in the party (the API answers 409 ``narration_conflict``). A piece the stream already has is
    not a conflict: it is accepted again and changes nothing."""


class IdempotencyKeyReused(InvalidEvent):
    """A publish under an ``Idempotency-Key`` that was used, within ``action_record_ttl``, for
    another request: other events, or another number of them (the API answers 422
    ``idempotency_key_reused``). Nothing of it is published: answering the first request's seqs
    would say these events were published when they were not."""


class AuthError(PartySyncError):
    """A refused handshake. ``status`` is the HTTP status to answer (401 or 403; 503 when the
    token cannot be judged yet: ``auth.CLOCK_UNKNOWN``)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class BackendUnavailable(PartySyncError):
    """The backend cannot be reached right now (e.g. Redis is down); the caller may retry."""


class VoteConflict(PartySyncError):
    """A party already has an open vote (the API answers 409)."""


class EngineRejected(PartySyncError):
    """Raised by an engine (or reported by a link) when it refuses an action as invalid.

    The acting player gets ``system.error`` with code ``action_rejected`` and this message; the
    action is not recorded as done, so nothing is broadcast. Engines import it from
    ``party_sync.engine.interface`` (or ``party_sync.engine``), which re-export it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(PartySyncError):
    """The configuration is unusable; the message says which setting and why."""


class EngineStartError(PartySyncError):
    """The engine raised in ``start`` (its database unreachable, say): the message names what
    it raised. ``serve``, ``engine-http`` and ``engine-worker`` exit 1 with it, in one line."""


class ListenError(PartySyncError):
    """The server cannot listen on its address (in use, not permitted, not on this host); the
    message names the address and the system's reason. ``party-sync serve`` exits 1 with it."""


def one_line(error: BaseException | str) -> str:
    """An error's text as the one line a command prints for it: a library's message may carry
    line breaks of its own (a database driver's hint on a second line, tab-indented)."""
    return " ".join(str(error).split())
