"""What every HTTP API handler does first, in one place: the key, the path ids, the body.

- ``authorized``: the server API key, compared in constant time, before anything else is read;
- ``guarded(handler)``: the key check, then the id rule (``protocol.ids``) on every path
  parameter, so no route can forget it: a bad id gets 400 ``invalid_id`` before anything touches
  the backend (ids become Redis key and channel names);
- ``read_body``: the *whole* body, however many TCP segments it arrives in, bounded by a limit
  (413 ``too_large`` beyond it) and by ``request_body_timeout`` (408 ``body_timeout``, and the
  connection is closed: a client that trickles a body cannot hold a handler);
- ``decode_body``: JSON nested at most ``codec.MAX_DEPTH`` levels (400 ``too_deep``), else 400
  ``bad_json``.

Refusals are RFC 9457 problem details (``application/problem+json``): ``{"type": "about:blank",
"title": <the status phrase>, "status", "detail": <sentence>, "error": <stable code>, "code": <the
same code>}`` (``problem``). ``error`` is the field clients have always matched on; ``code`` is its
RFC 9457-style alias; ``type`` stays ``about:blank`` because the status and the code say it all.
The detail never echoes input.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web

from party_sync.config import Settings
from party_sync.protocol import codec
from party_sync.protocol.ids import ID_RULE, is_id
from party_sync.transport.appkeys import API_KEY, GATEWAY

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

UNAUTHORIZED: Final = ("unauthorized", "missing or wrong API key")
INVALID_ID: Final = "invalid_id"
TOO_LARGE: Final = "too_large"
BODY_TIMEOUT: Final = "body_timeout"
TOO_DEEP: Final = "too_deep"
BAD_JSON: Final = "bad_json"


#: The media type of every refusal (RFC 9457).
PROBLEM_JSON: Final = "application/problem+json"


def problem_body(status: int, error: str, detail: str) -> dict[str, str | int]:
    """The RFC 9457 problem details of a refusal; ``error`` and ``code`` are the stable code."""
    return {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "error": error,
        "code": error,
    }


def problem(
    status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A refusal with ``status``: problem details (``problem_body``) as ``PROBLEM_JSON``."""
    return web.json_response(
        problem_body(status, error, detail),
        status=status,
        headers=headers,
        content_type=PROBLEM_JSON,
    )


def authorized(request: web.Request) -> bool:
    """True if the request carries the configured API key (constant-time comparison)."""
    expected = request.app.get(API_KEY, "")
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else ""
    # compare_digest on equal-type bytes; an unset key matches nothing.
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def bad_path_id(request: web.Request) -> str | None:
    """The name of the first path parameter that breaks the id rule, or None."""
    for name, value in request.match_info.items():
        if not is_id(value):
            return name
    return None


def invalid_id(name: str) -> web.Response:
    return problem(400, INVALID_ID, f"{name}: {ID_RULE}")


def guarded(handler: Handler) -> Handler:
    """``handler`` behind the API key (401 first) and the id rule of its path (400 next)."""

    async def checked(request: web.Request) -> web.StreamResponse:
        if not authorized(request):
            return problem(401, *UNAUTHORIZED)
        bad = bad_path_id(request)
        if bad is not None:
            return invalid_id(bad)
        return await handler(request)

    checked.__name__ = getattr(handler, "__name__", "handler")
    checked.__doc__ = handler.__doc__
    return checked


async def read_body(request: web.Request, limit: int) -> bytes | web.Response:
    """The whole request body, or the response that refuses it: 413 ``too_large`` beyond
    ``limit`` bytes, 408 ``body_timeout`` (connection closed) after ``request_body_timeout``.

    ``StreamReader.read(n)`` returns what has *arrived so far* (at most ``n``), so one call would
    cut a body that crosses a TCP segment boundary; this reads until the end of the body (or until
    the limit is passed: a declared or chunked body is never buffered beyond ``limit + 1``).
    """
    if request.content_length is not None and request.content_length > limit:
        return too_large(limit)
    gateway = request.app.get(GATEWAY)
    timeout = (gateway.settings if gateway is not None else Settings()).request_body_timeout
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await request.content.read(limit + 1 - size)
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > limit:
                    return too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        return await _refuse_and_close(
            request, problem(408, BODY_TIMEOUT, f"the body did not arrive within {timeout:g} s")
        )


async def _refuse_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response`` now, then close the connection: aiohttp would otherwise keep reading
    (and discarding) the rest of a slow body for its lingering time before closing."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


def too_large(limit: int, headers: Mapping[str, str] | None = None) -> web.Response:
    return problem(413, TOO_LARGE, f"body exceeds {limit} bytes", headers)


def decode_body(body: bytes) -> Any | web.Response:
    """The decoded JSON, or the 400 that refuses it (``too_deep`` or ``bad_json``)."""
    try:
        return codec.decode_bounded(body)
    except codec.TooDeep:
        return problem(400, TOO_DEEP, f"body nests deeper than {codec.MAX_DEPTH} levels")
    except ValueError:
        return problem(400, BAD_JSON, "body is not valid UTF-8 JSON")


async def read_json(request: web.Request, limit: int) -> Any | web.Response:
    """``read_body`` then ``decode_body``: the JSON body, or the response that refuses it."""
    body = await read_body(request, limit)
    if isinstance(body, web.Response):
        return body
    return decode_body(body)
