"""The script batcher: calls of one tick share one round trip, with per-call results."""

from __future__ import annotations

import asyncio
import signal

import pytest
from party_sync.backends.redis_batch import ScriptBatcher
from party_sync.backends.redis_wire import Script, load_script
from ps_testkit.client import wait_until
from ps_testkit.redis_server import RedisServer
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

pytestmark = pytest.mark.redis

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
FAIL = "return redis.error_reply('nope')"


async def test_calls_made_together_share_one_pipeline_and_keep_their_order(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        await client.delete("batch:n")
        incr, fail = client.register_script(INCR), client.register_script(FAIL)
        for script in (incr, fail):
            await load_script(client, script)
        batcher = ScriptBatcher(client)
        calls = [batcher.run(incr, ["batch:n"], [i]) for i in range(1, 6)]
        calls.append(batcher.run(fail, [], []))
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert results[:5] == [1, 3, 6, 10, 15]  # applied in the order queued
        assert isinstance(results[5], ResponseError)
        assert (batcher.batches, batcher.calls) == (1, 6)

        alone = await batcher.run(incr, ["batch:n"], [1])  # a lone call goes directly
        assert alone == 16
        assert batcher.batches == 2
        await batcher.close()
    finally:
        await client.aclose()


async def _incr_on(client: Redis, key: str) -> Script:
    """The INCR script, loaded, on a fresh ``key``."""
    await client.delete(key)
    incr = client.register_script(INCR)
    await load_script(client, incr)
    return incr


async def _calls_a_few_ticks_apart(
    batcher: ScriptBatcher, incr: Script, *, first_sent: bool
) -> list[int]:
    """Three calls, each made a few event-loop ticks after the one before (so never in the same
    tick); ``first_sent``: whether the first call's batch has left by the time of the second."""
    futures = []
    for _ in range(3):
        futures.append(batcher.run(incr, ["batch:d"], [1]))
        for _ in range(5):
            await asyncio.sleep(0)  # ticks, not time
        if len(futures) == 1:
            assert batcher.batches == (1 if first_sent else 0)
    return list(await asyncio.gather(*futures))


async def test_a_write_delay_puts_calls_of_the_next_moments_in_one_batch(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        incr = await _incr_on(client, "batch:d")
        at_once = ScriptBatcher(client)  # redis_write_delay 0: the calls of one tick only
        assert await _calls_a_few_ticks_apart(at_once, incr, first_sent=True) == [1, 2, 3]
        assert at_once.batches >= 2
        await at_once.close()
        delayed = ScriptBatcher(client, delay=0.2)  # far longer than the few ticks between
        assert await _calls_a_few_ticks_apart(delayed, incr, first_sent=False) == [4, 5, 6]
        assert (delayed.batches, delayed.calls) == (1, 3)  # one write, in the order made
        assert await delayed.run(incr, ["batch:d"], [1]) == 7  # an idle batcher waits again
        assert delayed.batches == 2
        await delayed.close()
    finally:
        await client.aclose()


async def test_scripts_lost_by_redis_are_reloaded(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        incr = await _incr_on(client, "batch:m")
        await client.script_flush()  # as after a Redis restart
        batcher = ScriptBatcher(client)
        results = await asyncio.gather(*(batcher.run(incr, ["batch:m"], [2]) for _ in range(3)))
        assert sorted(results) == [2, 4, 6]
        await batcher.close()
    finally:
        await client.aclose()


async def test_a_connection_redis_closed_while_idle_is_replaced_before_the_next_batch(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        incr = await _incr_on(client, "batch:k")
        batcher = ScriptBatcher(client)
        assert await batcher.run(incr, ["batch:k"], [1]) == 1
        assert batcher._conn is not None
        killed = await client.client_kill_filter(_id=str(await _batch_client_id(client)))
        assert killed == 1
        from ps_testkit.client import wait_until

        conn = batcher._conn._conn  # redis-py's connection inside the batcher's RawConnection
        await wait_until(lambda: conn._reader is not None and conn._reader.at_eof())
        results = await asyncio.gather(*(batcher.run(incr, ["batch:k"], [1]) for _ in range(5)))
        assert sorted(results) == [2, 3, 4, 5, 6]  # no call failed: a new connection was used
        await batcher.close()
    finally:
        await client.aclose()


async def _batch_client_id(client: Redis) -> int:
    """The id of the batcher's connection: the one connection besides this test's own."""
    mine = await client.client_id()
    others = [c for c in await client.client_list() if int(c["id"]) != mine]
    assert len(others) == 1, others
    return int(others[0]["id"])


async def test_when_a_batch_times_out_the_calls_queued_behind_it_fail_with_it(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        incr = client.register_script(INCR)
        await load_script(client, incr)
        batcher = ScriptBatcher(client, max_batch=4, timeout=0.3)
        await client.client_pause(2000, all=True)
        calls = [batcher.run(incr, ["batch:p"], [1]) for _ in range(16)]  # four batches' worth
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert batcher.batches == 1  # one timeout for all, not one per batch of four in turn
        await batcher.close()
    finally:
        await client.client_unpause()
        await client.aclose()


async def test_after_a_batch_timed_out_calls_fail_at_once_until_redis_answers_a_probe(
    redis_server: RedisServer,
) -> None:
    """A stall made every call wait out a timeout of its own, so each WebSocket's messages, its
    pings among them, waited one timeout apiece behind the one before (pongs 14 s late in a 30-s
    stall). Once a batch timed out, calls are refused at once (nothing sent), while a PING waits
    in Redis; its answer, the moment Redis wakes, lets calls through again."""
    client = Redis.from_url(redis_server.url)
    stopped = False
    try:
        incr = await _incr_on(client, "batch:s")
        batcher = ScriptBatcher(client, timeout=0.3)
        proc = redis_server._proc
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)  # stalled
        stopped = True
        with pytest.raises(TimeoutError):
            await batcher.run(incr, ["batch:s"], [1])
        sent = batcher.batches
        refused = await asyncio.gather(
            *(batcher.run(incr, ["batch:s"], [1]) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, RedisConnectionError) for r in refused), refused
        assert batcher.batches == sent  # refused without a batch (or a timeout) of their own
        proc.send_signal(signal.SIGCONT)
        stopped = False
        assert batcher.down
        await wait_until(lambda: not batcher.down, timeout=5)
        # the timed-out call may have run when Redis woke (its caller was told "unavailable",
        # not "not done"); the refused ones never reached Redis
        assert await batcher.run(incr, ["batch:s"], [1]) <= 2
        await batcher.close()
    finally:
        if stopped and redis_server._proc is not None:
            redis_server._proc.send_signal(signal.SIGCONT)
        await client.aclose()
