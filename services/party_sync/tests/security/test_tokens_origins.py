"""The handshake matrix: every kind of bad token gets 401, a refused origin 403, over a cap 429;
never a 500, and a refused handshake leaves no trace (no join, no engine notice).

Tokens are made by hand with PyJWT (``jwt.encode``) or, where PyJWT refuses to make them
(``alg: none`` with a signature, a 400-digit ``exp``), byte by byte.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from ps_testkit.engines import ScriptedEngine
from ps_testkit.security_raw import capture_logs
from ps_testkit.servers import SECRET, Running, make_settings, serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis

ORIGIN = "https://game.example"


def now() -> int:
    """Tokens take the time when they are made: the full suite reaches this file more than ten
    minutes (a token's life here) after import, and a token made at import had expired."""
    return int(time.time())


def claims(**overrides: Any) -> dict[str, Any]:
    t = now()
    base: dict[str, Any] = {
        "sub": "user-1",
        "party_id": "p1",
        "campaign_run_id": "r1",
        "character_id": "aria",
        "display_name": "Aria",
        "aud": "party_sync",
        "iat": t,
        "exp": t + 600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload_json: str, signature: bytes | None = None) -> str:
    """A JWT from its parts; signed with HS256 and SECRET unless ``signature`` is given."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(payload_json.encode())
    if signature is None:
        import hashlib
        import hmac

        signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


def signed(**overrides: Any) -> str:
    return jwt.encode(claims(**overrides), SECRET, algorithm="HS256")


def _huge_exp() -> str:
    body = json.dumps(claims(exp=None))[:-1] + ', "exp": ' + "9" * 400 + "}"
    return raw_token({"alg": "HS256", "typ": "JWT"}, body)


def token_cases() -> dict[str, dict[str, str]]:
    """name → query parameters, made when a test runs: each token is bad for its named reason
    only (made at import, a token meant to be bad for another reason had expired by the time
    the full suite got here)."""
    t = now()
    return {
        "missing": {},
        "empty": {"token": ""},
        "garbage": {"token": "not-a-jwt"},
        "two parts": {"token": "abc.def"},
        "non-ascii": {"token": "ü.ü.ü"},
        "expired": {"token": signed(exp=t - 120)},
        "bad signature": {"token": jwt.encode(claims(), "another-secret-0123456789abcdef0123456")},
        "previous-style secret not configured": {"token": jwt.encode(claims(), SECRET + "-old")},
        "wrong audience": {"token": signed(aud="someone-else")},
        "audience list without us": {"token": signed(aud=["a", "b"])},
        "alg none unsigned": {
            "token": raw_token({"alg": "none", "typ": "JWT"}, json.dumps(claims()), b"")
        },
        "alg none with a signature": {
            "token": raw_token({"alg": "none", "typ": "JWT"}, json.dumps(claims()), b"sig")
        },
        "HS512 when only HS256 is accepted": {
            "token": jwt.encode(claims(), SECRET * 2, algorithm="HS512")
        },
        "RS256 header over an HMAC signature (key confusion)": {
            "token": raw_token({"alg": "RS256", "typ": "JWT"}, json.dumps(claims()))
        },
        "no exp": {"token": signed(exp=None)},
        "no aud": {"token": signed(aud=None)},
        "no party_id": {"token": signed(party_id=None)},
        "no campaign_run_id": {"token": signed(campaign_run_id=None)},
        "no character_id": {"token": signed(character_id=None)},
        "huge exp (400 digits)": {"token": _huge_exp()},
        "exp 1e300": {"token": signed(exp=1e300)},
        "exp as a numeric string": {"token": signed(exp=str(t + 600))},
        "exp true": {"token": signed(exp=True)},
        "exp null": {"token": raw_token({"alg": "HS256"}, json.dumps({**claims(), "exp": None}))},
        "exp an object": {"token": signed(exp={"n": t + 600})},
        "exp negative": {"token": signed(exp=-1)},
        "iat as a string": {"token": signed(iat="yesterday")},
        "iat in the future": {"token": signed(iat=t + 3600)},
        "nbf in the future": {"token": signed(nbf=t + 3600)},
        "nbf 1e300": {"token": signed(nbf=1e300)},
        "party id with a space": {"token": signed(party_id="p 1")},
        "party id with a star": {"token": signed(party_id="p*")},
        "party id with a newline": {"token": signed(party_id="p1\n")},
        "party id with NUL": {"token": signed(party_id="p\x001")},
        "party id non-ASCII": {"token": signed(party_id="pü")},
        "party id of 65 characters": {"token": signed(party_id="p" * 65)},
        "party id a number": {"token": signed(party_id=1)},
        "character id 'party' (reserved)": {"token": signed(character_id="party")},
        "character id a list": {"token": signed(character_id=["aria"])},
        "run id empty": {"token": signed(campaign_run_id="")},
        "sub a number": {"token": signed(sub=42)},
    }


@pytest.fixture
async def srv() -> AsyncIterator[tuple[Running, ScriptedEngine]]:
    engine = ScriptedEngine()
    async with serve_in_process(make_settings(), engine=engine) as running:
        yield running, engine


@pytest.mark.parametrize("name", list(token_cases()))
async def test_a_bad_token_gets_401_and_leaves_no_trace(
    srv: tuple[Running, ScriptedEngine], name: str
) -> None:
    running, engine = srv
    params = token_cases()[name]
    with capture_logs() as logs:
        assert await running.handshake_status(params) == 401, name
        header = {"Authorization": f"Bearer {params['token']}"} if params.get("token") else {}
        assert await running.handshake_status({}, headers=header) == 401, name
    assert engine.joins == []
    assert not logs.errors(), logs.errors()
    if params.get("token"):
        assert not logs.containing(params["token"]), "a token reached the logs"
    # The server is fine: a good token still joins.
    client, hello = await running.join("borin")
    assert [m["character_id"] for m in hello["payload"]["members"]] == ["borin"]
    await client.close()


async def test_a_good_token_in_the_query_or_the_header_is_accepted(
    srv: tuple[Running, ScriptedEngine],
) -> None:
    running, _ = srv
    assert await running.handshake_status({"token": signed()}) == 101
    assert (
        await running.handshake_status({}, headers={"Authorization": "Bearer " + signed()}) == 101
    )
    assert await running.handshake_status({"token": signed(nbf=now() - 5, iat=now() - 5)}) == 101


@pytest.mark.parametrize(
    "name", ["new\nline", "cr\rlf", "nul\x00byte", "bidi \u202eevil", "<b>html</b>\u2066"]
)
async def test_a_display_name_with_control_or_bidi_characters_never_reaches_other_members(
    srv: tuple[Running, ScriptedEngine], name: str
) -> None:
    """Normalised or refused at the edge: what members see has no control, bidi override or
    isolate characters."""
    running, _ = srv
    watcher, _ = await running.join("borin")
    status = await running.handshake_status({"token": signed(display_name=name, sub="u-x")})
    assert status in (101, 401)
    if status == 101:
        join = await watcher.until("party.join")
        shown = join["payload"]["display_name"]
        assert shown and not any(_forbidden_char(c) for c in shown), repr(shown)
    await watcher.close()


def _forbidden_char(c: str) -> bool:
    return (
        ord(c) < 0x20
        or 0x7F <= ord(c) < 0xA0
        or 0x202A <= ord(c) <= 0x202E
        or 0x2066 <= ord(c) <= 0x2069
    )


# -- origins -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "token_ok", "status"),
    [
        (ORIGIN, True, 101),
        (None, True, 101),  # not a browser: the token alone decides
        ("https://evil.example", True, 403),
        ("null", True, 403),
        ("HTTPS://GAME.EXAMPLE", True, 403),
        (ORIGIN + "/", True, 403),
        (ORIGIN + ".evil.example", True, 403),
        ("http://game.example", True, 403),
        ("", True, 403),
        ("https://evil.example", False, 403),  # the origin is checked first
        (ORIGIN, False, 401),
    ],
)
async def test_the_origin_allowlist(origin: str | None, token_ok: bool, status: int) -> None:
    settings = make_settings(allowed_origins=(ORIGIN, "https://other.example"))
    async with serve_in_process(settings, engine=ScriptedEngine()) as running:
        headers = {"Origin": origin} if origin is not None else {}
        params = {"token": signed() if token_ok else signed(exp=now() - 120)}
        assert await running.handshake_status(params, headers=headers) == status


async def test_a_refused_origin_is_logged_once_as_a_warning_naming_it() -> None:
    """A browser cannot read a refused handshake's status: the server's log says which origin
    was kept out (once per origin; a flood of them adds no lines)."""
    from party_sync.transport import http

    http._ORIGINS_TOLD.clear()
    settings = make_settings(allowed_origins=(ORIGIN,))
    with capture_logs(logging.INFO) as logs:
        async with serve_in_process(settings, engine=ScriptedEngine()) as running:
            for _ in range(3):
                for origin in ("http://localhost:8080", "https://evil.example"):
                    headers = {"Origin": origin}
                    assert (
                        await running.handshake_status({"token": signed()}, headers=headers) == 403
                    )
            assert (
                await running.handshake_status({"token": signed()}, headers={"Origin": ORIGIN})
                == 101
            )
    told = [r for r in logs.records if "origin not in allowed_origins" in r.getMessage()]
    assert [(r.levelname, getattr(r, "origin", None)) for r in told] == [
        ("WARNING", "http://localhost:8080"),
        ("WARNING", "https://evil.example"),
    ]
    http._ORIGINS_TOLD.clear()


async def test_an_empty_allowlist_accepts_any_origin() -> None:
    async with serve_in_process(make_settings(), engine=ScriptedEngine()) as running:
        status = await running.handshake_status(
            {"token": signed()}, headers={"Origin": "https://anything.example"}
        )
        assert status == 101


async def test_telegram_sign_in_checks_the_origin_too() -> None:
    settings = make_settings(allowed_origins=(ORIGIN,), telegram_bot_token="123:abc")
    async with serve_in_process(settings, engine=ScriptedEngine()) as running:
        url = running.base + "/api/v1/auth/telegram"
        body = {"init_data": "x=1", "party_id": "p1", "character_id": "aria"}
        async with running.http.post(
            url, json=body, headers={"Origin": "https://evil.example"}
        ) as r:
            assert r.status == 403


# -- caps ----------------------------------------------------------------------------------------


async def test_one_token_subject_cannot_hold_more_than_its_cap_of_websockets() -> None:
    """One token must not hold hundreds of WebSockets. Over ``max_connections_per_user``: 429;
    another subject is still served, and a slot freed by a close is usable again."""
    async with serve_in_process(
        make_settings(max_connections_per_user=3), engine=ScriptedEngine()
    ) as running:
        same = {"token": signed(sub="greedy")}
        open_ = [await running.http.ws_connect(running.ws_url, params=same) for _ in range(3)]
        assert await running.handshake_status(same) == 429
        assert await running.handshake_status({"token": signed(sub="someone-else")}) == 101
        await open_.pop().close()

        async def freed() -> bool:
            return await running.handshake_status(same) == 101

        from ps_testkit.cluster import wait_async

        await wait_async(freed, timeout=5)
        for ws in open_:
            await ws.close()
