"""The one middleware of party_sync's server, the one API-key check of the HTTP API, and where
routes find the rest of the edge.

``edge_middleware`` is everything the server does around every request, in one coroutine frame:
it tells the connection guard a complete head arrived (its deadline is met) and when the handler
ends (``transport/guard.py``), answers what the handler raised by the one table
(``problems.answer_raised``), and counts the answered request by route and status. One frame,
not three middlewares, because an upgraded WebSocket is one request that lasts as long as the
socket: each middleware stays suspended for that whole time, and three of them cost about half a
KiB per open connection (bench/analysis.md, section 15).

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
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from party_sync.problems import (
    InvalidId,
    Refused,
    Render,
    Unauthorized,
    answer,
    answer_raised,
    problem,
    read_body,
    read_json,
)
from party_sync.protocol.ids import ID_RULE, is_id
from party_sync.transport.appkeys import API_KEY
from party_sync.transport.guard import guarded_connection

__all__ = ["authorized", "edge_middleware", "guarded", "problem", "read_body", "read_json"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: What counts an answered request: ``(request, status, started)`` (``Metrics.count_request``).
CountRequest = Callable[[web.Request, int, float], None]


def edge_middleware(count: CountRequest | None = None, render: Render = problem) -> Middleware:
    """The server's one middleware (the module's docstring): head deadline, answers, counts.

    In that order from the outside in, as three middlewares would be: the guard hears of the
    request first and last, and a refusal is counted with the status it was answered with. An
    upgraded WebSocket (101) is a session, not a request: it is not counted."""

    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        connection = guarded_connection(request)
        if connection is not None:
            connection.request_started()
        started = time.perf_counter()
        status = 500
        try:
            try:
                response = await handler(request)
            except (web.HTTPException, TimeoutError):
                raise
            except Exception as exc:
                response = await answer_raised(request, exc, render)
            status = response.status
            if status == 101 and isinstance(response, web.WebSocketResponse):
                status = 0
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            if connection is not None:
                connection.request_finished()
            if status and count is not None:
                count(request, status, started)

    return edge


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
