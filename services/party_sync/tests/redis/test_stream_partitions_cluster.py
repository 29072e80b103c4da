"""A partitioned actions stream on a three-master Redis Cluster (the test kit's, no replicas).

Four partitions (``<stream>:0..3`` hash to slots 506, 4571, 8632 and 12697: every master of the
default slot split holds one or two). The gateway's ``StreamEngineLink`` appends through a
cluster client (``redis_cluster``: ``make_any_client``), and one ``PartitionedWorker`` reads
through one too (each of its commands names one stream: no cross-slot command). It answers every
action of every partition once; then one master is killed (no replica: its partition is down,
the cluster set to serve the rest) and the partitions on the other masters go on, while the dead
one's loop retries; the master comes back empty and its partition is served again (the group
re-created).
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import pytest
from party_sync.backends.redis_connect import RedisTarget, make_any_client
from party_sync.engine.partitions import count_key, partition_of, stream_names
from party_sync.engine.stream_link import StreamEngineLink
from party_sync.engine.stream_monitor import Condition, StreamMonitor
from party_sync.engine.stream_worker import PartitionedWorker, WorkerOptions
from party_sync.protocol.errors import BackendUnavailable
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.hosts import RecordingHost, make_action
from ps_testkit.redis_cluster import RedisCluster
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

pytestmark = pytest.mark.redis

STREAM = "party_sync:actions"
N = 4
STREAMS = stream_names(STREAM, N)


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3, replicas=0) as running:
        yield running


@pytest.fixture
async def client(cluster: RedisCluster) -> AsyncIterator[AsyncRedisCluster]:
    host, port = cluster.live()[0].address
    redis = AsyncRedisCluster(host=host, port=port, socket_timeout=3.0, socket_connect_timeout=0.5)
    await redis.initialize()
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest.fixture
async def link(cluster: RedisCluster) -> AsyncIterator[StreamEngineLink]:
    target = RedisTarget(cluster.url, cluster=True)
    running = StreamEngineLink(target, STREAM, 1000, partitions=N)
    await running.start(RecordingHost())
    try:
        yield running
    finally:
        await running.close()


async def test_a_worker_on_a_cluster_consumes_every_partition_and_survives_a_dead_shard(
    cluster: RedisCluster, client: AsyncRedisCluster, link: StreamEngineLink
) -> None:
    owners = {name: cluster.slot_owner(cluster.keyslot(name)) for name in STREAMS}
    assert {node.port for node in owners.values()} == {m.port for m in cluster.masters()}
    assert await client.get(count_key(STREAM)) == b"4"  # the link said N

    async def append(action_id: str, party_id: str) -> None:
        await link.submit(make_action(action_id, party_id=party_id))

    parties = [f"party-{n}" for n in range(40)]
    for party in parties:
        await append(f"a-{party}", party)
    for name in STREAMS:
        assert await client.xlen(name) > 0
    host, engine = RecordingHost(), ScriptedEngine()
    reader = make_any_client(
        RedisTarget(cluster.url, cluster=True), socket_timeout=3.0, socket_connect_timeout=0.5
    )
    worker = PartitionedWorker(
        engine,
        host,
        reader,
        WorkerOptions(stream=STREAM, consumer="w1", block=0.1, retry_max=0.2),
        partitions=N,
    )
    monitor = StreamMonitor.for_redis(RedisTarget(cluster.url, cluster=True), STREAM, partitions=N)
    await monitor.check_once()  # before any worker: the backlog, summed over the partitions
    assert monitor.reading is not None and monitor.reading.length == len(parties)
    task = asyncio.get_running_loop().create_task(worker.run())
    try:
        await wait_until(lambda: len(host.results()) == len(parties), timeout=15)
        assert Counter(host.results()) == Counter(f"a-{party}" for party in parties)
        for name in STREAMS:  # every partition has its group, on its own shard
            groups: Any = await client.xinfo_groups(name)
            assert [g["name"] for g in groups] == [b"campaign-engine"]
            assert int(groups[0]["pending"]) == 0
        # The nodes' monitor reads every partition through its own cluster client.
        assert await monitor.check_once() is Condition.OK
        assert len(monitor.readings) == N
        assert all(r.group_exists and r.active_consumers == 1 for r in monitor.readings)
        # the sum over the partitions: nothing left (the worker deletes what it handled)
        assert monitor.reading is not None and monitor.reading.length == 0

        # One shard down: the partitions of the two other masters are still served.
        for node in cluster.live():
            node.call("CONFIG", "SET", "cluster-require-full-coverage", "no")
        dead = owners[STREAMS[3]]  # slot 12697: the third master's only partition
        down = {i for i, name in enumerate(STREAMS) if owners[name].port == dead.port}
        assert down == {3}
        cluster.stop_node(dead)
        alive = [p for p in parties if partition_of(p, N) not in down]
        for party in alive:
            await append(f"b-{party}", party)
        await wait_until(lambda: len(host.results()) == len(parties) + len(alive), timeout=20)
        await wait_until(lambda: worker.loops[3].errors >= 1, timeout=20)  # it retries
        assert not task.done()
        assert await monitor.check_once() is None  # a partition it cannot read: not ready
        assert not monitor.health().ok and monitor.errors >= 1

        # The master comes back (empty: no persistence); its partition is served again.
        await asyncio.to_thread(cluster.restart, dead)
        late = next(p for p in parties if partition_of(p, N) == 3)
        await wait_until(lambda: worker.loops[3].errors > 0 and not worker.loops[3].degraded, 20)
        await append(f"c-{late}", late)
        await wait_until(lambda: f"c-{late}" in host.results(), timeout=20)
        assert Counter(host.results())[f"c-{late}"] == 1
        assert await monitor.check_once() is Condition.OK
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        await reader.aclose()
        await monitor.stop()


async def test_a_stalled_master_holds_up_only_its_own_partitions(
    cluster: RedisCluster, link: StreamEngineLink
) -> None:
    """Cluster probe: while one master was stopped (SIGSTOP: its sockets accept and never
    answer), actions of partitions on the *healthy* masters waited for the whole stall, in
    three ways: redis-py asks one fixed node for an XREADGROUP's keys (``COMMAND GETKEYS``),
    so every read loop waited on that node; a read loop's heartbeat key
    (``<stream>:<i>:workers``) hashes to another master than its stream; and after one failed
    append the link wrote the partition count (its key on yet another master) before every
    append. Each master is stopped in turn: the partitions of the other two are served
    meanwhile."""
    for node in cluster.live():
        node.call("CONFIG", "SET", "cluster-require-full-coverage", "no")
    owners = {name: cluster.slot_owner(cluster.keyslot(name)) for name in STREAMS}
    counted = cluster.slot_owner(cluster.keyslot(count_key(STREAM)))
    host, engine = RecordingHost(), ScriptedEngine()
    reader = make_any_client(
        RedisTarget(cluster.url, cluster=True), socket_timeout=3.0, socket_connect_timeout=0.5
    )
    worker = PartitionedWorker(
        engine, host, reader, WorkerOptions(stream=STREAM, consumer="w1"), partitions=N
    )
    task = asyncio.get_running_loop().create_task(worker.run())
    parties = [f"party-{n}" for n in range(40)]

    def answered(wanted: set[str]) -> bool:
        return wanted <= set(host.results())

    try:
        for party in parties[:8]:  # every loop reads (and has beaten) before the first stall
            await link.submit(make_action(f"warm-{party}", party_id=party))
        await wait_until(lambda: len(host.results()) == 8, timeout=15)
        for round_, master in enumerate(cluster.masters()):
            on_it = [p for p in parties if owners[STREAMS[partition_of(p, N)]].port == master.port]
            healthy = [p for p in parties if p not in on_it][:6]
            assert master.proc is not None
            master.proc.send_signal(signal.SIGSTOP)
            try:
                if master.port == counted.port:  # an append that fails: the count is said again
                    with pytest.raises(BackendUnavailable):
                        await link.submit(make_action(f"lost-{round_}", party_id=on_it[0]))
                wanted = [f"r{round_}-{party}" for party in healthy]
                # all appended and answered while the master is still stopped (it resumes below;
                # each append waiting out a command timeout first takes 30 s)
                async with asyncio.timeout(15):
                    for action_id, party in zip(wanted, healthy, strict=True):
                        await link.submit(make_action(action_id, party_id=party))
                    await wait_until(partial(answered, set(wanted)), timeout=15)
            finally:
                master.proc.send_signal(signal.SIGCONT)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
        await reader.aclose()
