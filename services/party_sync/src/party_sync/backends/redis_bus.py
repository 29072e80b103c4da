"""One Redis pub/sub connection per node, multiplexing every channel the node listens to.

A node holds one subscription per channel while it has local connections for it (never one per
WebSocket), restored by itself after Redis comes back, and a pub/sub connection that goes silent
without an error (a known failure of pub/sub clients: docs/redis.md) is detected and replaced. So
the bus:

- keeps the wanted channels in ``_handlers`` (channel → callback) and, on every (re)connect,
  subscribes to all of them on the fresh connection before declaring itself connected, then calls
  ``on_reconnect`` so that every party stream repairs what it missed (``redis_stream``);
- ``add`` returns only once Redis confirmed the SUBSCRIBE (a ``subscribe`` reply was read);
- reads with one blocking read loop (no per-message timeout: a per-read ``wait_for`` was
  measured cutting throughput by 60 %) and lets a probe watch it: when nothing arrived for
  ``probe_interval``, it publishes on the node's own probe channel and expects it back within
  ``probe_interval``; if it does not come, the reader is cancelled and the connection recreated.

On a Redis Cluster (``sharded=True``, one ``Bus`` per master, managed by
``redis_shard_bus.ShardedBus``) it speaks sharded pub/sub: ``SSUBSCRIBE`` / ``SUNSUBSCRIBE``, one
channel per command (a command's channels must share a slot), ``smessage`` replies; an error reply
(``MOVED``: the node no longer serves the channel's slot) fails the oldest subscription waiting
for its confirmation instead of the connection; and a ``sunsubscribe`` Redis sends by itself (the
channel's slot moved away, or the node was demoted) drops the channel here and is reported to
``on_lost``, which subscribes it again where it now lives.

It speaks RESP2 on a raw redis-py connection (``redis_wire.RawConnection``, hiredis parser) instead
of redis-py's ``PubSub``, whose own retry and silent re-subscription would hide exactly the
reconnects this node must see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError, ResponseError

from party_sync.backends.redis_scripts import unavailable
from party_sync.backends.redis_wire import ConnectionSource, RawConnection
from party_sync.protocol.errors import BackendUnavailable
from party_sync.tasks import cancel_and_wait, described

log = logging.getLogger(__name__)

Handler = Callable[[bytes], None]


class Bus:
    """The node's pub/sub connection: channels → handlers, kept subscribed across reconnects."""

    def __init__(
        self,
        pool: ConnectionSource,
        publish: Callable[[str, bytes], Awaitable[Any]],
        *,
        node_id: str,
        probe_channel: str,
        probe_interval: float,
        timeout: float,
        on_reconnect: Callable[[], None],
        count_reconnect: Callable[[str], None],
        observe_lag: Callable[[float], None],
        sharded: bool = False,
        on_lost: Callable[[str], None] | None = None,
        on_down: Callable[[], None] | None = None,
    ) -> None:
        """``sharded``: a Cluster master's sharded pub/sub (module doc), ``on_lost(channel)`` when
        Redis unsubscribed a channel by itself, ``on_down()`` when the connection failed."""
        self.connected = False
        self.sharded = sharded
        self._subscribe_cmd, self._unsubscribe_cmd = (
            ("SSUBSCRIBE", "SUNSUBSCRIBE") if sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        )
        self._message_kind = b"smessage" if sharded else b"message"
        self._confirm_kind = b"ssubscribe" if sharded else b"subscribe"
        self._on_lost = on_lost
        self._on_down = on_down
        self._pool = pool
        self._publish = publish
        self._name = f"party_sync:{node_id}:pubsub"
        self._probe_channel = probe_channel
        self._probe_key = probe_channel.encode()
        self._interval = probe_interval
        self._timeout = timeout
        self._on_reconnect = on_reconnect
        self._count_reconnect = count_reconnect
        self._observe_lag = observe_lag
        self._handlers: dict[bytes, Handler] = {}
        self._waiters: dict[bytes, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()  # orders SUBSCRIBE / UNSUBSCRIBE / re-subscription
        self._conn: RawConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._probe_waiter: asyncio.Future[None] | None = None
        self._last_rx = 0.0
        self._ever = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        #: The connection was lost (or never made) and not made again yet: its WARNING was
        #: logged and its "reconnected" INFO is owed (``retire`` says it if it never comes).
        self.troubled = False

    @property
    def serving(self) -> bool:
        """The node can deliver its parties' messages (``RedisBackend.ready``): connected."""
        return self.connected

    async def start(self, wait: float) -> None:
        """Connect in the background; wait up to ``wait`` s for the first connection."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._supervise()), loop.create_task(self._probe())]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._ever.wait()
        if not self.connected:
            log.warning("redis pub/sub not connected yet: retrying in the background")

    async def close(self) -> None:
        self._closing = True
        await cancel_and_wait(self._tasks, what="the pub/sub connection")

    async def retire(self, reason: str) -> None:
        """Close it for good, saying why (``reason``) if its loss was logged and its reconnect
        never will be: a Cluster master a failover replaced, whose channels are subscribed on
        the new master (the operator's "lost" WARNING then has its ending)."""
        if self.troubled:
            self.troubled = False
            log.info("redis pub/sub: over: %s", reason, extra={"cause": "failover"})
        await self.close()

    # -- channels -------------------------------------------------------------------------------
    async def add(self, channel: str, handler: Handler) -> None:
        """Subscribe ``channel`` → ``handler``; returns once Redis confirmed it."""
        key = channel.encode()
        async with self._lock:
            conn = self._conn
            if not self.connected or conn is None:
                raise BackendUnavailable("redis pub/sub is not connected")
            self._handlers[key] = handler
            try:
                with unavailable("subscribe"):
                    await self._subscribe(conn, [key])
            except BackendUnavailable:
                if self._handlers.get(key) == handler:
                    del self._handlers[key]
                raise

    async def remove(self, channel: str, handler: Handler) -> None:
        """Unsubscribe ``channel`` if ``handler`` is still its handler."""
        key = channel.encode()
        async with self._lock:
            if self._handlers.get(key) != handler:  # == : bound methods are made per access
                return
            del self._handlers[key]
            conn = self._conn
            if self.connected and conn is not None:
                with contextlib.suppress(RedisError, OSError):
                    await conn.send(self._unsubscribe_cmd, key)

    async def _subscribe(self, conn: RawConnection, keys: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        waiters = []
        for key in keys:
            self._waiters[key] = waiter = loop.create_future()
            waiters.append(waiter)
        if self.sharded:  # the channels of one SSUBSCRIBE must share a slot: one each
            for key in keys:
                await conn.send(self._subscribe_cmd, key)
        else:
            await conn.send(self._subscribe_cmd, *keys)
        async with asyncio.timeout(self._timeout):
            await asyncio.gather(*waiters)

    async def _resubscribe(self, conn: RawConnection) -> None:
        """The probe channel and every wanted channel on a fresh connection. Sharded: a channel
        refused (``MOVED``: its slot is served elsewhere now) is dropped and given to
        ``on_lost``; the probe refused fails the connection."""
        if not self.sharded:
            await self._subscribe(conn, [self._probe_key, *self._handlers])
            return
        await self._subscribe(conn, [self._probe_key])
        keys = list(self._handlers)
        if not keys:
            return
        loop = asyncio.get_running_loop()
        waiters = []
        for key in keys:
            self._waiters[key] = waiter = loop.create_future()
            waiters.append(waiter)
            await conn.send(self._subscribe_cmd, key)
        async with asyncio.timeout(self._timeout):
            results = await asyncio.gather(*waiters, return_exceptions=True)
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, ResponseError) and key in self._handlers:
                del self._handlers[key]
                if self._on_lost is not None:
                    self._on_lost(key.decode())
            elif isinstance(result, BaseException):
                raise result

    def channels(self) -> list[str]:
        """The channels subscribed (or to be subscribed again on reconnect)."""
        return [key.decode() for key in self._handlers]

    def handler(self, channel: str) -> Handler | None:
        return self._handlers.get(channel.encode())

    # -- the connection -------------------------------------------------------------------------
    async def _supervise(self) -> None:
        """Connect, subscribe everything, read until it breaks; again, with backoff, forever."""
        loop = asyncio.get_running_loop()
        delay, lost = 0.05, ""
        failures = 0  # attempts in a row that failed: one WARNING per outage, not one per try
        told = ""  # the kind of failure the last WARNING named: another kind is a WARNING too
        while not self._closing:
            conn = RawConnection(self._pool)
            reader: asyncio.Task[None] | None = None
            try:
                await conn.connect()
                await conn.send("CLIENT", "SETNAME", self._name)
                await conn.read()
                reader = loop.create_task(self._read(conn))
                async with self._lock:
                    await self._resubscribe(conn)
                    self._conn, self._reader, self.connected = conn, reader, True
                self._ever.set()
                self.troubled = False
                if lost:
                    self._count_reconnect(lost)
                    log.info(
                        "redis pub/sub reconnected",
                        extra={"cause": lost, "failed_attempts": failures},
                    )
                    lost = ""
                failures, told = 0, ""
                self._on_reconnect()  # every party stream repairs what it may have missed
                delay = 0.05
                await asyncio.wait({reader})
                lost = "probe" if reader.cancelled() else "error"
                if not reader.cancelled():
                    self.troubled = True
                    ended = reader.exception()
                    log.warning(
                        "redis pub/sub connection lost: %s",
                        described(ended) if ended is not None else "it ended",
                    )
            except Exception as exc:
                # Redis's errors; and anything else (a client library's own failure in a
                # failover, or a bug) the same way, with its traceback: this loop ending would
                # leave the node deaf to every party for good
                lost = lost or ("error" if self._ever.is_set() else "")
                failures += 1
                if type(exc).__name__ != told:
                    # the first failure, or one of another kind: a restart refused connections,
                    # then refused the password (which said so only at DEBUG: redis variants
                    # probe)
                    told = type(exc).__name__
                    self.troubled = True
                    expected = isinstance(
                        exc, (RedisError, OSError, TimeoutError, BackendUnavailable)
                    )
                    log.log(
                        logging.WARNING if expected else logging.ERROR,
                        "redis pub/sub unavailable (retrying until it is back): %s",
                        described(exc),
                        exc_info=None if expected else exc,
                    )
                else:
                    log.debug("redis pub/sub still unavailable: %s", described(exc))
            finally:
                if self._on_down is not None and not self._closing:
                    self._on_down()
                self.connected = False
                self._conn = self._reader = None
                self._fail_waiters()
                if reader is not None:
                    await cancel_and_wait([reader], what="the pub/sub reader")
                with contextlib.suppress(RedisError, OSError):
                    await conn.close(wait=True)
            if not self._closing:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _fail_waiters(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_exception(BackendUnavailable("redis pub/sub connection lost"))
                waiter.exception()  # retrieved here: nobody may be waiting any more

    async def _read(self, conn: RawConnection) -> None:
        loop = asyncio.get_running_loop()
        handlers, waiters = self._handlers, self._waiters
        read = conn.read_pushes  # every message already received, in one go
        message_kind, confirm_kind = self._message_kind, self._confirm_kind
        while True:
            replies = await read()
            self._last_rx = loop.time()
            for reply in replies:
                if isinstance(reply, ResponseError):
                    if not self.sharded:
                        raise reply
                    self._refused(reply)  # MOVED for an SSUBSCRIBE: still in step
                    continue
                if not isinstance(reply, list) or len(reply) < 3:
                    continue
                kind, channel = reply[0], reply[1]
                if kind == message_kind:
                    if channel == self._probe_key:
                        self._on_probe()
                        continue
                    handler = handlers.get(channel)
                    if handler is not None:
                        try:
                            handler(reply[2])
                        except Exception:  # a bug in one party's handling must not stop the bus
                            log.exception("pub/sub handler failed", extra={"channel": channel})
                elif kind == confirm_kind:
                    waiter = waiters.pop(channel, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                elif kind == b"sunsubscribe" and channel in handlers:
                    # Not asked for (remove() drops the handler first): the slot moved away.
                    del handlers[channel]
                    if self._on_lost is not None:
                        self._on_lost(channel.decode())

    def _refused(self, exc: ResponseError) -> None:
        """An error reply on the sharded connection: the oldest SSUBSCRIBE waiting is refused."""
        for key, waiter in list(self._waiters.items()):
            del self._waiters[key]
            if not waiter.done():
                waiter.set_exception(exc)
                return
        log.warning("redis pub/sub: an error reply nobody waited for: %s", described(exc))

    # -- the liveness probe ---------------------------------------------------------------------
    def _on_probe(self) -> None:
        waiter = self._probe_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:  # not only the cancel: redis-py may swallow one
            await asyncio.sleep(self._interval / 2)
            reader = self._reader
            if reader is None or loop.time() - self._last_rx < self._interval:
                continue  # not connected, or traffic arrived recently: the reader is alive
            self._probe_waiter = waiter = loop.create_future()
            sent = loop.time()
            try:
                await self._publish(self._probe_channel, b"probe")
                async with asyncio.timeout(self._interval):
                    await waiter
                self._observe_lag(loop.time() - sent)
            except BackendUnavailable:
                continue  # Redis itself is unreachable: the reader will fail on its own
            except TimeoutError:
                if reader is self._reader and not reader.done():
                    log.warning("redis pub/sub probe lost: replacing the pub/sub connection")
                    reader.cancel()
            finally:
                self._probe_waiter = None
