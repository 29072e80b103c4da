"""The rollback fence: a Redis that may have lost its newest writes never carries on a party's seq.

Redis replication is asynchronous. When Sentinel promotes a replica, the writes the old master
had not yet sent are gone, and a party's ``meta`` may say ``seq`` 40 where clients already saw 45.
The next events would reuse seqs 41..45 with other content: a client that saw the old 43 and
resumes from it, or a node that had not delivered it, would trust a history that is not the one
the others saw. The same holds after a restart that reloads an older RDB or AOF file.

So each Redis server is asked, on every new connection and before anything else is sent on it,
whether its data was vouched for by the server it is now:

- The server's identity is ``<run_id>:<master_replid>`` (``INFO``): ``run_id`` is new at every
  start of the process, ``master_replid`` is new whenever a replica is promoted. Every failover or
  restart changes it; nothing else does.
- ``<prefix>:fence`` holds the identity the deployment's data was last vouched for under. It is
  written on the master and replicated with everything else, so a promoted replica or a restarted
  server finds the *old* identity there.
- Equal: nothing to do (one ``GET``). Missing (a new or empty Redis, a FLUSHALL): nothing kept can
  have been rolled back behind a client's back, so the mark is only written. Different: the server
  may hold a rolled-back copy, so every party's ``meta`` is deleted (a ``SCAN`` of the
  ``<prefix>:{party:*}:meta`` keys, in the same script) and the mark set to the new identity.

A party without ``meta`` starts a new epoch at its next operation (``_lib.lua`` ``ensure_epoch``,
which also drops the stale history and projection): nodes close the old epoch's connections with
4003, resumes of the old epoch get a snapshot, presence refreshes re-announce who is connected and
the engine re-states the party (the same path as a Redis restarted empty, docs/redis.md). Because
the check is one Lua script, it is atomic: the first connection to a new master fences, every
other one waits behind it in Redis and then finds the mark equal, and no party_sync command runs
on the new master before the fence (every client party_sync makes comes from
``redis_connect.make_client``, whose connections all run this hook). So no seq of an epoch that
some client saw is ever published again with other content, on any node.

A connection that lands on a replica (a demoted master Sentinel has not reconfigured yet, or a
``redis_url`` naming a replica) is refused with ``ConnectionError``: redis-py then asks the
sentinels again (or the caller retries), rather than reading a copy that is about to change.

The hook is redis-py's ``redis_connect_func`` connection option (below its client API, like
``redis_wire``): it replaces the connection's ``on_connect``, which it calls first, then sends the
script with the connection's own ``send_command`` / ``read_response``.
``tests/redis/test_redis_fence.py`` runs it against a real redis-server, so a redis-py upgrade
that changes it fails there.

Cost: one script of two ``INFO`` sections and a ``GET`` per new connection (connections are
long-lived); the ``SCAN`` runs once per failover or restart and blocks that Redis for about the
time of a ``SCAN`` over its keys (measured in docs/redis.md).
"""

from __future__ import annotations

import logging
import re

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from party_sync.backends.keys import KeySpace

log = logging.getLogger(__name__)


class ServersMet:
    """The Redis servers this process's connections have met, by identity (``<run_id>:<master
    _replid>``, new at every restart and every promotion). ``count`` grows when a connection
    lands on one never met before: a failover or a restart, and each master of a cluster once.
    What a process wrote to the server it had just before may be lost (asynchronous replication:
    a promoted replica lacks the old master's last writes), so an engine worker re-reads its own
    pending entries when it grows (``StreamWorker``): an acknowledgement lost in a failover
    otherwise left its entry to another worker's reclaim, ``claim_idle`` later."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self.count = 0

    def met(self, identity: str) -> None:
        if identity and identity not in self._seen:
            self._seen.add(identity)
            self.count += 1


#: This process's (every client party_sync makes runs the fence hooks below on each connection).
SERVERS = ServersMet()

#: The server's identity and role, the start of both fence scripts (``identity``, ``role``).
_IDENTITY_LUA = """
local server = redis.call('INFO', 'server')
local replication = redis.call('INFO', 'replication')
local role = string.match(replication, 'role:(%a+)')
local identity = (string.match(server, 'run_id:(%x+)') or '?') .. ':' ..
  (string.match(replication, 'master_replid:(%x+)') or '?')
if role ~= 'master' then
  return {-1, 0, identity}
end
"""

#: Every party's ``meta`` deleted (``fenced`` counts them), the end of both fence scripts.
_SCAN_LUA = """
local cursor, fenced = '0', 0
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    fenced = fenced + redis.call('DEL', key)
  end
until cursor == '0'
"""

#: KEYS[1] the mark; ARGV[1] the SCAN pattern of every party's meta. Returns
#: ``{outcome, parties fenced, identity}``; outcome 0 vouched, 1 marked (no mark yet), 2 fenced,
#: -1 a replica (nothing done).
FENCE_LUA = (
    _IDENTITY_LUA
    + """
local mark = redis.call('GET', KEYS[1])
if mark == identity then
  return {0, 0, identity}
end
if not mark then
  redis.call('SET', KEYS[1], identity)
  return {1, 0, identity}
end
"""
    + _SCAN_LUA
    + """
redis.call('SET', KEYS[1], identity)
return {2, fenced, identity}
"""
)

_GLOB = re.compile(r"([*?\[\]\\])")

VOUCHED, MARKED, FENCED, REPLICA, MIGRATED = 0, 1, 2, -1, 3


def mark_key(prefix: str) -> str:
    """``<prefix>:fence``: the identity of the server the deployment's data was vouched for."""
    return KeySpace(prefix).fence()


def meta_pattern(prefix: str) -> str:
    """The ``SCAN MATCH`` pattern of every party's ``meta`` (the prefix's glob characters
    escaped; party ids cannot contain ``}``: keys.py)."""
    return _GLOB.sub(r"\\\1", prefix) + ":{party:*}:meta"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


#: The fence on a Redis Cluster node: the same script, allowed to SCAN and DEL the ``meta`` keys
#: of every slot the node serves (``allow-cross-slot-keys``; each key is on this node, so no
#: ``MOVED``), with the shard's own mark as KEYS[1] (``KeySpace.shard_fence``).
#:
#: The shard's mark is ``<identity> <cluster node id of its writer>`` (a mark of an older version,
#: the identity alone, is vouched for as it is). ARGV[2] this node's cluster id, ARGV[3] the ids of
#: the cluster's other masters that serve slots and are not failing, each between spaces. A mark
#: another such master wrote came with the slot it is in, moved here by a resharding (the slot
#: that was that master's first became this one's): this shard's data was not rolled back, so
#: the mark is rewritten without fencing (outcome 3). A mark of this node's own id under another
#: identity (a restart), or of a master that failed or is a replica now (a failover), fences.
FENCE_CLUSTER_LUA = (
    "#!lua flags=allow-cross-slot-keys\n"
    + _IDENTITY_LUA
    + """
local mark = redis.call('GET', KEYS[1])
local written = identity .. ' ' .. ARGV[2]
if mark == written or mark == identity then
  return {0, 0, identity}
end
if not mark then
  redis.call('SET', KEYS[1], written)
  return {1, 0, identity}
end
local writer = string.match(mark, ' (%S+)$')
if writer and writer ~= ARGV[2] and string.find(ARGV[3], ' ' .. writer .. ' ', 1, true) then
  redis.call('SET', KEYS[1], written)
  return {3, 0, identity}
end
"""
    + _SCAN_LUA
    + """
redis.call('SET', KEYS[1], written)
return {2, fenced, identity}
"""
)


def first_slot(cluster_nodes: str) -> int | None:
    """The first slot this node serves as a master, from its ``CLUSTER NODES`` (the line flagged
    ``myself``); None for a replica or a master without slots (it holds no party data)."""
    for line in cluster_nodes.splitlines():
        fields = line.split()
        if len(fields) < 8 or "myself" not in fields[2].split(","):
            continue
        if "master" not in fields[2].split(","):
            return None
        for item in fields[8:]:
            if item.startswith("["):  # a slot being migrated or imported: not (yet) ours
                continue
            return int(item.split("-")[0])
        return None
    return None


def cluster_ids(cluster_nodes: str) -> tuple[str, str]:
    """From ``CLUSTER NODES``: this node's id, and the ids of the *other* masters that serve
    slots and are not failing, each between spaces (``FENCE_CLUSTER_LUA``'s ARGV[3])."""
    mine, others = "", []
    for line in cluster_nodes.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        flags = set(fields[2].split(","))
        if "myself" in flags:
            mine = fields[0]
        elif (
            "master" in flags
            and not flags & {"fail", "fail?", "handshake", "noaddr"}
            and any(not item.startswith("[") for item in fields[8:])
        ):
            others.append(fields[0])
    return mine, " " + " ".join(others) + " "


def _is_replica(cluster_nodes: str) -> bool:
    for line in cluster_nodes.splitlines():
        fields = line.split()
        if len(fields) > 2 and "myself" in fields[2].split(","):
            return "slave" in fields[2].split(",")
    return False


async def fence_cluster_on_connect(
    conn: AbstractConnection, *, prefix: str, seed: bool = False
) -> None:
    """``fence_on_connect`` on a Redis Cluster node: each shard is fenced on its own (module doc,
    docs/redis.md "Redis Cluster"). Its identity is checked against the mark kept in the shard's
    first slot; when it changed, the ``meta`` keys of that shard only are deleted. A master
    without slots is let through (it holds no party data). A connection to a replica is refused
    (``ConnectionError``): redis-py would keep it in the node's pool and use it once the replica
    is promoted, before any fence; redis-py reads the slot map from another node instead.

    ``seed``: the connection of the node ``redis_url`` names (redis-py's startup node), which
    only ever reads the slot map (``CLUSTER SLOTS``; the commands go to the nodes of the map, each
    an object and a pool of its own): a replica is let through, unfenced, so that a cluster whose
    named node became a replica in a failover can still be joined through it."""
    try:
        await conn.on_connect()
    except (RuntimeError, AttributeError) as exc:
        # A node dying or restarting under a handshake: uvloop's "handler is closed", or
        # redis-py's writer already dropped (None) by a concurrent disconnect. Both are a lost
        # connection, for the caller's retry, not a bug.
        raise RedisConnectionError(f"connection lost during the handshake: {exc!r}") from exc
    await conn.send_command("CLUSTER", "NODES")
    nodes = _text(await conn.read_response())
    slot = first_slot(nodes)
    if slot is None:
        if _is_replica(nodes) and not seed:
            # Refused, as on one Redis: redis-py keeps a connection it opened to a replica (to
            # read the slot map) and would send it commands once that replica is promoted,
            # before any fence ran on the new master. The slot map is read from another node.
            raise RedisConnectionError(
                f"{getattr(conn, 'host', '?')}:{getattr(conn, 'port', '?')} is a replica "
                "(party_sync talks to the masters only)"
            )
        return
    mark = KeySpace(prefix).shard_fence(slot)
    mine, others = cluster_ids(nodes)
    await conn.send_command("EVAL", FENCE_CLUSTER_LUA, 1, mark, meta_pattern(prefix), mine, others)
    reply = await conn.read_response()
    outcome, fenced, identity = int(reply[0]), int(reply[1]), _text(reply[2])
    SERVERS.met(identity)
    if outcome == MIGRATED:
        log.info(
            "redis cluster shard's first slot came from another master (a resharding): its "
            "fence mark is this master's now, no new epoch",
            extra={"redis_server": identity, "slot": slot},
        )
    if outcome == FENCED:
        log.warning(
            "redis cluster shard changed master (failover or restart): its parties start a new "
            "epoch",
            extra={"parties": fenced, "redis_server": identity, "slot": slot},
        )


async def fence_on_connect(conn: AbstractConnection, *, prefix: str) -> None:
    """redis-py's ``redis_connect_func``: the usual handshake, then the fence (module doc)."""
    await conn.on_connect()
    await conn.send_command("EVAL", FENCE_LUA, 1, mark_key(prefix), meta_pattern(prefix))
    reply = await conn.read_response()
    outcome, fenced, identity = int(reply[0]), int(reply[1]), _text(reply[2])
    if outcome == REPLICA:
        raise RedisConnectionError(
            f"{getattr(conn, 'host', '?')}:{getattr(conn, 'port', '?')} is a replica "
            "(party_sync writes to the master only)"
        )
    SERVERS.met(identity)
    if outcome == FENCED:
        log.warning(
            "redis master changed (failover or restart): every party starts a new epoch",
            extra={"parties": fenced, "redis_server": identity},
        )
