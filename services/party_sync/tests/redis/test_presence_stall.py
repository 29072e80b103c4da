"""Presence tells the truth after a Redis stall (docs/redis.md, "Guarantees").

A stall longer than about 2/3 of ``presence_ttl`` lets the sweep announce ``party.leave`` (expired)
for players whose connections never closed. Their node's next refresh must announce them again
(``party.join``), atomically with re-adding their entries; a player who stayed online must get no
join; after Redis restarted empty that join opens a new epoch at seq 1. The first tests drive the
backend with explicit times; the last one pauses a real redis-server (SIGSTOP/SIGCONT) under two
real nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import pytest
from party_sync.backends.base import BackendSettings
from party_sync.backends.keys import DEFAULT_PREFIX, PARTY_KEYS, KeySpace
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.core.binding import Binding
from party_sync.core.events import Event
from party_sync.metrics import Metrics
from party_sync.protocol.errors import BackendUnavailable
from ps_testkit import listeners
from ps_testkit.client import Client, wait_until
from ps_testkit.cluster import Cluster, assert_ordered, wait_async, wait_ready
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import Running
from redis.asyncio import Redis

pytestmark = pytest.mark.redis

TTL = 1.5
TRACE = "t" * 32
ARIA = Binding("p1", "r1", "aria", "Aria")
BORIN = Binding("p1", "r1", "borin", "Borin")


class Recorder(listeners.Recorder):
    """What the party's stream gave, and its presence events."""

    def presence(self) -> list[tuple[str, str, str]]:
        return [
            (e.type, e.payload["character_id"], e.payload.get("reason", ""))
            for e in self.events
            if e.type in ("party.join", "party.leave")
        ]


@contextlib.asynccontextmanager
async def backend(url: str, **options: Any) -> AsyncIterator[RedisBackend]:
    b = RedisBackend(
        RedisOptions(url, **options), BackendSettings(presence_ttl=TTL), metrics=Metrics("test")
    )
    await b.start()
    try:
        yield b
    finally:
        await b.close()


def online(members: list[dict[str, Any]]) -> dict[str, bool]:
    return {m["character_id"]: m["online"] for m in members}


def redis_pid(redis: RedisServer) -> int:
    info = redis.command("INFO", "server").decode()
    return int(next(line for line in info.splitlines() if line.startswith("process_id:"))[11:])


@contextlib.contextmanager
def paused(redis: RedisServer) -> Iterator[None]:
    """SIGSTOP the redis-server (a stall: sockets stay open, nothing answers), SIGCONT after."""
    pid = redis_pid(redis)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_an_expired_player_whose_connection_is_live_is_announced_again(
    redis: RedisServer,
) -> None:
    async with backend(redis.url) as b1, backend(redis.url) as b2:
        rec = Recorder()
        await b2.subscribe("p1", rec)
        t0 = time.time()
        await b1.connect(ARIA, "a1", t0, TRACE)  # aria's connection is on node 1
        await b2.connect(BORIN, "b1", t0, TRACE)  # borin's on node 2
        assert await b1.refresh([(ARIA, "a1")], t0) == []  # online: nothing to announce

        # Node 1 stalls (its refresh never lands) past the ttl; node 2 refreshes and sweeps.
        after = t0 + TTL + 0.5
        assert await b2.refresh([(BORIN, "b1")], after) == []  # stayed online: no join
        (leave,) = await b2.expire(after)
        assert leave.payload == {"character_id": "aria", "reason": "expired"}

        # Node 1 is back: its refresh re-adds aria's entry and announces her again.
        (join,) = await b1.refresh([(ARIA, "a1")], after + 0.1)
        assert join.type == "party.join" and join.seq == leave.seq + 1
        assert join.payload == {"character_id": "aria", "display_name": "Aria"}
        assert await b1.refresh([(ARIA, "a1")], after + 0.2) == []  # once
        assert await b2.refresh([(BORIN, "b1")], after + 0.2) == []
        snap = await b2.snapshot("p1")
        assert online(snap.members) == {"aria": True, "borin": True}
        assert snap.seq == join.seq
        await wait_until(lambda: len(rec.events) == join.seq)
        assert rec.presence() == [
            ("party.join", "aria", ""),
            ("party.join", "borin", ""),
            ("party.leave", "aria", "expired"),
            ("party.join", "aria", ""),
        ]
        assert [e.seq for e in rec.events] == [1, 2, 3, 4] and rec.resyncs == 0


async def test_two_tabs_after_a_stall_are_one_join_and_a_late_heartbeat_never_shortens(
    redis: RedisServer,
) -> None:
    async with backend(redis.url) as b:
        t0 = time.time()
        await b.connect(ARIA, "a1", t0, TRACE)
        await b.connect(ARIA, "a2", t0, TRACE)
        await b.expire(t0 + TTL + 1)  # both tabs swept: aria leaves (expired)
        joins = await b.refresh([(ARIA, "a1"), (ARIA, "a2")], t0 + TTL + 1)
        assert [e.payload["character_id"] for e in joins] == ["aria"]
        # a heartbeat sent before a stall and carried out after a newer one changes nothing
        assert await b.refresh([(ARIA, "a1"), (ARIA, "a2")], t0) == []
        assert await b.expire(t0 + 2 * TTL + 0.5) == []  # still live from the newer refresh
        assert online((await b.snapshot("p1")).members) == {"aria": True}


async def test_a_player_who_left_on_purpose_is_not_brought_back_by_a_racing_refresh(
    redis: RedisServer,
) -> None:
    async with backend(redis.url) as b:
        t0 = time.time()
        await b.connect(ARIA, "a1", t0, TRACE)
        await b.connect(BORIN, "b1", t0, TRACE)
        left = await b.leave(ARIA, t0 + 0.1, TRACE)
        assert left is not None and left.payload["reason"] == "left"
        # the refresh of aria's closing tab was already on its way when the leave ran
        assert await b.refresh([(ARIA, "a1"), (BORIN, "b1")], t0 + 0.2) == []
        assert await b.expire(t0 + 0.3) == []  # the sweep keeps the tombstone until it is due
        assert await b.refresh([(ARIA, "a1")], t0 + 0.4) == []
        assert online((await b.snapshot("p1")).members) == {"borin": True}
        # coming back is a connect: a join, as always
        assert (await b.connect(ARIA, "a3", t0 + 0.5, TRACE)) is not None


async def test_after_redis_restarted_empty_the_refresh_opens_a_new_epoch_with_the_join(
    redis: RedisServer,
) -> None:
    async with backend(redis.url) as b:
        t0 = time.time()
        await b.connect(ARIA, "a1", t0, TRACE)
        await b.connect(BORIN, "b1", t0, TRACE)
        old_epoch = (await b.snapshot("p1")).epoch
        redis.restart()  # nothing kept: no META, no members, no run
        events: list[Event] = []
        async with asyncio.timeout(10):
            while not events:  # the client reconnects in its own time
                with contextlib.suppress(BackendUnavailable):
                    events = await b.refresh([(ARIA, "a1"), (BORIN, "b1")], time.time())
        assert [(e.seq, e.payload["character_id"]) for e in events] == [(1, "aria"), (2, "borin")]
        snap = await b.snapshot("p1")
        assert snap.epoch != old_epoch and snap.seq == 2
        assert online(snap.members) == {"aria": True, "borin": True}
        assert await b.party_run("p1") == "r1"  # votes and run-wide events find the party again
        assert await b.run_parties("r1") == ["p1"]


async def test_a_refresh_that_stalls_fails_and_leaves_nothing_wrong_behind(
    redis: RedisServer,
) -> None:
    async with backend(redis.url, command_timeout=0.3) as b1, backend(redis.url) as b2:
        t0 = time.time()
        await b1.connect(ARIA, "a1", t0, TRACE)
        await b2.connect(BORIN, "b1", t0, TRACE)
        with paused(redis), pytest.raises(BackendUnavailable):
            await b1.refresh([(ARIA, "a1")], t0 + 0.1)  # in Redis's socket buffer: runs later
        after = t0 + TTL + 0.5
        async with asyncio.timeout(10):
            while True:  # b2's pool may hold a connection broken by the pause: retried
                with contextlib.suppress(BackendUnavailable):
                    await b2.refresh([(BORIN, "b1")], after)
                    break
        (leave,) = await b2.expire(after)
        assert leave.payload["character_id"] == "aria"
        async with asyncio.timeout(10):
            while True:
                with contextlib.suppress(BackendUnavailable):
                    joins = await b1.refresh([(ARIA, "a1")], after + 0.1)
                    break
        assert [e.payload["character_id"] for e in joins] == ["aria"]
        assert online((await b2.snapshot("p1")).members) == {"aria": True, "borin": True}


# -- real nodes, a real pause ----------------------------------------------------------------


def presence_view(client: Client) -> dict[str, bool]:
    """Who is online, as one client's own stream says (its hello, then joins and leaves)."""
    view: dict[str, bool] = {}
    for m in client.received:
        if m["type"] == "system.hello":
            view = online(m["payload"]["members"])
        elif m["type"] == "party.join":
            view[m["payload"]["character_id"]] = True
        elif m["type"] == "party.leave":
            view[m["payload"]["character_id"]] = False
    return view


def presence_since(client: Client, start: int) -> list[tuple[str, str, str]]:
    return [
        (m["type"], m["payload"]["character_id"], m["payload"].get("reason", ""))
        for m in client.received[start:]
        if m["type"] in ("party.join", "party.leave")
    ]


async def assert_settled_and_truthful(
    cluster: Cluster, marks: dict[Client, int], resumed: float
) -> None:
    """After the fault: every connected player online in Redis and in every client's stream, and
    in each client's stream every player's presence events since ``marks`` are (leave expired,
    join) pairs: a join again for each expired leave, no spurious join. The first client of
    ``marks`` is aria's: her action marks the end of what is read."""
    # Settled: both connections' entries refreshed after the fault (no sweep can expire them now,
    # and any leave the sweeps announced came before that refresh or in the same script).
    keys = dict(zip(PARTY_KEYS, KeySpace(DEFAULT_PREFIX).party_keys("p1"), strict=True))
    r = Redis.from_url(cluster.redis.url, decode_responses=True)

    async def refreshed_since_resumed() -> bool:
        entries = cast(
            list[tuple[str, float]], await r.zrange(keys["presence"], 0, -1, withscores=True)
        )
        return len(entries) == 2 and all(score >= resumed + TTL for _, score in entries)

    try:
        await wait_async(refreshed_since_resumed, timeout=10)
        online_now = sorted(cast(set[str], await r.smembers(keys["online"])))
    finally:
        await r.aclose()
    assert online_now == ["aria", "borin"]  # the truth, in Redis

    # Read every client's stream up to a point after all that: an action's result (seq order).
    everyone = {"aria": True, "borin": True}
    actor = next(iter(marks))
    await actor.act("sync", "aria", "r1")
    for client, mark in marks.items():
        assert (await client.until("action.result", timeout=10))["payload"]["action_id"] == "sync"
        assert presence_view(client) == everyone
        seen = presence_since(client, mark)
        for character in everyone:
            mine = [(kind, reason) for kind, who, reason in seen if who == character]
            pairs = len(mine) // 2
            assert mine == [("party.leave", "expired"), ("party.join", "")] * pairs, mine


async def until_about(client: Client, type_: str, character: str) -> dict[str, Any]:
    """The next ``type_`` message about ``character`` (others, e.g. borin's, are skipped)."""
    async with asyncio.timeout(10):
        while True:
            message = await client.until(type_, timeout=10)
            if message["payload"]["character_id"] == character:
                return message


async def fresh_hello_and_close(node: Running, clients: list[Client]) -> None:
    """What a fresh hello shows (a third player's, so as not to change aria's or borin's)."""
    c, hello = await node.join("cara")
    assert online(hello["payload"]["members"]) == {"aria": True, "borin": True, "cara": True}
    for client in (*clients, c):
        assert_ordered(client)
        await client.close()


@pytest.mark.e2e
async def test_a_redis_pause_longer_than_the_ttl_leaves_every_connected_player_online(
    cluster: Cluster,
) -> None:
    ttl = str(TTL)
    async with (
        cluster.node("--presence-ttl", ttl) as n1,
        cluster.node("--presence-ttl", ttl) as n2,
    ):
        a, _ = await n1.join("aria")
        b, _ = await n2.join("borin")
        await a.until("party.join")
        marks = {a: len(a.received), b: len(b.received)}

        with paused(cluster.redis):
            stalled = time.monotonic()
            # The fault itself: Redis answers nothing for 2 x presence_ttl (no condition to
            # wait for: the point is that time passes while every node is stalled).
            await asyncio.sleep(2 * TTL)
        assert time.monotonic() - stalled >= 2 * TTL
        resumed = time.time()
        await wait_ready(n1)
        await wait_ready(n2)
        # Both connections stayed open: whatever the sweeps announced in the race that follows
        # (each node refreshes, any node sweeps), the end is the truth.
        await assert_settled_and_truthful(cluster, marks, resumed)
        await fresh_hello_and_close(n2, [a, b])


@pytest.mark.e2e
async def test_players_swept_while_their_node_was_stalled_are_announced_again(
    cluster: Cluster,
) -> None:
    """The same pause, but node 1 comes back later than Redis (stopped with it, resumed once
    node 2 has swept): aria's leave (expired) is certain, and so must be her join again."""
    ttl = str(TTL)
    async with (
        cluster.node("--presence-ttl", ttl) as n1,
        cluster.node("--presence-ttl", ttl) as n2,
    ):
        a, _ = await n1.join("aria")
        b, _ = await n2.join("borin")
        await a.until("party.join")
        marks = {a: len(a.received), b: len(b.received)}
        assert n1.process is not None
        with paused(cluster.redis):
            os.kill(n1.process.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(2 * TTL)  # the fault's length, as above
            except BaseException:
                os.kill(n1.process.pid, signal.SIGCONT)
                raise
        try:
            leave = await until_about(b, "party.leave", "aria")  # node 2 swept aria's entry
        finally:
            os.kill(n1.process.pid, signal.SIGCONT)
        resumed = time.time()
        assert leave["payload"] == {"character_id": "aria", "reason": "expired"}
        join = await until_about(b, "party.join", "aria")
        assert join["payload"] == {"character_id": "aria", "display_name": "Aria"}
        await assert_settled_and_truthful(cluster, marks, resumed)
        await fresh_hello_and_close(n2, [a, b])
