"""Engine workers write into the parties' keys with the nodes' history bounds and TTLs
(``backends/shared_settings.py``). Outside hygiene probe: ``serve --party-ttl 60
--action-record-ttl 20`` with an ``engine-worker`` started without those in its environment (it
has no such flags) left action records for 600 s and parties for an hour, without a word."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator

import pytest
from party_sync import cli
from party_sync.backends import shared_settings
from party_sync.backends.keys import KeySpace
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.config import Settings
from party_sync.engine import stream_link as stream_link_module
from party_sync.engine.stream_link import StreamEngineLink
from party_sync.engine.stream_worker import PartitionedWorker, WorkerOptions
from party_sync.protocol import codec
from party_sync.protocol.errors import InvalidEvent
from party_sync.server import backend_settings
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.hosts import RecordingHost
from ps_testkit.redis_server import RedisServer
from redis.asyncio import Redis

pytestmark = pytest.mark.redis

STREAM = "test:shared-actions"
KEY = KeySpace("party_sync").settings()
NODES = dataclasses.replace(
    Settings(), party_ttl=60.0, action_record_ttl=20.0, history_size=50, api_max_body_bytes=65536
)


@contextlib.asynccontextmanager
async def node_link(redis: RedisServer, settings: Settings) -> AsyncIterator[StreamEngineLink]:
    """A node's actions stream link, as ``server.make_link`` makes it."""
    values = shared_settings.values_of(settings)
    link = StreamEngineLink(redis.url, STREAM, 1000, shared=(KEY, shared_settings.encode(values)))
    await link.start(RecordingHost())
    try:
        yield link
    finally:
        await link.close()


@contextlib.asynccontextmanager
async def working(worker: PartitionedWorker, client: Redis) -> AsyncIterator[None]:
    """``worker`` running; stopped (and ``client`` closed) at the end."""
    task = asyncio.get_running_loop().create_task(worker.run())
    try:
        yield
    finally:
        worker.stop()
        try:
            await asyncio.wait_for(task, 10)
        finally:
            await client.aclose()


def worker_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "party_sync.engine.stream_worker"
    ]


async def held(client: Redis) -> dict[str, float] | None:
    return shared_settings.decode(await client.get(KEY))


async def test_a_worker_writes_with_the_nodes_settings_and_says_so(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(stream_link_module, "COUNT_REFRESH", 0.05)
    caplog.set_level(logging.INFO, "party_sync")
    client = Redis.from_url(redis.url)
    own = Settings(redis_url=redis.url)  # a worker given none of them: the defaults
    try:
        taken = await asyncio.to_thread(cli._take_nodes_settings, own)  # no node yet: its own
        assert taken == own
        assert any("no gateway node has written" in r.getMessage() for r in caplog.records)
        async with node_link(redis, NODES):
            assert await held(client) == shared_settings.values_of(NODES)
            await client.flushall()  # an emptied Redis: written again while the node runs
            async with asyncio.timeout(10):
                while await held(client) is None:  # noqa: ASYNC110 (a bounded poll of Redis)
                    await asyncio.sleep(0.01)
            taken = await asyncio.to_thread(cli._take_nodes_settings, own)
    finally:
        await client.aclose()
    assert (taken.party_ttl, taken.action_record_ttl, taken.history_size) == (60.0, 20.0, 50)
    assert taken.api_max_body_bytes == 65536  # the events' bound too (re-check probe)
    assert taken.redis_url == own.redis_url  # nothing else taken
    said = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "party_sync"
    ]
    assert len(said) == 1 and "party_ttl 60 (this process: 3600)" in said[0], said
    assert "action_record_ttl 20 (this process: 600)" in said[0]
    assert "api_max_body_bytes 65536 (this process: 262144)" in said[0]


async def test_a_running_worker_warns_once_when_the_nodes_settings_change(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "party_sync.engine.stream_worker")
    client = Redis.from_url(redis.url, socket_timeout=3.0)
    engine = ScriptedEngine()
    worker = PartitionedWorker(
        engine,
        RecordingHost(),
        client,
        WorkerOptions(stream=STREAM, consumer="w1", block=0.1),
        count_check=0.05,
        shared=(KEY, shared_settings.values_of(NODES)),
    )
    async with working(worker, client), node_link(redis, NODES):
        await wait_until(lambda: engine.publisher is not None, timeout=10)
        changed = dataclasses.replace(NODES, party_ttl=120.0)
        async with node_link(redis, changed):  # a node restarted with another value
            await wait_until(lambda: worker.settings_differ is not None, timeout=10)
            looked = worker.settings_looks
            await wait_until(lambda: worker.settings_looks >= looked + 4, timeout=10)
        async with node_link(redis, NODES):
            await wait_until(lambda: worker.settings_differ is None, timeout=10)
    warnings = worker_warnings(caplog)
    assert len(warnings) == 1 and "party_ttl 120 (this process: 60)" in warnings[0], warnings
    assert any("equal this worker's again" in r.getMessage() for r in caplog.records)


async def test_a_running_worker_takes_the_nodes_new_settings(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Rolling-upgrade probe: a worker started while one node ran with a history of 50 kept
    trimming to 50 after every node was back on 300, until it was restarted (resumes that fitted
    got a snapshot). ``engine-worker`` has its backend adopt them (``cli._adopt_nodes_settings``):
    the worker writes with the nodes' values from its next look at them, and says which
    changed."""
    caplog.set_level(logging.INFO, "party_sync.engine.stream_worker")
    client = Redis.from_url(redis.url, socket_timeout=3.0)
    values = shared_settings.values_of(NODES)
    b = RedisBackend(RedisOptions(redis.url), backend_settings(NODES))
    await b.start()
    worker = PartitionedWorker(
        ScriptedEngine(),
        RecordingHost(),
        client,
        WorkerOptions(stream=STREAM, consumer="w1", block=0.1),
        count_check=0.05,
        shared=(KEY, values),
        adopt=functools.partial(cli._adopt_nodes_settings, b, NODES),
    )
    changed = dataclasses.replace(NODES, party_ttl=120.0, history_size=3, api_max_body_bytes=4096)
    try:
        async with working(worker, client), node_link(redis, changed):  # every node restarted
            await wait_until(lambda: b.settings.history_size == 3, timeout=10)
            for n in range(6):
                payload = {"scene_number": n, "scene_id": f"s{n}", "title": "T", "narration": "N"}
                message = codec.envelope(
                    "scene.update", {**payload, "options": [], "kind": "story"}, ts=time.time()
                )
                await b.publish("p-adopt", message, time.time())
            meta, history = b.keys.party_keys("p-adopt")[:2]
            assert await client.llen(history) == 3  # trimmed to the nodes' bound
            assert 60_000 < await client.pttl(meta) <= 120_000  # the nodes' party_ttl
            assert worker.settings_differ is None  # nothing left to tell
            # the nodes' bound of one event (re-check probe: a worker published 20 kB events
            # into a deployment whose nodes refused any over 8 kB)
            big = codec.envelope("party.state", {"flag": "x" * 9000}, ts=time.time())
            with pytest.raises(InvalidEvent, match="at most 8192"):
                await b.publish("p-adopt", big, time.time())
    finally:
        await b.close()
    said = worker_warnings(caplog)
    assert len(said) == 1 and "from now on" in said[0], said
    assert "party_ttl 120 (until now: 60)" in said[0] and "history_size 3" in said[0]
