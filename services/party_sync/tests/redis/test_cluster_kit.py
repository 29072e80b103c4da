"""The Redis Cluster test kit (``ps_testkit.redis_cluster``) does what the cluster tests rely on.

One cluster of three masters with one replica each, for the module: created and ``ok`` on every
node; keys written through redis-py's asyncio ``RedisCluster`` land on every master; a slot moved
while a key in it is read in a loop (the reader follows ``ASK`` mid-way and ``MOVED`` after, and
never sees an error or a wrong value); a master killed with SIGKILL, its replica promoted and
serving the keys written before, and the old master back as a replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from ps_testkit.redis_cluster import SLOTS, RedisCluster, slots_of
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3, replicas=1) as running:
        yield running


@pytest.fixture
async def client(cluster: RedisCluster) -> AsyncIterator[AsyncRedisCluster]:
    host, port = cluster.live()[0].address
    redis = AsyncRedisCluster(host=host, port=port, decode_responses=True)
    await redis.initialize()
    try:
        yield redis
    finally:
        await redis.aclose()


def test_the_cluster_has_three_masters_with_a_replica_each(cluster: RedisCluster) -> None:
    masters = cluster.masters()
    assert len(masters) == 3 and len(cluster.live()) == 6
    for node in cluster.live():
        assert "cluster_state:ok" in str(node.call("CLUSTER", "INFO"))
    ranges = list(slots_of(cluster))
    assert {owner.port for owner, *_ in ranges} == {m.port for m in masters}
    assert sum(last - first + 1 for _, first, last in ranges) == SLOTS
    for master in masters:
        assert len(cluster.replicas_of(master)) == 1


async def test_keys_spread_over_every_master(
    cluster: RedisCluster, client: AsyncRedisCluster
) -> None:
    keys = [f"party_sync:{{party:p{i}}}:meta" for i in range(30)]
    for i, key in enumerate(keys):
        await client.hset(key, mapping={"epoch": "e", "seq": i})
    for i, key in enumerate(keys):
        assert await client.hget(key, "seq") == str(i)
    owners = {cluster.slot_owner(cluster.keyslot(key)).port for key in keys}
    assert owners == {m.port for m in cluster.masters()}  # 30 parties hit all three shards
    for master in cluster.masters():
        assert int(str(master.call("DBSIZE"))) > 0


async def test_a_slot_moves_while_a_key_in_it_is_read(
    cluster: RedisCluster, client: AsyncRedisCluster
) -> None:
    first, second = "party_sync:{party:mig}:meta", "party_sync:{party:mig}:history"
    await client.set(first, "one")
    await client.set(second, "two")
    slot = cluster.keyslot(first)
    source = cluster.slot_owner(slot)
    target = next(m for m in cluster.masters() if m is not source)

    reads: list[bytes | str | None] = []
    errors: list[BaseException] = []
    stop, read_after_move = asyncio.Event(), asyncio.Event()
    moved_at: int | None = None
    # The reader has a client of its own, used by it alone: redis-py's asyncio RedisCluster
    # sends ASKING and the redirected command as two pool checkouts, so a client shared by
    # concurrent coroutines may lose the ASKING to another connection and ping-pong ASK/MOVED
    # until "TTL exhausted" (docs: /work/notes/cluster-design.md). One coroutine per client
    # reuses its one connection per node, so ASKING and the command share it.
    host, port = cluster.live()[0].address
    own = AsyncRedisCluster(host=host, port=port, decode_responses=True)
    await own.initialize()

    async def reader() -> None:
        while not stop.is_set():
            try:
                reads.append(await own.get(first))
                if moved_at is not None and len(reads) >= moved_at + 50:
                    read_after_move.set()
            except Exception as exc:  # recorded: the test fails on any
                errors.append(exc)
            await asyncio.sleep(0)

    task = asyncio.create_task(reader())
    try:
        migration = await asyncio.to_thread(cluster.begin_migration, slot, target)
        await asyncio.to_thread(migration.move, keys=[first])  # `first` moved, `second` not
        assert await client.get(first) == "one"  # on the target: ASK (then ASKING) mid-way
        assert await client.get(second) == "two"  # still on the source
        await asyncio.to_thread(migration.move)  # the rest
        await asyncio.to_thread(migration.finish)
        assert cluster.slot_owner(slot) is target
        assert await client.get(second) == "two"  # MOVED, the client's slot map updated
        target_node = client.get_node_from_key(second)
        assert target_node is not None and target_node.port == target.port
        moved_at = len(reads)
        async with asyncio.timeout(10):  # the loop keeps reading after the move
            await read_after_move.wait()
    finally:
        stop.set()
        await task
        await own.aclose()
    assert not errors, errors[:3]
    assert reads and set(reads) == {"one"}
    assert target.call("CLUSTER", "COUNTKEYSINSLOT", slot) == 2
    assert source.call("CLUSTER", "COUNTKEYSINSLOT", slot) == 0


async def test_a_killed_master_is_replaced_by_its_replica(
    cluster: RedisCluster, client: AsyncRedisCluster
) -> None:
    key = "party_sync:{party:failover}:meta"
    await client.set(key, "kept")
    slot = cluster.keyslot(key)
    master = cluster.slot_owner(slot)
    [replica] = cluster.replicas_of(master)
    assert master.call("WAIT", 1, 5000) == 1  # the write reached the replica

    promoted = await asyncio.to_thread(cluster.kill_master, master)
    assert promoted is replica and not master.running
    assert cluster.slot_owner(slot) is replica
    assert await client.get(key) == "kept"  # the client finds the new master by itself
    await client.set(key, "after")
    assert replica.call("GET", key) == "after"

    await asyncio.to_thread(cluster.restart, master)  # back, as the new master's replica
    assert master.info("replication").get("role") == "slave"
    assert cluster.replicas_of(replica) == [master]
