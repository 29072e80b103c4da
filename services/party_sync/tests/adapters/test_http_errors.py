"""HTTP errors in one place: one exception root, one table (``problems.PROBLEMS``), one middleware
that applies it, and one API-key check (``transport/edge.py guarded``).

Every class in the table answers its status and code (and the OpenAPI document says the same); an
exception outside the table is a 500 problem that tells nothing of it; every route that the
document marks as needing the API key is wrapped by the one guard and refuses without the key.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import pkgutil
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
import party_sync
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from party_sync import problems
from party_sync.problems import PROBLEMS, BodyTimeout, BodyTooLarge, Problem, Refused
from party_sync.protocol.errors import BackendUnavailable, PartySyncError
from party_sync.protocol.schemas import Contracts
from party_sync.server import build_server, start_serving
from party_sync.transport import edge, openapi
from ps_testkit import api_events
from ps_testkit.client import wait_until
from ps_testkit.servers import free_port, make_settings

KEY = "api-key-0123456789abcdef0123456789"
PUBLIC_DETAIL = "a sentence written for clients"
#: The engine host's codes: its answers are described in docs/engines.md, not in /openapi.json.
ENGINE_HOST = {problems.InvalidDelivery, problems.DeadlinePassed, problems.EngineFailed}
ENGINE_HOST_CODES = {"invalid", "expired", "rejected", "engine_error"}


# -- one root --------------------------------------------------------------------------------------


def _package_exceptions() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(party_sync.__path__, "party_sync."):
        if info.name == "party_sync.__main__":
            continue  # running it is the command line
        module = importlib.import_module(info.name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == info.name:
                found.append(value)
    return found


def test_every_exception_class_of_the_package_derives_from_the_one_root() -> None:
    classes = _package_exceptions()
    names = {cls.__name__ for cls in classes}
    assert {"SchemaViolation", "EngineRejected", "SpecError", "InvalidMembership"} <= names
    assert [c.__qualname__ for c in classes if not issubclass(c, PartySyncError)] == []


def test_the_builtin_bases_callers_catch_are_kept() -> None:
    from party_sync.backends.directory import InvalidMembership
    from party_sync.core.votes import SpecError
    from party_sync.protocol.codec import TooDeep

    for cls in (SpecError, InvalidMembership, TooDeep):
        assert issubclass(cls, ValueError) and issubclass(cls, PartySyncError), cls
    from party_sync.engine import EngineRejected as reexported
    from party_sync.engine.interface import EngineRejected

    assert reexported is EngineRejected and issubclass(EngineRejected, PartySyncError)


# -- the table, through the middleware -------------------------------------------------------------


def instance(cls: type[Exception]) -> Exception:
    if cls is BodyTooLarge:
        return BodyTooLarge(4096)
    if cls is BodyTimeout:
        return BodyTimeout(1.5)
    return cls(PUBLIC_DETAIL)


def expected_detail(cls: type[Exception], problem: Problem) -> str:
    if problem.detail is not None:
        return problem.detail
    return str(instance(cls))


@asynccontextmanager
async def client_of(render: problems.Render, route: Any) -> AsyncIterator[TestClient[Any, Any]]:
    app = web.Application(middlewares=[problems.answer_errors(render)])
    app.router.add_get("/raise/{name}", route)
    async with TestClient(TestServer(app)) as client:
        yield client


def _by_name() -> dict[str, type[Exception]]:
    return {cls.__name__: cls for cls in PROBLEMS}


async def _raise_named(request: web.Request) -> web.Response:
    raise instance(_by_name()[request.match_info["name"]])


async def test_every_class_in_the_table_is_answered_with_its_status_code_and_detail() -> None:
    assert len(_by_name()) == len(PROBLEMS)  # the route below names each class once
    async with client_of(problems.problem, _raise_named) as client:
        for cls, problem in PROBLEMS.items():
            async with client.get(f"/raise/{cls.__name__}") as resp:
                assert resp.status == problem.status, cls
                assert resp.content_type == "application/problem+json", cls
                body = await resp.json(content_type=None)
            assert body == {
                "type": "about:blank",
                "title": HTTPStatus(problem.status).phrase,
                "status": problem.status,
                "detail": expected_detail(cls, problem),
                "error": problem.code,
                "code": problem.code,
            }, cls


async def test_the_engine_host_renders_the_same_table_as_error_and_detail() -> None:
    async with client_of(problems.error_json, _raise_named) as client:
        for cls, problem in PROBLEMS.items():
            async with client.get(f"/raise/{cls.__name__}") as resp:
                assert (resp.status, resp.content_type) == (problem.status, "application/json")
                body = await resp.json()
            assert body == {"error": problem.code, "detail": expected_detail(cls, problem)}


async def test_a_subclass_answers_like_the_nearest_class_in_the_table() -> None:
    class SlowBackend(BackendUnavailable):
        pass

    async def raise_it(request: web.Request) -> web.Response:
        raise SlowBackend("redis at 10.0.0.7:6379 timed out")

    async with client_of(problems.problem, raise_it) as client, client.get("/raise/x") as resp:
        assert resp.status == 503
        body = await resp.json(content_type=None)
    assert (body["error"], body["detail"]) == (
        "backend_unavailable",
        problems.UNAVAILABLE,  # fixed: never the internal message
    )


async def test_a_refusal_carries_its_headers_and_the_routes() -> None:
    async def raise_it(request: web.Request) -> web.Response:
        request[problems.REFUSAL_HEADERS] = {"Cache-Control": "no-store"}
        raise problems.OperatorBlocked("blocked for a while", headers={"Retry-After": "30"})

    async with client_of(problems.problem, raise_it) as client, client.get("/raise/x") as resp:
        assert resp.status == 403
        assert resp.headers["Retry-After"] == "30"
        assert resp.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("render", [problems.problem, problems.error_json])
async def test_an_unexpected_exception_is_a_500_without_internal_details(
    render: problems.Render, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "password=hunter2 at /srv/party_sync/internal.py:42"

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError(secret)

    async with client_of(render, broken) as client:
        with caplog.at_level(logging.ERROR, logger="party_sync.problems"):
            async with client.get("/raise/x") as resp:
                assert resp.status == 500
                text = await resp.text()
                body = await resp.json(content_type=None)
    assert secret not in text and "RuntimeError" not in text
    if render is problems.problem:
        assert resp.content_type == "application/problem+json"
        assert body == {
            "type": "about:blank",
            "title": "Internal Server Error",
            "status": 500,
            "detail": "internal error",
            "error": "internal_error",
            "code": "internal_error",
        }
    else:
        assert body == {"error": "internal_error", "detail": "internal error"}
    # ... but the operator's log has it, with the traceback (as text, scrubbed of the password,
    # once a server of an earlier test installed the redacting filter in this process).
    assert any(
        (r.exc_info and secret in str(r.exc_info[1]))
        or (r.exc_text and "RuntimeError: password=[redacted]" in r.exc_text)
        for r in caplog.records
    )


async def test_a_client_gone_before_its_websocket_upgrade_is_no_server_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handshake given up while the node waited (a stalled Redis): aiohttp's ``prepare`` then
    raises ConnectionResetError("Connection lost") (its protocol has no transport any more).
    Nobody is left to answer: no ERROR, no 500 (499 in the access log); the same exception with
    the client still there (a backend's connection reset) is a 500 and logged."""
    from unittest import mock

    from aiohttp.test_utils import make_mocked_request

    def request(transport: asyncio.Transport | None) -> web.Request:
        made = make_mocked_request("GET", "/ws", writer=mock.Mock(output_size=0))
        made._protocol.transport = transport  # None: aiohttp lost the connection
        return made

    with caplog.at_level(logging.INFO, logger="party_sync.problems"):
        gone = await problems.answer_raised(request(None), ConnectionResetError("Connection lost"))
        assert gone.status == problems.CLIENT_GONE
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("client went away during GET /ws" in r.getMessage() for r in caplog.records)
        alive = mock.Mock(spec=asyncio.Transport)
        there = await problems.answer_raised(request(alive), ConnectionResetError("reset"))
        assert there.status == 500
        assert [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_aiohttp_own_http_exceptions_pass_through_unchanged() -> None:
    async def forbidden(request: web.Request) -> web.Response:
        raise web.HTTPForbidden(text="origin not allowed")

    async with client_of(problems.problem, forbidden) as client:
        async with client.get("/raise/x") as resp:
            assert (resp.status, resp.content_type) == (403, "text/plain")
            assert await resp.text() == "origin not allowed"
        async with client.get("/no/such/route") as resp:
            assert resp.status == 404


async def test_the_real_app_answers_an_unexpected_exception_with_a_500_problem() -> None:
    server = build_server(make_settings(api_key=KEY))

    async def broken(request: web.Request) -> web.Response:
        raise KeyError("internal-key-name")

    server.app.router.add_get("/api/v1/broken", broken)
    listening = await start_serving(server, "127.0.0.1", 0, shutdown_timeout=2.0)
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{listening.port}/api/v1/broken"
            async with http.get(url) as resp:
                assert resp.status == 500
                assert resp.content_type == "application/problem+json"
                text = await resp.text()
        assert "internal_error" in text and "internal-key-name" not in text
    finally:
        await listening.stop()


SECRET_IN_REQUEST = "eyJhbGciOiJIUzI1NiJ9.secret-payload-0123.sig"


PARSER_REFUSES = [
    # a header value with a control character: aiohttp quoted the whole header
    f"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET_IN_REQUEST}\x01\r\n\r\n",
    # a request line over aiohttp's 8190 bytes: it quoted its start, the token in the query
    f"GET /ws?token={SECRET_IN_REQUEST}{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n",
    # a bad version in the request line
    f"GET /ws?token={SECRET_IN_REQUEST} HTTP/9.Z\r\nHost: x\r\n\r\n",
]


@pytest.mark.parametrize(
    "request_bytes", PARSER_REFUSES, ids=["header", "long_line", "bad_version"]
)
async def test_a_request_the_parser_refuses_is_a_problem_that_quotes_nothing(
    request_bytes: str,
) -> None:
    """A hostile probe: aiohttp's own 400 was text/plain quoting the refused request line or
    header (a token, an API key) back, with no stable code. Now a problem document with the
    parser's error name only (problems.quiet, which leans on aiohttp's
    ``handle_error``: this fails if aiohttp stops calling it so)."""
    server = build_server(make_settings(api_key=KEY))
    listening = await start_serving(server, "127.0.0.1", 0, shutdown_timeout=2.0)
    try:
        head, document = await refused(listening.port, request_bytes)
        assert b"application/problem+json" in head
        assert document["code"] == document["error"] == "bad_request"
        assert document["detail"].startswith("malformed HTTP request (")
    finally:
        await listening.stop()


@pytest.mark.parametrize(
    "request_bytes", PARSER_REFUSES, ids=["header", "long_line", "bad_version"]
)
async def test_the_engine_host_answers_what_its_parser_refuses_quoting_nothing(
    request_bytes: str,
) -> None:
    """The same for ``party-sync engine-http`` (its own ``{"error", "detail"}``): its 400 quoted
    a delivery's Authorization header, the API key, back (a docs check)."""
    from party_sync.engine.http_host import ApiPublisher, build_host_app
    from ps_testkit.engines import ScriptedEngine

    app = build_host_app(ScriptedEngine(), ApiPublisher("http://127.0.0.1:9", KEY))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await problems.QuietTCPSite(runner, "127.0.0.1", port).start()
    try:
        head, document = await refused(port, request_bytes)
        assert b"application/json" in head
        assert document["error"] == "bad_request"
        assert document["detail"].startswith("malformed HTTP request (")
    finally:
        await runner.cleanup()


async def refused(port: int, request_bytes: str) -> tuple[bytes, Any]:
    """Send ``request_bytes`` raw; the 400's head and JSON body (neither quoting the secret)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes.encode("latin-1"))
    async with asyncio.timeout(10):
        answer = await reader.read()  # the server closes the connection after it
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:200]
    assert SECRET_IN_REQUEST.encode() not in answer
    # answered before the app saw a request (no on_response_prepare): nosniff all the same
    assert b"\r\nx-content-type-options: nosniff" in head.lower(), head
    return head, json.loads(body)


async def test_the_routers_own_404_and_405_under_the_api_are_problems_elsewhere_unchanged() -> None:
    server = build_server(make_settings(api_key=KEY))
    listening = await start_serving(server, "127.0.0.1", 0, shutdown_timeout=2.0)
    base = f"http://127.0.0.1:{listening.port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/api/v1/unknown", headers=auth) as resp:
                assert (resp.status, resp.content_type) == (404, "application/problem+json")
                body = await resp.json(content_type=None)
                assert (body["status"], body["error"], body["code"]) == (
                    404,
                    "not_found",
                    "not_found",
                )
            async with http.post(base + "/api/v1/parties", headers=auth) as resp:
                assert (resp.status, resp.content_type) == (405, "application/problem+json")
                body = await resp.json(content_type=None)
                assert (body["status"], body["error"]) == (405, "method_not_allowed")
                assert "GET" in resp.headers["Allow"]
            async with http.post(base + "/api/v1/dev/token", json={}) as resp:  # not dev mode
                assert (resp.status, resp.content_type) == (404, "application/problem+json")
            async with http.get(base + "/no/such/page") as resp:  # not the API: aiohttp's own
                assert (resp.status, resp.content_type) == (404, "text/plain")
    finally:
        await listening.stop()


# -- the table and the OpenAPI document say the same -------------------------------------------


def _documented_problems() -> dict[str, set[int]]:
    """Stable code → the statuses /openapi.json documents it with (every operation)."""
    spec = openapi.document(Contracts(), dev_mode=True)
    out: dict[str, set[int]] = {}
    for item in spec["paths"].values():
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            for status, response in operation["responses"].items():
                media = response.get("content", {}).get(openapi.PROBLEM_JSON)
                if media is None or "allOf" not in media["schema"]:
                    continue
                for code in media["schema"]["allOf"][1]["properties"]["error"]["enum"]:
                    out.setdefault(code, set()).add(int(status))
    return out


def test_every_class_in_the_table_maps_to_its_documented_status() -> None:
    documented = _documented_problems()
    for cls, problem in PROBLEMS.items():
        if cls in ENGINE_HOST or problem.code in ENGINE_HOST_CODES:
            continue
        if problem.code == "disconnected_by_operator":  # the /ws handshake's 403, in prose
            ws = openapi.document(Contracts())["paths"]["/ws"]["get"]["responses"]["403"]
            assert problem.status == 403 and problem.code in ws["description"]
            continue
        assert documented.get(problem.code) == {problem.status}, (cls, problem)
    # ... and the document names no code the table does not answer
    table_codes = {p.code for p in PROBLEMS.values()}
    assert set(documented) <= table_codes, set(documented) - table_codes


def test_the_engine_host_codes_are_the_documented_ones() -> None:
    answers = {p.code: p.status for c, p in PROBLEMS.items() if p.code in ENGINE_HOST_CODES}
    assert answers == {"invalid": 422, "expired": 409, "rejected": 422, "engine_error": 500}


# -- one API-key check ---------------------------------------------------------------------------


def _guard_code() -> object:
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    return edge.guarded(handler).__code__


def _keyed_operations() -> set[tuple[str, str]]:
    spec = openapi.document(Contracts())
    return {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict) and operation.get("security") == [{"apiKey": []}]
    }


def _routes(app: web.Application) -> dict[tuple[str, str], Any]:
    out = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("formatter") or info.get("path")
        if route.method != "HEAD" and isinstance(path, str):
            out[(route.method, path)] = route.handler
    return out


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
async def test_every_route_that_needs_the_key_refuses_without_it_through_the_one_guard(
    headers: dict[str, str],
) -> None:
    server = build_server(make_settings(api_key=KEY))
    routes, keyed, guard = _routes(server.app), _keyed_operations(), _guard_code()
    assert len(keyed) == 16  # 5 publishing, votes and narration, 2 claims, 4 memberships, 5 admin
    assert ("POST", "/api/v1/parties/{party_id}/narration") in keyed
    guarded = {op for op, handler in routes.items() if getattr(handler, "__code__", None) is guard}
    assert guarded == keyed  # the guard is the only key check, on exactly these routes
    for method, path in sorted(keyed):
        names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
        request = make_mocked_request(
            method, path, headers=headers, app=server.app, match_info=dict.fromkeys(names, "ok-id")
        )
        response = await routes[(method, path)](request)
        assert isinstance(response, web.Response)
        assert response.status == 401, (method, path)
        assert response.content_type == "application/problem+json"
        assert response.body is not None
        body = json.loads(bytes(response.body))  # type: ignore[arg-type]
        assert (body["error"], body["detail"]) == ("unauthorized", "missing or wrong API key")


def test_a_refusal_class_is_a_party_sync_error_with_headers() -> None:
    exc = problems.NotFound("no such party")
    assert isinstance(exc, Refused) and isinstance(exc, PartySyncError)
    assert (str(exc), dict(exc.headers)) == ("no such party", {})


ACTION_ENVELOPE: dict[str, Any] = {
    "type": "action.request",
    "timestamp": "2026-11-25T21:04:05Z",
    "trace_id": "t-1",
    "payload": {
        "action_id": "a1",
        "character_id": "aria",
        "campaign_run_id": "r1",
        "action_type": "skill_check",
        "payload": {},
    },
}


NOTICE: dict[str, Any] = {"timestamp": "2026-11-25T21:10:00Z", "trace_id": "t"}
RESTATE = {**NOTICE, "type": "party.restate", "payload": {"epoch": 7}}
JOIN = {**NOTICE, "type": "party.join", "seq": 3}
JOIN["payload"] = {"character_id": "aria", "display_name": "Aria"}
OK = {k: v for k, v in JOIN.items() if k != "seq"}  # a valid join notice


async def test_a_schema_copy_without_engine_schemas_still_takes_notices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``PARTY_SYNC_CONTRACTS_DIR`` naming a copy older than ``engine/``: the host takes notices
    unchecked (one WARNING at start) rather than refusing every one (a restate lost so would
    leave its party without a scene)."""
    from party_sync.engine.http_host import ApiPublisher, build_host_app
    from party_sync.protocol.schemas import default_contracts_dir
    from ps_testkit.engines import ScriptedEngine

    older = tmp_path / "contracts"
    shutil.copytree(default_contracts_dir(), older, ignore=shutil.ignore_patterns("engine"))
    monkeypatch.setenv("PARTY_SYNC_CONTRACTS_DIR", str(older))
    engine = ScriptedEngine()
    with caplog.at_level(logging.WARNING, logger="party_sync.engine.http_host"):
        app = build_host_app(engine, ApiPublisher("http://127.0.0.1:9", KEY))
    assert "no engine schemas in" in caplog.text
    body = {"kind": "join", "party_id": "p1", "campaign_run_id": "r1", "envelope": OK}
    async with TestClient(TestServer(app)) as client:
        headers = {"Authorization": f"Bearer {KEY}"}
        resp = await client.post("/notices", json=body, headers=headers)
        assert resp.status == 202, await resp.text()
    assert [n.character_id for n in engine.joins] == ["aria"]


async def test_the_engine_host_answers_an_unknown_path_or_method_in_its_json_form() -> None:
    """aiohttp's own 404 and 405 were plain text on the engine host, whose every other answer
    is ``{"error", "detail"}`` JSON (an engine link reads the JSON body of any answer)."""
    from party_sync.engine.http_host import ApiPublisher, build_host_app
    from ps_testkit.engines import ScriptedEngine

    app = build_host_app(ScriptedEngine(), ApiPublisher("http://127.0.0.1:9", KEY))
    headers = {"Authorization": f"Bearer {KEY}"}
    async with TestClient(TestServer(app)) as client:
        missing = await client.post("/nowhere", json={}, headers=headers)
        assert (missing.status, missing.content_type) == (404, "application/json")
        assert (await missing.json())["error"] == "not_found"
        wrong = await client.get("/actions", headers=headers)
        assert (wrong.status, wrong.headers["Allow"]) == (405, "POST")
        assert (await wrong.json())["error"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("path", "body", "said"),
    [
        ("/actions", [1, 2], 'expected a JSON object {"party_id"'),
        ("/actions", "text", 'expected a JSON object {"party_id"'),
        ("/actions", {"party_id": "p1"}, "missing field 'envelope': expected a JSON object"),
        ("/actions", {"envelope": ACTION_ENVELOPE}, "missing field 'party_id'"),
        ("/actions", {"party_id": "p 1", "envelope": ACTION_ENVELOPE}, "party_id: ids must"),
        ("/actions", {"party_id": 5, "envelope": ACTION_ENVELOPE}, "party_id: ids must"),
        ("/actions", {"party_id": "p1", "envelope": [1]}, "expected an action.request envelope"),
        ("/notices", [1], 'expected a JSON object {"kind"'),
        ("/notices", {"kind": "join", "party_id": "p1"}, "missing field 'envelope'"),
        ("/notices", {"kind": "join", "party_id": "x/y", "envelope": {}}, "party_id: ids must"),
        ("/notices", {"kind": "join", "party_id": "p1", "envelope": 3}, "expected kind join"),
        (
            "/actions",
            {"party_id": "p1", "envelope": ACTION_ENVELOPE, "deadline": "abc"},
            "a deadline is a number of seconds",
        ),
        (
            "/notices",
            {
                "kind": "restate",
                "party_id": "p1",
                "envelope": {"type": "x", "timestamp": "yesterday", "trace_id": "t", "payload": {}},
            },
            "",
        ),
        (  # engine/restate.notice.json: the epoch is a string (the detail names where)
            "/notices",
            {"kind": "restate", "party_id": "p1", "campaign_run_id": "r1", "envelope": RESTATE},
            "payload.epoch: 7 is not of type",
        ),
        (  # engine/http.notice.json: the run is an id (one breaking it reached the engine)
            "/notices",
            {"kind": "join", "party_id": "p1", "campaign_run_id": "bad run/../x", "envelope": OK},
            "campaign_run_id: ",
        ),
        (
            "/notices",
            {"kind": "join", "party_id": "p1", "campaign_run_id": 12345, "envelope": OK},
            "campaign_run_id: 12345 is not of type",
        ),
        (
            "/notices",
            {"kind": "join", "party_id": "p1", "envelope": OK},
            "campaign_run_id",
        ),
        (  # engine/join.notice.json: a notice carries no seq (it is not the party's event)
            "/notices",
            {"kind": "join", "party_id": "p1", "campaign_run_id": "r1", "envelope": JOIN},
            "seq: False schema",
        ),
        ("/actions", b"\xff\xfe{", "the body is not JSON"),
        ("/actions", b"", "the body is not JSON"),
        ("/actions", b"{bad", "the body is not JSON"),
        ("/actions", b'{"party_id": "p1", "deadline": 1e400}', "the body is not JSON"),
    ],
)
async def test_the_engine_host_says_what_a_delivery_lacks_in_its_own_words(
    path: str, body: Any, said: str
) -> None:
    """422 ``invalid`` with a detail about the delivery, not the Python error that found it out
    (``'envelope'``, ``list indices must be integers or slices, not str``: hostile probe)."""
    from party_sync.engine.http_host import ApiPublisher, build_host_app
    from ps_testkit.engines import ScriptedEngine

    engine = ScriptedEngine()
    app = build_host_app(engine, ApiPublisher("http://127.0.0.1:9", KEY))
    async with TestClient(TestServer(app)) as client:
        headers = {"Authorization": f"Bearer {KEY}", "X-Delivery-Attempt": "1"}
        if isinstance(body, bytes):
            resp = await client.post(path, data=body, headers=headers)
        else:
            resp = await client.post(path, json=body, headers=headers)
        answer = await resp.json()
    assert resp.status == 422 and answer["error"] == "invalid", answer
    assert answer["detail"].startswith(said) or said in answer["detail"], answer
    python_words_seen = ("indices", "isoformat", "convert", "surrogates", "char 0", "infinity")
    for python_words in python_words_seen:
        assert python_words not in answer["detail"], answer
    assert not engine.calls


# -- a body still arriving when the server shuts down ------------------------------------------


async def _half_sent(port: int, path: str, body: bytes) -> tuple[asyncio.StreamReader, Any]:
    """A POST to ``path`` with the API key whose body has sent its first 10 bytes only."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body[:10]
    )
    await writer.drain()
    return reader, writer


async def _answer_after_rest(reader: asyncio.StreamReader, writer: Any, body: bytes) -> bytes:
    """Send the rest of the body, then read the answer (to the connection's end)."""
    writer.write(body[10:])
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


async def test_a_body_still_arriving_at_shutdown_is_answered_at_once_and_applied_nowhere(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ops probe: an API request whose body was still arriving at SIGTERM got no answer at all,
    and held the exit for the whole ``shutdown_timeout``: aiohttp reads nothing more of a
    connection once the server is closing, so the body never arrived whole and the handler
    waited for it until it was cancelled. Now it is 503 ``shutting_down`` with Retry-After at
    once (nothing was applied: the engine sends it again, to another node), and the node stops
    without waiting out the timeout."""
    server = build_server(make_settings(api_key=KEY, shutdown_timeout=30.0))
    listening = await start_serving(server, "127.0.0.1", 0, shutdown_timeout=30.0)
    stopping: asyncio.Task[None] | None = None
    try:
        body = json.dumps({"type": "scene.update", "payload": {"scene_id": "late"}}).encode()
        reader, writer = await _half_sent(listening.port, "/api/v1/parties/p1/events", body)
        await wait_until(lambda: bool(server.app[problems._READING]))
        started = asyncio.get_running_loop().time()
        stopping = asyncio.create_task(listening.stop())
        answer = await asyncio.wait_for(_answer_after_rest(reader, writer, body), 10)
        head, _, document = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer
        assert b"Retry-After: 1" in head
        assert json.loads(document)["code"] == "shutting_down"
        await asyncio.wait_for(stopping, 10)
        assert asyncio.get_running_loop().time() - started < 10  # not the 30-s timeout
        # an expected refusal, not a crash: aiohttp's read of the rest of the body after the
        # answer logged "Unhandled exception" with a traceback at every such shutdown (ops probe)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        if stopping is None:
            await listening.stop()


async def test_a_request_answered_before_its_body_arrived_does_not_hold_the_drain() -> None:
    """Re-check probe: a request refused before its body was read (here Telegram sign-in, not
    configured: 503 at once) whose client never sent the rest held the drain for 10 s: aiohttp
    reads the rest of a body after the answer ("lingering"), up to 10 s. It ends at shutdown,
    like a body being read."""
    server = build_server(make_settings(api_key=KEY, shutdown_timeout=30.0))
    listening = await start_serving(server, "127.0.0.1", 0, shutdown_timeout=30.0)
    stopping: asyncio.Task[None] | None = None
    try:
        body = b'{"init_data": "abc", "party_id": "p1", "character_id": "aria"}'
        reader, writer = await _half_sent(listening.port, "/api/v1/auth/telegram", body)
        status = await asyncio.wait_for(reader.readline(), 10)
        assert status.startswith(b"HTTP/1.1 503"), status  # answered, its body never whole
        started = asyncio.get_running_loop().time()
        stopping = asyncio.create_task(listening.stop())
        try:
            await asyncio.wait_for(stopping, 20)
            assert asyncio.get_running_loop().time() - started < 5  # not aiohttp's lingering
        finally:
            writer.close()
    finally:
        if stopping is None:
            await listening.stop()


async def test_the_engine_host_answers_a_delivery_still_arriving_at_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The engine host (``party-sync engine-http``) too: 503 ``shutting_down`` at once, the
    engine never called; ``HttpEngineLink`` retries a 503 (docs/engines.md)."""
    from party_sync.engine.http_host import ApiPublisher, build_host_app
    from ps_testkit.engines import ScriptedEngine

    engine = ScriptedEngine()
    app = build_host_app(engine, ApiPublisher("http://127.0.0.1:9", KEY, retries=0))
    runner = web.AppRunner(app, shutdown_timeout=30.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stopping: asyncio.Task[None] | None = None
    try:
        port = runner.addresses[0][1]
        body = json.dumps({"party_id": "p1", "action": {"type": "action.request"}}).encode()
        reader, writer = await _half_sent(port, "/actions", body)
        await wait_until(lambda: bool(app[problems._READING]))
        stopping = asyncio.create_task(runner.cleanup())
        answer = await asyncio.wait_for(_answer_after_rest(reader, writer, body), 10)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "shutting_down"
        await asyncio.wait_for(stopping, 10)
        assert engine.answered == []
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        if stopping is None:
            await runner.cleanup()


# -- Expect: 100-continue ------------------------------------------------------------------------


def _expect_head(method: str, path: str, length: int, key: str | None) -> bytes:
    """A request's head with ``Expect: 100-continue`` (``key``: the API key, or none)."""
    auth = f"Authorization: Bearer {key}\r\n" if key is not None else ""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()


async def _expecting(
    port: int, path: str, length: int, key: str | None = KEY, method: str = "POST"
) -> bytes:
    """A request's head with ``Expect: 100-continue`` and no body yet: the first answer's head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_expect_head(method, path, length, key))
    await writer.drain()
    try:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 100"):
            # a final answer: the connection ends with it, not after aiohttp's 10 s of waiting
            # for the body it never asked for (re-check probe)
            async with asyncio.timeout(5):
                await reader.read()  # to the end
        return head
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("method", "path", "length", "key", "status"),
    [
        ("POST", "/api/v1/parties/p1/events", 10**9, KEY, b"413"),  # over api_max_body_bytes
        ("POST", "/api/v1/parties/p1/events", 100, None, b"401"),  # no API key
        ("POST", "/api/v1/parties/p1/events", 100, "wrong-key-0123456789abcdef0123", b"401"),
        ("POST", "/api/v1/parties/p1/votes", 10**9, KEY, b"413"),
        ("POST", "/api/v1/auth/telegram", 100, None, b"503"),  # not configured
        ("PUT", "/api/v1/parties/p1/members/aria", 10**7, KEY, b"413"),
    ],
)
async def test_a_request_refused_before_its_body_is_answered_instead_of_asked_for_it(
    method: str, path: str, length: int, key: str | None, status: bytes
) -> None:
    """``curl`` sends ``Expect: 100-continue`` with a large body, and aiohttp's default
    answered ``100 Continue`` before the route ran: a body over the limit, or one without the
    API key, was uploaded whole, then refused 413 or 401. The refusal is now the first answer
    (RFC 9110 §10.1.1), and it ends the connection (the body was never asked for)."""
    server = build_server(make_settings(api_key=KEY))
    listening = await start_serving(server, "127.0.0.1", 0, shutdown_timeout=5.0)
    try:
        head = await _expecting(listening.port, path, length, key, method)
        first = head.split(b"\r\n", 1)[0]
        assert first.startswith(b"HTTP/1.1 " + status), head
        assert b"\r\nconnection: close" in head.lower(), head
    finally:
        await listening.stop()


async def test_a_request_within_the_limits_is_asked_for_its_body_and_applied() -> None:
    server = build_server(make_settings(api_key=KEY))
    listening = await start_serving(server, "127.0.0.1", 0, shutdown_timeout=5.0)
    try:
        body = json.dumps(api_events.SCENE).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", listening.port)
        writer.write(_expect_head("POST", "/api/v1/parties/p1/events", len(body), KEY))
        async with asyncio.timeout(10):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body)
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 201", b"HTTP/1.1 202")), head
        writer.close()
        # and with aiohttp's client, which waits for the 100 as curl does
        async with aiohttp.ClientSession() as session:
            for key, accepted in ((KEY, True), ("nope", False)):
                async with session.post(
                    f"http://127.0.0.1:{listening.port}/api/v1/parties/p1/events",
                    data=body,
                    headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                    expect100=True,
                ) as resp:
                    assert (resp.status < 300) if accepted else resp.status == 401, resp.status
    finally:
        await listening.stop()


async def test_an_expectation_other_than_100_continue_is_refused_417_as_a_problem() -> None:
    server = build_server(make_settings(api_key=KEY))
    listening = await start_serving(server, "127.0.0.1", 0, shutdown_timeout=5.0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listening.port)
        writer.write(
            b"POST /api/v1/parties/p1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Expect: 200-ok\r\n\r\n{}"
        )
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        head, _, document = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 417"), answer
        assert json.loads(document)["code"] == "bad_request"
    finally:
        await listening.stop()


async def test_the_engine_host_answers_an_oversized_delivery_before_asking_for_it() -> None:
    from party_sync.engine.http_host import ApiPublisher, build_host_app
    from ps_testkit.engines import ScriptedEngine

    app = build_host_app(ScriptedEngine(), ApiPublisher("http://127.0.0.1:9", KEY, retries=0))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        head = await _expecting(runner.addresses[0][1], "/actions", 10**8)
        assert head.startswith(b"HTTP/1.1 413"), head
    finally:
        await runner.cleanup()
