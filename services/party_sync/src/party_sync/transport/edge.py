"""The one API-key check of the HTTP API, and where routes find the rest of the edge.

``guarded(handler)`` is the only way a route asks for the server API key: the key (compared in
constant time, before anything else is read: 401 ``unauthorized``), then the id rule
(``protocol.ids``) on every path parameter, so no route can forget it: a bad id gets 400
``invalid_id`` before anything touches the backend (ids become Redis key and channel names).

What a route raises is answered by ``party_sync.problems`` (the table of statuses and codes, and
the middleware that applies it); the body is read by its ``read_body`` / ``read_json``, re-exported
here with ``problem`` (the RFC 9457 rendering) for the routes that import them from the edge.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from party_sync.problems import (
    InvalidId,
    Refused,
    Unauthorized,
    answer,
    problem,
    read_body,
    read_json,
)
from party_sync.protocol.ids import ID_RULE, is_id
from party_sync.transport.appkeys import API_KEY

__all__ = ["authorized", "guarded", "problem", "read_body", "read_json"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def authorized(request: web.Request) -> bool:
    """True if the request carries the configured API key (constant-time comparison)."""
    expected = request.app.get(API_KEY, "")
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else ""
    # compare_digest on equal-type bytes; an unset key matches nothing.
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def check(request: web.Request) -> None:
    """Raise ``Unauthorized`` without the key, then ``InvalidId`` for the first path parameter
    that breaks the id rule."""
    if not authorized(request):
        raise Unauthorized()
    for name, value in request.match_info.items():
        if not is_id(value):
            raise InvalidId(f"{name}: {ID_RULE}")


def guarded(handler: Handler) -> Handler:
    """``handler`` behind the API key (401 first) and the id rule of its path (400 next).

    The guard answers its own refusals (through the same table as the middleware) rather than
    leaving them to the middleware, so that a guarded route refuses even on an app without it."""

    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        try:
            check(request)
        except Refused as exc:
            refusal = answer(request, exc)
            assert refusal is not None  # both are in the table
            return refusal
        return await handler(request)

    return checked
