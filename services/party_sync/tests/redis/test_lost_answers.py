"""A node's last answers lost in a failover are written again on the server it meets next.

Redis replication is asynchronous: a promoted replica may lack what the old master took in its
last second. For an action answered by a node's own link (in-process or HTTP) that was the
action's result (or refusal) and the release of its character's lock: the players had the answer
from the old master, but on the new one the record stayed claimed with no answer, and every next
action of its actor was refused ``character_busy`` until the lost action's deadline (up to
``action_timeout``; clients probe, Sentinel failover). The promoted replica is simulated here:
the record and the lock are put back as they were before the answer (``DUMP`` / ``RESTORE``),
and the process is told it met a Redis server it never met (``redis_fence.SERVERS``), as its
connections' fence hook tells it."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from party_sync.backends import redis_fence
from party_sync.backends.base import BackendSettings
from party_sync.backends.keys import KeySpace
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.core.actions import Decision
from party_sync.engine.interface import RestateNotice
from party_sync.engine.restating import EpochWatch
from party_sync.metrics import Metrics
from party_sync.protocol import codec
from ps_testkit.client import Client, Closed, wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import Running, make_settings, serve_in_process
from redis.asyncio import Redis

pytestmark = [pytest.mark.redis]

KEYS = KeySpace()


async def answered_then_lost(srv: Running, engine: ScriptedEngine, redis: RedisServer) -> Client:
    """aria's action ``first`` answered (refused, if the engine rejects), then its answer lost
    as in a failover: its record and her lock as the promoted replica would have them
    (accepted, not answered)."""
    aria, _ = await srv.join("aria")
    engine.gate = asyncio.Event()
    await aria.act("first", "aria", "r1")
    await aria.until("action.accepted")
    record, locks = KEYS.action("p1", "first"), KEYS.party_keys("p1").locks
    client = Redis.from_url(redis.url)
    try:
        before = {key: await client.dump(key) for key in (record, locks)}
        engine.gate.set()
        if engine.mode == "reject":
            assert await answer(aria) == ("system.error", "action_rejected")
        else:
            result = await aria.until("action.result")
            assert result["payload"]["action_id"] == "first"
            await aria.until("scene.update")
        for key, dumped in before.items():  # what the old master's last second wrote is lost
            assert dumped is not None
            await client.restore(key, 0, dumped, replace=True)
        assert await client.hget(record, "r") is None and await client.hget(record, "x") is None
    finally:
        await client.aclose()
    redis_fence.SERVERS.met(f"promoted-replica-{uuid.uuid4()}")  # as a connection records it
    return aria


async def answer(client: Client) -> tuple[str, str]:
    """The next final answer the client gets: its type, and its action or its error code."""
    while True:
        message = await client.recv()
        if message["type"] == "action.result":
            return message["type"], message["payload"]["action_id"]
        if message["type"] == "system.error":
            return message["type"], message["payload"]["code"]


async def test_the_actor_s_next_action_is_not_refused_busy_after_a_lost_answer(
    redis: RedisServer,
) -> None:
    settings = make_settings(redis_url=redis.url, engine_transport="inprocess", action_timeout=30.0)
    engine = ScriptedEngine()
    async with serve_in_process(settings, engine=engine) as srv:
        aria = await answered_then_lost(srv, engine, redis)
        await aria.act("second", "aria", "r1")
        # The lost result is written again first (the party may see it twice, as after a
        # stream worker's re-delivery: the same answer), then the next action is accepted.
        answers = [await answer(aria), await answer(aria)]
        assert answers == [("action.result", "first"), ("action.result", "second")]
        assert [call.action_id for call in engine.calls] == ["first", "second"]
        await aria.close()


async def test_a_lost_answer_is_written_again_when_the_pub_sub_connection_comes_back(
    redis: RedisServer,
) -> None:
    """Nobody acts: the record is answered again anyway once the node's pub/sub connection is
    replaced (a failover replaces it), so a resend gets its answer, not a wait."""
    settings = make_settings(redis_url=redis.url, engine_transport="inprocess", action_timeout=30.0)
    engine = ScriptedEngine()
    async with serve_in_process(settings, engine=engine) as srv:
        aria = await answered_then_lost(srv, engine, redis)
        redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        again = await aria.until("action.result", timeout=10)
        assert again["payload"]["action_id"] == "first"
        client = Redis.from_url(redis.url)
        try:
            assert await client.hget(KEYS.action("p1", "first"), "r") is not None
            assert not await client.hexists(KEYS.party_keys("p1").locks, "aria")
        finally:
            await client.aclose()
        await aria.close()


async def test_a_lost_answer_written_again_into_a_new_epoch_gets_the_party_re_stated(
    redis: RedisServer,
) -> None:
    """On a new master the fence has deleted every party's ``meta``: the answer written again is
    the first event of the party's new epoch, and the engine is asked to re-state the party, as
    for any other opening (before: nobody was told, and the party stayed without its scene and
    its run status; Sentinel fault tier, planned failover)."""
    settings = make_settings(redis_url=redis.url, engine_transport="inprocess", action_timeout=30.0)
    engine = ScriptedEngine()
    async with serve_in_process(settings, engine=engine) as srv:
        aria = await answered_then_lost(srv, engine, redis)
        asked = len(engine.restates)  # (the party's first join opened its first epoch)
        client = Redis.from_url(redis.url)
        try:
            await client.delete(KEYS.party_keys("p1").meta)  # as the fence does on a new master
        finally:
            await client.aclose()
        redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        with pytest.raises(Closed) as closed:  # the old epoch's connection: 4003, then a resume
            await aria.until("action.result", timeout=10)
        assert closed.value.code == 4003
        await wait_until(lambda: len(engine.restates) == asked + 1, timeout=10)
        notice = engine.restates[-1]
        assert (notice.party_id, notice.campaign_run_id) == ("p1", "r1")
        bob, hello = await srv.join("bob")
        assert hello["payload"]["seq"] >= 2  # the answer written again opened it (seq 1)
        await bob.close()


async def test_an_engine_worker_s_lost_answer_written_again_is_an_opening_of_its_watch(
    redis: RedisServer,
) -> None:
    """The same in an ``engine-worker`` process: its engine's answers are written by its own
    backend, which writes them again after a failover; its ``EpochWatch`` (``follow``) is told
    of the opening, and its next round asks its engine to re-state the party."""
    notices: list[RestateNotice] = []

    async def request(notice: RestateNotice) -> None:
        notices.append(notice)

    b = RedisBackend(RedisOptions(redis.url), BackendSettings(), metrics=Metrics("test"))
    await b.start()
    client = Redis.from_url(redis.url)
    try:
        watch = EpochWatch(b, request, time.time)
        watch.follow(b)
        watch.knows("p1", "r1")  # (the worker learns it from the action's entry)
        verdict = await b.begin_action("p1", "aria", "first", time.time())
        assert verdict.decision is Decision.ACCEPT
        record, locks = KEYS.action("p1", "first"), KEYS.party_keys("p1").locks
        before = {key: await client.dump(key) for key in (record, locks)}
        payload = {
            "action_id": "first",
            "character_id": "aria",
            "action_type": "choice",
            "outcome": "success",
            "state": {},
        }
        await b.publish("p1", codec.envelope("action.result", payload, ts=time.time()), time.time())
        for key, dumped in before.items():
            assert dumped is not None
            await client.restore(key, 0, dumped, replace=True)
        await client.delete(KEYS.party_keys("p1").meta)  # as the fence does on a new master
        redis_fence.SERVERS.met(f"promoted-replica-{uuid.uuid4()}")
        assert not watch.openings.pending
        redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        await wait_until(lambda: watch.openings.pending, timeout=10)
        assert await watch.restate_opened()
        assert [(n.party_id, n.campaign_run_id) for n in notices] == [("p1", "r1")]
        assert await client.hget(record, "r") is not None
    finally:
        await client.aclose()
        await b.close()


async def test_a_party_written_just_before_a_new_server_is_re_stated_again(
    redis: RedisServer,
) -> None:
    """What a node wrote in the moment before its connections moved to a new master may have
    gone to the old one and be lost with it: an engine's re-statement posted to a node that
    moved later than the node that fenced was (HTTP link probe: the party stayed without a scene
    until the next failover). Once the node meets a new server, the engine is asked to re-state
    every party it wrote to in the last seconds (the window itself: tests/core/test_epochs.py)."""
    settings = make_settings(redis_url=redis.url, engine_transport="inprocess")
    engine = ScriptedEngine()
    async with serve_in_process(settings, engine=engine) as srv:
        aria, _ = await srv.join("aria")
        await aria.act("first", "aria", "r1")
        await aria.until("scene.update")  # the engine wrote to p1 just now
        asked = len(engine.restates)
        redis_fence.SERVERS.met(f"promoted-replica-{uuid.uuid4()}")
        redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        await wait_until(lambda: len(engine.restates) == asked + 1, timeout=10)
        notice = engine.restates[-1]
        assert (notice.party_id, notice.campaign_run_id) == ("p1", "r1")
        await aria.close()


async def test_a_lost_refusal_written_again_is_told_to_its_sender(redis: RedisServer) -> None:
    """A refusal written again on a new server is told to its sender again, not only published
    to the party as ``action.failed``: the first ``system.error`` may have reached no node (a
    PUBLISH during a failover reaches only the nodes still subscribed to the old master: none;
    Sentinel probe), and before, its sender waited for the action's deadline. A connection that
    had it already is not sent it twice."""
    settings = make_settings(redis_url=redis.url, engine_transport="inprocess", action_timeout=30.0)
    engine = ScriptedEngine()
    engine.mode = "reject"
    async with serve_in_process(settings, engine=engine) as srv:
        aria = await answered_then_lost(srv, engine, redis)
        again, _ = await srv.join("aria")  # her other tab, which never had it
        redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        told = await again.until("system.error", timeout=10)
        assert told["payload"]["code"] == "action_rejected"
        assert told["payload"]["in_reply_to"]["action_id"] == "first"
        client = Redis.from_url(redis.url)
        try:
            assert await client.hget(KEYS.action("p1", "first"), "x") is not None  # again
        finally:
            await client.aclose()
        await aria.act("second", "aria", "r1")  # not told twice: the next is the answer
        refused = await aria.until("system.error", timeout=10)
        assert refused["payload"]["in_reply_to"]["action_id"] == "second"
        assert [call.action_id for call in engine.calls] == ["first", "second"]
        await aria.close()
        await again.close()
