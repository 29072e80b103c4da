"""Checking one client message, in the order that gives each kind of bad input its own code.

size → JSON → depth → shape → known type → client type → schema. Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.errors import ErrorCode, ProtocolError
from party_sync.protocol.ids import is_id, is_trace_id
from party_sync.protocol.schemas import Contracts, SchemaViolation


def _echo_id(value: Any) -> str | None:
    """An id from a refused message, echoed in ``in_reply_to`` only if it is a well-formed id."""
    return value if is_id(value) else None


@dataclass(frozen=True, slots=True)
class Inbound:
    """A valid client message. ``trace_id`` is the client's, or one the server made for it."""

    type: str
    message: dict[str, Any]
    payload: dict[str, Any]
    trace_id: str
    client_trace_id: str | None


def byte_length(data: bytes | str, limit: int) -> int:
    """The UTF-8 size of ``data``; exact whenever it could exceed ``limit``."""
    if isinstance(data, bytes):
        return len(data)
    if len(data) * 4 <= limit:  # no UTF-8 character takes more than 4 bytes
        return len(data)
    return len(data.encode("utf-8", "surrogatepass"))


def about(message: object) -> dict[str, Any]:
    """What a refusal of a raw (decoded, unchecked) message replies to: its client type, trace
    id, and action or vote id, each only when well formed; nothing for anything else."""
    if not isinstance(message, dict):
        return {}
    type_, payload = message.get("type"), message.get("payload")
    if type_ not in t.CLIENT_TYPES or not isinstance(payload, dict):
        return {}
    trace = message.get("trace_id")
    found: dict[str, Any] = {"type": type_, "trace_id": trace if is_trace_id(trace) else None}
    for key in ("action_id", "vote_id"):
        value = payload.get(key)
        if isinstance(value, str) and is_id(value):
            found[key] = value
    return found


#: How much of a too-large message is looked at to name what it was (bounded work).
_HEAD_BYTES = 4096
#: The tokens of a JSON text that say where a member stands: a key (a string and its colon),
#: any other string (skipped whole, so that braces inside it do not count), and the brackets.
_HEAD_TOKENS = re.compile(rb'"((?:[^"\\]|\\.)*)"(\s*:)?|[{}\[\]]')
_HEAD_STRING = re.compile(rb'\s*"([A-Za-z0-9._:-]{1,128})"')
#: Where each named member must stand: the top level, or the top level's ``payload``.
_HEAD_PLACES: dict[tuple[bytes, ...], str] = {
    (b"type",): "type",
    (b"trace_id",): "trace_id",
    (b"payload", b"action_id"): "action_id",
    (b"payload", b"vote_id"): "vote_id",
}


def _head_members(head: bytes) -> dict[str, str]:
    """The plain string members of ``_HEAD_PLACES`` found in a JSON text's head, each by its
    place (a ``payload.data.action_id`` is not the action's id), the first of each only."""
    found: dict[str, str] = {}
    path: list[bytes | None] = []  # the key of each open object (None: an array)
    key: bytes | None = None  # the last key read in the innermost open object
    for token in _HEAD_TOKENS.finditer(head):
        text = token.group(0)
        if text in (b"{", b"["):
            # b"" marks the top-level object, None an array (nothing in one is looked at)
            path.append(None if text == b"[" else (key if path else b""))
            key = None
        elif text in (b"}", b"]"):
            if path:
                path.pop()
            key = None
        elif token.group(2) is not None:  # a key
            key = token.group(1)
            if len(path) == 0 or path[0] != b"" or None in path:
                continue
            place = (*(step for step in path[1:] if step is not None), key)
            name = _HEAD_PLACES.get(place)
            value = _HEAD_STRING.match(head, token.end())
            if name is not None and name not in found and value is not None:
                found[name] = value.group(1).decode()
    return found


def _about_head(data: bytes | str) -> dict[str, Any]:
    """``about`` for a message too large to parse: its client type, trace id and action or vote
    id, when they stand plainly, each in its place, in its first 4 KiB (every error about an
    action names the action, and carries the trace id of the message it answers)."""
    head = data[:_HEAD_BYTES] if isinstance(data, bytes) else data[:_HEAD_BYTES].encode()
    members = _head_members(head)
    kind = members.get("type")
    if kind not in t.CLIENT_TYPES:
        return {}
    found: dict[str, Any] = {"type": kind}
    if is_trace_id(members.get("trace_id")):
        found["trace_id"] = members["trace_id"]
    wanted = "action_id" if kind == t.ACTION_REQUEST else "vote_id"
    value = members.get(wanted)
    if value is not None and is_id(value):
        found[wanted] = value
    return found


def parse(data: bytes | str, contracts: Contracts, max_bytes: int) -> Inbound:
    """Return the checked message or raise ``ProtocolError`` with the matching code."""
    if byte_length(data, max_bytes) > max_bytes:
        raise ProtocolError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"message exceeds the {max_bytes}-byte limit",
            **_about_head(data),
        )
    try:
        message = codec.decode_bounded(data)
    except codec.TooDeep as exc:
        # Nothing of a too-deep message is forwarded; its refusal names what it refuses (its
        # type, trace and action or vote id, each only if it is well formed and at the top).
        raise ProtocolError(
            ErrorCode.TOO_DEEP,
            f"message nests deeper than {codec.MAX_DEPTH} levels",
            **about(exc.value),
        ) from None
    except ValueError as exc:
        why = codec.undecodable(data, exc)
        text = (
            f"message is not valid UTF-8 JSON ({why})" if why else "message is not valid UTF-8 JSON"
        )
        raise ProtocolError(ErrorCode.BAD_JSON, text) from None
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message must be a JSON object")
    raw_trace = message.get("trace_id")
    client_trace = raw_trace if is_trace_id(raw_trace) else None
    type_ = message.get("type")
    payload = message.get("payload")
    if not isinstance(type_, str) or not isinstance(payload, dict):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            "message must have a string 'type' and an object 'payload'",
            trace_id=client_trace,
            type=type_ if isinstance(type_, str) else None,
        )
    shown_type = type_ if len(type_) <= 64 else None
    if type_ not in t.ALL_TYPES:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            "unknown message type",
            trace_id=client_trace,
            type=shown_type,
        )
    if type_ not in t.CLIENT_TYPES:
        raise ProtocolError(
            ErrorCode.SERVER_ONLY_TYPE,
            f"{type_} is sent by the server only",
            trace_id=client_trace,
            type=type_,
        )
    action_id = payload.get("action_id") if type_ == t.ACTION_REQUEST else None
    vote_id = payload.get("vote_id") if type_ == t.VOTE_CAST else None
    try:
        if "seq" in message:
            # Client messages never carry a seq (docs/protocol.md); a schema shared by both ways
            # (party.leave) allows one, with the server's fields (reason), on the server's copy.
            raise SchemaViolation("seq", "a client's message carries none")
        contracts.validate(type_, message)
    except SchemaViolation as exc:
        raise ProtocolError(
            ErrorCode.SCHEMA_VIOLATION,
            f"{type_} does not match its schema: {exc}",
            trace_id=client_trace,
            type=type_,
            action_id=_echo_id(action_id),
            vote_id=_echo_id(vote_id),
        ) from None
    return Inbound(type_, message, payload, client_trace or codec.new_trace_id(), client_trace)
