"""The server API: engines publish into parties over HTTP (issue 4's events API)."""

from __future__ import annotations

from typing import Any

import pytest
from openapi_spec_validator import validate
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import Running, make_settings, serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis

KEY = "api-key-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}

SCENE: dict[str, Any] = {
    "type": "scene.update",
    "trace_id": "eng-trace-1",
    "payload": {
        "scene_number": 1,
        "scene_id": "gate",
        "title": "The Gate",
        "narration": "Rain on iron.",
        "options": [{"id": "A", "label": "Knock"}],
        "kind": "story",
    },
}


async def post(
    srv: Running, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with srv.http.post(srv.base + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_a_published_event_is_sequenced_and_broadcast() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, hello = await srv.join("aria")
        status, body = await post(srv, "/api/v1/parties/p1/events", SCENE, AUTH)
        assert status == 202
        assert body == {"seq": hello["payload"]["seq"] + 1}
        event = await a.expect("scene.update")
        assert event["seq"] == body["seq"]
        assert event["trace_id"] == "eng-trace-1"
        assert event["payload"] == SCENE["payload"]
        await a.close()


async def test_the_key_is_checked_before_anything_else() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            status, body = await post(srv, "/api/v1/parties/p1/events", {"junk": True}, headers)
            assert status == 401, headers
            assert body["error"] == "unauthorized"


async def test_no_configured_key_refuses_every_call() -> None:
    async with serve_in_process(make_settings(api_key=None), engine=ScriptedEngine()) as srv:
        status, _ = await post(
            srv, "/api/v1/parties/p1/events", SCENE, {"Authorization": "Bearer "}
        )
        assert status == 401


async def test_invalid_events_get_422_with_the_reason_and_publish_nothing() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, hello = await srv.join("aria")
        bad_payload = {**SCENE, "payload": {**SCENE["payload"], "kind": "musical"}}
        cases: list[tuple[Any, str]] = [
            (bad_payload, "kind"),
            ({**SCENE, "seq": 5}, "seq"),
            ({**SCENE, "type": "party.join"}, "party.join"),
            ({**SCENE, "type": "system.hello"}, "system.hello"),
            ({**SCENE, "extra": 1}, "extra"),
            ([1, 2], "envelope"),
        ]
        for body, word in cases:
            status, problem = await post(srv, "/api/v1/parties/p1/events", body, AUTH)
            assert status == 422, body
            assert word in problem["detail"], problem
        async with srv.http.post(
            srv.base + "/api/v1/parties/p1/events", data=b"{nope", headers=AUTH
        ) as resp:
            assert resp.status == 400
        # nothing was published: the next event continues right after the hello
        status, body = await post(srv, "/api/v1/parties/p1/events", SCENE, AUTH)
        assert body["seq"] == hello["payload"]["seq"] + 1
        await a.close()


async def test_run_events_reach_every_party_of_the_run() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria", party="p1", run="r9")
        b, _ = await srv.join("borin", party="p2", run="r9")
        c, _ = await srv.join("cora", party="p3", run="other")
        status, body = await post(srv, "/api/v1/runs/r9/events", SCENE, AUTH)
        assert status == 202
        assert set(body["parties"]) == {"p1", "p2"}
        assert (await a.expect("scene.update"))["seq"] == body["parties"]["p1"]
        assert (await b.expect("scene.update"))["seq"] == body["parties"]["p2"]
        await c.act("c1", "cora", "other")  # cora's party got nothing: her next event is this
        assert (await c.expect("action.result"))["payload"]["action_id"] == "c1"
        for client in (a, b, c):
            await client.close()


async def test_openapi_document_is_valid_and_lists_the_api() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        async with srv.http.get(srv.base + "/openapi.json") as resp:
            assert resp.status == 200
            spec = await resp.json()
        validate(spec)
        assert {
            "/api/v1/parties/{party_id}/events",
            "/api/v1/runs/{campaign_run_id}/events",
        } <= set(spec["paths"])
