"""HTTP refusals in one place: the exceptions routes raise, the one table of what each answers,
the one middleware that answers them, and the one body reader.

A route refuses a request by *raising* (a ``Refused`` below, or a domain exception such as
``BackendUnavailable``); it never builds an error response itself. ``PROBLEMS`` maps each
exception class an HTTP route may raise to its status, its stable code and, where the message
could say more than a client should see, a fixed detail. ``answer_errors`` is the aiohttp
middleware of both HTTP servers, party_sync's (``transport/http.py``) and the engine host's
(``engine/http_host.py``): it looks the exception up (through its class's MRO, so a subclass
answers like its base) and renders the answer. An exception missing from the table is a bug: it
is logged with its traceback and answered 500 ``internal_error`` with a fixed detail, nothing of
the exception.

party_sync's answers are RFC 9457 problem details (``application/problem+json``, ``problem``):
``{"type": "about:blank", "title": <the status phrase>, "status", "detail", "error": <stable
code>, "code": <the same>}``; ``error`` is the field clients have always matched on, ``code`` its
RFC 9457-style alias. The engine host keeps the older ``{"error", "detail"}`` JSON that
``HttpEngineLink`` and engines behind their own HTTP service speak (docs/engines.md): one table,
two renderings.

``read_body`` reads the *whole* body, however many TCP segments it arrives in, bounded by a size
(413 ``too_large``) and by ``request_body_timeout`` (408 ``body_timeout``, then the connection is
closed: a client that trickles a body cannot hold a handler); ``read_json`` also decodes it at most
``codec.MAX_DEPTH`` levels deep (400 ``too_deep``, else 400 ``bad_json``).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import socket
import weakref
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, TypeVar

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

from party_sync import initdata
from party_sync.backends.directory import InvalidMembership
from party_sync.config import Settings
from party_sync.core.votes import SpecError
from party_sync.protocol import codec
from party_sync.protocol.errors import (
    BackendUnavailable,
    EngineRejected,
    IdempotencyKeyReused,
    InvalidEvent,
    ListenError,
    NarrationConflict,
    PartySyncError,
    VoteConflict,
)

log = logging.getLogger(__name__)

#: The media type of party_sync's refusals (RFC 9457).
PROBLEM_JSON: Final = "application/problem+json"


# -- the refusals routes raise -------------------------------------------------------------------
class Refused(PartySyncError):
    """An HTTP request refused; its class says the status and code (``PROBLEMS``).

    ``str(exc)`` is the detail clients see when the table has no fixed one: a sentence that
    never echoes the input. ``headers`` are added to the answer (``Retry-After``, say)."""

    def __init__(self, detail: str = "", *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.headers: Mapping[str, str] = headers or {}


class Unauthorized(Refused):
    """The server API key is missing or wrong (``transport/edge.py guarded``), or this server
    has none, which turns its API off (said so: a caller's key is not the problem then)."""

    WRONG_KEY: Final = "missing or wrong API key"
    NO_KEY: Final = (
        "the server API is off: this server has no API key configured (PARTY_SYNC_API_KEY)"
    )

    def __init__(self, detail: str = WRONG_KEY, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)


def bearer_matches(request: web.Request, expected: str) -> bool:
    """True if the request's ``Authorization: Bearer`` is ``expected`` (constant-time; an empty
    ``expected`` matches nothing). The server API and the engine host check keys with it."""
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else ""
    # compare_digest on equal-type bytes. aiohttp decodes a header that is not UTF-8 with
    # surrogate escapes: "surrogatepass" turns any of them into bytes that match no key, where a
    # plain encode() raised (a 500 and a traceback, for anyone).
    return bool(expected) and hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode()
    )


class InvalidId(Refused):
    """A path id breaks the id rule (``protocol/ids.py``)."""


class InvalidQuery(Refused):
    """A query parameter is out of its range."""


class InvalidRequest(Refused):
    """A development-mode request body is not what the route takes (``POST /demo/token``)."""


class NotFound(Refused):
    """The party or membership asked for does not exist (or its state expired)."""


class InvalidDisplayName(Refused):
    """A display name breaks the name rule (``protocol/names.py``)."""


class OperatorBlocked(Refused):
    """An operator disconnected the character for a while (``transport/admin.py``)."""


class BodyTooLarge(Refused):
    """The body exceeds the route's limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"body exceeds {limit} bytes")


class BodyTimeout(Refused):
    """The body did not arrive in time; the connection is closed after the answer."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"the body did not arrive within {timeout:g} s")


class BadJson(Refused):
    """The body is not UTF-8 JSON; the detail says why, when the parser could tell (where it
    stopped and what it met: ``codec.undecodable``), never the body itself."""

    def __init__(
        self,
        detail: str = "body is not valid UTF-8 JSON",
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail, headers=headers)


class UnsupportedEncoding(BadJson):
    """The body's ``Content-Encoding`` is one this server does not decode: ``bad_json`` (400, as
    documented) with a detail that says so, and ``Accept-Encoding`` naming those it decodes (RFC
    9110 §12.5.3; the detail said "body is not valid UTF-8 JSON")."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail, headers={"Accept-Encoding": ACCEPTED_ENCODINGS})


class ShuttingDown(Refused):
    """The server began to shut down while this request's body was still arriving. From then on
    the HTTP server reads nothing more of a connection (aiohttp drops what a closing connection
    sends), so the body could never arrive whole: the request is answered at once, applied
    nowhere, instead of waiting out ``shutdown_timeout`` and being cut without an answer (ops
    probe). ``Retry-After``: send it again, to another node."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail, headers={"Retry-After": "1"})


class TelegramNotConfigured(Refused):
    """Telegram sign-in has neither a bot token nor a bot id (``transport/telegram.py``)."""


class OriginNotAllowed(Refused):
    """The ``Origin`` is not on the allowlist."""


class BadSignInRequest(Refused):
    """The sign-in body is not ``{init_data, party_id, character_id}`` with valid ids."""


class MalformedInitData(Refused):
    """initData is not a well-formed initData string (``initdata.MALFORMED``)."""


class InitDataTooLong(MalformedInitData):
    """initData over ``initdata.MAX_INIT_DATA_BYTES`` (said so, not "not well-formed": probe)."""


class InvalidInitData(Refused):
    """initData is not signed for this bot (``initdata.INVALID``)."""


class ExpiredInitData(Refused):
    """initData is too old or from the future (``initdata.EXPIRED``)."""


class NotAMember(Refused):
    """The membership directory does not bind the character to that Telegram user."""


class InvalidDelivery(Refused):
    """The engine host got a body that is not a valid delivery (``engine/http_host.py``)."""


class DeadlinePassed(Refused):
    """A first delivery arrived past the action's deadline: the engine was not called."""


class EngineFailed(Refused):
    """The engine raised (not ``EngineRejected``); the delivery may be retried."""


# -- the one table -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Problem:
    """What an exception class answers: ``status``, the stable ``code``, and ``detail`` when it
    is fixed (None: the exception's own message, written for clients)."""

    status: int
    code: str
    detail: str | None = None


#: ``backend_unavailable``'s words: a request Redis did not answer in time may have been applied
#: (a publish a stalled Redis ran once it resumed), so "retry" names the key that makes it safe.
UNAVAILABLE: Final = (
    "the backend did not answer in time; the outcome is not known: retry (a publish under its "
    "Idempotency-Key)"
)


#: Every exception an HTTP route raises on purpose → its answer. The OpenAPI document
#: (``transport/openapi.py``) describes the same statuses and codes; a test holds them equal.
PROBLEMS: Final[Mapping[type[Exception], Problem]] = {
    # every route of the server API: the key, the path ids, the body, the backend
    Unauthorized: Problem(401, "unauthorized"),  # WRONG_KEY, or NO_KEY
    InvalidId: Problem(400, "invalid_id"),
    BodyTooLarge: Problem(413, "too_large"),
    BodyTimeout: Problem(408, "body_timeout"),
    codec.TooDeep: Problem(400, "too_deep", f"body nests deeper than {codec.MAX_DEPTH} levels"),
    BadJson: Problem(400, "bad_json"),  # (its detail: why, as a WebSocket message's says)
    UnsupportedEncoding: Problem(
        400,
        "bad_json",
        "the body's Content-Encoding is not one this server decodes: gzip, deflate or none",
    ),
    BackendUnavailable: Problem(
        503,
        "backend_unavailable",
        UNAVAILABLE,
    ),
    ShuttingDown: Problem(
        503,
        "shutting_down",
        "this server is shutting down and stopped reading the body: nothing was applied; "
        "send the request again (another node takes it)",
    ),
    # publishing, votes and narration (transport/api.py)
    InvalidEvent: Problem(422, "invalid_event"),
    SpecError: Problem(422, "invalid_vote"),
    VoteConflict: Problem(409, "vote_open"),
    NarrationConflict: Problem(409, "narration_conflict"),  # an InvalidEvent, answered apart
    IdempotencyKeyReused: Problem(422, "idempotency_key_reused"),  # an InvalidEvent too
    # memberships (transport/members.py) and the admin API (transport/admin.py)
    InvalidMembership: Problem(422, "invalid_membership"),
    InvalidDisplayName: Problem(422, "invalid_display_name"),
    NotFound: Problem(404, "not_found"),
    InvalidQuery: Problem(400, "invalid_query"),
    InvalidRequest: Problem(422, "invalid_request"),
    OperatorBlocked: Problem(403, "disconnected_by_operator"),
    # Telegram sign-in (transport/telegram.py): fixed details only, nothing about what failed
    TelegramNotConfigured: Problem(
        503,
        "telegram_not_configured",
        "Telegram sign-in is not configured on this server "
        "(PARTY_SYNC_TELEGRAM_BOT_TOKEN or PARTY_SYNC_TELEGRAM_BOT_ID)",
    ),
    OriginNotAllowed: Problem(403, "origin_not_allowed", "origin not allowed"),
    BadSignInRequest: Problem(
        400,
        "bad_request",
        "body must be {init_data, party_id, character_id} (ids: [A-Za-z0-9._:-]{1,64})",
    ),
    MalformedInitData: Problem(
        400, initdata.MALFORMED, "init_data is not a well-formed Telegram initData string"
    ),
    InitDataTooLong: Problem(
        400,
        initdata.MALFORMED,
        f"init_data is longer than {initdata.MAX_INIT_DATA_BYTES} bytes (UTF-8): not Telegram's",
    ),
    InvalidInitData: Problem(401, initdata.INVALID, "init_data is not signed for this bot"),
    ExpiredInitData: Problem(
        401, initdata.EXPIRED, "init_data is too old or not yet valid: reopen the Mini App"
    ),
    NotAMember: Problem(
        403, "not_a_member", "this Telegram user may not play that character in that party"
    ),
    # the engine host (engine/http_host.py; its answers are read by HttpEngineLink)
    InvalidDelivery: Problem(422, "invalid"),
    DeadlinePassed: Problem(409, "expired", "the action's deadline passed before it started"),
    EngineRejected: Problem(422, "rejected"),
    EngineFailed: Problem(500, "engine_error", "engine failed"),
}

#: The answer to an exception missing from the table: a bug, told without any detail of it.
INTERNAL: Final = Problem(500, "internal_error", "internal error")


def problem_of(exc: BaseException) -> Problem | None:
    """The table's answer to ``exc`` (its class or the nearest base listed), or None."""
    for cls in type(exc).__mro__:
        found = PROBLEMS.get(cls)
        if found is not None:
            return found
    return None


# -- rendering -------------------------------------------------------------------------------------
#: (status, code, detail, headers) → the answer.
Render = Callable[[int, str, str, Mapping[str, str] | None], web.Response]


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
    """party_sync's rendering: problem details (``problem_body``) as ``PROBLEM_JSON``."""
    return web.json_response(
        problem_body(status, error, detail),
        status=status,
        headers=headers,
        content_type=PROBLEM_JSON,
    )


def error_json(
    status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The engine host's rendering: ``{"error": <code>, "detail"}`` as ``application/json``."""
    return web.json_response({"error": error, "detail": detail}, status=status, headers=headers)


#: Headers a route adds to every refusal it raises from then on (Telegram sign-in: no-store).
REFUSAL_HEADERS: Final = web.RequestKey[Mapping[str, str]]("refusal_headers")


def answer(request: web.Request, exc: Exception, render: Render = problem) -> web.Response | None:
    """The table's answer to ``exc`` raised while handling ``request``, or None if ``exc`` is not
    in the table."""
    found = problem_of(exc)
    if found is None:
        return None
    headers = {**request.get(REFUSAL_HEADERS, {})}
    if isinstance(exc, Refused):
        headers.update(exc.headers)
    detail = found.detail if found.detail is not None else str(exc)
    return render(found.status, found.code, detail, headers or None)


def answer_errors(render: Render = problem, *, routing: bool = False) -> Middleware:
    """The middleware that answers what handlers raise, by ``PROBLEMS``, rendered by ``render``
    (``answer_raised``; party_sync's own server applies it from its one edge middleware,
    ``transport/edge.py``). ``routing``: aiohttp's own plain-text 404 and 405 are answered in
    ``render``'s form too (``routing_answer``: an API where every error is JSON, the engine
    host's)."""

    @web.middleware
    async def answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except (web.HTTPException, TimeoutError) as exc:
            if routing and isinstance(exc, web.HTTPException):
                answered = routing_answer(request, exc, render)
                if answered is not None:
                    return answered
            raise
        except Exception as exc:
            return await answer_raised(request, exc, render)

    return answer_errors


def routing_answer(
    request: web.Request, exc: web.HTTPException, render: Render
) -> web.Response | None:
    """aiohttp's own 404 (no such route) and 405 (no such method), which it answers in plain
    text, rendered by ``render``: 404 ``not_found``, 405 ``method_not_allowed`` with its
    ``Allow`` header; None for any other exception (a handler's own answer stands)."""
    if exc.content_type != "text/plain":
        return None
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allow = exc.headers.get("Allow", "")
        detail = f"{request.method} is not allowed here"
        return render(405, "method_not_allowed", detail, {"Allow": allow})
    if isinstance(exc, web.HTTPNotFound):
        return render(404, "not_found", "no such resource", None)
    return None


#: The access log's status for a request whose client left before it could be answered (nginx's
#: "client closed request"; nothing is sent).
CLIENT_GONE: Final = 499


async def answer_raised(
    request: web.Request, exc: Exception, render: Render = problem
) -> web.StreamResponse:
    """The answer to ``exc``, raised by ``request``'s handler, by ``PROBLEMS``; called from an
    ``except`` block that has already let aiohttp's own ``HTTPException``s (a 404 for an unknown
    path, the WebSocket handshake's text refusals) and ``TimeoutError`` (aiohttp's 504) pass.
    Re-raises ``exc`` once a response is under way (an open WebSocket): no second answer can be
    sent then. An exception missing from the table is logged and answered 500."""
    if request.writer.output_size > 0:
        raise exc
    if isinstance(exc, ConnectionResetError) and request.transport is None:
        # The client went away before its answer (a WebSocket handshake given up while the
        # node waited on a stalled Redis: aiohttp's ``prepare`` raises "Connection lost"). Not
        # a server error: nobody is left to answer, and aiohttp drops a response it cannot send.
        log.info("client went away during %s %s", request.method, request.path)
        return web.Response(status=CLIENT_GONE)
    response = answer(request, exc, render)
    if response is None:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        log.error("unexpected error answering %s %s", request.method, route, exc_info=exc)
        return render(INTERNAL.status, INTERNAL.code, INTERNAL.detail or "", None)
    if isinstance(exc, BodyTimeout):
        await _send_and_close(request, response)
    return response


async def _send_and_close(request: web.Request, response: web.Response) -> None:
    """Send ``response`` now, then close the connection: aiohttp would otherwise keep reading
    (and discarding) the rest of a slow body for its lingering time before closing."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()


# -- the one body reader ---------------------------------------------------------------------------
#: Seconds a request has to deliver its whole body once its head arrived (``build_app`` sets
#: ``request_body_timeout``; without it, that setting's default).
BODY_TIMEOUT: Final = web.AppKey("body_timeout", float)


#: The requests whose body ``read_body`` is reading now (``answer_bodies_at_shutdown``).
#: (By ``id``: a request is not hashable.)
_READING: Final = web.AppKey("party_sync.reading_bodies", dict)


class _CutShort(PartySyncError, TimeoutError):
    """What a body's stream raises once the server began to shut down (``ShuttingDown``). A
    ``TimeoutError``: after the 503, aiohttp reads on what is left of the body (its "lingering"
    read, 3.x), which meets this again, and ends quietly only on a timeout (then closes the
    connection); any other exception there was logged as an unhandled ERROR with its traceback,
    at every shutdown under API traffic (ops probe)."""


def answer_bodies_at_shutdown(app: web.Application) -> None:
    """At the first step of ``app``'s shutdown, every request whose body is still arriving is
    answered 503 ``shutting_down`` (``ShuttingDown``): its stream is ended with an error, which
    ``read_body`` turns into that refusal. Both HTTP servers call it (party_sync's and the
    engine host's).

    So is the rest of a body its request was answered without reading (a refusal before the
    body: 401, 503 ``telegram_not_configured``...): aiohttp reads it on after the answer, for
    up to 10 s ("lingering"), and a client that never sent it held the drain that long (re-check
    probe: 10.1-10.9 s in 5 runs of 8, where the rest exited at once)."""
    reading: dict[int, BaseRequest] = {}
    app[_READING] = reading
    # answered with their body still arriving (weak: each goes when aiohttp is done with it)
    unread: weakref.WeakValueDictionary[int, BaseRequest] = weakref.WeakValueDictionary()

    async def answered(request: web.Request, response: web.StreamResponse) -> None:
        if request.get(_CONTINUE_OWED):
            # answered before its client was asked for its body (``continue_when_read``): the
            # body never comes, and the connection ends with this answer (the client may have
            # sent it anyway after its wait, and that is no next request). Its stream is ended
            # too, as at shutdown: aiohttp would otherwise wait up to 10 s for the body after
            # the answer ("lingering") before it closes (re-check probe: 10-11 s each)
            response.force_close()
            response.headers["Connection"] = "close"  # (its headers were made before this)
            request.content.set_exception(_CutShort())
        elif not request.content.is_eof():
            unread[id(request)] = request

    async def cut_short(app: web.Application) -> None:
        for request in [*reading.values(), *unread.values()]:
            if not request.content.is_eof():  # (arrived whole: it is read to its end)
                request.content.set_exception(_CutShort())

    app.on_response_prepare.append(answered)
    app.on_shutdown.insert(0, cut_short)


@functools.cache
def _default_body_timeout() -> float:
    return Settings().request_body_timeout


#: The Content-Encodings a body may come in (any case; none or ``identity``: as it is). The
#: servers run with aiohttp's ``auto_decompress=False`` (``RAW_BODIES``): a body is inflated here,
#: by the route's reader, never beyond the route's limit (a 1 MiB gzip of a gigabyte costs what
#: its first ``limit`` bytes cost), and never when the route refuses before reading (a wrong key).
DECODABLE: Final = frozenset({"gzip", "x-gzip", "deflate"})
#: What ``Accept-Encoding`` says to a body in another (``UnsupportedEncoding``).
ACCEPTED_ENCODINGS: Final = "gzip, deflate"
#: The server options that leave bodies as they came (for ``web.AppRunner`` / ``web.run_app``).
RAW_BODIES: Final[Mapping[str, Any]] = {"auto_decompress": False}


def _inflater(request: web.Request) -> Any:
    """A zlib decompressor for the request's Content-Encoding, None for none;
    ``UnsupportedEncoding`` (400 ``bad_json``, saying why) for an encoding this server does
    not decode."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding not in DECODABLE:
        raise UnsupportedEncoding()
    return zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header, either


#: A request whose client waits for ``100 Continue`` before it sends its body, not sent yet.
_CONTINUE_OWED: Final = web.RequestKey("party_sync.continue_owed", bool)


def continue_when_read(
    render: Render = problem,
) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """The ``Expect`` handler of every route that takes a body, on both servers (aiohttp's own
    sends ``100 Continue`` before the route's handler runs, so a client uploaded a body over the
    limit, or one without the API key, only to be refused 413 or 401 after it). The ``100`` is
    sent when ``read_body`` begins to read the body: a request refused before that gets its final
    answer instead of the ``100`` (RFC 9110 §10.1.1), its body is never asked for, and that
    answer ends the connection (``answer_bodies_at_shutdown``). An ``Expect`` other than
    ``100-continue`` is refused 417, as aiohttp does, rendered by ``render``."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.version != HttpVersion11:
            return None  # (HTTP/1.0 knows no Expect: the body follows the head)
        if request.headers.get("Expect", "").lower() != "100-continue":
            response = render(
                417, "bad_request", "the Expect header may only be 100-continue", None
            )
            response.force_close()
            return response
        request[_CONTINUE_OWED] = True
        return None

    return expect


#: ``continue_when_read`` for party_sync's own routes (problem documents).
CONTINUE_WHEN_READ: Final = continue_when_read()


async def _send_continue(request: web.Request) -> None:
    """Ask the client for its body now (``continue_when_read``), as aiohttp's default handler
    does: the ``100`` is no part of the response, whose size starts at 0 again."""
    request[_CONTINUE_OWED] = False
    writer = request.writer
    await writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    writer.output_size = 0


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body (inflated if it came gzip- or deflate-encoded); raises
    ``BodyTooLarge`` beyond ``limit`` bytes (sent or inflated), ``BodyTimeout`` when it does not
    arrive within ``BODY_TIMEOUT``, ``BadJson`` when its encoding does not decode.

    ``StreamReader.read(n)`` returns what has *arrived so far* (at most ``n``), so one call would
    cut a body that crosses a TCP segment boundary; this reads until the end of the body (or until
    the limit is passed: a declared or chunked body is never buffered beyond ``limit + 1``).
    """
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    inflater = _inflater(request)
    if request.get(_CONTINUE_OWED):
        await _send_continue(request)
    reading: dict[int, BaseRequest] | None = request.app.get(_READING)
    if reading is None:
        return await _read_body(request, limit, inflater)
    reading[id(request)] = request
    try:
        return await _read_body(request, limit, inflater)
    except _CutShort:
        raise ShuttingDown() from None
    finally:
        del reading[id(request)]


async def _read_body(request: web.Request, limit: int, inflater: Any) -> bytes:
    timeout = request.app.get(BODY_TIMEOUT)
    if timeout is None:
        timeout = _default_body_timeout()
    chunks: list[bytes] = []
    size = sent = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                raw = await request.content.read(limit + 1 - sent)
                if not raw:  # the end of the body
                    if inflater is not None and not inflater.eof:
                        raise BadJson("the body does not decode as its headers say")
                    return b"".join(chunks)
                sent += len(raw)
                if sent > limit:
                    raise BodyTooLarge(limit)
                data = raw if inflater is None else _inflate(inflater, raw, limit + 1 - size)
                size += len(data)
                if size > limit:
                    raise BodyTooLarge(limit)
                chunks.append(data)
    except _CutShort:
        raise
    except TimeoutError:
        raise BodyTimeout(timeout) from None
    except RequestPayloadError:  # a broken chunk
        raise BadJson("the body does not decode as its headers say") from None


def _inflate(inflater: Any, data: bytes, room: int) -> bytes:
    """At most ``room`` inflated bytes of ``data``: what does not fit stays in the inflater,
    unread; the caller needs only to know that it is more than ``room``."""
    try:
        out: bytes = inflater.decompress(data, room)
    except zlib.error:
        raise BadJson("the body does not decode as its headers say") from None
    return out


def decode_body(body: bytes) -> Any:
    """The decoded JSON; raises ``codec.TooDeep`` past ``codec.MAX_DEPTH`` levels, else
    ``BadJson`` when it is not UTF-8 JSON."""
    try:
        return codec.decode_bounded(body)
    except codec.TooDeep:
        raise
    except ValueError as exc:  # (why, as a WebSocket message's bad_json says it)
        raise BadJson(f"body is not valid UTF-8 JSON ({codec.undecodable(body, exc)})") from None


async def read_json(request: web.Request, limit: int) -> Any:
    """``read_body`` then ``decode_body``: the JSON body, or the refusal raised."""
    return decode_body(await read_body(request, limit))


T = TypeVar("T")


async def listen(
    runner: web.BaseRunner, host: str, port: int, start: Callable[[], Awaitable[T]]
) -> T:
    """``start()`` (bind and listen: ``serve``, ``engine-http``); on failure the runner is
    cleaned up, and a port in use, a port not permitted or a host that is no address of this
    machine is a ``ListenError`` (one line for the operator, no traceback)."""
    try:
        return await start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except BaseException:
        await runner.cleanup()
        raise


# -- requests aiohttp's HTTP parser refuses ---------------------------------------------------
# aiohttp answers such a request (a header with a control character, a request line over 8190
# bytes, a bad status line...) with a text/plain 400 that quotes the raw bytes it refused: a token
# in the query string, an Authorization header. That goes back only to its sender, but a proxy or
# CDN that logs or caches error bodies keeps the secret, and the body has no stable code. Here it
# is a refusal like every other (``problem`` for the server, ``error_json`` for the engine host):
# the status, ``bad_request`` (or the status's own code), the parser's error *name*, never its
# text. This leans on ``aiohttp.web_protocol.RequestHandler.handle_error``, which aiohttp calls
# with the parser's exception but does not document, and on ``BaseSite`` internals
# (``QuietTCPSite``); ``test_http_errors.py`` sends such requests to the real server and engine
# host and fails if aiohttp changes. The logging stays aiohttp's, behind
# ``logs.MalformedRequestFilter``.

#: A refused request's code by its status (anything else: ``bad_request``).
CODES: Final = {413: "too_large", 431: "headers_too_large"}


def never_sniffed(response: web.StreamResponse) -> None:
    """``X-Content-Type-Options: nosniff`` on ``response`` (every answer of the server says it:
    ``transport/http.py`` for the app's, ``QuietRequestHandler`` for a request never parsed): a
    browser never reads a body as another type than the one it is sent as (an echoed value in a
    JSON error read as a script or a style sheet)."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")


class QuietRequestHandler(RequestHandler):
    """aiohttp's protocol for one connection, answering a request its parser refused with a
    problem document instead of a text quoting the request."""

    __slots__ = ()  # the same layout: an aiohttp handler can become one (``quiet``)
    render: Callable[[int, str, str], web.Response] = staticmethod(problem)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or not isinstance(exc, HttpProcessingError):
            answer = super().handle_error(request, status, exc, message)
        else:
            super().handle_error(request, status, exc, "")  # logs it; raises if a reply began
            answer = self.render(
                status,
                CODES.get(status, "bad_request"),
                f"malformed HTTP request ({type(exc).__name__})",
            )
            answer.force_close()
        # (answered outside the app: its on_response_prepare, which says it on every other
        # answer, is not called for a request that was never parsed)
        never_sniffed(answer)
        return answer


class QuietEngineHostHandler(QuietRequestHandler):
    """The same for ``party-sync engine-http``, in the engine host's words (``{"error",
    "detail"}``, ``error_json``)."""

    __slots__ = ()
    render = staticmethod(error_json)


def quiet(
    make: Callable[[], asyncio.Protocol], kind: type[QuietRequestHandler] = QuietRequestHandler
) -> Callable[[], asyncio.Protocol]:
    """``make`` (aiohttp's ``runner.server``), whose handlers answer parser refusals quietly."""

    def build() -> asyncio.Protocol:
        handler = make()
        if type(handler) is RequestHandler:
            handler.__class__ = kind
        return handler

    return build


class QuietTCPSite(web.TCPSite):
    """``web.TCPSite`` whose connections answer parser refusals quietly (the engine host's).
    Leans on ``BaseSite`` internals (``_server``, ``_host``, ``_port``, ``_backlog``,
    ``_reuse_address``), checked by ``test_http_errors.py`` against the real engine host."""

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            quiet(server, QuietEngineHostHandler),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )


def check_port_free(host: str, port: int) -> None:
    """``ListenError`` if anything listens on ``host:port`` already, as ``serve`` says when it
    cannot listen; checked before a start discards or writes anything (``--new-game`` removed
    the running server's secret and database, then could not listen). The workers listen
    with SO_REUSEPORT, which lets another process of the same user listen on the port beside
    them, so a second group started on it (a deploy that did not stop the old one) was taken,
    and the kernel split the clients between the two, each with its own Redis (workers
    probe). A trial bind without SO_REUSEPORT is refused while any socket listens there. Port
    0 (each worker a port of its own) is not checked."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as trial:
            trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the workers do
            if family == socket.AF_INET6:
                trial.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                trial.bind(address)
            except OSError as exc:
                raise ListenError(
                    f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                ) from None
