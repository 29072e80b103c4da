"""One Redis connection, one write per batch: the script calls of a node, pipelined.

A gateway under load issues many independent scripts at once (each connection's begin_action,
each engine's publish); awaiting each alone costs a round trip and redis-py's per-command overhead
apiece (~10k publishes/s one at a time, ~85k/s in pipelined batches). Here every script
call of a node goes through one dedicated connection: the calls queued while the previous batch
is on the wire (and, at the least, those of one event-loop tick) leave as one write, and their
replies are read in order. Redis still runs every script atomically and in the order queued, so
ordering and atomicity per call are unchanged (the order is now FIFO across ticks too); only the
round trips are shared. Under load batches grow by themselves (Nagle-like, with no timer); an
idle node sends a lone call at once, unless ``redis_write_delay`` is set: then the first call of
an idle batcher waits that long, and every call made meanwhile goes in its batch (one write, one
round trip and one wake-up of the node for all of them, for that much more latency; measured in
docs/redis.md).

What is written by hand, and why: the batch is packed with hiredis's C ``pack_command`` and sent
on a raw redis-py connection (``redis_wire.RawConnection``, which keeps connecting, AUTH, SELECT,
TLS and the hiredis reply parser), bypassing redis-py's ``Pipeline``: that object,
the pool checkout, the pure-Python packer and a ``wait_for`` task per socket operation cost more
than Redis's own work per script (measured in docs/benchmarks.md). The batch is bounded by one
``asyncio.timeout``; a batch that fails or times out drops the connection (its replies can no
longer be matched) and fails its calls and the calls queued behind it, and the next call
reconnects. An idle connection that Redis closed is noticed (EOF in its buffer) and replaced
before a batch is sent on it. A batch that timed out or lost its connection says Redis is not
answering: from then on calls fail at once (not each after a timeout of its own, which piled up
behind every socket's messages in a stall, its pings unanswered for ever longer) while a probe
PINGs Redis every ``PROBE_EVERY`` s; the first answer lets calls through again.

On a Redis Cluster (``ShardedBatcher``) the batching is per shard: one ``ScriptBatcher`` per
master, each call routed by its first key's slot (every party script's keys share the party's
hash tag, so one slot) through redis-py's slot map. A call answered ``MOVED`` (the slot moved: the
map is patched), ``ASK`` (the slot is moving: ``ASKING`` and the script on the importing node, on
a connection of their own), ``TRYAGAIN`` (some of its keys have moved, others not yet) or
``CLUSTERDOWN`` (a failover in progress: the map is read again) is retried, with a short bounded
backoff: Redis sends those errors *before* running a script, so a retried script runs once. A
connection error or a timeout is not retried here (the script may have run): the call fails
(``BackendUnavailable`` for its caller, which may retry) and the slot map is read again, so the
next call finds a promoted replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from hiredis import pack_command
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from party_sync.backends.redis_connect import note_failed, read_slot_map
from party_sync.backends.redis_wire import (
    ConnectionSource,
    NodeConnections,
    RawConnection,
    Script,
    pack_asking_eval,
    pack_evalsha,
)
from party_sync.tasks import Episode, cancel_and_wait, described

#: The probe's command, packed once.
PING = pack_command(("PING",))

log = logging.getLogger(__name__)

_Call = tuple[Script, Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]

#: What makes a batch's failure say "Redis is not answering" (not a refusal of one script).
_UNANSWERED = (TimeoutError, OSError, RedisConnectionError, RedisTimeoutError)
#: Seconds between two probes (a PING) of a batcher whose Redis stopped answering.
PROBE_EVERY = 0.25
#: The longest one probe waits for its PONG: a PING in a stalled Redis's socket is answered the
#: moment it wakes (so calls go through again at once), and a connection that breaks ends the
#: wait sooner; a shorter wait would only drop the PING Redis is about to answer.
PROBE_PATIENCE = 30.0


class ScriptBatcher:
    """Every script call of a node, sent in batches on one connection (see the module)."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        max_batch: int = 256,
        timeout: float = 5.0,
        *,
        connections: ConnectionSource | None = None,
        delay: float = 0.0,
        on_probe_failed: Callable[[], None] | None = None,
    ) -> None:
        """``connections``: where the batch connection comes from (default: ``client``'s pool;
        a Cluster node's ``NodeConnections`` in ``ShardedBatcher``). ``client`` reloads a script
        Redis lost (NOSCRIPT). ``delay``: seconds the first call of an idle batcher waits, so
        that the calls of the next moments go in its batch (``redis_write_delay``; 0 = the
        calls of one loop tick only). ``on_probe_failed``: called after each probe that got no
        answer (``ShardedBatcher``: read the slot map again, so that a master that is no longer
        one has its batcher closed)."""
        self._on_probe_failed = on_probe_failed
        self._episode = Episode(log, "redis is not answering the script connection")
        self._client = client
        if connections is None:
            assert isinstance(client, Redis)
            connections = client.connection_pool
        self._connections = connections
        self._max_batch = max_batch
        self._timeout = timeout
        self._delay = delay
        self._queue: list[_Call] = []
        self._pump: asyncio.Task[None] | None = None
        self._conn: RawConnection | None = None
        self._closed = False
        #: Redis stopped answering (a batch timed out or its connection failed): calls fail at
        #: once, not each after a timeout of its own, until the probe's PING is answered
        self._down = False
        self._probe: asyncio.Task[None] | None = None
        self.batches = 0  # observability and tests: batches sent
        self.calls = 0

    def run(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue one EVALSHA; the future gets its reply (or its error)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(ConnectionError("the script batcher is closed"))
            return future
        if self._down:
            # A stall: one call per connection every timeout piled up behind each socket's
            # messages (its pings unanswered for ever longer); now the caller hears at once.
            future.set_exception(RedisConnectionError("redis is not answering (probing it)"))
            return future
        self._queue.append((script, keys, args, future))
        if self._pump is None:  # starts next tick: this tick's calls go together
            self._pump = loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        try:
            if self._delay:  # the write delay: calls of the next moments join this batch
                await asyncio.sleep(self._delay)
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._send(batch)
        finally:
            self._pump = None

    async def _connection(self) -> RawConnection:
        conn = self._conn
        if conn is not None and conn.connected:
            # As redis-py's pool does on every checkout: a connection that Redis closed while
            # it was idle (a restart, a CLIENT KILL, an idle timeout) shows EOF or stray data
            # in its buffer; replace it before sending, rather than fail the batch (no I/O).
            try:
                stale = await conn.stale()
            except Exception:
                stale = True
            if stale:
                await self._drop()
                conn = None
        if conn is None:
            # No socket timeout: the batch has one deadline (asyncio.timeout) instead.
            conn = self._conn = RawConnection(self._connections, timeout=False)
            await conn.connect()  # the pool's own way (with Sentinel: the master it names)
        return conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _send(self, batch: list[_Call]) -> None:
        self.batches += 1
        self.calls += len(batch)
        packed = pack_evalsha(batch)
        try:
            async with asyncio.timeout(self._timeout):
                conn = await self._connection()
                await conn.send_packed(packed)
                # an error reply comes as its exception: the stream is still in step
                replies = await conn.read_replies(len(batch))
        except BaseException as exc:  # the connection failed or timed out: every call failed
            await self._drop()
            if isinstance(exc, _UNANSWERED) and not self._closed:
                self._mark_down()
            # And so does every call queued behind it: they would each wait for a batch of their
            # own to fail in turn (k batches: k timeouts). They are retryable for their callers,
            # and the next call connects afresh.
            queued, self._queue = self._queue, []
            for *_, future in (*batch, *queued):
                _fail(future, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):  # Redis lost its scripts (restart, flush)
                await self._direct(call)
            elif isinstance(reply, BaseException):
                _fail(call[3], reply)
            elif not call[3].done():
                call[3].set_result(reply)

    @property
    def down(self) -> bool:
        """Redis stopped answering this batcher and has not answered its probe yet."""
        return self._down

    def down_for(self, key: str) -> bool:
        """Whether the Redis that serves ``key`` stopped answering (one Redis: ``down``)."""
        return self._down

    def _mark_down(self) -> None:
        """Redis stopped answering: fail calls at once and PING it until it answers."""
        self._down = True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probing())

    async def _probing(self) -> None:
        """PING on the batch connection (a fresh one after each failure, ``PROBE_EVERY`` s
        apart) until Redis answers; then calls go through again."""
        while self._down and not self._closed:
            try:
                async with asyncio.timeout(max(self._timeout, PROBE_PATIENCE)):
                    conn = await self._connection()
                    await conn.send_packed(PING)
                    await conn.read_replies(1)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # once per episode, with the cause (a WRONGPASS after a password change, a node
                # that refuses connections, a stall)
                self._episode.trouble(type(exc).__name__, described(exc))
                await self._drop()
                if self._on_probe_failed is not None:
                    self._on_probe_failed()
                await asyncio.sleep(PROBE_EVERY)
                continue
            self._down = False
            self._episode.fine("it answers again")

    async def _direct(self, call: _Call) -> None:
        script, keys, args, future = call
        try:
            result = await script(keys=keys, args=args, client=self._client)  # reloads on NOSCRIPT
        except BaseException as exc:
            _fail(future, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if not future.done():
            future.set_result(result)

    async def retire(self, reason: str) -> None:
        """Close it for good, saying why (``reason``) if it was logged as not answering: a
        Cluster master a failover replaced (its "over" would never come otherwise)."""
        self._episode.fine(reason)
        await self.close()

    async def close(self) -> None:
        self._closed = True
        pump = self._pump
        if pump is not None:
            await cancel_and_wait([pump], what="the script batcher")
        if self._probe is not None:
            await cancel_and_wait([self._probe], what="the script batcher's probe")
        queue, self._queue = self._queue, []
        for *_, future in queue:
            _fail(future, ConnectionError("the script batcher is closed"))
        await self._drop()


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


#: Tries of one call through redirections and TRYAGAIN / CLUSTERDOWN (backoff 0.05 s doubling to
#: 0.5 s: about 4 s in all, the time a slot's keys or a failover take to settle in the tests).
MAX_TRIES = 12

#: Seconds between two reads of the slot map asked for by connection errors.
REFRESH_EVERY = 0.25


class ShardedBatcher:
    """Every script call of a node on a Redis Cluster: one ``ScriptBatcher`` per master, each call
    routed by its first key's slot, redirections retried (see the module)."""

    def __init__(
        self,
        client: RedisCluster,
        max_batch: int = 256,
        timeout: float = 5.0,
        *,
        delay: float = 0.0,
    ) -> None:
        self._client = client
        self._max_batch = max_batch
        self._timeout = timeout
        self._delay = delay
        self._shards: dict[str, ScriptBatcher] = {}
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed = 0.0
        self._closed = False
        self._batches = self._calls = 0  # of shards dropped since
        self.redirects = 0  # observability and tests: MOVED / ASK / TRYAGAIN / CLUSTERDOWN seen
        # one WARNING when the slot map cannot be read, one INFO when it can again (a master
        # down: every retry, several a second, would log otherwise)
        self._slot_map = Episode(log, "redis cluster: the slot map could not be read")

    @property
    def batches(self) -> int:
        return self._batches + sum(b.batches for b in self._shards.values())

    @property
    def calls(self) -> int:
        return self._calls + sum(b.calls for b in self._shards.values())

    @property
    def down(self) -> bool:
        """Every master stopped answering (each one's batcher is probing it): one master down
        is an outage of its parties only (``down_for``), not of the node."""
        masters = [self._shards.get(n.name) for n in self._client.get_primaries()]
        return bool(masters) and all(b is not None and b.down for b in masters)

    def down_for(self, key: str) -> bool:
        """The master that serves ``key`` (by redis-py's slot map) stopped answering."""
        try:
            node = _owner(self._client, key_slot(key.encode()))
        except Exception:  # the slot map lacks the slot: the call would find out
            return False
        batcher = self._shards.get(node.name)
        if batcher is None or not batcher.down:
            return False
        # Refused at once: the map is read again meanwhile (its replica may serve the slot now;
        # the batcher's own PING waits out a stalled master, PROBE_PATIENCE)
        self.refresh_soon()
        return True

    def run(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue one script call on its shard; the future gets its reply (or its error)."""
        return asyncio.ensure_future(self._run(script, keys, args))

    def _shard(self, node: ClusterNode) -> ScriptBatcher:
        batcher = self._shards.get(node.name)
        if batcher is None:
            batcher = self._shards[node.name] = ScriptBatcher(
                self._client,
                self._max_batch,
                self._timeout,
                connections=NodeConnections(node),
                delay=self._delay,
                on_probe_failed=self.refresh_soon,
            )
        return batcher

    async def _run(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        if self._closed:
            raise ConnectionError("the script batcher is closed")
        # One bound for the call in all (``redis_command_timeout``): its retries, and redis-py's
        # slot-map reads, which meet a stalled master too. Without it a call to a healthy
        # master waited out another master's whole stall, then ran late.
        try:
            async with asyncio.timeout(self._timeout):
                return await self._attempts(script, keys, args)
        except TimeoutError:
            self._trouble()
            raise

    def _trouble(self) -> None:
        """A master did not answer: this map, and every cluster client's, read again."""
        self.refresh_soon()  # a dead master: the next calls find its replica
        note = getattr(self._client, "note_trouble", None)  # (BoundedRedisCluster's)
        if note is not None:
            note()

    async def _attempts(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        key = keys[0]
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        ask: AskError | None = None
        last: Exception = TryAgainError("no try")
        for attempt in range(MAX_TRIES):
            try:
                if ask is not None:
                    redirect, ask = ask, None
                    return await self._asking(redirect, script, keys, args)
                await self._client.initialize()  # nothing once the slot map is known
                node = _owner(self._client, slot)
                try:
                    return await self._shard(node).run(script, keys, args)
                except (RedisConnectionError, RedisTimeoutError, OSError, asyncio.CancelledError):
                    note_failed([node.name])  # (cancelled: by the call's bound, mostly)
                    raise
            except MovedError as exc:  # before AskError: a subclass of it
                last = exc
                self.redirects += 1
                await self._client.nodes_manager.move_slot(exc)
            except AskError as exc:
                last = ask = exc
                self.redirects += 1
            except (TryAgainError, ClusterDownError, SlotNotCoveredError) as exc:
                last = exc
                self.redirects += 1
                if not isinstance(exc, TryAgainError):
                    self.refresh_soon(force=True)
                await asyncio.sleep(min(0.05 * 2**attempt, 0.5))
            except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError):
                self._trouble()
                raise
        raise last

    async def _asking(
        self, redirect: AskError, script: Script, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        """The call on the node the slot is being imported to, after ``ASKING`` (one write)."""
        nodes = self._client.nodes_manager
        node = nodes.get_node(host=redirect.host, port=redirect.port)
        if node is None:
            node = ClusterNode(redirect.host, redirect.port, **nodes.connection_kwargs)
        conn = RawConnection(NodeConnections(node), timeout=False)
        try:
            async with asyncio.timeout(self._timeout):
                await conn.connect()
                await conn.send_packed(pack_asking_eval(script, keys, args))
                await conn.read()  # +OK
                return await conn.read()
        finally:
            await conn.close()

    def refresh_soon(self, *, force: bool = False) -> None:
        """Read the slot map again in the background (at most every ``REFRESH_EVERY`` s unless
        ``force``); batchers of nodes that are no longer masters are closed."""
        if self._closed or (self._refresh is not None and not self._refresh.done()):
            return
        now = time.monotonic()
        if not force and now - self._refreshed < REFRESH_EVERY:
            return
        self._refreshed = now
        self._refresh = asyncio.get_running_loop().create_task(self._reread())

    async def _reread(self) -> None:
        try:
            await read_slot_map(self._client)  # from a node that answers (not a stalled one)
        except Exception as exc:  # no node answers: the next failed call asks again
            self._slot_map.trouble("unreadable", described(exc))
            return
        self._slot_map.fine("read again")
        masters = {n.name for n in self._client.get_primaries()}
        for name in [name for name in self._shards if name not in masters]:
            batcher = self._shards.pop(name)
            self._batches += batcher.batches
            self._calls += batcher.calls
            await batcher.retire(
                f"{name} is no longer a master: its parties' calls go to the master that "
                "serves their slots now"
            )
        if any(b.down for b in self._shards.values()) and not self._closed:
            # A master the map still names is not answering: read the map again soon, until
            # its replica is named (a failover) or it answers again (failover probe: a stalled
            # master's parties kept being refused after its replica took over)
            asyncio.get_running_loop().call_later(REFRESH_EVERY, self.refresh_soon)

    async def close(self) -> None:
        self._closed = True
        if self._refresh is not None:
            await cancel_and_wait([self._refresh], what="the slot map refresh")
        shards, self._shards = list(self._shards.values()), {}
        for batcher in shards:
            await batcher.close()


def _owner(client: RedisCluster, slot: int) -> ClusterNode:
    """The master serving ``slot`` in redis-py's map (``SlotNotCoveredError`` if none)."""
    try:
        return client.nodes_manager.get_node_from_slot(slot)
    except KeyError:  # a map read while the cluster was down may lack the slot
        raise SlotNotCoveredError(f"slot {slot} is not served") from None
