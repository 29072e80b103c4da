"""Hostile input at the edges (docs/security.md, "What is checked at the edge"): deep frames over
/ws, hostile time claims at the handshake, hostile display names, the id rule of every API route
driven by generated ids without a socket, and sign-in bodies that arrive in several segments."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from party_sync.backends.directory import MemoryDirectory
from party_sync.initdata import sign_init_data
from party_sync.protocol.ids import ID_RULE
from party_sync.transport import api, members
from ps_testkit.engines import ScriptedEngine
from ps_testkit.raw_http import raw_request
from ps_testkit.servers import SECRET, make_settings, serve_in_process

KEY = "api-key-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}

# -- a deep frame over the WebSocket -----------------------------------------------------------


def deep_action(depth: int, action_id: str = "deep-1") -> str:
    """An action.request whose whole message nests ``depth`` levels (payload.payload is free)."""
    inner = '{"k":' * (depth - 3) + "{}" + "}" * (depth - 3)
    head = {
        "action_id": action_id,
        "character_id": "aria",
        "campaign_run_id": "r1",
        "action_type": "skill_check",
        "payload": "@@",
    }
    message = {"type": "action.request", "trace_id": "t-deep", "payload": head}
    return json.dumps(message).replace('"@@"', inner)


async def test_a_frame_nested_300_deep_gets_too_deep_and_the_connection_stays_usable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = ScriptedEngine()
    caplog.set_level(logging.INFO)
    async with serve_in_process(make_settings(), engine=engine) as srv:
        a, _ = await srv.join("aria")
        # 300: parses, but could not be re-encoded for the stream link; 1,100: past orjson's own
        # parse limit (1,024); 65: one level over the bound
        for depth in (300, 1100, 65):
            await a.send(deep_action(depth))
            error = await a.expect("system.error")
            assert error["payload"]["code"] == "too_deep"
            assert error["payload"]["retryable"] is False
            # named when it could be parsed at all (300, 65); past orjson's limit, nothing
            in_reply_to = error["payload"]["in_reply_to"]
            if depth == 1100:
                assert in_reply_to == {"trace_id": None, "type": None}
            else:
                assert in_reply_to["type"] == "action.request"
                assert "action_id" in in_reply_to
        # the connection is still usable, and the deepest accepted action reaches the engine
        await a.send(deep_action(64, action_id="ok-1"))
        result = await a.expect("action.result")
        assert result["payload"]["action_id"] == "ok-1"
        assert [c.action_id for c in engine.calls] == ["ok-1"]  # nothing deep reached the engine
        await a.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert not any(r.exc_info for r in caplog.records if r.name.startswith("party_sync"))


# -- hostile time claims at the handshake ------------------------------------------------------


def _b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def signed(payload: dict[str, Any]) -> str:
    """A token signed with the server's secret whose payload is exactly ``json.dumps(payload)``."""
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(payload)}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "party_id": "p1",
        "campaign_run_id": "r1",
        "character_id": "aria",
        "display_name": "Aria",
        "aud": "party_sync",
        "iat": now,
        "exp": now + 600,
    }
    return base | changes


@pytest.mark.parametrize(
    "changes",
    [
        {"exp": 1e300},
        {"exp": 10**400},
        {"exp": "9999999999"},
        {"exp": True},
        {"exp": float("nan")},
        {"exp": float("inf")},
        {"exp": -5},
        {"exp": None},
        {"iat": 1e300},
        {"iat": 10**400},
        {"iat": "x"},
        {"nbf": float("-inf")},
        {"nbf": 10**400},
    ],
    ids=repr,
)
async def test_a_hostile_time_claim_is_401_at_the_handshake(
    changes: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    async with serve_in_process(make_settings(), engine=ScriptedEngine()) as srv:
        status = await srv.handshake_status({"token": signed(claims(**changes))})
        assert status == 401
        assert await srv.handshake_status({"token": signed(claims())}) == 101  # still serving
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- display names -------------------------------------------------------------------------------


async def test_a_signed_token_with_a_hostile_name_joins_under_a_clean_name() -> None:
    hostile = "Ar\u202eia\r\n\x00<img src=x onerror=alert(1)>"
    async with serve_in_process(make_settings(), engine=ScriptedEngine()) as srv:
        b, _ = await srv.join("borin")
        tok = jwt.encode(claims(display_name=hostile), SECRET, algorithm="HS256")
        a, hello = await srv.join("aria", token_value=tok)
        clean = "Aria  <img src=x onerror=alert(1)>"  # HTML stays: clients render it as text
        assert {m["display_name"] for m in hello["payload"]["members"]} >= {clean}
        join = await b.until("party.join")
        assert join["payload"] == {"character_id": "aria", "display_name": clean}
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    "name", ["Aria\n", "A\r\nB", "A\x00", "\u202eairA", "A\u2066B\u2069", "\u200b", "A\x1b[2J"]
)
async def test_the_membership_api_refuses_a_hostile_name(name: str) -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        body = {"telegram_user_id": 7, "display_name": name, "campaign_run_id": "r1"}
        path = srv.base + "/api/v1/parties/p1/members/aria"
        async with srv.http.put(path, json=body, headers=AUTH) as resp:
            assert resp.status == 422
            assert (await resp.json())["error"] == "invalid_display_name"
        async with srv.http.get(path, headers=AUTH) as resp:
            assert resp.status == 404  # nothing was stored


async def test_the_dev_token_endpoint_refuses_a_hostile_name_and_reads_bodies_whole() -> None:
    async with serve_in_process(make_settings(), engine=ScriptedEngine(), dev_mode=True) as srv:
        url = srv.base + "/api/v1/dev/token"
        for name in ("Aria\n", "\u202eairA", "A\x00"):
            body = {"character_id": "cora", "display_name": name}
            async with srv.http.post(url, json=body) as resp:
                assert resp.status == 422
                assert (await resp.json())["error"] == "invalid_display_name"
        async with srv.http.post(url, data=b"x" * 5000) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "too_large"
        async with srv.http.post(url, data=b"[" * 300 + b"]" * 300) as resp:
            assert (resp.status, (await resp.json())["error"]) == (400, "too_deep")
        async with srv.http.post(url, data=b"{nope") as resp:
            assert (resp.status, (await resp.json())["error"]) == (400, "bad_json")


# -- generated bad ids on every API route, without a socket -----------------------------------

ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"
bad_ids = st.one_of(
    st.just(""),
    st.text(alphabet=ID_CHARS, min_size=65, max_size=3000),
    st.tuples(
        st.text(alphabet=ID_CHARS, max_size=20),
        st.sampled_from(["*", "?", " ", "\n", "\r\n", "\x00", "á", "\u202e", "/", "{a}"])
        | st.characters(blacklist_characters=ID_CHARS),
        st.text(alphabet=ID_CHARS, max_size=20),
    ).map("".join),
)


def _bare_api_app() -> web.Application:
    """The API routes on an app *without* a gateway: a handler that got past the id check would
    fail with a KeyError (it would reach for the backend), so a 400 proves the check came first."""
    app = web.Application()
    api.add_routes(app, KEY)
    members.add_routes(app, MemoryDirectory())
    return app


APP = _bare_api_app()
ROUTES = [
    (route.method, route.resource.canonical, route.handler)
    for route in APP.router.routes()
    if route.resource is not None and "{" in route.resource.canonical and route.method != "HEAD"
]


def test_the_api_has_the_routes_the_test_drives() -> None:
    assert len(ROUTES) == 11


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ROUTES), bad_ids, st.data())
def test_a_generated_bad_path_id_gets_400_invalid_id_on_every_route(
    route: tuple[str, str, Any], bad: str, data: st.DataObject
) -> None:
    method, template, handler = route
    names = [part[1:-1] for part in template.split("/") if part.startswith("{")]
    target = data.draw(st.sampled_from(names))
    match_info = {name: bad if name == target else "ok-id" for name in names}

    async def call() -> web.StreamResponse:
        request = make_mocked_request(
            method, "/api/v1/x", headers=AUTH, app=APP, match_info=match_info
        )
        response: web.StreamResponse = await handler(request)
        return response

    response = asyncio.run(call())
    assert isinstance(response, web.Response)
    assert response.status == 400
    assert response.body is not None
    problem = json.loads(bytes(response.body))  # type: ignore[arg-type]
    assert problem["error"] == "invalid_id"
    assert problem["detail"] == f"{target}: {ID_RULE}"  # a fixed sentence: the id is not echoed


def test_the_key_is_checked_before_the_path_ids() -> None:
    method, _, handler = ROUTES[0]

    async def call() -> web.StreamResponse:
        request = make_mocked_request(method, "/api/v1/x", app=APP, match_info={"party_id": "*"})
        response: web.StreamResponse = await handler(request)
        return response

    assert asyncio.run(call()).status == 401


# -- sign-in bodies that arrive in several segments -------------------------------------------

BOT = "7000000001:AAF-test-bot-token-of-party-sync"


async def test_a_telegram_sign_in_and_a_dev_token_split_across_segments_are_read_whole() -> None:
    settings = make_settings(api_key=KEY, telegram_bot_token=BOT)
    async with serve_in_process(settings, engine=ScriptedEngine(), dev_mode=True) as srv:
        member = {"telegram_user_id": 279058397, "display_name": "Aria", "campaign_run_id": "r1"}
        status, _ = await raw_request(
            srv,
            "PUT",
            "/api/v1/parties/p1/members/aria",
            json.dumps(member).encode(),
            headers=AUTH,
            pieces=2,
        )
        assert status == 204
        user = json.dumps({"id": 279058397, "first_name": "Ann\n\u202e", "username": "ann"})
        fields = {"query_id": "AAHdF6IQ", "user": user, "auth_date": str(int(time.time()) - 5)}
        body = {"init_data": sign_init_data(fields, BOT), "party_id": "p1", "character_id": "aria"}
        status, answer = await raw_request(
            srv, "POST", "/api/v1/auth/telegram", json.dumps(body).encode(), pieces=4
        )
        assert status == 200, answer
        _, hello = await srv.join("aria", token_value=answer["token"])
        assert hello["payload"]["members"][0]["display_name"] == "Aria"  # never Telegram's name
        dev = json.dumps({"character_id": "cora", "display_name": "Cora"}).encode()
        status, answer = await raw_request(srv, "POST", "/api/v1/dev/token", dev, pieces=3)
        assert (status, answer["display_name"]) == (200, "Cora")
