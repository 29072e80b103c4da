"""A node's pooled Redis connections are bounded (``redis_max_connections``) and a command that
finds them all busy waits for one, within its timeout, on every topology.

redis-py's own pools raise ``MaxConnectionsError`` at once past their size (100 by default):
a burst of handshakes (a node's players reconnecting after a restart, all behind one proxy)
got ``backend_unavailable`` for all but about the first hundred, on one Redis and on a Cluster
alike (1,099 of 1,200 on one Redis; 901 of 1,200 on a Cluster of three masters).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from party_sync.backends.redis_connect import (
    BoundedRedisCluster,
    RedisTarget,
    Sentinels,
    make_any_client,
    parse_addresses,
    stream_read_keys,
)
from party_sync.transport.appkeys import DIRECTORY
from ps_testkit.client import Client, wait_until
from ps_testkit.cluster import TESTS_DIR
from ps_testkit.redis_cluster import RedisCluster
from ps_testkit.redis_sentinel import MASTER_NAME, SentinelSet
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import make_settings, party_sync_command, serve_in_process, token
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

NAME = "pool-bound"
#: an unlocked semaphore, for a master whose semaphore does not exist yet
FREE = asyncio.Semaphore(1)


@pytest.fixture(params=["one", "sentinel", "cluster"])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisTarget, list[int]]]:
    """A target of each topology, and the ports of the Redis servers that hold its data."""
    if request.param == "one":
        server: RedisServer = request.getfixturevalue("redis")
        yield RedisTarget(server.url), [server.port]
    elif request.param == "cluster":
        kit: RedisCluster = request.getfixturevalue("redis_cluster_kit")
        yield RedisTarget(kit.url, cluster=True), [m.port for m in kit.masters()]
    else:
        sentinels = SentinelSet()
        await asyncio.to_thread(sentinels.start)
        try:
            addresses = parse_addresses(sentinels.addresses.split(","))
            sentinel_target = RedisTarget("redis://any/0", Sentinels(addresses, MASTER_NAME))
            yield sentinel_target, [sentinels.master_port()]
        finally:
            await asyncio.to_thread(sentinels.close)


async def named_connections(ports: list[int]) -> int:
    """Connections named ``NAME`` open on these servers."""
    count = 0
    for port in ports:
        raw = Redis(port=port)
        try:
            listing = await raw.execute_command("CLIENT", "LIST")  # type: ignore[no-untyped-call]
            text = listing.decode() if isinstance(listing, bytes) else str(listing)
            count += sum(f" name={NAME} " in f" {line} " for line in text.splitlines())
        finally:
            await raw.aclose()
    return count


async def test_a_closed_client_refuses_a_late_call_instead_of_opening_again(
    target: tuple[RedisTarget, list[int]],
) -> None:
    """A call on a client its owner closed (a task still running at shutdown) raises
    ``ConnectionError`` and opens no connection: redis-py's clients open themselves again at
    the next call, and what they open then nobody closes (an "Unclosed RedisCluster client" at
    a later garbage collection failed a test run)."""
    redis_target, ports = target
    client = make_any_client(redis_target, socket_timeout=5.0, client_name=NAME)
    await client.set("{party:late}:k", "v")
    await client.aclose()
    async with asyncio.timeout(5.0):  # (Redis sees the closes a moment later)
        while await named_connections(ports):  # noqa: ASYNC110 (state in another process)
            await asyncio.sleep(0.01)
    with pytest.raises(RedisConnectionError, match="closed"):
        await client.get("{party:late}:k")
    pipe = client.pipeline(transaction=False)
    pipe.get("{party:late}:k")
    with pytest.raises(RedisConnectionError, match="closed"):
        await pipe.execute()
    assert await named_connections(ports) == 0


async def test_a_burst_of_commands_waits_for_the_pool_instead_of_failing(
    target: tuple[RedisTarget, list[int]],
) -> None:
    """60 commands and 60 pipelines at once on a client of 3 connections, each holding its
    connection 50 ms (a BLPOP on an empty list): every one answers, and no more than 3
    connections (per master) were opened."""
    redis_target, ports = target
    client = make_any_client(redis_target, max_connections=3, socket_timeout=10.0, client_name=NAME)

    async def command(i: int) -> object:
        return await client.blpop([f"{{party:p{i % 7}}}:empty"], timeout=0.05)

    async def pipeline(i: int) -> object:
        async with client.pipeline(transaction=False) as pipe:
            pipe.set(f"{{party:p{i % 7}}}:k{i}", "v")
            pipe.get(f"{{party:p{i % 7}}}:k{i}")
            return await pipe.execute()

    try:
        answers = await asyncio.gather(
            *(command(i) for i in range(60)),
            *(pipeline(i) for i in range(60)),
            return_exceptions=True,
        )
        failures = [a for a in answers if isinstance(a, BaseException)]
        assert failures == []
        assert answers[:60] == [None] * 60
        assert all(a == [True, b"v"] for a in answers[60:])
        # (on a Cluster, one more: the seed node's, which read the slot map)
        seed = 1 if redis_target.cluster else 0
        assert 1 <= await named_connections(ports) <= 3 * len(ports) + seed
    finally:
        await client.aclose()


@pytest.mark.parametrize("target", ["one", "sentinel"], indirect=True)
async def test_the_connections_a_burst_opened_are_closed_once_unused(
    target: tuple[RedisTarget, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Soak probe: 300 players leaving at once (each a presence command of its own) left a
    node with 100 connections to Redis, idle for good (redis-py's pools never shrink). A pool
    closes those unused for ``IDLE_CLOSE_AFTER`` beyond the ``IDLE_KEPT`` last used, as it is
    used on (a node's heartbeats use it every few seconds)."""
    from party_sync.backends import redis_connect

    monkeypatch.setattr(redis_connect, "IDLE_CLOSE_AFTER", 0.3)
    monkeypatch.setattr(redis_connect, "IDLE_CHECK_EVERY", 0.05)
    redis_target, ports = target
    client = make_any_client(
        redis_target, max_connections=30, socket_timeout=10.0, client_name=NAME
    )
    try:
        await asyncio.gather(*(client.blpop([f"empty{i}"], timeout=0.1) for i in range(30)))
        assert await named_connections(ports) == 30  # the burst's
        async with asyncio.timeout(10):
            while await named_connections(ports) > redis_connect.IDLE_KEPT:
                await client.ping()  # the pool in use, as by a node's heartbeats
                await asyncio.sleep(0.05)
        assert await client.ping()  # and what is kept still serves
    finally:
        await client.aclose()


async def test_a_command_that_never_gets_a_connection_fails_within_its_timeout(
    redis: RedisServer,
) -> None:
    """Every connection held: the next command waits its ``socket_timeout`` (no longer) and
    fails as a Redis error, which the node reports as Redis being unavailable."""
    client = make_any_client(RedisTarget(redis.url), max_connections=1, socket_timeout=0.5)
    assert isinstance(client, Redis)
    held = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        started = time.monotonic()
        with pytest.raises(RedisError):
            await client.ping()
        assert 0.4 <= time.monotonic() - started < 3.0
    finally:
        await client.connection_pool.release(held)
    assert await client.ping()
    await client.aclose()


@pytest.mark.parametrize("topology", ["one", "cluster"])
async def test_a_burst_of_handshakes_is_served_with_a_small_pool(
    topology: str, request: pytest.FixtureRequest
) -> None:
    """300 players of 75 parties connecting at once to a node of ``redis_max_connections`` 2
    (behind a proxy: ``max_connections_per_ip`` 0): every one gets its ``system.hello``."""
    if topology == "cluster":
        kit: RedisCluster = request.getfixturevalue("redis_cluster_kit")
        url, cluster = kit.url, True
    else:
        server: RedisServer = request.getfixturevalue("redis")
        url, cluster = server.url, False
    settings = replace(
        make_settings(),
        redis_url=url,
        redis_cluster=cluster,
        engine_transport="inprocess",
        redis_max_connections=2,
        max_connections_per_ip=0,
        # a wait for a pooled connection is bounded by the command timeout: generous, so that
        # only a pool that starves (never a machine slowed by other work) fails the burst
        redis_command_timeout=30.0,
    )
    async with (
        serve_in_process(settings) as running,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
    ):
        clients: list[Client] = []

        async def join(i: int) -> str:
            party = f"burst-{i // 4}"
            params = {"token": token(f"c{i}", party=party, run=f"run-{party}")}
            ws = await http.ws_connect(running.ws_url, params=params)
            client = Client(ws)
            clients.append(client)
            first = await client.recv(timeout=60)
            return str(first["type"]) + ":" + str(first["payload"].get("code", ""))

        try:
            firsts = await asyncio.gather(*(join(i) for i in range(300)))
            by_kind: Callable[[str], int] = firsts.count
            assert by_kind("system.hello:") == 300, sorted(set(firsts))
        finally:  # (left open, 300 sockets were blamed on a later test by the GC's warnings)
            for client in clients:
                await client.ws.close()


async def test_the_setting_bounds_every_pool_of_a_node(redis: RedisServer) -> None:
    """``redis_max_connections`` reaches the node's command pool, its stream link's and its
    membership directory's (the script batcher's and pub/sub's connections are one each)."""
    from party_sync.backends.directory import RedisDirectory
    from party_sync.backends.redis_backend import RedisBackend
    from party_sync.engine.stream_link import StreamEngineLink
    from party_sync.server import build_server

    settings = replace(
        make_settings(), redis_url=redis.url, engine_transport="stream", redis_max_connections=7
    )
    server = build_server(settings)
    gateway = server.gateway
    assert isinstance(gateway.backend, RedisBackend)
    assert isinstance(gateway.link, StreamEngineLink)
    directory = server.app[DIRECTORY]
    assert isinstance(directory, RedisDirectory)
    bounds = []
    for client in (gateway.backend.client, gateway.link._redis, directory._client):
        assert isinstance(client, Redis)
        bounds.append(client.connection_pool.max_connections)
    assert bounds == [7, 7, 7]


async def test_a_command_waiting_for_a_connection_is_bounded_in_all(redis: RedisServer) -> None:
    """One budget, ``socket_timeout``, for the wait for a connection and Redis's answer together
    (the Cluster client's rule): a command queued behind a slow one is given up at the bound, not
    after waiting one bound for a connection and another for Redis."""
    client = make_any_client(RedisTarget(redis.url), max_connections=1, socket_timeout=1.0)
    try:
        first = asyncio.ensure_future(client.blpop(["slow:empty"], timeout=0.8))
        watcher = Redis(port=redis.port)
        try:  # the first holds the only connection, blocked in Redis

            async def blocked() -> bool:
                info: Any = await watcher.info("clients")
                return int(info["blocked_clients"]) == 1

            async with asyncio.timeout(5):
                while not await blocked():  # noqa: ASYNC110 (a state of Redis)
                    await asyncio.sleep(0.005)
        finally:
            await watcher.aclose()
        started = time.monotonic()
        with pytest.raises(RedisError):
            await client.blpop(["slow:empty"], timeout=0.8)
        assert time.monotonic() - started < 1.4  # 1.6 s before: 0.8 waiting, 0.8 in Redis
        assert await first is None
    finally:
        await client.aclose()


async def test_a_stalled_master_does_not_hold_up_another_masters_commands(
    redis_cluster_kit: RedisCluster,
) -> None:
    """A Cluster's bound is per master: with one master paused (``CLIENT PAUSE``), commands for
    it fill its slots and wait, and commands for the other masters still answer at once (one
    slot count for the whole client made them wait out the stall: ~1 s each, measured)."""
    client = make_any_client(
        RedisTarget(redis_cluster_kit.url, cluster=True), max_connections=4, socket_timeout=3.0
    )
    assert isinstance(client, BoundedRedisCluster)
    try:
        await client.initialize()
        by_master: dict[str, list[str]] = {}
        for n in range(200):
            key = f"{{party:s{n}}}:k"
            node = client.nodes_manager.get_node_from_slot(key_slot(key.encode()))
            by_master.setdefault(node.name, []).append(key)
        (paused_name, paused_keys), *others = sorted(by_master.items())
        paused = next(
            m for m in redis_cluster_kit.masters() if m.address[1] == int(paused_name.split(":")[1])
        )
        paused.call("CLIENT", "PAUSE", "1500", "ALL")
        stalled = [asyncio.ensure_future(client.get(key)) for key in paused_keys[:8]]
        await wait_until(lambda: client.semaphores.get(paused_name, FREE).locked())
        started = time.monotonic()
        healthy = [client.set(key, "v") for _, keys in others for key in keys[:8]]
        assert all(await asyncio.gather(*healthy))
        assert time.monotonic() - started < 0.5
        assert await asyncio.gather(*stalled) == [None] * 8  # answered once the pause ended
    finally:
        await client.aclose()


async def test_an_engine_worker_reads_every_partition_whatever_the_pool_setting(
    redis: RedisServer, tmp_path: Path
) -> None:
    """Each partition's read holds a connection for its whole XREADGROUP BLOCK: an engine-worker
    of 120 partitions has room for them all even with ``redis_max_connections`` 2 (its pool is
    at least the partitions and some; a pool of 2 would leave 118 partitions without a read).
    (Its pool was redis-py's 100 whatever the setting; with a pool that waits, the partitions past
    the hundredth read late rather than never, so this guards the sizing, not that change.)"""
    from party_sync.engine.partitions import stream_names

    partitions = 120
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p
        ),
        "PS_ENGINE_DIR": str(tmp_path),
        "PARTY_SYNC_LOG_LEVEL": "WARNING",
        "PARTY_SYNC_REDIS_MAX_CONNECTIONS": "2",
    }
    argv = [
        *party_sync_command(),
        "engine-worker",
        "ps_testkit.engines:node_engine",
        "--redis-url",
        redis.url,
        "--actions-stream-partitions",
        str(partitions),
    ]
    log = tmp_path / "worker.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=sink)
    client = Redis.from_url(redis.url)
    names = stream_names("party_sync:actions", partitions)
    try:

        async def groups_made() -> bool:
            return all([await client.exists(name) for name in names])

        async with asyncio.timeout(60):
            while not await groups_made():
                assert proc.poll() is None, log.read_text()
                await asyncio.sleep(0.1)
        for name in names:  # an entry it acknowledges without calling the engine
            await client.xadd(name, {"kind": "noop", "party_id": "p", "envelope": "{}"})

        async def delivered() -> int:
            count = 0
            for name in names:
                groups: Any = await client.xinfo_groups(name)
                info: Any = await client.xinfo_stream(name)
                count += groups[0]["last-delivered-id"] == info["last-generated-id"]
            return count

        async with asyncio.timeout(60):
            while (done := await delivered()) < partitions:
                assert proc.poll() is None, log.read_text()
                await asyncio.sleep(0.2)
        assert done == partitions
    finally:
        await client.aclose()
        proc.terminate()
        proc.wait(20)


async def test_a_cluster_pipeline_of_scripts_takes_its_keys_masters_slots(
    redis_cluster_kit: RedisCluster,
) -> None:
    """A pipelined script's keys come after its text and their count (the party scripts go so):
    its master's slot is the one taken, so a burst of them never overfills that master's pool
    (the script text's own slot was taken, on another master: ``MaxConnectionsError``)."""
    client = make_any_client(
        RedisTarget(redis_cluster_kit.url, cluster=True), max_connections=2, socket_timeout=10.0
    )

    async def scripted(i: int) -> object:
        async with client.pipeline(transaction=False) as pipe:
            pipe.eval("return redis.call('INCR', KEYS[1])", 1, "{party:e1}:n")
            return await pipe.execute()

    async def plain(i: int) -> object:
        return await client.blpop(["{party:e1}:empty"], timeout=0.05)

    try:
        answers = await asyncio.gather(
            *(scripted(i) for i in range(40)),
            *(plain(i) for i in range(40)),
            return_exceptions=True,
        )
        assert [a for a in answers if isinstance(a, BaseException)] == []
        assert sorted(a[0] for a in answers if isinstance(a, list)) == list(range(1, 41))
    finally:
        await client.aclose()


async def test_a_watch_transaction_cut_short_is_bounded_in_all(redis: RedisServer) -> None:
    """A vote's WATCH transaction whose EXEC Redis does not answer is given up at the bound, its
    cleanup included (redis-py's UNWATCH reconnected and waited once more: twice the bound)."""
    client = make_any_client(RedisTarget(redis.url), socket_timeout=1.0)
    pauser = Redis(port=redis.port)
    try:
        async with client.pipeline(transaction=True) as pipe:
            await pipe.watch("w:k")
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.set("w:k", "v")
            await pauser.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # type: ignore[no-untyped-call]
            started = time.monotonic()
            with pytest.raises(RedisError):
                await pipe.execute()
            assert time.monotonic() - started < 1.6
    finally:
        await pauser.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
        await pauser.aclose()
        await client.aclose()


async def test_a_nodes_engine_link_connections_carry_its_name(redis: RedisServer) -> None:
    """``CLIENT LIST`` names a node's stream-link connections ``party_sync:<node_id>:engine-link``
    (they were unnamed: the operator could not tell whose they were)."""
    settings = replace(make_settings(), redis_url=redis.url, engine_transport="stream")
    async with serve_in_process(settings) as running:
        client, _ = await running.join("aria")
        await client.act("named-1", "aria", "r1")
        raw = Redis(port=redis.port)
        try:

            async def names() -> list[str]:
                listing = await raw.execute_command("CLIENT", "LIST")  # type: ignore[no-untyped-call]
                text = listing.decode() if isinstance(listing, bytes) else str(listing)
                return [
                    f.split("=", 1)[1]
                    for line in text.splitlines()
                    for f in line.split()
                    if f.startswith("name=")
                ]

            async with asyncio.timeout(10):
                while not any(n.endswith(":engine-link") for n in await names()):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            node = next(n for n in await names() if n.endswith(":engine-link")).split(":")[1]
            assert f"party_sync:{node}" in await names()  # the same node's command connections
        finally:
            await raw.aclose()
        await client.close()


@pytest.mark.parametrize(
    ("command", "args", "keys"),
    [
        ("XREADGROUP", ("GROUP", "g", "c", "STREAMS", "s1", ">"), ["s1"]),
        (
            b"xreadgroup",
            (b"GROUP", b"g", b"c", b"COUNT", 1, b"BLOCK", 1000, b"STREAMS", b"s", b">"),
            [b"s"],
        ),
        (
            "XREADGROUP",
            ("GROUP", "streams", "STREAMS", "NOACK", "STREAMS", "a", "b", "0", "0"),
            ["a", "b"],
        ),
        ("XREAD", ("COUNT", "5", "STREAMS", "k", "0-0"), ["k"]),
        ("XREAD", ("STREAMS", "k"), None),  # a key without its id: not a read Redis runs
        ("XREADGROUP", ("GROUP", "g"), None),
        ("XREAD", ("BOGUS", "STREAMS", "k", "0"), None),
        ("GET", ("k",), None),
    ],
)
def test_a_stream_reads_keys_are_found_without_asking_a_node(
    command: Any, args: tuple[Any, ...], keys: list[Any] | None
) -> None:
    """redis-py asks one fixed node for the keys of XREAD/XREADGROUP (COMMAND GETKEYS): while
    that master was stalled, every read of every partition waited (test_stream_partitions_
    cluster). They are read from the arguments, the group and consumer names skipped even when
    they are the word STREAMS; anything else is left to redis-py (None)."""
    assert stream_read_keys(command, args) == keys
