"""A party the Redis backend is only asked about (``snapshot.lua``, the bus's ``head.lua``) and that
never gets an event (a handshake that subscribed, then failed before ``connect.lua``): the ``meta``
those scripts create expires like any party's, and the party's first event still refreshes every
key it has (``_lib.lua``: ``ensure_epoch_expiring``, ``touch_written``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from party_sync.backends.base import BackendSettings
from party_sync.backends.keys import PARTY_KEYS
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.core.binding import Binding
from ps_testkit.redis_server import RedisServer
from redis.asyncio import Redis

pytestmark = pytest.mark.redis

TTL = 600.0  # idle_party_ttl: the slack is min(60 s, TTL / 10) = 60 s
T0 = 1_800_000_000.0


@contextlib.asynccontextmanager
async def opened(server: RedisServer) -> AsyncIterator[tuple[RedisBackend, Redis]]:
    server.command("FLUSHALL")
    backend = RedisBackend(RedisOptions(server.url), BackendSettings(idle_party_ttl=TTL))
    await backend.start()
    client = Redis.from_url(server.url)
    try:
        yield backend, client
    finally:
        await client.aclose()
        await backend.close()


async def pttls(backend: RedisBackend, client: Redis, party_id: str) -> dict[str, int]:
    """PTTL of each key of the party that exists (-1: no expiry)."""
    keys = dict(zip(PARTY_KEYS, backend.keys.party_keys(party_id), strict=True))
    found = {name: int(await client.pttl(key)) for name, key in keys.items()}
    return {name: ms for name, ms in found.items() if ms != -2}  # -2: no such key


@pytest.mark.parametrize("read", ["snapshot", "head"])
async def test_reading_an_unknown_party_leaves_keys_that_expire(
    redis_server: RedisServer, read: str
) -> None:
    ttl_ms, slack_ms = int(TTL * 1000), 60_000
    async with opened(redis_server) as (backend, client):
        if read == "snapshot":
            epoch = (await backend.snapshot("ghost")).epoch
        else:
            epoch, _ = await backend.head("ghost")
        found = await pttls(backend, client, "ghost")
        assert set(found) == {"meta"}, found  # all it created
        # the party's expiry, just under the full-touch threshold
        assert ttl_ms - slack_ms - 5_000 < found["meta"] < ttl_ms - slack_ms, found

        # Read again: the party is known, nothing is written (its expiry is not pushed back).
        await client.pexpire(backend.keys.party_keys("ghost").meta, ttl_ms - 2 * slack_ms)
        assert (await backend.snapshot("ghost")).epoch == epoch
        assert (await backend.head("ghost"))[0] == epoch
        assert (await pttls(backend, client, "ghost"))["meta"] <= ttl_ms - 2 * slack_ms


@pytest.mark.parametrize("read", ["snapshot", "head"])
async def test_the_first_event_after_a_read_refreshes_every_key(
    redis_server: RedisServer, read: str
) -> None:
    """The history (created by the first event, not by the read) expires with ``meta``: that
    event does the full refresh, as it does on a party it creates itself."""
    ttl_ms = int(TTL * 1000)
    async with opened(redis_server) as (backend, client):
        if read == "snapshot":
            epoch = (await backend.snapshot("p1")).epoch
        else:
            epoch, _ = await backend.head("p1")
        join = await backend.connect(Binding("p1", "r1", "aria", "Aria"), "c1", T0, "t" * 32)
        assert join is not None and join.seq == 1
        assert (await backend.snapshot("p1")).epoch == epoch  # the read's history, continued
        found = await pttls(backend, client, "p1")
        assert {"meta", "history", "members", "names", "online", "presence"} <= set(found)
        assert all(ttl_ms - 5_000 < ms <= ttl_ms for ms in found.values()), found
