"""The rollback fence (``backends/redis_fence.py``) and the Sentinel settings
(``backends/redis_connect.py``, ``config.py``), on a private redis-server.

A failover or a restart is simulated here by the mark: the server's identity is what it is, and
``<prefix>:fence`` says which identity the data was vouched for under. The real failover, with
real lost writes, is ``tests/faults/test_sentinel.py``.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from party_sync import config
from party_sync.backends import redis_connect
from party_sync.backends.base import BackendSettings
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.backends.redis_connect import (
    RedisTarget,
    Sentinels,
    _MasterWatch,
    make_client,
    parse_addresses,
    refuse_misconfiguration,
)
from party_sync.backends.redis_fence import mark_key, meta_pattern
from party_sync.core.events import Event
from party_sync.core.transient import Transient
from party_sync.protocol.errors import ConfigError
from ps_testkit.redis_sentinel import MASTER_NAME, SentinelSet
from ps_testkit.redis_server import RedisServer, ping, redis_server_binary
from ps_testkit.servers import free_port
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

pytestmark = pytest.mark.redis

T0 = 1_800_000_000.0


@pytest.fixture
async def raw(redis: RedisServer) -> AsyncIterator[Redis]:
    """A client that does not fence (redis-py's own, not ``make_client``)."""
    client = Redis.from_url(redis.url)
    try:
        yield client
    finally:
        await client.aclose()


async def _connect(url: str, prefix: str = "ps") -> None:
    client = make_client(RedisTarget(url, prefix=prefix))
    try:
        await client.ping()
    finally:
        await client.aclose()


async def test_a_new_redis_is_marked_and_nothing_is_fenced(redis: RedisServer, raw: Redis) -> None:
    await raw.hset("ps:{party:a}:meta", mapping={"epoch": "e1", "seq": 7})
    await _connect(redis.url)
    mark = await raw.get(mark_key("ps"))
    assert mark is not None and b":" in mark
    assert await raw.hget("ps:{party:a}:meta", "seq") == b"7"
    await _connect(redis.url)  # the same server again: vouched, nothing changes
    assert await raw.get(mark_key("ps")) == mark
    assert await raw.hget("ps:{party:a}:meta", "seq") == b"7"


async def test_another_servers_mark_fences_every_party_of_the_prefix(
    redis: RedisServer, raw: Redis
) -> None:
    await raw.set(mark_key("ps"), "an-old-master:its-replid")  # as replicated, or reloaded
    for party in ("a", "b", "c"):
        await raw.hset(f"ps:{{party:{party}}}:meta", mapping={"epoch": "e1", "seq": 7})
        await raw.rpush(f"ps:{{party:{party}}}:history", "event")
    await raw.hset("other:{party:a}:meta", mapping={"epoch": "e9", "seq": 3})  # another prefix
    await raw.hset("ps:{party:a}:action:meta", "c", "aria")  # an action record, not a meta
    await _connect(redis.url)
    assert [await raw.exists(f"ps:{{party:{p}}}:meta") for p in "abc"] == [0, 0, 0]
    assert await raw.llen("ps:{party:a}:history") == 1  # dropped by the next ensure_epoch
    assert await raw.hget("other:{party:a}:meta", "seq") == b"3"
    assert await raw.hget("ps:{party:a}:action:meta", "c") == b"aria"
    mark = await raw.get(mark_key("ps"))
    assert mark is not None and mark != b"an-old-master:its-replid"


async def test_a_fenced_party_starts_a_new_epoch_and_its_listeners_resync(
    redis: RedisServer, raw: Redis
) -> None:
    """The node side: its stream of the party sees another epoch and resyncs its clients."""
    backend = RedisBackend(
        RedisOptions(redis.url, prefix="ps", probe_interval=0.5), BackendSettings()
    )
    await backend.start()
    resyncs: list[str] = []

    class Listener:
        def on_event(self, event: Event) -> None: ...

        def on_direct(self, character_id: str, data: bytes) -> None: ...

        def on_transient(self, items: Sequence[Transient]) -> None: ...

        def on_resync(self, epoch: str | None = None) -> None:
            resyncs.append("resync")

    try:
        sub = await backend.subscribe("p1", Listener())
        first = await backend.publish("p1", _event("one"), T0)
        before = (await backend.snapshot("p1", T0)).epoch
        await raw.set(mark_key("ps"), "an-old-master:its-replid")
        await raw.client_kill_filter(_type="normal")  # every connection comes back: fenced
        await raw.client_kill_filter(_type="pubsub")
        for _ in range(200):
            if resyncs:
                break
            await asyncio.sleep(0.02)  # polling the condition, bounded by the loop
        assert resyncs, "the node's stream did not resync"
        after = await backend.publish("p1", _event("two"), T0)
        assert (await backend.snapshot("p1", T0)).epoch != before
        assert first.seq == 1 and after.seq == 1
        await sub.close()
    finally:
        await backend.close()


def _event(text: str) -> dict[str, object]:
    return {
        "type": "party.state",
        "timestamp": T0,
        "trace_id": f"trace-{text}",
        "payload": {"status": "active", "run_status": "in_progress", "characters": []},
    }


async def test_a_restart_that_reloads_its_data_fences(tmp_path: Path) -> None:
    """A real restart with persistence (AOF): the data comes back, the run_id does not."""
    port = free_port()
    argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path)]
    url = f"redis://127.0.0.1:{port}/0"
    raw = Redis.from_url(url)
    for attempt in range(2):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(500):
                if ping(port):
                    break
                await asyncio.sleep(0.01)  # polling the server's start, bounded
            if attempt == 0:
                await _connect(url)  # marks it
                await raw.hset("ps:{party:a}:meta", mapping={"epoch": "e1", "seq": 7})
            else:
                assert await raw.hget("ps:{party:a}:meta", "seq") == b"7"  # reloaded
                await _connect(url)
                assert not await raw.exists("ps:{party:a}:meta")  # fenced: a new epoch next
        finally:
            await raw.connection_pool.disconnect()
            proc.terminate()  # SIGTERM: Redis flushes its AOF and exits
            proc.wait(timeout=10)
    await raw.aclose()


async def test_a_replica_is_refused(redis: RedisServer) -> None:
    replica = RedisServer()
    replica.start()
    try:
        replica.command("REPLICAOF", "127.0.0.1", str(redis.port))
        with pytest.raises(RedisConnectionError, match="is a replica"):
            await _connect(replica.url)
    finally:
        replica.close()


def test_the_meta_pattern_escapes_the_prefix() -> None:
    assert meta_pattern("ps") == "ps:{party:*}:meta"
    assert meta_pattern("a*b[1]") == r"a\*b\[1\]:{party:*}:meta"


# -- the settings ---------------------------------------------------------------------------------
def _load(**env: str) -> config.Settings:
    return config.load(None, env={f"PARTY_SYNC_{k.upper()}": v for k, v in env.items()})


def test_sentinels_alone_turn_redis_mode_on() -> None:
    settings = _load(redis_sentinels="10.0.0.1:26379, [::1]:26380", redis_sentinel_master="main")
    assert settings.redis_url == "redis://main/0"
    assert settings.resolved_engine_transport == "stream"
    target = RedisTarget.of(settings)
    assert target.sentinels is not None
    assert target.sentinels.addresses == (("10.0.0.1", 26379), ("::1", 26380))
    assert target.describe() == "sentinel main via 10.0.0.1:26379,::1:26380"


def test_the_url_gives_the_password_and_db_with_sentinels() -> None:
    settings = _load(
        redis_sentinels="s1:26379",
        redis_sentinel_master="main",
        redis_url="redis://:pw@ignored:1/3",
        redis_sentinel_password="sentinel-pw",
    )
    client = make_client(RedisTarget.of(settings))
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["password"], kwargs["db"]) == ("pw", 3)
    # asked of the sentinels; the URL's host is not used, and nothing is reachable without them
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 0)
    assert settings.redis_sentinel_password == "sentinel-pw"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"redis_sentinels": "s1:26379"}, "needs redis_sentinel_master"),
        ({"redis_sentinel_master": "main"}, "needs redis_sentinels"),
        # it was ignored without a word (new user probe)
        ({"redis_sentinel_password": "pw", "redis_url": "redis://h:1"}, "needs redis_sentinels"),
        ({"redis_sentinels": "s1", "redis_sentinel_master": "m"}, "not host:port"),
        ({"redis_sentinels": "s1:0", "redis_sentinel_master": "m"}, "not host:port"),
        (
            {"redis_sentinels": "s1:1", "redis_sentinel_master": "m", "redis_url": "rediss://x"},
            "TLS",
        ),
        (
            {"redis_sentinels": "s1:1", "redis_sentinel_master": "m", "redis_url": "unix:///s"},
            "redis://",
        ),
    ],
)
def test_wrong_sentinel_settings_say_what_is_wrong(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(**env)


def test_addresses_parse() -> None:
    assert parse_addresses(["h:1", "[fe80::1]:2"]) == (("h", 1), ("fe80::1", 2))
    with pytest.raises(ValueError, match="no address"):
        parse_addresses([])


async def test_a_client_finds_the_master_through_password_protected_sentinels() -> None:
    sentinels = SentinelSet(password="s3cret")
    await asyncio.to_thread(sentinels.start)
    try:
        addresses = parse_addresses(sentinels.addresses.split(","))
        url = "redis://any-host/2"
        good = make_client(RedisTarget(url, Sentinels(addresses, MASTER_NAME, "s3cret"), "ps"))
        try:
            await good.set("k", "v")
            assert await good.get("k") == b"v"
            assert good.connection_pool.connection_kwargs["db"] == 2
        finally:
            await good.aclose()
        with sentinels.master().client() as r:
            r.select(2)
            assert r.get("k") == b"v"  # on the master, in db 2
            assert r.get(mark_key("ps")) is not None  # and fenced (marked) there
    finally:
        await asyncio.to_thread(sentinels.close)


SENTINEL_PASSWORD = "s3cret"


async def test_a_master_name_no_sentinel_monitors_is_a_configuration_error() -> None:
    """A typo in redis_sentinel_master (or the sentinels' password) stops the start with one
    line; sentinels that do not answer are an outage (the node starts and waits)."""
    sentinels = SentinelSet(password=SENTINEL_PASSWORD)
    await asyncio.to_thread(sentinels.start)
    try:
        addresses = parse_addresses(sentinels.addresses.split(","))

        def target(master: str, password: str | None = SENTINEL_PASSWORD) -> RedisTarget:
            return RedisTarget("redis://any-host/0", Sentinels(addresses, master, password))

        await refuse_misconfiguration(target(MASTER_NAME))
        with pytest.raises(ConfigError, match="no sentinel monitors a master named 'nosuch'") as e:
            await refuse_misconfiguration(target("nosuch"))
        assert f"they monitor '{MASTER_NAME}'" in str(e.value)
        with pytest.raises(ConfigError, match="a sentinel refused redis_sentinel_password"):
            await refuse_misconfiguration(target(MASTER_NAME, "wrong-0123"))
        # none given: not said to be refused (security probe), but missing
        with pytest.raises(ConfigError, match="require a password and redis_sentinel_password is"):
            await refuse_misconfiguration(target(MASTER_NAME, None))
    finally:
        await asyncio.to_thread(sentinels.close)
    nobody = Sentinels(((("127.0.0.1", free_port()),)), "nosuch")
    await refuse_misconfiguration(RedisTarget("redis://any-host/0", nobody), 0.5)


async def test_a_redis_listed_as_a_sentinel_is_a_configuration_error(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis's own port given as redis_sentinels (new user's probe): it answers "unknown
    command 'SENTINEL'" and can never work; the node used to start and wait for ever with
    MasterNotFoundError warnings. Listed beside real sentinels: a warning names it."""
    plain = (("127.0.0.1", redis.port),)
    target = RedisTarget("redis://any-host/0", Sentinels(plain, MASTER_NAME))
    with pytest.raises(ConfigError, match="which is not a Redis Sentinel") as e:
        await refuse_misconfiguration(target, 0.5)
    assert f"127.0.0.1:{redis.port}" in str(e.value)
    sentinels = SentinelSet()
    await asyncio.to_thread(sentinels.start)
    try:
        addresses = (*plain, *parse_addresses(sentinels.addresses.split(",")))
        with caplog.at_level("WARNING", logger="party_sync.backends.redis_connect"):
            await refuse_misconfiguration(
                RedisTarget("redis://any-host/0", Sentinels(addresses, MASTER_NAME)), 0.5
            )
        assert any("not a Redis Sentinel" in r.getMessage() for r in caplog.records)
    finally:
        await asyncio.to_thread(sentinels.close)


async def test_a_sentinel_clients_connection_used_unopened_goes_to_the_master() -> None:
    """redis-py opens a closed connection that is written to (``send_packed_command``) without
    asking the sentinels; ``redis_connect._SentinelConnection`` makes it ask them. Before, the
    script batcher's connection went to localhost:6379: whatever Redis listened there."""
    from party_sync.backends.redis_wire import RawConnection

    sentinels = SentinelSet()
    await asyncio.to_thread(sentinels.start)
    try:
        addresses = parse_addresses(sentinels.addresses.split(","))
        client = make_client(RedisTarget("redis://any-host/0", Sentinels(addresses, MASTER_NAME)))
        try:
            for explicit in (False, True):
                conn = RawConnection(client.connection_pool)
                if explicit:
                    await conn.connect()
                await conn.send_packed(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
                (info,) = await conn.read_replies(1)
                await conn.close()
                port = next(
                    line.split(b":")[1] for line in info.split(b"\r\n") if b"tcp_port:" in line
                )
                assert int(port) == sentinels.master_port()
        finally:
            await client.aclose()
    finally:
        await asyncio.to_thread(sentinels.close)


def test_a_process_keeps_one_master_watch_whatever_order_its_sentinels_answered_in() -> None:
    """redis-py's ``discover_master`` moves the sentinel that answered to the front of its list.
    The watch was keyed by that list's order: after a sentinel failed to answer once, the
    pool's connections reported to a new watch that knew no pool to ask the sentinels through,
    and a planned failover was followed only when the old master dropped the connections, 10 s
    later (scale-out probe). (No socket is opened here.)"""
    addresses = (("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3))
    client = make_client(RedisTarget("redis://any-host/0", Sentinels(addresses, "m"), "ps"))
    pool = client.connection_pool
    watch = _MasterWatch.of(pool)
    assert pool in watch.pools
    manager = pool.sentinel_manager  # type: ignore[attr-defined]
    manager.sentinels[0], manager.sentinels[2] = manager.sentinels[2], manager.sentinels[0]
    assert _MasterWatch.of(pool) is watch


class _Pool:
    def __init__(self, answer: tuple[str, int] | None) -> None:
        self.answer, self.asked = answer, 0

    async def get_master_address(self) -> tuple[str, int]:
        self.asked += 1
        if self.answer is None:
            raise RedisConnectionError("no sentinel answers this pool")
        return self.answer


class _Connection:
    def __init__(self, port: int) -> None:
        self.host, self.port, self.is_connected = "127.0.0.1", port, True

    async def disconnect(self) -> None:
        self.is_connected = False


async def test_the_master_watch_asks_the_next_pool_when_one_cannot_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One pool whose sentinels do not answer (a closed client's, kept alive) no longer stops
    the watch: the next pool is asked, and the connections to the old master are closed."""
    monkeypatch.setattr(redis_connect, "MASTER_CHECK_INTERVAL", 0.01)
    watch = _MasterWatch()
    broken, good = _Pool(None), _Pool(("127.0.0.1", 2))
    watch.pools = [broken, good]  # type: ignore[assignment]  # (in this order: the broken first)
    old = _Connection(1)
    watch.connected(old, ("127.0.0.1", 1))  # type: ignore[arg-type]
    for _ in range(500):
        if not old.is_connected:
            break
        await asyncio.sleep(0.01)
    assert not old.is_connected and good.asked >= 1
    assert watch.address == ("127.0.0.1", 2)
