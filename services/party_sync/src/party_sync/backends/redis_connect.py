"""Every Redis client party_sync makes is made here: one Redis named by a URL, the master of a
Redis Sentinel set, or a Redis Cluster (docs/redis.md, "Deployment topologies").

``make_client(target, **kwargs)`` returns a redis-py asyncio ``Redis`` for either. With Sentinel it
is redis-py's ``Sentinel.master_for``: every connection of its pool (``SentinelConnectionPool``),
including the raw ones ``redis_wire`` takes from the pool's factory, asks the sentinels for the
master's address when it connects, and a connection that finds the old master demoted
(``READONLY``) disconnects, so the next attempt follows the failover by itself.

How ``redis_url`` combines with Sentinel: the URL still switches Redis mode on and gives the
master's username and password, the database number and client options (query string); its host
and port are not used (the master's address comes from the sentinels). ``config.load`` makes it
``redis://<master name>/0`` when only the sentinels are set. ``rediss://`` (TLS) and
``unix://`` URLs are refused with Sentinel (not supported). The sentinels' own password, if they
have one (``requirepass`` in sentinel.conf), is ``Sentinels.password``.

With ``redis_cluster`` (``RedisTarget.cluster``), ``make_cluster_client`` returns redis-py's
asyncio ``RedisCluster``: the URL names any node (``redis://`` or ``rediss://``, db 0), the client
reads the slot map from it and follows ``MOVED``/``ASK`` and failovers. ``make_any_client`` gives
whichever the target needs, for code that uses only commands both have (single-key commands, and
pipelines without MULTI, which RedisCluster splits per node).

Every client's pool is bounded (``max_connections``, ``redis_max_connections``: 100 by default) and
*waits* for a free connection when all are busy, up to the client's ``socket_timeout`` (one
``redis_command_timeout``), before it fails as Redis being unavailable: redis-py's own pools
raise ``MaxConnectionsError`` at once instead, which turned a burst of handshakes (a node's
players reconnecting after a restart) into ``backend_unavailable`` for all but the first hundred.
One Redis and Sentinel use redis-py's ``BlockingConnectionPool`` (with Sentinel, mixed into its
``SentinelConnectionPool``); redis-py has no waiting pool for a Cluster, so ``BoundedRedisCluster``
holds a semaphore per master, of as many slots, around each command and pipeline for that master
(its nodes' pools are as large): a stalled master's commands never hold up another master's.
And a command is given up after ``socket_timeout`` *in all*, its wait for a connection included
(``BoundedRedis``, ``BoundedRedisCluster``), not one timeout for the wait and another for Redis.

Every connection, whatever the topology, runs the rollback fence (``redis_fence``) right after
its handshake, before its first command: a new master (a promoted replica, a restarted process)
that may have lost the newest writes gives every party a new epoch before anyone writes to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol, TypeVar
from urllib.parse import parse_qsl, urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.asyncio.connection import (
    AbstractConnection,
    BlockingConnectionPool,
    Connection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import get_node_name
from redis.crc import key_slot
from redis.exceptions import (
    AuthenticationError,
    MovedError,
    NoPermissionError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import str_if_bytes

from party_sync.backends.keys import DEFAULT_PREFIX, KeySpace, party_channel, run_channel
from party_sync.backends.redis_fence import fence_cluster_on_connect, fence_on_connect
from party_sync.protocol.errors import ConfigError
from party_sync.tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: Connections one client opens at most (``redis_max_connections``), besides the raw ones of the
#: script batcher and pub/sub (``redis_wire``); a command that finds them all busy waits.
DEFAULT_MAX_CONNECTIONS = 100
#: Seconds a command waits for a free connection when its client has no ``socket_timeout``.
POOL_WAIT = 5.0

#: Seconds a sentinel has to answer (connect and each command) before the next one is asked.
SENTINEL_TIMEOUT = 1.0
#: Seconds between two questions to the sentinels about the master, while connections to it are
#: open (``_MasterWatch``): how long one process may go on using a demoted master.
MASTER_CHECK_INTERVAL = 1.0


class RedisSettings(Protocol):
    """The settings a target is read from (``config.Settings`` has them)."""

    @property
    def redis_url(self) -> str | None: ...
    @property
    def redis_sentinels(self) -> tuple[str, ...]: ...
    @property
    def redis_sentinel_master(self) -> str | None: ...
    @property
    def redis_sentinel_password(self) -> str | None: ...
    @property
    def redis_prefix(self) -> str: ...
    @property
    def redis_cluster(self) -> bool: ...
    @property
    def redis_cluster_nodes(self) -> tuple[str, ...]: ...


@dataclass(frozen=True, slots=True)
class Sentinels:
    """Where the sentinels are, the name they monitor the master under, their own password."""

    addresses: tuple[tuple[str, int], ...]
    master: str
    password: str | None = None


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Which Redis a client talks to. ``prefix``: the deployment's key prefix (its fence mark);
    ``cluster``: ``url`` names a node of a Redis Cluster; ``seeds``: more nodes of it to join
    it through when that one cannot be reached."""

    url: str
    sentinels: Sentinels | None = None
    prefix: str = DEFAULT_PREFIX
    cluster: bool = False
    seeds: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, settings: RedisSettings) -> RedisTarget:
        """The target ``settings`` name (``redis_url`` must be set: Redis mode)."""
        if not settings.redis_url:
            raise ValueError("no redis_url: not in Redis mode")
        sentinels = None
        if settings.redis_sentinels:
            sentinels = Sentinels(
                parse_addresses(settings.redis_sentinels),
                settings.redis_sentinel_master or "",
                settings.redis_sentinel_password,
            )
        seeds = (
            parse_addresses(settings.redis_cluster_nodes) if settings.redis_cluster_nodes else ()
        )
        return cls(
            settings.redis_url, sentinels, settings.redis_prefix, settings.redis_cluster, seeds
        )

    def describe(self) -> str:
        """For logs: where, without credentials."""
        if self.sentinels is None:
            parts = urlsplit(self.url)
            where = f"{parts.scheme}://{parts.hostname or ''}{_port(parts.port)}{parts.path}"
            return f"cluster via {where}" if self.cluster else where
        where = ",".join(f"{host}:{port}" for host, port in self.sentinels.addresses)
        return f"sentinel {self.sentinels.master} via {where}"


def _port(port: int | None) -> str:
    return f":{port}" if port else ""


def parse_addresses(values: tuple[str, ...] | list[str]) -> tuple[tuple[str, int], ...]:
    """``host:port`` strings (``[v6]:port`` too) → pairs; ``ValueError`` says which is wrong."""
    pairs: list[tuple[str, int]] = []
    for value in values:
        host, sep, port = value.strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"not host:port: {value!r}")
        pairs.append((host, int(port)))
    if not pairs:
        raise ValueError("no address")
    return tuple(pairs)


def sentinel_url_problem(url: str) -> str | None:
    """Why ``url`` cannot go with Sentinel, or None."""
    scheme = urlsplit(url).scheme
    if scheme == "rediss":
        return "TLS (rediss://) to a Sentinel-managed master is not supported: use redis://"
    if scheme != "redis":
        return f"redis_url must be redis://[user:password@]<any host>/<db> with Sentinel, not {scheme}://"
    return None


def cluster_url_problem(url: str) -> str | None:
    """Why ``url`` cannot name a Redis Cluster node, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return (
            "redis_url must be redis[s]://[user:password@]<node host>:<port> with "
            f"redis_cluster, not {parts.scheme}://"
        )
    if parts.path.strip("/") not in ("", "0"):
        return "a Redis Cluster has only database 0: redis_url must end in /0 or nothing"
    return None


def as_target(target: RedisTarget | str, prefix: str = DEFAULT_PREFIX) -> RedisTarget:
    """A plain URL is a one-Redis target."""
    return target if isinstance(target, RedisTarget) else RedisTarget(target, prefix=prefix)


def stale_socket_retry(retries: int = 1) -> Retry:
    """The retry of a client of one Redis (or Sentinel's master): a command that fails on a
    broken connection (a pooled socket a Redis restart left dead) is sent again on a new one,
    ``retries`` times. A command that *timed out* is not: Redis is stalled or slow, another
    ``socket_timeout`` would only double the wait before ``BackendUnavailable`` (the documented
    bound is one ``command_timeout``), and the command may still run when Redis wakes up.
    (redis-py's default retries timeouts too.) A Redis Cluster client (``RedisCluster``) takes
    only the count from a ``Retry`` and retries timeouts whatever it says: there a timed-out
    command is still sent again, up to that count."""
    return Retry(
        ExponentialBackoff(cap=0.1, base=0.01), retries, supported_errors=(RedisConnectionError,)
    )


#: What uvloop's RuntimeError says about a write on a transport that has closed ("unable to
#: perform operation on <TCPTransport closed=True ...>; the handler is closed").
TRANSPORT_CLOSED = "unable to perform operation on"


class _LostWhenClosed(AbstractConnection):
    """A redis-py asyncio connection whose write on a socket the peer has reset (a pooled
    connection that a NAT or conntrack timeout, a resetting proxy or a crashed Redis host left
    dead, unnoticed until the next command) is a lost connection, ``ConnectionError``, as it
    is on the stock loop, not uvloop's ``RuntimeError``: so the client's retry sends the command
    again on a new connection (``stale_socket_retry``; a Cluster client re-reads its slot map),
    and every caller sees Redis unavailable. (Partition probe: the RuntimeError went past the
    actions stream's append, whose player was told engine_unavailable, final, with the engine
    and Redis both well.) Mixed into every connection class here (``lost_aware``).

    So is a write on a connection closed under it: another task disconnected it between
    redis-py's "is it connected" and its write (a Cluster client drops a failed node's
    connections while calls on them are under way), or the loop tore down the transport of a
    reset socket; redis-py lets the writer's internals fail then, as an ``AttributeError`` or
    ``TypeError`` about ``None`` (redis-py issues 3546 and 4287). Workers probe: after a Cluster
    master was killed, an engine worker's ``XAUTOCLAIM`` on a healthy master raised
    ``'NoneType' object has no attribute 'writelines'``, taken for a bug, and the worker
    exited: every party's actions timed out until it was restarted. Nothing of party_sync runs
    inside the write (the command is packed before it), so no bug of ours is hidden here."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as exc:
            if TRANSPORT_CLOSED not in str(exc):
                raise
            # (redis-py has disconnected it: the next use opens a new socket)
            raise RedisConnectionError(f"connection lost: {exc}") from exc
        except (AttributeError, TypeError) as exc:
            if "NoneType" not in str(exc):
                raise
            # (redis-py disconnected it already; a subclass in between may not have)
            await self.disconnect(nowait=True)
            raise RedisConnectionError(f"connection closed under a write: {exc}") from exc


_Conn = TypeVar("_Conn", bound=AbstractConnection)
_LOST_AWARE: dict[type[Any], type[Any]] = {}


def lost_aware(kind: type[_Conn]) -> type[_Conn]:
    """``kind`` (a redis-py asyncio connection class: plain, TLS, Unix socket) with
    ``_LostWhenClosed``, one class per kind."""
    if issubclass(kind, _LostWhenClosed):
        return kind
    made = _LOST_AWARE.get(kind)
    if made is None:
        made = _LOST_AWARE[kind] = type(
            kind.__name__, (_LostWhenClosed, kind), {"__module__": __name__}
        )
    return made


def make_client(target: RedisTarget | str, **kwargs: Any) -> Redis:
    """A redis-py asyncio client of ``target``'s Redis (its master, with Sentinel).

    ``kwargs`` are redis-py's connection options (timeouts, retry, ``client_name``,
    ``protocol``...), as for ``Redis.from_url``. Without a ``retry``, ``stale_socket_retry()``:
    redis-py's own default retries a timed-out command ten times, so a stalled Redis would hold
    a caller for eleven times its ``socket_timeout``. Raises ``ValueError`` on a malformed URL.
    """
    target = as_target(target)
    if target.cluster:
        raise ValueError("a Redis Cluster target: use make_cluster_client or make_any_client")
    kwargs.setdefault("retry", stale_socket_retry())
    kwargs["redis_connect_func"] = functools.partial(fence_on_connect, prefix=target.prefix)
    kwargs = _waiting(kwargs)
    if target.sentinels is None:
        # (BlockingConnectionPool.from_url, with the URL's connection class made lost_aware)
        options: dict[str, Any] = {**kwargs, **parse_url(target.url)}
        options["connection_class"] = lost_aware(options.get("connection_class", Connection))
        return BoundedRedis.on(IdleClosingPool(**options))
    problem = sentinel_url_problem(target.url)
    if problem is not None:
        raise ValueError(problem)
    from_url: dict[str, Any] = dict(parse_url(target.url))
    for unused in ("connection_class", "path"):
        from_url.pop(unused, None)
    # The master's address comes from the sentinels (_SentinelConnection). Should any path ever
    # open a socket without asking them, it must fail, not reach redis-py's default localhost:6379
    # (another Redis, perhaps another deployment's): port 0 is refused at once.
    from_url["host"], from_url["port"] = "127.0.0.1", 0
    from_url["connection_class"] = _SentinelConnection
    sentinel_kwargs: dict[str, Any] = {
        "socket_connect_timeout": SENTINEL_TIMEOUT,
        "socket_timeout": SENTINEL_TIMEOUT,
        "retry": stale_socket_retry(),  # a silent sentinel costs one timeout, then the next one
    }
    if target.sentinels.password:
        sentinel_kwargs["password"] = target.sentinels.password
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels.addresses), sentinel_kwargs=sentinel_kwargs
    )
    client: Redis = sentinel.master_for(
        target.sentinels.master,
        redis_class=_SentinelRedis,
        connection_pool_class=_WaitingSentinelPool,
        **{**from_url, **kwargs},
    )
    assert isinstance(client, _SentinelRedis)
    client.bound = kwargs.get("socket_timeout")
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    _MasterWatch.of(pool).pools.add(pool)
    return client


def _waiting(options: dict[str, Any]) -> dict[str, Any]:
    """Connection ``options`` for a pool of at most ``max_connections`` (default
    ``DEFAULT_MAX_CONNECTIONS``) that waits up to the ``socket_timeout`` for a free one."""
    return {
        **options,
        "max_connections": options.get("max_connections") or DEFAULT_MAX_CONNECTIONS,
        "timeout": options.get("socket_timeout") or POOL_WAIT,  # the wait for a connection
    }


async def within(bound: float | None, call: Coroutine[Any, Any, Any]) -> Any:
    """``call``'s result, given up after ``bound`` seconds in all (``None``: no bound) as a Redis
    timeout, as callers of redis-py expect. redis-py disconnects a connection whose reply a
    cancellation cut short, and its pools take back a connection whose wait was cancelled."""
    try:
        async with asyncio.timeout(bound):
            return await call
    except TimeoutError as exc:
        raise RedisTimeoutError(f"no answer within {bound}s in all") from exc
    finally:
        call.close()  # (never awaited when the timeout came first; a no-op once it ran)


class BoundedRedis(Redis):
    """redis-py's ``Redis`` whose every command and pipeline is given up after ``bound`` seconds
    in all (its ``socket_timeout``: one ``redis_command_timeout``), the wait for a free pooled
    connection included: with every connection busy (a stalled Redis), a command waited once
    for a connection and again for Redis, twice the bound."""

    bound: float | None = None
    #: Closed (``aclose``): a call then raises ``ConnectionError``; redis-py's pool would open a
    #: new connection for it, which nobody would close (as ``BoundedRedisCluster._closed``).
    _closed: bool = False

    @classmethod
    def on(cls, pool: BlockingConnectionPool) -> BoundedRedis:
        """A client of ``pool`` (closed with it), bounded by its connections' ``socket_timeout``."""
        client = cls.from_pool(pool)
        assert isinstance(client, BoundedRedis)
        client.bound = pool.connection_kwargs.get("socket_timeout")
        return client

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise RedisConnectionError("the Redis client is closed")
        command = super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]
        return await within(self.bound, command)

    def pipeline(self, transaction: bool = True, shard_hint: Any | None = None) -> Pipeline:
        pipe = _BoundedRedisPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipe.bound = self.bound
        pipe.owner = self
        return pipe

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        self._closed = True
        await super().aclose(close_connection_pool)


class _BoundedRedisPipeline(Pipeline):
    bound: float | None = None
    owner: BoundedRedis | None = None

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if self.owner is not None and self.owner._closed:
            raise RedisConnectionError("the Redis client is closed")
        answers: list[Any] = await within(self.bound, super().execute(raise_on_error))
        return answers

    async def reset(self) -> None:  # type: ignore[override]  # Pipeline.reset, not RESET
        # A WATCH transaction cut short by the bound (in EXEC, say) left its connection
        # disconnected: a new socket watches nothing, and UNWATCH would reconnect and wait again,
        # past the bound (redis-py sends it whenever ``watching``).
        if self.watching and self.connection is not None and not self.connection.is_connected:
            self.watching = False
        await super().reset()  # type: ignore[no-untyped-call]


#: Set while a task runs a command or pipeline of a ``BoundedRedisCluster`` in a master's slot:
#: what it does meanwhile through the client (a pipeline resends a redirected command) must not
#: wait for another slot (with every slot held so, none would ever be free).
_HOLDING_SLOT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "party_sync_redis_slot", default=False
)
#: Set while a command or pipeline of a ``BoundedRedisCluster`` runs: an ``aclose`` then is
#: redis-py's own (after ``CLUSTERDOWN`` or many ``MOVED``: the next call reads the map again),
#: any other is its owner's, for good.
_IN_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "party_sync_redis_call", default=False
)


#: Seconds a pooled connection may stay unused before it is closed, beyond the ``IDLE_KEPT``
#: most recently used; how often a pool looks (on a connection's release: a node's pools are
#: used every few seconds by its heartbeats).
IDLE_CLOSE_AFTER = 120.0
IDLE_CHECK_EVERY = 30.0
IDLE_KEPT = 4


class IdleClosingPool(BlockingConnectionPool):
    """redis-py's waiting pool that closes the connections a burst opened once they have been
    unused for ``IDLE_CLOSE_AFTER`` s (keeping the ``IDLE_KEPT`` most recently used): a pool
    grows to the commands in flight at once and redis-py never shrinks it (soak probe: 300
    players leaving at once left a node with 100 idle connections to Redis for good).

    Leans on redis-py's ``ConnectionPool._available_connections`` (5.x to 8.x: a list whose
    ``pop()`` takes the newest, so the oldest idle ones are at its front); the closing is
    synchronous with the list (nothing can take a connection meanwhile)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._idle_since: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._next_idle_check = time.monotonic() + IDLE_CHECK_EVERY

    async def release(self, connection: Any) -> None:
        now = time.monotonic()
        self._idle_since[connection] = now
        await super().release(connection)
        if now >= self._next_idle_check:
            self._next_idle_check = now + IDLE_CHECK_EVERY
            await self._close_idle(now)

    async def _close_idle(self, now: float) -> None:
        available: list[Any] = self._available_connections
        spare = len(available) - IDLE_KEPT
        if spare <= 0:
            return
        stale = [
            c for c in available[:spare] if now - self._idle_since.get(c, now) >= IDLE_CLOSE_AFTER
        ]
        for connection in stale:
            available.remove(connection)
        for connection in stale:
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
        if stale:
            log.debug("closed %d Redis connections idle for %.0f s", len(stale), IDLE_CLOSE_AFTER)


class _WaitingSentinelPool(SentinelConnectionPool, IdleClosingPool):
    """The master's pool with Sentinel: redis-py's ``SentinelConnectionPool`` (the master's
    address from the sentinels) that waits for a free connection as ``BlockingConnectionPool``
    does, instead of raising ``MaxConnectionsError``."""


def _word(arg: Any) -> str | None:
    """An argument as an upper-case word (None: not text)."""
    if isinstance(arg, bytes | bytearray | memoryview):
        try:
            return bytes(arg).decode("ascii").upper()
        except UnicodeDecodeError:
            return None
    return arg.upper() if isinstance(arg, str) else None


def stream_read_keys(command: Any, args: Sequence[Any]) -> list[Any] | None:
    """The stream keys of an ``XREAD`` or ``XREADGROUP`` (``args`` after the command's name), as
    Redis reads them: after the options (``GROUP g c``, ``COUNT n``, ``BLOCK ms``, ``NOACK``),
    ``STREAMS k1 … kn id1 … idn``. None for any other command, or arguments not in that form
    (redis-py then finds the keys its own way)."""
    name = _word(command)
    if name == "XREADGROUP":
        if len(args) < 3 or _word(args[0]) != "GROUP":
            return None
        at = 3
    elif name == "XREAD":
        at = 0
    else:
        return None
    while at < len(args):
        word = _word(args[at])
        if word in ("COUNT", "BLOCK"):
            at += 2
        elif word == "NOACK":
            at += 1
        elif word == "STREAMS":
            rest = args[at + 1 :]
            if not rest or len(rest) % 2:
                return None
            return list(rest[: len(rest) // 2])
        else:
            return None
    return None


#: Seconds a read of a Redis Cluster's slot map waits for the nodes it asks to answer a PING (it
#: then asks one that did for the map): a node that answers takes milliseconds; one that does not
#: is a stalled or dead node, which redis-py would otherwise ask first, for a whole command timeout.
MAP_PING_WAIT = 1.0

#: Once one node answered, how much longer the others are given (the map is read from the first).
_MAP_PING_GRACE = 0.05

#: Seconds between two background reads of the slot map (``BoundedRedisCluster.refresh_slot_map``).
MAP_REFRESH_EVERY = 0.25

#: Seconds after a cluster node last failed to answer during which every cluster client of the
#: process reads its slot map again every ``MAP_REFRESH_EVERY`` s (``note_trouble``): a failover
#: a few seconds later is then followed within that period by every client, not only by one
#: whose own call met the dead node after the promotion.
MAP_WATCH = 10.0

#: The cluster clients of this process (``note_trouble`` tells them all).
_CLUSTER_CLIENTS: weakref.WeakSet[BoundedRedisCluster] = weakref.WeakSet()


async def answering(
    nodes: Sequence[ClusterNode], wait: float = MAP_PING_WAIT, *, everyone: bool = False
) -> list[ClusterNode]:
    """The ``nodes`` that answer a PING, in the order they did: every node is asked at once, and
    once one has answered the others get ``_MAP_PING_GRACE`` more (none answered within ``wait``:
    []). A stalled node is not waited for. ``everyone``: each is given the whole ``wait`` (a
    count of those that answer, not the first one to use)."""
    if not nodes:
        return []
    pings = {asyncio.ensure_future(_ping(node)): node for node in nodes}
    answered: list[ClusterNode] = []
    loop = asyncio.get_running_loop()
    try:
        pending = set(pings)
        deadline = loop.time() + wait
        while pending:
            left = deadline - loop.time()
            if left <= 0:
                break
            done, pending = await asyncio.wait(
                pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            answered.extend(pings[t] for t in done if not t.cancelled() and t.result())
            if answered and not everyone:
                deadline = min(deadline, loop.time() + _MAP_PING_GRACE)
    finally:
        for task in pings:
            task.cancel()
        await asyncio.gather(*pings, return_exceptions=True)
    return answered


async def _ping(node: ClusterNode) -> bool:
    try:
        return bool(await _ask(node, "PING"))
    except Exception:  # (a dead node: not answering)
        return False


async def _ask(node: ClusterNode, *args: Any) -> Any:
    """``args`` on a connection of its own to ``node``, closed after (also when the caller gives
    up on it): not one of the node's pool, whose size the commands count on (a PING under a burst
    took the connection a command waited for, which then failed at once) and whose connections a
    call cut short in its handshake leaves unclosed. Without the fence hook: it only asks."""
    options = {k: v for k, v in node.connection_kwargs.items() if k != "redis_connect_func"}
    conn = node.connection_class(**options)
    try:
        await conn.connect()  # type: ignore[no-untyped-call]
        await conn.send_command(*args)
        return await conn.read_response()
    finally:  # (nowait: the socket is closed at once, also in a task being cancelled)
        await conn.disconnect(nowait=True)


async def read_slot_map(client: RedisCluster, wait: float = MAP_PING_WAIT) -> None:
    """Read ``client``'s slot map again, from a node that answers. redis-py asks its known nodes
    one after another, in a random order, each for up to a whole command timeout: one stalled
    node held every read (and every call that waited for one) that long (failover probe: 4-6 s
    for parties of healthy masters, and a stalled master's parties not following its promoted
    replica while reads kept meeting it). Here only the nodes that answer a PING are asked (all
    of them if none does, as redis-py would); the nodes the map names are known again after."""
    nodes = client.nodes_manager
    known = dict(nodes.startup_nodes)
    live = await answering(list(known.values()), wait)
    if not live:  # (not every node, one after another: a stalled one would hold the lock)
        raise RedisClusterException("no node of the cluster answers a PING")
    if nodes.slots_cache and await _map_unchanged(nodes, live[0]):
        return  # (redis-py's read would reconnect every pooled connection: a fence each)
    if len(live) == len(known):
        await nodes.initialize()
        return
    nodes.startup_nodes = {node.name: node for node in live}
    try:
        await nodes.initialize()
    finally:  # (redis-py puts every node of the map back in; the ones it does not know stay)
        for name, node in known.items():
            nodes.startup_nodes.setdefault(name, node)


async def _map_unchanged(nodes: Any, node: ClusterNode) -> bool:
    """Whether ``node``'s ``CLUSTER SLOTS`` names the same master for every slot as the map
    ``nodes`` (redis-py's ``NodesManager``) has (False if it cannot tell)."""
    try:
        ranges = await _ask(node, "CLUSTER", "SLOTS")
        cache = nodes.slots_cache
        covered = 0
        for entry in ranges:
            first, last, primary = int(entry[0]), int(entry[1]), entry[2]
            host = str_if_bytes(primary[0]) or node.host
            name = get_node_name(*nodes.remap_host_port(host, int(primary[1])))
            for slot in range(first, last + 1):
                owners = cache.get(slot)
                if not owners or owners[0].name != name:
                    return False
            covered += last - first + 1
        return covered == len(cache)
    except Exception:  # an answer of another shape: read the map as redis-py does
        return False


def _retrieved(future: asyncio.Future[None]) -> None:
    """A shielded close's outcome, read even when nobody awaits it any more (its closer was
    cancelled): a failure is logged, not left to "exception was never retrieved"."""
    if not future.cancelled() and future.exception() is not None:
        log.warning("closing a Redis Cluster client failed: %s", future.exception())


class BoundedRedisCluster(RedisCluster):
    """redis-py's ``RedisCluster`` whose every command is given up after ``bound`` seconds *in
    all* (its ``socket_timeout``: one ``redis_command_timeout``). The client retries a timeout
    and re-reads its slot map on its own, and that read meets a stalled master as well: a command
    for a healthy master waited out another master's whole stall, then ran late.

    At most ``per_master`` commands and pipelines run at once on each master (a semaphore per
    master, by node name); more wait for one to end, within the same bound. A node's pool is that
    large, so it never raises ``MaxConnectionsError`` (which redis-py's cluster raises at once
    when a node's pool is full), and a stalled master's waiting commands hold no other master's
    slots.
    """

    bound: float | None = None
    per_master: int = DEFAULT_MAX_CONNECTIONS
    #: each master's semaphore of ``per_master`` slots, by node name (``make_cluster_client``)
    semaphores: dict[str, asyncio.Semaphore]
    _refreshing: asyncio.Task[None] | None = None
    _refreshed_at: float = -MAP_REFRESH_EVERY
    #: The event loop's time at which the last map read that has ended began (``_refresh``),
    #: and a future for the end of the next one (``_fresh_map``).
    _read_began: float = float("-inf")
    _read_ended: asyncio.Future[None] | None = None
    #: The masters whose calls failed (timed out, lost the connection), by node name: the event
    #: loop's time of the last failure (``_execute_command``, ``_fresh_map``).
    failed_at: dict[str, float]
    _trouble_until: float = 0.0  # the event loop's time until which the map is read repeatedly
    _loop: asyncio.AbstractEventLoop | None = None  # the one this client runs in
    #: Closed by its owner: a call then raises ``ConnectionError``. redis-py's client opens
    #: itself again at the next call after any ``aclose`` (a call that came late, from a task
    #: still running at shutdown, left a client nobody would close: "Unclosed RedisCluster
    #: client" at a later garbage collection, which failed a test run).
    _closed: bool = False
    _closing: asyncio.Future[None] | None = None  # the owner's close, once begun

    async def initialize(
        self,
        additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> RedisCluster:
        """The slot map, read at the first call (every call waits for it). Asked again later
        (redis-py asks after a node failed or the cluster was down), it is read again in the
        background (``refresh_slot_map``) and every call meanwhile uses the map it has: a call
        for a healthy master's slots goes through at once, not after a read that may meet a
        stalled node (see ``read_slot_map``); one for a stalled master's times out as before."""
        self.check_open()
        if self not in _CLUSTER_CLIENTS:  # (again after an aclose, if it is used again)
            self._loop = asyncio.get_running_loop()
            _CLUSTER_CLIENTS.add(self)
        if self._initialize and self.nodes_manager.slots_cache and self.commands_parser.commands:
            if self.get_default_node() is None:  # (redis-py's aclose unset it: any master)
                primaries = self.get_primaries()
                if primaries:
                    self.set_default_node(primaries[0])
            self.refresh_slot_map()
            return self
        return await super().initialize(additional_startup_nodes_info, last_failed_node_name)

    def refresh_slot_map(self) -> None:
        """Read the slot map again in the background, at most every ``MAP_REFRESH_EVERY`` s."""
        task = self._refreshing
        if self._closed or (task is not None and not task.done()):
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._refreshed_at < MAP_REFRESH_EVERY:
            return
        self._refreshed_at = loop.time()
        self._refreshing = loop.create_task(self._refresh())

    def note_trouble(self) -> None:
        """A node of the cluster did not answer (a call timed out or lost its connection): every
        cluster client of this process reads its slot map again now, and every
        ``MAP_REFRESH_EVERY`` s until ``MAP_WATCH`` s after the last such failure. A call that is
        cut short by its bound never reaches redis-py's own handling of a timeout, which would
        ask for the map: a stalled master's stream partition kept being appended to after its
        replica took over (failover probe), and an engine worker's calls for that master's
        parties, sent after the promotion, went to it and waited out a timeout each."""
        loop = asyncio.get_running_loop()
        until = loop.time() + MAP_WATCH
        for client in list(_CLUSTER_CLIENTS):
            if client._loop is loop:  # (a client of a loop that has ended is left alone)
                client._trouble_until = max(client._trouble_until, until)
                client.refresh_slot_map()

    async def _refresh(self) -> None:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        while self._refreshing is me:  # (else stopped, its cancellation lost: see below)
            began = loop.time()
            try:
                await read_slot_map(self, min(self.bound or MAP_PING_WAIT, MAP_PING_WAIT))
                live = await answering(self.get_primaries())
            except Exception as exc:  # no node answers: asked again (below, or by a call)
                log.debug("redis cluster: the slot map could not be read again: %s", exc)
                self._map_read(began, ())
            else:
                self._map_read(began, live)
                if self._refreshing is not me:
                    # Stopped meanwhile (the client closed), and the cancellation did not reach
                    # this task: a read cut short by it inside redis-py can end as a timeout, a
                    # failed read, and the loop went on. Its map must not open the client again
                    # (a closed client marked open: "Unclosed RedisCluster client", a CI run).
                    if self._closed:
                        self._drop_connections()
                    return
                if live:
                    self.set_default_node(live[0])  # (keyless commands: a master that answers)
                self._initialize = False
            self._refreshed_at = loop.time()
            if loop.time() + MAP_REFRESH_EVERY > self._trouble_until:
                return
            await asyncio.sleep(MAP_REFRESH_EVERY)

    def _map_read(self, began: float, live: Iterable[ClusterNode]) -> None:
        """A map read begun at ``began`` has ended (read or not); the masters of its map that
        answered are no longer failed. Calls waiting for it go on (``_fresh_map``)."""
        self._read_began = max(self._read_began, began)
        for node in live:
            self.failed_at.pop(node.name, None)
        ended, self._read_ended = self._read_ended, None
        if ended is not None and not ended.done():
            ended.set_result(None)

    async def _fresh_map(self, nodes: Iterable[ClusterNode]) -> bool:
        """If a call's master failed within ``MAP_WATCH`` s and no map read begun since has
        ended: wait for one (the call's bound still holds), and say so (True: find its master
        again). After a timeout on a stalled master, a call made at once went to it again,
        before the map read that timeout set off could name the replica promoted in its place:
        a second whole timeout (cluster probe: an action's append retried 0.25 s later)."""
        loop = asyncio.get_running_loop()
        never = float("-inf")
        failed = max((self.failed_at.get(node.name, never) for node in nodes), default=never)
        if failed < loop.time() - MAP_WATCH:
            return False
        waited = False
        while self._read_began < failed and not self._closed:
            if self._read_ended is None:
                self._read_ended = loop.create_future()
            self.refresh_slot_map()  # (a read within MAP_REFRESH_EVERY: the next one, below)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(MAP_REFRESH_EVERY):
                    await asyncio.shield(self._read_ended)
            waited = True
        return waited

    async def _determine_nodes(self, *args: Any, **kwargs: Any) -> list[ClusterNode]:
        # Every call and pipeline of the client finds its masters here (redis-py 5.x to 8.x).
        nodes: list[ClusterNode] = await super()._determine_nodes(*args, **kwargs)
        if self.failed_at and await self._fresh_map(nodes):
            nodes = await super()._determine_nodes(*args, **kwargs)
        if any(node is None for node in nodes):
            # a map being replaced under the call names no node for a moment (redis-py issue
            # 3835: "'NoneType' object has no attribute 'name'" further on, which no caller
            # takes for Redis unavailable): a cluster error, retried and told as one
            raise SlotNotCoveredError("the slot map names no node for this call yet")
        return nodes

    def _failed(self, names: Iterable[str]) -> None:
        note_failed(names)

    async def aclose(self) -> None:
        """Also redis-py's own step after ``CLUSTERDOWN`` or many ``MOVED`` (within a call): it
        closes every connection, and the next call asks for the map again (initialize). Outside
        a call, its owner's: for good, and carried to its end even if the owner is cancelled
        meanwhile (a shutdown bounded in time, while a call holds the client's lock or a map
        read is being stopped): cut short there, the client stayed open for good."""
        if _IN_CALL.get():
            await self._close()
            return
        self._closed = True
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
            self._closing.add_done_callback(_retrieved)
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        _CLUSTER_CLIENTS.discard(self)  # (note_trouble would open it again: a closed client)
        try:
            task, self._refreshing = self._refreshing, None
            if task is not None:
                await cancel_and_wait([task], what="the slot map refresh")
            self._initialize = False  # (else redis-py's aclose closes nothing)
            await super().aclose()
        except BaseException:
            # The owner's close cut short (its event loop ending cancels every task: the close
            # waited for the lock a stalled map read held) or failed: every socket is closed
            # here, at once, and the client is marked closed, not left open with its
            # connections. (redis-py's own close within a call, cut short, is left as it was:
            # the client is still in use, and its next call closes and reads the map again.)
            if self._closed:
                self._drop_connections()
            raise

    def _drop_connections(self) -> None:
        """Close every connection of every node now, without waiting (redis-py's own
        ``disconnect`` outside a task does the same). Leans on redis-py's ``ClusterNode``
        (``_connections``) and ``AbstractConnection._close`` (5.x to 8.x)."""
        manager = self.nodes_manager
        for nodes in (manager.nodes_cache, manager.startup_nodes):
            for node in list(nodes.values()):
                for connection in list(getattr(node, "_connections", ())):
                    with contextlib.suppress(Exception):
                        connection._close()
        self._initialize = True  # (closed: what redis-py's aclose sets before it disconnects)

    def check_open(self) -> None:
        """Raise ``ConnectionError`` if its owner closed it (before a call's ``note_trouble``,
        which a refused call must not set off)."""
        if self._closed:
            raise RedisConnectionError("the Redis Cluster client is closed")

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self.check_open()
        token = _IN_CALL.set(True)
        try:
            return await within(self.bound, self._initialized_then(*args, **kwargs))
        except (RedisConnectionError, RedisTimeoutError):
            self.note_trouble()
            raise
        finally:
            _IN_CALL.reset(token)

    async def _initialized_then(self, *args: Any, **kwargs: Any) -> Any:
        # The slot map read first, once for all (initialize takes a lock): commands made before
        # it, many at once, each ran redis-py's own start-up path and overfilled a node's pool
        # (MaxConnectionsError within the bound; none once initialized: test_pool_bound).
        await self.initialize()
        return await super().execute_command(*args, **kwargs)

    async def _determine_slot(self, command: str, *args: Any) -> int:
        # redis-py asks a node for the keys of a "movable keys" command (COMMAND GETKEYS), always
        # the same one: while that master was stalled, every XREADGROUP of an engine worker, on
        # every partition, waited for it (cluster probe). A stream read's keys are read here.
        keys = stream_read_keys(command, args)
        if keys is None:
            return int(await super()._determine_slot(command, *args))
        slots = {self.keyslot(key) for key in keys}
        if len(slots) != 1:
            raise RedisClusterException(f"{command} - all keys must map to the same key slot")
        return slots.pop()

    async def _execute_command(self, target_node: ClusterNode, *args: Any, **kwargs: Any) -> Any:
        # Every command of the client meets its master here, with the master known.
        try:
            async with self.slots_of([target_node.name]):
                return await super()._execute_command(target_node, *args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError, asyncio.CancelledError):
            self._failed([target_node.name])  # (cancelled: by the call's bound, mostly)
            raise

    @contextlib.asynccontextmanager
    async def slots_of(self, names: Iterable[str]) -> AsyncIterator[None]:
        """A slot of each of these masters (taken in one order: no two callers wait on each
        other), held while the body runs; none if this task holds slots already."""
        if _HOLDING_SLOT.get():
            yield
            return
        async with contextlib.AsyncExitStack() as held:
            for name in sorted(set(names)):
                semaphore = self.semaphores.get(name)
                if semaphore is None:
                    semaphore = self.semaphores[name] = asyncio.Semaphore(self.per_master)
                await held.enter_async_context(semaphore)
            token = _HOLDING_SLOT.set(True)
            try:
                yield
            finally:
                _HOLDING_SLOT.reset(token)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return _BoundedPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py makes its own


class _BoundedPipeline(ClusterPipeline):
    """A pipeline of ``BoundedRedisCluster``: it holds a slot of each master its commands' keys
    live on while it runs, all within the client's bound (each command's slot found as redis-py
    finds it: a script's keys come after its text and their count)."""

    def __init__(self, client: BoundedRedisCluster, transaction: Any | None = None) -> None:
        super().__init__(client, transaction)
        self._queued: list[tuple[Any, ...]] = []  # the commands' arguments, to find their slots

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self._queued.append(args)
        return super().execute_command(*args, **kwargs)

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        client = self.cluster_client
        assert isinstance(client, BoundedRedisCluster)
        commands, self._queued = self._queued, []
        client.check_open()
        token = _IN_CALL.set(True)
        try:
            return await within(
                client.bound, self._run(client, commands, raise_on_error, allow_redirections)
            )
        except (RedisConnectionError, RedisTimeoutError):
            client.note_trouble()
            raise
        finally:
            _IN_CALL.reset(token)

    async def _run(
        self,
        client: BoundedRedisCluster,
        commands: list[tuple[Any, ...]],
        raise_on_error: bool,
        redirect: bool,
    ) -> Any:
        await client.initialize()
        masters: set[str] = set()
        for args in commands:
            with contextlib.suppress(Exception):  # no master now: redis-py's execute says why
                slot = await client._determine_slot(*args)
                masters.add(client.nodes_manager.get_node_from_slot(slot).name)
        try:
            async with client.slots_of(masters):
                return await super().execute(raise_on_error, redirect)
        except (RedisConnectionError, RedisTimeoutError, OSError, asyncio.CancelledError):
            client._failed(masters)  # (which of them did not answer, redis-py does not say)
            raise


def note_failed(names: Iterable[str]) -> None:
    """These masters (node names, ``host:port``) did not answer a call of this process (a
    timeout, a lost connection): every cluster client of it waits for a map read begun after
    this before its next call to one of them (``BoundedRedisCluster._fresh_map``). Cluster
    probe: the scripts' calls of a stalled master's party had timed out, and that party's
    action, accepted on the promoted replica, was then appended by the actions stream's client,
    whose map still named the stalled master: one more whole command timeout."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    names = list(names)
    for client in list(_CLUSTER_CLIENTS):
        failed_at = getattr(client, "failed_at", None)
        if client._loop is loop and failed_at is not None:
            for name in names:
                failed_at[name] = now


def make_cluster_client(target: RedisTarget, **kwargs: Any) -> RedisCluster:
    """A redis-py asyncio ``RedisCluster`` of the cluster ``target.url`` names a node of.

    ``kwargs`` as for ``make_client``; ``retry`` is the cluster client's own (connection errors,
    ``CLUSTERDOWN``: it refreshes the slot map and retries). Every connection to a master runs
    the shard's fence (``redis_fence.fence_cluster_on_connect``). Raises ``ValueError`` on a URL
    that cannot name a cluster node.
    """
    problem = cluster_url_problem(target.url)
    if problem is not None:
        raise ValueError(problem)
    if target.seeds:  # tried with the node the URL names (any order), with its options
        kwargs["startup_nodes"] = [ClusterNode(host, port) for host, port in target.seeds]
    kwargs["max_connections"] = kwargs.get("max_connections") or DEFAULT_MAX_CONNECTIONS
    client = BoundedRedisCluster.from_url(target.url, **kwargs)
    assert isinstance(client, BoundedRedisCluster)
    client.bound = kwargs.get("socket_timeout")
    client.per_master = kwargs["max_connections"]
    client.semaphores = {}
    client.failed_at = {}
    # RedisCluster takes no redis_connect_func of its own; the nodes it finds get theirs from its
    # connection options (one dict, shared with its NodesManager), the startup node from a copy.
    fence = functools.partial(fence_cluster_on_connect, prefix=target.prefix)
    client.connection_kwargs["redis_connect_func"] = fence
    options = client.connection_kwargs
    options["connection_class"] = lost_aware(options.get("connection_class", Connection))
    # The named nodes only read the slot map (redis-py's startup nodes: objects of their own,
    # never in the map it builds), so they may be replicas: a failover made them so
    # (fence_cluster_on_connect).
    seed = functools.partial(fence_cluster_on_connect, prefix=target.prefix, seed=True)
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_kwargs["redis_connect_func"] = seed
        node.connection_class = lost_aware(node.connection_class)
    return client


def make_any_client(target: RedisTarget | str, **kwargs: Any) -> Redis | RedisCluster:
    """``make_cluster_client`` for a cluster target, else ``make_client``."""
    target = as_target(target)
    if target.cluster:
        return make_cluster_client(target, **kwargs)
    return make_client(target, **kwargs)


class SlotClients:
    """Plain clients of a Redis Cluster's masters, one per master, for the MULTI/EXEC steps of one
    party (``redis_votes``' WATCH transactions, ``redis_admin``'s consistent read).

    redis-py's asyncio ``RedisCluster`` runs a WATCH transaction's immediate commands on a thread
    of their own (``asyncio.run`` in ``TransactionStrategy.execute_command``): not in this event
    loop. A party's keys are all in one slot, so its transaction needs one node only: the master
    that serves the slot, through an ordinary ``Redis`` client made with that node's connection
    options (the fence hook included), whose pipeline also loads its scripts there. The caller
    handles ``MOVED`` with ``moved`` (the slot map patched) and retries; ``ASK``/``TRYAGAIN``
    (a migration) by retrying after a pause.
    """

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._clients: dict[str, Redis] = {}
        self._closed = False
        #: Each master's client pools as many connections as the cluster client's (the setting).
        self._per_master = getattr(cluster, "per_master", DEFAULT_MAX_CONNECTIONS)

    async def for_key(self, key: str) -> Redis:
        """The client of the master serving ``key``'s slot (``ConnectionError`` once closed: a
        client made then would never be)."""
        if self._closed:
            raise RedisConnectionError("the Redis Cluster clients are closed")
        await self._cluster.initialize()
        node = self._cluster.nodes_manager.get_node_from_slot(key_slot(key.encode()))
        client = self._clients.get(node.name)
        if client is None:
            options = {**node.connection_kwargs, "max_connections": self._per_master}
            pool = IdleClosingPool(connection_class=node.connection_class, **_waiting(options))
            client = self._clients[node.name] = BoundedRedis.on(pool)
        return client

    async def moved(self, exc: MovedError) -> None:
        await self._cluster.nodes_manager.move_slot(exc)

    async def aclose(self) -> None:
        self._closed = True
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose(close_connection_pool=True)


class _SentinelConnection(_LostWhenClosed, SentinelManagedConnection):
    """A connection of the master's pool that asks the sentinels for the master's address
    whenever it opens its socket, however it is opened.

    redis-py 8's ``SentinelManagedConnection`` asks them in ``connect()`` only; a connection
    that is used while closed (``send_packed_command`` on a new or dropped connection: what
    ``redis_wire.RawConnection`` and a retried command do) reconnects through
    ``connect_check_health``, to whatever ``host``/``port`` it holds: its last master (demoted
    after a failover), or, never connected, redis-py's default localhost:6379. Here that path
    goes through ``connect()`` too (sentinels, then ``connect_to``, which opens the socket).
    The contract test is ``test_a_sentinel_clients_connection_used_unopened_goes_to_the_master``.
    """

    _addressed = False  # inside connect_to: the address was just taken from the sentinels

    async def connect_to(self, address: Any) -> None:
        self._addressed = True
        try:
            await super().connect_to(address)  # type: ignore[no-untyped-call]
        finally:
            self._addressed = False
        if self.connection_pool.is_master:
            _MasterWatch.of(self.connection_pool).connected(self, tuple(address))

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self._addressed or self.is_connected or not self.connection_pool.is_master:
            await super().connect_check_health(check_health, retry_socket_connect)
        else:
            await self.connect()  # type: ignore[no-untyped-call]


class _MasterWatch:
    """One process uses one master at a time (per set of sentinels and master name).

    A connection keeps the master it connected to until it breaks; in a planned failover
    (``SENTINEL FAILOVER``) the old master goes on accepting writes for seconds after the
    sentinels named the new one, so a process's new connections (on the new master) and its old
    ones (pooled, the script batcher's, the pub/sub one) would each write to their own master,
    and an action begun on one would be timed out on the other. So every connection that opens
    reports the master it reached, and while any is open the sentinels are asked every
    ``MASTER_CHECK_INTERVAL`` s (through a pool: its idle connections are dropped by redis-py);
    when the master changes, every connection of the process to another address is closed, and
    reconnects, through the sentinels, to the new one (the rollback fence then gives its parties
    a new epoch).
    """

    _all: ClassVar[dict[tuple[object, ...], _MasterWatch]] = {}  # a few, for the process's life

    def __init__(self) -> None:
        self.address: tuple[object, ...] | None = None
        self.connections: weakref.WeakSet[_SentinelConnection] = weakref.WeakSet()
        self.pools: weakref.WeakSet[SentinelConnectionPool] = weakref.WeakSet()
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # disconnects under way (kept referenced)

    @classmethod
    def of(cls, pool: Any) -> _MasterWatch:
        manager = pool.sentinel_manager
        # Sorted: redis-py's discover_master moves the sentinel that answered to the front of
        # the list, so in the list's order a pool's key changed after a sentinel failed to
        # answer once, and its connections then reported to a new watch that knew no pool to
        # ask: the process followed a planned failover only when the old master dropped its
        # connections, 10 s later (scale-out probe, three failovers running)
        sentinels = sorted(
            (
                str(c.connection_pool.connection_kwargs.get("host")),
                int(c.connection_pool.connection_kwargs["port"]),
            )
            for c in manager.sentinels
        )
        key = (tuple(sentinels), pool.service_name)
        watch = cls._all.get(key)
        if watch is None:
            watch = cls._all[key] = cls()
        return watch

    def connected(self, connection: _SentinelConnection, address: tuple[object, ...]) -> None:
        self.connections.add(connection)
        self.moved_to(address)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._check(), name="sentinel master watch"
            )

    def moved_to(self, address: tuple[object, ...]) -> None:
        old, self.address = self.address, address
        if old is None or old == address:
            return
        stale = [c for c in self.connections if (c.host, c.port) != address and c.is_connected]
        log.warning(
            "redis sentinel: the master moved: closing this process's %d connection(s) to the "
            "old one",
            len(stale),
            extra={"master": f"{address[0]}:{address[1]}"},
        )
        loop = asyncio.get_running_loop()
        for connection in stale:
            task = loop.create_task(_quietly_disconnect(connection))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _check(self) -> None:
        while any(c.is_connected for c in self.connections):
            await asyncio.sleep(MASTER_CHECK_INTERVAL)
            for pool in list(self.pools):
                try:
                    address = await pool.get_master_address()  # type: ignore[no-untyped-call]
                except Exception as exc:  # no sentinel answers this pool: the next one is asked
                    log.debug("redis sentinel: asking for the master failed: %s", exc)
                    continue
                self.moved_to(tuple(address))
                break  # one pool asks for all (the others learn it as they reconnect)


async def _quietly_disconnect(connection: _SentinelConnection) -> None:
    with contextlib.suppress(Exception):
        await connection.disconnect()


class _SentinelRedis(BoundedRedis):
    """The master's client; closing it closes the clients of the sentinels it asks too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        pool = self.connection_pool
        await super().aclose(close_connection_pool)
        manager = getattr(pool, "sentinel_manager", None)
        if isinstance(manager, Sentinel):
            await manager.aclose()


#: What Redis answers when a request's credentials will never do (redis-py raises most of them as
#: ``AuthenticationError``; a server's own words, for what it raises as a plain ``ResponseError``).
_REFUSED_CREDENTIALS = ("NOAUTH", "WRONGPASS", "invalid password", "invalid username-password")


async def refuse_misconfiguration(
    target: RedisTarget, wait: float = 2.0, *, streams: Sequence[str] = ()
) -> None:
    """Ask Redis once, at start, whether these settings can ever work, and raise ``ConfigError``
    (one line, exit 2) when its answer says they cannot: it refuses the credentials, it has no
    such database, the user may not run what party_sync needs (``INFO``, which every
    connection's fence runs; a Lua script, which everything party_sync writes is; ``TIME``, the
    clock; a transaction, as votes and the admin listing run them), may not touch
    the keys under ``redis_prefix``, may not read the actions stream (``streams``: its first
    partition, in stream mode) or may not subscribe to party_sync's channels, or it is a
    Redis Cluster node while ``redis_cluster`` is not set (or the other way round). Each of these
    used to start a node that retried for ever (every handshake ``backend_unavailable``; with a
    Cluster node not even ``/readyz`` said so). Anything else passes, and the node starts and
    retries as through any outage: Redis not reachable yet, a sentinel that does not know the
    master yet, a timeout, a certificate it cannot verify (logged with its reason)."""
    if target.sentinels is not None:
        await _refuse_unknown_master(target.sentinels)
        client = make_client(target, socket_timeout=wait, socket_connect_timeout=wait, protocol=2)
    else:  # one node, or the node of a Cluster that redis_url names: asked as one Redis
        client = Redis.from_url(
            target.url, socket_timeout=wait, socket_connect_timeout=wait, retry=None, protocol=2
        )
    whose = "redis_url's (or a sentinel's)" if target.sentinels is not None else "redis_url's"
    try:
        async with asyncio.timeout(wait * 4):
            info = await client.info("cluster")
            _refuse_cluster_mismatch(target, str(info.get("cluster_enabled", "0")) == "1")
            if target.cluster:  # what every Cluster connection reads (CLUSTER_READS)
                for ask in CLUSTER_READS:
                    await client.execute_command(*ask)  # type: ignore[no-untyped-call]
            await client.eval("return 1", 0)
            await client.time()  # the clock every node and worker keeps (docs/engines.md)
            await _may_subscribe(client, target.prefix)
            if not target.cluster:  # (on a Cluster the keys may live on another shard: MOVED)
                await _may_watch(client, KeySpace(target.prefix).fence())
                for stream in streams:  # its key and the stream commands (XLEN is @stream)
                    await client.xlen(stream)
    except RedisError as exc:
        refusal = _refusal(_unwrapped(exc), target, whose)
        if refusal is not None:
            raise refusal from None
        return
    except (OSError, TimeoutError):
        return
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


#: What every connection to a Cluster node asks besides its commands: redis-py's slot map
#: (``CLUSTER SLOTS``) and the shard's fence (``CLUSTER NODES``, redis_fence). A user refused
#: either never connects, and redis-py says "Cluster mode is not enabled on this node" (cluster
#: probe: the documented ACL lacked them, and the node ran with /readyz 503 for ever).
CLUSTER_READS: Final = (("CLUSTER", "SLOTS"), ("CLUSTER", "NODES"))


def _refuse_cluster_mismatch(target: RedisTarget, enabled: bool) -> None:
    if enabled and not target.cluster:
        raise ConfigError(
            "redis_url names a node of a Redis Cluster: set redis_cluster "
            "(PARTY_SYNC_REDIS_CLUSTER=true, --redis-cluster); without it every party that node "
            "does not hold is refused (MOVED)"
        )
    if target.cluster and not enabled:
        raise ConfigError(
            "redis_cluster is set, but the Redis redis_url names is not in cluster mode "
            "(cluster_enabled:0): for one Redis, leave redis_cluster unset"
        )


async def _may_watch(client: Redis, key: str) -> None:
    """``WATCH`` a key under the prefix, then ``MULTI``, ``EXISTS`` it, ``EXEC``, each reply
    read on its own: the keys, and the transactions votes and the admin listing run (docs probe:
    a user without @transaction started, and every vote and the admin page were 503
    backend_unavailable; re-check: without only ``multi`` or ``exec`` the refusal hid behind
    "EXEC without MULTI" or an EXECABORT). The first refusal is raised (``NoPermissionError``).
    Nothing is written; the connection is closed with the client."""
    # One connection, for a transaction's commands go on one; a plain client of the same pool
    # (closing a Sentinel's own client class would close its sentinels' clients too).
    single = Redis(connection_pool=client.connection_pool, single_connection_client=True)
    try:
        for command in (("WATCH", key), ("MULTI",), ("EXISTS", key), ("EXEC",)):
            try:
                await single.execute_command(*command)  # type: ignore[no-untyped-call]
            except NoPermissionError:
                raise
            except ResponseError as exc:  # an EXECABORT of one, or what follows one (EXEC
                if "NOPERM" in str(exc):  # without MULTI): raised as the refusal it is
                    raise NoPermissionError(str(exc)) from None
    finally:
        await single.aclose()


async def _may_subscribe(client: Redis, prefix: str) -> None:
    """SUBSCRIBE (and leave at once) one channel of each kind party_sync listens on, so that a
    user without ``&party:* &run:* &<prefix>:*`` is refused now (NOPERM), not later by a pub/sub
    connection that only times out. Nothing is published."""
    names = KeySpace(prefix)
    channels = (
        party_channel(_ACL_PROBE),
        run_channel(_ACL_PROBE),
        names.probe_channel(_ACL_PROBE),
        names.admin_channel(),
    )
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(*channels)
        for _ in channels:  # the confirmations; a refusal is an error reply, raised here
            await pubsub.get_message(timeout=None)
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()  # type: ignore[no-untyped-call]


#: The id in the channel names ``_may_subscribe`` tries (never a party's: ids have no ``~``).
_ACL_PROBE = "~acl-check"


def _unwrapped(exc: RedisError) -> RedisError:
    """The refusal inside a ``ConnectionError``: over a Unix socket redis-py runs AUTH and SELECT
    inside the connect and wraps what they raise (a refused password, a missing database)."""
    cause = exc.__cause__
    if type(exc) is RedisConnectionError and isinstance(cause, RedisError):
        return cause
    return exc


def _refusal(exc: RedisError, target: RedisTarget, whose: str) -> ConfigError | None:
    """The ``ConfigError`` Redis's refusal ``exc`` means, or None (an outage, or not a setting)."""
    said = _said(exc)
    if isinstance(exc, AuthenticationError):
        return ConfigError(f"Redis refused {whose} credentials: {said}")
    if not isinstance(exc, ResponseError):
        return None
    if "DB index" in said or "Invalid Database" in said:
        path = urlsplit(target.url).path.strip("/") or "0"
        if target.url.startswith("unix:"):
            path = dict(parse_qsl(urlsplit(target.url).query)).get("db", "0")
        return ConfigError(f"redis_url names database {path}: Redis says {said!r}")
    if any(words in said for words in _REFUSED_CREDENTIALS):
        return ConfigError(f"Redis refused {whose} credentials: {said}")
    if isinstance(exc, NoPermissionError) or "NOPERM" in said:
        cluster = " +cluster|slots +cluster|nodes" if target.cluster else ""
        return ConfigError(
            f"redis_url's user may not run what party_sync needs ({said}): give it at least "
            f"+@read +@write +@scripting +@transaction +@pubsub +@stream +@connection +info "
            f"+time{cluster}, the keys "
            f"~{target.prefix}:* and the actions stream's (~party_sync:actions* by default), the "
            f"channels &party:* &run:* &{target.prefix}:* (or +@all ~* &*; docs/redis.md)"
        )
    return None


async def _refuse_unknown_master(sentinels: Sentinels) -> None:
    """A master name no sentinel monitors, while the sentinels that answer monitor others, is a
    typo, not an outage: ``ConfigError`` naming the ones they do. Sentinels that monitor nothing
    yet (still being set up), or that do not answer, are an outage: the node starts and waits.
    An address that answers as a Redis but not as a sentinel (``unknown command 'SENTINEL'``: a
    Redis's own port listed by mistake) can never work either: ``ConfigError`` when no listed
    address is a sentinel, a warning naming it when others are."""
    monitored: set[str] = set()
    not_sentinels: list[str] = []
    sentinels_seen, found = 0, False
    for host, port in sentinels.addresses:
        client = Redis(
            host=host,
            port=port,
            password=sentinels.password,
            socket_timeout=SENTINEL_TIMEOUT,
            socket_connect_timeout=SENTINEL_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            protocol=2,
        )
        try:
            async with asyncio.timeout(SENTINEL_TIMEOUT * 2):
                masters = await client.sentinel_masters()
        except AuthenticationError as exc:
            if sentinels.password is None:
                raise ConfigError(
                    f"the sentinels require a password and redis_sentinel_password is unset "
                    f"(PARTY_SYNC_REDIS_SENTINEL_PASSWORD): {_said(exc)}"
                ) from None
            raise ConfigError(f"a sentinel refused redis_sentinel_password: {_said(exc)}") from None
        except ResponseError as exc:
            if "unknown command" in str(exc).lower():
                not_sentinels.append(f"{host}:{port}")
            continue
        except (RedisError, OSError, TimeoutError):
            continue
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()
        sentinels_seen += 1
        names = _master_names(masters)
        if sentinels.master in names:
            found = True
            break
        monitored |= names
    if not_sentinels and not sentinels_seen:
        raise ConfigError(
            f"redis_sentinels lists {', '.join(not_sentinels)}, which "
            f"{'is' if len(not_sentinels) == 1 else 'are'} not a Redis Sentinel (answering "
            "\"unknown command 'SENTINEL'\"): list the sentinels' addresses (port 26379 by "
            "default), not the Redis servers'"
        )
    if not_sentinels:
        log.warning(
            "redis_sentinels lists %s, which is not a Redis Sentinel (unknown command "
            "'SENTINEL'): only the other addresses can work",
            ", ".join(not_sentinels),
        )
    if not found and monitored:
        raise ConfigError(
            f"no sentinel monitors a master named {sentinels.master!r} "
            f"(redis_sentinel_master); they monitor {', '.join(sorted(map(repr, monitored)))}"
        )


def _master_names(masters: Any) -> set[str]:
    """The names in ``SENTINEL MASTERS``' answer (a list of flat name/value lists; redis-py may
    already have parsed it into a dict by name)."""
    if isinstance(masters, dict):
        return {str(name) for name in masters}
    names: set[str] = set()
    for entry in masters if isinstance(masters, list) else ():
        if isinstance(entry, dict):
            names.add(str(entry.get("name", "")))
            continue
        fields = list(entry)
        for key, value in zip(fields[::2], fields[1::2], strict=False):
            if (key.decode() if isinstance(key, bytes) else key) == "name":
                names.add(value.decode() if isinstance(value, bytes) else str(value))
    names.discard("")
    return names


def _said(exc: Exception) -> str:
    """An error's text, one line, short."""
    return " ".join(str(exc).split())[:300]
