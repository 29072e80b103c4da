"""The actions-stream monitor's decisions, episodes and gauges, fed fake readings."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
from party_sync.engine.health import HttpProbe, Periodic
from party_sync.engine.stream_monitor import (
    ENGINE_GROUP,
    QUICK,
    Bounds,
    Condition,
    StreamMonitor,
    StreamReading,
    assess,
    assess_all,
    combine,
    entry_age,
)
from party_sync.engine.stream_worker import WorkerOptions
from party_sync.metrics import Metrics
from party_sync.tasks import Episode
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
        (NO_GROUP_BACKLOG, Condition.WAITING, "3 entries (actions and party notices) wait"),
        (DEAD_WORKER, Condition.WAITING, "none of the 1 consumer(s)"),
        (HEALTHY, Condition.OK, "1 consumer(s) (engine-worker read loops) consume"),
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
    assert (
        records[0][0] == "WARNING" and "3 entries (actions and party notices) wait" in records[0][1]
    )
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
        assert probe._periodic.interval == 1.0  # looked at every second while down
        assert await probe.probe_once()
    assert probe.health().ok
    assert probe._periodic.interval == 5.0  # and every interval again once it is back
    assert seen == [("engine.local", 8090)] * 3
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]


async def test_http_probe_tells_the_link_when_the_engine_url_is_back() -> None:
    """An operator fixed the key and restarted the engine host: /readyz said the key was refused
    for another minute (no delivery came to say otherwise). A URL that accepts connections again
    after it did not is a restarted host: the link forgets what the host of before said."""
    up = [True, False, False, True, True]
    backs: list[int] = []

    async def connect(host: str, port: int) -> None:
        if not up.pop(0):
            raise ConnectionRefusedError

    probe = HttpProbe(
        "http://engine.local:8090/actions", connect=connect, back=lambda: backs.append(1)
    )
    for _ in range(5):
        await probe.probe_once()
    assert backs == [1]  # once, when it came back; not while up, nor while down


async def test_http_probe_looks_every_second_while_the_host_refuses_the_key() -> None:
    """A host restarted with the right key closed its port for about two seconds, between two
    5-s probes: /readyz went on saying the key was refused (outage promises probe). While the
    link is degraded the probe looks every second, so such a restart is seen."""
    up = [True, True, False, True, True]
    refusal: list[str | None] = [None]
    backs: list[int] = []

    async def connect(host: str, port: int) -> None:
        if not up.pop(0):
            raise ConnectionRefusedError

    def back() -> None:
        backs.append(1)
        refusal[0] = None  # (the link forgets the refusal)

    probe = HttpProbe(
        "http://engine.local:8090/actions",
        connect=connect,
        refused=lambda: refusal[0],
        back=back,
    )
    assert await probe.probe_once() and probe._periodic.interval == 5.0
    refusal[0] = "the engine host refused party_sync's API key (HTTP 401)"
    assert await probe.probe_once() and not probe.health().ok
    assert probe._periodic.interval == 1.0  # degraded: every second
    assert not await probe.probe_once()  # the operator restarts the host...
    assert await probe.probe_once()  # ...a second later it is back, with the right key
    assert backs == [1] and probe.health().ok
    assert probe._periodic.interval == 5.0


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


PARTS = ("party_sync:actions:0", "party_sync:actions:1", "party_sync:actions:2")


def test_the_worst_partition_is_the_links_condition_with_its_own_detail() -> None:
    assert assess_all((HEALTHY, HEALTHY, HEALTHY), PARTS, ENGINE_GROUP, BOUNDS)[0] is Condition.OK
    # One partition nobody reads while actions wait there: the others being served hides nothing.
    condition, detail = assess_all((HEALTHY, NO_GROUP_BACKLOG, STUCK), PARTS, ENGINE_GROUP, BOUNDS)
    assert condition is Condition.WAITING
    assert (
        "party_sync:actions:1" in detail and "3 entries (actions and party notices) wait" in detail
    )
    condition, detail = assess_all((STUCK, HEALTHY, STUCK), PARTS, ENGINE_GROUP, BOUNDS)
    assert condition is Condition.STUCK
    assert "party_sync:actions:0" in detail and "1 more of the 3 partitions" in detail
    # A partition without a worker is not OK even with nothing waiting yet.
    condition, _ = assess_all((HEALTHY, NO_STREAM, HEALTHY), PARTS, ENGINE_GROUP, BOUNDS)
    assert condition is Condition.NO_WORKER
    with pytest.raises(ValueError, match="one reading per stream"):
        assess_all((HEALTHY,), PARTS, ENGINE_GROUP, BOUNDS)


def test_one_partition_is_assessed_exactly_as_before() -> None:
    for reading in (NO_STREAM, NO_GROUP_BACKLOG, DEAD_WORKER, HEALTHY, STUCK):
        assert assess_all((reading,), (STREAM,), ENGINE_GROUP, BOUNDS) == assess(
            reading, STREAM, ENGINE_GROUP, BOUNDS
        )
        assert combine((reading,)) == reading


def test_partitions_combine_into_sums_oldest_ages_and_the_fewest_active_consumers() -> None:
    combined = combine((HEALTHY, DEAD_WORKER, NO_GROUP_BACKLOG))
    assert combined.length == 5 + 5 + 3
    assert combined.pending == 1
    assert combined.undelivered == 2 + 3
    assert combined.consumers == 2  # the most of any partition (each worker is in every group)
    assert combined.active_consumers == 0  # some partition has none
    assert combined.oldest_pending_age == 40.0
    assert combined.oldest_undelivered_age == 12.0
    assert combined.stream_exists and not combined.group_exists


async def test_a_partitioned_monitor_exports_the_sums_and_each_partition() -> None:
    metrics = Metrics("n1")

    async def read() -> tuple[StreamReading, ...]:
        return (HEALTHY, DEAD_WORKER, NO_GROUP_BACKLOG)

    monitor = StreamMonitor(read, STREAM, metrics=metrics, bounds=BOUNDS, partitions=3)
    assert monitor.streams == PARTS
    assert await monitor.check_once() is Condition.WAITING
    assert "party_sync:actions:1" in monitor.health().detail  # the first of the two waiting
    assert sample(metrics, "party_sync_actions_stream_length") == 13
    assert sample(metrics, "party_sync_actions_stream_lag") == 5
    assert sample(metrics, "party_sync_actions_stream_consumers_active") == 0

    def part(name: str, index: int) -> float | None:
        return metrics.registry.get_sample_value(
            f"party_sync_actions_stream_partition_{name}", {"partition": str(index)}
        )

    assert [part("length", i) for i in range(3)] == [5, 5, 3]
    assert [part("lag", i) for i in range(3)] == [0, 2, 3]
    assert [part("pending", i) for i in range(3)] == [0, 1, 0]
    assert [part("consumers_active", i) for i in range(3)] == [1, 0, 0]


async def test_one_partition_exports_no_partition_gauges() -> None:
    metrics = Metrics("n1")
    monitor = StreamMonitor(Readings(HEALTHY), STREAM, metrics=metrics, bounds=BOUNDS)
    assert await monitor.check_once() is Condition.OK
    names = {family.name for family in metrics.registry.collect()}
    assert not any("partition" in name for name in names), names


async def test_a_read_with_the_wrong_number_of_partitions_is_a_failed_check() -> None:
    async def read() -> tuple[StreamReading, ...]:
        return (HEALTHY, HEALTHY)

    monitor = StreamMonitor(read, STREAM, bounds=BOUNDS, partitions=3)
    assert await monitor.check_once() is None
    assert monitor.errors == 1
    assert not monitor.health().ok


async def test_no_worker_with_nothing_waiting_warns_from_the_second_look(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An engine missing while the players are idle: degraded at once, and one WARNING at the
    second look (5 s), not the first (the workers may be starting beside the node); one INFO
    when a worker reads again. README: "An engine that is missing or stuck shows in /readyz ...
    in one WARNING when it begins and one INFO when it is over"."""
    reads = Readings(NO_STREAM, NO_STREAM, NO_STREAM, HEALTHY)
    monitor = StreamMonitor(reads, STREAM, interval=5.0, bounds=BOUNDS)
    with caplog.at_level(logging.INFO, logger="party_sync.engine.stream_monitor"):
        assert await monitor.check_once() is Condition.NO_WORKER
        assert not monitor.health().ok
        assert caplog.records == []  # the first look: workers may still be starting
        assert await monitor.check_once() is Condition.NO_WORKER
        assert await monitor.check_once() is Condition.NO_WORKER
        assert await monitor.check_once() is Condition.OK
    records = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in records] == ["WARNING", "INFO"], records
    assert "no engine worker consumes party_sync:actions" in records[0][1]


async def test_a_backlog_drained_with_still_no_worker_does_not_say_it_is_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reads = Readings(NO_GROUP_BACKLOG, NO_STREAM, HEALTHY)
    monitor = StreamMonitor(reads, STREAM, interval=5.0, bounds=BOUNDS)
    with caplog.at_level(logging.INFO, logger="party_sync.engine.stream_monitor"):
        assert await monitor.check_once() is Condition.WAITING
        assert await monitor.check_once() is Condition.NO_WORKER
        assert await monitor.check_once() is Condition.OK
    levels = [r.levelname for r in caplog.records]
    assert levels == ["WARNING", "WARNING", "INFO"], caplog.records
    assert "over" in caplog.records[-1].getMessage()


async def test_a_worker_that_appears_just_after_the_node_starts_is_seen_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In its first interval a node re-checks a link that is not OK at each quick tick: the
    stream and its worker often appear a moment after the node, and /readyz said degraded for
    five seconds more. The quick re-checks are no looks: no WARNING for them."""
    reads = Readings(NO_STREAM, NO_STREAM, NO_STREAM, HEALTHY, *[HEALTHY] * 100)
    monitor = StreamMonitor(reads, STREAM, interval=30.0, bounds=BOUNDS)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.INFO, logger="party_sync.engine.stream_monitor"):
        await monitor.start()
        try:
            while monitor.condition is not Condition.OK:  # noqa: ASYNC110 (its own ticks)
                await asyncio.sleep(0.01)
            seen = loop.time() - started
            checks = monitor.checks
            await asyncio.sleep(3 * QUICK)  # OK now: no more quick re-checks
            assert monitor.checks == checks
        finally:
            await monitor.stop()
    assert seen < 10 * QUICK  # not the next look, 30 s on
    assert checks == 4
    assert [r.levelname for r in caplog.records] == []


async def test_after_redis_could_not_be_read_a_link_not_ok_yet_is_looked_at_quickly() -> None:
    """After a stall the workers' notes are old until they reconnect and read: the first look
    finds no worker. /readyz said degraded until the next look, an interval on, with the
    workers long back (fault probe: 1.5-3 s, up to an interval); now quick re-looks, which stop
    once it is OK, and none while Redis cannot be read."""
    down = ConnectionError("redis is stalled")
    reads = Readings(HEALTHY, down, DEAD_WORKER, DEAD_WORKER, HEALTHY, *[HEALTHY] * 100)
    monitor = StreamMonitor(reads, STREAM, interval=2.5, bounds=BOUNDS)
    loop = asyncio.get_running_loop()
    await monitor.start()
    try:
        while monitor.checks < 2:  # noqa: ASYNC110 (its own ticks: the OK look, the failed one)
            await asyncio.sleep(0.01)
        assert not monitor.health().ok and len(reads.items) == 103  # no quick look while down
        while monitor.checks < 3:  # noqa: ASYNC110 (the next look: no active worker yet)
            await asyncio.sleep(0.01)
        first = monitor.condition
        assert first is not None and first is not Condition.OK, first
        back = loop.time()
        while monitor.condition is not Condition.OK:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        assert loop.time() - back < 2.5 - 0.1  # quick looks (every QUICK), not the next look
        checks = monitor.checks
        await asyncio.sleep(2 * QUICK)  # OK now: no more quick re-checks before the next look
        assert monitor.checks == checks
    finally:
        await monitor.stop()


def test_the_http_links_gauge_agrees_with_readiness_when_asked() -> None:
    """engine_link_ok lagged /readyz by up to a probe interval after a refused key (recheck
    probe): /metrics asks the probe's health first, which sets the gauge to agree."""
    refusal: list[str | None] = [None]
    metrics = Metrics("n1")
    probe = HttpProbe(
        "http://engine.local:8090/actions", metrics=metrics, refused=lambda: refusal[0]
    )
    assert probe.health().ok and sample(metrics, "party_sync_engine_link_ok") == 1
    refusal[0] = "the engine host refused party_sync's API key (HTTP 401)"  # a delivery's 401
    assert not probe.health().ok
    assert sample(metrics, "party_sync_engine_link_ok") == 0  # no probe tick needed
