"""Encoding and decoding of envelopes: orjson, timestamps, trace ids.

Events are encoded once and spliced with their ``seq`` as bytes (``with_seq``), so a broadcast
costs one ``orjson.dumps`` however many members receive it, and the Redis Lua script can insert the
``seq`` it allocates without decoding the JSON.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from datetime import datetime
from typing import Any, Final

import orjson

from party_sync.protocol.errors import PartySyncError

_SEQ_PREFIX = b'{"seq":'

#: Deepest nesting of objects and arrays accepted from outside (client frames, API bodies); the
#: outermost object is level 1, so an ``action.request``'s free-form ``payload.payload`` may nest
#: 61 more. orjson parses up to 1,024 levels but encodes only ~254: without this bound a message
#: that parsed could not be re-encoded for the engine link (docs/security.md).
MAX_DEPTH: Final = 64
#: What orjson says when a document exceeds its own parse limit (1,024 levels).
_ORJSON_DEPTH_ERROR: Final = "depth limit exceeded"


def encode(message: dict[str, Any]) -> bytes:
    """Encode a message as compact UTF-8 JSON."""
    return orjson.dumps(message)


def decode(data: bytes | str) -> Any:
    """Decode JSON; raises ``ValueError`` (orjson.JSONDecodeError) on bad JSON or bad UTF-8."""
    return orjson.loads(data)


class TooDeep(PartySyncError, ValueError):
    """A JSON document nested deeper than allowed (a ``ValueError``: callers that only know
    "bad JSON" still refuse it; callers that know better catch it first).

    ``value``: the decoded document when it could be decoded at all (nested deeper than
    ``max_depth`` but within orjson's own limit), so that a refusal can name what it refuses
    (its type, action or vote id); None otherwise.
    """

    def __init__(self, message: str, value: Any = None) -> None:
        super().__init__(message)
        self.value = value


def decode_bounded(data: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """Decode JSON from outside; raise ``TooDeep`` if it nests deeper than ``max_depth``, else
    ``ValueError`` on bad JSON or bad UTF-8.

    The depth walk runs only when the text is longer than ``2 * max_depth`` bytes and has more
    opening brackets than ``max_depth`` (two ``count`` calls in C; no measurable cost on a
    normal action), and it stops at the first container too deep. Its cost is one step per
    container, so it is bounded by the message size limit (for a frame made of thousands of
    tiny containers it costs a few times the parse itself).
    """
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith(_ORJSON_DEPTH_ERROR):
            raise TooDeep(f"JSON nested deeper than {max_depth} levels") from None
        raise
    # Nesting d levels takes at least 2d bytes: short messages skip even the count.
    if (
        len(data) > 2 * max_depth
        and _openings(data) > max_depth
        and nesting_exceeds(value, max_depth)
    ):
        raise TooDeep(f"JSON nested deeper than {max_depth} levels", value)
    return value


def undecodable(data: bytes | str, exc: ValueError) -> str:
    """Why ``data`` is not UTF-8 JSON, from the decoder's error: orjson's reason says where and
    what ("unexpected character ... char 1", "number is infinity when parsed as double"), never
    the input itself; for bytes that are not UTF-8 it says "surrogates not allowed" at char 0,
    so those are named here instead (the byte where UTF-8 breaks)."""
    why = str(exc)[:160]
    if isinstance(data, bytes):
        try:
            data.decode()
        except UnicodeDecodeError as bad:
            why = f"not UTF-8 at byte {bad.start}"
    return why


def _openings(data: bytes | str) -> int:
    """An upper bound of the nesting depth of ``data`` (brackets inside strings count too)."""
    if isinstance(data, str):
        return data.count("{") + data.count("[")
    return data.count(b"{") + data.count(b"[")


def nesting_exceeds(value: Any, limit: int) -> bool:
    """True if ``value`` (plain dicts and lists, as orjson makes them) nests objects and arrays
    more than ``limit`` levels deep. Iterative: no recursion limit, whatever the input; one step
    per container, at most ``limit + 1`` levels."""
    level = [value] if type(value) in _CONTAINERS else []
    depth = 0
    while level:  # one level at a time: no recursion, and no bookkeeping per container
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        append = below.append
        for node in level:
            # orjson makes exact dicts and lists: type() is enough, and cheaper than isinstance
            for child in node.values() if type(node) is dict else node:
                if type(child) in _CONTAINERS:
                    append(child)
        level = below
    return False


_CONTAINERS: Final = (dict, list)


def with_seq(body: bytes, seq: int) -> bytes:
    """Insert ``"seq": seq`` as the first member of an encoded JSON object (``body`` has no seq)."""
    if body == b"{}":
        return b'{"seq":%d}' % seq
    return b'{"seq":%d,%b' % (seq, body[1:])


def has_seq_prefix(data: bytes) -> bool:
    return data.startswith(_SEQ_PREFIX)


_SEQ_VALUE: Final = re.compile(rb'\{"seq":(\d+)[,}]')


def seq_of(data: bytes) -> int | None:
    """The ``seq`` of an encoded party event (``with_seq`` put it first); None for a message
    without one (``system.error``, ``system.hello``) or one that is not an encoded event."""
    found = _SEQ_VALUE.match(data)
    return int(found[1]) if found else None


def with_seq_replaced(data: bytes, seq: int) -> bytes:
    """An encoded party event (``seq_of(data)`` is not None) with its ``seq`` set to ``seq``."""
    found = _SEQ_VALUE.match(data)
    assert found is not None, "not an encoded party event"
    return b'{"seq":%d%b' % (seq, data[found.end(1) :])


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


def parse_time(value: object) -> float | None:
    """An RFC 3339 time with its offset (an envelope's ``timestamp``) as Unix seconds; None for
    anything else (absent, not a string, no offset, malformed)."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return None if moment.tzinfo is None else moment.timestamp()


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
