"""The actions-stream monitor's decisions, episodes and gauges, fed fake readings."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
from party_sync.engine.health import Episode, HttpProbe, Periodic
from party_sync.engine.stream_monitor import (
    ENGINE_GROUP,
    Bounds,
    Condition,
    StreamMonitor,
    StreamReading,
    assess,
    entry_age,
)
from party_sync.engine.stream_worker import WorkerOptions
from party_sync.metrics import Metrics
from redis.exceptions import ConnectionError as RedisConnectionError

STREAM = "party_sync:actions"
BOUNDS = Bounds(active_within=15.0, stuck_after=60.0)
NO_STREAM = StreamReading()
NO_GROUP_BACKLOG = StreamReading(
    stream_exists=True, length=3, undelivered=3, oldest_undelivered_age=12.0
)
DEAD_WORKER = StreamReading(
    stream_exists=True,
    group_exists=True,
    length=5,
    pending=1,
    undelivered=2,
    consumers=1,
    active_consumers=0,
    oldest_pending_age=40.0,
)
HEALTHY = StreamReading(
    stream_exists=True, group_exists=True, length=5, consumers=2, active_consumers=1
)
STUCK = StreamReading(
    stream_exists=True,
    group_exists=True,
    length=5,
    pending=1,
    consumers=1,
    active_consumers=1,
    oldest_pending_age=61.0,
)


def test_the_monitor_watches_the_group_engine_workers_join_by_default() -> None:
    assert WorkerOptions().group == ENGINE_GROUP


@pytest.mark.parametrize(
    ("reading", "condition", "words"),
    [
        (NO_STREAM, Condition.NO_WORKER, "does not exist yet"),
        (StreamReading(stream_exists=True, length=0), Condition.NO_WORKER, "no consumer group"),
        (NO_GROUP_BACKLOG, Condition.WAITING, "3 action(s) wait"),
        (DEAD_WORKER, Condition.WAITING, "none of the 1 consumer(s)"),
        (HEALTHY, Condition.OK, "1 engine worker(s) consume"),
        (STUCK, Condition.STUCK, "has waited 61s"),
    ],
)
def test_assess_names_what_is_wrong(
    reading: StreamReading, condition: Condition, words: str
) -> None:
    got, detail = assess(reading, STREAM, ENGINE_GROUP, BOUNDS)
    assert got is condition
    assert words in detail
    assert STREAM in detail


def test_a_backlog_younger_than_stuck_after_with_a_live_worker_is_fine() -> None:
    reading = StreamReading(
        stream_exists=True,
        group_exists=True,
        pending=4,
        consumers=1,
        active_consumers=1,
        oldest_pending_age=59.0,
    )
    assert assess(reading, STREAM, ENGINE_GROUP, BOUNDS)[0] is Condition.OK


def test_entry_age_reads_the_clock_in_the_entry_id() -> None:
    assert entry_age(b"1000-0", 4500) == 3.5
    assert entry_age("5000-7", 4500) == 0.0  # a clock a little behind: never negative


def test_an_episode_warns_once_and_says_when_it_is_over(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.episode")
    episode = Episode(logger, "engine link")
    with caplog.at_level(logging.INFO, logger="test.episode"):
        assert episode.trouble("waiting", "3 wait")
        assert not episode.trouble("waiting", "4 wait")  # figures change, the kind does not
        assert episode.trouble("stuck", "stuck for 61s")  # another kind of trouble
        assert episode.fine("back")
        assert not episode.fine("back")
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert levels == [
        ("WARNING", "engine link: 3 wait"),
        ("WARNING", "engine link: stuck for 61s"),
        ("INFO", "engine link: over: back"),
    ]


class Readings:
    """A scripted ``read``: each call returns (or raises) the next item."""

    def __init__(self, *items: StreamReading | Exception) -> None:
        self.items = list(items)

    async def __call__(self) -> StreamReading:
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


async def test_no_worker_warns_once_shows_the_backlog_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics("n1")
    reads = Readings(NO_STREAM, NO_GROUP_BACKLOG, NO_GROUP_BACKLOG, HEALTHY)
    monitor = StreamMonitor(reads, STREAM, metrics=metrics, bounds=BOUNDS)
    with caplog.at_level(logging.INFO, logger="party_sync.engine.stream_monitor"):
        assert await monitor.check_once() is Condition.NO_WORKER
        assert not monitor.health().ok  # no worker at all: degraded, but nothing to warn about
        assert caplog.records == []
        assert await monitor.check_once() is Condition.WAITING
        assert await monitor.check_once() is Condition.WAITING
        assert sample(metrics, "party_sync_actions_stream_lag") == 3
        assert sample(metrics, "party_sync_actions_stream_length") == 3
        assert sample(metrics, "party_sync_actions_stream_oldest_undelivered_seconds") == 12
        assert sample(metrics, "party_sync_engine_link_ok") == 0
        health = monitor.health()
        assert (health.transport, health.ok) == ("stream", False)
        assert "no consumer group 'campaign-engine'" in health.detail
        assert await monitor.check_once() is Condition.OK
    records = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(records) == 2, records
    assert records[0][0] == "WARNING" and "3 action(s) wait" in records[0][1]
    assert records[1][0] == "INFO" and "over" in records[1][1]
    assert monitor.health().ok
    assert sample(metrics, "party_sync_actions_stream_lag") == 0
    assert sample(metrics, "party_sync_actions_stream_consumers") == 2
    assert sample(metrics, "party_sync_actions_stream_consumers_active") == 1
    assert sample(metrics, "party_sync_engine_link_ok") == 1


async def test_redis_errors_are_counted_logged_once_and_survived(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics("n1")
    down = RedisConnectionError("Connection refused")
    monitor = StreamMonitor(Readings(HEALTHY, down, down, down, HEALTHY), STREAM, metrics=metrics)
    with caplog.at_level(logging.INFO, logger="party_sync.engine.stream_monitor"):
        assert await monitor.check_once() is Condition.OK
        for _ in range(3):
            assert await monitor.check_once() is None
        assert not monitor.health().ok
        assert "cannot read party_sync:actions" in monitor.health().detail
        assert await monitor.check_once() is Condition.OK
    labelled = metrics.registry.get_sample_value(
        "party_sync_background_errors_total", {"task": "stream_monitor"}
    )
    assert labelled == 3
    assert monitor.errors == 3
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in messages] == ["WARNING", "INFO"], messages
    assert "Connection refused" in messages[0][1]


async def test_the_monitor_task_keeps_running_through_errors() -> None:
    """The periodic task survives a reading that raises, even a non-Redis error (a bug)."""
    reads = Readings(ValueError("bug"), RedisConnectionError("down"), HEALTHY)
    monitor = StreamMonitor(reads, STREAM, interval=0)
    await monitor.start()
    try:
        while monitor.checks < 3:  # noqa: ASYNC110 (interval 0: each loop turn is one check)
            await asyncio.sleep(0)
    finally:
        await monitor.stop()
    assert monitor.condition is Condition.OK
    assert monitor.errors == 2


async def test_http_probe_degrades_while_the_engine_url_refuses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    up = [False, False, True]
    seen: list[tuple[str, int]] = []

    async def connect(host: str, port: int) -> None:
        seen.append((host, port))
        if not up.pop(0):
            raise ConnectionRefusedError

    metrics = Metrics("n1")
    probe = HttpProbe(
        "http://user:pw@engine.local:8090/actions?key=k", connect=connect, metrics=metrics
    )
    assert probe.health().ok  # nothing known yet
    with caplog.at_level(logging.INFO, logger="party_sync.engine.health"):
        assert not await probe.probe_once()
        assert not await probe.probe_once()
        health = probe.health()
        assert (health.transport, health.ok) == ("http", False)
        assert "http://engine.local:8090/actions unreachable" in health.detail
        assert "pw" not in health.detail and "key" not in health.detail
        assert sample(metrics, "party_sync_engine_link_ok") == 0
        assert await probe.probe_once()
    assert probe.health().ok
    assert seen == [("engine.local", 8090)] * 3
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]


async def test_stop_ends_a_periodic_task_whose_tick_swallowed_the_cancellation() -> None:
    """redis-py can swallow a CancelledError mid-connect; the monitor must stop all the same
    (``party-sync serve`` in stream mode hung on a SIGTERM right after start-up)."""
    started = asyncio.Event()

    async def tick() -> None:
        started.set()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed
            await asyncio.sleep(30)

    periodic = Periodic(tick, interval=30)
    periodic.start()
    await started.wait()
    async with asyncio.timeout(5):
        await periodic.stop()
