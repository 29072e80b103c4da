"""A node's pub/sub on a Redis Cluster: sharded pub/sub, one connection per master.

Party events are ``SPUBLISH``ed by the script that sequences them (``redis_scripts``), and a
sharded message reaches only the subscribers of the shard that owns the channel's slot. So the
node keeps one ``redis_bus.Bus`` (``sharded=True``) per master, and ``SSUBSCRIBE``s each channel
on the master that serves its slot, as redis-py's slot map says. The ``Bus`` does what it does on
one Redis (confirmed subscriptions, re-subscription after a reconnect, the liveness probe, which
here runs on every master's connection: the node's probe channel on that shard is
``KeySpace.shard_probe_channel``, in the master's last slot, the last a resharding moves).

Topology changes are followed by ``_reconcile``: read the slot map again, start a ``Bus`` for a
new master, close the one of a node that is no longer a master, and subscribe every channel whose
slot moved on its new owner (unsubscribing it from the old one). It runs

- when Redis unsubscribes a channel by itself (``sunsubscribe``: its slot was migrated away, or
  the node demoted) or refuses one (``MOVED``),
- when a master's connection fails (a killed master: the slot map changes once its replica is
  promoted, so it runs again every ``probe_interval`` / 4 until the channels have moved),
- and every ``probe_interval`` anyway.

Messages published while a channel moves may be lost; so after a move every party stream repairs
itself from history (``on_reconnect``; ``redis_stream``'s gap repair, else a resync), exactly as
after a lost pub/sub connection on one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from party_sync.backends.keys import KeySpace
from party_sync.backends.redis_bus import Bus, Handler
from party_sync.backends.redis_connect import read_slot_map
from party_sync.backends.redis_scripts import unavailable
from party_sync.backends.redis_wire import NodeConnections
from party_sync.protocol.errors import BackendUnavailable
from party_sync.tasks import Episode, cancel_and_wait, described

log = logging.getLogger(__name__)

#: Tries of one subscription through ``MOVED`` answers (the slot map read again between two).
ADD_TRIES = 5


class ShardedBus:
    """The node's sharded pub/sub: channels → handlers, each on its slot's master (module doc)."""

    def __init__(
        self,
        client: RedisCluster,
        keys: KeySpace,
        *,
        node_id: str,
        probe_interval: float,
        timeout: float,
        on_reconnect: Callable[[], None],
        count_reconnect: Callable[[str], None],
        observe_lag: Callable[[float], None],
    ) -> None:
        self._client = client
        self._keys = keys
        self._node_id = node_id
        self._interval = probe_interval
        self._timeout = timeout
        self._on_reconnect = on_reconnect
        self._count_reconnect = count_reconnect
        self._observe_lag = observe_lag
        # one WARNING when the slot map cannot be read, one INFO when it can again (a master
        # down: every retry, several a second, would log otherwise)
        self._slot_map = Episode(log, "redis cluster: the slot map could not be read")
        self._buses: dict[str, Bus] = {}  # master's name ("host:port") → its Bus
        self._probe_slots: dict[str, int] = {}  # master's name → the slot of its probe channel
        self._handlers: dict[str, Handler] = {}  # every wanted channel
        self._where: dict[str, str] = {}  # channel → the master it is subscribed on
        self._lock = asyncio.Lock()  # orders add / remove / reconcile
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.moves = 0  # observability and tests: channels subscribed again elsewhere

    @property
    def connected(self) -> bool:
        """Every master's pub/sub connection is up (each carries some of the parties)."""
        return bool(self._buses) and all(bus.connected for bus in self._buses.values())

    @property
    def serving(self) -> bool:
        """Some master's pub/sub connection is up: the node serves the parties of those masters
        (one master lost is an outage of its parties, not of the node: ``/readyz``)."""
        return any(bus.connected for bus in self._buses.values())

    async def start(self, wait: float) -> None:
        """Connect to every master in the background; wait up to ``wait`` s for them."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(RedisError, RedisClusterException, OSError, TimeoutError):
            async with asyncio.timeout(wait):
                await self._client.initialize()
                await self._reconcile(wait)
        self._task = loop.create_task(self._watch())
        if not self.connected:
            log.warning("redis cluster pub/sub not connected yet: retrying in the background")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            await cancel_and_wait([self._task], what="the cluster pub/sub watcher")
        buses, self._buses = list(self._buses.values()), {}
        for bus in buses:
            await bus.close()

    # -- channels -------------------------------------------------------------------------------
    async def add(self, channel: str, handler: Handler) -> None:
        """``SSUBSCRIBE`` ``channel`` on its master → ``handler``; returns once confirmed."""
        async with self._lock:
            self._handlers[channel] = handler
            try:
                await self._place(channel, handler)
            except BaseException:
                if self._handlers.get(channel) == handler:
                    del self._handlers[channel]
                raise

    async def remove(self, channel: str, handler: Handler) -> None:
        async with self._lock:
            if self._handlers.get(channel) != handler:
                return
            del self._handlers[channel]
            bus = self._buses.get(self._where.pop(channel, ""))
            if bus is not None:
                await bus.remove(channel, handler)

    async def _place(self, channel: str, handler: Handler) -> None:
        """Subscribe ``channel`` on the master its slot map names (following ``MOVED``)."""
        slot = key_slot(channel.encode())
        for attempt in range(ADD_TRIES):
            try:
                with unavailable("subscribe"):
                    await self._client.initialize()
                    node = self._client.nodes_manager.get_node_from_slot(slot)
            except RedisError as exc:
                raise BackendUnavailable("redis cluster: no slot map") from exc
            bus = await self._bus(node)
            try:
                await bus.add(channel, handler)
            except BackendUnavailable as exc:
                if not isinstance(exc.__cause__, ResponseError) or attempt == ADD_TRIES - 1:
                    raise
                await self._refresh()  # MOVED: the map is stale
                continue
            self._where[channel] = node.name
            return

    # -- the masters ----------------------------------------------------------------------------
    async def _bus(self, node: ClusterNode, wait: float | None = None) -> Bus:
        """The master's Bus, started (and connected, within ``wait``) if it was not."""
        bus = self._buses.get(node.name)
        if bus is not None:
            return bus
        slot = self._probe_slot(node.name)
        channel = self._keys.shard_probe_channel(self._node_id, slot)
        bus = Bus(
            NodeConnections(node),
            self._spublish,
            node_id=self._node_id,
            probe_channel=channel,
            probe_interval=self._interval,
            timeout=self._timeout,
            on_reconnect=self._on_reconnect,
            count_reconnect=self._count_reconnect,
            observe_lag=self._observe_lag,
            sharded=True,
            on_lost=self._lost,
            on_down=self._wake.set,
        )
        self._buses[node.name] = bus
        self._probe_slots[node.name] = slot
        await bus.start(wait=self._timeout if wait is None else wait)
        return bus

    def _probe_slot(self, name: str) -> int:
        """The slot of the master's probe channel: its *last* slot. A resharding (``redis-cli
        --cluster reshard`` or ``rebalance``) moves a master's slots from its lowest up, and
        once the probe's slot is migrating the probe goes to the other master (``ASK``): the
        connection was judged dead, every party on that master waited for the whole
        resharding, not only those whose slots moved (cluster probe: 4.4 s)."""
        cache = self._client.nodes_manager.slots_cache
        return max(slot for slot, nodes in cache.items() if nodes and nodes[0].name == name)

    async def _spublish(self, channel: str, data: bytes) -> None:
        with unavailable("publish"):
            await self._client.spublish(channel, data)

    def _lost(self, channel: str) -> None:
        """Redis unsubscribed ``channel`` by itself (its slot moved): place it again."""
        self._where.pop(channel, None)
        self._wake.set()

    async def _refresh(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                await read_slot_map(self._client)  # from a node that answers
        except Exception as exc:  # RedisClusterException is no RedisError: any, and later again
            self._slot_map.trouble("unreadable", described(exc))
            return False
        self._slot_map.fine("read again")
        return True

    async def _watch(self) -> None:
        """Reconcile on every wake-up, every ``probe_interval`` anyway, and more often while
        some channel is not placed or some master's connection is down."""
        while not self._closing:  # not only the cancel: redis-py may swallow one
            unsettled = not self.connected or len(self._where) < len(self._handlers)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval / 4 if unsettled else self._interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._reconcile(self._timeout)
            except Exception:  # a bug here must not end the watch
                log.exception("redis cluster pub/sub: reconcile failed")

    async def _reconcile(self, wait: float) -> None:
        """Follow the slot map (module doc)."""
        if self._closing or not await self._refresh():
            return
        async with self._lock:
            cache = self._client.nodes_manager.slots_cache
            owners = {nodes[0].name for nodes in cache.values() if nodes}
            masters = {n.name: n for n in self._client.get_primaries() if n.name in owners}
            for name in list(self._buses):
                gone = name not in masters
                if not gone:
                    slot = self._probe_slots[name]
                    owner = cache.get(slot)
                    gone = not owner or owner[0].name != name  # its probe slot moved away
                if gone:
                    bus = self._buses.pop(name)
                    for channel in bus.channels():
                        if self._where.get(channel) == name:
                            del self._where[channel]
                    if bus.troubled:  # lost, not back: a failover replaced it
                        self._count_reconnect("failover")
                    await bus.retire(
                        f"{name} is no longer the master of its slots: its channels are "
                        "subscribed on the master that serves them now"
                    )
            for node in masters.values():
                await self._bus(node, wait)
            moved = 0
            for channel, handler in list(self._handlers.items()):
                slot = key_slot(channel.encode())
                try:
                    node = self._client.nodes_manager.get_node_from_slot(slot)
                except RedisError:
                    continue
                where = self._where.get(channel)
                if where == node.name:
                    continue
                old = self._buses.get(where or "")
                if old is not None:
                    with contextlib.suppress(BackendUnavailable):
                        await old.remove(channel, handler)
                self._where.pop(channel, None)
                try:
                    await self._place(channel, handler)
                except BackendUnavailable as exc:
                    log.info(
                        "redis cluster pub/sub: %s not placed yet: %s", channel, described(exc)
                    )
                    continue
                moved += 1
            if moved:
                self.moves += moved
                log.info("redis cluster pub/sub: %d channels subscribed on their new shard", moved)
        if moved:
            self._on_reconnect()  # every party stream repairs what it may have missed meanwhile
