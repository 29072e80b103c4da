"""The admin API: parties, a party, its events, nodes, disconnecting a character."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from party_sync.transport import admin
from party_sync.transport.admin import CLOSE_DISCONNECTED
from ps_testkit.api_events import SCENE
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import Running, make_settings, serve_in_process, token

pytestmark = pytest.mark.usefixtures("backend_kind", "quick_heartbeat")  # memory and redis

KEY = "api-key-admin-0123456789abcdef0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
SETTINGS = {"api_key": KEY}


@pytest.fixture
def quick_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    """Node heartbeats every 0.1 s (they feed the node list and, on Redis, the party index)."""
    monkeypatch.setattr(admin, "HEARTBEAT_INTERVAL", 0.1)


async def call(
    srv: Running, method: str, path: str, headers: dict[str, str] | None = AUTH
) -> tuple[int, Any]:
    async with srv.http.request(method, srv.base + path, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def get(srv: Running, path: str) -> Any:
    status, body = await call(srv, "GET", path)
    assert status == 200, body
    return body


async def listed(srv: Running, want: set[str], timeout: float = 5.0) -> list[dict[str, Any]]:
    """The party listing once it names every party of ``want`` (bounded poll: the Redis index is
    fed by the node heartbeat)."""
    async with asyncio.timeout(timeout):
        while True:
            parties: list[dict[str, Any]] = (await get(srv, "/api/v1/parties"))["parties"]
            if want <= {p["party_id"] for p in parties}:
                return parties
            await asyncio.sleep(0.05)


async def test_a_party_that_came_and_went_or_only_got_events_is_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Listed by the node's next heartbeat although no connection is open when it beats: a
    member who joined and left between two beats, a party only published to (events API)."""
    monkeypatch.setattr(admin, "HEARTBEAT_INTERVAL", 3600.0)  # one beat, at start: then ours
    async with serve_in_process(make_settings(**SETTINGS), engine=ScriptedEngine()) as srv:
        assert srv.server is not None
        gateway = srv.server.gateway
        a, _ = await srv.join("aria", party="came", run="r9")
        await a.close()
        await wait_until(lambda: not gateway.sessions)
        async with srv.http.post(
            srv.base + "/api/v1/parties/published/events", json=SCENE, headers=AUTH
        ) as resp:
            assert resp.status == 202, await resp.text()
        await admin.beat(srv.server.app, 60.0)
        await listed(srv, {"came", "published"})


async def test_a_party_is_listed_as_soon_as_a_member_connects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Re-check: on Redis a party that had just connected was missing from the listing until
    its node's next heartbeat (up to presence_ttl / 3 later)."""
    monkeypatch.setattr(admin, "HEARTBEAT_INTERVAL", 3600.0)  # one beat, at start
    async with serve_in_process(make_settings(**SETTINGS), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria", party="just-now", run="r9")
        parties = (await get(srv, "/api/v1/parties"))["parties"]
        assert "just-now" in {p["party_id"] for p in parties}
        await a.close()


async def test_parties_are_listed_with_their_numbers_and_paginated() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(make_settings(**SETTINGS), engine=engine) as srv:
        a, _ = await srv.join("aria")
        b, hello = await srv.join("borin")
        await a.until("party.join")
        c, _ = await srv.join("cora", party="p2", run="r2")
        engine.gate = asyncio.Event()  # borin's action stays in flight
        await b.act("b-1", "borin", "r1")
        await asyncio.wait_for(_until(lambda: len(engine.calls) == 1), 5)
        try:
            parties = await listed(srv, {"p1", "p2"})
        finally:
            engine.gate.set()  # an engine held forever would hold the server's shutdown
        assert [p["party_id"] for p in parties] == ["p1", "p2"]
        p1 = parties[0]
        assert p1 == {
            "party_id": "p1",
            "campaign_run_id": "r1",
            "epoch": hello["payload"]["epoch"],
            "last_seq": hello["payload"]["seq"],
            "members": {"online": 2, "total": 2},
            "vote": None,
            "actions_in_flight": 1,
        }
        assert parties[1]["members"] == {"online": 1, "total": 1}

        first = await get(srv, "/api/v1/parties?limit=1")
        assert [p["party_id"] for p in first["parties"]] == ["p1"]
        assert first["next_cursor"] == "p1"
        second = await get(srv, "/api/v1/parties?limit=1&cursor=p1")
        assert [p["party_id"] for p in second["parties"]] == ["p2"]
        assert second["next_cursor"] is None
        for client in (a, b, c):
            await client.close()


async def _until(condition: Any) -> None:
    while not condition():  # noqa: ASYNC110 (a bounded poll of the engine's calls)
        await asyncio.sleep(0.01)


async def test_one_party_shows_presence_projection_and_actions_in_flight() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(make_settings(**SETTINGS), engine=engine) as srv:
        assert srv.server is not None
        node = srv.server.gateway.node_id
        a1, _ = await srv.join("aria")
        a2, _ = await srv.join("aria")  # a second tab
        b, hello = await srv.join("borin")
        engine.gate = asyncio.Event()
        await a1.act("a-1", "aria", "r1")
        await asyncio.wait_for(_until(lambda: len(engine.calls) == 1), 5)
        try:
            detail = await get(srv, "/api/v1/parties/p1")
        finally:
            engine.gate.set()  # an engine held forever would hold the server's shutdown
        assert detail["party_id"] == "p1"
        assert detail["campaign_run_id"] == "r1"
        assert (detail["epoch"], detail["last_seq"]) == (
            hello["payload"]["epoch"],
            hello["payload"]["seq"],
        )
        presence = {p["character_id"]: p for p in detail["presence"]}
        assert set(presence) == {"aria", "borin"}
        assert presence["aria"]["online"] is True
        assert presence["aria"]["display_name"] == "Aria"
        assert len(presence["aria"]["connections"]) == 2
        assert presence["aria"]["nodes"] == [node]
        assert all(c["node_id"] == node for c in presence["aria"]["connections"])
        assert all(c["expires_at"] > time.time() for c in presence["aria"]["connections"])
        expected_hello = {
            k: v
            for k, v in hello["payload"].items()
            if k not in {"you", "limits", "resumed", "protocol", "actions_in_flight", "narration"}
        }
        assert detail["hello"] == expected_hello
        (action,) = detail["actions_in_flight"]
        assert action["action_id"] == "a-1"
        assert action["character_id"] == "aria"
        assert 0 <= action["age_seconds"] < 5
        engine.gate.set()
        await b.expect("action.result")
        after = await get(srv, "/api/v1/parties/p1")
        assert after["actions_in_flight"] == []
        assert after["last_seq"] == hello["payload"]["seq"] + 2  # the result and the scene
        status, problem = await call(srv, "GET", "/api/v1/parties/nobody")
        assert (status, problem["error"]) == (404, "not_found")
        for client in (a1, a2, b):
            await client.close()


async def test_events_are_the_history_as_held_and_page_by_seq() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(make_settings(**SETTINGS), engine=engine) as srv:
        a, hello = await srv.join("aria")
        start = hello["payload"]["seq"]
        for n in range(3):
            await a.act(f"a-{n}", "aria", "r1")
            await a.expect("action.result")
            await a.expect("scene.update")
        seen = [m for m in a.received if "seq" in m and m["seq"] > start]
        every = await get(srv, "/api/v1/parties/p1/events")
        assert every["epoch"] == hello["payload"]["epoch"]
        assert every["last_seq"] == start + 6
        assert every["oldest_seq"] == 1
        assert every["events"][start:] == seen  # the very envelopes the client received
        assert [e["seq"] for e in every["events"]] == list(range(1, start + 7))
        page = await get(srv, f"/api/v1/parties/p1/events?after_seq={start}&limit=2")
        assert [e["seq"] for e in page["events"]] == [start + 1, start + 2]
        assert page["next_after_seq"] == start + 2
        rest = await get(srv, f"/api/v1/parties/p1/events?after_seq={start + 2}&limit=1000")
        assert [e["seq"] for e in rest["events"]] == list(range(start + 3, start + 7))
        empty = await get(srv, f"/api/v1/parties/p1/events?after_seq={start + 6}")
        assert (empty["events"], empty["next_after_seq"]) == ([], start + 6)
        for query in ("after_seq=-1", "after_seq=x", "limit=0", "limit=1001", "limit=%EF%BC%91"):
            status, problem = await call(srv, "GET", f"/api/v1/parties/p1/events?{query}")
            assert (status, problem["error"]) == (400, "invalid_query"), query
        assert (await call(srv, "GET", "/api/v1/parties/none/events"))[0] == 404
        await a.close()


async def test_a_disconnect_closes_every_tab_and_can_refuse_reconnection_until_a_time() -> None:
    async with serve_in_process(make_settings(**SETTINGS), engine=ScriptedEngine()) as srv:
        tabs = [(await srv.join("aria"))[0] for _ in range(2)]
        b, _ = await srv.join("borin")
        status, body = await call(srv, "DELETE", "/api/v1/parties/p1/members/aria/connections")
        assert status == 202
        assert body == {
            "party_id": "p1",
            "character_id": "aria",
            "close_code": CLOSE_DISCONNECTED,
            "blocked_until": None,
        }
        for tab in tabs:
            assert await tab.closed() == CLOSE_DISCONNECTED
        again, _ = await srv.join("aria")  # no block: she may come back at once
        until = int(time.time()) + 60
        path = f"/api/v1/parties/p1/members/aria/connections?until={until}"
        status, body = await call(srv, "DELETE", path)
        assert (status, body["blocked_until"]) == (202, until)
        assert await again.closed() == CLOSE_DISCONNECTED
        await _refused(srv, "aria")
        b2, _ = await srv.join("borin")  # only aria is refused
        status, _ = await call(srv, "DELETE", "/api/v1/parties/p1/members/aria/connections?until=0")
        assert status == 202  # lifts the block
        back, _ = await srv.join("aria")
        for bad in ("x", "-5", "nan", "inf", str(time.time() + 400 * 86400)):
            status, problem = await call(
                srv, "DELETE", f"/api/v1/parties/p1/members/aria/connections?until={bad}"
            )
            assert (status, problem["error"]) == (400, "invalid_query"), bad
        assert not b.ws.closed
        for client in (b, b2, back):
            await client.close()


async def _refused(srv: Running, character: str) -> None:
    """The handshake is refused with 403 and a stable body (checked before the upgrade)."""
    assert await srv.handshake_status({"token": token(character)}) == 403
    async with srv.http.get(srv.base + "/ws", params={"token": token(character)}) as resp:
        assert resp.status == 403
        body = await resp.json(content_type=None)
        assert body["error"] == "disconnected_by_operator"
        assert 0 < int(resp.headers["Retry-After"]) <= 60


async def test_a_block_check_the_backend_cannot_answer_admits_nobody(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis stalled during the operator-block check: the handshake is upgraded and closed with
    1011 (retry) after ``backend_unavailable``, as when opening fails; never let through (a
    blocked character was admitted when Redis came back between the check and the connect)."""
    from party_sync.protocol.errors import BackendUnavailable

    # one session per user and node, and no refill: a failed handshake must not spend it
    settings = make_settings(
        **SETTINGS, handshake_rate_per_user=0.001, handshake_burst_per_user=1.0
    )
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        b, _ = await srv.join("borin")
        assert srv.server is not None
        view = srv.server.app[admin.ADMIN]

        async def unanswered(*args: Any) -> float | None:
            raise BackendUnavailable("stalled")

        monkeypatch.setattr(view, "blocked_until", unanswered)
        eve = await srv.connect("eve")
        error = await eve.expect("system.error")
        assert error["payload"]["code"] == "backend_unavailable"
        assert await eve.closed() == 1011
        monkeypatch.undo()
        cato, _ = await srv.join("cato")  # the check answers again: served as usual
        seen = [(m["type"], m["payload"].get("character_id")) for m in [await b.recv()]]
        assert seen == [("party.join", "cato")]  # eve was never announced
        eve_back, _ = await srv.join("eve")  # her 1011 cost no session of her allowance
        for client in (b, cato, eve_back):
            await client.close()


async def test_a_client_gone_while_the_checks_ran_is_not_announced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The block check held by a stall past the moment the client gave up: the node does not
    go on to register (and announce) a player whose socket is already closed."""
    async with serve_in_process(make_settings(**SETTINGS), engine=ScriptedEngine()) as srv:
        b, _ = await srv.join("borin")
        assert srv.server is not None
        view = srv.server.app[admin.ADMIN]
        real, asked, gone = view.blocked_until, asyncio.Event(), asyncio.Event()

        async def slow(*args: Any) -> float | None:
            asked.set()
            await gone.wait()  # Redis answers only after the client has left
            return await real(*args)

        monkeypatch.setattr(view, "blocked_until", slow)
        from party_sync.transport.http import GUARD

        addresses = srv.server.app[GUARD].addresses
        before = addresses.total
        attempt = asyncio.ensure_future(srv.connect("eve"))
        await asyncio.wait_for(asked.wait(), 5)
        assert addresses.total == before + 1
        attempt.cancel()  # the client gives up: its socket closes
        with contextlib.suppress(BaseException):
            await attempt
        await wait_until(lambda: addresses.total == before)  # the server saw it close
        gone.set()
        monkeypatch.undo()
        cato, _ = await srv.join("cato")
        assert [(m["type"], m["payload"].get("character_id")) for m in [await b.recv()]] == [
            ("party.join", "cato")
        ]
        gateway = srv.server.gateway
        assert not any(s.character_id == "eve" for s in gateway.sessions)
        for client in (b, cato):
            await client.close()


async def test_nodes_lists_this_node() -> None:
    async with serve_in_process(make_settings(**SETTINGS), engine=ScriptedEngine()) as srv:
        assert srv.server is not None
        gateway = srv.server.gateway
        a, _ = await srv.join("aria")
        # this node's own count is live (outside probe: as of its last heartbeat, up to
        # presence_ttl / 3 behind /metrics), whatever the heartbeat period
        (node,) = (await get(srv, "/api/v1/nodes"))["nodes"]
        assert node["connections"] == 1
        assert node["node_id"] == gateway.node_id
        assert node["self"] is True
        assert node["version"]
        assert node["started_at"] <= node["seen_at"] <= time.time() + 1
        await a.close()
        await wait_until(lambda: not gateway.sessions)
        (node,) = (await get(srv, "/api/v1/nodes"))["nodes"]
        assert node["connections"] == 0


async def test_every_admin_route_needs_the_key_and_checks_ids() -> None:
    async with serve_in_process(make_settings(**SETTINGS), engine=ScriptedEngine()) as srv:
        routes = [
            ("GET", "/api/v1/parties"),
            ("GET", "/api/v1/parties/p1"),
            ("GET", "/api/v1/parties/p1/events"),
            ("DELETE", "/api/v1/parties/p1/members/aria/connections"),
            ("GET", "/api/v1/nodes"),
        ]
        for headers in (None, {"Authorization": "Bearer wrong"}):
            for method, path in routes:
                status, problem = await call(srv, method, path, headers)
                assert (status, problem["error"]) == (401, "unauthorized"), (method, path)
        status, problem = await call(srv, "GET", "/api/v1/parties/a%20b")
        assert (status, problem["error"]) == (400, "invalid_id")
        for query in ("limit=0", "limit=501", "cursor=a%20b"):
            status, problem = await call(srv, "GET", f"/api/v1/parties?{query}")
            assert (status, problem["error"]) == (400, "invalid_query"), query
        empty = await get(srv, "/api/v1/parties")
        assert empty == {"parties": [], "next_cursor": None}


async def test_shutdown_ends_even_when_a_heartbeat_swallows_its_cancellation() -> None:
    """redis-py can swallow a CancelledError mid-call. The heartbeat loop then went on beating
    and the shutdown, awaiting it, hung for ever (a CI run timed out in a test's teardown on
    Redis). Now the loop also stops on a flag, and the wait for it is bounded."""
    stack = contextlib.AsyncExitStack()
    async with stack:
        srv = await stack.enter_async_context(
            serve_in_process(make_settings(**SETTINGS), engine=ScriptedEngine())
        )
        assert srv.server is not None
        view = srv.server.app[admin.ADMIN]
        beating = asyncio.Event()
        real = view.heartbeat

        async def swallowing(*args: Any) -> None:
            beating.set()
            with contextlib.suppress(asyncio.CancelledError):  # as a library call might
                await asyncio.sleep(1)
            await real(*args)

        view.heartbeat = swallowing  # type: ignore[method-assign,assignment]
        await beating.wait()
        beating.clear()
        await beating.wait()  # the next beat is under way: the cancel will land in it
        async with asyncio.timeout(20):  # the old code never got past this: the loop beat on
            await stack.aclose()
