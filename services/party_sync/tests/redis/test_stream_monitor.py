"""The actions-stream monitor against a private redis-server and a real ``engine-worker``: a
missing or stuck engine is reported to the operator (docs/redis.md, "Operating it")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from party_sync.engine.stream_monitor import Bounds, Condition, StreamMonitor
from party_sync.metrics import Metrics
from ps_testkit.client import wait_until
from ps_testkit.cluster import TESTS_DIR
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import make_settings, party_sync_command, serve_in_process
from redis.asyncio import Redis

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

STREAM = "party_sync:actions"
LOGGER = "party_sync.engine.stream_monitor"


@contextlib.contextmanager
def engine_worker(redis: RedisServer, engine_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``party-sync engine-worker`` on ``redis`` (the recording test engine), its own process."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p
        ),
        "PS_ENGINE_DIR": str(engine_dir),
        "PARTY_SYNC_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [
            *party_sync_command(),
            "engine-worker",
            "ps_testkit.engines:node_engine",
            "--redis-url",
            redis.url,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def append_entries(redis: Redis, count: int) -> None:
    """Entries a worker acknowledges without calling the engine (an unknown kind)."""
    for i in range(count):
        await redis.xadd(STREAM, {"kind": "noop", "party_id": f"p{i}", "envelope": "{}"})


async def check_until(monitor: StreamMonitor, want: Condition, timeout: float = 20.0) -> None:
    """Look again and again (bounded) until the monitor sees ``want``."""
    async with asyncio.timeout(timeout):
        while await monitor.check_once() is not want:  # noqa: ASYNC110 (another process)
            await asyncio.sleep(0.1)


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


async def test_no_worker_shows_a_backlog_warns_once_and_a_worker_recovers_it(
    redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics("n1")
    bounds = Bounds(active_within=2.0, stuck_after=60.0)
    monitor = StreamMonitor.for_redis(redis.url, STREAM, bounds=bounds, metrics=metrics)
    client = Redis.from_url(redis.url)
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            assert await monitor.check_once() is Condition.NO_WORKER  # no stream yet: no error
            await append_entries(client, 3)
            assert await monitor.check_once() is Condition.WAITING
            assert await monitor.check_once() is Condition.WAITING
            assert sample(metrics, "party_sync_actions_stream_length") == 3
            assert sample(metrics, "party_sync_actions_stream_lag") == 3
            assert sample(metrics, "party_sync_actions_stream_consumers") == 0
            assert (
                sample(metrics, "party_sync_actions_stream_oldest_undelivered_seconds") or 0
            ) >= 0
            assert sample(metrics, "party_sync_engine_link_ok") == 0
            warnings = [r for r in caplog.records if r.levelname == "WARNING"]
            assert len(warnings) == 1
            assert (
                "3 entries (actions and party notices) wait on party_sync:actions"
                in warnings[0].getMessage()
            )
            assert "no consumer group 'campaign-engine'" in warnings[0].getMessage()

            with engine_worker(redis, tmp_path) as worker:
                await check_until(monitor, Condition.OK)
                # OK once the worker's group is active; it may not have read the three yet, nor
                # acknowledged the last one read (lag 0 comes at the read, pending 0 at the ack)
                async with asyncio.timeout(20):
                    while (
                        sample(metrics, "party_sync_actions_stream_lag") != 0
                        or sample(metrics, "party_sync_actions_stream_pending") != 0
                    ):
                        await asyncio.sleep(0.1)  # bounded poll: another process reads
                        assert await monitor.check_once() is Condition.OK
                infos = [r for r in caplog.records if r.levelname == "INFO"]
                assert len(infos) == 1 and "over" in infos[0].getMessage()
                assert monitor.health().ok
                assert sample(metrics, "party_sync_actions_stream_pending") == 0
                assert sample(metrics, "party_sync_actions_stream_consumers_active") == 1
                assert sample(metrics, "party_sync_engine_link_ok") == 1
                worker.send_signal(signal.SIGKILL)
                worker.wait(10)

            # The worker is dead: its consumer stays in the group but stops reading; once it
            # has been idle longer than active_within, new actions wait with no consumer.
            await append_entries(client, 2)
            await check_until(monitor, Condition.WAITING)
            assert sample(metrics, "party_sync_actions_stream_consumers") == 1
            assert sample(metrics, "party_sync_actions_stream_consumers_active") == 0
            assert sample(metrics, "party_sync_actions_stream_lag") == 2
            assert "none of the 1 consumer(s)" in monitor.health().detail
            warnings = [r for r in caplog.records if r.levelname == "WARNING"]
            assert len(warnings) == 2  # a second episode: one more warning, not one per look
    finally:
        await client.aclose()
        await monitor.stop()


async def test_monitor_survives_redis_going_away_and_a_restart_that_loses_the_group(
    redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics("n1")
    monitor = StreamMonitor.for_redis(redis.url, STREAM, metrics=metrics)
    client = Redis.from_url(redis.url)
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER), engine_worker(redis, tmp_path):
            await append_entries(client, 1)
            await check_until(monitor, Condition.OK)
            redis.stop()
            assert await monitor.check_once() is None
            assert await monitor.check_once() is None
            assert not monitor.health().ok
            assert "cannot read party_sync:actions" in monitor.health().detail
            errors = metrics.registry.get_sample_value(
                "party_sync_background_errors_total", {"task": "stream_monitor"}
            )
            assert errors == 2
            redis.start()  # empty: no stream, no group, until the worker makes them again
            await check_until(monitor, Condition.OK)
        failing = [r.getMessage() for r in caplog.records if "cannot read Redis" in r.getMessage()]
        assert len(failing) == 2  # one WARNING when it began, one INFO when it was over
    finally:
        await client.aclose()
        await monitor.stop()


async def test_a_live_worker_with_nothing_to_read_stays_active(
    redis: RedisServer, tmp_path: Path
) -> None:
    """Redis before 7.2 does not refresh a consumer's idle when a read finds nothing: a worker
    polling an empty stream looked dead (readyz degraded, consumers_active 0) once it had been
    quiet for active_within. Its heartbeats (``<stream>:workers``) keep it active."""
    client = Redis.from_url(redis.url)
    version = tuple(int(p) for p in (await client.info("server"))["redis_version"].split(".")[:2])
    if version >= (7, 2):
        await client.aclose()
        pytest.skip("Redis 7.2 and later refresh idle on every read")
    metrics = Metrics("n1")
    bounds = Bounds(active_within=2.0, stuck_after=60.0)
    monitor = StreamMonitor.for_redis(redis.url, STREAM, bounds=bounds, metrics=metrics)
    try:
        with engine_worker(redis, tmp_path):
            await append_entries(client, 1)  # Redis 7.0 makes the consumer when it is given one
            await check_until(monitor, Condition.OK)

            async def idle_past_the_limit() -> bool:
                consumers = await client.xinfo_consumers(STREAM, "campaign-engine")
                return bool(consumers) and int(consumers[0]["idle"]) > 2500

            async with asyncio.timeout(20):
                while not await idle_past_the_limit():  # noqa: ASYNC110 (another process)
                    await asyncio.sleep(0.1)
            assert await monitor.check_once() is Condition.OK
            assert sample(metrics, "party_sync_actions_stream_consumers_active") == 1
            assert sample(metrics, "party_sync_actions_stream_consumers") == 1
    finally:
        await client.aclose()
        await monitor.stop()


async def test_readyz_names_a_missing_engine_worker_and_stays_200(redis: RedisServer) -> None:
    settings = make_settings(redis_url=redis.url, engine_transport="stream")
    async with serve_in_process(settings) as srv:

        async def readyz() -> tuple[int, dict[str, Any]]:
            async with srv.http.get(srv.base + "/readyz") as resp:
                return resp.status, await resp.json()

        async with asyncio.timeout(10):
            status, body = await readyz()
            while "not checked yet" in body["engine"]["detail"]:
                await asyncio.sleep(0.02)  # the monitor's first look runs at start-up
                status, body = await readyz()
        assert status == 200
        assert body["status"] == "degraded"
        assert body["backend"] == {"name": "redis", "ok": True}
        assert body["engine"]["transport"] == "stream"
        assert body["engine"]["ok"] is False
        assert "no engine worker consumes party_sync:actions" in body["engine"]["detail"]
        async with srv.http.get(srv.base + "/metrics") as resp:
            text = await resp.text()
        assert "party_sync_actions_stream_lag 0.0" in text
        assert "party_sync_engine_link_ok 0.0" in text

        redis.stop()  # the backend unusable: the node cannot serve → 503
        async with asyncio.timeout(15):
            status, body = await readyz()
            while status != 503:
                await asyncio.sleep(0.05)  # the backend notices in its own time, bounded
                status, body = await readyz()
        assert body["status"] == "unavailable"
        assert body["backend"] == {"name": "redis", "ok": False}


async def test_the_backlog_is_counted_without_reading_it_when_redis_cannot_tell_the_lag(
    redis: RedisServer,
) -> None:
    """Workers delete what they handled: with the newest delivered entry deleted while an older
    one is pending, Redis reports no ``lag``. The undelivered count is then what is neither
    pending nor deleted (it was counted by reading up to a thousand entries, each up to the
    message size limit, at every look of every node)."""
    client = Redis.from_url(redis.url)
    try:
        await client.xgroup_create("mon:actions", "campaign-engine", id="0", mkstream=True)
        for n in range(3):
            await client.xadd("mon:actions", {"n": str(n)})
        read: Any = await client.xreadgroup("campaign-engine", "w1", {"mon:actions": ">"}, count=3)
        newest = read[0][1][-1][0]
        await client.xack("mon:actions", "campaign-engine", newest)
        await client.xdel("mon:actions", newest)
        for n in range(5):
            await client.xadd("mon:actions", {"n": str(10 + n), "big": "x" * 1000})
        groups: Any = await client.xinfo_groups("mon:actions")
        assert groups[0]["lag"] is None  # the case: Redis cannot tell
        monitor = StreamMonitor.for_redis(redis.url, "mon:actions")
        await client.config_resetstat()
        try:
            await monitor.check_once()
        finally:
            await monitor.stop()
        stats: Any = await client.info("commandstats")
        # one XRANGE of one entry (the oldest undelivered's age), no scan of the backlog
        assert stats["cmdstat_xrange"]["calls"] == 1
    finally:
        await client.aclose()
    reading = monitor.reading
    assert reading is not None
    assert (reading.length, reading.pending, reading.undelivered) == (7, 2, 5)
    assert reading.oldest_undelivered_age >= 0.0


@pytest.mark.parametrize(
    ("delivered_all", "entries_read"), [(True, 1), (False, 1), (False, 7), (False, 9)]
)
async def test_a_lag_redis_miscounts_is_not_reported_as_waiting_entries(
    redis: RedisServer, delivered_all: bool, entries_read: int
) -> None:
    """Redis's ``lag`` is entries-added minus the group's entries-read; after a Sentinel failover
    the promoted replica's group counted 935 on an empty stream, for good, and the node reported
    935 entries waiting (``/readyz``, ``party_sync_actions_stream_lag``, and with no worker the
    "entries wait and no worker" warning). The same count, made here with ``XGROUP SETID ...
    ENTRIESREAD``: everything delivered reads 0; otherwise no more than the stream holds. And
    the other way (Redis says lag 0, or -2, with an entry waiting): that entry."""
    client = Redis.from_url(redis.url)
    try:
        await client.xgroup_create("lag:actions", "campaign-engine", id="0", mkstream=True)
        for n in range(6):
            await client.xadd("lag:actions", {"n": str(n)})
        read: Any = await client.xreadgroup("campaign-engine", "w1", {"lag:actions": ">"}, count=6)
        ids = [entry_id for entry_id, _ in read[0][1]]
        await client.xack("lag:actions", "campaign-engine", *ids)
        await client.xdel("lag:actions", *ids)
        if not delivered_all:
            await client.xadd("lag:actions", {"n": "late"})
        last = ids[-1].decode()
        await client.execute_command(  # type: ignore[no-untyped-call]
            "XGROUP", "SETID", "lag:actions", "campaign-engine", last, "ENTRIESREAD", entries_read
        )
        groups: Any = await client.xinfo_groups("lag:actions")
        added = 6 if delivered_all else 7
        assert groups[0]["lag"] == added - entries_read  # miscounted, as after a failover
        monitor = StreamMonitor.for_redis(redis.url, "lag:actions")
        try:
            await monitor.check_once()
        finally:
            await monitor.stop()
    finally:
        await client.aclose()
    reading = monitor.reading
    assert reading is not None
    assert reading.undelivered == (0 if delivered_all else 1)
    assert reading.length == (0 if delivered_all else 1)


async def test_a_worker_that_drops_this_deployments_entries_shows_in_the_monitor(
    redis: RedisServer,
) -> None:
    """New-user probe: a worker given the wrong --redis-prefix runs none of this deployment's
    entries (they carry its prefix), so every action times out, while the node said ready and
    engine_link_ok 1 (a live consumer, nothing waiting). The worker marks the stream, and the
    node's monitor says foreign_worker until the mark lapses."""
    from party_sync.engine.stream_link import StreamEngineLink
    from party_sync.engine.stream_worker import StreamWorker, WorkerOptions
    from ps_testkit.engines import ScriptedEngine
    from ps_testkit.hosts import RecordingHost, make_action

    metrics = Metrics("n1")
    monitor = StreamMonitor.for_redis(redis.url, STREAM, metrics=metrics, prefix="depA")
    link = StreamEngineLink(redis.url, STREAM, 1000, prefix="depA")
    client = Redis.from_url(redis.url, socket_timeout=3.0)
    host, engine = RecordingHost(), ScriptedEngine()
    worker = StreamWorker(
        engine,
        host,
        client,
        WorkerOptions(stream=STREAM, consumer="wrong", block=0.1, prefix="depB"),
    )
    task = asyncio.get_running_loop().create_task(worker.run())
    try:
        await asyncio.wait_for(worker.serving.wait(), 10)
        await link.submit(make_action("lost"))
        await wait_until(lambda: worker.foreign == 1, timeout=10)
        assert await monitor.check_once() is Condition.FOREIGN
        assert "redis_prefix 'depB'" in monitor.health().detail
        assert not monitor.health().ok and sample(metrics, "party_sync_engine_link_ok") == 0
        await client.delete("party_sync:actions:foreign:depA")  # the mark lapsed
        assert await monitor.check_once() is Condition.OK
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        await client.aclose()
        await link.close()
        await monitor.stop()
    assert engine.calls == []
