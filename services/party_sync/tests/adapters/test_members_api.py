"""The membership API (``/api/v1/parties/{party_id}/members``) and its directory, on both stores."""

from __future__ import annotations

from typing import Any

import pytest
from party_sync.backends.directory import Membership, RedisDirectory
from party_sync.backends.keys import KeySpace
from party_sync.protocol.errors import BackendUnavailable
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import Running, free_port, make_settings, serve_in_process

KEY = "api-key-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
ARIA = {"telegram_user_id": 279058397, "display_name": "Aria", "campaign_run_id": "run-7"}
MEMBER = "/api/v1/parties/p1/members/aria"


async def call(
    srv: Running, method: str, path: str, body: Any = None, headers: dict[str, str] | None = AUTH
) -> tuple[int, Any]:
    async with srv.http.request(method, srv.base + path, json=body, headers=headers) as resp:
        json_types = ("application/json", "application/problem+json")
        data = await resp.json() if resp.content_type in json_types else None
        return resp.status, data


@pytest.mark.usefixtures("backend_kind")  # memory and redis: the directory follows redis_url
async def test_register_read_list_and_delete_a_membership() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        assert await call(srv, "PUT", MEMBER, ARIA) == (204, None)
        borin = {**ARIA, "telegram_user_id": 5, "display_name": "Borin"}
        assert (await call(srv, "PUT", "/api/v1/parties/p1/members/borin", borin))[0] == 204
        status, member = await call(srv, "GET", MEMBER)
        assert status == 200
        assert member == {"party_id": "p1", "character_id": "aria", **ARIA}
        status, listing = await call(srv, "GET", "/api/v1/parties/p1/members")
        assert status == 200
        assert [m["character_id"] for m in listing["members"]] == ["aria", "borin"]
        renamed = {**ARIA, "display_name": "Aria the Bold"}
        assert (await call(srv, "PUT", MEMBER, renamed))[0] == 204  # replaces
        assert (await call(srv, "GET", MEMBER))[1]["display_name"] == "Aria the Bold"
        assert await call(srv, "DELETE", MEMBER) == (204, None)
        assert (await call(srv, "GET", MEMBER))[0] == 404
        assert await call(srv, "DELETE", MEMBER) == (204, None)  # idempotent
        status, listing = await call(srv, "GET", "/api/v1/parties/p9/members")
        assert (status, listing) == (200, {"members": []})


async def test_an_integral_number_is_an_integer_as_in_json_schema() -> None:
    """/openapi.json's telegram_user_id is an integer, and JSON Schema counts 8776.0 as one (a
    client whose JSON library writes numbers as floats was refused 422: schemathesis probe)."""
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        assert (await call(srv, "PUT", MEMBER, {**ARIA, "telegram_user_id": 8776.0}))[0] == 204
        assert (await call(srv, "GET", MEMBER))[1]["telegram_user_id"] == 8776


async def test_every_route_needs_the_api_key_before_anything_else() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for method, path in (
                ("PUT", MEMBER),
                ("DELETE", MEMBER),
                ("GET", MEMBER),
                ("GET", "/api/v1/parties/p1/members"),
            ):
                status, problem = await call(srv, method, path, {"junk": 1}, headers)
                assert (status, problem["error"]) == (401, "unauthorized"), (method, headers)
        assert (await call(srv, "GET", MEMBER))[0] == 404  # nothing was registered


async def test_no_configured_key_refuses_registration() -> None:
    async with serve_in_process(make_settings(api_key=None), engine=ScriptedEngine()) as srv:
        assert (await call(srv, "PUT", MEMBER, ARIA, {"Authorization": "Bearer "}))[0] == 401


@pytest.mark.parametrize(
    ("path", "body", "word"),
    [
        (MEMBER, {**ARIA, "telegram_user_id": "279058397"}, "telegram_user_id"),
        (MEMBER, {**ARIA, "telegram_user_id": True}, "telegram_user_id"),
        (MEMBER, {**ARIA, "telegram_user_id": 0}, "telegram_user_id"),
        (MEMBER, {**ARIA, "telegram_user_id": 2.5}, "telegram_user_id"),
        (MEMBER, {**ARIA, "telegram_user_id": 1e20}, "telegram_user_id"),  # (past 2**63 - 1)
        (MEMBER, {**ARIA, "display_name": ""}, "display_name"),
        (MEMBER, {**ARIA, "display_name": "x" * 65}, "display_name"),
        (MEMBER, {**ARIA, "campaign_run_id": "bad run"}, "campaign_run_id"),
        (MEMBER, {k: v for k, v in ARIA.items() if k != "campaign_run_id"}, "campaign_run_id"),
        (MEMBER, {**ARIA, "role": "admin"}, "unknown"),
        (MEMBER, [ARIA], "object"),
        ("/api/v1/parties/p1/members/party", ARIA, "reserved"),
        # a path id that breaks the id rule is 400 invalid_id (see test_http_api.py)
    ],
)
async def test_invalid_registrations_get_422_and_store_nothing(
    path: str, body: Any, word: str
) -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        status, problem = await call(srv, "PUT", path, body)
        assert (status, problem["error"]) == (422, "invalid_membership")
        assert word in problem["detail"]
        assert (await call(srv, "GET", "/api/v1/parties/p1/members"))[1] == {"members": []}


async def test_a_body_that_is_not_json_gets_400() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        async with srv.http.put(srv.base + MEMBER, data=b"{nope", headers=AUTH) as resp:
            assert resp.status == 400
        async with srv.http.put(srv.base + MEMBER, data=b"x" * 5000, headers=AUTH) as resp:
            assert resp.status == 413


def test_the_directory_key_lives_in_the_party_slot() -> None:
    assert KeySpace("ps").directory("p1") == "ps:{party:p1}:directory"


async def test_an_unreachable_store_is_backend_unavailable() -> None:
    directory = RedisDirectory(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    try:
        with pytest.raises(BackendUnavailable):
            await directory.get("p1", "aria")
        with pytest.raises(BackendUnavailable):
            await directory.put(Membership("p1", "aria", 1, "Aria", "r1"))
    finally:
        await directory.close()
