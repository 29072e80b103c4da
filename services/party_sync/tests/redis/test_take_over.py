"""An in-process engine's action whose node is gone: another node takes it over when the player
resends it there (docs/redis.md, "Actions"): before, every resend got ``action_in_flight`` until
the record expired (``action_record_ttl``, 10 minutes), and no final answer ever came."""

from __future__ import annotations

import asyncio
import time

import pytest
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import make_settings, serve_in_process

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(60)]


async def test_a_gone_nodes_action_is_taken_over_on_a_resend(redis: RedisServer) -> None:
    settings = make_settings(redis_url=redis.url, engine_transport="inprocess")
    held, answering = ScriptedEngine(), ScriptedEngine()
    held.gate = asyncio.Event()  # node A's engine never finishes it
    async with serve_in_process(settings, engine=answering) as b:
        async with serve_in_process(settings, engine=held) as a:
            aria, _ = await a.join("aria")
            await aria.act("t-1", "aria", "r1")
            await aria.until("action.accepted")
            await wait_until(lambda: len(held.calls) == 1)
        # node A is gone (its heartbeat removed as it stopped); aria reconnects to node B
        aria, hello = await b.join("aria")
        assert [f["action_id"] for f in hello["payload"]["actions_in_flight"]] == ["t-1"]
        await aria.act("t-1", "aria", "r1")
        refusal = await aria.until("system.error")
        assert refusal["payload"]["code"] == "action_in_flight"
        result = await aria.until("action.result")
        assert result["payload"]["action_id"] == "t-1"
        assert [c.action_id for c in answering.calls] == ["t-1"]  # handed to B's engine once
        assert answering.calls[0].redelivery  # A may have started it: not "never seen"
        await aria.act("t-1", "aria", "r1")  # and it is final now
        assert (await aria.until("action.result"))["seq"] == result["seq"]


async def test_a_live_nodes_action_is_not_taken_over(redis: RedisServer) -> None:
    settings = make_settings(redis_url=redis.url, engine_transport="inprocess")
    held, other = ScriptedEngine(), ScriptedEngine()
    held.gate = asyncio.Event()
    async with (
        serve_in_process(settings, engine=held) as a,
        serve_in_process(settings, engine=other) as b,
    ):
        aria, _ = await a.join("aria")
        await aria.act("t-2", "aria", "r1")
        await aria.until("action.accepted")
        await wait_until(lambda: len(held.calls) == 1)
        tab, _ = await b.join("aria")  # a second tab on the other node resends it
        await tab.act("t-2", "aria", "r1")
        assert (await tab.until("system.error"))["payload"]["code"] == "action_in_flight"
        held.gate.set()  # A's engine answers: the one answer
        result = await tab.until("action.result")
        assert result["payload"]["action_id"] == "t-2"
        assert other.calls == []


async def test_a_gone_nodes_action_resent_after_its_deadline_is_taken_over(
    redis: RedisServer,
) -> None:
    """The resend came after the action's deadline (the player's node was gone longer than
    ``action_timeout``): the look at the overdue action took it out of the node's watch list
    before the take-over started, which then gave up at once, and the player never had an
    answer (votes probe: ``action_in_flight``, then nothing until the record expired)."""
    settings = make_settings(redis_url=redis.url, engine_transport="inprocess", action_timeout=1.0)
    held, answering = ScriptedEngine(), ScriptedEngine()
    held.gate = asyncio.Event()
    async with serve_in_process(settings, engine=answering) as b:
        async with serve_in_process(settings, engine=held) as a:
            aria, _ = await a.join("aria")
            await aria.act("t-3", "aria", "r1")
            await aria.until("action.accepted")
            accepted = time.monotonic()
            await wait_until(lambda: len(held.calls) == 1)
        await wait_until(lambda: time.monotonic() > accepted + 2.0, timeout=10)  # past it
        aria, _ = await b.join("aria")
        await aria.act("t-3", "aria", "r1")
        assert (await aria.until("system.error"))["payload"]["code"] == "action_in_flight"
        result = await aria.until("action.result", timeout=15)
        assert result["payload"]["action_id"] == "t-3"
        assert [c.action_id for c in answering.calls] == ["t-3"]
