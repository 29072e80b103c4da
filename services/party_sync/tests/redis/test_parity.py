"""Votes across two Redis nodes, where "exactly once" has teeth: what one backend instance cannot
show, so ``test_differential.py`` (the same generated stories on ``MemoryBackend`` and
``RedisBackend``, every observable compared) cannot reach it."""

from __future__ import annotations

import asyncio
import time

import pytest
from party_sync.backends.base import BackendSettings
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.core.binding import Binding
from party_sync.core.votes import VoteSpec
from party_sync.protocol.errors import VoteConflict
from ps_testkit.redis_server import RedisServer

pytestmark = pytest.mark.redis

SETTINGS = BackendSettings(history_size=50, presence_ttl=10.0, action_timeout=2.0)
ARIA = Binding("p1", "r1", "aria", "Aria")
BORIN = Binding("p1", "r1", "borin", "Borin")
T0 = 1_800_000_000.0
TRACE = "0" * 32


async def test_a_vote_across_nodes_finishes_exactly_once(redis: RedisServer) -> None:
    n1 = RedisBackend(RedisOptions(redis.url), SETTINGS)
    n2 = RedisBackend(RedisOptions(redis.url), SETTINGS)
    await n1.start()
    await n2.start()
    try:
        now = time.time()
        await n1.connect(ARIA, "c1", now, TRACE)
        await n2.connect(BORIN, "c2", now, TRACE)
        spec = VoteSpec("v1", "Which way?", (("L", "Left"), ("R", "Right")), 0.5)
        await n1.start_vote("p1", spec, "r1", now, TRACE)
        with pytest.raises(VoteConflict):
            await n2.start_vote("p1", spec, "r1", now, TRACE)
        refusal, events = await n2.cast_vote("p1", "borin", "v1", "L", now, TRACE)
        assert refusal is None and [e.type for e in events] == ["vote.update"]
        later = now + 1
        assert await n1.due_votes(later) == [("p1", "v1")]
        finished = await asyncio.gather(
            *(b.finish_vote("p1", "v1", later) for b in (n1, n2, n1, n2))
        )
        winners = [e for e in finished if e is not None]
        assert len(winners) == 1 and winners[0].payload["reason"] == "timeout"
        assert winners[0].payload["winner"] == "L"
        assert await n2.due_votes(later) == []
        refusal, _ = await n1.cast_vote("p1", "aria", "v1", "R", later, TRACE)
        assert refusal is not None and refusal.value == "vote_closed"
    finally:
        await n1.close()
        await n2.close()
