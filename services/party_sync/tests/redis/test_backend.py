"""The Redis backend in process, against a private redis-server: the delivery guarantees one by
one, with the failures injected deterministically (a lost publish, trimmed history, a silent
pub/sub socket, an outage, racing sweeps)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from party_sync.backends.base import BackendSettings
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.core.binding import Binding
from party_sync.core.transient import Outcome, Piece, piece
from party_sync.metrics import Metrics
from party_sync.protocol import codec
from party_sync.protocol.errors import BackendUnavailable
from ps_testkit.client import wait_until
from ps_testkit.listeners import Recorder
from ps_testkit.proxy import TcpProxy
from ps_testkit.redis_server import RedisServer
from redis.asyncio import Redis

pytestmark = pytest.mark.redis


@contextlib.asynccontextmanager
async def backend(url: str, **options: Any) -> AsyncIterator[RedisBackend]:
    ttl = options.pop("presence_ttl", 30.0)
    b = RedisBackend(
        RedisOptions(url, **options),
        BackendSettings(presence_ttl=ttl),
        metrics=Metrics("test"),
    )
    await b.start()
    try:
        yield b
    finally:
        await b.close()


def scene(n: int) -> dict[str, Any]:
    payload = {
        "scene_number": n,
        "scene_id": f"s{n}",
        "title": "T",
        "narration": "N",
        "options": [],
        "kind": "story",
    }
    return codec.envelope("scene.update", payload, ts=time.time())


def sample(b: RedisBackend, name: str, **labels: str) -> float:
    assert b.metrics is not None
    value = b.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def lose_a_publish(r: Redis, b: RedisBackend, party_id: str) -> None:
    """What a dropped pub/sub message looks like: sequenced and in history, never delivered."""
    meta, history = b.keys.party_keys(party_id)[:2]
    seq = await r.hincrby(meta, "seq", 1)
    await r.rpush(history, codec.with_seq(codec.encode(scene(100 + seq)), seq))


async def test_a_seq_jump_is_filled_from_history_before_later_events(redis: RedisServer) -> None:
    r = Redis.from_url(redis.url)
    async with backend(redis.url) as b:
        rec = Recorder()
        await b.subscribe("p1", rec)
        await b.publish("p1", scene(1), time.time())
        await lose_a_publish(r, b, "p1")
        await b.publish("p1", scene(3), time.time())
        await wait_until(lambda: rec.seqs == [1, 2, 3])
        assert rec.resyncs == 0
        assert sample(b, "party_sync_pubsub_gaps_total", outcome="repaired") == 1
    await r.aclose()


async def test_a_gap_history_cannot_fill_makes_clients_resync_never_skip(
    redis: RedisServer,
) -> None:
    r = Redis.from_url(redis.url)
    async with backend(redis.url) as b:
        rec = Recorder()
        await b.subscribe("p1", rec)
        await b.publish("p1", scene(1), time.time())
        await lose_a_publish(r, b, "p1")
        await r.delete(b.keys.party_keys("p1")[1])  # ... and the history is gone too
        await b.publish("p1", scene(3), time.time())
        await wait_until(lambda: rec.resyncs == 1)
        await b.publish("p1", scene(4), time.time())
        await wait_until(lambda: rec.seqs == [1, 4])  # 2 and 3 are in the clients' snapshots
        assert sample(b, "party_sync_pubsub_gaps_total", outcome="resync") == 1
    await r.aclose()


async def test_a_flush_is_a_new_epoch_resynced_then_delivered_from_its_start(
    redis: RedisServer,
) -> None:
    async with backend(redis.url) as b:
        rec = Recorder()
        await b.subscribe("p1", rec)
        first = await b.publish("p1", scene(1), time.time())
        old_epoch = (await b.snapshot("p1")).epoch
        redis.command("FLUSHALL")
        again = await b.publish("p1", scene(2), time.time())
        assert again.seq == first.seq == 1
        await wait_until(lambda: rec.resyncs == 1 and len(rec.events) == 2)
        assert (await b.snapshot("p1")).epoch != old_epoch


async def test_a_silent_pubsub_socket_is_caught_by_the_probe_and_replaced(
    redis: RedisServer,
) -> None:
    async with (
        TcpProxy(redis.port) as proxy,
        backend(proxy.url, probe_interval=0.2) as b1,
        backend(redis.url) as b2,
    ):
        rec = Recorder()
        await b1.subscribe("p1", rec)
        await b2.publish("p1", scene(1), time.time())
        await wait_until(lambda: rec.seqs == [1])
        assert proxy.freeze_subscribers() == 1
        await b2.publish("p1", scene(2), time.time())  # lost in the silent socket
        await wait_until(lambda: rec.seqs == [1, 2])  # probe → new connection → repair
        assert sample(b1, "party_sync_redis_reconnects_total", cause="probe") == 1
        assert sample(b1, "party_sync_pubsub_gaps_total", outcome="repaired") == 1
        # the new connection's probes come back: their round trip is the pub/sub lag metric
        await wait_until(lambda: sample(b1, "party_sync_pubsub_lag_seconds_count") >= 1)


async def test_one_subscription_per_party_and_node_dropped_with_the_last_listener(
    redis: RedisServer,
) -> None:
    r = Redis.from_url(redis.url)

    async def subscribers() -> int:
        return int((await r.pubsub_numsub("party:p1"))[0][1])

    async with backend(redis.url) as b:
        first, second = Recorder(), Recorder()
        s1 = await b.subscribe("p1", first)
        assert await subscribers() == 1  # subscribe returned: Redis has confirmed it
        s2 = await b.subscribe("p1", second)
        assert await subscribers() == 1
        await s1.close()
        assert await subscribers() == 1
        await b.send_direct("p1", "aria", b'{"type":"system.error"}')
        await wait_until(lambda: second.directs == [("aria", b'{"type":"system.error"}')])
        await s2.close()
        await b.bus.add("sync-point", lambda _: None)  # orders after the UNSUBSCRIBE
        assert await subscribers() == 0
    await r.aclose()


async def test_redis_down_is_backend_unavailable_and_not_ready_until_it_returns(
    redis: RedisServer,
) -> None:
    async with backend(redis.url) as b:
        assert await b.ready()
        redis.stop()
        with pytest.raises(BackendUnavailable):
            await b.publish("p1", scene(1), time.time())
        with pytest.raises(BackendUnavailable):
            await b.begin_action("p1", "aria", "a1", time.time())
        with pytest.raises(BackendUnavailable):
            await b.subscribe("p2", Recorder())
        assert not await b.ready()
        redis.start()
        async with asyncio.timeout(10):
            while not await b.ready():  # noqa: ASYNC110 (the bus reconnects in its own time)
                await asyncio.sleep(0.02)
        assert (await b.publish("p1", scene(1), time.time())).seq == 1


async def test_racing_sweeps_announce_each_expired_character_exactly_once(
    redis: RedisServer,
) -> None:
    async with (
        backend(redis.url, presence_ttl=1.0) as b1,
        backend(redis.url, presence_ttl=1.0) as b2,
        backend(redis.url, presence_ttl=1.0) as b3,
    ):
        now = time.time()
        for i in range(20):
            await b1.connect(Binding(f"p{i}", "r", "aria", "Aria"), f"c{i}", now, "t" * 32)
        later = now + 5
        swept = await asyncio.gather(b1.expire(later), b2.expire(later), b3.expire(later))
        leaves = [e for events in swept for e in events]
        assert sorted(e.party_id for e in leaves) == sorted(f"p{i}" for i in range(20))
        assert {e.payload["reason"] for e in leaves} == {"expired"}
        assert await b2.expire(later + 5) == []


async def test_a_node_dying_in_the_grace_period_still_gets_its_player_out(
    redis: RedisServer,
) -> None:
    async with (
        backend(redis.url, presence_ttl=1.0, presence_grace=2.0) as b1,
        backend(redis.url, presence_ttl=1.0, presence_grace=2.0) as b2,
    ):
        aria = Binding("p1", "r", "aria", "Aria")
        now = time.time()
        await b1.connect(aria, "c1", now, "t" * 32)
        assert await b1.disconnect(aria, "c1", now)  # last connection; b1 "dies" before settling
        assert await b2.expire(now + 2.5) == []  # within grace + ttl: the owner may still settle
        (leave,) = await b2.expire(now + 3.5)
        assert leave.payload == {"character_id": "aria", "reason": "expired"}
        assert await b1.settle(aria, now + 4, "t" * 32) is None  # exactly once


async def test_a_party_connected_past_its_runs_list_ttl_stays_in_the_run(
    redis: RedisServer,
) -> None:
    """``{run:<id>}:parties`` got ``idle_party_ttl`` at a connect and was renewed by nothing
    else: a party whose members stayed connected longer (an hour by default) left its run's list
    while it played on, and the run's events (``POST /api/v1/runs/{id}/events``) stopped
    reaching it (leak probe). Each presence refresh renews it, as the party's own keys are."""
    async with backend(redis.url) as b:
        aria = Binding("p1", "r1", "aria", "Aria")
        now = time.time()
        await b.connect(aria, "c1", now, "t" * 32)
        key = b.keys.run_parties("r1")
        r = Redis.from_url(redis.url)
        try:
            await r.pexpire(key, 50)  # (as if most of idle_party_ttl had passed)
            await b.refresh([(aria, "c1")], now + 10)
            assert await r.pttl(key) > 3_000_000  # renewed to idle_party_ttl (an hour)
            await r.delete(key)  # (as if it had expired before this refresh)
            await b.refresh([(aria, "c1")], now + 20)
        finally:
            await r.aclose()
        assert await b.run_parties("r1") == ["p1"]


async def test_party_keys_always_expire_and_meta_expires_first(redis: RedisServer) -> None:
    from party_sync.backends.keys import PARTY_KEYS

    r = Redis.from_url(redis.url)
    async with backend(redis.url) as b:
        ttl_ms, slack_ms = int(b.settings.idle_party_ttl * 1000), 60_000
        keys = dict(zip(PARTY_KEYS, b.keys.party_keys("ttl"), strict=True))
        now = time.time()
        await b.connect(Binding("ttl", "r", "aria", "Aria"), "c1", now, "t" * 32)
        await b.publish("ttl", scene(1), now)

        async def ttls() -> dict[str, int]:
            found = {name: await r.pttl(key) for name, key in keys.items()}
            return {name: ms for name, ms in found.items() if ms != -2}  # -2: no such key

        # Between full refreshes (meta recent), an event gives the keys it writes meta's own
        # remaining time, and leaves meta alone; a key it re-created gets an expiry too.
        for key in keys.values():  # as if slack/2 had passed since the last full refresh
            await r.pexpire(key, ttl_ms - slack_ms // 2)
        await r.delete(keys["state"])
        await b.publish("ttl", scene(2), now)
        found = await ttls()
        assert {"meta", "history", "state", "members", "names", "online"} <= set(found)
        assert all(ms > 0 for ms in found.values()), found  # nothing without an expiry
        assert found["meta"] <= ttl_ms - slack_ms // 2  # not refreshed
        assert abs(found["state"] - found["meta"]) <= 50  # they expire together
        assert all(ms <= found["meta"] + 50 for ms in found.values())  # nothing outlives meta

        # A write to a key that existed leaves its expiry alone (_lib.lua fold(): no PEXPIRE for
        # a field that was there), and it still expires with meta; a new field of an existing
        # key, or a key made again, gets meta's time as before.
        await r.pexpire(keys["state"], found["meta"] - 1_000)  # as if its last PEXPIRE ran late
        await b.publish("ttl", scene(2), now)
        kept = await ttls()
        assert found["meta"] - 1_100 <= kept["state"] <= found["meta"] - 1_000 + 50, kept
        combat = {"active": True, "round": 1, "combatants": []}
        await b.publish("ttl", codec.envelope("combat.update", combat, ts=now), now)
        found = await ttls()  # 'combat' is a new field: the key is given meta's time again
        assert abs(found["state"] - found["meta"]) <= 50, found
        await r.delete(keys["state"])
        await b.publish("ttl", scene(2), now)
        found = await ttls()
        assert abs(found["state"] - found["meta"]) <= 50

        # A character's last connection goes (the presence key is deleted with its last entry),
        # then comes back: the key it re-creates gets an expiry.
        await b.disconnect(Binding("ttl", "r", "aria", "Aria"), "c1", now)
        assert "presence" not in await ttls()
        await b.settle(Binding("ttl", "r", "aria", "Aria"), now + 10, "t" * 32)
        await b.connect(Binding("ttl", "r", "aria", "Aria"), "c2", now + 10, "t" * 32)
        found = await ttls()
        assert 0 < found["presence"] <= found["meta"] + 50, found

        # meta run down by more than the slack: the next event refreshes every key.
        await r.pexpire(keys["meta"], ttl_ms - 2 * slack_ms)
        await r.pexpire(keys["members"], ttl_ms - 2 * slack_ms)
        await b.publish("ttl", scene(3), now)
        found = await ttls()
        assert all(ms > ttl_ms - 5_000 for ms in found.values()), found

        # meta gone (expired first): the party starts a new history, nothing stale survives.
        epoch = (await b.snapshot("ttl")).epoch
        await r.delete(keys["meta"])
        snapshot = await b.snapshot("ttl")
        assert snapshot.epoch != epoch and snapshot.members == [] and snapshot.scene is None
    await r.aclose()


async def test_a_connect_redis_runs_too_late_registers_nothing(redis: RedisServer) -> None:
    """As begin_action: a connect that Redis runs more than half the command timeout after the
    node sent it (a stall; the handshake has been refused by then) registers no connection and
    publishes no party.join; on time, the same call registers it."""
    async with backend(redis.url, command_timeout=2.0) as b:
        aria = Binding("p1", "r", "aria", "Aria")
        now = time.time()
        with pytest.raises(BackendUnavailable, match="too late"):
            await b.presence.connect(aria, "c1", now, "t" * 32, sent=time.time() - 5, stale=1.0)
        snapshot = await b.snapshot("p1")
        assert [m for m in snapshot.members if m["character_id"] == "aria"] == []
        assert snapshot.seq == 0  # nothing was published
        join = await b.connect(aria, "c1", now, "t" * 32)  # on time (the node's own clock)
        assert join is not None and join.type == "party.join"
        snapshot = await b.snapshot("p1")
        assert [m["online"] for m in snapshot.members if m["character_id"] == "aria"] == [True]


async def test_a_pubsub_outage_is_one_warning_however_many_attempts_fail(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The pub/sub connection retries until Redis is back (every second at most); an operator
    reads one WARNING when it goes and one INFO when it is back, not one line per attempt."""
    async with TcpProxy(redis.port) as proxy, backend(proxy.url) as b:
        rec = Recorder()
        await b.subscribe("p1", rec)
        with caplog.at_level(logging.DEBUG, logger="party_sync.backends.redis_bus"):
            proxy.refusing = True
            proxy.cut()
            await wait_until(lambda: proxy.refused >= 4, timeout=20)  # attempts that failed
            proxy.refusing = False
            await wait_until(
                lambda: sample(b, "party_sync_redis_reconnects_total", cause="error") == 1
            )
        bus = [r for r in caplog.records if r.name == "party_sync.backends.redis_bus"]
        warnings = [r for r in bus if r.levelno == logging.WARNING]
        assert len(warnings) <= 2, [r.getMessage() for r in warnings]  # the loss, the first try
        assert sum("unavailable" in r.getMessage() for r in warnings) == 1
        assert [r.getMessage() for r in bus if r.levelno == logging.INFO] == [
            "redis pub/sub reconnected"
        ]


async def test_a_pubsub_outage_whose_cause_changes_is_told_again(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis variants re-check: a restart refused connections, then refused the password, and
    the second cause was told only at DEBUG. One WARNING per kind of failure, not per try."""
    password = "a-new-password-0123"
    async with TcpProxy(redis.port) as proxy, backend(proxy.url) as b:
        await b.subscribe("p1", Recorder())
        try:
            with caplog.at_level(logging.DEBUG, logger="party_sync.backends.redis_bus"):
                proxy.refusing = True
                proxy.cut()
                await wait_until(lambda: proxy.refused >= 2, timeout=20)
                redis.command("CONFIG", "SET", "requirepass", password)
                proxy.refusing = False
                await wait_until(
                    lambda: any("AuthenticationError" in r.getMessage() for r in caplog.records),
                    timeout=20,
                )
        finally:
            with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as sock:
                sock.sendall(f'AUTH {password}\r\nCONFIG SET requirepass ""\r\n'.encode())
                sock.recv(64)
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.name == "party_sync.backends.redis_bus" and r.levelno == logging.WARNING
        ]
        unavailable = [w for w in warnings if "unavailable" in w]
        assert len(unavailable) == 2, warnings  # refused, then the password: each once
        assert "AuthenticationError" in unavailable[1] and password not in " ".join(warnings)


async def test_a_narration_call_redis_runs_too_late_changes_nothing(redis: RedisServer) -> None:
    """A narrate (or close_narration) call that Redis runs long after the node sent it (a stall
    or a network black hole) is refused: taken, its stale time became the hash's last write and
    the next call forgot the whole narration record, the live stream with it (its next piece a
    'gap', the hello without it, never closed)."""
    async with backend(redis.url, command_timeout=2.0) as b:
        now = time.time()

        def live(index: int, at: float) -> Piece:
            return piece(
                "live", index, f"p{index} ", done=False, action_id=None, trace_id=None, now=at
            )

        assert await b.narrate("n1", [live(0, now)], now) == [Outcome.TAKEN]
        late = now - 61.0  # sent (and stamped) 61 s ago: Redis runs it only now
        offset = b._clock_offset
        b._clock_offset = offset - 61.0
        try:
            stale = piece("other", 0, "x", done=False, action_id=None, trace_id=None, now=late)
            with pytest.raises(BackendUnavailable, match="too late"):
                await b.narrate("n1", [stale], late)
            with pytest.raises(BackendUnavailable, match="too late"):
                await b.close_narration("n1", "live", late + 60.0, "t" * 32)
        finally:
            b._clock_offset = offset
        assert await b.narrate("n1", [live(1, now + 1)], now + 1) == [Outcome.TAKEN]
        snapshot = await b.snapshot("n1")
        assert [s["stream_id"] for s in snapshot.narration] == ["live"]


@contextlib.asynccontextmanager
async def half_expired_index(
    url: str, prefix: str
) -> AsyncIterator[tuple[RedisBackend, Any, Redis, list[str]]]:
    """A backend whose heartbeat indexed ten parties (``<prefix>00`` … ``09``), the even ones
    since expired (their ``meta`` deleted); the heartbeat's node, a plain client, the parties.
    The sweep looks at 4 index entries a batch."""
    from party_sync.backends.base import NodeInfo

    parties = [f"{prefix}{n:02d}" for n in range(10)]
    async with backend(url) as b:
        now = time.time()
        for party in parties:
            await b.publish(party, scene(1), now)
        node = NodeInfo(b.node_id, "test", 0, now, now)
        await b.admin.heartbeat(node, parties, 30.0)
        r = Redis.from_url(url)
        try:
            assert await r.zcard(b.keys.party_index()) == 10
            for party in parties[::2]:  # five expire
                await r.delete(b.keys.party_keys(party).meta)
            yield b, node, r, parties
        finally:
            await r.aclose()


async def indexed(b: RedisBackend, r: Redis) -> list[str]:
    members: Any = await r.zrange(b.keys.party_index(), 0, -1)
    return sorted(p.decode() for p in members)


async def test_the_heartbeats_drop_expired_parties_from_the_index_without_any_listing(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``party-index`` has no TTL (it is every node's): a party whose state expired was dropped
    only when an operator's listing met it, so with no listing it held every party ever served
    (a soak: 332 dead parties after every key had expired). Each heartbeat now checks the next
    few entries, round and round."""
    from party_sync.backends import redis_admin

    monkeypatch.setattr(redis_admin, "INDEX_SWEEP", 4)
    async with half_expired_index(redis.url, "ix") as (b, node, r, parties):
        # Every other heartbeat sweeps from the cursor, the others from a random entry: six
        # heartbeats are three from the cursor, 3 × 4 entries, once round the index whatever
        # the random ones did (three heartbeats were one or two from the cursor: ix00 was left
        # once, when the random starts missed it)
        for _ in range(6):
            await b.admin.heartbeat(node, [], 30.0)
        assert await indexed(b, r) == parties[1::2]


async def test_a_sweep_whose_batch_ends_on_the_last_entry_goes_round_to_the_start(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that ended exactly on the index's last entry was followed by an empty one, and
    the sweep stopped there instead of going round to the start: the expired entries before
    its start waited for later heartbeats (the test above failed once so, 2 of 5 left)."""
    from party_sync.backends import redis_admin

    monkeypatch.setattr(redis_admin, "INDEX_SWEEP", 4)
    async with half_expired_index(redis.url, "iy") as (b, node, r, parties):

        async def from_iy06(key: str) -> bytes:
            return b"iy06"  # a batch from there ends on iy09, the last entry

        admin: Any = b.admin
        monkeypatch.setattr(admin._client, "zrandmember", from_iy06)
        admin._sweeps = 1  # the next heartbeat's sweep starts at a random entry
        await b.admin.heartbeat(node, [], 30.0)
        assert await indexed(b, r) == parties[1::2]


async def test_the_index_sweep_keeps_up_with_parties_that_come_and_go_fast(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hygiene probes: under churn (20–50 new parties a second) a heartbeat's 64 entries from a
    cursor did not keep up: 3,800 entries for 2,800 live parties; and with ids that grow
    (``p-1``, ``p-10``, ``p-100``, ...) each new one landed just ahead of the cursor, which
    never reached the expired ones: 10,000 entries for 2,400 live, rising. Each heartbeat now
    starts at a random entry and goes on while a quarter of a batch is gone."""
    from party_sync.backends import redis_admin
    from party_sync.backends.base import NodeInfo

    monkeypatch.setattr(redis_admin, "INDEX_SWEEP", 4)
    gone = [f"p-{n}" for n in (1, 10, 100, 1000, 10000)] + [f"q-{n:02d}" for n in range(25)]
    async with backend(redis.url) as b:
        now = time.time()
        await b.publish("p-2", scene(1), now)  # live, among the expired ones
        node = NodeInfo(b.node_id, "test", 0, now, now)
        await b.admin.heartbeat(node, ["p-2", *gone], 30.0)  # 31 entries, 30 never had state
        r = Redis.from_url(redis.url)
        try:
            members: Any = await r.zrange(b.keys.party_index(), 0, -1)
        finally:
            await r.aclose()
    # wherever it started, it went on (round the end) until a batch held no more expired ones
    assert [m.decode() for m in members] == ["p-2"]


async def test_a_short_live_index_is_read_once_a_heartbeat(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index shorter than a batch with every party live: each heartbeat read it 16 times
    (INDEX_SWEEP_ROUNDS) with an EXISTS per party each time, since a batch that reached the end
    went round to the start whatever it found (docs probe). One batch, nothing gone: done."""
    from party_sync.backends.base import NodeInfo

    async with backend(redis.url) as b:
        now = time.time()
        parties = ["live-1", "live-2", "live-3"]
        for party in parties:
            await b.publish(party, scene(1), now)
        node = NodeInfo(b.node_id, "test", 0, now, now)
        await b.admin.heartbeat(node, parties, 30.0)
        admin: Any = b.admin
        reads = 0
        real = admin._client.zrangebylex

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal reads
            reads += 1
            return await real(*args, **kwargs)

        monkeypatch.setattr(admin._client, "zrangebylex", counted)
        for _ in range(2):  # one sweep from the cursor, one from a random entry
            await b.admin.heartbeat(node, [], 30.0)
        assert reads == 2


def test_a_clock_offset_is_written_to_a_tenth_with_no_sign_on_a_zero() -> None:
    """A fresh-clone run failed on "(it was -0.0s)": a first offset of a few negative
    milliseconds, written with its sign."""
    from party_sync.backends.redis_backend import _tenths

    assert [_tenths(x) for x in (-0.04, 0.04, -0.0, -6.0, 5.96)] == [
        "0.0",
        "0.0",
        "0.0",
        "-6.0",
        "6.0",
    ]


async def test_the_backend_keeps_time_by_redis_s_clock(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Clock skew probe: a stream worker 6 s ahead of the nodes (action timeout 4 s) claimed
    every action past its deadline (the deadline was made on the node's clock, the claim read
    on the worker's): each was refused action_timeout in 10 ms. The nodes and the workers keep
    time by Redis's clock (``backend.clock``, which the gateway and ``engine-worker`` use)."""
    from party_sync.backends import redis_backend

    real = time.time
    caplog.set_level(logging.WARNING, "party_sync.backends.redis_backend")
    monkeypatch.setattr(redis_backend, "CLOCK_EVERY", 0.05)
    async with backend(redis.url) as b:
        assert abs(b.clock() - real()) < 0.5
        # stepped 6 s ahead after start, with no traffic at all (it was corrected only when
        # actions or connections came, never in an engine worker: clock skew re-check)
        monkeypatch.setattr(time, "time", lambda: real() + 6.0)
        await wait_until(lambda: abs(b.clock() - real()) < 0.5, timeout=5)
    assert any(
        "minus this process's: -6.0s (it was 0.0s)" in r.getMessage() for r in caplog.records
    )


async def test_a_slow_first_measure_of_the_clock_is_made_again_soon(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lease probe: a worker whose first TIME took over 0.5 s (a slow link at start) dropped
    it and measured again only ``CLOCK_EVERY`` (30 s) later, on its own clock meanwhile (5 s
    off: live narrations cut); re-check: with TIME slow for seconds, a second later was not
    soon enough either. A slow answer that says the clock is off by more than its own error is
    taken until a quick one comes, and measured again a second later."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 6.0)  # this machine: 6 s ahead
    b = RedisBackend(RedisOptions(redis.url), BackendSettings())
    slow = [1_000]  # every answer comes late

    async def late_time() -> Any:
        answer = await original()
        if slow[0]:
            slow[0] -= 1
            await asyncio.sleep(0.6)
        return answer

    original = b.client.time
    b.client.time = late_time  # type: ignore[method-assign,assignment]
    await b.start()
    try:
        await wait_until(lambda: abs(b.clock() - real()) < 0.5, timeout=5)
    finally:
        await b.close()


async def test_a_time_refused_while_running_is_one_error_naming_the_grant(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Docs probe: a user without +time kept each process on its own clock with no word (the
    start refuses such a user now; this is one whose +time is taken away later): one ERROR,
    however often it is refused, saying what fails (the scripts read TIME too: every
    handshake and action, re-check) and what to grant."""
    from party_sync.backends import redis_backend

    caplog.set_level(logging.ERROR, "party_sync.backends.redis_backend")
    monkeypatch.setattr(redis_backend, "CLOCK_EVERY", 0.05)
    redis.command("ACL", "SETUSER", "clocky", "on", ">pw-0123456789", "~*", "&*", "+@all")
    try:
        async with backend(f"redis://clocky:pw-0123456789@127.0.0.1:{redis.port}/0"):
            redis.command("ACL", "SETUSER", "clocky", "-time")

            def refused() -> list[str]:
                return [r.getMessage() for r in caplog.records if "refuses TIME" in r.getMessage()]

            await wait_until(lambda: bool(refused()), timeout=5)
            await asyncio.sleep(0.3)  # several more refusals (CLOCK_EVERY 0.05 s): no more words
    finally:
        redis.command("ACL", "DELUSER", "clocky")
    assert len(refused()) == 1 and "give the user +time" in refused()[0]
    assert "handshakes and actions fail" in refused()[0]


async def test_a_cluster_down_reply_to_time_is_an_outage_not_a_refusal(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Re-check probe: while a Cluster master was down, ``TIME`` got ``CLUSTERDOWN`` and the node
    logged "Redis refuses TIME ... give the user +time": an ACL to fix, for an outage. Such a
    reply is Redis away (measured again a second later), not refused."""
    from redis.exceptions import ClusterDownError

    caplog.set_level(logging.ERROR, "party_sync.backends.redis_backend")
    async with backend(redis.url) as b:

        async def down() -> Any:
            raise ClusterDownError("The cluster is down")

        b.client.time = down  # type: ignore[method-assign,assignment]
        await b._measure_clock()
        assert not b._clock_refused
        assert b._clock_due - time.monotonic() <= 1.0
    assert not [r for r in caplog.records if "refuses TIME" in r.getMessage()]


@pytest.mark.parametrize("how", ["fails", "cancelled"])
async def test_a_close_whose_first_step_fails_still_takes_every_step(
    redis: RedisServer, how: str
) -> None:
    """Review finding: only the client's close was sure to run; a first step that failed (or a
    close cancelled there) left the backend's tasks running (a Cluster node's count of its
    masters kept opening connections to every master after the client was closed)."""
    b = RedisBackend(RedisOptions(redis.url), BackendSettings(), metrics=Metrics("test"))
    await b.start()
    tasks = list(b._tasks)
    assert tasks

    close_bus = b.bus.close

    async def broken() -> None:
        await close_bus()  # (closed all the same: nothing of it left for a later collection)
        if how == "cancelled":
            raise asyncio.CancelledError
        raise RuntimeError("the bus could not close")

    b.bus.close = broken  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError if how == "cancelled" else RuntimeError):
        await b.close()
    assert all(task.done() for task in tasks)
    with pytest.raises(Exception, match="closed"):
        await b.client.ping()


async def test_the_pubsub_connection_survives_an_error_that_is_not_redis_s(
    redis: RedisServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers probe's class: a client library's own failure in a failover (an AttributeError
    about a torn-down writer) is no ``RedisError``; the pub/sub connection's loop ended on one,
    and the node never heard a party's events again. It is logged (ERROR, with its traceback)
    and the connection made again, as after a Redis error."""
    from party_sync.backends.redis_wire import RawConnection

    original = RawConnection.connect
    failures = [0]

    async def flaky(self: RawConnection) -> None:
        if failures[0] < 2:
            failures[0] += 1
            raise AttributeError("'NoneType' object has no attribute 'writelines'")
        await original(self)

    async with TcpProxy(redis.port) as proxy, backend(proxy.url) as b:
        rec = Recorder()
        await b.subscribe("p1", rec)
        monkeypatch.setattr(RawConnection, "connect", flaky)
        with caplog.at_level(logging.DEBUG, logger="party_sync.backends.redis_bus"):
            proxy.cut()  # the connection is lost: made again, through two such errors
            await wait_until(lambda: failures[0] == 2, timeout=20)
            await wait_until(
                lambda: sample(b, "party_sync_redis_reconnects_total", cause="error") == 1,
                timeout=20,
            )
        await b.publish("p1", scene(1), time.time())  # heard again
        await wait_until(lambda: any(e.type == "scene.update" for e in rec.events), timeout=10)
        errors = [
            r
            for r in caplog.records
            if r.name == "party_sync.backends.redis_bus" and r.levelno == logging.ERROR
        ]
        assert len(errors) == 1 and errors[0].exc_info, [r.getMessage() for r in errors]


async def test_two_nodes_recounting_a_vote_at_once_tell_the_new_count_once(
    redis: RedisServer,
) -> None:
    """Re-check probe: with members on two nodes, every join and leave during a vote was
    followed by two identical ``vote.update``s: each node saw the event and recounted, both
    having read the count told before either told the new one. The count told is watched with
    the vote now: the second node's transaction sees the first's and tells nothing."""
    from party_sync.core.votes import VoteSpec

    spec = VoteSpec("v1", "Which way?", (("L", "Left"), ("R", "Right")), 300.0)
    async with backend(redis.url) as b1, backend(redis.url) as b2:
        rec = Recorder()
        await b1.subscribe("p1", rec)
        now = time.time()
        for name in ("aria", "borin"):
            await b1.connect(Binding("p1", "r1", name, name.title()), f"c-{name}", now, "t" * 32)
        await b1.start_vote("p1", spec, "r1", now, "t" * 32)
        await b1.cast_vote("p1", "aria", "v1", "L", now, "t" * 32)
        cara = Binding("p1", "r1", "cara", "Cara")
        for round_ in range(5):  # cara comes online, then leaves: each node recounts at once
            await b2.connect(cara, f"c-cara-{round_}", now, "t" * 32)
            await asyncio.gather(b1.finish_vote("p1", "v1", now), b2.finish_vote("p1", "v1", now))
            await b2.leave(cara, now, "t" * 32)
            await asyncio.gather(b1.finish_vote("p1", "v1", now), b2.finish_vote("p1", "v1", now))
        await b1.publish("p1", scene(1), time.time())  # after everything above, in order
        await wait_until(lambda: any(e.type == "scene.update" for e in rec.events), timeout=10)
        counts = [e.payload["eligible"] for e in rec.events if e.type == "vote.update"]
        assert counts == [2] + [3, 2] * 5, counts  # the ballot's, then one per join and leave


async def test_its_clock_is_the_deployments_only_once_redis_has_answered() -> None:
    """``clock_known`` (what the token check asks before it refuses a token for its times):
    False while Redis has not answered since the node started, whose clock is then only this
    machine's; True once Redis is up and its clock read (clock re-probe: a node started during
    an outage refused fresh tokens for good by its own clock, 2 min off)."""
    server = RedisServer()  # not started: Redis is down as the node starts
    try:
        async with backend(server.url, command_timeout=0.5) as b:
            assert not b.clock_known()
            server.start()
            await wait_until(b.clock_known, timeout=20)
    finally:
        server.stop()
