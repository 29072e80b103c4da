"""Builders of ``system.error`` messages (docs/protocol.md, *Error codes*)."""

from __future__ import annotations

from typing import Any

from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.errors import ErrorCode, ProtocolError


def error(
    code: ErrorCode,
    message: str,
    *,
    now: float,
    trace_id: str | None = None,
    in_reply_type: str | None = None,
    action_id: str | None = None,
    vote_id: str | None = None,
) -> dict[str, Any]:
    in_reply_to: dict[str, Any] = {"trace_id": trace_id, "type": in_reply_type}
    if action_id is not None:
        in_reply_to["action_id"] = action_id
    if vote_id is not None:
        in_reply_to["vote_id"] = vote_id
    payload = {
        "code": code.value,
        "message": message,
        "retryable": ProtocolError(code, message).retryable,
        "in_reply_to": in_reply_to,
    }
    return codec.envelope(t.ERROR, payload, ts=now, trace_id=trace_id)


def pong(*, now: float, trace_id: str) -> dict[str, Any]:
    """The ``system.pong`` answering a ``system.ping`` (its trace id, or one made for it)."""
    return codec.envelope(t.PONG, {}, ts=now, trace_id=trace_id)


def from_protocol_error(exc: ProtocolError, *, now: float) -> dict[str, Any]:
    return error(
        exc.code,
        exc.message,
        now=now,
        trace_id=exc.trace_id,
        in_reply_type=exc.type,
        action_id=exc.action_id,
        vote_id=exc.vote_id,
    )
