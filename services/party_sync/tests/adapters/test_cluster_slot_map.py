"""Redis Cluster: the slot map that cannot be read (a master down) is logged once per episode."""

from __future__ import annotations

import pytest


async def test_an_unreadable_slot_map_is_one_warning_per_episode(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Cluster master down: every retry (several a second) failed to read the slot map and
    logged a WARNING each time; now one when it begins and one INFO when it is over."""
    import logging
    from types import SimpleNamespace

    from party_sync.backends.redis_batch import ShardedBatcher

    failing = [True]

    async def initialize() -> None:
        if failing[0]:
            raise ConnectionError("no node answers")

    async def ping(*args: object) -> bool:
        return True

    node = SimpleNamespace(
        name="127.0.0.1:7000", execute_command=ping
    )  # answers: asked for the map
    manager = SimpleNamespace(
        initialize=initialize, startup_nodes={node.name: node}, slots_cache={}
    )
    client = SimpleNamespace(nodes_manager=manager, get_primaries=list)
    from party_sync.backends import redis_connect

    monkeypatch.setattr(redis_connect, "_ask", lambda node, *args: node.execute_command(*args))
    batcher = ShardedBatcher(client)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="party_sync"):
        for _ in range(5):
            await batcher._reread()
        failing[0] = False
        await batcher._reread()
        await batcher._reread()
    said = [(r.levelname, r.getMessage()[:60]) for r in caplog.records]
    assert [level for level, _ in said] == ["WARNING", "INFO"], said


async def test_the_map_is_read_only_from_nodes_that_answer_and_only_when_it_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stalled node is never asked for the map (redis-py asks its nodes one after another,
    each for a command timeout, holding the map's lock); the same map is not read again (a read
    reconnects every pooled connection)."""
    import asyncio
    from types import SimpleNamespace

    from party_sync.backends import redis_connect
    from party_sync.backends.redis_connect import read_slot_map
    from redis.exceptions import RedisClusterException

    # (the nodes are asked on connections of their own: here, the fakes' own method)
    monkeypatch.setattr(redis_connect, "_ask", lambda node, *args: node.execute_command(*args))

    stalled = asyncio.Event()
    slots: list[list[object]] = [[0, 16383, [b"127.0.0.1", 7001, b"id"]]]
    inits: list[list[str]] = []

    def node(port: int, *, answers: bool) -> SimpleNamespace:
        async def execute_command(*args: object) -> object:
            if not answers:
                await stalled.wait()  # never set: a SIGSTOPped node
            return slots if args[:2] == ("CLUSTER", "SLOTS") else True

        return SimpleNamespace(name=f"127.0.0.1:{port}", host="127.0.0.1", port=port,
                               execute_command=execute_command)  # fmt: skip

    async def initialize() -> None:
        inits.append(sorted(manager.startup_nodes))

    live, dead = node(7001, answers=True), node(7002, answers=False)
    manager = SimpleNamespace(
        startup_nodes={live.name: live, dead.name: dead},
        slots_cache={},
        initialize=initialize,
        remap_host_port=lambda host, port: (host, port),
    )
    client = SimpleNamespace(nodes_manager=manager)
    await read_slot_map(client, wait=0.5)  # type: ignore[arg-type]
    assert inits == [["127.0.0.1:7001"]]  # asked of the node that answers only
    assert set(manager.startup_nodes) == {live.name, dead.name}  # both known again after
    manager.slots_cache = {slot: [live] for slot in range(16384)}
    await read_slot_map(client, wait=0.5)  # type: ignore[arg-type]
    assert len(inits) == 1  # the same map: not read again
    slots[0][2] = [b"127.0.0.1", 7003, b"id2"]  # a failover: another master
    await read_slot_map(client, wait=0.5)  # type: ignore[arg-type]
    assert len(inits) == 2
    manager.startup_nodes = {dead.name: dead}
    with pytest.raises(RedisClusterException, match="no node"):
        await read_slot_map(client, wait=0.2)  # type: ignore[arg-type]
    assert len(inits) == 2


async def test_a_slot_map_naming_no_node_for_a_call_is_a_cluster_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A map being replaced under a call named no node for it for a moment (redis-py issue
    3835): redis-py went on to ``'NoneType' object has no attribute 'name'``, which no caller
    takes for Redis unavailable (an engine worker ended on such an error: workers probe). It
    is a ``SlotNotCoveredError``, retried and told like a shard down."""
    from party_sync.backends.redis_connect import BoundedRedisCluster
    from redis.asyncio import RedisCluster
    from redis.exceptions import SlotNotCoveredError

    async def nameless(self: object, *args: object, **kwargs: object) -> list[None]:
        return [None]

    monkeypatch.setattr(RedisCluster, "_determine_nodes", nameless)
    client = BoundedRedisCluster.__new__(BoundedRedisCluster)
    client.failed_at = {}
    with pytest.raises(SlotNotCoveredError):
        await client._determine_nodes("GET", "key")
