"""The admin API answers for the whole service from any node: two real nodes."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

import pytest
from party_sync.backends.base import NodeInfo
from party_sync.transport import admin
from ps_testkit.client import wait_until
from ps_testkit.cluster import Cluster, wait_async
from ps_testkit.engines import ScriptedEngine
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import Running, make_settings, serve_in_process, token

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

KEY = "api-key-admin-nodes-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLOSE_DISCONNECTED = 4004


async def call(node: Running, method: str, path: str) -> tuple[int, Any]:
    async with node.http.request(method, node.base + path, headers=AUTH) as resp:
        return resp.status, await resp.json(content_type=None)


async def get(node: Running, path: str) -> Any:
    status, body = await call(node, "GET", path)
    assert status == 200, body
    return body


async def test_either_node_lists_both_and_a_disconnect_reaches_the_other(cluster: Cluster) -> None:
    async with cluster.node("--api-key", KEY) as n1, cluster.node("--api-key", KEY) as n2:
        a, _ = await n1.join("aria", party="p1")
        b, _ = await n2.join("borin", party="p2")
        b2, _ = await n2.join("borin", party="p2")  # a second tab, same node
        c, _ = await n1.join("cora", party="p2")  # borin's party has a member on node 1 too

        async def both_listed() -> bool:
            for node in (n1, n2):
                body = await get(node, "/api/v1/parties")
                if [p["party_id"] for p in body["parties"]] != ["p1", "p2"]:
                    return False
            nodes = (await get(n1, "/api/v1/nodes"))["nodes"]
            return len(nodes) == 2 and sorted(n["connections"] for n in nodes) == [2, 2]

        await wait_async(both_listed)
        p2 = (await get(n1, "/api/v1/parties"))["parties"][1]
        assert p2["members"] == {"online": 2, "total": 2}
        nodes = (await get(n2, "/api/v1/nodes"))["nodes"]
        assert sum(n["self"] for n in nodes) == 1
        assert all(n["version"] for n in nodes)
        ids = {n["node_id"] for n in nodes}

        detail = await get(n1, "/api/v1/parties/p2")
        presence = {p["character_id"]: p for p in detail["presence"]}
        assert len(presence["borin"]["connections"]) == 2
        (borin_node,) = presence["borin"]["nodes"]
        (cora_node,) = presence["cora"]["nodes"]
        assert {borin_node, cora_node} == ids  # each on its own node, as asked of node 1

        # Asked of node 1, borin's tabs on node 2 close; refused for a minute.
        until = int(time.time()) + 60
        status, body = await call(
            n1, "DELETE", f"/api/v1/parties/p2/members/borin/connections?until={until}"
        )
        assert (status, body["close_code"]) == (202, CLOSE_DISCONNECTED)
        assert await b.closed() == CLOSE_DISCONNECTED
        assert await b2.closed() == CLOSE_DISCONNECTED
        leave = await c.until("party.leave")
        assert leave["payload"] == {"character_id": "borin", "reason": "disconnected"}
        for node in (n1, n2):  # the block holds on every node
            params = {"token": token("borin", party="p2")}
            assert await node.handshake_status(params) == 403
        # A plain disconnect meanwhile says the block that still holds (it said null).
        status, body = await call(n2, "DELETE", "/api/v1/parties/p2/members/borin/connections")
        assert (status, body["blocked_until"]) == (202, until)
        assert await n1.handshake_status({"token": token("borin", party="p2")}) == 403
        assert not a.ws.closed and not c.ws.closed

        # The events are the same whichever node is asked.
        one = await get(n1, "/api/v1/parties/p2/events")
        two = await get(n2, "/api/v1/parties/p2/events")
        assert one == two
        assert one["events"][-1]["type"] == "party.leave"
        for client in (a, c):
            await client.close()


async def test_a_party_whose_node_stopped_before_its_next_heartbeat_is_listed(
    cluster: Cluster,
) -> None:
    """README: a new party appears in the listing within one heartbeat period. A node that
    stops first (a drain, a deploy) says its parties on the way out: the party was never listed
    (its state lived on for party_ttl)."""
    async with cluster.node("--api-key", KEY) as n1:
        # a heartbeat every 20 s: the node stops long before its next one
        async with cluster.node("--api-key", KEY, "--presence-ttl", "60") as n2:
            a, _ = await n2.join("aria", party="brief")
            await a.close()
        body = await get(n1, "/api/v1/parties")
        assert [p["party_id"] for p in body["parties"]] == ["brief"]


async def test_the_answering_node_lists_itself_when_redis_lost_the_list(cluster: Cluster) -> None:
    """Operator probe: after an empty restart of Redis, ``GET /api/v1/nodes`` answered
    ``{"nodes": []}`` until the node's next heartbeat (README: "the answering node's connection
    count is live"). The node that answers is serving: it lists itself, live."""
    async with cluster.node("--api-key", KEY, "--presence-ttl", "60") as n1:  # beats every 20 s
        a, _ = await n1.join("aria", party="p1")
        await wait_async(lambda: _listed(n1))
        cluster.redis.command("FLUSHALL")  # the list of nodes is gone with the rest
        [me] = (await get(n1, "/api/v1/nodes"))["nodes"]
        assert me["self"] is True and me["connections"] == 1
        await a.close()


async def _listed(node: Running) -> bool:
    return len((await get(node, "/api/v1/nodes"))["nodes"]) == 1


async def test_nodes_with_different_settings_say_so_once_and_list_them(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Nodes started with different flags or environments (a presence grace, a replay bound)
    gave players different behaviour by the node they landed on, without a word. Each node's
    heartbeat carries the settings every node should share; a node finding another's different
    says so, once, and ``/api/v1/nodes`` lists them."""
    monkeypatch.setattr(admin, "HEARTBEAT_INTERVAL", 0.05)
    caplog.set_level(logging.WARNING, "party_sync.transport.admin")
    base = make_settings(api_key=KEY, redis_url=redis.url, engine_transport="inprocess")
    async with (
        serve_in_process(base, engine=ScriptedEngine()) as n1,
        serve_in_process(
            replace(base, presence_grace=30.0, max_replay=50), engine=ScriptedEngine()
        ) as n2,
    ):
        assert n1.server is not None and n2.server is not None
        one, two = n1.server.gateway.node_id, n2.server.gateway.node_id

        def told() -> list[str]:
            return [r.getMessage() for r in caplog.records if "other settings" in r.getMessage()]

        await wait_until(lambda: len(told()) >= 2, timeout=10)
        beats = (await get(n1, "/api/v1/nodes"))["nodes"]
        await asyncio.sleep(0.3)  # several more heartbeats: nothing told again
        lines = told()
        assert len(lines) == 2, lines
        assert any(f"node {two} " in line for line in lines)
        assert any(f"node {one} " in line for line in lines)
        for line in lines:
            assert "presence_grace" in line and "max_replay" in line
            assert "action_timeout" not in line  # the same on both
        settings = {n["node_id"]: n["settings"] for n in beats}
        assert settings[two]["presence_grace"] == 30.0 and settings[two]["max_replay"] == 50
        assert settings[one]["presence_grace"] == base.presence_grace


def test_the_comparison_tells_each_difference_once_and_ignores_nodes_that_send_none() -> None:
    own = {"presence_ttl": 30.0, "max_replay": 300}
    compared = admin.SettingsCompared("me", own)
    old = NodeInfo("old", "0.1", 0, 0.0, 0.0)  # an earlier release: no settings
    other = NodeInfo("b", "1", 0, 0.0, 0.0, {"presence_ttl": 60.0, "max_replay": 300})
    me = NodeInfo("me", "1", 0, 0.0, 0.0, {"presence_ttl": 1.0})
    assert compared.differences([old, other, me]) == [("b", "presence_ttl 60 (this node: 30)")]
    assert compared.differences([old, other, me]) == []
    changed = NodeInfo("b", "1", 0, 0.0, 0.0, {"presence_ttl": 60.0, "max_replay": 10})
    assert compared.differences([changed]) == [
        ("b", "presence_ttl 60 (this node: 30); max_replay 10 (this node: 300)")
    ]
    agrees = NodeInfo("b", "1", 0, 0.0, 0.0, {"presence_ttl": 30.0, "max_replay": 300})
    assert compared.differences([agrees]) == []
    assert compared.differences([changed]) == [  # differs again: told again
        ("b", "presence_ttl 60 (this node: 30); max_replay 10 (this node: 300)")
    ]
