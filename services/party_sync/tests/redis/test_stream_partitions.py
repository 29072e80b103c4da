"""A partitioned actions stream (``actions_stream_partitions`` = 3) on a private redis-server.

The real ``StreamEngineLink`` appends; ``PartitionedWorker``s run in the test's loop (a
``ScriptedEngine`` and a ``RecordingHost`` each, or one host shared to see every answer): the
actions of many parties land on every partition and each is answered exactly once, by one
worker; two workers share the partitions as consumers of each partition's group; a worker that
dies holding entries has them reclaimed by the other; a partition whose reads fail does not stop
the others; a partition count that differs from the nodes' is refused or reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from party_sync.engine import stream_link as stream_link_module
from party_sync.engine.partitions import count_key, partition_of, stream_names
from party_sync.engine.stream_link import StreamEngineLink
from party_sync.engine.stream_worker import PartitionedWorker, WorkerOptions
from party_sync.protocol.errors import ConfigError
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.hosts import RecordingHost, make_action
from ps_testkit.redis_server import RedisServer
from redis.asyncio import Redis
from redis.exceptions import SlotNotCoveredError

pytestmark = pytest.mark.redis

STREAM = "test:actions"
N = 3
STREAMS = stream_names(STREAM, N)
GROUP = WorkerOptions().group
WORKER_LOG = "party_sync.engine.stream_worker"
LINK_LOG = "party_sync.engine.stream_link"


def parties(count: int) -> list[str]:
    return [f"party-{n}" for n in range(count)]


def worker_for(
    redis: RedisServer,
    host: RecordingHost,
    engine: ScriptedEngine,
    consumer: str,
    *,
    partitions: int = N,
    **options: Any,
) -> tuple[PartitionedWorker, Redis]:
    client = Redis.from_url(redis.url, socket_timeout=3.0, socket_connect_timeout=0.5)
    worker = PartitionedWorker(
        engine,
        host,
        client,
        WorkerOptions(stream=STREAM, consumer=consumer, block=0.1, retry_max=0.2, **options),
        partitions=partitions,
        count_check=0.1,
    )
    return worker, client


@contextlib.asynccontextmanager
async def running(
    redis: RedisServer,
    host: RecordingHost,
    engine: ScriptedEngine,
    consumer: str = "w1",
    **options: Any,
) -> AsyncIterator[PartitionedWorker]:
    worker, client = worker_for(redis, host, engine, consumer, **options)
    task = asyncio.get_running_loop().create_task(worker.run())
    try:
        yield worker
        assert not task.done(), "the worker stopped on its own"
    finally:
        worker.stop()
        try:
            await asyncio.wait_for(task, 10)
        finally:  # also when the worker ended with an error: no connection left to the GC
            await client.aclose()


@contextlib.asynccontextmanager
async def partitioned_link(
    redis: RedisServer, partitions: int = N
) -> AsyncIterator[StreamEngineLink]:
    link = StreamEngineLink(redis.url, STREAM, 1000, partitions=partitions)
    await link.start(RecordingHost())
    try:
        yield link
    finally:
        await link.close()


async def lengths(redis: RedisServer) -> dict[str, int]:
    client = Redis.from_url(redis.url)
    try:
        return {name: int(await client.xlen(name)) for name in (STREAM, *STREAMS)}
    finally:
        await client.aclose()


async def all_acknowledged(redis: RedisServer, timeout: float = 10.0) -> None:
    """Wait until no partition's group has a pending entry."""
    client = Redis.from_url(redis.url)
    try:
        async with asyncio.timeout(timeout):  # a bounded poll of Redis state: no event to await
            while True:
                pending = [(await client.xpending(name, GROUP))["pending"] for name in STREAMS]
                if not any(pending):
                    return
                await asyncio.sleep(0.01)
    finally:
        await client.aclose()


async def test_the_actions_of_many_parties_spread_over_the_partitions_and_each_is_answered_once(
    redis: RedisServer,
) -> None:
    ids = {f"a-{party}": party for party in parties(30)}
    async with partitioned_link(redis) as link:
        for action_id, party in ids.items():
            await link.submit(make_action(action_id, party_id=party))
    expected = Counter(STREAMS[partition_of(party, N)] for party in ids.values())
    counts = await lengths(redis)
    assert counts == {STREAM: 0, **{name: expected[name] for name in STREAMS}}
    assert all(counts[name] > 0 for name in STREAMS), counts  # 30 parties reach every one
    client = Redis.from_url(redis.url)
    try:
        assert await client.get(count_key(STREAM)) == b"3"
    finally:
        await client.aclose()
    host, engine = RecordingHost(), ScriptedEngine()
    async with running(redis, host, engine):
        await wait_until(lambda: len(host.results()) == len(ids), timeout=10)
        await all_acknowledged(redis)
    assert Counter(host.results()) == Counter(list(ids))  # every one, exactly once
    # One party's entries are in one partition: its own actions keep their order.
    assert {action.party_id for action in engine.calls} == set(ids.values())


async def test_one_partitions_order_is_kept_for_each_party(redis: RedisServer) -> None:
    host, engine = RecordingHost(), ScriptedEngine()
    async with partitioned_link(redis) as link:
        for step in range(5):
            for party in parties(6):
                await link.submit(make_action(f"{party}-{step}", party_id=party))
    async with running(redis, host, engine):
        await wait_until(lambda: len(host.results()) == 30, timeout=10)
    for party in parties(6):
        mine = [a.action_id for a in engine.calls if a.party_id == party]
        assert mine == [f"{party}-{step}" for step in range(5)]


async def test_two_workers_share_the_partitions_and_answer_each_action_once(
    redis: RedisServer,
) -> None:
    host = RecordingHost()  # both workers answer through it: every result is seen once
    first, second = ScriptedEngine(), ScriptedEngine()
    first.gate = asyncio.Event()  # the first worker holds what it reads
    ids = {f"b-{party}": party for party in parties(24)}
    async with partitioned_link(redis) as link:
        for action_id, party in ids.items():
            await link.submit(make_action(action_id, party_id=party))
    async with running(redis, host, first, "w1", batch=1):
        # One entry per partition, read by w1's three loops and held there.
        await wait_until(lambda: len(first.calls) == N, timeout=10)
        held = {a.action_id for a in first.calls}
        assert {STREAMS[partition_of(ids[i], N)] for i in held} == set(STREAMS)
        async with running(redis, host, second, "w2", batch=1):
            await wait_until(lambda: len(host.results()) == len(ids) - N, timeout=10)
            assert set(host.results()) == set(ids) - held  # the consumer group shared them
            first.gate.set()
            await wait_until(lambda: len(host.results()) == len(ids), timeout=10)
            await all_acknowledged(redis)
    assert Counter(host.results()) == Counter(list(ids))
    assert len(first.calls) == N and len(second.calls) == len(ids) - N  # nobody ran one twice


async def test_a_dead_workers_entries_are_reclaimed_from_every_partition(
    redis: RedisServer,
) -> None:
    host = RecordingHost()
    dead, alive = ScriptedEngine(), ScriptedEngine()
    dead.gate = asyncio.Event()  # never set: it dies mid-action
    ids = {f"c-{party}": party for party in parties(12)}
    async with partitioned_link(redis) as link:
        for action_id, party in ids.items():
            await link.submit(make_action(action_id, party_id=party, deadline=1_900_000_000.0))
    worker, client = worker_for(redis, host, dead, "dying", batch=1)
    task = asyncio.get_running_loop().create_task(worker.run())
    await wait_until(lambda: len(dead.calls) == N, timeout=10)
    task.cancel()  # the process dies: nothing acknowledged, its entries stay pending
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await client.aclose()
    assert dead.closed  # the engine was closed once, by the worker's own finally
    orphans = {a.action_id for a in dead.calls}
    async with running(redis, host, alive, "w2", claim_idle=0.3):
        await wait_until(lambda: len(host.results()) == len(ids), timeout=10)
        await all_acknowledged(redis)
    assert Counter(host.results()) == Counter(list(ids))
    # The reclaimed ones were redeliveries: claimed on party_sync's record alone.
    redelivered = {a.action_id for a in host.claimed if a.deadline is None}
    assert orphans <= redelivered


async def test_a_partition_whose_reads_fail_does_not_stop_the_others(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, WORKER_LOG)
    by_partition: dict[int, list[str]] = {}
    for party in parties(30):
        by_partition.setdefault(partition_of(party, N), []).append(party)
    broken = STREAMS[1]
    client = Redis.from_url(redis.url)
    await client.set(broken, "not a stream")  # every stream command on it fails (WRONGTYPE)
    host, engine = RecordingHost(), ScriptedEngine()
    try:
        async with running(redis, host, engine) as worker, partitioned_link(redis) as link:
            for party in by_partition[0] + by_partition[2]:
                await link.submit(make_action(f"ok-{party}", party_id=party))
            await wait_until(
                lambda: len(host.results()) == len(by_partition[0]) + len(by_partition[2]),
                timeout=10,
            )
            await wait_until(lambda: worker.loops[1].errors >= 2, timeout=10)  # retrying
            assert bool(worker.degraded)  # (bool(): mypy must not narrow the property)
            assert worker.loops[0].errors == worker.loops[2].errors == 0
            await client.delete(broken)  # the "shard" is back
            late = by_partition[1][0]
            await link.submit(make_action(f"late-{late}", party_id=late))
            await wait_until(lambda: f"late-{late}" in host.results(), timeout=10)
            # the loop says it recovered once its round ends, which may be just after the
            # engine's answer was recorded (a flake seen in a fresh-clone make test)
            await wait_until(lambda: not worker.degraded, timeout=10)
    finally:
        await client.aclose()
    messages = [r.getMessage() for r in caplog.records if r.name == WORKER_LOG]
    assert sum("actions stream unavailable" in m for m in messages) == 1  # once per episode
    assert any("recovered" in m for m in messages)


async def test_a_worker_refuses_to_start_with_another_count_than_the_nodes(
    redis: RedisServer,
) -> None:
    async with partitioned_link(redis, partitions=3):
        pass  # the nodes said 3
    host, engine = RecordingHost(), ScriptedEngine()
    worker, client = worker_for(redis, host, engine, "w1", partitions=1)
    try:
        started: list[bool] = []
        with pytest.raises(ConfigError, match="--actions-stream-partitions 3"):
            await worker.run(on_started=lambda: started.append(True))
        assert engine.publisher is None  # refused before the engine started
        assert started == []  # and before it said it had started (the banner)
    finally:
        await client.aclose()


async def test_the_nodes_count_comes_back_after_a_flush_with_no_append(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A flush (or an empty restart) that no append noticed took the count with it, and a worker
    started with another count then ran silently on streams no node writes: the link writes it
    again while it runs, if it is missing (two links that disagree do not overwrite each other
    every few seconds)."""
    monkeypatch.setattr(stream_link_module, "COUNT_REFRESH", 0.05)
    caplog.set_level(logging.WARNING, LINK_LOG)
    client = Redis.from_url(redis.url)
    try:
        async with partitioned_link(redis, partitions=3):
            await client.flushall()
            await wait_until_async(lambda: client.get(count_key(STREAM)), b"3")
            host, engine = RecordingHost(), ScriptedEngine()
            worker, reader = worker_for(redis, host, engine, "w1", partitions=1)
            try:
                with pytest.raises(ConfigError, match="--actions-stream-partitions 3"):
                    await worker.run()
            finally:
                await reader.aclose()
            async with partitioned_link(redis, partitions=4):  # a node of another count starts
                assert await client.get(count_key(STREAM)) == b"4"
                await client.delete(count_key(STREAM))  # lost again: whichever comes first
                await wait_until_async(lambda: client.exists(count_key(STREAM)), 1)
                written: Any = await client.get(count_key(STREAM))
                loop = asyncio.get_running_loop()
                until = loop.time() + 10 * 0.05  # several refreshes of both links
                while loop.time() < until:
                    assert await client.get(count_key(STREAM)) == written  # never overwritten
                    await asyncio.sleep(0.01)
    finally:
        await client.aclose()
    changes = [r.getMessage() for r in caplog.records if "count changed" in r.getMessage()]
    assert [c.split(" (")[0] for c in changes] == [
        "the actions stream's partition count changed from 3 to 4",
    ]
    disagree = [r.getMessage() for r in caplog.records if "disagree" in r.getMessage()]
    if written == b"4":  # the 3-link finds 4: told once, however many refreshes
        assert len(disagree) == 1 and "holds 4, this node writes 3" in disagree[0]
    else:  # the 4-link finds 3, which it told of when it started (changed from 3 to 4)
        assert disagree == []


async def wait_until_async(read: Any, value: object, timeout: float = 10.0) -> None:
    """Poll ``read()`` (a coroutine function) until it returns ``value``."""
    async with asyncio.timeout(timeout):  # a bounded poll of Redis state: no event to await
        while await read() != value:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_burst_mode_drains_the_streams_of_an_old_count(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with partitioned_link(redis, partitions=1) as old:
        await old.submit(make_action("old-1"))
    async with partitioned_link(redis, partitions=3):
        pass  # the nodes restarted with 3 partitions
    assert any(
        "changed from 1 to 3" in r.getMessage() for r in caplog.records if r.name == LINK_LOG
    )
    host, engine = RecordingHost(), ScriptedEngine()
    worker, client = worker_for(redis, host, engine, "drain", partitions=1, burst=True)
    try:
        await asyncio.wait_for(worker.run(), 10)  # returns once the old stream is empty
    finally:
        await client.aclose()
    assert host.results() == ["old-1"]


async def test_a_running_worker_reports_a_count_that_changes_under_it(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, WORKER_LOG)
    host, engine = RecordingHost(), ScriptedEngine()
    async with partitioned_link(redis), running(redis, host, engine) as worker:
        # Past its start-up check (which refuses a mismatch) once it has started the engine.
        await wait_until(lambda: engine.publisher is not None, timeout=10)
        assert worker.mismatch is None
        async with partitioned_link(redis, partitions=5):
            await wait_until(lambda: worker.mismatch is not None, timeout=10)
            assert "write 5" in (worker.mismatch or "")
        async with partitioned_link(redis, partitions=3):
            await wait_until(lambda: worker.mismatch is None, timeout=10)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "disagree" in errors[0]  # once for the episode
    assert any("agree" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


async def test_one_partition_is_the_one_public_stream(redis: RedisServer) -> None:
    host, engine = RecordingHost(), ScriptedEngine()
    async with partitioned_link(redis, partitions=1) as link:
        for party in parties(5):
            await link.submit(make_action(f"one-{party}", party_id=party))
    counts = await lengths(redis)
    assert counts == {STREAM: 5, **dict.fromkeys(STREAMS, 0)}
    async with running(redis, host, engine, partitions=1) as worker:
        assert worker.streams == (STREAM,)
        await wait_until(lambda: len(host.results()) == 5, timeout=10)


async def test_a_cluster_clients_own_errors_are_survived_like_redis_errors(
    redis: RedisServer,
) -> None:
    """redis-py's cluster client raises ``SlotNotCoveredError`` (not a ``RedisError``) while a
    shard is down: the round fails and is retried, the worker does not end."""
    host, engine = RecordingHost(), ScriptedEngine()
    worker, client = worker_for(redis, host, engine, "w1")
    real = client.xautoclaim
    failures = [3]

    async def xautoclaim(*args: Any, **kwargs: Any) -> Any:
        if failures[0] > 0:
            failures[0] -= 1
            raise SlotNotCoveredError("slot not covered (a shard is down)")
        return await real(*args, **kwargs)

    client.xautoclaim = xautoclaim  # type: ignore[method-assign]
    task = asyncio.get_running_loop().create_task(worker.run())
    try:
        async with partitioned_link(redis) as link:
            await link.submit(make_action("after-slot-error", party_id="party-1"))
            await wait_until(lambda: host.results() == ["after-slot-error"], timeout=10)
        assert worker.errors == 3
        assert not task.done()
    finally:
        worker.stop()
        try:
            await asyncio.wait_for(task, 10)
        finally:  # also when the worker ended with an error: no connection left to the GC
            await client.aclose()


async def test_the_banner_waits_until_every_partition_is_read() -> None:
    """``engine worker <consumer> on <streams>`` is the line a script waits for (README: printed
    "once it serves"); with Redis down at start it was printed at once, while the worker could
    read nothing. Now once every partition's group is there."""
    down = RedisServer()  # its own server, stopped until the worker has tried it
    host, engine = RecordingHost(), ScriptedEngine()
    worker, client = worker_for(down, host, engine, "w-banner")
    started: list[bool] = []
    run = asyncio.ensure_future(worker.run(on_started=lambda: started.append(True)))
    try:
        await wait_until(lambda: all(loop.errors >= 1 for loop in worker.loops), timeout=10)
        assert started == []  # nothing to read from yet: it does not say it serves
        await asyncio.to_thread(down.start)
        await wait_until(lambda: started == [True], timeout=10)
        assert all(loop.serving.is_set() for loop in worker.loops)
    finally:
        worker.stop()
        await run
        await client.aclose()
        down.close()
    assert started == [True]  # once
