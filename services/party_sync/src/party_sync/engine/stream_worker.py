"""``party-sync engine-worker``: hosts an engine on the actions stream (docs/engines.md).

Each worker is a consumer of one consumer group. An entry is acknowledged (XACK) only after the
engine has handled it: applied and published, or refused. A worker that dies holding entries
leaves them pending; any worker reclaims them with XAUTOCLAIM once they have been idle for
``claim_idle`` seconds. A live worker keeps the batch it holds its own (``SET_IDLE`` every
``claim_idle / 3``), however long its engine takes. Delivery is therefore *at least once*; the
engine must deduplicate by
``action_id`` (the reference engine records it in the same transaction as the state change), and
party_sync refuses to broadcast a second ``action.result`` for one action, so a result is
broadcast once.

Entry kinds (fields in ``stream_link``): ``action`` → ``Engine.handle_action``; ``join`` →
``Engine.handle_join``; ``restate`` → ``handle_restate`` through ``restate_engine`` (an engine
without it ignores the notice). When one of the engine's own events opens a party's new epoch
(the party's state was lost while no member came back: a failover's fence, a flush), the worker
asks its engine to re-state the party itself, after the entry (``watch``, a
``engine.restating.EpochWatch`` its publisher shows every event to).

**Claim before start.** Right before the engine gets an action, the worker asks party_sync
(``publisher.claim``): ``START`` runs it; ``EXPIRED`` (it waited past its ``deadline``, field
``deadline`` of the entry, and party_sync has refused it with ``action_timeout``) and ``FINAL``
(it already has its final answer) acknowledge the entry without running it. So an action that
waited in the stream while no worker ran is never applied after its sender was told it timed out.
A *redelivered* entry (reclaimed, or re-read from this worker's pending list) is claimed without
its deadline: an earlier delivery may have started it, and only party_sync's record of the action
(which keeps its own deadline) can tell; without a record it runs (the engine deduplicates).

An entry that keeps failing in the engine is retried until ``max_deliveries``, then the player
gets ``engine_error`` (``publisher.fail``) and the entry is acknowledged (dead-lettered in the log
with its trace_id).

**Self-healing.** No Redis or backend error ends ``run``: Redis down at start, a restart, a stall,
a killed connection. A failed round is counted (``errors``), logged at WARNING once per episode
(not per round; the next ones at DEBUG), and retried after a short capped backoff (at most
``retry_max`` seconds, so the worker resumes within about a second of Redis answering); the first
round that works again logs INFO "recovered". When Redis comes back *empty* every group command
answers ``NOGROUP``: the worker then re-creates the group (``XGROUP CREATE … 0 MKSTREAM``; a
``BUSYGROUP`` from another worker that was quicker is fine) and reads from the start of the new
stream, so actions appended since the restart are handled. After any failed round the worker
first re-reads its own pending entries instead of waiting ``claim_idle`` for them, counting no
delivery (``READ_OWN``): ``max_deliveries`` counts the deliveries that failed in the engine or
ended their worker, not Redis's or the backend's outages (a failover's few seconds of failed
rounds once gave a player ``engine_error`` about an applied action). The re-read at start, of
entries a worker of the same consumer name left, counts one each (that worker may have died on
one).

**Partitions** (``actions_stream_partitions`` = N > 1, ``party_sync.engine.partitions``):
:class:`PartitionedWorker` runs one such read loop per partition stream (a cross-slot
XREADGROUP over several streams is refused by a Redis Cluster), each with its own consumer group
(created on that stream), its own XAUTOCLAIM and its own backoff, around one engine: a partition
whose shard is down retries while the others go on. The engine then gets calls from several
loops at once (for different parties; one party's entries are in one partition, handled in
order), as over HTTP. Before it starts, the worker compares N with the count the serving nodes
wrote (``<stream>:partitions``) and refuses to start when they differ (except in ``burst`` mode,
which is how the streams of an old count are drained); while it runs it checks again every
``count_check`` seconds and logs an ERROR once per episode of disagreement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

import orjson
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from party_sync import tracing
from party_sync.backends import redis_fence, shared_settings
from party_sync.backends.keys import ACTIONS_STREAM
from party_sync.core.limits import RateGate
from party_sync.engine import partitions as layout
from party_sync.engine import wire
from party_sync.engine.interface import (
    ENGINE_FAILED,
    ActionRequest,
    Claim,
    Engine,
    EngineRejected,
    LinkHost,
    restate_engine,
    start_engine,
)
from party_sync.engine.restating import EpochWatch
from party_sync.protocol.errors import BackendUnavailable, ConfigError, ErrorCode
from party_sync.tasks import cancel_and_wait

log = logging.getLogger(__name__)
#: Seconds between two heartbeats of a read loop (``partitions.workers_key``).
BEAT_INTERVAL = 1.0
#: Seconds a heartbeat is kept: a worker silent that long is forgotten.
BEAT_KEEP = 300.0

#: Errors of Redis or of party_sync's backend: the round is retried, the worker never stops.
#: (redis-py's cluster client raises ``RedisClusterException``, e.g. ``SlotNotCoveredError`` while
#: a shard is down, which is not a ``RedisError``.)
INFRA_ERRORS = (RedisError, RedisClusterException, BackendUnavailable, OSError, TimeoutError)

#: Deliver again to this consumer (XCLAIM, one delivery more) those of the given entries still
#: pending for it, with their fields. ARGV: group, consumer, ids.
RETRY_OWN = """
local out = {}
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) > 0 then
    local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i])
    if got[1] then
      out[#out + 1] = got[1]
    end
  end
end
return out
"""

#: Sets the idle time of those of the given entries still pending *for this consumer*, re-claimed
#: with ``JUSTID`` (no delivery counted); one that another worker took meanwhile (this one was
#: frozen past ``claim_idle``) is left to it. Idle 0 keeps the entries a worker holds (read, not
#: yet acknowledged) its own while it works on them: no other worker's XAUTOCLAIM takes them from
#: a live worker. ``claim_idle`` minus a wait offers an entry the engine failed on to every
#: worker from the time of its next try (``_engine_failed``): any free worker's (or read loop's)
#: XAUTOCLAIM takes it then, while this one is busy with a slow action. KEYS[1] the stream;
#: ARGV: group, consumer, the idle time in ms, the entry ids. Returns how many it set.
SET_IDLE = """
local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 4, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) > 0 then
    claim[#claim + 1] = ARGV[i]
  end
end
local mine = #claim - 5
if mine > 0 then
  claim[#claim + 1] = 'IDLE'
  claim[#claim + 1] = ARGV[3]
  claim[#claim + 1] = 'JUSTID'
  redis.call(unpack(claim))
end
return mine
"""

#: This consumer's own pending entries after ``ARGV[3]`` (exclusive; '0': from the first), up to
#: ``ARGV[4]``, with their fields (false for one trimmed or deleted meanwhile), re-claimed with
#: ``JUSTID``: their idle time starts again (no other worker takes them while this one handles
#: them) and NO delivery is counted. What a failed round re-reads: its entries failed on Redis or
#: on party_sync's backend, not in the engine, and ``max_deliveries`` counts only deliveries that
#: failed in the engine or ended their worker (``XREADGROUP … 0`` would count one each time: five
#: failed rounds in a Redis failover's three seconds gave a player ``engine_error`` about an
#: action the engine had applied). KEYS[1] the stream; ARGV: group, consumer, after, count.
READ_OWN = """
local start = ARGV[3] == '0' and '-' or '(' .. ARGV[3]
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], start, '+', tonumber(ARGV[4]), ARGV[2])
if #pending == 0 then
  return {}
end
local claim, out = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}, {}
for i, entry in ipairs(pending) do
  claim[#claim + 1] = entry[1]
  local got = redis.call('XRANGE', KEYS[1], entry[1], entry[1])
  out[i] = {entry[1], got[1] and got[1][2] or false}
end
claim[#claim + 1] = 'JUSTID'
redis.call(unpack(claim))
return out
"""

#: A stopping worker leaves its group when nothing is pending for it: it deletes its consumer
#: (which would drop its pending entries: so only when it holds none, checked in the same step).
#: KEYS[1] the stream; ARGV[1] the group, ARGV[2] the consumer. Returns 1 if it left.
LEAVE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then
  return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

#: Consumers that hold nothing and were idle for ``ARGV[2]`` ms leave the group (a worker killed
#: without its leave, an OOM kill, a pod restarted under a new name: each was a consumer for
#: ever; hygiene probe). Atomic with the check: a consumer is deleted only holding nothing, and a
#: live one so deleted (Redis before 7.2 does not refresh an idle reader's ``idle``) is made
#: again by its next read. KEYS[1] the stream; ARGV[1] the group, ARGV[2] the idle time in ms,
#: ARGV[3] the caller (kept). Returns how many left.
FORGET_DEAD = """
local gone = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, pending, idle
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then pending = c[i + 1]
    elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if name ~= ARGV[3] and pending == 0 and idle >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    gone = gone + 1
  end
end
return gone
"""
#: Seconds between two looks for consumers to forget (``FORGET_DEAD``), per read loop; and the
#: least idle time a consumer holding nothing must have to be forgotten.
FORGET_INTERVAL: Final = 60.0
FORGET_IDLE: Final = 600.0


def forget_after(claim_idle: float) -> float:
    """The least idle time of a consumer holding nothing that ``FORGET_DEAD`` deletes."""
    return max(FORGET_IDLE, 10 * claim_idle)


#: XAUTOCLAIM calls a round may make while they claim nothing (each looks at ``batch`` x 10
#: pending entries), before it reads new entries; the next round goes on from there.
RECLAIM_CALLS: Final = 20

#: Seconds between two ERROR lines about entries of another deployment (``_foreign``).
FOREIGN_LOG_INTERVAL: Final = 60.0

#: Seconds a stopping worker gives Redis to take its leave (``StreamWorker.leave``).
LEAVE_WITHIN: Final = 2.0
#: Seconds a loop's rounds may keep failing on an error that is not Redis's as party_sync knows
#: it before the worker ends (a bug: its supervisor restarts it, and the nodes see no consumer).
#: Until then each is logged with its traceback and the round is tried again, as on a Redis
#: error: a client library's own failure while a Cluster fails over (redis-py's writer found
#: torn down, a slot map naming no node for a moment) once ended the worker at once, and every
#: party's actions timed out until someone restarted it (workers probe).
UNEXPECTED_PATIENCE: Final = 30.0

Entry = tuple[bytes, Mapping[bytes, bytes] | None]


def default_consumer() -> str:
    """A consumer name unique per worker process: ``<host>-<pid>``."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    stream: str = ACTIONS_STREAM
    group: str = "campaign-engine"
    consumer: str = field(default_factory=lambda: default_consumer())
    claim_idle: float = 30.0  # seconds before another worker may take over a pending entry
    #: Entries taken at once (own pending, reclaimed, new). 1: an entry waits in the stream,
    #: where any free worker takes it, not behind a slow action in a busy worker's batch.
    batch: int = 1
    block: float = 1.0  # seconds one XREADGROUP may wait
    max_deliveries: int = 5
    burst: bool = False  # stop once the stream has nothing left for this worker (tests, cron)
    keep_handled: bool = False  # leave handled entries in the stream (for another group)
    retry_min: float = 0.05  # first pause after a failed round (doubles up to retry_max)
    retry_max: float = 1.0  # longest pause between two attempts while Redis is unavailable
    #: This worker's ``redis_prefix`` (the deployment whose keys it answers in): an entry whose
    #: ``prefix`` field names another is not run (None: no check)
    prefix: str | None = None


def is_nogroup(exc: BaseException) -> bool:
    """Redis lost the consumer group (or the whole stream): it must be created again."""
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")


class StreamWorker:
    """One consumer of the actions stream; ``run`` until ``stop`` (or idle, in burst mode)."""

    def __init__(
        self,
        engine: Engine,
        publisher: LinkHost,
        redis: Redis | RedisCluster,
        options: WorkerOptions,
        *,
        watch: EpochWatch | None = None,
        clock: Callable[[], float] = time.time,
        had_groups: set[str] | None = None,
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        # the openings the publisher saw (None: it shows none; no re-statement by the worker)
        self.watch = watch
        self.clock = clock
        self.redis = redis
        self.options = options
        self.skipped = 0  # actions acknowledged without running them (claim EXPIRED / FINAL)
        self.foreign = 0  # entries of another deployment (their prefix), acknowledged, not run
        self._foreign_gate = RateGate(FOREIGN_LOG_INTERVAL)
        self.errors = 0  # rounds that failed on Redis or the backend (all survived)
        self.groups_created = 0  # times this worker created the consumer group
        self._group_ready = False
        #: The streams whose group this worker found or made once, shared by the read loops of
        #: one worker: one made again says Redis lost it, whichever loop makes it (a loop that
        #: had not read yet when Redis restarted empty may be the one)
        self._had_groups = had_groups if had_groups is not None else set()
        #: Set once its group was found or made: it reads the stream (the banner waits for it)
        self.serving = asyncio.Event()
        self._degraded = False
        self._unexpected_since: float | None = None  # the first of consecutive unexpected errors
        self._own_cursor: str | None = "0"  # re-read our own pending entries from here
        #: The re-read at start (a worker of this name may have died holding these entries)
        #: is under way; once it is done, a re-read follows a failed round (``_read_own``)
        self._own_at_start = True
        self._claim_cursor = "0-0"  # where the next XAUTOCLAIM goes on looking (``_reclaim``)
        self._forget_at = 0.0  # when to look for consumers gone for good (``_forget_dead``)
        #: Entries the engine failed on, each to be tried again by this worker at its time
        #: (monotonic; ``_engine_failed``: a short backoff, not ``claim_idle`` for XAUTOCLAIM)
        self._retries: dict[bytes, float] = {}
        self._beating: asyncio.Task[None] | None = None  # the heartbeat (workers_key) task
        self._held: list[bytes] = []  # the batch being handled, kept this worker's (_holding)
        #: ``redis_fence.SERVERS.count`` at the start of the last round (None: no round yet)
        self._servers: int | None = None
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    @property
    def degraded(self) -> bool:
        """True while rounds fail (Redis or the backend unavailable)."""
        return self._degraded

    async def run(self) -> None:
        await start_engine(self.engine, self.publisher)
        try:
            await self.consume()
        finally:
            await self.engine.close()

    async def consume(self) -> None:
        """The read loop on ``options.stream`` (the engine already started; ``run`` does both)."""
        try:
            await self._consume()
        finally:  # (cancelled, say: its heartbeat goes with it)
            await self._stop_beating()

    async def _stop_beating(self) -> None:
        if self._beating is not None:
            await cancel_and_wait([self._beating], within=1.0, what="the worker's heartbeat")
            self._beating = None

    async def _consume(self) -> None:
        o = self.options
        log.info(
            "engine worker consuming",
            extra={"stream": o.stream, "group": o.group, "consumer": o.consumer},
        )
        delay = o.retry_min
        while not self._stop.is_set():
            try:
                if not self._group_ready:
                    await self._ensure_group()
                busy = await self._round()
                # openings by the engine's events outside any entry (a timer of its own)
                await self.restate_opened()
            except INFRA_ERRORS as exc:
                self._failed(exc)
                await self._pause(delay)
                delay = min(o.retry_max, delay * 2)
                continue
            except Exception as exc:
                self._failed_unexpectedly(exc)  # raises once they have lasted UNEXPECTED_PATIENCE
                self._failed(exc, logged=True)
                await self._pause(delay)
                delay = min(o.retry_max, delay * 2)
                continue
            delay = o.retry_min
            self._unexpected_since = None
            self._recovered()
            if o.burst and not busy:
                wait = self.next_retry_in()
                if wait is None:
                    break
                await self._pause(wait)  # a failed entry to try again: not done yet
        await self.leave()

    async def leave(self) -> None:
        """A clean stop: this worker's heartbeat goes, and its consumer with it when nothing is
        pending for it, so the nodes' monitor (``/readyz``, ``party_sync_actions_stream_consumers
        _active``) sees it gone at its next look, not ``active_within`` later. Best effort: an
        entry still pending keeps the consumer (another worker claims it after ``claim_idle``),
        and Redis not answering leaves both to age out as a dead worker's would."""
        o = self.options
        await self._stop_beating()  # (a beat still on its way must not come after the ZREM)
        try:
            async with asyncio.timeout(LEAVE_WITHIN):
                await self.redis.zrem(layout.workers_key(o.stream), o.consumer)
                if self._group_ready:
                    await self.redis.eval(LEAVE, 1, o.stream, o.group, o.consumer)
        except INFRA_ERRORS as exc:
            log.debug("could not take leave of %s: %s", o.stream, exc)

    async def _ensure_group(self) -> None:
        o = self.options
        try:
            await self.redis.xgroup_create(o.stream, o.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        else:
            self.groups_created += 1
            # the group this worker read from is gone (the warning comes from whichever of its
            # loops, or whichever worker, makes it again; the others find it: BUSYGROUP)
            if o.stream in self._had_groups:
                log.warning(
                    "consumer group %s was missing (Redis restarted empty or was flushed): "
                    "created it again",
                    o.group,
                    extra={"stream": o.stream},
                )
        self._group_ready = True
        self._had_groups.add(o.stream)
        self.serving.set()

    def _failed_unexpectedly(self, exc: Exception) -> None:
        """A round failed on something other than Redis or the backend: logged with its
        traceback; raised (the worker ends) once such failures have lasted
        ``UNEXPECTED_PATIENCE`` without a good round between them."""
        now = time.monotonic()
        if self._unexpected_since is None:
            self._unexpected_since = now
        elif now - self._unexpected_since >= UNEXPECTED_PATIENCE:
            raise exc
        log.error(
            "unexpected error in a round of the actions stream; trying again (for %.0f s at "
            "most, then the worker ends)",
            UNEXPECTED_PATIENCE,
            exc_info=exc,
            extra={"stream": self.options.stream, "consumer": self.options.consumer},
        )

    def _failed(self, exc: BaseException, *, logged: bool = False) -> None:
        """A failed round: its retry looks at everything again; ``logged``: said already."""
        self.errors += 1
        if is_nogroup(exc):
            self._group_ready = False
        self._own_cursor = "0"  # whatever we were holding is handled first when Redis is back
        self._claim_cursor = "0-0"  # (an emptied Redis has new ids: look from the start)
        if logged:
            self._degraded = True
        elif not self._degraded:
            self._degraded = True
            log.warning(
                "actions stream unavailable (%s: %s); retrying until it answers",
                type(exc).__name__,
                exc,
                extra={"stream": self.options.stream, "consumer": self.options.consumer},
            )
        else:
            log.debug("actions stream still unavailable: %s", exc)

    def _recovered(self) -> None:
        if self._degraded:
            self._degraded = False
            log.info(
                "actions stream recovered (%d failed rounds so far)",
                self.errors,
                extra={"stream": self.options.stream, "consumer": self.options.consumer},
            )

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _round(self) -> bool:
        """One round: our own pending entries first (after a failure), then reclaim idle
        entries, then read new ones. True if anything was handled."""
        o = self.options
        self._after_a_new_server()
        await self._beat()
        entries: list[Entry] = []
        redelivery = True  # our own pending entries and reclaimed ones were delivered before
        if self._own_cursor is None and self._retries:
            entries = await self._retry_due()
        if self._own_cursor is not None:
            entries = await self._read_own(self._own_cursor)
            self._own_cursor = entries[-1][0].decode() if len(entries) >= o.batch else None
            self._own_at_start = self._own_at_start and self._own_cursor is not None
        if not entries:
            entries = await self._reclaim()
            await self._forget_dead()
        if not entries:
            redelivery = False
            block = None if o.burst else int(o.block * 1000)
            read: Any = await self.redis.xreadgroup(
                o.group, o.consumer, {o.stream: ">"}, count=o.batch, block=block
            )
            entries = [e for _, items in read or () for e in items]
        async with self._holding([entry_id for entry_id, _ in entries]):
            left = await self._handle_all(entries, redelivery=redelivery)
        if left:
            await self._hand_back(left)
        return bool(entries)

    async def _hand_back(self, entry_ids: list[bytes]) -> None:
        """Entries this stopping worker read and will not handle: made idle for
        ``claim_idle`` (``SET_IDLE``), so the next worker to look takes them over at once, not
        ``claim_idle`` later (soak probe: an action read by a worker being stopped waited 30 s
        for another and was refused ``action_timeout`` at 10 s). Best effort: if Redis does not
        answer they are taken over after ``claim_idle`` all the same."""
        o = self.options
        idle_ms = int(o.claim_idle * 1000)
        try:
            await self.redis.eval(SET_IDLE, 1, o.stream, o.group, o.consumer, idle_ms, *entry_ids)
        except INFRA_ERRORS as exc:
            log.debug("could not hand back the entries read while stopping: %s", exc)

    def _after_a_new_server(self) -> None:
        """A connection of this process met a Redis server it never met before since the last
        round began (a failover, a restart): what this worker wrote to the old one in its last
        moments may be lost, its acknowledgements too (a promoted replica lacks the old
        master's last writes). So its own pending entries are read again now (``READ_OWN``, no
        delivery counted), as after a failed round, not left to another worker's reclaim
        ``claim_idle`` later (clients probe, a planned Sentinel failover: actions answered in
        its last second were handed to the engine again 30 s later, their results sent to the
        party again then, and their senders refused ``character_busy`` meanwhile). A round is
        handled whole before the next begins, so this loop holds no entry now."""
        servers = redis_fence.SERVERS.count
        if self._servers is not None and servers != self._servers and self._own_cursor is None:
            log.info(
                "a new Redis server (failover or restart): re-reading this worker's own pending "
                "entries",
                extra={"stream": self.options.stream, "consumer": self.options.consumer},
            )
            self._own_cursor = "0"
        self._servers = servers

    async def _read_own(self, after: str) -> list[Entry]:
        """This consumer's pending entries after ``after``: at its start, those a worker of the
        same name left (``XREADGROUP … 0``: a delivery each, since that worker may have died
        on one); after a failed round, those this worker held (``READ_OWN``: no delivery
        counted, the failure was Redis's or the backend's)."""
        o = self.options
        if self._own_at_start:
            read: Any = await self.redis.xreadgroup(
                o.group, o.consumer, {o.stream: after}, count=o.batch
            )
            return [e for _, items in read or () for e in items]
        got: Any = await self.redis.eval(READ_OWN, 1, o.stream, o.group, o.consumer, after, o.batch)
        return [
            (entry_id, dict(zip(raw[::2], raw[1::2], strict=True)) if raw else None)
            for entry_id, raw in got
        ]

    def _foreign(self, prefix: str, kind: str, trace_id: str) -> None:
        """An entry of another deployment (its ``prefix`` field): acknowledged without running
        it, so nothing is answered in this worker's keys (another deployment's party of the
        same id); its own nodes answer an action ``action_timeout`` at its deadline (nobody
        started it). One ERROR a minute, with the count."""
        self.foreign += 1
        if self._foreign_gate.admit(time.monotonic()) is None:
            return
        log.error(
            "%s entry of the deployment with redis_prefix %r, but this worker's is %r: not run "
            "(%d so far; give the worker that deployment's --redis-prefix and --stream)",
            kind,
            prefix,
            self.options.prefix,
            self.foreign,
            extra={"trace_id": trace_id, "stream": self.options.stream},
        )

    async def _retry_due(self) -> list[Entry]:
        """The failed entries whose time has come (up to ``batch``), delivered again to this
        worker (``RETRY_OWN``: one delivery more each), those still pending for it: another
        worker may have taken one over meanwhile."""
        now = time.monotonic()
        due = [entry_id for entry_id, at in self._retries.items() if at <= now][
            : self.options.batch
        ]
        if not due:
            return []
        for entry_id in due:
            del self._retries[entry_id]
        o = self.options
        got: Any = await self.redis.eval(RETRY_OWN, 1, o.stream, o.group, o.consumer, *due)
        return [(entry[0], dict(zip(entry[1][::2], entry[1][1::2], strict=True))) for entry in got]

    def next_retry_in(self) -> float | None:
        """Seconds until the next failed entry is due again (None: none waits)."""
        if not self._retries:
            return None
        return max(0.0, min(self._retries.values()) - time.monotonic())

    async def _forget_dead(self) -> None:
        """Every ``FORGET_INTERVAL`` s: consumers holding nothing and idle for
        ``max(FORGET_IDLE, 10 × claim_idle)`` leave the group (``FORGET_DEAD``), so that the
        group lists the workers there are, not every one there ever was."""
        now = time.monotonic()
        if now < self._forget_at:
            return
        self._forget_at = now + FORGET_INTERVAL
        o = self.options
        idle_ms = int(forget_after(o.claim_idle) * 1000)
        gone: Any = await self.redis.eval(FORGET_DEAD, 1, o.stream, o.group, idle_ms, o.consumer)
        if gone:
            log.info(
                "consumers gone for good (holding nothing, idle %.0fs) left the group: %d",
                idle_ms / 1000,
                int(gone),
                extra={"stream": o.stream},
            )

    async def _reclaim(self) -> list[Entry]:
        """Entries idle for ``claim_idle`` (a dead worker's), up to ``batch``. XAUTOCLAIM looks at
        ``COUNT`` x 10 pending entries per call: from where the last call stopped (its cursor),
        a few calls a round, so entries held by live workers at the head of the pending list
        (slow actions, kept by ``SET_IDLE``) never hide a dead worker's behind them."""
        o = self.options
        for _ in range(RECLAIM_CALLS):
            cursor, claimed = (
                await self.redis.xautoclaim(
                    o.stream,
                    o.group,
                    o.consumer,
                    int(o.claim_idle * 1000),
                    self._claim_cursor,
                    count=o.batch,
                )
            )[:2]
            self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
            entries = [e for e in claimed if e]
            if entries or self._claim_cursor == "0-0":
                return entries
        return []

    @contextlib.asynccontextmanager
    async def _holding(self, ids: list[bytes]) -> AsyncIterator[None]:
        """While the batch ``ids`` is handled, keep its entries this worker's (``SET_IDLE``
        every ``claim_idle / 3``): one waiting behind a slow action, or a slow action itself, is
        not a dead worker's (another worker once took such an entry over and the party got the
        action's events twice)."""
        if not ids:
            yield
            return
        self._held = ids  # (an entry the engine failed on leaves it: _engine_failed)
        task = asyncio.get_running_loop().create_task(self._keep_held(ids))
        try:
            yield
        finally:
            self._held = []
            await cancel_and_wait([task], what="the held entries' refresh")

    async def _keep_held(self, ids: list[bytes]) -> None:
        o = self.options
        while True:
            await asyncio.sleep(o.claim_idle / 3)
            if not ids:
                continue
            try:
                await self.redis.eval(SET_IDLE, 1, o.stream, o.group, o.consumer, 0, *ids)
            except INFRA_ERRORS as exc:  # the round's own commands report the outage
                log.debug("could not refresh the held entries: %s", exc)
            except Exception:  # not Redis: a bug; the batch must stay protected all the same
                log.exception("refreshing the held entries failed; trying again")

    async def _handle_all(self, entries: list[Entry], *, redelivery: bool) -> list[bytes]:
        """Handle ``entries`` in order; the ids of those left when the worker was stopped."""
        for n, (entry_id, fields) in enumerate(entries):
            if self._stop.is_set():  # the rest stays pending: handed back (_hand_back)
                return [left for left, _ in entries[n:]]
            if not fields:  # trimmed or deleted while pending: nothing left to do
                await self._done(entry_id)
                continue
            with tracing.incoming(
                "engine.stream handle",
                fields.get(b"traceparent"),  # the append's context (stream_link), if traced
                kind=tracing.SpanKind.CONSUMER,
                attributes={"party_sync.entry_id": entry_id.decode()},
            ):
                try:
                    await self._handle(entry_id, fields, redelivery=redelivery)
                except INFRA_ERRORS:
                    raise  # Redis or the backend: the round fails, the entry stays pending
                except Exception:  # a bug on one entry must not end the worker (each worker
                    await self._unexpected(entry_id)  # taking it over would end in turn)
        return []

    async def _unexpected(self, entry_id: bytes) -> None:
        """Handling an entry raised outside the engine (a bug): it stays pending, for another
        try after ``claim_idle``, and is dropped once delivered ``max_deliveries`` times."""
        if await self._deliveries(entry_id) >= self.options.max_deliveries:
            log.exception("handling a stream entry failed again; acknowledged and dropped")
            await self._done(entry_id)
        else:
            log.exception("handling a stream entry failed; it stays pending")

    async def _done(self, entry_id: bytes) -> None:
        """The entry is handled (or never will be): acknowledged and, unless ``keep_handled``,
        deleted in the same round trip. The stream then holds only what is still to do, so its
        memory follows the backlog, not the traffic: ``actions_stream_maxlen`` counts entries,
        and entries near the message size limit kept by the hundred thousand would fill Redis."""
        self._retries.pop(entry_id, None)  # (reclaimed and handled before its retry came)
        o = self.options
        if o.keep_handled:
            await self.redis.xack(o.stream, o.group, entry_id)
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(o.stream, o.group, entry_id)
            pipe.xdel(o.stream, entry_id)
            await pipe.execute()

    async def _beat(self) -> None:
        """This consumer's name and the time in ``partitions.workers_key`` every
        ``BEAT_INTERVAL`` s for as long as the loop runs (older names than ``BEAT_KEEP`` trimmed,
        the set expiring with its last worker), for the monitor; by a task of its own, started
        here if it is not running.

        It beats while the loop waits on its engine too: a loop in a long engine call (a
        language model's minute) read nothing for that long and was counted gone, and with
        ``--concurrency`` a worker's busy loops were (probe: "no engine worker consumes it" on
        a live worker). The loop never waits for it either: on a Redis Cluster that key is on
        whichever master its name hashes to, not the stream's (``<stream>:1:workers`` and
        ``<stream>:1`` are in different slots), and a stalled master held a healthy partition's
        loop for the whole stall (cluster probe). A beat that fails is tried again at the next
        interval; the round's own commands report an outage."""
        if self._beating is None or self._beating.done():
            self._beating = asyncio.get_running_loop().create_task(self._beat_forever())

    async def _beat_forever(self) -> None:
        while True:
            await self._write_beat()
            await asyncio.sleep(BEAT_INTERVAL)

    async def _write_beat(self) -> None:
        # (the clock the nodes' monitor reads it with is Redis's: so is the worker's, from its
        # backend, when ``engine-worker`` runs it)
        key, now_ms = layout.workers_key(self.options.stream), int(self.clock() * 1000)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zadd(key, {self.options.consumer: now_ms})
                pipe.zremrangebyscore(key, "-inf", now_ms - int(BEAT_KEEP * 1000))
                pipe.pexpire(key, int(BEAT_KEEP * 1000))
                await pipe.execute()
        except INFRA_ERRORS as exc:
            log.debug("could not write the heartbeat of %s: %s", self.options.stream, exc)
        except Exception:  # not Redis: a bug; the next interval tries again
            log.exception("writing the worker's heartbeat failed")

    async def _handle(
        self, entry_id: bytes, fields: Mapping[bytes, bytes], *, redelivery: bool = False
    ) -> None:
        try:
            kind = fields[b"kind"].decode()
            party_id = fields[b"party_id"].decode()
            run_id = fields.get(b"campaign_run_id", b"").decode()
            envelope: dict[str, Any] = orjson.loads(fields[b"envelope"])
            if not isinstance(envelope, dict):  # any JSON value parses: [1, 2], "text", null
                raise TypeError("the envelope is not a JSON object")
            deadline = wire.parse_deadline(fields.get(b"deadline"))
            action = wire.parse_action(party_id, envelope, deadline) if kind == "action" else None
            join = wire.parse_join(party_id, run_id, envelope) if kind == "join" else None
            restate = wire.parse_restate(party_id, run_id, envelope) if kind == "restate" else None
        except (KeyError, ValueError, TypeError, AttributeError):
            log.error("malformed entry on the actions stream; acknowledged and dropped")
            await self._done(entry_id)
            return
        trace_id = str(envelope.get("trace_id", ""))
        written_by = fields.get(b"prefix", b"").decode(errors="replace")
        if written_by and self.options.prefix is not None and written_by != self.options.prefix:
            self._foreign(written_by, kind, trace_id)
            # that deployment's nodes say so in /readyz (its actions will time out); best effort:
            # on a Redis Cluster the key may be on another master than the stream, a stalled one
            try:
                await self.redis.set(
                    layout.foreign_key(self.options.stream, written_by),
                    self.options.prefix,
                    ex=layout.FOREIGN_TTL,
                )
            except INFRA_ERRORS as exc:
                log.debug("could not say so in %s: %s", self.options.stream, exc)
            await self._done(entry_id)
            return
        if run_id and self.watch is not None:
            self.watch.knows(party_id, run_id)
        # Delivered max_deliveries times already and never acknowledged: every delivery raised
        # or ended its worker (an engine that exits, is killed by the OOM killer, or a process
        # frozen past claim_idle on this entry). Not run again: a poison entry would otherwise
        # take down every worker that takes it over, for ever, and its player never be answered.
        exhausted = redelivery and await self._deliveries(entry_id) > self.options.max_deliveries
        try:
            if action is not None:
                # A redelivery may have been started by a worker that died: if party_sync lost
                # the action's record, only the record could say so, and the deadline alone
                # would refuse an action that may be applied. So a redelivery is claimed on the
                # record alone (whose own deadline still refuses one never started), and the
                # engine is told it is a redelivery (``ActionRequest.redelivery``, no deadline).
                if redelivery:
                    action = replace(action, deadline=None, redelivery=True)
                claim = await self.publisher.claim(action)
                if claim is not Claim.START:
                    log.info(
                        "action not started: %s",
                        claim.value,
                        extra={"trace_id": trace_id, "action_id": action.action_id},
                    )
                    await self._done(entry_id)
                    self.skipped += 1
                    return
                if exhausted:
                    await self._exhausted(entry_id, action, kind, trace_id)
                    return
                await self._run_action(action)
            elif exhausted:
                await self._exhausted(entry_id, None, kind, trace_id)
                return
            elif join is not None:
                await self.engine.handle_join(join)
            elif restate is not None:
                await restate_engine(self.engine, restate)
            else:
                log.warning("unknown entry kind %r on the actions stream; acknowledged", kind)
        except INFRA_ERRORS:
            raise  # Redis or the backend, not the engine: the round fails, the entry stays pending
        except Exception:
            await self._engine_failed(entry_id, action, trace_id)
            return
        await self._done(entry_id)
        await self.restate_opened()

    async def restate_opened(self) -> None:
        """Ask the engine to re-state every party whose new epoch its events opened
        (``engine.restating.EpochWatch``: no gateway knows of those); its own events then come
        after, in the same epoch. A failed re-statement is tried again after the next round."""
        if self.watch is not None and self.watch.openings.pending:
            await self.watch.restate_opened()

    async def _run_action(self, action: ActionRequest) -> None:
        try:
            await self.engine.handle_action(action)
        except EngineRejected as exc:
            await self.publisher.reject(action, exc.message)

    async def _engine_failed(
        self, entry_id: bytes, action: ActionRequest | None, trace_id: str
    ) -> None:
        deliveries = await self._deliveries(entry_id)
        if deliveries >= self.options.max_deliveries:
            log.exception("engine failed; giving up", extra={"trace_id": trace_id})
            await self._give_up(entry_id, action)
        else:
            log.exception("engine failed; the entry stays pending", extra={"trace_id": trace_id})
            # tried again by this worker after 1, 2, 4 ... s (at most claim_idle), not only
            # when XAUTOCLAIM finds it idle: engine_error comes in seconds, not minutes
            o = self.options
            wait = min(float(2 ** max(0, deliveries - 1)), o.claim_idle)
            self._retries[entry_id] = time.monotonic() + wait
            # ... or by any other free worker at that time, should this one be busy then (no
            # longer kept with the rest of its batch, whose refresh would reset its idle time)
            with contextlib.suppress(ValueError):
                self._held.remove(entry_id)
            idle_ms = max(0, int((o.claim_idle - wait) * 1000))
            try:
                await self.redis.eval(SET_IDLE, 1, o.stream, o.group, o.consumer, idle_ms, entry_id)
            except INFRA_ERRORS as exc:  # this worker still tries it at its time
                log.debug("could not offer a failed entry to the other workers: %s", exc)

    async def _exhausted(
        self, entry_id: bytes, action: ActionRequest | None, kind: str, trace_id: str
    ) -> None:
        """An entry delivered more than ``max_deliveries`` times: acknowledged without running
        it; an action's player gets ``engine_error`` (its claim said it had no answer yet)."""
        log.error(
            "%s entry delivered more than %d times, never acknowledged (each delivery failed "
            "or ended its worker); giving up without running it",
            kind,
            self.options.max_deliveries,
            extra={"trace_id": trace_id},
        )
        await self._give_up(entry_id, action)

    async def _give_up(self, entry_id: bytes, action: ActionRequest | None) -> None:
        """No more deliveries: an action's player gets ``engine_error``; the entry is done."""
        if action is not None:
            await self.publisher.fail(action, ErrorCode.ENGINE_ERROR, ENGINE_FAILED)
        await self._done(entry_id)

    async def _deliveries(self, entry_id: bytes) -> int:
        """How many times the entry was delivered (``max_deliveries`` if it is not pending)."""
        o = self.options
        pending = await self.redis.xpending_range(
            o.stream, o.group, min=entry_id, max=entry_id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else o.max_deliveries


def consumers(name: str, concurrency: int) -> list[str]:
    """The consumer names of a worker's read loops on one stream: ``name`` alone, or
    ``<name>/1`` … ``<name>/<concurrency>`` (each loop is a consumer of its own, exactly as a
    worker process of its own would be)."""
    if concurrency <= 1:
        return [name]
    return [f"{name}/{i}" for i in range(1, concurrency + 1)]


class PartitionedWorker:
    """Every partition of the actions stream: ``concurrency`` :class:`StreamWorker` read loops
    per partition stream (``loops``, partition 0 first), around one engine; ``run`` until
    ``stop`` (or, in burst mode, until every partition is idle). With one partition and a
    concurrency of 1 it is one ``StreamWorker``."""

    def __init__(
        self,
        engine: Engine,
        publisher: LinkHost,
        redis: Redis | RedisCluster,
        options: WorkerOptions,
        *,
        partitions: int = 1,
        concurrency: int = 1,
        watch: EpochWatch | None = None,
        clock: Callable[[], float] = time.time,
        count_check: float = 10.0,
        stop_grace: float = 10.0,
        shared: tuple[str, Mapping[str, float]] | None = None,
        adopt: Callable[[Mapping[str, float]], None] | None = None,
    ) -> None:
        """``shared``: the key of the nodes' shared settings and the values this worker writes
        with (``backends/shared_settings.py``): compared every ``count_check`` s; when they
        differ, ``adopt`` is given the nodes' (``RedisBackend.adopt``: the worker writes with
        them from then on) with a WARNING naming each change; without ``adopt``, a WARNING
        once that a restart takes them."""
        self.engine = engine
        self.shared = shared
        self._adopt = adopt
        self.settings_differ: str | None = None
        self.settings_looks = 0  # how often they were compared
        self.publisher = publisher
        self.redis = redis
        self.options = options
        self.partitions = partitions
        #: Seconds the read loops get, once stopped, to finish the actions they are handling
        #: before they are cancelled (an engine call that never returns must not hold the
        #: worker; a cancelled action stays pending in the stream: another worker claims it).
        self.stop_grace = stop_grace
        self._tasks: list[asyncio.Task[None]] = []
        self.count_check = count_check  # seconds between two looks at <stream>:partitions
        self.streams = layout.stream_names(options.stream, partitions)
        had_groups: set[str] = set()  # (one for the loops: StreamWorker._had_groups)
        self.loops = [
            StreamWorker(
                engine,
                publisher,
                redis,
                replace(options, stream=name, consumer=consumer),
                watch=watch,
                clock=clock,
                had_groups=had_groups,
            )
            for name in self.streams
            for consumer in consumers(options.consumer, concurrency)
        ]
        self.mismatch: str | None = None  # what disagrees with the nodes' count, while it does
        self._stop = asyncio.Event()

    def stop(self) -> None:
        first = not self._stop.is_set()
        self._stop.set()
        for loop in self.loops:
            loop.stop()
        if first and self._tasks:
            asyncio.get_running_loop().call_later(self.stop_grace, self._cut_short)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _cut_short(self) -> None:
        late = [task for task in self._tasks if not task.done()]
        if late:
            log.warning(
                "%d read loop(s) still in an engine call %.0f s after the stop: cancelled (their "
                "actions stay pending in the stream for another worker)",
                len(late),
                self.stop_grace,
            )
        for task in late:
            task.cancel()

    @property
    def errors(self) -> int:
        return sum(loop.errors for loop in self.loops)

    @property
    def skipped(self) -> int:
        return sum(loop.skipped for loop in self.loops)

    @property
    def degraded(self) -> bool:
        """True while some partition's rounds fail."""
        return any(loop.degraded for loop in self.loops)

    async def check_count(self) -> str | None:
        """Compare N with the nodes' ``<stream>:partitions``: what is wrong, or None (they agree,
        or no node has written it). Redis errors raise."""
        raw = await self.redis.get(layout.count_key(self.options.stream))
        return layout.mismatch(self.partitions, layout.parse_count(raw), self.options.stream)

    async def run(self, on_started: Callable[[], None] | None = None) -> None:
        """Refuse to start on a partition mismatch (not in burst mode: draining old streams is
        what it is for), then consume every partition (``on_started`` is called once the checks
        have passed and the engine has started: where a banner belongs)."""
        try:
            problem = await self.check_count()
        except INFRA_ERRORS as exc:  # Redis not there yet: the watcher looks again later
            log.debug("cannot read the partition count yet: %s", exc)
            problem = None
        if problem is not None:
            if not self.options.burst:
                raise ConfigError(problem)
            log.warning("burst mode despite a partition mismatch: %s", problem)
        await start_engine(self.engine, self.publisher)
        tasks = self._tasks = [asyncio.create_task(loop.consume()) for loop in self.loops]
        helpers: list[asyncio.Task[None]] = []
        if on_started is not None:  # once every partition's group is there: it serves
            helpers.append(asyncio.create_task(self._announce(on_started)))
        if self._stop.is_set():  # stopped while starting
            asyncio.get_running_loop().call_later(self.stop_grace, self._cut_short)
        if not self.options.burst:
            helpers.append(asyncio.create_task(self._watch()))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                error = None if task.cancelled() else task.exception()
                if error is not None:
                    # a bug, not Redis (the loops survive those, and UNEXPECTED_PATIENCE of
                    # anything else): end it all
                    raise error
        finally:
            self.stop()
            await cancel_and_wait([*tasks, *helpers], what="a worker loop")
            await self.engine.close()

    async def _announce(self, on_started: Callable[[], None]) -> None:
        """``on_started()`` once every loop reads its stream as a consumer of its group (Redis
        down at start: once it answers, not before: the banner says the worker serves)."""
        await asyncio.gather(*(loop.serving.wait() for loop in self.loops))
        on_started()

    async def _watch(self) -> None:
        """Every ``count_check`` seconds: does the nodes' count still agree? (ERROR once per
        episode of disagreement, INFO when it is over; Redis errors are the loops' to report.)"""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.count_check)
            if self._stop.is_set():
                return
            try:
                problem = await self.check_count()
                if problem is not None and self.mismatch is None:
                    log.error("actions stream partitions disagree: %s", problem)
                elif problem is None and self.mismatch is not None:
                    log.info("actions stream partitions agree with the serving nodes again")
                self.mismatch = problem
                await self._compare_settings()
            except INFRA_ERRORS:
                continue
            except Exception:  # (a library's own failure, or a bug: the next look, not the end)
                log.exception("checking the nodes' partition count and settings failed")

    async def _compare_settings(self) -> None:
        """Do the nodes' shared settings still equal the ones this worker writes with?"""
        if self.shared is None:
            return
        key, mine = self.shared
        try:
            theirs = shared_settings.decode(await self.redis.get(key))
        except INFRA_ERRORS:
            return
        self.settings_looks += 1
        differ = None if theirs is None else "; ".join(shared_settings.differences(mine, theirs))
        if differ and theirs is not None and self._adopt is not None:
            self._adopt(theirs)
            self.shared = (key, {**mine, **theirs})  # (a setting an older node lacks: kept)
            log.warning(
                "the gateway nodes' settings changed (%s: %s): this worker writes with theirs "
                "from now on",
                key,
                "; ".join(shared_settings.differences(mine, theirs, "until now")),
            )
            return
        if differ and differ != self.settings_differ:
            log.warning(
                "the gateway nodes' settings changed (%s: %s): this worker writes with the ones "
                "it started with until it is restarted",
                key,
                differ,
            )
        elif not differ and self.settings_differ:
            log.info("the gateway nodes' settings equal this worker's again")
        self.settings_differ = differ or None
