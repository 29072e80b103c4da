"""The answer to a request aiohttp's HTTP parser refuses, in party_sync's words.

aiohttp answers such a request (a header with a control character, a request line over 8190
bytes, a bad status line...) with a ``text/plain`` 400 that quotes the raw bytes it refused: a
token in the query string, an ``Authorization`` header. That goes back only to its sender, but a
proxy or CDN that logs or caches error bodies keeps the secret, and the body has no stable code.
Here it is a problem document like every other refusal (``problems.problem``): status,
``bad_request`` (or the status's own code), and the parser's error *name*, never its text.

This leans on ``aiohttp.web_protocol.RequestHandler.handle_error``, which aiohttp calls with the
parser's exception but does not document; ``test_http_errors.py`` sends such requests to the
real server and fails if aiohttp stops calling it this way. The logging of these requests stays
aiohttp's, behind ``logs.MalformedRequestFilter``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from party_sync import problems

#: A refused request's code by its status (anything else: ``bad_request``).
CODES: Final = {413: "too_large", 431: "headers_too_large"}


class QuietRequestHandler(RequestHandler):
    """aiohttp's protocol for one connection, answering a request its parser refused with a
    problem document instead of a text quoting the request."""

    __slots__ = ()  # the same layout: an aiohttp handler can become one (``quiet``)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        super().handle_error(request, status, exc, "")  # logs it; raises if a reply began
        response = problems.problem(
            status,
            CODES.get(status, "bad_request"),
            f"malformed HTTP request ({type(exc).__name__})",
        )
        response.force_close()
        return response


def quiet(make: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
    """``make`` (aiohttp's ``runner.server``), whose handlers answer parser refusals quietly."""

    def build() -> asyncio.Protocol:
        handler = make()
        if type(handler) is RequestHandler:
            handler.__class__ = QuietRequestHandler
        return handler

    return build
