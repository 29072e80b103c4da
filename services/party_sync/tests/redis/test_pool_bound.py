"""A node's pooled Redis connections are bounded (``redis_max_connections``) and a command that
finds them all busy waits for one, within its timeout, on every topology.

redis-py's own pools raise ``MaxConnectionsError`` at once past their size (100 by default):
a burst of handshakes (a node's players reconnecting after a restart, all behind one proxy)
got ``backend_unavailable`` for all but about the first hundred, on one Redis and on a Cluster
alike (1,099 of 1,200 on one Redis; 901 of 1,200 on a Cluster of three masters).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import aiohttp
import pytest
from party_sync.backends.redis_connect import (
    RedisTarget,
    Sentinels,
    make_any_client,
    parse_addresses,
)
from party_sync.transport.appkeys import DIRECTORY
from ps_testkit.client import Client
from ps_testkit.redis_cluster import RedisCluster
from ps_testkit.redis_sentinel import MASTER_NAME, SentinelSet
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import make_settings, serve_in_process, token
from redis.asyncio import Redis
from redis.exceptions import RedisError

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

NAME = "pool-bound"


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
        assert 1 <= await named_connections(ports) <= 3 * len(ports)
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

        firsts = await asyncio.gather(*(join(i) for i in range(300)))
        by_kind: Callable[[str], int] = firsts.count
        assert by_kind("system.hello:") == 300, sorted(set(firsts))
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
