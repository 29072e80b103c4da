"""The security tier's oracle: what the server must answer to one client frame, from the schemas.

``expect(frame)`` predicts the *reply* a frame earns from nothing but the JSON Schemas in
``contracts/jsonschema/party_sync`` (through ``party_sync.protocol.schemas.Contracts``), the
stable ``ErrorCode`` set and the documented order of checks (docs/protocol.md: size → JSON →
shape → known type → client type → schema → authorisation). ``check_error`` checks one
``system.error`` against such a prediction. Every message a client receives is also checked
against its own schema (``ps_testkit.client.check_server_message``, called by ``Client.recv``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from party_sync.protocol import types as t
from party_sync.protocol.errors import RETRYABLE, ErrorCode

from ps_testkit.client import CONTRACTS

ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

#: The codes a frame refused before it is understood may get (nothing else may answer it).
STABLE_CODES: Final = frozenset(code.value for code in ErrorCode)

#: Codes an accepted-by-schema action of the connection's own character may get instead of its
#: ``action.result`` (a repeated action_id, or another action of the character still in flight).
ACTION_RACES: Final = frozenset({ErrorCode.ACTION_IN_FLIGHT.value, ErrorCode.CHARACTER_BUSY.value})

#: Close codes that end a connection after transport-level garbage (RFC 6455): never after a
#: frame that is a well-formed WebSocket message below the size limit.
TRANSPORT_CLOSES: Final = frozenset({1002, 1007, 1009})


@dataclass(frozen=True)
class Binding:
    """Who the fuzzing connection is."""

    party_id: str
    campaign_run_id: str
    character_id: str


@dataclass
class Expected:
    """The reply one frame must get.

    ``kind``: ``error`` (a ``system.error`` with ``code`` — or, when ``code`` is None, any code
    of ``codes``), ``action`` (an ``action.result`` for ``action_id``, or a race error naming
    it), ``leave`` (the connection's own voluntary leave: a ``party.leave`` event), ``close``
    (the transport closes the connection with one of ``TRANSPORT_CLOSES``).
    """

    kind: str
    code: str | None = None
    codes: frozenset[str] = field(default_factory=frozenset)
    action_id: str | None = None
    vote_id: str | None = None
    type: str | None = None


def depth(value: Any) -> int:
    """Nesting depth of decoded JSON (a scalar is 0, ``[]`` is 1)."""
    best = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            level += 1
            stack.extend((v, level) for v in item.values())
        elif isinstance(item, list):
            level += 1
            stack.extend((v, level) for v in item)
        best = max(best, level)
    return best


def _id(value: Any) -> str | None:
    return value if isinstance(value, str) and ID.fullmatch(value) else None


def expect(data: bytes, binding: Binding, max_bytes: int) -> Expected:
    """The reply a frame carrying ``data`` must get from a connection bound to ``binding``."""
    if len(data) > 4 * max_bytes:
        return Expected("close")
    if len(data) > max_bytes:
        return Expected("error", ErrorCode.MESSAGE_TOO_LARGE.value)
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        return Expected("error", ErrorCode.BAD_JSON.value)
    if not isinstance(message, dict):
        return Expected("error", ErrorCode.BAD_MESSAGE.value)
    type_, payload = message.get("type"), message.get("payload")
    if not isinstance(type_, str) or not isinstance(payload, dict):
        return Expected("error", ErrorCode.BAD_MESSAGE.value)
    if type_ not in t.ALL_TYPES:
        return Expected("error", ErrorCode.UNKNOWN_TYPE.value)
    if type_ not in t.CLIENT_TYPES:
        return Expected("error", ErrorCode.SERVER_ONLY_TYPE.value, type=type_)
    action_id = _id(payload.get("action_id")) if type_ == t.ACTION_REQUEST else None
    vote_id = _id(payload.get("vote_id")) if type_ == t.VOTE_CAST else None
    if not CONTRACTS.is_valid(type_, message):
        code = ErrorCode.SCHEMA_VIOLATION.value
        return Expected("error", code, action_id=action_id, vote_id=vote_id, type=type_)
    forbidden = ErrorCode.FORBIDDEN.value
    if type_ == t.ACTION_REQUEST:
        assert action_id is not None
        if payload["character_id"] != binding.character_id:
            return Expected("error", forbidden, action_id=action_id, type=type_)
        if payload["campaign_run_id"] != binding.campaign_run_id:
            return Expected("error", forbidden, action_id=action_id, type=type_)
        return Expected("action", action_id=action_id, type=type_)
    if type_ == t.PARTY_LEAVE:
        if payload["character_id"] != binding.character_id:
            return Expected("error", forbidden, type=type_)
        return Expected("leave", type=type_)
    # vote.cast: the fuzzing party never has an open vote
    return Expected("error", ErrorCode.VOTE_UNKNOWN.value, vote_id=vote_id, type=type_)


def check_error(error: dict[str, Any], want: Expected, sent: bytes) -> None:
    """Fail unless ``error`` (a ``system.error``) is the refusal ``want`` describes."""
    assert error["type"] == t.ERROR, error
    p = error["payload"]
    code = p["code"]
    assert code in STABLE_CODES, f"unstable code {code!r} for {sent[:200]!r}"
    assert p["retryable"] is (ErrorCode(code) in RETRYABLE), error
    if want.code is not None:
        assert code == want.code, f"expected {want.code}, got {code} for {sent[:200]!r}: {p}"
    elif want.codes:
        assert code in want.codes, f"expected one of {sorted(want.codes)}, got {p}"
    reply_to = p["in_reply_to"]
    if want.action_id is not None:
        assert reply_to.get("action_id") == want.action_id, (sent[:200], p)
    if want.vote_id is not None:
        assert reply_to.get("vote_id") == want.vote_id, (sent[:200], p)
    if want.type is not None:
        assert reply_to["type"] == want.type, (sent[:200], p)


def ping(action_id: str, binding: Binding) -> dict[str, Any]:
    """A valid ``action.request`` of the connection's own character: a liveness probe."""
    return {
        "type": t.ACTION_REQUEST,
        "payload": {
            "action_id": action_id,
            "character_id": binding.character_id,
            "campaign_run_id": binding.campaign_run_id,
            "action_type": "skill_check",
            "payload": {},
        },
    }


__all__ = [
    "ACTION_RACES",
    "STABLE_CODES",
    "TRANSPORT_CLOSES",
    "Binding",
    "Expected",
    "check_error",
    "depth",
    "expect",
    "ping",
]
