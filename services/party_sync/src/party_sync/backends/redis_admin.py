"""The operators' view of the Redis backend (``AdminView``): the whole service, from any node.

- Parties: every node's heartbeat adds the parties it serves to ``party-index`` (one sorted set,
  all scores 0, so it is read in ``party_id`` order and paginated by ``ZRANGE BYLEX``: the cursor
  is the last ``party_id`` of a page). A party whose state expired is dropped from the index when
  a listing meets it, and by the heartbeats, each of which looks at ``INDEX_SWEEP`` entries
  from a random one on, and more while many were gone (so the index follows the live parties
  without any listing). A party's numbers are
  read in one ``MULTI`` on its slot (all its keys share
  the hash tag), never through ``snapshot.lua``, which would start a history for a party that
  just expired.
- Nodes: each node writes ``node:<node_id>`` (its id, version, connection count, start time)
  every heartbeat, expiring after a few heartbeats, and ``nodes`` (node_id → expiry) lists them.
- Connections name their node: a connection id is ``<node_id>.<random>`` (the gateway's).
- Close requests travel on ``<prefix>:admin`` as JSON (never pickle, as on the party channels):
  ``{"close": {"party_id", "character_id", "code", "reason"}}``; every node subscribes to it
  and closes its own connections of that character.
- A handshake block is ``{party}:block:<character_id>`` = until (Unix seconds), expiring then.

Key and channel names come from ``keys.KeySpace``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Final

import orjson
from redis.asyncio import Redis, RedisCluster

from party_sync.backends import shared_settings
from party_sync.backends.base import (
    ActionInFlight,
    CloseRequest,
    HeldEvents,
    LiveConnection,
    NodeInfo,
    PartyDetail,
    PartySummary,
    node_of,
)
from party_sync.backends.keys import KeySpace
from party_sync.backends.redis_bus import Bus
from party_sync.backends.redis_connect import SlotClients
from party_sync.backends.redis_scripts import snapshot_from, text, unavailable
from party_sync.backends.redis_shard_bus import ShardedBus
from party_sync.core.snapshot import Snapshot
from party_sync.protocol.errors import BackendUnavailable

log = logging.getLogger(__name__)

#: Held events after a seq, at most ARGV[2] of them, read atomically with the top of the stream.
#: KEYS: meta, history. Returns {} without state, else {epoch, top, oldest held, events ...}.
EVENTS_LUA: Final = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return {}
end
local top = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local oldest = top - redis.call('LLEN', KEYS[2]) + 1
local first = math.max(tonumber(ARGV[1]) + 1, oldest)
local last = math.min(top, first + tonumber(ARGV[2]) - 1)
local out = {epoch, top, oldest}
if first <= last then
  for _, data in ipairs(redis.call('LRANGE', KEYS[2], first - oldest, last - oldest)) do
    if string.byte(data, 1) ~= 123 then  -- a stamped entry (_lib.lua event_of): its event
      data = string.sub(data, (string.find(data, '{', 1, true)))
    end
    out[#out + 1] = data
  end
end
return out
"""


def _lock(character: Any, value: Any) -> ActionInFlight | None:
    """A lock ``"<until> <action_id> <action_type>"`` (lua/_lib.lua ``parse_lock``)."""
    until, _, rest = text(value).partition(" ")
    action_id = rest.partition(" ")[0]
    try:
        return ActionInFlight(text(character), action_id, float(until))
    except ValueError:
        return None


def _flat(mapping: dict[Any, Any]) -> list[Any]:
    """A mapping as the flat ``[k1, v1, ...]`` reply ``snapshot_from`` reads (HGETALL in Lua)."""
    return [item for pair in mapping.items() for item in pair]


class _Watch:
    def __init__(self, close: Callable[[], Any]) -> None:
        self._close: Callable[[], Any] | None = close

    async def close(self) -> None:
        if self._close is not None:
            close, self._close = self._close, None
            await close()


#: Index entries each heartbeat checks for an expired party (``RedisAdmin._sweep_index``).
INDEX_SWEEP: Final = 64
#: The most batches of ``INDEX_SWEEP`` one heartbeat sweeps (while a quarter of each was gone).
INDEX_SWEEP_ROUNDS: Final = 16


class RedisAdmin:
    """``AdminView`` over Redis, for one node: reads with ``client``, close requests on ``bus``.

    Owned by the node's ``RedisBackend``, which gives it these three and nothing else.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        keys: KeySpace,
        bus: Bus | ShardedBus,
        unanswered: Callable[[str], bool] = lambda key: False,
    ) -> None:
        """``unanswered(key)``: the node knows the Redis that serves ``key`` stopped answering
        (its script connection is probing it): a handshake's block check is refused at once,
        not after a timeout."""
        self._client = client
        self._unanswered = unanswered
        self._keys = keys
        self._bus = bus
        self._events = client.register_script(EVENTS_LUA)
        self._slots = SlotClients(client) if isinstance(client, RedisCluster) else None
        self._watchers: list[CloseRequest] = []
        self._swept_after: str | None = None  # where the cursor sweeps go on (None: the start)
        self._sweeps = 0  # heartbeats' sweeps so far: odd ones from the cursor, even at random

    async def close(self) -> None:
        if self._slots is not None:
            await self._slots.aclose()

    # -- parties --------------------------------------------------------------------------------
    async def _read(
        self, party_id: str, now: float, presence: bool
    ) -> tuple[str | None, Snapshot, list[ActionInFlight], list[Any]] | None:
        """The party's run, projection, actions in flight (and live presence entries), or None."""
        keys = self._keys.party_keys(party_id)
        client = self._client
        if self._slots is not None:  # a Cluster: MULTI on the party's master itself
            with unavailable("admin read"):
                client = await self._slots.for_key(keys.meta)
        async with unavailable("admin read"), client.pipeline(transaction=True) as pipe:
            pipe.hmget(keys.meta, ["epoch", "seq", "run"])
            pipe.zrange(keys.members, 0, -1)
            pipe.hgetall(keys.names)
            pipe.smembers(keys.online)
            pipe.hgetall(keys.state)
            pipe.hgetall(keys.locks)
            if presence:
                pipe.zrangebyscore(keys.presence, f"({now!r}", "+inf", withscores=True)
            replies = await pipe.execute()
        (epoch, seq, run), members, names, online, state, locks = replies[:6]
        if epoch is None:
            return None
        snapshot = snapshot_from(
            [epoch, seq or 0, members, _flat(names), online, _flat(state), [], [], []]
        )
        actions = sorted(
            (
                a
                for a in (_lock(c, v) for c, v in locks.items() if not text(c).startswith("~"))
                if a and a.deadline > now
            ),
            key=lambda a: (a.deadline, a.character_id),
        )
        return (text(run) if run is not None else None), snapshot, actions, replies[6:]

    async def parties(self, after: str | None, limit: int, now: float) -> list[PartySummary]:
        index = self._keys.party_index()
        out: list[PartySummary] = []
        while len(out) < limit:
            start = "-" if after is None else "(" + after
            with unavailable("admin parties"):
                ids = [text(p) for p in await self._client.zrangebylex(index, start, "+", 0, limit)]
            for party_id in ids:
                read = await self._read(party_id, now, presence=False)
                if read is None:  # its state expired: forget it
                    with unavailable("admin parties"):
                        await self._client.zrem(index, party_id)
                    continue
                run, snap, actions, _ = read
                online = sum(1 for m in snap.members if m["online"])
                out.append(
                    PartySummary(
                        party_id, run, snap.epoch, snap.seq, len(snap.members), online, snap.vote,
                        len(actions),
                    )
                )  # fmt: skip
                if len(out) == limit:
                    break
            if len(ids) < limit:
                break
            after = ids[-1]
        return out

    async def party(self, party_id: str, now: float) -> PartyDetail | None:
        read = await self._read(party_id, now, presence=True)
        if read is None:
            return None
        run, snapshot, actions, (entries,) = read
        connections: list[LiveConnection] = []
        for entry, expires in entries:
            connection, _, character = text(entry).partition(":")
            connections.append(
                LiveConnection(character, connection, node_of(connection), float(expires))
            )
        connections.sort(key=lambda c: (c.character_id, c.connection_id))
        return PartyDetail(run, snapshot, connections, actions)

    async def events(self, party_id: str, after_seq: int, limit: int) -> HeldEvents | None:
        keys = self._keys.party_keys(party_id)
        with unavailable("admin events"):
            reply = await self._events(keys=[keys.meta, keys.history], args=[after_seq, limit])
        if not reply:
            return None
        return HeldEvents(
            text(reply[0]), int(reply[1]), int(reply[2]), [bytes(e) for e in reply[3:]]
        )

    # -- nodes ----------------------------------------------------------------------------------
    async def heartbeat(self, node: NodeInfo, parties: Sequence[str], ttl: float) -> None:
        keys = self._keys
        body = orjson.dumps(
            {
                "node_id": node.node_id,
                "version": node.version,
                "connections": node.connections,
                "started_at": node.started_at,
                "seen_at": node.seen_at,
                "settings": dict(node.settings),
            }
        )
        async with unavailable("admin heartbeat"), self._client.pipeline(False) as pipe:
            pipe.set(keys.node(node.node_id), body, px=max(1, int(ttl * 1000)))
            pipe.zadd(keys.nodes(), {node.node_id: node.seen_at + ttl})
            pipe.zremrangebyscore(keys.nodes(), "-inf", node.seen_at)
            if parties:
                pipe.zadd(keys.party_index(), dict.fromkeys(parties, 0), nx=True)
            await pipe.execute()
        await self._sweep_index()

    async def _sweep_index(self) -> None:
        """Parties of ``party-index`` whose state expired are dropped, ``INDEX_SWEEP`` entries
        at a time, and the next batch too while at least a quarter of one was gone (or it
        ended at the end of the index: on from the start), up to ``INDEX_SWEEP_ROUNDS``
        batches a heartbeat. Every other heartbeat starts where the last such one stopped, so
        the sweep goes round the whole index; the others start at a random entry
        (``ZRANDMEMBER``). Without a sweep the index (no TTL: it is every node's) kept every
        party ever served until a listing met it; with one batch from a cursor alone it fell
        behind parties that come and go fast, and for good when their ids grow (``p-1``,
        ``p-10``, ``p-100``, ...: each new id lands just ahead of the cursor, which then
        never reaches the expired ones behind it; hygiene probes: 10,000 entries for 2,400
        live parties, rising). A random start finds expired entries wherever the ids put
        them."""
        index = self._keys.party_index()
        self._sweeps += 1
        if self._sweeps % 2:
            start = "-" if self._swept_after is None else "(" + self._swept_after
        else:
            with unavailable("admin index sweep"):
                first: Any = await self._client.zrandmember(index)
            if first is None:
                return
            start = "[" + text(first)
        for _ in range(INDEX_SWEEP_ROUNDS):
            looked, gone, last = await self._sweep_index_batch(start)
            if self._sweeps % 2:
                self._swept_after = last
            if looked == 0:
                # Past the end (the batch before ended exactly on the last entry): on from the
                # start, as a batch that reaches the end goes on. It stopped here, and the
                # entries before where it began waited for later heartbeats (a test saw 2 of 5
                # expired parties left). An empty index from the start: nothing to sweep.
                if start == "-":
                    return
                start = "-"
                continue
            if gone * 4 < looked:
                # (a batch that reached the end too: an index shorter than a batch, all of it
                # live, was read again and again, INDEX_SWEEP_ROUNDS times a heartbeat: docs
                # probe, 16 reads and 16 EXISTS per live party every 10 s on every node)
                return
            start = "-" if last is None else "(" + last  # on from there; round to the start

    async def _sweep_index_batch(self, start: str) -> tuple[int, int, str | None]:
        """One batch of the sweep from ``start``: (parties looked at, parties dropped, the last
        one looked at, or None if the batch reached the end of the index)."""
        index = self._keys.party_index()
        with unavailable("admin index sweep"):
            ids = [
                text(p) for p in await self._client.zrangebylex(index, start, "+", 0, INDEX_SWEEP)
            ]
            if not ids:
                return 0, 0, None
            async with self._client.pipeline(transaction=False) as pipe:
                for party_id in ids:
                    pipe.exists(self._keys.party_keys(party_id).meta)
                found = await pipe.execute()
            gone = [party_id for party_id, alive in zip(ids, found, strict=True) if not alive]
            if gone:
                await self._client.zrem(index, *gone)
        return len(ids), len(gone), ids[-1] if len(ids) == INDEX_SWEEP else None

    async def forget_node(self, node_id: str) -> None:
        keys = self._keys
        async with unavailable("admin forget node"), self._client.pipeline(False) as pipe:
            pipe.zrem(keys.nodes(), node_id)
            pipe.delete(keys.node(node_id))
            await pipe.execute()

    async def nodes(self, now: float) -> list[NodeInfo]:
        keys = self._keys
        with unavailable("admin nodes"):
            ids = sorted(
                text(n) for n in await self._client.zrangebyscore(keys.nodes(), now, "+inf")
            )
            # One GET each, pipelined: the heartbeats are in many slots (a Redis Cluster: no
            # MGET across slots; RedisCluster's pipeline sends each node its own).
            async with self._client.pipeline(transaction=False) as pipe:
                for node_id in ids:
                    pipe.get(keys.node(node_id))
                bodies = await pipe.execute() if ids else []
        out: list[NodeInfo] = []
        for body in bodies:
            if body is None:
                continue
            try:
                d = orjson.loads(body)
                out.append(
                    NodeInfo(
                        str(d["node_id"]), str(d["version"]), int(d["connections"]),
                        float(d["started_at"]), float(d["seen_at"]),
                        shared_settings.decode_nodes(d.get("settings")),
                    )
                )  # fmt: skip
            except (ValueError, KeyError, TypeError):
                log.warning("ignored a malformed node heartbeat")
        return out

    # -- disconnecting --------------------------------------------------------------------------
    async def block(self, party_id: str, character_id: str, until: float, now: float) -> None:
        key = self._keys.block(party_id, character_id)
        with unavailable("admin block"):
            if until > now:
                await self._client.set(key, repr(until), pxat=int(until * 1000) + 1)
            else:
                await self._client.delete(key)

    async def blocked_until(self, party_id: str, character_id: str, now: float) -> float | None:
        key = self._keys.block(party_id, character_id)
        if self._unanswered(key):  # (a new connection is refused 1011 at once, not in 5 s)
            raise BackendUnavailable("redis is not answering (probing it)")
        with unavailable("admin blocked"):
            value = await self._client.get(key)
        if value is None:
            return None
        until = float(text(value))
        return until if until > now else None

    async def request_close(self, party_id: str, character_id: str, code: int, reason: str) -> None:
        request = {
            "party_id": party_id,
            "character_id": character_id,
            "code": code,
            "reason": reason,
        }
        with unavailable("admin close"):
            message = orjson.dumps({"close": request})
            if isinstance(self._client, RedisCluster):  # the nodes SSUBSCRIBE it (its shard)
                await self._client.spublish(self._keys.admin_channel(), message)
            else:
                await self._client.publish(self._keys.admin_channel(), message)

    def _on_message(self, raw: bytes) -> None:
        try:
            close = orjson.loads(raw)["close"]
            request = (
                str(close["party_id"]),
                str(close["character_id"]),
                int(close["code"]),
                str(close["reason"]),
            )
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed message on the admin channel")
            return
        for callback in list(self._watchers):
            try:
                callback(*request)
            except Exception:
                log.exception("close request failed")

    async def watch_closes(self, callback: CloseRequest) -> _Watch:
        channel = self._keys.admin_channel()
        if not self._watchers:
            await self._bus.add(channel, self._on_message)
        self._watchers.append(callback)

        async def close() -> None:
            if callback in self._watchers:
                self._watchers.remove(callback)
            if not self._watchers:
                await self._bus.remove(channel, self._on_message)

        return _Watch(close)
