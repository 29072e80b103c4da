"""The one middleware of party_sync's server, the one API-key check of the HTTP API, and where
routes find the rest of the edge.

``edge_middleware`` (an ``Edge``) is everything the server does around every request, in one
coroutine frame: it tells the connection guard a complete head arrived (its deadline is met) and
when the handler ends (``transport/guard.py``), answers what the handler raised by the one table
(``problems.answer_raised``), and counts the answered request by route and status. One frame,
not three middlewares, because an upgraded WebSocket is one request that lasts as long as the
socket: each middleware stays suspended for that whole time, and three of them cost about half a
KiB per open connection (bench/analysis.md, section 15). And for ``/ws`` not even that one: a
handler marked with ``session_handler`` is called straight through and runs only its handshake
under the edge (``Edge.around``), so nothing of the edge's stays on the stack while its socket is
open (about 0.35 KiB per open WebSocket, section 19).

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
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from aiohttp import web

from party_sync.problems import (
    InvalidId,
    Refused,
    Render,
    Unauthorized,
    answer,
    answer_raised,
    bearer_matches,
    problem,
    read_body,
    read_json,
    routing_answer,
)
from party_sync.protocol.ids import ID_RULE, is_id
from party_sync.transport.appkeys import API_KEY
from party_sync.transport.guard import guarded_connection

__all__ = [
    "Edge",
    "authorized",
    "edge_middleware",
    "guarded",
    "problem",
    "read_body",
    "read_json",
    "session_handler",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: What counts an answered request: ``(request, status, started)`` (``Metrics.count_request``).
CountRequest = Callable[[web.Request, int, float], None]


#: Where the HTTP API lives: every error there is a problem (``Edge._api_routing_error``).
API_PREFIX: Final = "/api/"

#: The attribute that marks a session handler (``session_handler``).
_SESSION = "party_sync_session"

T = TypeVar("T")


class Edge:
    """The server's one middleware (the module's docstring): head deadline, answers, counts.

    In that order from the outside in, as three middlewares would be: the guard hears of the
    request first and last, and a refusal is counted with the status it was answered with.

    A session handler (``session_handler``: ``/ws``) is called straight through, so that no frame
    of the middleware stays suspended for the life of its socket; it runs only its handshake
    through ``around`` (the same deadline, answers and counts), and its session afterwards."""

    __middleware_version__ = 1  # a new-style aiohttp middleware (what @web.middleware marks)

    def __init__(self, count: CountRequest | None = None, render: Render = problem) -> None:
        self._count = count
        self._render = render

    def __call__(self, request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        if getattr(handler, _SESSION, False):
            return handler(request)  # the handler's own coroutine: no frame of ours around it
        return self.around(request, handler)

    async def around(
        self, request: web.Request, step: Callable[[web.Request], Awaitable[T]]
    ) -> T | web.StreamResponse:
        """Run ``step`` (a handler, or a session's handshake) under the edge: what it raises is
        answered by the table; an answer is counted by route and status, and a result that is
        not a response (an opened session) or a 101 is not counted: it is a session, not a
        request."""
        connection = guarded_connection(request)
        if connection is not None:
            connection.request_started()
        started = time.perf_counter()
        status = 500
        try:
            try:
                result: T | web.StreamResponse = await step(request)
            except (web.HTTPException, TimeoutError):
                raise
            except Exception as exc:
                result = await answer_raised(request, exc, self._render)
            if not isinstance(result, web.StreamResponse):
                status = 0
            else:
                status = result.status
                if status == 101 and isinstance(result, web.WebSocketResponse):
                    status = 0
            return result
        except web.HTTPException as exc:
            status = exc.status
            answered = self._api_routing_error(request, exc)
            if answered is None:
                raise
            return answered
        finally:
            if connection is not None:
                connection.request_finished()
            if status and self._count is not None:
                self._count(request, status, started)

    def _api_routing_error(
        self, request: web.Request, exc: web.HTTPException
    ) -> web.Response | None:
        """aiohttp's own 404 (no such route) and 405 (no such method), which it answers in plain
        text, answered as problems under ``/api/``, where every error is one (README: The API
        description): 404 ``not_found``, 405 ``method_not_allowed`` with its ``Allow`` header."""
        if not request.path.startswith(API_PREFIX):
            return None
        return routing_answer(request, exc, self._render)


def edge_middleware(count: CountRequest | None = None, render: Render = problem) -> Edge:
    """The server's one middleware (``Edge``); ``count`` counts answered requests."""
    return Edge(count, render)


def session_handler(handler: Handler) -> Handler:
    """Mark ``handler`` as a session handler: the edge middleware calls it straight through, and
    it runs its handshake through ``Edge.around`` itself (``transport/http.py``'s ``/ws``)."""
    setattr(handler, _SESSION, True)
    return handler


def authorized(request: web.Request) -> bool:
    """True if the request carries the configured API key (constant-time comparison)."""
    return bearer_matches(request, request.app.get(API_KEY, ""))


def check(request: web.Request) -> None:
    """Raise ``Unauthorized`` without the key, then ``InvalidId`` for the first path parameter
    that breaks the id rule."""
    if not authorized(request):
        raise Unauthorized(
            Unauthorized.WRONG_KEY if API_KEY in request.app else Unauthorized.NO_KEY
        )
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
