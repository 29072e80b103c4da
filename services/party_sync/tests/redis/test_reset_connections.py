"""Pooled Redis connections that the network reset under a node (a NAT or conntrack timeout, a
resetting proxy, a crashed Redis host): the next command on one is sent again on a new
connection, on the loop party_sync runs on (uvloop), for every client party_sync makes.

Partition probe: uvloop answers a write on a reset socket with a ``RuntimeError`` ("unable to
perform operation on <TCPTransport closed=True ...>"), not a ``ConnectionError``; redis-py's
retry let it through, and the actions stream's append turned it into a final
``engine_unavailable`` for valid actions, with the engine and Redis both well.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop
from party_sync.backends.base import BackendSettings
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.backends.redis_connect import (
    RedisTarget,
    _LostWhenClosed,
    _SentinelConnection,
    make_client,
    make_cluster_client,
)
from party_sync.engine.stream_link import StreamEngineLink
from ps_testkit.client import wait_until
from ps_testkit.hosts import make_action
from ps_testkit.proxy import TcpProxy
from ps_testkit.redis_server import RedisServer
from redis.asyncio import Redis

pytestmark = pytest.mark.redis

#: Connections opened at once before the reset: several pooled ones, each to be found dead.
PARALLEL = 5


async def _after_a_reset(proxy: TcpProxy, call: Callable[[int], Awaitable[object]]) -> list[object]:
    """``call`` PARALLEL times at once (a pool of several connections), the connections reset,
    then ``call`` on each of them in turn: what each returned (or the exception it raised)."""
    await asyncio.gather(*(call(i) for i in range(PARALLEL)))
    assert proxy.reset() >= 2
    outcomes: list[object] = []
    for i in range(PARALLEL):
        try:
            outcomes.append(await call(i))
        except Exception as exc:  # (what the caller would have seen)
            outcomes.append(exc)
    return outcomes


def test_a_command_on_a_reset_pooled_connection_is_sent_again(redis: RedisServer) -> None:
    async def scenario() -> list[object]:
        async with TcpProxy(redis.port) as proxy:
            client = make_client(proxy.url, socket_timeout=2.0)
            try:
                await client.set("key", "value")
                return await _after_a_reset(proxy, lambda _: client.get("key"))
            finally:
                await client.aclose()

    assert uvloop.run(scenario()) == [b"value"] * PARALLEL


def test_an_append_on_a_reset_connection_is_made_not_refused(redis: RedisServer) -> None:
    async def scenario() -> tuple[list[object], int]:
        async with TcpProxy(redis.port) as proxy:
            link = StreamEngineLink(proxy.url, "test:actions", 1000)
            try:
                outcomes = await _after_a_reset(
                    proxy, lambda i: link.submit(make_action(f"action-{i}"))
                )
                return outcomes, link.failures
            finally:
                await link.close()

    outcomes, failures = uvloop.run(scenario())
    assert outcomes == [None] * PARALLEL and failures == 0


def test_every_kind_of_client_connection_treats_a_reset_socket_as_lost() -> None:
    """The cluster client (its nodes, its startup nodes) and Sentinel's connections too; made
    without connecting (no cluster needed to build the client)."""
    cluster = make_cluster_client(RedisTarget("redis://127.0.0.1:7000/0", cluster=True))
    assert issubclass(cluster.connection_kwargs["connection_class"], _LostWhenClosed)
    for node in cluster.nodes_manager.startup_nodes.values():
        assert issubclass(node.connection_class, _LostWhenClosed)
    assert issubclass(_SentinelConnection, _LostWhenClosed)
    tls = make_client("rediss://127.0.0.1:6380/0")
    assert issubclass(tls.connection_pool.connection_class, _LostWhenClosed)


async def test_a_replaced_pubsub_connection_tells_the_gateway_messages_may_be_lost(
    redis: RedisServer,
) -> None:
    """The backend's ``when_messages_lost`` hook (the gateway then looks at its pending actions
    at once: a refusal sent to one character is in no history) runs when pub/sub reconnects."""
    backend = RedisBackend(RedisOptions(redis.url), BackendSettings(presence_ttl=30.0))
    await backend.start()
    told: list[bool] = []
    try:
        backend.when_messages_lost(lambda: told.append(True))
        client = Redis.from_url(redis.url)
        try:
            assert await client.client_kill_filter(_type="pubsub") >= 1
        finally:
            await client.aclose()
        await wait_until(lambda: bool(told), timeout=10)
    finally:
        await backend.close()


def _closed_under_the_next_write(conn: Any) -> Any:
    """Make ``conn``'s next write find its writer torn down, as when another task closed the
    connection between redis-py's "connected?" and its write; the real writer (to close)."""
    writer = conn._writer
    assert writer is not None

    class Vanishing:
        def writelines(self, data: object) -> None:
            conn._writer = None
            raise AttributeError("'NoneType' object has no attribute 'writelines'")

        def __getattr__(self, name: str) -> object:
            return getattr(writer, name)

    conn._writer = Vanishing()
    return writer


@pytest.mark.parametrize("timeout", [2.0, None])
def test_a_write_on_a_connection_closed_under_it_is_a_lost_connection(
    redis: RedisServer, timeout: float | None
) -> None:
    """Workers probe: after a Cluster master was killed, an engine worker's ``XAUTOCLAIM`` raised
    ``AttributeError: 'NoneType' object has no attribute 'writelines'`` (redis-py's write on a
    connection another task had just disconnected: redis-py issues 3546, 4287), which the worker
    took for a bug of its own: it exited, and every party's actions timed out. It is a lost
    connection (``ConnectionError``), which every caller retries or tells as Redis unavailable."""
    from party_sync.backends.redis_connect import lost_aware
    from redis.asyncio.connection import Connection
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def scenario() -> BaseException | None:
        conn = lost_aware(Connection)(host="127.0.0.1", port=redis.port, socket_timeout=timeout)
        await conn.connect()  # type: ignore[no-untyped-call]
        writer = _closed_under_the_next_write(conn)
        try:
            await conn.send_packed_command(conn.pack_command("PING"), check_health=False)
        except BaseException as exc:
            return exc
        finally:
            writer.close()
            await conn.disconnect()
        return None

    raised = uvloop.run(scenario())
    assert isinstance(raised, RedisConnectionError), repr(raised)


def test_a_command_is_sent_again_after_a_write_on_a_connection_closed_under_it(
    redis: RedisServer,
) -> None:
    """The same through a client: the command is sent again on a new connection (the client's
    retry), and the caller gets its answer."""
    from party_sync.backends.redis_connect import lost_aware
    from redis.asyncio.connection import Connection

    async def scenario() -> object:
        client = make_client(RedisTarget(f"redis://127.0.0.1:{redis.port}"), socket_timeout=2.0)
        try:
            await client.set("k", "v")
            pool = client.connection_pool
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            assert isinstance(conn, lost_aware(Connection))
            real = _closed_under_the_next_write(conn)
            await pool.release(conn)
            try:
                return await client.get("k")
            finally:
                real.close()
        finally:
            await client.aclose()

    assert uvloop.run(scenario()) == b"v"
