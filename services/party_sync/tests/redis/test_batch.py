"""The script batcher: calls of one tick share one round trip, with per-call results."""

from __future__ import annotations

import asyncio

import pytest
from party_sync.backends.redis_batch import ScriptBatcher
from ps_testkit.redis_server import RedisServer
from redis.asyncio import Redis
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
            script.sha = await client.script_load(script.script)
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


async def test_scripts_lost_by_redis_are_reloaded(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        await client.delete("batch:m")
        incr = client.register_script(INCR)
        incr.sha = await client.script_load(incr.script)
        await client.script_flush()  # as after a Redis restart
        batcher = ScriptBatcher(client)
        results = await asyncio.gather(*(batcher.run(incr, ["batch:m"], [2]) for _ in range(3)))
        assert sorted(results) == [2, 4, 6]
        await batcher.close()
    finally:
        await client.aclose()
