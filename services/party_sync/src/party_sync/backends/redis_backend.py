"""The Redis backend: many gateway nodes sharing one Redis behave as one service (docs/redis.md).

It implements ``Backend`` with the semantics of ``MemoryBackend`` (the shared behavioural suite
runs against both): every operation that reads and writes party state is one Lua script on the
party's slot (``redis_scripts``), the stream is delivered through one pub/sub connection per node
(``redis_bus``) and put in order, gap-free, per party (``redis_stream``). Key and channel names
come from ``keys``.

The backend owns its parts and gives each exactly what it uses (none holds the backend):
``RedisPresence`` (presence, ``redis_presence``), ``RedisVotes`` (votes, ``redis_votes``),
``RedisAdmin`` (the operators' view, ``redis_admin``), the ``Bus`` and the ``Scripts``. The stream
and the action ledger are its own methods: they are the hot path, one script call each.

What is shared and where: the stream (epoch, seq, bounded history), the projection behind
``system.hello``, presence (per connection, with expiry; counted per character across nodes and
tabs), and the action ledger (records and per-character locks). Times are the callers' ``now``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AskError, ClusterDownError, ReadOnlyError, ResponseError, TryAgainError

from party_sync.backends import redis_fence, redis_scripts
from party_sync.backends.base import (
    BackendSettings,
    PartyListener,
    another_actor,
    checked_body,
    warn_result_after_refusal,
)
from party_sync.backends.keys import DEFAULT_PREFIX, KeySpace, party_channel, run_channel
from party_sync.backends.redis_admin import RedisAdmin
from party_sync.backends.redis_bus import Bus
from party_sync.backends.redis_connect import (
    DEFAULT_MAX_CONNECTIONS,
    RedisTarget,
    Sentinels,
    answering,
    make_any_client,
    refuse_misconfiguration,
    stale_socket_retry,
)
from party_sync.backends.redis_presence import RedisPresence
from party_sync.backends.redis_scripts import (
    Arg,
    Limits,
    Scripts,
    fold_args,
    snapshot_from,
    text,
    unavailable,
)
from party_sync.backends.redis_shard_bus import ShardedBus
from party_sync.backends.redis_stream import (
    FOREIGN_LOG_INTERVAL,
    PartyStream,
    RangeReply,
    encode_direct,
    event_from,
)
from party_sync.backends.redis_votes import RedisVotes
from party_sync.core.actions import Claim, Decision, Sweep, Verdict
from party_sync.core.binding import Binding
from party_sync.core.events import Event
from party_sync.core.history import ResumePoint
from party_sync.core.limits import RateGate
from party_sync.core.published import REUSED, repeated, shape, unpublished
from party_sync.core.snapshot import Snapshot
from party_sync.core.transient import (
    GONE,
    MAX_KEPT_STREAMS,
    MAX_OPEN_STREAMS,
    MAX_STREAM_CHARS,
    Outcome,
    Piece,
    accepted,
    kept_for,
)
from party_sync.core.votes import CastRefusal, VoteSpec
from party_sync.metrics import Metrics
from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.errors import BackendUnavailable, IdempotencyKeyReused, InvalidEvent
from party_sync.tasks import cancel_and_wait, described

log = logging.getLogger(__name__)

#: Seconds between measurements of Redis's clock against this node's.
CLOCK_EVERY = 30.0
#: Error replies that say Redis is away for a while (a Cluster shard down or failing over, a
#: slot migrating, a replica answering), not that it refuses a command for good.
_AWAY_REPLIES: Final = (ClusterDownError, TryAgainError, ReadOnlyError, AskError)

#: Seconds a readiness check waits for Redis's answer to its PING (``RedisBackend.ready``): under
#: a probe's usual 1-s timeout, so that in a stall /readyz answers 503 rather than nothing.
READY_WAIT = 0.9
#: Seconds between two counts of a Redis Cluster's masters that answer (``_watch_masters``), and
#: how long each is given to answer a PING.
MASTERS_EVERY = 5.0
MASTERS_WAIT = 1.0

#: How long (seconds) and how many of the final answers it wrote a node keeps, to write them again
#: on the next Redis server its connections meet (``RedisBackend._write_lost_answers``). What a
#: failover loses is the old master's last second or two; the node meets the new one within a
#: second of the switch.
ANSWERS_KEPT_FOR = 10.0
ANSWERS_KEPT = 4096


def _tell(hooks: Sequence[Callable[..., object]], what: str, *args: Any) -> None:
    """Call each hook with ``args``; one that raises (a bug) is logged and stops no other."""
    for hook in hooks:
        try:
            hook(*args)
        except Exception:
            log.exception("%s failed", what)


@dataclass(frozen=True, slots=True)
class _Answer:
    """A final answer this node wrote: an ``action.result`` (``message``), else a refusal."""

    at: float  # time.monotonic() when it was written
    party_id: str
    action_id: str
    message: dict[str, Any] | None
    character_id: str  # the actor (whose lock the answer released)
    refusal: bytes = b""


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """How to reach Redis and the Redis-only knobs (the shared limits are ``BackendSettings``)."""

    url: str
    prefix: str = DEFAULT_PREFIX
    sentinels: Sentinels | None = None  # find the master through Sentinel (redis_connect.py)
    cluster: bool = False  # url names a node of a Redis Cluster (redis_shard_bus.py)
    seeds: tuple[tuple[str, int], ...] = ()  # more nodes of the cluster to join it through
    probe_interval: float = 5.0  # pub/sub silence before a probe; also the probe's deadline
    presence_grace: float = 5.0  # a node settles within grace (+ presence_ttl) or is presumed dead
    connect_timeout: float = 2.0
    command_timeout: float = 5.0
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # the command pool's (redis_connect.py)
    write_delay: float = 0.0  # seconds a script call waits for others to share its write


class _Subscription:
    def __init__(self, close: Callable[[], Awaitable[None]]) -> None:
        self._close: Callable[[], Awaitable[None]] | None = close

    async def close(self) -> None:
        if self._close is not None:
            close, self._close = self._close, None
            await close()


def _limits(settings: BackendSettings) -> Limits:
    return Limits(
        settings.history_size,
        settings.idle_party_ttl,
        settings.action_record_ttl,
        settings.presence_ttl,
        settings.action_timeout,
        settings.history_max_bytes,
        settings.history_max_age,
    )


def _tenths(seconds: float) -> str:
    """Seconds to a tenth, a zero without a sign ("0.0", never "-0.0")."""
    return f"{round(seconds, 1) + 0.0:.1f}"


def _began(raw: Any) -> float | None:
    """An action record's ``s`` (when it began, as the script wrote it), or None: an older
    record, or none."""
    try:
        return float(text(raw)) if raw else None
    except ValueError:
        return None


class RedisBackend:
    """All parties, shared through Redis; one instance per gateway node."""

    name = "redis"

    def __init__(
        self,
        options: RedisOptions,
        settings: BackendSettings | None = None,
        *,
        node_id: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.options = options
        self.settings = settings = settings or BackendSettings()
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self.metrics = metrics
        self.keys = KeySpace(options.prefix)
        self.target = RedisTarget(
            options.url, options.sentinels, options.prefix, options.cluster, options.seeds
        )
        self.client = make_any_client(
            self.target,
            protocol=2,  # plain arrays for pub/sub; the faster reader (docs/benchmarks.md)
            socket_connect_timeout=options.connect_timeout,
            socket_timeout=options.command_timeout,
            max_connections=options.max_connections,
            # one retry on a broken socket, none on a timeout (stale_socket_retry); a cluster:
            # also a failover's CLUSTERDOWN, then the map (RedisCluster's own retry)
            retry=(
                Retry(ExponentialBackoff(cap=0.1, base=0.01), 3)
                if options.cluster
                else stale_socket_retry()
            ),
            client_name=f"party_sync:{self.node_id}",
        )
        self.scripts = Scripts(
            self.client,
            self.keys,
            _limits(settings),
            timeout=options.command_timeout,
            delay=options.write_delay,
        )
        self.bus: Bus | ShardedBus
        if isinstance(self.client, RedisCluster):
            self.bus = ShardedBus(
                self.client,
                self.keys,
                node_id=self.node_id,
                probe_interval=options.probe_interval,
                timeout=options.command_timeout,
                on_reconnect=self._on_reconnect,
                count_reconnect=self._count_reconnect,
                observe_lag=self._observe_lag,
            )
        else:
            self.bus = Bus(
                self.client.connection_pool,
                self._publish_raw,
                node_id=self.node_id,
                probe_channel=self.keys.probe_channel(self.node_id),
                probe_interval=options.probe_interval,
                timeout=options.command_timeout,
                on_reconnect=self._on_reconnect,
                count_reconnect=self._count_reconnect,
                observe_lag=self._observe_lag,
            )
        if metrics is not None:
            metrics.register_redis()  # the Redis-only families exist only in Redis mode
            batcher = self.scripts.batcher
            metrics.register_script_counts(lambda: batcher.batches, lambda: batcher.calls)
        self.presence = RedisPresence(
            self.client,
            self.scripts,
            self.keys,
            presence_ttl=settings.presence_ttl,
            presence_grace=options.presence_grace,
            idle_party_ttl=settings.idle_party_ttl,
        )
        self.votes = RedisVotes(self.client, self.scripts, self.keys)
        batcher = self.scripts.batcher
        # the operators' view
        self.admin = RedisAdmin(self.client, self.keys, self.bus, batcher.down_for)
        self._streams: dict[str, PartyStream] = {}
        #: Told when a pub/sub connection was replaced (``when_messages_lost``)
        self._lost_hooks: list[Callable[[], None]] = []
        #: Told of the events this backend published on its own (``when_published``)
        self._published_hooks: list[Callable[[Sequence[Event]], object]] = []
        #: Told once this process's connections met a Redis server they never met
        #: (``when_new_server``)
        self._new_server_hooks: list[Callable[[], object]] = []
        self._opening: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._clock_offset = 0.0  # Redis's clock minus this node's (measured with TIME)
        self._clock_measured = False  # once, at least (the first WARNING has no "it was")
        self._clock_refused = False  # Redis refused TIME (said once, until it answers again)
        self._clock_due = 0.0  # monotonic time of the next measurement
        self._ready_ping: asyncio.Future[bool] | None = None  # the readiness PING under way
        self._started = time.monotonic()
        self._foreign_log = RateGate(FOREIGN_LOG_INTERVAL)  # another deployment's events
        #: The final answers this node wrote lately, and how many Redis servers this process had
        #: met when they were last made sure of (``_write_lost_answers``).
        self._answers: deque[_Answer] = deque(maxlen=ANSWERS_KEPT)
        self._answers_servers = redis_fence.SERVERS.count
        self._rewriting: asyncio.Future[None] | None = None

    def adopt(self, settings: BackendSettings) -> None:
        """Write with ``settings`` (history bounds and TTLs) from the next call on: an engine
        worker's backend, when the gateway nodes' shared settings change (a worker kept the
        values it started with until restarted, and trimmed history to a bound the nodes had
        given up: rolling-upgrade probe). The parts a worker writes with; presence, which only
        nodes keep, keeps its own."""
        self.settings = settings
        self.scripts.adopt(_limits(settings))

    def clock(self) -> float:
        """Now, on Redis's clock: this process's plus the offset measured with ``TIME`` (every
        ``CLOCK_EVERY`` s). The gateway nodes and the engine workers of a deployment keep time
        by it (deadlines, presence, votes, event times), so a machine whose clock is off by
        seconds neither times out every action its engine host claims (a worker ahead by the
        action timeout refused every action in 10 ms: clock skew probe) nor expires the other
        nodes' players (presence flapping) nor ends votes early."""
        return time.time() + self._clock_offset

    def clock_known(self) -> bool:
        return self._clock_measured

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await refuse_misconfiguration(self.target, self.options.connect_timeout)
        with contextlib.suppress(BackendUnavailable):  # Redis may be down: the bus keeps trying
            await self.scripts.load()
        self._clock_due = time.monotonic() + CLOCK_EVERY
        await self._measure_clock()  # never raises (Redis down: measured again later)
        self._spawn(self._keep_clock())
        if isinstance(self.client, RedisCluster) and self.metrics is not None:
            self._spawn(self._watch_masters(self.client, self.metrics))
        await self.bus.start(wait=self.options.connect_timeout)

    async def close(self) -> None:
        """Every step is taken; the client is closed last even if a step before it failed or
        the close was cancelled (a shutdown bounded in time): a client left open kept its
        connections, and warned "Unclosed RedisCluster client" at a later garbage collection."""
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()
        ping = self._ready_ping
        steps: list[Callable[[], Awaitable[object]]] = [
            self.bus.close,
            lambda: cancel_and_wait(list(self._tasks), what="a Redis backend task"),
            lambda: cancel_and_wait([ping] if ping is not None else [], what="the readiness PING"),
            self.scripts.batcher.close,
            self.votes.close,
            self.admin.close,
            self.client.aclose,
        ]
        first: BaseException | None = None
        for step in steps:  # each taken, whatever the one before raised (a cancellation too)
            try:
                await step()
            except BaseException as exc:
                first = first or exc
        if first is not None:
            raise first

    async def ready(self) -> bool:
        """Ready while the pub/sub connection is up and Redis answers a PING (not while the
        script connection knows Redis stopped answering: no wait for a PING to time out). On a
        Cluster: while some master's are (one master lost is an outage of its parties only)."""
        if not self.bus.serving or self.scripts.batcher.down:
            return False
        if redis_scripts.REFUSALS.refusing(time.monotonic(), self._started) is not None:
            return False  # it answers, and refuses writes (out of memory, a replica...)
        wait = min(READY_WAIT, self.options.connect_timeout)
        if isinstance(self.client, RedisCluster):  # any master (a PING went to one node: a
            # stalled master made /readyz 503 for the whole cluster; failover probe)
            try:
                return bool(await answering(self.client.get_primaries(), wait))
            except Exception:
                return False
        # One PING at a time, shared by the readiness checks that come meanwhile, and waited
        # for at most READY_WAIT: in a stall, /readyz says 503 within a probe's usual 1-s timeout
        # (it took the whole connect_timeout, 2 s, each: probes saw timeouts, not the 503).
        ping = self._ready_ping
        if ping is None or ping.done():
            ping = self._ready_ping = asyncio.ensure_future(self._ping())
        try:
            return await asyncio.wait_for(asyncio.shield(ping), wait)
        except TimeoutError:
            return False

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                return bool(await self.client.ping())
        except Exception:
            return False

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- metrics hooks --------------------------------------------------------------------------
    def _count_reconnect(self, cause: str) -> None:
        if self.metrics is not None:
            self.metrics.redis_reconnects.labels(cause).inc()

    def _count_gap(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.pubsub_gaps.labels(outcome).inc()

    def _observe_lag(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.pubsub_lag.observe(seconds)

    # -- the stream -----------------------------------------------------------------------------
    async def _publish_raw(self, channel: str, data: bytes) -> None:
        """PUBLISH; on a Redis Cluster SPUBLISH (the channel's shard only; ``run:<id>`` is
        sharded by its own name)."""
        with unavailable("publish"):
            if isinstance(self.client, RedisCluster):
                await self.client.spublish(channel, data)
            else:
                await self.client.publish(channel, data)

    async def publish(
        self, party_id: str, message: dict[str, Any], now: float, *, key: str | None = None
    ) -> Event:
        type_, payload = message["type"], message["payload"]
        if key is not None and type_ == t.ACTION_RESULT:  # the key's record, then the action's
            return (await self.publish_many(party_id, [message], now, key=key))[0]
        fold = fold_args(type_, payload)  # raises before anything is recorded
        body = checked_body(message, self.settings.max_event_bytes)
        action_id = payload["action_id"] if type_ == t.ACTION_RESULT else None
        keyed = key if action_id is None else None
        args: list[Arg] = [body, type_, *fold]
        if keyed is not None:
            args.append(shape([message]))
        with unavailable("publish"):
            reply = await self.scripts.run(
                "publish", party_id, now, args, action_id=action_id, published=keyed
            )
        seq = int(reply[0])
        if seq == 0:
            said = text(reply[1])
            if said == "reused":
                raise IdempotencyKeyReused(REUSED)
            if said == "key":  # published under this key already: its seq stands
                return repeated(party_id, int(reply[2]), message, body)
            if said == "actor":
                raise InvalidEvent(another_actor(payload, text(reply[2])))
            return event_from(party_id, bytes(reply[2]))  # the action's result stands
        if len(reply) > 2 and int(reply[2]):
            warn_result_after_refusal(log, message["trace_id"], str(action_id))
        if action_id is not None:
            actor = str(payload.get("character_id", ""))
            self._answered(_Answer(time.monotonic(), party_id, action_id, message, actor))
        return Event(party_id, seq, type_, payload, message["trace_id"], codec.with_seq(body, seq))

    async def publish_many(
        self,
        party_id: str,
        messages: Sequence[dict[str, Any]],
        now: float,
        *,
        key: str | None = None,
    ) -> list[Event]:
        """``publish_many.lua``: the events in one script call, one atomic step and one PUBLISH
        (so one pub/sub message per node, delivered in one tick: one write per member)."""
        if len(messages) == 1 and (key is None or messages[0]["type"] != t.ACTION_RESULT):
            return [await self.publish(party_id, messages[0], now, key=key)]
        if not messages:
            return []
        args: list[Arg] = [len(messages)]
        bodies: list[bytes] = []
        action_ids: list[str] = []
        for message in messages:  # everything is checked before anything is recorded
            type_, payload = message["type"], message["payload"]
            fold = fold_args(type_, payload)
            body = checked_body(message, self.settings.max_event_bytes)
            bodies.append(body)
            if type_ == t.ACTION_RESULT:
                action_ids.append(payload["action_id"])
            args += [body, type_, len(fold), *fold]
        if key is not None:
            args.append(shape(messages))
        with unavailable("publish"):
            reply = await self.scripts.run(
                "publish_many", party_id, now, args, action_ids=action_ids, published=key
            )
        if text(reply[0]) == "!reused":
            raise IdempotencyKeyReused(REUSED)
        if text(reply[0]) == "!actor":
            raise InvalidEvent(
                another_actor(messages[int(reply[1]) - 1]["payload"], text(reply[2]))
            )
        events: list[Event] = []
        for i, (message, body) in enumerate(zip(messages, bodies, strict=True)):
            seq, extra = int(reply[1 + 2 * i]), reply[2 + 2 * i]
            if seq < 0:  # the key's call was published already: this event's seq in it
                events.append(repeated(party_id, int(extra), message, body))
                continue
            if seq == 0:  # the action already has a result: that one stands (as in memory)
                if extra:
                    events.append(event_from(party_id, bytes(extra)))
                else:  # another event of a replayed answer: not published
                    events.append(unpublished(party_id, message, body))
                continue
            type_, payload = message["type"], message["payload"]
            if int(extra):
                warn_result_after_refusal(log, message["trace_id"], payload["action_id"])
            if type_ == t.ACTION_RESULT:
                actor = str(payload.get("character_id", ""))
                answer = _Answer(time.monotonic(), party_id, payload["action_id"], message, actor)
                self._answered(answer)
            events.append(
                Event(party_id, seq, type_, payload, message["trace_id"], codec.with_seq(body, seq))
            )
        return events

    async def publish_run(self, campaign_run_id: str, message: dict[str, Any]) -> None:
        await self._publish_raw(run_channel(campaign_run_id), codec.encode(message))

    async def subscribe(self, party_id: str, listener: PartyListener) -> _Subscription:
        stream = self._streams.get(party_id)
        if stream is None:
            stream = self._streams[party_id] = PartyStream(
                party_id,
                self,
                count_gap=self._count_gap,
                max_pending=max(1000, self.settings.history_size),
                spawn=self._spawn,
                foreign_log=self._foreign_log,
            )
            self._opening[party_id] = self._spawn(self._open(stream))
        stream.listeners.append(listener)
        opening = self._opening.get(party_id)
        if opening is not None:
            try:
                await asyncio.shield(opening)
            except BaseException:
                with contextlib.suppress(ValueError):
                    stream.listeners.remove(listener)
                raise
        return _Subscription(lambda: self._unsubscribe(stream, listener))

    async def _open(self, stream: PartyStream) -> None:
        """Subscribe (confirmed by Redis), then find the head: the stream is live."""
        channel = party_channel(stream.party_id)
        try:
            await self.bus.add(channel, stream.feed)
            await stream.start()
        except BaseException:
            if self._streams.get(stream.party_id) is stream:
                del self._streams[stream.party_id]
            stream.close()
            with contextlib.suppress(Exception):
                await self.bus.remove(channel, stream.feed)
            raise
        finally:
            self._opening.pop(stream.party_id, None)

    async def _unsubscribe(self, stream: PartyStream, listener: PartyListener) -> None:
        with contextlib.suppress(ValueError):
            stream.listeners.remove(listener)
        if stream.listeners or self._streams.get(stream.party_id) is not stream:
            return
        del self._streams[stream.party_id]  # the last local listener: drop the subscription
        stream.close()
        await self.bus.remove(party_channel(stream.party_id), stream.feed)

    def when_messages_lost(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` whenever a pub/sub connection was replaced (the gateway looks at its
        pending actions again: a refusal sent to one character is in no history)."""
        self._lost_hooks.append(hook)

    def when_published(self, hook: Callable[[Sequence[Event]], object]) -> None:
        """Call ``hook`` with the events this backend published on its own, not for a caller
        (an answer lost with an old Redis server, written again: ``_write_lost_answers``). On a
        new master that is often the first event of the party's new epoch, which the engine must
        be asked to re-state like any other opening (``EpochWatch.published``)."""
        self._published_hooks.append(hook)

    def when_new_server(self, hook: Callable[[], object]) -> None:
        """Call ``hook`` once this process's connections met a Redis server they never met (a
        failover, a restart: ``redis_fence.SERVERS``), after the lost answers were written again
        (``_write_lost_answers``): what it wrote just before may be lost with the old master."""
        self._new_server_hooks.append(hook)

    # -- answers lost with an old Redis server ---------------------------------------------------
    def _answered(self, answer: _Answer) -> None:
        answers = self._answers
        answers.append(answer)
        while answers[0].at < answer.at - ANSWERS_KEPT_FOR:
            answers.popleft()

    def _write_lost_answers(self) -> asyncio.Future[None] | None:
        """Once this process has met a Redis server it never met (``redis_fence.SERVERS``: a
        failover, a restart), write again every final answer this node wrote in the last
        ``ANSWERS_KEPT_FOR`` seconds that the server lacks: asynchronous replication may have
        lost the old master's last writes, and with an answer the release of its character's
        lock. The players had the answer from the old master, but on the new one the action
        stayed claimed, and its actor's next actions were refused ``character_busy`` until its
        deadline. Only an action whose record is there, claimed and unanswered, is written again
        (an empty Redis lost the records and the locks together: nothing waits). A result goes
        through ``publish`` again, so the party may get it twice, the same answer, as after a
        stream worker's re-delivery (docs/redis.md); a refusal through ``refuse_action``, and
        told to its sender again (a connection that had it already is not sent it twice).
        Started when an action is begun and when the pub/sub connection was replaced; the
        action waits for it only if its character's lock may be one of them. One pass at a
        time; a pass that meets an outage is made again at the next start.

        Returns the pass under way, if there is one."""
        if redis_fence.SERVERS.count == self._answers_servers:
            return None
        if self._rewriting is None or self._rewriting.done():
            self._rewriting = self._spawn(self._rewrite(redis_fence.SERVERS.count))
        return self._rewriting

    async def _rewrite(self, servers: int) -> None:
        since = time.monotonic() - ANSWERS_KEPT_FOR
        try:
            for answer in [a for a in self._answers if a.at >= since]:
                await self._write_again(answer)
        except BackendUnavailable as exc:
            log.warning("answers lost with an old redis server not written again yet: %s", exc)
            return
        except Exception:  # a bug: the next start tries again
            log.exception("writing again the answers lost with an old redis server failed")
            return
        self._answers_servers = servers
        _tell(self._new_server_hooks, "a new-server hook")

    async def _write_again(self, answer: _Answer) -> None:
        party_id, action_id = answer.party_id, answer.action_id
        with unavailable("a lost answer's check"):
            claimer, result, refusal = await self.client.hmget(
                self.keys.action(party_id, action_id), ["c", "r", "x"]
            )
        if claimer is None or result is not None or refusal is not None:
            return  # answered there, or no record at all
        log.warning(
            "an action's answer was lost with the old redis server: written again",
            extra={"party_id": party_id, "action_id": action_id},
        )
        if answer.message is not None:
            event = await self.publish(party_id, answer.message, self.clock())
            _tell(self._published_hooks, "a published-events hook", (event,))
        else:
            sender = await self.refuse_action(
                party_id, action_id, answer.character_id, answer.refusal, self.clock()
            )
            if sender is not None and sender != t.PARTY_ACTOR:
                # told to its sender again, as the first time (``Publisher.refuse``): the
                # script publishes only the party's ``action.failed``, and the first
                # ``system.error`` may have reached no node (a PUBLISH during a failover reaches
                # the nodes still subscribed to the old master: none; Sentinel probe)
                await self.send_direct(party_id, sender, answer.refusal)

    def _on_reconnect(self) -> None:
        """The pub/sub connection was replaced: messages may have been lost meanwhile."""
        self._write_lost_answers()
        for stream in self._streams.values():
            stream.catch_up_soon()  # a first catch-up still running just looks once more
        _tell(self._lost_hooks, "a lost-messages hook")  # (never stops the reconnection)

    async def send_direct(self, party_id: str, character_id: str, data: bytes) -> None:
        await self._publish_raw(party_channel(party_id), encode_direct(character_id, data))

    async def run_parties(self, campaign_run_id: str) -> list[str]:
        """Parties recorded for the run on connect whose state still exists (as in memory)."""
        with unavailable("run_parties"):
            members = await self.client.smembers(self.keys.run_parties(campaign_run_id))
            parties = sorted(text(p) for p in members)
            async with self.client.pipeline(transaction=False) as pipe:
                for party_id in parties:
                    pipe.exists(self.keys.party_keys(party_id).meta)
                exists = await pipe.execute()
        return [p for p, alive in zip(parties, exists, strict=True) if alive]

    async def snapshot(self, party_id: str, now: float | None = None) -> Snapshot:
        now = self.clock() if now is None else now
        with unavailable("snapshot"):
            kept_ms = int(kept_for(self.settings.narration_idle) * 1000)
            reply = await self.scripts.run("snapshot", party_id, now, [kept_ms], narration=True)
        return snapshot_from(reply)

    async def range(
        self, party_id: str, epoch: str, after: int, most: int | None = None
    ) -> RangeReply:
        """Events after ``after`` in ``epoch``, all or none (``range.lua``); for repair and resume.

        ``most`` defaults to the whole history (a node's gap repair takes whatever history has).
        """
        most = self.settings.history_size if most is None else most
        with unavailable("range"):
            reply = await self.scripts.run("range", party_id, 0.0, [epoch, after, most])
        events = [bytes(e) for e in reply[3:]] if len(reply) > 2 else None
        return text(reply[0]), int(reply[1]), events

    async def head(self, party_id: str) -> tuple[str, int]:
        with unavailable("head"):
            reply = await self.scripts.run("head", party_id, 0.0)
        return text(reply[0]), int(reply[1])

    async def replay(
        self, party_id: str, point: ResumePoint, max_replay: int
    ) -> Sequence[bytes] | None:
        _, _, events = await self.range(party_id, point.epoch, point.last_seq, max_replay)
        return events

    # -- presence (RedisPresence) ---------------------------------------------------------------
    async def connect(
        self, binding: Binding, connection_id: str, now: float, trace_id: str
    ) -> Event | None:
        # As begin_action: a call Redis runs past half the command timeout registers nothing.
        sent, stale = self._sent_at()
        return await self.presence.connect(
            binding, connection_id, now, trace_id, sent=sent, stale=stale
        )

    async def disconnect(
        self, binding: Binding, connection_id: str, now: float, *, handover: bool = False
    ) -> bool:
        return await self.presence.disconnect(binding, connection_id, now, handover=handover)

    async def hand_over_grace(self, binding: Binding, since: float) -> None:
        await self.presence.hand_over_grace(binding, since)

    async def settle(
        self, binding: Binding, now: float, trace_id: str, since: float | None = None
    ) -> Event | None:
        return await self.presence.settle(binding, now, trace_id, since)

    async def leave(self, binding: Binding, now: float, trace_id: str) -> Event | None:
        return await self.presence.leave(binding, now, trace_id)

    async def refresh(self, connections: Sequence[tuple[Binding, str]], now: float) -> list[Event]:
        return await self.presence.refresh(connections, now)

    async def expire(self, now: float) -> list[Event]:
        return await self.presence.expire(now)

    # -- votes (RedisVotes) ---------------------------------------------------------------------
    async def party_run(self, party_id: str) -> str | None:
        return await self.votes.party_run(party_id)

    async def start_vote(
        self, party_id: str, spec: VoteSpec, campaign_run_id: str, now: float, trace_id: str
    ) -> Event:
        return await self.votes.start_vote(party_id, spec, campaign_run_id, now, trace_id)

    async def cast_vote(
        self, party_id: str, character_id: str, vote_id: str, option: str, now: float, trace_id: str
    ) -> tuple[CastRefusal | None, list[Event]]:
        return await self.votes.cast_vote(party_id, character_id, vote_id, option, now, trace_id)

    async def finish_vote(self, party_id: str, vote_id: str, now: float) -> Event | None:
        return await self.votes.finish_vote(party_id, vote_id, now)

    async def due_votes(self, now: float) -> list[tuple[str, str]]:
        return await self.votes.due_votes(now)

    async def vote_run(self, party_id: str, vote_id: str) -> str | None:
        return await self.votes.vote_run(party_id, vote_id)

    async def unapplied_votes(self, now: float, older_than: float) -> list[Event]:
        return await self.votes.unapplied_votes(now, older_than)

    async def mark_vote_applied(self, party_id: str, vote_id: str) -> None:
        await self.votes.mark_vote_applied(party_id, vote_id)

    def _sent_at(self) -> tuple[float, float]:
        """The lateness guard's inputs for a script call sent now: when (on Redis's clock: this
        node's plus the offset measured with TIME, so a node whose clock is off by seconds neither
        refuses every call nor accepts late ones) and how many seconds later Redis may still run
        it (half the command timeout: past it the node has given up, or is about to)."""
        return self.clock(), self.options.command_timeout / 2

    async def _watch_masters(self, client: RedisCluster, metrics: Metrics) -> None:
        """``party_sync_redis_cluster_masters`` every ``MASTERS_EVERY`` s: the masters of the
        slot map, and those that answer a PING within ``MASTERS_WAIT`` (each asked on its own
        connection). ``/readyz`` stays 200 while one master answers (a master lost is an outage
        of its parties only), so a shard down shows here. Survives anything a look raises."""
        known, live = (
            metrics.cluster_masters.labels("known"),
            metrics.cluster_masters.labels("answering"),
        )
        while not getattr(client, "_closed", False):  # (a BoundedRedisCluster closed: done)
            try:
                primaries = client.get_primaries()
                answered = await answering(primaries, MASTERS_WAIT, everyone=True)
            except Exception as exc:  # (no slot map yet: nothing known, nothing answering)
                log.debug("redis cluster: the masters could not be counted: %s", exc)
                primaries, answered = [], []
            known.set(len(primaries))
            live.set(len(answered))
            await asyncio.sleep(MASTERS_EVERY)

    async def _keep_clock(self) -> None:
        """Measure the offset again every ``CLOCK_EVERY`` s, traffic or not: a clock stepped
        after start (a VM's NTP after boot) was corrected only when actions or connections came
        through this process, and never in an engine worker (clock skew re-check: every action
        timed out in 10 ms 65 s after a 6-s step, with no word)."""
        while True:
            await asyncio.sleep(max(0.0, self._clock_due - time.monotonic()))
            self._clock_due = time.monotonic() + CLOCK_EVERY
            await self._measure_clock()  # (one that fails sets the next a second away)

    async def _measure_clock(self) -> None:
        try:
            before = time.time()
            async with asyncio.timeout(self.options.command_timeout):
                seconds, micros = await self.client.time()
            after = time.time()
        except ResponseError as exc:  # refused, not away (NOPERM: +time taken from the user)
            if isinstance(exc, _AWAY_REPLIES):
                # a Cluster's shard down or failing over, a read-only replica: away for a while,
                # not refused (cluster re-check: an outage was told as an ACL to fix)
                self._clock_due = time.monotonic() + 1.0
                return
            if not self._clock_refused:
                self._clock_refused = True
                log.error(  # (an outage, not a skew: re-check)
                    "Redis refuses TIME (%s): party_sync's scripts read Redis's clock too, so "
                    "handshakes and actions fail until the user may run it again: give the "
                    "user +time (docs/redis.md, ACL)",
                    described(exc),
                )
            self._clock_due = time.monotonic() + CLOCK_EVERY
            return
        except Exception:  # Redis away: keep the last offset; measured again later
            self._clock_due = time.monotonic() + 1.0
            return
        self._clock_refused = False
        offset = seconds + micros / 1e6 - (before + after) / 2
        took = after - before
        if took > 0.5:  # too slow to be precise: measured again a second later (not CLOCK_EVERY:
            self._clock_due = time.monotonic() + 1.0  # lease probe), and taken meanwhile only
            if abs(offset - self._clock_offset) <= took:  # if it says more than its error
                return  # (a worker 5 s off, its TIME slow for seconds at start, cut narrations)
        if abs(offset - self._clock_offset) > 1.0:
            # (rounded first, with no sign for a zero: -0.04 s was written "-0.0s")
            was = (
                f"it was {_tenths(self._clock_offset)}s"
                if self._clock_measured
                else "first measure"
            )
            log.warning(
                "Redis's clock minus this process's: %ss (%s): party_sync keeps time by "
                "Redis's (deadlines, presence, votes, tokens); an HTTP engine host of your own "
                "that does not read X-Action-Time-Left needs its clock close to it "
                "(docs/engines.md, Deadlines): set up NTP on this machine",
                _tenths(offset),
                was,
            )
        self._clock_offset = offset
        self._clock_measured = True

    # -- actions --------------------------------------------------------------------------------
    async def begin_action(
        self,
        party_id: str,
        character_id: str,
        action_id: str,
        now: float,
        timed: bool = True,
        action_type: str = "choice",
        trace_id: str = "",
        claimed: bool = False,
        deadline_in: float | None = None,
    ) -> Verdict:
        # A call Redis runs later than half the command timeout after it was sent is refused by
        # the script ('stale'): the node has given up on it (or is about to), so it must not leave
        # an action in flight that no engine was given. "Sent" is read on Redis's clock (this
        # node's clock plus the offset measured with TIME), so a node whose clock is off by
        # seconds neither refuses every action nor accepts late ones.
        sent, stale = self._sent_at()
        args: list[Arg] = [  # numbers as text: hiredis formats a float slowly (~0.6 µs each)
            character_id,
            action_id,
            repr(self.settings.action_timeout),
            repr(sent),
            repr(stale),
            "1" if timed else "0",
            action_type,
            accepted(action_id, character_id, action_type, trace_id, now).data,
            self.node_id if claimed else "0",  # the claimer: take_over() if this node is gone
        ]
        if deadline_in is not None:
            args.append(repr(deadline_in))
        if redis_fence.SERVERS.count != self._answers_servers:
            rewriting = self._write_lost_answers()
            if rewriting is not None and any(  # its lock may be one of them
                a.party_id == party_id and a.character_id == character_id for a in self._answers
            ):
                with contextlib.suppress(Exception):  # (the pass logs what it met)
                    await asyncio.shield(rewriting)
        with unavailable("begin_action"):
            reply = await self.scripts.run("begin_action", party_id, now, args, action_id=action_id)
        decision = text(reply[0])
        if decision == "stale":
            log.warning(
                "redis ran begin_action %.1fs late (a stall): refused it",
                time.time() + self._clock_offset - sent,
                extra={"party_id": party_id, "action_id": action_id},
            )
            raise BackendUnavailable("redis ran begin_action too late: refused it")
        verdict = Decision(decision)
        if verdict is Decision.DONE:
            return Verdict(verdict, result=bytes(reply[1]))
        if verdict is Decision.BUSY:
            return Verdict(verdict, blocking_action_id=text(reply[1]))
        if verdict is Decision.IN_FLIGHT and len(reply) > 1:
            claimer: str | None = text(reply[1])
            if claimer in ("", "1"):  # '1': an engine host elsewhere (claim_action.lua)
                claimer = None
            began = _began(reply[2]) if len(reply) > 2 else None
            return Verdict(verdict, claimer=claimer, began=began)
        return Verdict(verdict)

    async def take_over(self, party_id: str, action_id: str, gone: str, now: float) -> bool:
        """Claim for this node an action that node ``gone`` claimed in-process (``take_over.lua``;
        the caller has seen that ``gone``'s heartbeat expired): True if this node now holds it
        and must hand it to its engine."""
        with unavailable("take_over"):
            reply = await self.scripts.run(
                "take_over", party_id, now, [gone, self.node_id], action_id=action_id
            )
        return bool(int(reply))

    async def node_alive(self, node_id: str) -> bool:
        """Whether ``node_id``'s heartbeat (the admin registry's ``<prefix>:node:<id>``) is there.
        A node's own id is always alive."""
        if node_id == self.node_id:
            return True
        with unavailable("node_alive"):
            return bool(await self.client.exists(self.keys.node(node_id)))

    async def claim_action(
        self,
        party_id: str,
        action_id: str,
        now: float,
        refusal: bytes,
        deadline: float | None,
        claimer: str | None = None,
    ) -> tuple[Claim, bytes | str | None]:
        args: list[Arg] = [
            action_id,
            refusal,
            "" if deadline is None else repr(deadline),
            codec.rfc3339(now),
            claimer or "",
        ]
        with unavailable("claim_action"):
            reply = await self.scripts.run("claim_action", party_id, now, args, action_id=action_id)
        claim = Claim(text(reply[0]))
        if len(reply) < 2:
            return claim, None
        return claim, bytes(reply[1]) if claim is Claim.FINAL else text(reply[1])

    async def action_claimer(self, party_id: str, action_id: str) -> str | None:
        with unavailable("action_claimer"):
            claimer = await self.client.hget(self.keys.action(party_id, action_id), "g")
        return text(claimer) if claimer else None

    async def action_answered(self, party_id: str, action_id: str) -> bool:
        # (r: its result; x: a refusal, the deadline's action_timeout among them)
        with unavailable("action_answered"):
            found = await self.client.hmget(self.keys.action(party_id, action_id), ["r", "x"])
        return any(value is not None for value in found)

    async def time_out_action(
        self, party_id: str, action_id: str, now: float, refusal: bytes
    ) -> tuple[Sweep, bytes | None]:
        args: list[Arg] = [action_id, refusal, codec.rfc3339(now)]
        with unavailable("time_out_action"):
            reply = await self.scripts.run(
                "time_out_action", party_id, now, args, action_id=action_id
            )
        sweep = Sweep(text(reply[0]))
        return sweep, bytes(reply[1]) if sweep is Sweep.FINAL or sweep is Sweep.TOLD else None

    async def refuse_action(
        self, party_id: str, action_id: str, character_id: str, refusal: bytes, now: float
    ) -> str | None:
        args: list[Arg] = [action_id, character_id, refusal, codec.rfc3339(now)]
        with unavailable("refuse_action"):
            reply = await self.scripts.run(
                "refuse_action", party_id, now, args, action_id=action_id
            )
        if reply == 0:
            return None
        owner = text(reply)
        self._answered(_Answer(time.monotonic(), party_id, action_id, None, owner, refusal))
        return owner

    # -- narration ------------------------------------------------------------------------------
    async def narrate(self, party_id: str, pieces: Sequence[Piece], now: float) -> list[Outcome]:
        """``narrate.lua``: one script call for all the pieces (a tick's, coalesced by
        ``publishing.Narrator``), one PUBLISH of the taken ones."""
        idle = self.settings.narration_idle
        args: list[Arg] = [
            idle,
            MAX_OPEN_STREAMS,
            MAX_STREAM_CHARS,
            MAX_KEPT_STREAMS,
            int(kept_for(idle) * 1000),
            *self._sent_by(),
        ]
        for p in pieces:
            args += [
                p.stream_id,
                p.index,
                p.text,
                "1" if p.done else "0",
                p.action_id or "",
                len(p.text),
                p.frame,
            ]
        actions = list(dict.fromkeys(p.action_id for p in pieces if p.action_id))
        with unavailable("narrate"):
            reply = await self.scripts.run(
                "narrate", party_id, now, args, narration=True, action_ids=actions
            )
        self._not_stale("narrate", party_id, reply)
        return [Outcome(text(o)) for o in reply]

    def _sent_by(self) -> tuple[str, str]:
        """``_sent_at`` as script arguments (the narration scripts' lateness guard)."""
        sent, stale = self._sent_at()
        return repr(sent), repr(stale)

    @staticmethod
    def _not_stale(script: str, party_id: str, reply: Any) -> None:
        if reply and text(reply[0]) == "stale":
            log.warning(
                "redis ran %s too late (a stall): it changed nothing",
                script,
                extra={"party_id": party_id},
            )
            raise BackendUnavailable(f"redis ran {script} too late: refused it")

    async def close_narration(
        self,
        party_id: str,
        stream_id: str,
        now: float,
        trace_id: str,
        action_id: str | None = None,
    ) -> float | str | None:
        idle = self.settings.narration_idle
        kept_ms = int(kept_for(idle) * 1000)
        args: list[Arg] = [
            stream_id,
            idle,
            codec.rfc3339(now),
            trace_id,
            kept_ms,
            *self._sent_by(),
            action_id or "",
        ]
        with unavailable("close_narration"):
            reply = await self.scripts.run(
                "close_narration",
                party_id,
                now,
                args,
                narration=True,
                action_ids=[action_id] if action_id else [],
            )
        self._not_stale("close_narration", party_id, reply)
        answer = text(reply[0])
        if answer == "due":
            return float(text(reply[1]))
        return GONE if answer == "gone" else None
