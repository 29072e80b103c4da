"""party_sync on a Redis Cluster (``--redis-cluster``): three masters with a replica each, started
by the test kit for the module (docs/redis.md, "Redis Cluster").

- one gateway node end to end: join, action, result, scene, resume; every party event is
  SPUBLISHed from its script (the masters ran no classic PUBLISH);
- parties spread over every shard, each delivered on its shard's subscription;
- two gateway nodes, a party with members on both, and a resume across nodes;
- the slot of a live party migrated while it plays (ASK, TRYAGAIN, then MOVED for the scripts;
  the subscription follows the slot): every event delivered once, in order, no resync;
- the master of a live party's slot SIGKILLed and its replica promoted while the party plays:
  the shard's fence gives the party a new epoch (the replica may have lost the newest writes),
  listeners resync, nothing is delivered out of order or twice within an epoch, and the node
  delivers again within ``FAILOVER_BOUND`` of the kill (measured, docs/redis.md).

The whole behavioural suite (``backend_kind``) runs on a cluster with ``make test-cluster``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from party_sync.backends import redis_connect
from party_sync.backends.base import BackendSettings
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.backends.redis_batch import ShardedBatcher
from party_sync.backends.redis_connect import RedisTarget
from party_sync.backends.redis_scripts import PARTY_SCRIPTS, _source, script_text
from party_sync.backends.redis_shard_bus import ShardedBus
from party_sync.core.events import Event
from party_sync.engine.interface import JoinNotice
from party_sync.engine.stream_link import StreamEngineLink
from party_sync.metrics import Metrics
from party_sync.protocol import codec
from party_sync.protocol.errors import BackendUnavailable
from ps_testkit import listeners, servers
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.redis_cluster import RedisCluster
from ps_testkit.servers import free_port, serve_in_process
from redis.asyncio import RedisCluster as AsyncRedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

#: Seconds from a master's SIGKILL to the first event delivered again on the promoted replica
#: (cluster-node-timeout 1 s in the kit; measured ~3 s, docs/redis.md).
FAILOVER_BOUND = 10.0


@pytest.fixture(scope="module")
def kit() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3, replicas=1) as running:
        yield running


@pytest.fixture
def on_cluster(kit: RedisCluster) -> Iterator[RedisCluster]:
    """Every master flushed; in-process servers run on the cluster."""
    for master in kit.masters():
        master.call("FLUSHALL")
    servers.redis_url_for_tests, servers.redis_cluster_for_tests = kit.url, True
    try:
        yield kit
    finally:
        servers.redis_url_for_tests, servers.redis_cluster_for_tests = None, False


class Recorder(listeners.Recorder):
    """What the party's stream gave, with each event's epoch at delivery."""

    def __init__(self, backend: RedisBackend, party_id: str) -> None:
        super().__init__()
        self.epochs: list[str] = []
        self._backend, self._party_id = backend, party_id

    def on_event(self, event: Event) -> None:
        stream = self._backend._streams[self._party_id]  # the epoch it is delivered in
        super().on_event(event)
        self.epochs.append(stream.epoch or "")


@contextlib.asynccontextmanager
async def node(url: str, **options: Any) -> AsyncIterator[RedisBackend]:
    b = RedisBackend(
        RedisOptions(url, cluster=True, **options),
        BackendSettings(presence_ttl=30.0),
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


def commandstat(kit: RedisCluster, command: str) -> int:
    """Calls of ``command`` on every master since the last CONFIG RESETSTAT (scripts' calls too)."""
    total = 0
    for master in kit.masters():
        stats = master.info("commandstats").get(f"cmdstat_{command}")
        if isinstance(stats, dict):
            total += int(stats["calls"])
    return total


def in_order_per_epoch(rec: Recorder) -> None:
    """Within each epoch: seqs from where it started, +1 each, none twice."""
    by_epoch: dict[str, list[int]] = {}
    for epoch, seq in zip(rec.epochs, rec.seqs, strict=True):
        by_epoch.setdefault(epoch, []).append(seq)
    for epoch, seqs in by_epoch.items():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (epoch, seqs)


class Player:
    """Publishes scene after scene into one party (as an engine would), retrying what Redis could
    not take (``BackendUnavailable``), until stopped."""

    def __init__(self, backend: RedisBackend, party_id: str) -> None:
        self.backend, self.party_id = backend, party_id
        self.published: list[Event] = []
        self.failures = 0
        self.slowest = 0.0  # seconds, the longest publish call (a migration makes it wait)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._play())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _play(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            began = time.monotonic()
            try:
                event = await self.backend.publish(self.party_id, scene(n), time.time())
            except BackendUnavailable:
                self.failures += 1
                await asyncio.sleep(0.02)  # Redis is away: pace the retries, not a sync
                continue
            self.slowest = max(self.slowest, time.monotonic() - began)
            self.published.append(event)
            await asyncio.sleep(0)  # let the subscriber's reader run between two events


def test_cluster_scripts_spublish_where_one_redis_scripts_publish() -> None:
    lib = _source("_lib")
    published = 0
    for name in PARTY_SCRIPTS:
        plain = script_text(lib, _source(name))
        sharded = script_text(lib, _source(name), sharded=True)
        assert "'SPUBLISH'" not in plain
        assert "'PUBLISH'" not in sharded
        assert sharded.count("'SPUBLISH'") == plain.count("'PUBLISH'")
        assert sharded.replace("'SPUBLISH'", "'PUBLISH'") == plain  # nothing else differs
        published += plain.count("'PUBLISH'")
    assert published > 0


async def test_one_node_join_act_result_resume_with_sharded_pubsub_only(
    on_cluster: RedisCluster,
) -> None:
    for master in on_cluster.masters():
        master.call("CONFIG", "RESETSTAT")
    engine = ScriptedEngine()
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        b, hello_b = await srv.join("borin")
        epoch, last = hello_b["payload"]["epoch"], hello_b["payload"]["seq"]
        await a.until("party.join")
        await a.act("act-1", "aria", "r1")
        result = await b.expect("action.result")
        assert result["payload"]["action_id"] == "act-1"
        assert (await b.expect("scene.update"))["seq"] == result["seq"] + 1
        await b.close()
        await a.act("act-2", "aria", "r1")
        # aria has not read act-1's answer yet: wait for act-2's, then its scene (a bare
        # until("scene.update") found act-1's, and borin resumed before act-2 was sequenced)
        while (await a.until("action.result"))["payload"]["action_id"] != "act-2":
            pass
        await a.until("scene.update")
        b, resumed = await srv.join("borin", epoch=epoch, last_seq=last)
        p = resumed["payload"]
        assert p["resumed"] is True and p["resumed_from"] == last
        replay = [await b.recv() for _ in range(p["seq"] - last)]
        assert [m["seq"] for m in replay] == list(range(last + 1, p["seq"] + 1))
        assert "act-2" in [m["payload"].get("action_id") for m in replay]
        await a.close()
        await b.close()
    assert commandstat(on_cluster, "spublish") > 0
    assert commandstat(on_cluster, "publish") == 0  # never broadcast to every node


async def test_parties_on_every_shard_are_each_delivered(on_cluster: RedisCluster) -> None:
    parties = [f"p{i}" for i in range(24)]
    async with node(on_cluster.url) as n1, node(on_cluster.url) as n2:
        # (the steady state this test is about: a node whose pub/sub is still connecting, on a
        # machine so loaded that no master answered its first PING, once resynced 3 parties
        # whose first events came as its subscriptions were made)
        await wait_until(lambda: n1.bus.connected and n2.bus.connected, timeout=30)
        recorders = {p: Recorder(n2, p) for p in parties}
        for p in parties:
            await n2.subscribe(p, recorders[p])
        for round_ in range(3):
            for p in parties:
                await n1.publish(p, scene(round_), time.time())
        await wait_until(lambda: all(r.seqs == [1, 2, 3] for r in recorders.values()))
        slots = {on_cluster.keyslot(f"party:{p}") for p in parties}
        owners = {on_cluster.slot_owner(s).port for s in slots}
        assert owners == {m.port for m in on_cluster.masters()}  # all three shards carry some
        assert isinstance(n2.bus, ShardedBus) and n2.bus.connected
        assert all(r.resyncs == 0 for r in recorders.values())


async def test_a_closed_node_stays_closed_when_called_late(on_cluster: RedisCluster) -> None:
    """A call after the node closed (a task still running at shutdown) raises ``ConnectionError``:
    redis-py's cluster client opened itself again at the next call after any ``aclose``, and the
    client left so was never closed ("Unclosed RedisCluster client" at a later garbage
    collection, which pytest turns into a failure). redis-py's own ``aclose`` inside a call
    (after ``CLUSTERDOWN``) still lets the next call open it again."""
    async with node(on_cluster.url) as n:
        await n.publish("p-late", scene(1), time.time())
        client = n.client
        assert isinstance(client, redis_connect.BoundedRedisCluster)
        token = redis_connect._IN_CALL.set(True)  # as redis-py closes it within a call
        try:
            await client.aclose()
        finally:
            redis_connect._IN_CALL.reset(token)
        await n.publish("p-late", scene(2), time.time())  # opened again
    with pytest.raises(RedisConnectionError, match="closed"):
        await client.get("party:{p-late}:meta")
    with pytest.raises(RedisConnectionError, match="closed"):
        await client.pipeline().get("party:{p-late}:meta").execute()
    with pytest.raises(BackendUnavailable):
        await n.publish("p-late", scene(3), time.time())
    assert client._initialize  # (redis-py's "not open": nothing to close, nothing to warn of)


async def test_a_cluster_client_whose_closer_is_cancelled_still_closes(
    on_cluster: RedisCluster,
) -> None:
    """An owner's close cancelled while it waits (a shutdown bounded in time; here: for the
    client's lock, as a call reading the slot map holds it) is carried to its end: cut short,
    it left the client open for good, to be reported unclosed at a garbage collection."""
    client = redis_connect.make_cluster_client(RedisTarget(on_cluster.url, cluster=True))
    await client.set("{p-close}:k", "v")
    lock = client._lock = client._lock or asyncio.Lock()
    async with lock:  # as a call holds it
        closing = asyncio.ensure_future(client.aclose())
        await asyncio.sleep(0)  # (it waits for the lock now)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert not client._initialize  # (still open: the lock is held)
    await wait_until(lambda: client._initialize)  # closed all the same
    with pytest.raises(RedisConnectionError, match="closed"):
        await client.get("{p-close}:k")


async def test_a_cluster_clients_close_cut_short_by_its_loops_end_leaves_nothing_open(
    on_cluster: RedisCluster,
) -> None:
    """The owner's close carried on in the background, but the event loop ended first (it
    cancels every task: a test's loop, a process's shutdown) while the close waited for the
    client's lock: the client stayed open with its sockets, "Unclosed RedisCluster client" at
    a later garbage collection (a CI run failed on it). Cut short, every socket is closed at
    once and the client counts as closed."""
    client = redis_connect.make_cluster_client(RedisTarget(on_cluster.url, cluster=True))
    assert isinstance(client, redis_connect.BoundedRedisCluster)
    await client.set("{p-cut}:k", "v")
    connections = [c for node in client.get_nodes() for c in node._connections]
    assert any(c.is_connected for c in connections)
    lock = client._lock = client._lock or asyncio.Lock()
    async with lock:  # as a call reading the slot map holds it
        owner = asyncio.ensure_future(client.aclose())
        await wait_until(lambda: client._closing is not None)
        closing = client._closing
        assert closing is not None
        closing.cancel()  # as the loop's end cancels every task
        with pytest.raises(asyncio.CancelledError):
            await owner
    assert client._initialize  # (redis-py's "not open": nothing to warn of)
    assert not any(c.is_connected for c in connections)
    with pytest.raises(RedisConnectionError, match="closed"):
        await client.get("{p-cut}:k")


async def test_a_slot_map_read_that_outlives_its_client_does_not_open_it_again(
    on_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background read of the slot map whose cancellation was lost (inside redis-py, a read
    cut short can end as a timeout: the loop went on) finished after its client's owner had
    closed it, and marked the client open again: "Unclosed RedisCluster client" at a later
    garbage collection (a CI run; tracked to an engine worker's client on a cluster with a dead
    shard). A read that is no longer the client's current one leaves it as it is."""
    client = redis_connect.make_cluster_client(RedisTarget(on_cluster.url, cluster=True))
    assert isinstance(client, redis_connect.BoundedRedisCluster)
    await client.set("{p-orphan}:k", "v")
    entered, finish = asyncio.Event(), asyncio.Event()
    real = redis_connect.read_slot_map

    async def slow_read(target: Any, wait: float = 1.0) -> None:
        entered.set()
        await finish.wait()
        await real(target, wait)

    monkeypatch.setattr(redis_connect, "read_slot_map", slow_read)
    client.refresh_slot_map()
    orphan = client._refreshing
    assert orphan is not None
    await wait_until(lambda: entered.is_set())
    client._refreshing = None  # as a close within a call leaves it when the cancel was lost
    await client.aclose()
    assert client._initialize
    finish.set()
    await asyncio.wait_for(orphan, 10)
    assert client._initialize  # still closed: nothing to warn of


async def test_a_node_whose_url_names_a_replica_joins_the_cluster(
    on_cluster: RedisCluster,
) -> None:
    """README: ``redis_url`` names *any* node. A failover makes the named node a replica (and a
    seed restarted after its shard failed over comes back as one): a node started then read
    the slot map from it and serves; it was refused ("is a replica") and never became ready."""
    replica = on_cluster.replicas_of(on_cluster.masters()[0])[0]
    host, port = replica.address
    async with node(f"redis://{host}:{port}/0") as n1, node(on_cluster.url) as n2:
        recorders = {p: Recorder(n2, p) for p in ("r0", "r1", "r2", "r3", "r4", "r5")}
        for p, rec in recorders.items():
            await n2.subscribe(p, rec)
        for p in recorders:
            await n1.publish(p, scene(1), time.time())
        await wait_until(lambda: all(r.seqs == [1] for r in recorders.values()))
        assert isinstance(n1.client, AsyncRedisCluster)
        # only the named node's own connection lets a replica through
        assert n1.client.connection_kwargs["redis_connect_func"].keywords == {
            "prefix": "party_sync"
        }


async def test_a_node_joins_through_another_seed_when_the_named_node_is_gone(
    on_cluster: RedisCluster,
) -> None:
    """``redis_cluster_nodes``: one node named is one node that can be gone (a host replaced);
    the others listed are tried in turn, and each may be a replica."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    replica = on_cluster.replicas_of(on_cluster.masters()[1])[0]
    async with node(dead, seeds=(replica.address,)) as n1, node(on_cluster.url) as n2:
        rec = Recorder(n2, "seeded")
        await n2.subscribe("seeded", rec)
        await n1.publish("seeded", scene(1), time.time())
        await wait_until(lambda: rec.seqs == [1])


async def test_two_nodes_one_party_members_on_both_and_resume_across(
    on_cluster: RedisCluster,
) -> None:
    engine = ScriptedEngine()
    async with (
        serve_in_process(engine=engine) as srv1,
        serve_in_process(engine=engine) as srv2,
    ):
        a, _ = await srv1.join("aria")
        b, hello_b = await srv2.join("borin")
        assert {m["character_id"] for m in hello_b["payload"]["members"]} == {"aria", "borin"}
        await a.until("party.join")
        await a.act("act-1", "aria", "r1", trace_id="trace-c-1")
        result = await b.expect("action.result")
        scene_b = await b.expect("scene.update")
        assert result["payload"]["action_id"] == "act-1"
        assert scene_b["trace_id"] == "trace-c-1" and scene_b["seq"] == result["seq"] + 1
        assert (await a.until("scene.update"))["seq"] == scene_b["seq"]
        epoch, last = hello_b["payload"]["epoch"], scene_b["seq"]
        await b.close()
        await a.act("act-2", "aria", "r1")
        missed = await a.until("scene.update")
        b, resumed = await srv1.join("borin", epoch=epoch, last_seq=last)  # the other node
        p = resumed["payload"]
        assert p["resumed"] is True and p["resumed_from"] == last
        replay = [await b.recv() for _ in range(p["seq"] - last)]
        assert replay[-1]["seq"] == missed["seq"] == p["seq"]
        assert engine.count("act-1") == engine.count("act-2") == 1
        await a.close()
        await b.close()


async def test_a_live_partys_slot_migrates_while_it_plays(on_cluster: RedisCluster) -> None:
    party = "mig"
    slot = on_cluster.keyslot(f"party:{party}")
    source = on_cluster.slot_owner(slot)
    target = next(m for m in on_cluster.masters() if m.port != source.port)
    async with (
        node(on_cluster.url, probe_interval=1.0) as n1,
        node(on_cluster.url, probe_interval=1.0) as n2,
    ):
        rec = Recorder(n2, party)
        await n2.subscribe(party, rec)
        player = Player(n1, party)
        player.start()
        await wait_until(lambda: len(rec.events) >= 20)
        began = time.monotonic()
        migration = await asyncio.to_thread(on_cluster.begin_migration, slot, target)
        moving = await asyncio.to_thread(migration.keys)
        assert len(moving) >= 2  # meta, history, state...: scripts get ASK / TRYAGAIN
        await asyncio.to_thread(migration.move, keys=moving[:1])
        await asyncio.to_thread(migration.move)
        await asyncio.to_thread(migration.finish)
        window = time.monotonic() - began
        moved_at = len(player.published)
        await wait_until(lambda: len(rec.events) >= moved_at + 20, timeout=15)
        await player.stop()
        await wait_until(lambda: rec.seqs == [e.seq for e in player.published], timeout=10)
    print(f"slot migration: {window:.3f}s, slowest publish {player.slowest:.3f}s")
    assert on_cluster.slot_owner(slot).port == target.port
    assert rec.resyncs == 0
    assert rec.seqs == list(range(1, len(rec.seqs) + 1))  # all, once, in order
    assert player.failures == 0  # redirections were retried inside the batcher
    assert isinstance(n1.scripts.batcher, ShardedBatcher) and n1.scripts.batcher.redirects > 0
    assert isinstance(n2.bus, ShardedBus) and n2.bus.moves >= 1  # the subscription followed


def reconnects(backend: RedisBackend) -> float:
    """The node's pub/sub reconnections so far (``party_sync_redis_reconnects_total``)."""
    assert backend.metrics is not None
    total = 0.0
    for family in backend.metrics.redis_reconnects.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                total += float(sample.value)
    return total


async def test_resharding_a_masters_first_slots_leaves_its_other_parties_alone(
    on_cluster: RedisCluster,
) -> None:
    """docs/redis.md: a party waits for its own slot's migration; other parties are not
    affected. Cluster probe: ``redis-cli --cluster reshard`` moves a master's slots one by one
    from its lowest up; the node's liveness probe was in the master's first slot, so each slot
    moved put the probe in the next one, still migrating (``ASK``): the master's new pub/sub
    connection could not subscribe it, and every party on that master waited for the whole
    resharding. Here its first two slots move in turn while a party of another slot plays."""
    party = "stay"
    slot = on_cluster.keyslot(f"party:{party}")
    master = on_cluster.slot_owner(slot)
    first = min(start for start, _, port in on_cluster.slot_map(master) if port == master.port)
    assert slot not in (first, first + 1)
    target = next(m for m in on_cluster.masters() if m.port != master.port)
    async with (
        node(on_cluster.url, probe_interval=0.5) as n1,
        node(on_cluster.url, probe_interval=0.5) as n2,
    ):
        rec = Recorder(n2, party)
        await n2.subscribe(party, rec)
        player = Player(n1, party)
        player.start()
        await wait_until(lambda: len(rec.events) >= 20)
        one = await asyncio.to_thread(on_cluster.begin_migration, first, target)
        two = await asyncio.to_thread(on_cluster.begin_migration, first + 1, target)
        await asyncio.to_thread(one.move)
        await asyncio.to_thread(one.finish)
        # the next slot migrating for several probe intervals (the fault lasts): the party's
        # events go on arriving all the while
        began, delivered = time.monotonic(), len(rec.events)
        await wait_until(
            lambda: time.monotonic() > began + 4 * 0.5 and len(rec.events) >= delivered + 60,
            timeout=15,
        )
        await asyncio.to_thread(two.move)
        await asyncio.to_thread(two.finish)
        moved_at = len(player.published)
        await wait_until(lambda: len(rec.events) >= moved_at + 60, timeout=15)
        await player.stop()
        await wait_until(lambda: rec.seqs == [e.seq for e in player.published], timeout=10)
        lost = reconnects(n2)
    for moved in (first, first + 1):  # as it was, for the other tests
        await asyncio.to_thread(on_cluster.migrate_slot, moved, master)
    assert rec.resyncs == 0
    assert rec.seqs == list(range(1, len(rec.seqs) + 1))
    assert lost == 0  # the master's pub/sub connection stayed up throughout


async def test_a_fence_mark_moved_in_by_a_resharding_is_no_failover(
    on_cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Each shard's fence mark is in its first slot. A resharding that moved another master's
    first slot, mark and all, below this master's first slot made that mark this shard's: its
    next new connection found another identity there, took it for a failover and gave every
    party of the shard a new epoch (a resync for all their players, their slots unmoved;
    cluster probe). The mark names the master that wrote it; a live master's mark is rewritten,
    not fenced."""
    caplog.set_level(logging.INFO, "party_sync.backends.redis_fence")
    masters = sorted(on_cluster.masters(), key=lambda m: min(on_cluster.slot_map(m))[0])
    source, target = masters[0], masters[1]  # source serves slot 0: below all of target's
    lowest = min(s for s, _, port in on_cluster.slot_map(source) if port == source.port)
    party = next(
        p
        for p in (f"dest{i}" for i in range(200))
        if on_cluster.slot_owner(on_cluster.keyslot(f"party:{p}")).port == target.port
    )
    async with node(on_cluster.url) as n1:
        for master in masters:  # a connection to each master: each shard's mark written
            other = next(
                p
                for p in (f"any{i}" for i in range(200))
                if on_cluster.slot_owner(on_cluster.keyslot(f"party:{p}")).port == master.port
            )
            await n1.publish(other, scene(1), time.time())
        await n1.publish(party, scene(1), time.time())
        before = (await n1.snapshot(party)).epoch
    await asyncio.to_thread(on_cluster.migrate_slot, lowest, target)
    try:
        async with node(on_cluster.url) as n2:  # new connections to the target: its fence runs
            await n2.publish(party, scene(2), time.time())
            after = await n2.snapshot(party)
    finally:
        await asyncio.to_thread(on_cluster.migrate_slot, lowest, source)
    assert after.epoch == before and after.seq == 2
    messages = [r.getMessage() for r in caplog.records]
    assert not any("changed master" in m for m in messages), messages
    assert any("came from another master" in m for m in messages), messages


async def test_a_killed_master_is_followed_with_a_new_epoch_never_a_rolled_back_seq(
    on_cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "party_sync")
    party = "fail"
    slot = on_cluster.keyslot(f"party:{party}")
    master = on_cluster.slot_owner(slot)
    async with (
        node(on_cluster.url, probe_interval=1.0, command_timeout=2.0) as n1,
        node(on_cluster.url, probe_interval=1.0, command_timeout=2.0) as n2,
    ):
        rec = Recorder(n2, party)
        await n2.subscribe(party, rec)
        player = Player(n1, party)
        player.start()
        await wait_until(lambda: len(rec.events) >= 20)
        before = (await n1.snapshot(party)).epoch
        killed = time.monotonic()
        promoted = await asyncio.to_thread(on_cluster.kill_master, master)
        delivered = len(rec.events)
        await wait_until(lambda: rec.resyncs >= 1 and len(rec.events) > delivered, timeout=15)
        recovered = time.monotonic() - killed
        settled = len(rec.events)
        await wait_until(lambda: len(rec.events) >= settled + 20, timeout=10)
        await player.stop()
        after = (await n1.snapshot(party)).epoch
        await wait_until(lambda: rec.events[-1].seq == player.published[-1].seq, timeout=10)
        # the dead master's batcher is closed once the slot map no longer names it (it probed
        # for ever, and a node-wide "down" refused every handshake)
        batcher = n1.scripts.batcher
        assert isinstance(batcher, ShardedBatcher)
        await wait_until(lambda: f"127.0.0.1:{master.port}" not in batcher._shards, timeout=10)
        await wait_until(lambda: not batcher.down, timeout=10)
        assert not batcher.down_for(n1.keys.tag(party))
        # every "lost" WARNING has its ending: a failover replaced the master, so the dead
        # master's connections never reconnect; they say so when they are retired (an operator
        # saw "lost" and "not answering" and no line after them, 6 minutes on)
        for lost, over in (
            (
                ("redis pub/sub connection lost", "redis pub/sub unavailable"),
                ("redis pub/sub reconnected", "redis pub/sub: over"),
            ),
            (
                ("redis is not answering the script connection: ",),
                ("redis is not answering the script connection: over",),
            ),
        ):
            await wait_until(functools.partial(_ended, caplog.records, lost, over), timeout=10)
    print(f"cluster failover: promoted {promoted.port}, delivering again {recovered:.2f}s after")
    assert after != before  # the shard's fence: a new epoch on the promoted replica
    assert set(rec.epochs) >= {before, after}
    in_order_per_epoch(rec)
    assert recovered < FAILOVER_BOUND
    await asyncio.to_thread(on_cluster.restart, master)  # back, as the new master's replica


def _ended(
    records: list[logging.LogRecord], began: tuple[str, ...], ended: tuple[str, ...]
) -> bool:
    """No WARNING starting with one of ``began`` after the last INFO starting with ``ended``."""
    last_warning = last_info = -1
    for i, record in enumerate(records):
        message = record.getMessage()
        if message.startswith(ended) and record.levelno == logging.INFO:
            last_info = i
        elif message.startswith(began) and record.levelno == logging.WARNING:
            last_warning = i
    return last_warning < last_info or last_warning == -1


async def test_a_stalled_master_holds_a_call_to_another_shard_at_most_the_timeout() -> None:
    """A probe: one master stopped (SIGSTOP, no replica) held a script call for a party on a
    healthy master, and a new WebSocket's handshake, for the stall's whole length: redis-py's
    cluster client read its slot map again, which met the stalled node. Every call is given up
    after the command timeout, in all (BackendUnavailable: the client resends)."""
    with RedisCluster(masters=3, replicas=0) as kit:
        named, stalled = kit.masters()[:2]

        party, far = party_on(kit, named), party_on(kit, stalled)
        async with node(named.url, command_timeout=1.0) as b:
            batcher = b.scripts.batcher
            assert isinstance(batcher, ShardedBatcher)
            await b.publish(party, scene(1), time.time())
            await b.publish(far, scene(1), time.time())
            assert stalled.proc is not None
            stalled.proc.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(BackendUnavailable):  # the stalled master's own party
                    await b.publish(far, scene(2), time.time())
                # its batcher probes it; the other masters' parties are not refused for it,
                # and the node is not "down" for one master
                assert batcher.down_for(b.keys.tag(far))
                assert not batcher.down_for(b.keys.tag(party)) and not batcher.down
                outcomes = []
                for n in range(2, 12):  # past cluster-node-timeout: the cluster fails
                    await asyncio.sleep(0.5)
                    try:
                        async with asyncio.timeout(4.0):  # the stall (20 s) held them before
                            await b.publish(party, scene(n), time.time())  # a script
                            await b.admin.blocked_until(party, "aria", time.time())  # a GET
                        outcomes.append("answered")
                    except BackendUnavailable:
                        outcomes.append("unavailable")
            finally:
                stalled.proc.send_signal(signal.SIGCONT)
            await wait_until(lambda: not batcher.down_for(b.keys.tag(far)), timeout=10)
        assert len(outcomes) == 10, outcomes


async def test_one_master_lost_leaves_the_node_ready_for_the_other_masters_parties(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/redis.md: one master not answering is an outage of its parties, not of the node nor
    of ``/readyz`` (unless every master is down). A killed master's pub/sub connection was lost,
    and readiness asked for every master's (docs check: 503 until its replica took over). The
    operator sees the master lost in ``party_sync_redis_cluster_masters`` (Sentinel/Cluster
    probe: /readyz stayed 200, as documented, and nothing else said a shard was down)."""
    from party_sync.backends import redis_backend

    monkeypatch.setattr(redis_backend, "MASTERS_EVERY", 0.2)

    def masters(b: RedisBackend) -> dict[str, float]:
        assert b.metrics is not None
        (family,) = b.metrics.cluster_masters.collect()
        return {s.labels["state"]: s.value for s in family.samples}

    with RedisCluster(masters=3, replicas=0) as kit:
        named, victim = kit.masters()[:2]
        async with node(named.url, probe_interval=1.0, command_timeout=1.0) as b:
            bus = b.bus
            assert isinstance(bus, ShardedBus)
            await wait_until(lambda: bus.connected, timeout=10)
            assert await b.ready()
            await wait_until(lambda: masters(b) == {"known": 3, "answering": 3}, timeout=10)
            kit.stop_node(victim)
            await wait_until(lambda: not bus.connected, timeout=15)  # its pub/sub is lost
            assert bus.serving and await b.ready()
            await wait_until(lambda: masters(b) == {"known": 3, "answering": 2}, timeout=10)
        async with node(named.url, probe_interval=1.0, command_timeout=1.0) as b:
            for master in kit.masters():  # every master down: not ready
                if master is not victim:
                    kit.stop_node(master)
            await wait_until(lambda: not b.bus.serving, timeout=15)
            assert not await b.ready()


async def test_a_stalled_master_with_a_replica_holds_up_only_its_own_parties_and_is_left() -> None:
    """Failover probe: a master SIGSTOPped (its replica promoted a few seconds later) while other
    calls of the node's cluster client met it. redis-py then read its slot map again before every
    call, from its known nodes one after another in a random order, each for a command timeout:
    calls for healthy masters' parties waited behind it (begin_action refused as run late), the
    stalled master's parties kept being sent to it after its replica took over, and /readyz asked
    one node (503 for the whole cluster). Now the map is read in the background from nodes that
    answer, calls use the map they have, and readiness asks every master."""
    with RedisCluster(masters=3, replicas=1) as kit:
        named, stalled = kit.masters()[:2]

        near, far = party_on(kit, named), party_on(kit, stalled)
        far_slot = kit.keyslot(f"party:{far}")
        command_timeout = 2.0
        async with node(named.url, command_timeout=command_timeout) as b:
            await b.publish(near, scene(1), time.time())
            await b.publish(far, scene(1), time.time())
            assert stalled.proc is not None
            calls: list[tuple[str, float, float, str]] = []  # (what, began, took, outcome)
            stop = asyncio.Event()

            async def keep(what: str, call: Any) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    began = time.monotonic()
                    try:
                        async with asyncio.timeout(8.0):
                            outcome = str(await call(n))
                    except Exception as exc:
                        outcome = type(exc).__name__
                    calls.append((what, began, time.monotonic() - began, outcome))
                    await asyncio.sleep(0.1)

            async def act(party: str, n: int) -> str:
                verdict = await b.begin_action(party, f"c{n}", f"{party}-{n}", time.time())
                await b.publish(party, scene(n + 1), time.time())
                return verdict.decision.value

            async def get(n: int) -> str:  # a plain command of the cluster client, to far's master
                await b.client.get(f"{{party:{far}}}:probe")
                return "accept"

            async def ready(n: int) -> str:
                return "accept" if await b.ready() else "not ready"

            def promoted() -> bool:
                with contextlib.suppress(Exception):
                    return kit.slot_owner(far_slot).port != stalled.port
                return False

            stalled.proc.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            tasks = [
                asyncio.create_task(keep(what, call))
                for what, call in (
                    ("near", functools.partial(act, near)),
                    ("far", functools.partial(act, far)),
                    ("get", get),
                    ("ready", ready),
                )
            ]
            try:
                await wait_until(promoted, timeout=20)
                taken_over = time.monotonic()
                await asyncio.sleep(6.0)  # the old master still stopped all along
            finally:
                stop.set()
                await asyncio.gather(*tasks)
                stalled.proc.send_signal(signal.SIGCONT)
        # The cluster refuses keyed calls (CLUSTERDOWN) from about cluster-node-timeout after
        # the stop until the replica took over: calls made then may be refused. Any other call
        # of a healthy master's party, and readiness, is answered without waiting for the
        # stalled master: well within one command timeout, which a call held by it would take
        # (a bound of 1.0 s failed once at 1.2 s, the first readiness check right after the
        # stop, under the full suite's load on two cores).
        down_from = stopped + kit_node_timeout() * 0.8
        for what, began, took, outcome in calls:
            if what in ("near", "ready") and not down_from <= began <= taken_over + 0.5:
                held = took >= command_timeout * 0.8
                assert (outcome, held) == ("accept", False), (what, began - stopped, took)
            if began >= taken_over + 1.0:  # the stalled master's parties are on its replica now
                assert outcome == "accept", (what, began - stopped, took, outcome)


def party_on(kit: RedisCluster, master: Any) -> str:
    """A party id whose slot ``master`` serves."""
    return next(
        p
        for p in (f"p{i}" for i in range(1000))
        if kit.slot_owner(kit.keyslot(f"party:{p}")).port == master.port
    )


def kit_node_timeout() -> float:
    from ps_testkit.redis_cluster import NODE_TIMEOUT_MS

    return NODE_TIMEOUT_MS / 1000


@pytest.mark.parametrize("call", ["command", "script", "append", "append after a script"])
async def test_a_call_after_one_timed_out_on_a_stalled_master_goes_to_its_promoted_replica(
    call: str,
) -> None:
    """Cluster probe: a party whose actions-stream partition was on a stalled master waited two
    command timeouts, not one, after its replica had taken over: the append timed out (the map
    still named the stalled master), and the retry, 0.25 s later, met the stalled master again
    before the map read that timeout started had ended. A call for a master that has just failed
    now waits for a map read begun after that failure (within its own bound), then goes where
    that map says: a plain command, a party script, an action's append to its stream; and an
    append of another client of the process, after a script of the stalled master's party timed
    out (cluster probe: that party's action, accepted on the promoted replica, was appended by
    the actions stream's client, whose map still named the stalled master: a second timeout)."""
    with RedisCluster(masters=3, replicas=1) as kit:
        stalled = kit.masters()[1]
        stalled_party = party_on(kit, stalled)
        slot = kit.keyslot(f"party:{stalled_party}")
        command_timeout = 2.0
        async with contextlib.AsyncExitStack() as stack:
            b = await stack.enter_async_context(
                node(kit.masters()[0].url, command_timeout=command_timeout)
            )
            calls: dict[str, Callable[[], Awaitable[Any]]] = {
                "command": lambda: b.client.get(f"{{party:{stalled_party}}}:probe"),
                "script": lambda: b.publish(stalled_party, scene(2), time.time()),
            }
            failing = calls["script"] if call == "append after a script" else None
            if call.startswith("append"):
                target = RedisTarget(kit.masters()[0].url, cluster=True)
                link = StreamEngineLink(target, "actions", 100, partitions=8, timeout=2.0)
                stack.push_async_callback(link.close)
                party = next(  # a party on another master, its partition on the stalled one
                    p
                    for p in (f"p{i}" for i in range(1000))
                    if kit.slot_owner(kit.keyslot(link.stream_for(p))).port == stalled.port
                    and kit.slot_owner(kit.keyslot(f"party:{p}")).port != stalled.port
                )
                slot = kit.keyslot(link.stream_for(party))
                notice = JoinNotice(party, "run", "aria", "Aria", "t" * 32)
                calls[call] = lambda: link.notify_join(notice)
            await calls[call]()  # the map is read, and names the master to be stalled
            if failing is not None:
                await failing()
            assert stalled.proc is not None
            stalled.proc.send_signal(signal.SIGSTOP)
            try:

                def promoted() -> bool:
                    with contextlib.suppress(Exception):
                        return kit.slot_owner(slot).port != stalled.port
                    return False

                await wait_until(promoted, timeout=20)
                with pytest.raises((RedisError, BackendUnavailable)):  # its map names the stalled
                    await (failing or calls[call])()
                began = time.monotonic()
                tries = []
                while True:  # at once: the map read is under way
                    try:
                        await calls[call]()
                        break
                    except Exception as exc:
                        tries.append((time.monotonic() - began, repr(exc)))
                        await asyncio.sleep(0.05)
                took = time.monotonic() - began
            finally:
                stalled.proc.send_signal(signal.SIGCONT)
        assert took < command_timeout * 0.8, (took, tries)
