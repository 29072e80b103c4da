"""Stream mode: watch the actions stream's backlog and its engine workers (docs/engines.md).

With no engine worker, accepted actions wait in the stream and nothing else says so. Every serving
node therefore looks at the stream every ``interval`` seconds (XINFO STREAM, XINFO GROUPS, XPENDING
summary, XINFO CONSUMERS; an XRANGE of one entry when some wait undelivered; in the node's first
interval, every ``QUICK`` seconds while the link is not OK yet, so that a worker started beside
the node makes ``/readyz`` ready at once; so too in the interval after Redis could not be read,
while the workers reconnect) and

- exports gauges: length, pending, lag (not yet delivered), oldest pending / undelivered age,
  consumers and consumers active recently (``party_sync_actions_stream_*``);
- logs one WARNING when actions wait with no active consumer (no consumer group yet, or no
  consumer that read within ``active_within``), when there is still no active consumer at the
  second look even with nothing waiting (an engine missing while the players are idle), or
  when the oldest waits longer than ``stuck_after``, and one INFO when that is over
  (:class:`~party_sync.tasks.Episode`);
- answers ``/readyz``'s engine part (degraded, not 503: the node still serves).

A live ``engine-worker`` asks for entries every second (``XREADGROUP BLOCK 1000``) and notes
that it did, at most once a second, in ``<stream>:workers`` (consumer → time); a worker whose last
note, or whose ``idle`` (XINFO CONSUMERS: Redis 7.2 and later refresh it on every read, earlier
ones only when entries are handed out), is older than ``active_within`` is dead or wedged.
Redis errors are counted (``party_sync_background_errors_total{task="stream_monitor"}``), logged
once per episode, and the loop carries on. A missing stream or group (``no such key`` /
``NOGROUP``) is no error: no engine worker has joined yet (workers create the group, from the
stream's beginning).

The pure part (:func:`assess`) takes a :class:`StreamReading` and decides; :func:`read_stream` and
:class:`StreamMonitor` only talk to Redis and arm the timer.

**Partitions** (``actions_stream_partitions`` = N > 1): every partition stream is read and
assessed on its own (:func:`assess_all`: the worst partition's condition is the link's, so a
partition no worker reads shows up even while the others are served); the existing gauges hold
the partitions together (:func:`combine`: lengths, pending and lag summed, ages the oldest,
``consumers`` the most and ``consumers_active`` the fewest of any partition), and
``party_sync_actions_stream_partition_{length,pending,lag,consumers_active}{partition="<i>"}``
each partition's own (only with N > 1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ResponseError

from party_sync import logs
from party_sync.backends.redis_connect import RedisTarget, make_any_client
from party_sync.engine import partitions as layout
from party_sync.engine.health import EngineHealth, Periodic
from party_sync.metrics import Metrics
from party_sync.tasks import Episode

log = logging.getLogger(__name__)

#: Seconds between the quick re-checks of a link that is not OK yet in the node's first interval.
QUICK = 0.5

#: The consumer group ``party-sync engine-worker`` joins by default (``--group``).
ENGINE_GROUP = "campaign-engine"


@dataclass(frozen=True, slots=True)
class StreamReading:
    """One look at the actions stream and the engine's group; ages in seconds."""

    stream_exists: bool = False
    group_exists: bool = False
    length: int = 0
    pending: int = 0  # delivered to a consumer, not yet acknowledged
    undelivered: int = 0  # not yet delivered to the group (its lag); all of it with no group
    consumers: int = 0
    active_consumers: int = 0
    oldest_pending_age: float = 0.0
    oldest_undelivered_age: float = 0.0
    #: The ``redis_prefix`` of an engine worker that drops this deployment's entries (another
    #: deployment's worker on this stream, or one given the wrong ``--redis-prefix``), or ""
    foreign: str = ""

    @property
    def waiting(self) -> int:
        return self.pending + self.undelivered


@dataclass(frozen=True, slots=True)
class Bounds:
    """``active_within``: a consumer idle longer than this is not active; ``stuck_after``: an
    action waiting longer than this (with an active consumer) means the backlog is stuck."""

    active_within: float = 15.0
    stuck_after: float = 60.0


class Condition(StrEnum):
    OK = "ok"  # an active consumer, nothing stuck
    NO_WORKER = "no_worker"  # no active consumer, nothing waits (yet)
    WAITING = "waiting_no_worker"  # actions wait and no active consumer will take them
    STUCK = "stuck"  # consumers active, but the oldest action has waited too long
    FOREIGN = "foreign_worker"  # a worker of another deployment takes our entries and drops them


def assess(
    reading: StreamReading, stream: str, group: str, bounds: Bounds
) -> tuple[Condition, str]:
    """What an operator should know about ``reading``: the condition and a one-line detail."""
    if reading.foreign:
        return Condition.FOREIGN, (
            f"an engine worker with redis_prefix {reading.foreign!r} takes this deployment's "
            f"entries from {stream} and runs none of them (another deployment's worker, or one "
            "given the wrong --redis-prefix or --stream): its actions will time out"
        )
    if not reading.group_exists or reading.active_consumers == 0:
        if not reading.stream_exists:
            why = f"stream {stream} does not exist yet"
        elif not reading.group_exists:
            why = f"no consumer group {group!r}"
        elif reading.consumers == 0:
            why = f"consumer group {group!r} has no consumer"
        else:
            why = (
                f"none of the {reading.consumers} consumer(s) of group {group!r} read in the "
                f"last {bounds.active_within:g}s"
            )
        if reading.waiting:
            oldest = max(reading.oldest_pending_age, reading.oldest_undelivered_age)
            return Condition.WAITING, (
                f"{_entries(reading.waiting)} (actions and party notices) wait on {stream} "
                f"(oldest {oldest:.0f}s) and no engine worker consumes it: {why}"
            )
        return Condition.NO_WORKER, f"no engine worker consumes {stream}: {why}"
    oldest = max(reading.oldest_pending_age, reading.oldest_undelivered_age)
    if reading.waiting and oldest > bounds.stuck_after:
        return Condition.STUCK, (
            f"the oldest action on {stream} has waited {oldest:.0f}s "
            f"({reading.pending} pending, {reading.undelivered} undelivered, "
            f"{reading.active_consumers} active consumer(s): engine-worker read loops)"
        )
    return Condition.OK, (
        f"{reading.active_consumers} consumer(s) (engine-worker read loops) consume {stream} "
        f"({_entries(reading.waiting)} waiting)"
    )


def _entries(count: int) -> str:
    """``count`` stream entries, in words: each is an action or a party notice (a join, a
    restate) that the engine reads from the same stream."""
    return f"{count} entr{'y' if count == 1 else 'ies'}"


#: Which condition wins when partitions differ: the first of these that any partition is in.
SEVERITY = (
    Condition.FOREIGN,
    Condition.WAITING,
    Condition.STUCK,
    Condition.NO_WORKER,
    Condition.OK,
)


def assess_all(
    readings: Sequence[StreamReading], streams: Sequence[str], group: str, bounds: Bounds
) -> tuple[Condition, str]:
    """:func:`assess` over every partition (``readings[i]`` of ``streams[i]``): the worst
    condition, with its partition's detail (and how many partitions share it)."""
    if len(readings) != len(streams) or not readings:
        raise ValueError("one reading per stream, at least one")
    if len(readings) == 1:
        return assess(readings[0], streams[0], group, bounds)
    verdicts = [assess(r, name, group, bounds) for r, name in zip(readings, streams, strict=True)]
    worst = min(verdicts, key=lambda verdict: SEVERITY.index(verdict[0]))
    same = sum(1 for condition, _ in verdicts if condition is worst[0])
    if same == 1:
        return worst
    return worst[0], f"{worst[1]} (and {same - 1} more of the {len(readings)} partitions)"


def combine(readings: Sequence[StreamReading]) -> StreamReading:
    """The partitions as one reading (the existing gauges): counts summed, ages the oldest,
    ``consumers`` the most and ``active_consumers`` the fewest of any partition."""
    if len(readings) == 1:
        return readings[0]
    return StreamReading(
        stream_exists=any(r.stream_exists for r in readings),
        group_exists=all(r.group_exists for r in readings),
        length=sum(r.length for r in readings),
        pending=sum(r.pending for r in readings),
        undelivered=sum(r.undelivered for r in readings),
        consumers=max(r.consumers for r in readings),
        active_consumers=min(r.active_consumers for r in readings),
        oldest_pending_age=max(r.oldest_pending_age for r in readings),
        oldest_undelivered_age=max(r.oldest_undelivered_age for r in readings),
        foreign=next((r.foreign for r in readings if r.foreign), ""),
    )


def entry_age(entry_id: bytes | str, now_ms: int) -> float:
    """Seconds since the entry was appended (its id's first part is Redis's clock in ms)."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return max(0.0, (now_ms - int(raw.split("-", 1)[0])) / 1000)


def _missing(exc: ResponseError) -> bool:
    text = str(exc)
    return text.startswith("NOGROUP") or "no such key" in text.lower()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def read_stream(
    redis: Redis | RedisCluster,
    stream: str,
    group: str,
    active_within: float,
    prefix: str | None = None,
) -> StreamReading:
    """Read the stream and ``group`` (and, given this deployment's ``prefix``, whether a worker
    of another drops its entries); Redis errors raise (a missing stream or group does not)."""
    reading = await _read_stream(redis, stream, group, active_within)
    if prefix is None:
        return reading
    foreign = await redis.get(layout.foreign_key(stream, prefix))
    return reading if not foreign else replace(reading, foreign=_text(foreign))


async def _read_stream(
    redis: Redis | RedisCluster, stream: str, group: str, active_within: float
) -> StreamReading:
    seconds, micros = await redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000  # Redis's clock: the one in entry ids
    try:
        info: dict[str, Any] = await redis.xinfo_stream(stream)
        groups: list[dict[str, Any]] = await redis.xinfo_groups(stream)
    except ResponseError as exc:
        if _missing(exc):
            return StreamReading()
        raise
    length = int(info["length"])
    found = next((g for g in groups if _text(g["name"]) == group), None)
    first = info.get("first-entry")
    no_group = StreamReading(
        stream_exists=True,
        length=length,
        undelivered=length,
        oldest_undelivered_age=entry_age(first[0], now_ms) if first else 0.0,
    )
    if found is None:
        return no_group
    last_delivered = found["last-delivered-id"]
    try:
        consumers: list[dict[str, Any]] = await redis.xinfo_consumers(stream, group)
        summary: dict[str, Any] = await redis.xpending(stream, group)
        # Redis's lag is entries-added minus the group's entries-read, and that count is not to
        # be trusted either way: after a failover (a promoted replica's group) it was found 935
        # on an empty stream, for good; it can be 0 with entries waiting; and it is absent
        # (None) when an entry at or after the last delivered one was deleted. So it is checked
        # against the stream itself: whether anything follows the last delivered entry (one
        # XRANGE of one entry; reading them all to count would fetch up to the message size
        # limit per entry, at every look), and at most what is neither pending nor deleted
        # (workers delete what they handled, XACK + XDEL, never an entry still pending).
        lag = found.get("lag")
        oldest_undelivered = 0.0
        if _text(last_delivered) == _text(info["last-generated-id"]):
            lag = 0  # everything was delivered
        else:
            after = await redis.xrange(stream, f"({_text(last_delivered)}", "+", count=1)
            first_id = after[0][0] if after else None
            if not first_id:  # nothing follows the last delivered: none waits
                lag = 0
            else:
                oldest_undelivered = entry_age(first_id, now_ms)
                most = max(1, length - int(summary.get("pending") or 0))
                lag = most if lag is None else min(max(int(lag), 1), most)
    except ResponseError as exc:
        if _missing(exc):  # the group went away between two commands
            return no_group
        raise
    limit_ms = active_within * 1000
    # Workers' own heartbeats (Redis < 7.2 leaves a consumer's idle alone when a read finds
    # nothing, and creates a consumer only when it is given an entry): a consumer seen within
    # the limit by either measure is active, each counted once (the larger of the two counts
    # missed the busy ones when others were idle).
    key = layout.workers_key(stream)
    beating: Any = await redis.zrangebyscore(key, now_ms - int(limit_ms), "+inf")
    known = int(await redis.zcard(key))
    active = {_text(name) for name in beating} | {
        _text(c["name"]) for c in consumers if int(c["idle"]) <= limit_ms
    }
    pending = int(summary.get("pending") or 0)
    oldest = summary.get("min")
    return StreamReading(
        stream_exists=True,
        group_exists=True,
        length=length,
        pending=pending,
        undelivered=int(lag),
        consumers=max(len(consumers), known),
        active_consumers=len(active),
        oldest_pending_age=entry_age(oldest, now_ms) if pending and oldest else 0.0,
        oldest_undelivered_age=oldest_undelivered,
    )


Readings = StreamReading | Sequence[StreamReading]


class StreamMonitor:
    """The periodic task; ``read`` returns a fresh :class:`StreamReading` (Redis, or a fake), or
    one per partition stream (``partitions`` > 1: ``streams``, partition 0 first)."""

    def __init__(
        self,
        read: Callable[[], Awaitable[Readings]],
        stream: str,
        group: str = ENGINE_GROUP,
        *,
        interval: float = 5.0,
        bounds: Bounds | None = None,
        metrics: Metrics | None = None,
        close: Callable[[], Awaitable[None]] | None = None,
        partitions: int = 1,
    ) -> None:
        self.stream = stream
        self.streams = layout.stream_names(stream, partitions)
        self.readings: tuple[StreamReading, ...] = ()  # the last, one per partition
        self.group = group
        self.interval = interval
        self.bounds = bounds or Bounds()
        self.metrics = metrics
        self.reading: StreamReading | None = None
        self.condition: Condition | None = None
        self.errors = 0
        self._read = read
        self._close = close
        self._health = EngineHealth("stream", True, f"{stream}: not checked yet")
        self._alarm = Episode(log, "engine link")
        self._failing = Episode(log, "actions stream monitor cannot read Redis")
        # Ticks every QUICK s at most: a look is due every ``interval``; in the node's first
        # interval, while the link is not OK, it looks again at each tick (the stream and its
        # workers often appear a moment after the node starts, and /readyz said degraded until
        # the next look, five seconds on).
        self._periodic = Periodic(self._tick, min(interval, QUICK))
        self._next_look: float | None = None  # monotonic time of the next counted look
        self._starting = True  # in the first interval, until the link is OK
        # Redis could not be read, and now can: the workers could not note their reads meanwhile
        # (they reconnect too), so a link that is not OK yet is looked at again at each quick
        # tick until it is, or until the next look (a long stall said "degraded" for up to an
        # interval after it, with the workers already back).
        self._after_outage = False
        self._no_worker_checks = 0  # consecutive checks that found no worker, nothing waiting
        self.checks = 0

    @classmethod
    def for_redis(
        cls,
        redis_url: str | RedisTarget,
        stream: str,
        group: str = ENGINE_GROUP,
        *,
        interval: float = 5.0,
        bounds: Bounds | None = None,
        metrics: Metrics | None = None,
        partitions: int = 1,
        prefix: str | None = None,
    ) -> StreamMonitor:
        """``prefix``: this deployment's ``redis_prefix``, to learn of a worker that drops its
        entries (``partitions.foreign_key``)."""
        redis = make_any_client(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        bounds = bounds or Bounds()
        streams = layout.stream_names(stream, partitions)

        async def read() -> tuple[StreamReading, ...]:
            # One partition after the other: on a cluster each may be on another shard.
            return tuple(
                [
                    await read_stream(redis, name, group, bounds.active_within, prefix)
                    for name in streams
                ]
            )

        return cls(
            read,
            stream,
            group,
            interval=interval,
            bounds=bounds,
            metrics=metrics,
            close=redis.aclose,
            partitions=partitions,
        )

    def health(self) -> EngineHealth:
        return self._health

    async def check_once(self, *, look: bool = True) -> Condition | None:
        """One look; the condition, or None when the stream could not be read (error counted).
        ``look`` False: a quick re-check at start, not counted as a look for the no-worker
        WARNING (it comes at the second look, one ``interval`` after the first)."""
        try:
            got = await self._read()
            readings = (got,) if isinstance(got, StreamReading) else tuple(got)
            if len(readings) != len(self.streams):
                raise ValueError(f"{len(readings)} readings for {len(self.streams)} streams")
        except Exception as exc:  # Redis down, stalled, or worse: count, say once, carry on
            self.errors += 1
            if self.metrics is not None:
                self.metrics.background_errors.labels("stream_monitor").inc()
            said = logs.REDACTOR.scrub(" ".join(str(exc).split()))[:300]  # (redis-py's reprs)
            detail = f"cannot read {self.stream}: {type(exc).__name__}: {said}"
            self._failing.trouble(type(exc).__name__, detail, stream=self.stream)
            self._health = EngineHealth("stream", False, detail)
            if self.metrics is not None:
                self.metrics.engine_link_ok.set(0)
            return None
        if self._failing.active:
            self._after_outage = True
        self._failing.fine(f"reading {self.stream} again", stream=self.stream)
        reading = combine(readings)
        condition, detail = assess_all(readings, self.streams, self.group, self.bounds)
        self.reading, self.readings, self.condition = reading, readings, condition
        self._health = EngineHealth("stream", condition is Condition.OK, detail)
        extra = {"stream": self.stream, "group": self.group, "waiting": reading.waiting}
        # No worker with nothing waiting: a WARNING too from the second look on (not at the
        # first, when the workers may be starting beside this node).
        no_worker = condition is Condition.NO_WORKER
        if not no_worker:
            self._no_worker_checks = 0
        elif look:
            self._no_worker_checks += 1
        if condition in (Condition.WAITING, Condition.STUCK, Condition.FOREIGN) or (
            no_worker and (self._no_worker_checks >= 2 or self._alarm.active)
        ):
            self._alarm.trouble(condition.value, detail, **extra)
        elif condition is Condition.OK:
            self._alarm.fine(detail, **extra)
        self._export(reading, condition)
        return condition

    def _export(self, reading: StreamReading, condition: Condition) -> None:
        m = self.metrics
        if m is None:
            return
        m.stream_length.set(reading.length)
        m.stream_pending.set(reading.pending)
        m.stream_lag.set(reading.undelivered)
        m.stream_oldest_pending.set(reading.oldest_pending_age)
        m.stream_oldest_undelivered.set(reading.oldest_undelivered_age)
        m.stream_consumers.set(reading.consumers)
        m.stream_consumers_active.set(reading.active_consumers)
        m.engine_link_ok.set(1 if condition is Condition.OK else 0)
        if len(self.readings) > 1:
            for index, one in enumerate(self.readings):
                label = str(index)
                m.stream_partition_length.labels(label).set(one.length)
                m.stream_partition_pending.labels(label).set(one.pending)
                m.stream_partition_lag.labels(label).set(one.undelivered)
                m.stream_partition_consumers_active.labels(label).set(one.active_consumers)

    async def _tick(self) -> None:
        now = time.monotonic()
        due = self._next_look is None or now >= self._next_look
        if due:
            if self._next_look is not None:
                self._starting = False  # the second look: the start is over
                self._after_outage = False  # (set again by this look if it is the first read)
            # on the interval's beat (not a tick later each time), unless far behind (a slow look)
            beat = self._next_look if self._next_look is not None else now
            self._next_look = (beat if now - beat <= QUICK else now) + self.interval
        elif not ((self._starting or self._after_outage) and not self._health.ok):
            return
        try:
            await self.check_once(look=due)
            if self._health.ok:
                self._starting = self._after_outage = False
        except Exception:  # a bug in the assessment must not end the monitor either
            if self.metrics is not None:
                self.metrics.background_errors.labels("stream_monitor").inc()
            if self._failing.kind != "bug":
                log.exception("actions stream monitor failed; it carries on")
            self._failing.kind = "bug"
        self.checks += 1

    async def start(self) -> None:
        self._next_look, self._starting = None, True
        self._periodic.start()

    async def stop(self) -> None:
        try:
            await self._periodic.stop()
        finally:  # (its client closed even when the stop was cancelled)
            if self._close is not None:
                await self._close()
