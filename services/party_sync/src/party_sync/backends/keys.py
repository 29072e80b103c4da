"""Every Redis key and pub/sub channel name party_sync uses, built here and nowhere else.

Channels (a public contract, docs/redis.md; no prefix, so other services can listen)::

    party:<party_id>            the party's stream: sequenced events, direct messages and transient
                                messages to every member (JSON; redis_stream.py)
    run:<campaign_run_id>       run-wide messages (JSON envelopes, not sequenced)

A node-private channel, for the pub/sub liveness probe (``redis_bus``)::

    <prefix>:probe:<node_id>

Keys of one party all carry the hash tag ``{party:<party_id>}``, so they live in one Redis Cluster
slot and one Lua script may touch all of them::

    <prefix>:{party:<id>}:meta        hash    epoch, seq (the top of the stream), hb (history bytes)
    <prefix>:{party:<id>}:history     list    the newest encoded events (history bounds), oldest
                                              first, maybe stamped (_lib.lua event_of)
    <prefix>:{party:<id>}:members     zset    character_id → seq of its join (roster order)
    <prefix>:{party:<id>}:names       hash    character_id → display_name
    <prefix>:{party:<id>}:online      set     character_ids online in the projection
    <prefix>:{party:<id>}:state       hash    scene, combat, party_state, vote* (JSON payloads)
    <prefix>:{party:<id>}:presence    zset    "<connection_id>:<character_id>" → expires_at
    <prefix>:{party:<id>}:gone        hash    character_id → deadline for its owning node to settle
    <prefix>:{party:<id>}:locks       hash    character_id → "<until> <action_id> <action_type>"
                                              (one in flight per character)
    <prefix>:{party:<id>}:vote        hash    the current (or last) vote: spec, deadline, run, ...
    <prefix>:{party:<id>}:ballots     hash    character_id → option, for the current vote
    <prefix>:{party:<id>}:action:<action_id>   hash  c (character), s (started), r (result bytes)
    <prefix>:{party:<id>}:published:<key>      hash  s: the seq of the event first published
                                      under that ``Idempotency-Key`` (the events API;
                                      core/published.py)
    <prefix>:{party:<id>}:unapplied   hash    vote_id → "<finished_at> <vote.finished body>" of
                                      each finished vote whose action the engine was not yet given
    <prefix>:{party:<id>}:narration   hash    live narration streams (lua/narrate.lua):
                                      m:<stream_id> meta, t:<stream_id> text, a:<stream_id> action

The first eleven (``PartyKeys``, in this order) expire together ``party_ttl`` after the party's last
activity; an action record and a published key expire ``action_record_ttl`` after their last
change; ``unapplied`` (not a script key: only ``redis_votes`` uses it) expires with the party
too: ``party_ttl`` after its last write, set again to ``meta``'s remaining time by every votes
sweep; ``narration`` expires twice ``narration_idle`` after its last piece.

Keys outside any party slot::

    <prefix>:presence-index             zset  party_id → when its presence must next be swept
    <prefix>:vote-index                 zset  party_id → the deadline of its (last) vote, kept
                                              while it is open or ``unapplied`` holds a decision
    <prefix>:{run:<id>}:parties         set   the parties whose members connected for the run
    <prefix>:fence                      string  ``<run_id>:<master_replid>`` of the Redis server the
                                              data was last vouched for under (``redis_fence``)
    <prefix>:settings                   string  the nodes' history bounds and TTLs (JSON), which
                                              engine workers take (``shared_settings``; written
                                              with the actions stream link only)

The admin API's (``redis_admin``)::

    <prefix>:admin                      channel  close requests to every node (JSON)
    <prefix>:nodes                      zset  node_id → when its heartbeat expires
    <prefix>:node:<node_id>             string  the node's heartbeat (JSON), expiring with it
    <prefix>:party-index                zset  party_id (score 0, lexicographic: the listing's
                                              order and cursor), fed by every node's heartbeat
    <prefix>:{party:<id>}:block:<character_id>   string  until when handshakes are refused

The membership directory (``party_sync.backends.directory``; registered through the server API,
no TTL: it lives until it is deleted, independently of the party's activity)::

    <prefix>:{party:<id>}:directory     hash  character_id → {telegram_user_id, display_name, run}

The engine transport's stream (its name is a public contract, so it carries no prefix and is
configurable as ``actions_stream``)::

    party_sync:actions                  stream  accepted actions, read by engine workers
                                                (actions_stream_partitions = 1, the default)
    party_sync:actions:<i>              stream  partition i of N (actions_stream_partitions =
                                                N > 1; i = crc32(party_id) mod N:
                                                party_sync.engine.partitions), each its own slot
    party_sync:actions:partitions       string  N, as the serving nodes last wrote it (engine
                                                workers compare theirs with it)

On a Redis Cluster (``redis_cluster``; docs/redis.md, "Redis Cluster") the names are the same and
each lives in the slot its name (or hash tag) gives:

- a party's keys, ``party:<id>`` (crc16 of ``party:<id>``, the same string as the keys' hash tag:
  the party's scripts SPUBLISH on it in their own slot) and its ``block`` / ``directory`` /
  ``unapplied`` / ``action`` / ``narration`` keys: the party's slot, so one shard per party;
- ``run:<id>``, ``<prefix>:admin``, the indexes (``presence-index``, ``vote-index``,
  ``party-index``, ``nodes``), each heartbeat ``<prefix>:node:<id>``: each a slot of its own name
  (single-key commands, and pipelines without MULTI that redis-py splits per node);
- instead of ``<prefix>:fence``, one mark per shard, in the first slot the shard's master serves::

    <prefix>:fence:{<tag>}             string  the shard master's ``<run_id>:<master_replid>``
    <prefix>:probe:<node_id>:{<tag>}   channel the node's probe on that shard (sharded pub/sub)

  ``<tag>`` is ``slot_tag(slot)``: ``s<n>`` for the smallest n whose CRC16 is that slot.

Identifiers are ``[A-Za-z0-9._:-]{1,64}`` (checked in tokens and schemas), so none can contain
``{``/``}`` and break a hash tag, nor a space (the lock value's separator).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

DEFAULT_PREFIX = "party_sync"

#: The default name of the actions stream engines consume (``PARTY_SYNC_ACTIONS_STREAM``).
ACTIONS_STREAM = "party_sync:actions"


class PartyKeys(NamedTuple):
    """The per-party keys every party script receives, in this order: ``KEYS[1..11]`` of the Lua
    scripts (``_lib.lua`` names them in the same order; that order is the scripts' contract).

    A tuple, so it is passed to a script as it is; a field names a key where Python uses one.
    """

    meta: str
    history: str
    members: str
    names: str
    online: str
    state: str
    presence: str
    gone: str
    locks: str
    vote: str
    ballots: str


#: The names of ``PartyKeys``' fields, in order: the last part of each key's name.
PARTY_KEYS: tuple[str, ...] = PartyKeys._fields


def party_channel(party_id: str) -> str:
    return f"party:{party_id}"


def run_channel(campaign_run_id: str) -> str:
    return f"run:{campaign_run_id}"


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Key names under one prefix (``redis_prefix``), so several deployments can share a Redis."""

    prefix: str = DEFAULT_PREFIX

    def tag(self, party_id: str) -> str:
        return f"{self.prefix}:{{party:{party_id}}}"

    def party_keys(self, party_id: str) -> PartyKeys:
        """The party's keys (``PartyKeys``, in the scripts' ``KEYS`` order)."""
        base = self.tag(party_id)
        return PartyKeys._make(f"{base}:{name}" for name in PARTY_KEYS)

    def action(self, party_id: str, action_id: str) -> str:
        return f"{self.tag(party_id)}:action:{action_id}"

    def published(self, party_id: str, key: str) -> str:
        """The event first published under an ``Idempotency-Key`` (the events API)."""
        return f"{self.tag(party_id)}:published:{key}"

    def narration(self, party_id: str) -> str:
        """The party's live narration streams (not among ``PARTY_KEYS``: its own expiry)."""
        return f"{self.tag(party_id)}:narration"

    def run_parties(self, campaign_run_id: str) -> str:
        return f"{self.prefix}:{{run:{campaign_run_id}}}:parties"

    def directory(self, party_id: str) -> str:
        """The party's membership directory (not among ``PARTY_KEYS``: it never expires)."""
        return f"{self.tag(party_id)}:directory"

    def unapplied(self, party_id: str) -> str:
        """The party's finished votes whose decision was not yet handed to the engine, by vote id
        (not among ``PARTY_KEYS``: a new vote replaces ``vote``, never these)."""
        return f"{self.tag(party_id)}:unapplied"

    def presence_index(self) -> str:
        return f"{self.prefix}:presence-index"

    def vote_index(self) -> str:
        return f"{self.prefix}:vote-index"

    def fence(self) -> str:
        return f"{self.prefix}:fence"

    def settings(self) -> str:
        """The nodes' shared settings, for engine workers (``shared_settings``)."""
        return f"{self.prefix}:settings"

    def shard_fence(self, slot: int) -> str:
        """On a Redis Cluster: the fence mark of the shard that owns ``slot`` (its first)."""
        return f"{self.prefix}:fence:{{{slot_tag(slot)}}}"

    def probe_channel(self, node_id: str) -> str:
        return f"{self.prefix}:probe:{node_id}"

    def shard_probe_channel(self, node_id: str, slot: int) -> str:
        """On a Redis Cluster: the node's probe channel on the shard that owns ``slot``."""
        return f"{self.prefix}:probe:{node_id}:{{{slot_tag(slot)}}}"

    def admin_channel(self) -> str:
        return f"{self.prefix}:admin"

    def nodes(self) -> str:
        return f"{self.prefix}:nodes"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"

    def party_index(self) -> str:
        return f"{self.prefix}:party-index"

    def block(self, party_id: str, character_id: str) -> str:
        return f"{self.tag(party_id)}:block:{character_id}"


@functools.lru_cache(maxsize=1024)
def slot_tag(slot: int) -> str:
    """The first of ``s0``, ``s1``, ... whose Cluster hash slot is ``slot``: a hash tag that puts
    a key or sharded channel on the shard that owns ``slot`` (the shard's fence mark and probe
    channel). About 16,000 CRC16s of a few bytes the first time (C: ``binascii.crc_hqx``)."""
    if not 0 <= slot < REDIS_CLUSTER_HASH_SLOTS:
        raise ValueError(f"not a cluster slot: {slot}")
    n = 0
    while key_slot(f"s{n}".encode()) != slot:
        n += 1
    return f"s{n}"
