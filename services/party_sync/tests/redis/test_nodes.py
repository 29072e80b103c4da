"""Two real nodes on one private Redis act as one service (docs/redis.md)."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from ps_testkit.client import Client, wait_until
from ps_testkit.cluster import Cluster, assert_ordered
from ps_testkit.engines import engine_calls
from ps_testkit.servers import Running

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


async def _pair(n1: Running, n2: Running) -> tuple[Client, Client]:
    """aria on node 1, borin on node 2, each having seen the other arrive."""
    a, _ = await n1.join("aria")
    b, hello = await n2.join("borin")
    assert {m["character_id"] for m in hello["payload"]["members"]} == {"aria", "borin"}
    await a.until("party.join")
    return a, b


async def test_seed_flow_across_two_nodes(cluster: Cluster) -> None:
    async with cluster.node() as n1, cluster.node() as n2:
        a, b = await _pair(n1, n2)
        await a.act("act-1", "aria", "r1", trace_id="trace-nodes-1")
        result = await b.expect("action.result")
        scene = await b.expect("scene.update")
        assert result["payload"]["action_id"] == "act-1"
        assert result["payload"]["character_id"] == "aria"
        assert scene["seq"] == result["seq"] + 1
        assert result["trace_id"] == scene["trace_id"] == "trace-nodes-1"
        assert await a.expect("action.result") == result  # the same broadcast on both nodes
        assert await a.expect("scene.update") == scene
        assert engine_calls(cluster.engine_dir) == ["act-1"]
        for client in (a, b):
            assert_ordered(client)
            await client.close()


async def test_one_subscription_per_party_per_node_not_per_connection(cluster: Cluster) -> None:
    async with cluster.node() as n1, cluster.node() as n2:
        clients = [(await n1.join(c))[0] for c in ("aria", "borin", "cora")]
        clients.append((await n1.join("aria"))[0])  # a second tab
        clients.append((await n2.join("dara"))[0])
        reply = cluster.redis.command("PUBSUB", "NUMSUB", "party:p1")
        assert reply.split(b"\r\n")[3] == b":2"  # one subscriber per node
        for client in clients:
            await client.close()


async def test_same_action_id_through_two_nodes_is_one_engine_call_one_broadcast(
    cluster: Cluster,
) -> None:
    async with cluster.node() as n1, cluster.node() as n2:
        a1, b = await _pair(n1, n2)
        a2, _ = await n2.join("aria")  # aria's second tab, on the other node
        await a1.act("dup-1", "aria", "r1")
        first = await b.expect("action.result")
        await b.expect("scene.update")
        await a2.until("scene.update")

        await a2.act("dup-1", "aria", "r1")  # the same action, through node 2
        again = await a2.expect("action.result")
        assert again == first and a2.raw[-1] == b.raw[-2]  # the original, byte for byte
        await a1.act("next-1", "aria", "r1")
        nxt = await b.expect("action.result")  # borin got no second broadcast of dup-1
        assert nxt["payload"]["action_id"] == "next-1" and nxt["seq"] == first["seq"] + 2
        assert sorted(engine_calls(cluster.engine_dir)) == ["dup-1", "next-1"]
        for client in (a1, a2, b):
            await client.close()


async def test_in_flight_and_busy_hold_across_nodes(cluster: Cluster) -> None:
    async with cluster.node() as n1, cluster.node() as n2:
        a1, b = await _pair(n1, n2)
        a2, _ = await n2.join("aria")
        await a1.act("slow-1", "aria", "r1", payload={"hold": True})
        await wait_until(lambda: engine_calls(cluster.engine_dir) == ["slow-1"])  # in flight
        await a2.act("slow-1", "aria", "r1")  # same action_id, other node
        assert (await a2.expect("system.error"))["payload"]["code"] == "action_in_flight"
        await a2.act("other-1", "aria", "r1")  # the character is busy on every node
        assert (await a2.expect("system.error"))["payload"]["code"] == "character_busy"
        (cluster.engine_dir / "release-slow-1").touch()
        result = await b.expect("action.result")
        assert result["payload"]["action_id"] == "slow-1"
        assert engine_calls(cluster.engine_dir) == ["slow-1"]
        for client in (a1, a2, b):
            await client.close()


async def test_resume_on_another_node_gets_exactly_the_missed_events_then_live(
    cluster: Cluster,
) -> None:
    async with cluster.node() as n1, cluster.node() as n2:
        a, b = await _pair(n1, n2)
        seen_by_b = [m for m in b.received if "seq" in m]
        epoch = b.received[0]["payload"]["epoch"]
        last = b.received[0]["payload"]["seq"]
        assert not seen_by_b  # borin's own join is in his hello
        await b.close()
        leave = await a.until("party.leave")  # borin's leave (disconnected) after the grace
        missed = [leave]
        for i in range(3):
            await a.act(f"m-{i}", "aria", "r1")
            missed.append(await a.until("action.result"))
            missed.append(await a.expect("scene.update"))

        b, hello = await n1.join("borin", epoch=epoch, last_seq=last)  # to the *other* node
        p = hello["payload"]
        assert p["resumed"] is True and p["resumed_from"] == last and p["epoch"] == epoch
        replay = [await b.recv() for _ in range(p["seq"] - last)]
        assert replay[: len(missed)] == missed  # exactly the missed events, in order
        assert [m["type"] for m in replay[len(missed) :]] == ["party.join"]  # his own rejoin
        await a.act("live-1", "aria", "r1")
        live = await b.expect("action.result")
        assert live["payload"]["action_id"] == "live-1" and live["seq"] == p["seq"] + 1
        for client in (a, b):
            assert_ordered(client)
            await client.close()


async def test_a_drained_nodes_player_leaves_at_the_end_of_grace_not_a_presence_ttl_later(
    cluster: Cluster,
) -> None:
    """SIGTERM drains a node: its players are told to reconnect (1001) and the node exits
    without running their grace timers. It hands them over: a player who does not come back
    leaves at the grace's end, swept by another node (reason ``expired``). It stayed online
    for grace + presence_ttl (35 s with the defaults), as if its node had died (browser
    probe). The draining node here has a presence_ttl of 60 s, so only the handover is in time."""
    async with cluster.node() as n1, cluster.node("--presence-ttl", "60") as n2:
        a, b = await _pair(n1, n2)
        assert n2.process is not None
        n2.process.send_signal(signal.SIGTERM)
        left = await a.until("party.leave", timeout=15)
        assert left["payload"] == {"character_id": "borin", "reason": "expired"}
        assert await asyncio.to_thread(n2.process.wait, 10) == 0
        await b.close()
        await a.close()


async def test_a_refusal_its_player_had_through_the_other_node_is_not_sent_again(
    cluster: Cluster,
) -> None:
    """aria's action is accepted on node 1; her connection drops; she resends it through node 2
    (action_in_flight) and gets its refusal there. Node 1, which still watched the action for
    a sender it had lost, sent the refusal again at the deadline to her next connection, which
    had nothing pending (resume probe: an app showed the rejection twice). A refusal made while a
    connection of its character was live is owed to no connection opened since."""
    timeout = ("--action-timeout", "2")
    act = {"hold": True, "reject": True}
    async with cluster.node(*timeout) as n1, cluster.node(*timeout) as n2:
        a1, b = await _pair(n1, n2)
        await a1.act("d1", "aria", "r1", payload=act)
        await a1.until("action.accepted")
        accepted = time.monotonic()
        await a1.close()
        a2, _ = await n2.join("aria")
        await a2.act("d1", "aria", "r1", payload=act)
        assert (await a2.expect("system.error"))["payload"]["code"] == "action_in_flight"
        (cluster.engine_dir / "release-d1").touch()
        assert (await a2.expect("system.error"))["payload"]["code"] == "action_rejected"
        await a2.close()
        a3, _ = await n1.join("aria")
        # past the action's deadline (2 s) with room to spare: anything node 1's look at it
        # sends comes before the answer to a ping sent now
        await wait_until(lambda: time.monotonic() > accepted + 4, timeout=10)
        await a3.send({"type": "system.ping", "payload": {}})
        await a3.until("system.pong")
        assert [m for m in a3.received if m["type"] == "system.error"] == []
        for client in (a3, b):
            await client.close()


async def test_a_grace_running_when_its_node_drains_ends_at_its_end_too(cluster: Cluster) -> None:
    """aria closed her last connection on node 1 (her grace runs there), then node 1 drained:
    her grace is no connection the drain closes, and it ran on to grace + presence_ttl, as if
    node 1 had died (re-check probe). It is handed over: she leaves at her grace's end."""
    settings = ("--presence-ttl", "60", "--presence-grace", "2")
    async with cluster.node(*settings) as n1, cluster.node() as n2:
        a, b = await _pair(n1, n2)
        await a.close()
        assert n1.process is not None
        n1.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(n1.process.wait, 10) == 0
        left = await b.until("party.leave", timeout=15)  # (not the 62 s a dead node takes)
        assert left["payload"] == {"character_id": "aria", "reason": "expired"}
        await b.close()
