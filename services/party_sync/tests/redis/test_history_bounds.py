"""The history bounds in Redis (``_lib.lua`` hold/event_of): entries written by an earlier version
(no stamp) are read as they are, the redis.call cost of trimming, the header's two forms. The
rules themselves are compared with the embedded backend in ``test_differential.py``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from party_sync.backends.base import BackendSettings
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.core.history import ResumePoint
from party_sync.protocol import codec
from ps_testkit.redis_server import RedisServer
from redis.asyncio import Redis

pytestmark = pytest.mark.redis

T0 = 1_800_000_000.0
COUNT_ONLY = BackendSettings(history_size=5, history_max_bytes=0, history_max_age=0.0)
BOUNDED = BackendSettings(history_size=5, history_max_bytes=262_144, history_max_age=1800.0)


@contextlib.asynccontextmanager
async def opened(server: RedisServer, settings: BackendSettings) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend(RedisOptions(server.url), settings)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


def scene(n: int, narration: str = "N") -> dict[str, Any]:
    payload = {
        "scene_number": n,
        "scene_id": f"s{n}",
        "title": "T",
        "narration": narration,
        "options": [],
        "kind": "story",
    }
    return codec.envelope("scene.update", payload, ts=T0, trace_id="t" * 32)


async def history(server: RedisServer, backend: RedisBackend) -> list[bytes]:
    client = Redis.from_url(server.url)
    try:
        entries = await client.lrange(backend.keys.party_keys("p1").history, 0, -1)
        return [bytes(e) if isinstance(e, bytes) else e.encode() for e in entries]
    finally:
        await client.aclose()


async def test_entries_of_an_earlier_version_are_read_then_dropped_by_a_bounded_append(
    redis_server: RedisServer,
) -> None:
    """With neither a bytes nor an age bound, entries are the events themselves (the plain
    ``"5"`` header, as earlier versions wrote them). A node with those bounds reads them as they
    are; its first append drops them, since nothing tells their age or where their bytes start
    (the newest is kept), so a resume from before it gets a snapshot, never a partial replay."""
    redis_server.command("FLUSHALL")
    async with opened(redis_server, COUNT_ONLY) as old:
        written = [await old.publish("p1", scene(n), T0 + n) for n in (1, 2, 3)]
        epoch = (await old.snapshot("p1", T0)).epoch
        assert await history(redis_server, old) == [e.data for e in written]
    async with opened(redis_server, BOUNDED) as new:
        assert await new.replay("p1", ResumePoint(epoch, 0), 10) == [e.data for e in written]
        held = await new.admin.events("p1", 0, 10)
        assert held is not None and held.events == [e.data for e in written]

        fourth = await new.publish("p1", scene(4), T0 + 4)
        raw = await history(redis_server, new)
        assert raw == [b"1800000004000 0 " + fourth.data]  # stamp ms, bytes before it, event
        assert await new.replay("p1", ResumePoint(epoch, 0), 10) is None
        assert await new.replay("p1", ResumePoint(epoch, 3), 10) == [fourth.data]
        held = await new.admin.events("p1", 0, 10)
        assert held is not None and (held.oldest_seq, held.events) == (4, [fourth.data])

        fifth = await new.publish("p1", scene(5), T0 + 5)
        offset = len(fourth.data)
        assert (await history(redis_server, new))[1] == b"1800000005000 %d " % offset + fifth.data
    async with opened(redis_server, COUNT_ONLY) as old_again:  # bounds turned off again
        assert await old_again.replay("p1", ResumePoint(epoch, 3), 10) == [
            fourth.data,
            fifth.data,
        ]
        sixth = await old_again.publish("p1", scene(6), T0 + 6)
        assert (await history(redis_server, old_again))[-1] == sixth.data  # unstamped
        assert await old_again.replay("p1", ResumePoint(epoch, 3), 10) == [
            fourth.data,
            fifth.data,
            sixth.data,
        ]


async def _calls_per_publish(server: RedisServer, settings: BackendSettings, size: int) -> float:
    """Redis commands (inside the scripts, EVALSHA itself not counted) per event published on a
    history already trimmed at every append, from INFO commandstats."""
    server.command("FLUSHALL")
    client = Redis.from_url(server.url)
    try:
        async with opened(server, settings) as backend:
            now = T0
            for n in range(settings.history_size + 20):  # full: every append now trims
                now += 1
                await backend.publish("p1", scene(n, "x" * size), now)
            await client.config_resetstat()
            count = 50
            for n in range(count):
                now += 1
                await backend.publish("p1", scene(n, "x" * size), now)
            stats = await client.info("commandstats")
        script_commands = ("hincrby", "rpush", "ltrim", "lrange", "lindex", "llen", "lpop")
        calls = sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in script_commands)
        return calls / count
    finally:
        await client.aclose()


async def test_trimming_by_bytes_and_age_costs_at_most_two_calls_per_event(
    redis_server: RedisServer,
) -> None:
    """The history's commands per published event (HINCRBY seq, RPUSH, LTRIM with the count
    alone): with the bytes and age bounds, 2 more (HINCRBY of the byte count, one LRANGE of the
    first two candidates), whichever bound drops the oldest event."""
    plain = await _calls_per_publish(redis_server, replace_limits(30, 0, 0.0), 100)
    by_count = await _calls_per_publish(redis_server, replace_limits(30, 262_144, 1800.0), 100)
    by_bytes = await _calls_per_publish(redis_server, replace_limits(300, 6000, 1800.0), 400)
    by_age = await _calls_per_publish(redis_server, replace_limits(300, 0, 20.0), 100)
    assert by_count == plain + 2  # plain: 3 today (HINCRBY, RPUSH, LTRIM)
    assert by_bytes == plain + 2
    assert by_age == plain + 2


def replace_limits(size: int, max_bytes: int, max_age: float) -> BackendSettings:
    return BackendSettings(history_size=size, history_max_bytes=max_bytes, history_max_age=max_age)
