"""Telegram Mini App sign-in (``POST /api/v1/auth/telegram``) over HTTP, then the token over /ws.

initData is made here as Telegram makes it, with a test bot token (``sign_init_data`` follows the
documented algorithm; ``tests/core/test_initdata.py`` checks it against an independent build).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
from openapi_spec_validator import validate
from party_sync.initdata import sign_init_data
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import Running, make_settings, serve_in_process

BOT = "7000000001:AAF-test-bot-token-of-party-sync"
KEY = "api-key-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
TG_ID = 279058397
SIGN_IN = "/api/v1/auth/telegram"


def init_data(user_id: int = TG_ID, age: float = 60.0, bot: str = BOT, **extra: str) -> str:
    fields = {
        "query_id": "AAHdF6IQAAAAAN0XohDhrOrc",
        "user": json.dumps({"id": user_id, "first_name": "Ann", "username": "ann"}),
        "auth_date": str(int(time.time() - age)),
        **extra,
    }
    return sign_init_data(fields, bot)


@asynccontextmanager
async def server(**overrides: Any) -> AsyncIterator[Running]:
    settings = make_settings(api_key=KEY, telegram_bot_token=BOT, **overrides)
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        body = {"telegram_user_id": TG_ID, "display_name": "Aria", "campaign_run_id": "run-7"}
        async with srv.http.put(
            f"{srv.base}/api/v1/parties/p1/members/aria", json=body, headers=AUTH
        ) as resp:
            assert resp.status == 204
        yield srv


async def sign_in(
    srv: Running,
    raw: str,
    party: str = "p1",
    character: str = "aria",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    body = {"init_data": raw, "party_id": party, "character_id": character}
    async with srv.http.post(srv.base + SIGN_IN, json=body, headers=headers) as resp:
        assert resp.headers.get("Cache-Control") == "no-store"
        return resp.status, await resp.json()


async def test_valid_init_data_gives_a_token_that_connects_as_the_member(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with server(telegram_token_ttl=600.0) as srv:
        before = time.time()
        with caplog.at_level(logging.INFO, logger="party_sync.transport.telegram"):
            status, body = await sign_in(srv, init_data())
        assert status == 200, body
        # the log names the user as the token does (security probe: it said the bare number)
        (said,) = [r for r in caplog.records if r.getMessage() == "telegram sign-in"]
        assert said.__dict__["sub"] == f"telegram:{TG_ID}"
        assert set(body) == {"token", "expires_at"}
        assert before + 599 <= body["expires_at"] <= time.time() + 601
        assert srv.server is not None
        claims = srv.server.verifier.verify(body["token"])
        assert claims.sub == f"telegram:{TG_ID}"
        assert (claims.party_id, claims.campaign_run_id, claims.character_id) == (
            "p1",
            "run-7",
            "aria",
        )
        client, hello = await srv.join("aria", token_value=body["token"])
        p = hello["payload"]
        assert (p["you"], p["party_id"], p["campaign_run_id"]) == ("aria", "p1", "run-7")
        assert p["members"] == [{"character_id": "aria", "display_name": "Aria", "online": True}]
        await client.close()


def _tampered() -> str:
    """The signed initData of another user, with this user's id put in (the hash kept)."""
    fields = dict(parse_qsl(init_data(user_id=1)))
    fields["user"] = fields["user"].replace('"id": 1', f'"id": {TG_ID}')
    assert str(TG_ID) in fields["user"]
    return urlencode(fields)


def _duplicate() -> str:
    raw = init_data()
    return raw + "&auth_date=" + str(int(time.time()))


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (_tampered, 401, "invalid_init_data"),
        (lambda: init_data(bot="7000000002:another-bot"), 401, "invalid_init_data"),
        (lambda: init_data(age=7200), 401, "init_data_expired"),
        (lambda: init_data(age=-600), 401, "init_data_expired"),
        (_duplicate, 400, "malformed_init_data"),
        (lambda: init_data().rsplit("&hash=", 1)[0], 401, "invalid_init_data"),
        (lambda: "definitely not initData", 400, "malformed_init_data"),
    ],
    ids=["tampered", "wrong-bot", "stale", "future", "duplicate-key", "no-hash", "garbage"],
)
async def test_bad_init_data_is_refused_with_a_stable_code_only(
    make: Any, status: int, code: str
) -> None:
    async with server() as srv:
        raw = make()
        got, body = await sign_in(srv, raw)
        assert (got, body["error"]) == (status, code)
        assert raw not in json.dumps(body)


async def test_an_init_data_over_the_size_limit_is_told_so() -> None:
    """Docs probe: an initData over 8 KiB was refused as "not a well-formed Telegram initData
    string", sending its developer to look at the wrong thing."""
    async with server() as srv:
        status, body = await sign_in(srv, init_data() + "&pad=" + "x" * 9000)
        assert (status, body["error"]) == (400, "malformed_init_data")
        assert body["detail"].startswith("init_data is longer than 8192 bytes"), body


async def test_stale_is_configurable() -> None:
    async with server(telegram_max_age=10_000.0) as srv:
        assert (await sign_in(srv, init_data(age=7200)))[0] == 200


@pytest.mark.parametrize(
    ("user_id", "party", "character"),
    [(TG_ID + 1, "p1", "aria"), (TG_ID, "p1", "borin"), (TG_ID, "p2", "aria")],
    ids=["other-user", "other-character", "other-party"],
)
async def test_a_user_who_is_not_that_member_is_forbidden(
    user_id: int, party: str, character: str
) -> None:
    async with server() as srv:
        status, body = await sign_in(srv, init_data(user_id=user_id), party, character)
        assert (status, body["error"]) == (403, "not_a_member")


async def test_a_deleted_membership_stops_new_sign_ins() -> None:
    async with server() as srv:
        assert (await sign_in(srv, init_data()))[0] == 200
        async with srv.http.delete(
            f"{srv.base}/api/v1/parties/p1/members/aria", headers=AUTH
        ) as resp:
            assert resp.status == 204
        assert (await sign_in(srv, init_data()))[0] == 403


@pytest.mark.parametrize(
    "body",
    [
        {"init_data": "x", "party_id": "p1"},
        {"init_data": "x", "party_id": "p1", "character_id": "aria", "extra": 1},
        {"init_data": 5, "party_id": "p1", "character_id": "aria"},
        {"init_data": "x", "party_id": "p 1", "character_id": "aria"},
        {"init_data": "x", "party_id": "p1", "character_id": "party"},
        ["init_data"],
    ],
)
async def test_a_malformed_request_gets_400(body: Any) -> None:
    async with server() as srv, srv.http.post(srv.base + SIGN_IN, json=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "bad_request"


async def test_without_a_bot_token_sign_in_is_unavailable_and_says_why() -> None:
    settings = make_settings(api_key=KEY)
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        status, body = await sign_in(srv, init_data())
        assert (status, body["error"]) == (503, "telegram_not_configured")
        assert "PARTY_SYNC_TELEGRAM_BOT_TOKEN" in body["detail"]


async def test_an_origin_outside_the_allowlist_is_refused() -> None:
    async with server(allowed_origins=("https://app.example",)) as srv:
        bad = await sign_in(srv, init_data(), headers={"Origin": "https://evil.example"})
        assert (bad[0], bad[1]["error"]) == (403, "origin_not_allowed")
        good = await sign_in(srv, init_data(), headers={"Origin": "https://app.example"})
        assert good[0] == 200


async def test_init_data_and_tokens_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with server() as srv:
        good = init_data()
        _, body = await sign_in(srv, good)
        await sign_in(srv, init_data(age=7200))
        await sign_in(srv, _tampered())
    secrets = [good, good.rsplit("hash=", 1)[1], body["token"], BOT]
    for record in caplog.records:
        text = record.getMessage() + " " + json.dumps(record.__dict__, default=str)
        for secret in secrets:
            assert secret not in text, record


async def test_the_openapi_document_lists_sign_in_and_the_membership_api() -> None:
    async with server() as srv, srv.http.get(srv.base + "/openapi.json") as resp:
        spec = await resp.json()
    validate(spec)
    paths = spec["paths"]
    assert set(paths[SIGN_IN]) == {"post"}
    assert {"put", "delete", "get"} <= set(
        paths["/api/v1/parties/{party_id}/members/{character_id}"]
    )
    assert "get" in paths["/api/v1/parties/{party_id}/members"]
