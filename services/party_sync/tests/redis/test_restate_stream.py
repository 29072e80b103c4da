"""The stream engine transport: whatever opens a party's new epoch, the engine-worker's engine is
asked to re-state the party once (docs/engines.md; the in-process and HTTP transports:
tests/adapters/test_restate_openings.py).

A gateway node in stream mode and a worker assembled as ``party-sync engine-worker`` assembles
it (its publisher shows its engine's events to an ``EpochWatch`` whose requests go to that same
engine) run in the test's loop on a private redis-server; the party's ``meta`` is deleted, as the
rollback fence does after a failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from party_sync.backends.redis_backend import RedisBackend
from party_sync.engine.interface import RestateNotice, restate_engine
from party_sync.engine.restating import EpochWatch
from party_sync.engine.stream_worker import StreamWorker, WorkerOptions
from party_sync.protocol.schemas import Contracts
from party_sync.publishing import BackendPublisher
from party_sync.server import make_backend
from ps_testkit.client import Client, wait_until
from ps_testkit.engines import RestatingEngine
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import Running, make_settings, serve_in_process
from redis.asyncio import Redis

pytestmark = pytest.mark.redis

STATE = {
    "status": "active",
    "run_status": "in_progress",
    "scene_number": 1,
    "characters": {},
    "flags": {"timer": True},
}


@contextlib.asynccontextmanager
async def stream_mode(
    redis: RedisServer, engine: RestatingEngine
) -> AsyncIterator[tuple[Running, BackendPublisher]]:
    """A gateway node (engine transport ``stream``) and one engine worker, as the CLI builds it."""
    settings = replace(make_settings(), redis_url=redis.url, engine_transport="stream")
    backend = make_backend(settings)
    await backend.start()

    async def restate(notice: RestateNotice) -> None:
        await restate_engine(engine, notice)

    watch = EpochWatch(backend, restate, time.time)
    publisher = BackendPublisher(backend, Contracts(), time.time, watch)
    client = Redis.from_url(redis.url, socket_timeout=3.0)
    options = WorkerOptions(stream=settings.actions_stream, consumer="w1", block=0.1)
    worker = StreamWorker(engine, publisher, client, options, watch=watch)
    task = asyncio.get_running_loop().create_task(worker.run())
    try:
        async with serve_in_process(settings) as srv:
            yield srv, publisher
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        await client.aclose()
        await backend.close()


async def lose_state(srv: Running) -> None:
    assert srv.server is not None
    backend = srv.server.gateway.backend
    assert isinstance(backend, RedisBackend)
    await backend.client.delete(backend.keys.party_keys("p1").meta)  # the fence's work


async def scene_of(client: Client) -> int:
    hello = await client.expect("system.hello")
    scene = hello["payload"].get("scene")
    return int(scene["scene_number"]) if scene else 0


async def play_one_scene(srv: Running, engine: RestatingEngine) -> tuple[Client, Client]:
    a, _ = await srv.join("aria")
    b, _ = await srv.join("borin")
    await a.act("act-1", "aria", "r1")
    assert (await b.until("scene.update", timeout=10))["payload"]["scene_number"] == 1
    await wait_until(lambda: engine.restated == 1, 10)  # the party's first epoch
    return a, b


async def test_a_leave_opening_the_epoch_reaches_the_worker_as_one_restate(
    redis: RedisServer,
) -> None:
    engine = RestatingEngine()
    async with stream_mode(redis, engine) as (srv, _):
        a, b = await play_one_scene(srv, engine)
        await lose_state(srv)
        await b.send(
            {"type": "party.leave", "payload": {"character_id": "borin"}}
        )  # seq 1 of the new epoch
        await wait_until(lambda: engine.restated == 2, 10)  # and its events published
        assert engine.restates[1].campaign_run_id == "r1"
        assert await a.closed() == 4003
        a2 = await srv.connect("aria")
        assert await scene_of(a2) == 1
        assert len(engine.restates) == 2
        await a2.close()


async def test_an_engine_event_outside_any_entry_opening_the_epoch_is_restated_once(
    redis: RedisServer,
) -> None:
    """The worker's engine publishes on its own (a timer): no entry follows it, no gateway knows;
    the worker asks its engine after its next round."""
    engine = RestatingEngine()
    async with stream_mode(redis, engine) as (srv, _):
        a, b = await play_one_scene(srv, engine)
        await b.send(
            {"type": "party.leave", "payload": {"character_id": "borin"}}
        )  # now, not after a grace period
        await a.until("party.leave")
        await b.close()
        await lose_state(srv)
        seq = await engine.started.publish("p1", "party.state", STATE, trace_id="timer-1")
        assert seq == 1
        await wait_until(lambda: engine.restated == 2, 10)  # and its events published
        assert engine.restates[1].trace_id == "timer-1"
        assert await a.closed() == 4003
        a2 = await srv.connect("aria")
        assert await scene_of(a2) == 1
        assert len(engine.restates) == 2
        await a2.close()


async def test_an_engine_result_opening_the_epoch_is_restated_once(redis: RedisServer) -> None:
    engine = RestatingEngine()
    async with stream_mode(redis, engine) as (srv, _):
        a, b = await play_one_scene(srv, engine)
        await b.send(
            {"type": "party.leave", "payload": {"character_id": "borin"}}
        )  # now, not after a grace period
        await a.until("party.leave")
        await b.close()
        await lose_state(srv)
        await a.act("act-2", "aria", "r1")  # its result is seq 1 of the new epoch
        await wait_until(lambda: engine.restated == 2, 10)  # and its events published
        assert await a.closed() == 4003
        a2 = await srv.connect("aria")
        assert await scene_of(a2) == 2
        assert len(engine.restates) == 2
        await a2.close()
