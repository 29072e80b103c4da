"""Losses the Redis mode must survive: flushed history, a dead node, a Redis restart, killed
pub/sub connections (docs/redis.md, "Guarantees")."""

from __future__ import annotations

import time

import pytest
from ps_testkit.client import Client
from ps_testkit.cluster import (
    PRESENCE_TTL,
    Cluster,
    assert_ordered,
    metric,
    status,
    wait_ready,
)
from ps_testkit.servers import Running

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


async def _pair(n1: Running, n2: Running) -> tuple[Client, Client]:
    a, _ = await n1.join("aria")
    b, _ = await n2.join("borin")
    await a.until("party.join")
    return a, b


def position(client: Client) -> tuple[str, int]:
    """The (epoch, last seq) a client would resume from."""
    hello = next(m for m in reversed(client.received) if m["type"] == "system.hello")
    seqs = [m["seq"] for m in client.received if "seq" in m]
    return hello["payload"]["epoch"], max([hello["payload"]["seq"], *seqs])


async def test_flushed_history_gets_a_new_epoch_and_a_snapshot_never_a_replay(
    cluster: Cluster,
) -> None:
    async with cluster.node() as n1, cluster.node() as n2:
        a, b = await _pair(n1, n2)
        await a.act("before", "aria", "r1")
        await b.until("scene.update")
        old_epoch, b_last = position(b)
        await b.close()
        await a.until("party.leave")
        cluster.redis.command("FLUSHALL")

        b, hello = await n2.join("borin", epoch=old_epoch, last_seq=b_last)
        p = hello["payload"]
        assert p["resumed"] is False and "resumed_from" not in p
        assert p["epoch"] != old_epoch  # a new history, never the old seqs
        # his join opens it, or node 1's presence refresh re-announced aria's live connection
        # just before (a refresh tick can fall between the flush and this join): seq 1 or 2
        members = {m["character_id"]: m["online"] for m in p["members"]}
        if p["seq"] == 1:
            assert members == {"borin": True}
        else:
            assert p["seq"] == 2 and members == {"aria": True, "borin": True}
        # aria's stream (node 1) is from the lost epoch: she is told to resync, then resumes
        assert await a.closed() == 4003
        a, hello_a = await n1.join("aria", epoch=old_epoch, last_seq=position(a)[1])
        assert hello_a["payload"]["resumed"] is False
        assert hello_a["payload"]["epoch"] == p["epoch"]
        await a.act("after", "aria", "r1")
        assert (await b.until("action.result"))["payload"]["action_id"] == "after"
        for client in (a, b):
            assert_ordered(client)
            await client.close()


async def test_the_first_connection_after_a_flush_stays_while_the_lost_epochs_resync(
    cluster: Cluster,
) -> None:
    """Engine probe: after a FLUSHALL, a player's new connection (no epoch, no last_seq), whose
    own join began the party's new epoch, was closed 4003 before or right after its hello in 3
    runs of 4: the node's stream, meeting the new epoch, told every connection of the party to
    resync. Only those whose hello was of the lost epoch resync now."""
    async with cluster.node() as n1:
        a, _ = await n1.join("aria")
        await a.act("before", "aria", "r1")
        await a.until("scene.update")
        cluster.redis.command("FLUSHALL")
        b, hello = await n1.join("borin")
        assert hello["payload"]["resumed"] is False
        assert await a.closed() == 4003  # her hello was of the lost epoch
        await b.act("after", "borin", "r1")
        assert (await b.until("action.result"))["payload"]["action_id"] == "after"
        assert [m["type"] for m in b.received].count("system.hello") == 1
        assert_ordered(b)
        await b.close()


async def test_a_killed_node_players_leave_within_the_bound_and_resume_elsewhere(
    cluster: Cluster,
) -> None:
    async with cluster.node() as n1, cluster.node() as n2:
        a, b = await _pair(n1, n2)
        epoch, a_last = position(a)
        assert n1.process is not None
        n1.process.kill()  # kill -9: no goodbye, its presence is left to expire
        killed = time.monotonic()
        leave = await b.expect("party.leave", timeout=10)
        elapsed = time.monotonic() - killed
        assert leave["payload"] == {"character_id": "aria", "reason": "expired"}
        # the documented bound: presence_ttl + one sweep (presence_ttl / 3), plus scheduling slack
        assert elapsed < PRESENCE_TTL * 4 / 3 + 0.5, elapsed

        a, hello = await n2.join("aria", epoch=epoch, last_seq=a_last)  # to the surviving node
        assert hello["payload"]["resumed"] is True
        replay = [await a.recv() for _ in range(hello["payload"]["seq"] - a_last)]
        assert replay[0] == leave and [m["type"] for m in replay] == ["party.leave", "party.join"]
        await b.expect("party.join")
        await b.act("b-1", "borin", "r1")
        assert (await a.expect("action.result"))["payload"]["action_id"] == "b-1"
        for client in (a, b):
            assert_ordered(client)
            await client.close()


async def test_redis_restart_readiness_retryable_errors_and_delivery_resumes(
    cluster: Cluster,
) -> None:
    async with cluster.node() as n1, cluster.node() as n2:
        a, b = await _pair(n1, n2)
        await a.act("before", "aria", "r1")
        await b.until("scene.update")
        await a.until("scene.update")

        cluster.redis.stop()
        await wait_ready(n1, ready=False)
        await wait_ready(n2, ready=False)
        assert await status(n1, "/healthz") == 200  # liveness is not readiness
        await a.act("during", "aria", "r1")  # the connection stays open; the action is refused
        err = await a.expect("system.error")
        assert err["payload"]["code"] == "backend_unavailable"
        assert err["payload"]["retryable"] is True

        cluster.redis.start()  # empty: no persistence, so the history (and epoch) is gone
        await wait_ready(n1)
        await wait_ready(n2)
        assert await a.closed() == 4003  # each node re-subscribed by itself and found the loss
        assert await b.closed() == 4003
        a, hello_a = await n1.join("aria", epoch=position(a)[0], last_seq=position(a)[1])
        b, hello_b = await n2.join("borin", epoch=position(b)[0], last_seq=position(b)[1])
        assert hello_a["payload"]["resumed"] is False and hello_b["payload"]["resumed"] is False
        await a.act("after", "aria", "r1")
        assert (await b.until("action.result"))["payload"]["action_id"] == "after"
        assert await metric(n2, "party_sync_redis_reconnects_total", cause="error") >= 1
        for client in (a, b):
            assert_ordered(client)
            await client.close()


async def test_killed_pubsub_connections_come_back_and_nothing_is_out_of_order(
    cluster: Cluster,
) -> None:
    async with cluster.node() as n1, cluster.node() as n2:
        a, b = await _pair(n1, n2)
        for i in range(3):
            cluster.redis.command("CLIENT", "KILL", "TYPE", "pubsub")
            await a.act(f"k-{i}", "aria", "r1")  # published while both nodes re-subscribe
            result = await b.until("action.result")
            assert result["payload"]["action_id"] == f"k-{i}"
            await b.expect("scene.update")
        await a.until("scene.update")
        assert await metric(n2, "party_sync_redis_reconnects_total", cause="error") >= 3
        assert await metric(n2, "party_sync_pubsub_gaps_total", outcome="resync") == 0
        for client in (a, b):
            assert_ordered(client)  # repaired from history where pub/sub lost them
            await client.close()
