"""Two blips in a row: a grace period is void once its character connected again, on both
backends and across nodes (docs/protocol.md, "Presence": "a reconnect within it produces neither a
``party.leave`` nor a new ``party.join``").

Found from outside (clients probe): the grace timer of a first blip still ran after the player
came back; a second blip 4.8 s later was still under way when it fired, so the party saw
``party.leave`` and ``party.join`` for a player away 0.4 s; and a player who closed 1.9 s after
a blip was announced gone 3.1 s later, not after the 5-s grace.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from party_sync.backends.base import Backend, BackendSettings
from party_sync.backends.memory import MemoryBackend
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.core.binding import Binding
from ps_testkit.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.timeout(30)]

ARIA = Binding("p1", "r1", "aria", "Aria")
BORIN = Binding("p1", "r1", "borin", "Borin")
GRACE = 5.0
TRACE = "t" * 32


@pytest.fixture(params=["memory", "redis"])
async def nodes(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[tuple[Backend, Backend]]:
    """Two nodes of one party store: on Redis two backends (the blips may land on either);
    the embedded backend is one process, so both are the same."""
    redis_server.command("FLUSHALL")
    settings = BackendSettings(presence_ttl=30.0)
    if request.param == "memory":
        memory = MemoryBackend(settings)
        await memory.start()
        try:
            yield memory, memory
        finally:
            await memory.close()
        return
    options = RedisOptions(redis_server.url, presence_grace=GRACE)
    first, second = RedisBackend(options, settings), RedisBackend(options, settings)
    await first.start()
    await second.start()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def online(node: Backend, now: float) -> set[str]:
    snapshot = await node.snapshot("p1", now)
    return {m["character_id"] for m in snapshot.members if m["online"]}


async def a_blip_then_back(a: Backend, b: Backend) -> float:
    """Borin and Aria play on ``a``; Aria's link drops at t0 (a's grace begins) and she is back
    0.2 s later on ``b``. Returns t0."""
    t0 = time.time()
    await a.connect(BORIN, "b1", t0, TRACE)
    await a.connect(ARIA, "c1", t0, TRACE)
    assert await a.disconnect(ARIA, "c1", t0)
    await b.connect(ARIA, "c2", t0 + 0.2, TRACE)
    return t0


async def test_a_second_blip_within_the_first_grace_is_no_leave(
    nodes: tuple[Backend, Backend],
) -> None:
    a, b = nodes
    t0 = await a_blip_then_back(a, b)  # blip 1: the grace of a (t0) began
    assert await b.disconnect(ARIA, "c2", t0 + 4.8)  # blip 2: the grace of b (t0 + 4.8)
    # a's grace is over while blip 2 is under way: void, the player came back after it began
    assert await a.settle(ARIA, t0 + GRACE, TRACE, since=t0) is None
    await b.connect(ARIA, "c3", t0 + 5.1, TRACE)
    assert await b.settle(ARIA, t0 + 4.8 + GRACE, TRACE, since=t0 + 4.8) is None  # connected
    assert await online(a, t0 + 10) == {"aria", "borin"}


async def test_a_close_after_a_blip_leaves_a_whole_grace_after_the_close(
    nodes: tuple[Backend, Backend],
) -> None:
    a, b = nodes
    t0 = await a_blip_then_back(a, b)
    assert await b.disconnect(ARIA, "c2", t0 + 1.9)  # the player closes the game
    assert await a.settle(ARIA, t0 + GRACE, TRACE, since=t0) is None  # 3.1 s after: too early
    leave = await b.settle(ARIA, t0 + 1.9 + GRACE, TRACE, since=t0 + 1.9)
    assert leave is not None
    assert leave.payload == {"character_id": "aria", "reason": "disconnected"}
    assert await online(b, t0 + 7) == {"borin"}


async def test_a_grace_with_no_blip_after_it_still_settles(
    nodes: tuple[Backend, Backend],
) -> None:
    a, b = nodes
    t0 = time.time()
    await a.connect(ARIA, "c1", t0, TRACE)
    assert await a.disconnect(ARIA, "c1", t0)
    leave = await a.settle(ARIA, t0 + GRACE, TRACE, since=t0)
    assert leave is not None and leave.payload["reason"] == "disconnected"
    assert await b.settle(ARIA, t0 + GRACE + 1, TRACE, since=t0) is None  # exactly once
