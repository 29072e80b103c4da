"""Builders of ``system.error`` messages (docs/protocol.md, *Error codes*)."""

from __future__ import annotations

import unicodedata
from typing import Any, Final

from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.errors import RETRYABLE, ErrorCode, ProtocolError

MESSAGE_MAX: Final = 500
"""``system.error``'s ``message`` is 1 to 500 characters (its schema)."""

# Characters that reorder or hide the text around them: the bidirectional embeddings,
# overrides and isolates and the marks (a message shown in a Mini App must not turn the
# player's screen around: "Trojan Source").
_BIDI: Final = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def readable(message: str, code: ErrorCode) -> str:
    """``message`` as a ``system.error`` may carry it, whoever wrote it (an engine's refusal
    passes its own words): control characters (newlines, escapes, NUL) become spaces, runs of
    white space one space (none at either end), bidirectional controls are dropped, a lone
    surrogate (which no JSON encoder takes) becomes U+FFFD, and the text is cut to
    ``MESSAGE_MAX`` characters (ending in "…"); a message with nothing to see (empty, or only
    spaces, format characters and combining marks) says its code."""
    if (
        message.isascii()
        and message.isprintable()
        and 0 < len(message) <= MESSAGE_MAX
        and message[0] != " " != message[-1]
        and "  " not in message
    ):
        return message  # (every message party_sync writes itself)
    kept: list[str] = []
    for char in message:
        if char in _BIDI:
            continue
        category = unicodedata.category(char)
        if category == "Cc" or category in ("Zl", "Zp"):
            char = " "
        elif category == "Cs":
            char = "\ufffd"
        kept.append(char)
    said = " ".join("".join(kept).split())
    if not any(unicodedata.category(char)[0] not in "CMZ" for char in said):
        # nothing to see: empty, or only format characters (zero-width spaces, a BOM),
        # combining marks and spaces (recheck probe: a message of U+200B U+FEFF was sent)
        return code.value.replace("_", " ")
    return said if len(said) <= MESSAGE_MAX else said[: MESSAGE_MAX - 1].rstrip() + "…"


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
        "message": readable(message, code),
        "retryable": code in RETRYABLE,
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
