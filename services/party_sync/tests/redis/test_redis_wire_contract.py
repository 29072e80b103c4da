"""The contract ``redis_wire`` relies on, checked against a real redis-server.

``party_sync.backends.redis_wire`` is the one module that uses redis-py below its client API
(a raw connection from the pool's factory, packed writes, reply reads with and without a timeout,
the idle-connection check, ``Script.sha``). None of that is documented as stable, so each
behaviour the script batcher and the pub/sub bus depend on is exercised here, exactly as they use
it: a redis-py upgrade that changes one fails this file instead of hanging a node or losing a
message. When it fails, fix ``redis_wire`` (only), then move the version pin in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections.abc import AsyncIterator

import pytest
import redis
from party_sync.backends.redis_wire import (
    RawConnection,
    Script,
    ScriptCall,
    load_script,
    pack_evalsha,
)
from ps_testkit.redis_server import RedisServer
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

pytestmark = pytest.mark.redis

#: The redis-py major version this contract was verified with (pyproject.toml pins it).
VERIFIED_MAJOR = 8

ECHO = "return ARGV[1]"
FAIL = "return redis.error_reply('refused on purpose')"


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A client configured as the backend's (RESP2), with a short socket timeout to test it."""
    client = Redis.from_url(redis_server.url, protocol=2, socket_timeout=0.2)
    try:
        yield client
    finally:
        await client.aclose()


def test_redis_py_is_the_major_version_this_was_verified_with() -> None:
    major = int(redis.__version__.split(".")[0])
    assert major == VERIFIED_MAJOR, (
        f"redis-py {redis.__version__}: this contract was verified with {VERIFIED_MAJOR}.x; "
        "run this file, fix redis_wire if it fails, then update VERIFIED_MAJOR and the pin"
    )


async def _echo_and_fail(client: Redis) -> tuple[Script, Script]:
    """ECHO and FAIL registered, every other script flushed, both loaded."""
    echo, fail = client.register_script(ECHO), client.register_script(FAIL)
    await client.script_flush()
    await load_script(client, echo)
    await load_script(client, fail)
    return echo, fail


def _params(method: object) -> list[tuple[str, object, object]]:
    signature = inspect.signature(method)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def test_the_redis_py_internals_the_cluster_and_sentinel_clients_override_are_as_verified() -> None:
    """Besides ``redis_wire``, three places lean on redis-py below its client API, each with a
    behaviour test of its own (tests/redis/test_cluster_*.py, test_sentinel_*.py, the fence's):
    ``BoundedRedisCluster`` overrides ``RedisCluster._determine_slot``, ``_determine_nodes`` and
    ``_execute_command``,
    ``_SentinelConnection`` overrides ``connect_to`` and ``connect_check_health`` (redis_connect),
    and the fence is redis-py's ``redis_connect_func`` connection option (redis_fence). Their
    names and signatures are pinned here, so an upgrade that renames or reshapes one fails by
    name, not as a hang in a failover test."""
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.connection import AbstractConnection
    from redis.asyncio.sentinel import SentinelManagedConnection

    positional, var, keywords = (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    )
    empty = inspect.Parameter.empty
    overridden = {
        RedisCluster._determine_slot: [
            ("self", positional, empty), ("command", positional, empty), ("args", var, empty),
        ],
        RedisCluster._determine_nodes: [
            ("self", positional, empty), ("command", positional, empty), ("args", var, empty),
            ("request_policy", inspect.Parameter.KEYWORD_ONLY, empty),
            ("node_flag", inspect.Parameter.KEYWORD_ONLY, None),
        ],
        RedisCluster._execute_command: [
            ("self", positional, empty), ("target_node", positional, empty),
            ("args", var, empty), ("kwargs", keywords, empty),
        ],
        SentinelManagedConnection.connect_to: [
            ("self", positional, empty), ("address", positional, empty),
        ],
        SentinelManagedConnection.connect_check_health: [
            ("self", positional, empty), ("check_health", positional, True),
            ("retry_socket_connect", positional, True),
        ],
    }  # fmt: skip
    for method, expected in overridden.items():
        assert inspect.iscoroutinefunction(method), method
        assert _params(method) == expected, method
    assert "redis_connect_func" in inspect.signature(AbstractConnection.__init__).parameters


async def test_packed_evalsha_calls_are_answered_in_order_and_an_error_keeps_the_stream_in_step(
    client: Redis,
) -> None:
    echo, fail = await _echo_and_fail(client)
    # What EVALSHA is sent with: the script's SHA1 (Redis's script id, not a security use).
    assert echo.sha == hashlib.sha1(ECHO.encode(), usedforsecurity=False).hexdigest()
    conn = RawConnection(client.connection_pool, timeout=False)
    try:
        await conn.connect()
        assert conn.connected
        calls = [(echo, [], ["a"], None), (fail, [], [], None), (echo, ["k"], ["b"], None)]
        await conn.send_packed(pack_evalsha(calls))
        assert await conn.read() == b"a"
        with pytest.raises(ResponseError, match="refused on purpose"):
            await conn.read()
        assert await conn.read() == b"b"  # the error reply did not shift the replies
    finally:
        await conn.close()
    assert not conn.connected


async def test_an_unknown_script_is_a_noscript_error(client: Redis) -> None:
    """The batcher re-runs a call whose script Redis lost (NOSCRIPT) through redis-py."""
    echo = client.register_script(ECHO)
    await client.script_flush()
    conn = RawConnection(client.connection_pool, timeout=False)
    try:
        await conn.send_packed(pack_evalsha([(echo, [], ["x"], None)]))  # connects by itself
        with pytest.raises(NoScriptError):
            await conn.read()
    finally:
        await conn.close()


async def test_without_a_timeout_a_read_outlasts_the_socket_timeout(client: Redis) -> None:
    conn = RawConnection(client.connection_pool, timeout=False)
    try:
        await conn.connect()
        await conn.send("BLPOP", "wire:empty", "0.5")  # Redis answers nil after 0.5 s
        assert await conn.read() is None  # no TimeoutError at the pool's 0.2 s
    finally:
        await conn.close()


async def test_with_a_timeout_a_read_is_bounded_by_it_except_a_push_read(client: Redis) -> None:
    conn = RawConnection(client.connection_pool)
    try:
        await conn.connect()
        await conn.send("BLPOP", "wire:empty", "0.5")
        with pytest.raises(redis.exceptions.TimeoutError):
            await conn.read()  # the pool's 0.2 s socket timeout (the bus's CLIENT SETNAME)
    finally:
        await conn.close()
    conn = RawConnection(client.connection_pool)
    try:
        await conn.connect()
        await conn.send("BLPOP", "wire:empty", "0.5")
        assert await conn.read_push() is None  # the bus's read loop: no timeout at all
    finally:
        await conn.close(wait=True)


async def test_pubsub_replies_are_plain_arrays(client: Redis) -> None:
    """What the bus parses: ``[b"subscribe", channel, n]`` then ``[b"message", channel, data]``."""
    conn = RawConnection(client.connection_pool)
    try:
        await conn.connect()
        await conn.send("CLIENT", "SETNAME", "wire-contract")
        await conn.read()
        names = [c["name"] for c in await client.client_list()]
        assert "wire-contract" in names
        await conn.send("SUBSCRIBE", b"wire:ch")
        assert await conn.read_push() == [b"subscribe", b"wire:ch", 1]
        await client.publish("wire:ch", b"hello")
        assert await conn.read_push() == [b"message", b"wire:ch", b"hello"]
        await conn.send("UNSUBSCRIBE", b"wire:ch")
        assert await conn.read_push() == [b"unsubscribe", b"wire:ch", 0]
    finally:
        await conn.close(wait=True)


async def test_an_idle_connection_redis_closed_is_seen_as_stale(client: Redis) -> None:
    conn = RawConnection(client.connection_pool, timeout=False)
    try:
        await conn.connect()
        await conn.send("CLIENT", "ID")
        connection_id = await conn.read()
        assert not await conn.stale()  # idle, nothing in its buffer
        assert await client.client_kill_filter(_id=str(connection_id)) == 1
        async with asyncio.timeout(5):
            while not await conn.stale():  # noqa: ASYNC110 (a bounded poll: EOF is on its way)
                await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def test_read_replies_takes_a_batch_in_order_with_error_replies_as_values(
    client: Redis,
) -> None:
    """The batcher's read: hiredis's reader under redis-py's parser, one await per socket read."""
    echo, fail = await _echo_and_fail(client)
    conn = RawConnection(client.connection_pool, timeout=False)
    try:
        await conn.connect()
        assert conn._hiredis() is not None  # the fast path is the one exercised here
        big = "x" * 200_000  # replies larger than one socket read (64 KiB)
        calls: list[ScriptCall] = [
            (echo, [], ["a"], None),
            (fail, [], [], None),
            (echo, [], [big], None),
            (echo, [], ["b"], None),
        ]
        await conn.send_packed(pack_evalsha(calls))
        replies = await conn.read_replies(len(calls))
        assert replies[0] == b"a"
        assert isinstance(replies[1], ResponseError)
        assert "refused on purpose" in str(replies[1])
        assert replies[2:] == [big.encode(), b"b"]
        await conn.send_packed(pack_evalsha([(echo, [], ["c"], None)]))
        assert await conn.read_replies(1) == [b"c"]  # nothing left over from the first batch
        await client.script_flush()
        await conn.send_packed(pack_evalsha([(echo, [], ["d"], None)]))
        (lost,) = await conn.read_replies(1)
        assert isinstance(lost, NoScriptError)  # the batcher's cue to run it through redis-py
    finally:
        await conn.close()


async def test_read_pushes_returns_every_message_received_and_waits_for_the_first(
    client: Redis,
) -> None:
    conn = RawConnection(client.connection_pool)
    try:
        await conn.connect()
        await conn.send("SUBSCRIBE", b"wire:burst")
        assert await conn.read_pushes() == [[b"subscribe", b"wire:burst", 1]]
        waiting = asyncio.ensure_future(conn.read_pushes())
        await asyncio.sleep(0.3)  # longer than the pool's socket timeout: still waiting
        assert not waiting.done()
        async with client.pipeline(transaction=False) as pipe:
            for i in range(50):
                pipe.publish("wire:burst", f"m{i}")
            await pipe.execute()
        got = await waiting
        while len(got) < 50:
            got += await conn.read_pushes()
        assert got == [[b"message", b"wire:burst", f"m{i}".encode()] for i in range(50)]
    finally:
        await conn.close(wait=True)


async def test_read_replies_and_pushes_fail_as_a_connection_error_when_redis_closes(
    client: Redis,
) -> None:
    for read in ("replies", "pushes"):
        conn = RawConnection(client.connection_pool, timeout=False)
        try:
            await conn.connect()
            await conn.send("CLIENT", "ID")
            (connection_id,) = await conn.read_replies(1)
            waiting = asyncio.ensure_future(
                conn.read_replies(1) if read == "replies" else conn.read_pushes()
            )
            await asyncio.sleep(0.05)
            assert await client.client_kill_filter(_id=str(connection_id)) == 1
            with pytest.raises(redis.exceptions.ConnectionError):
                async with asyncio.timeout(5):
                    await waiting
        finally:
            await conn.close()


async def test_without_hiredis_s_parser_the_reads_fall_back_to_redis_py(
    redis_server: RedisServer,
) -> None:
    """A redis-py that parses in Python (no hiredis reader): the same answers, one read each."""
    from redis._parsers import _AsyncRESP2Parser

    client = Redis.from_url(redis_server.url, protocol=2, parser_class=_AsyncRESP2Parser)
    try:
        echo, fail = await _echo_and_fail(client)
        conn = RawConnection(client.connection_pool, timeout=False)
        try:
            await conn.connect()
            assert conn._hiredis() is None  # the fallback is the one exercised here
            calls: list[ScriptCall] = [(echo, [], ["a"], None), (fail, [], [], None)]
            await conn.send_packed(pack_evalsha(calls))
            first, refused = await conn.read_replies(len(calls))
            assert first == b"a" and isinstance(refused, ResponseError)
            await conn.send("SUBSCRIBE", b"wire:slow")
            assert await conn.read_pushes() == [[b"subscribe", b"wire:slow", 1]]
            await client.publish("wire:slow", b"x")
            assert await conn.read_pushes() == [[b"message", b"wire:slow", b"x"]]
        finally:
            await conn.close(wait=True)
    finally:
        await client.aclose()
