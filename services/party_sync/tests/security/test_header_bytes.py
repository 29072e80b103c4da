"""Headers that are not UTF-8 (a byte 0x80-0xFF, which aiohttp keeps as a surrogate escape) on
every route of the app: a 4xx or the route's own answer, never a 500, never an ERROR in the log.
The API key's check encoded the header as UTF-8 and raised: a 500 and a traceback for anyone,
without a key (found by an outside audit)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from ps_testkit.engines import ScriptedEngine
from ps_testkit.security_raw import Raw, capture_logs, request_head
from ps_testkit.servers import Running, make_settings, serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis

KEY = "k" * 32
BOT = "123456:" + "A" * 35
#: The headers some route reads: each gets the hostile value in turn.
HEADERS = ("Authorization", "Origin", "Content-Type", "Content-Encoding", "Accept-Encoding")
HOSTILE = ("Bearer \xff\xfe", "\xff", "\x80abc\xc3")


@pytest.fixture
async def srv() -> AsyncIterator[Running]:
    settings = make_settings(api_key=KEY, telegram_bot_token=BOT)
    async with serve_in_process(settings, engine=ScriptedEngine()) as running:
        yield running


def every_route(running: Running) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, its path parameters filled in."""
    assert running.server is not None
    found: set[tuple[str, str]] = set()
    for route in running.server.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        if not path or route.method in ("*", "HEAD"):  # HEAD: GET's, without the body
            continue
        found.add((route.method, re.sub(r"\{[^}]+\}", "p1", str(path))))
    return sorted(found)


async def test_non_utf8_header_bytes_never_make_a_500_on_any_route(srv: Running) -> None:
    routes = every_route(srv)
    assert ("GET", "/api/v1/parties") in routes and len(routes) > 10, routes
    with capture_logs() as logs:
        for method, path in routes:
            for header in HEADERS:
                for value in HOSTILE:
                    raw = await Raw.open(srv.base)
                    try:
                        head = request_head(method, path, {header: value, "Content-Length": "0"})
                        await raw.write(head)
                        status, _, _ = await raw.response()
                    finally:
                        await raw.close()
                    assert status < 500, (method, path, header, value, status)
    assert not logs.errors(), logs.errors()[:3]
    # the server is fine: the key still works
    headers = {"Authorization": f"Bearer {KEY}"}
    async with srv.http.get(f"{srv.base}/api/v1/parties", headers=headers) as resp:
        assert resp.status == 200
