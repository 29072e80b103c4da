"""Encoding and decoding of envelopes: orjson, timestamps, trace ids.

Events are encoded once and spliced with their ``seq`` as bytes (``with_seq``), so a broadcast
costs one ``orjson.dumps`` however many members receive it, and the Redis Lua script can insert the
``seq`` it allocates without decoding the JSON.
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Any

import orjson

_SEQ_PREFIX = b'{"seq":'


def encode(message: dict[str, Any]) -> bytes:
    """Encode a message as compact UTF-8 JSON."""
    return orjson.dumps(message)


def decode(data: bytes | str) -> Any:
    """Decode JSON; raises ``ValueError`` (orjson.JSONDecodeError) on bad JSON or bad UTF-8."""
    return orjson.loads(data)


def with_seq(body: bytes, seq: int) -> bytes:
    """Insert ``"seq": seq`` as the first member of an encoded JSON object (``body`` has no seq)."""
    if body == b"{}":
        return b'{"seq":%d}' % seq
    return b'{"seq":%d,%b' % (seq, body[1:])


def has_seq_prefix(data: bytes) -> bool:
    return data.startswith(_SEQ_PREFIX)


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def rfc3339(ts: float) -> str:
    """Unix seconds as RFC 3339 UTC with milliseconds, e.g. ``2026-11-25T21:04:05.123Z``.

    Exactly what ``datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")`` gives
    (the fraction rounded half-even to microseconds, then truncated to milliseconds, as CPython
    does), at about a third of its cost: the text of the current second is kept, and only the
    milliseconds are formatted per call. Every envelope carries a timestamp, so this is per event.
    """
    fraction, whole = math.modf(ts)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole += 1.0
        micros -= 1_000_000
    elif micros < 0:  # before 1970
        whole -= 1.0
        micros += 1_000_000
    cached = _second
    if cached[0] != whole:
        cached[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        cached[0] = whole
    return f"{cached[1]}.{micros // 1000:03d}Z"


def new_trace_id() -> str:
    """A fresh W3C-style trace id: 32 lowercase hex characters."""
    return secrets.token_hex(16)


def envelope(
    type_: str, payload: dict[str, Any], *, ts: float, trace_id: str | None = None
) -> dict[str, Any]:
    """A server message without ``seq`` (the backend adds it to events)."""
    return {
        "type": type_,
        "timestamp": rfc3339(ts),
        "trace_id": trace_id or new_trace_id(),
        "payload": payload,
    }
