"""Votes on two real nodes: finished exactly once, even when the node that started it dies."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import pytest
from ps_testkit.client import Client, wait_until
from ps_testkit.cluster import Cluster, assert_ordered
from ps_testkit.engines import engine_calls
from ps_testkit.servers import Running

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

KEY = "api-key-0123456789abcdef0123456789"
OPTIONS = [{"id": "L", "label": "Left"}, {"id": "R", "label": "Right"}]


async def start_vote(node: Running, vote_id: str, timeout_s: float) -> dict[str, Any]:
    body = {
        "vote_id": vote_id,
        "question": "Which way?",
        "options": OPTIONS,
        "timeout_s": timeout_s,
    }
    async with node.http.post(
        f"{node.base}/api/v1/parties/p1/votes",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as response:
        assert response.status == 201, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


async def finished_once(client: Client, vote_id: str) -> dict[str, Any]:
    """The vote's ``vote.finished`` (the tests then check that no second one ever arrives)."""
    finished = await client.until("vote.finished", timeout=15)
    assert finished["payload"]["vote_id"] == vote_id
    return finished


async def test_the_node_that_started_a_vote_dies_and_the_other_finishes_it_on_time(
    cluster: Cluster,
) -> None:
    async with cluster.node("--api-key", KEY) as n1, cluster.node("--api-key", KEY) as n2:
        # both members on the node that survives: one of them on the killed node would leave
        # with it, and once every member still online has voted a vote finishes at once
        # (all_voted, not the deadline this test is about)
        a, _ = await n2.join("aria")
        b, _ = await n2.join("borin")
        await a.expect("party.join")
        vote = await start_vote(n1, "v-dead", timeout_s=1.0)
        await b.expect("vote.started")
        await b.send({"type": "vote.cast", "payload": {"vote_id": "v-dead", "option": "R"}})
        await b.expect("vote.update")
        assert n1.process is not None
        n1.process.kill()  # kill -9 before the deadline: its timers die with it
        finished = await finished_once(b, "v-dead")
        p = finished["payload"]
        assert (p["winner"], p["reason"]) == ("R", "timeout")
        deadline = datetime.fromisoformat(vote["deadline"])
        assert datetime.fromisoformat(finished["timestamp"]) >= deadline  # never early
        assert finished["payload"]["applied"]["action_id"] == "vote:v-dead"
        assert vote["vote_id"] == "v-dead"
        result = await b.until("action.result")  # the party's choice, applied by node 2's engine
        assert result["payload"]["action_id"] == "vote:v-dead"
        # the party's choice reached an engine exactly once (the surviving node's)
        await wait_until(lambda: engine_calls(cluster.engine_dir).count("vote:v-dead") == 1)
        await b.send({"type": "vote.cast", "payload": {"vote_id": "v-dead", "option": "L"}})
        assert (await b.until("system.error"))["payload"]["code"] == "vote_closed"
        assert_ordered(b)
        await b.close()


async def test_a_vote_on_two_live_nodes_finishes_once_when_everyone_voted(cluster: Cluster) -> None:
    async with cluster.node("--api-key", KEY) as n1, cluster.node("--api-key", KEY) as n2:
        a, _ = await n1.join("aria")
        b, _ = await n2.join("borin")
        await a.expect("party.join")
        await start_vote(n2, "v-all", timeout_s=30)
        for client in (a, b):
            await client.expect("vote.started")
        await asyncio.gather(
            a.send({"type": "vote.cast", "payload": {"vote_id": "v-all", "option": "L"}}),
            b.send({"type": "vote.cast", "payload": {"vote_id": "v-all", "option": "L"}}),
        )
        for client in (a, b):
            finished = await finished_once(client, "v-all")
            assert finished["payload"]["reason"] == "all_voted"
            result = await client.until("action.result")
            assert result["payload"]["action_id"] == "vote:v-all"
        await wait_until(lambda: engine_calls(cluster.engine_dir).count("vote:v-all") == 1)
        # nothing more for this vote: the next event on both is a fresh action's result
        await a.act("after", "aria", "r1")
        for client in (a, b):
            nxt = await client.until("action.result")
            assert nxt["payload"]["action_id"] == "after"
            assert len([m for m in client.received if m["type"] == "vote.finished"]) == 1
            assert_ordered(client)
        await a.close()
        await b.close()
