"""Presence on Redis: connections counted per character across nodes and tabs, with expiry.

Each connection is an entry ``"<connection_id>:<character_id>"`` → ``expires_at`` in the party's
``presence`` sorted set, refreshed by its node every ``presence_ttl / 3`` (the gateway's presence
loop); the pure rules are ``core/presence.py`` (anchors: Centrifugo's presence zset). A node that
dies stops refreshing: its entries expire and the next sweep by any node publishes ``party.leave``
with reason ``expired`` for characters left without a live connection, exactly once (the sweep of
one party is one script). A node that dies during a character's grace period never settles it:
``disconnect`` leaves a deadline (``now + grace + presence_ttl``) in ``gone`` that the sweep
honours, so that character leaves too, instead of staying online forever.

A node that stalled with Redis (longer than about ``2/3 presence_ttl``) may find its players
swept as expired although their connections never closed: its next ``refresh`` re-adds their
entries and announces ``party.join`` again in the same script (refresh.lua), and returns those
events; after Redis restarted empty, that join opens a new epoch at seq 1.

The sweep finds parties through ``presence-index`` (party → when to look next), the one key
outside the party slots; writes to it are hints that only ever bring a look forward, and a party
is dropped from it only if nobody re-indexed it since the sweep read it (``index_forget.lua``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from party_sync.backends.redis_scripts import Arg, text, unavailable
from party_sync.backends.redis_stream import event_from
from party_sync.core.binding import Binding
from party_sync.core.events import Event
from party_sync.protocol import codec
from party_sync.protocol import types as t

if TYPE_CHECKING:
    from party_sync.backends.redis_backend import RedisBackend

#: Parties swept per call at most (the rest on the next sweep, ``presence_ttl / 3`` later).
SWEEP_BATCH = 1000


def _entry(binding: Binding, connection_id: str) -> str:
    return f"{connection_id}:{binding.character_id}"


async def connect(
    b: RedisBackend, binding: Binding, connection_id: str, now: float, trace_id: str
) -> Event | None:
    cid, name = binding.character_id, binding.display_name
    payload = {"character_id": cid, "display_name": name}
    body = codec.encode(codec.envelope(t.PARTY_JOIN, payload, ts=now, trace_id=trace_id))
    ttl = b.settings.presence_ttl
    async with unavailable("connect"), b.client.pipeline(transaction=False) as pipe:
        args: list[Arg] = [
            _entry(binding, connection_id),
            cid,
            body,
            name,
            ttl,
            binding.campaign_run_id,
        ]
        await b.scripts.run("connect", binding.party_id, now, args, client=pipe)
        pipe.zadd(b.keys.presence_index(), {binding.party_id: now + ttl}, lt=True)
        run_parties = b.keys.run_parties(binding.campaign_run_id)
        pipe.sadd(run_parties, binding.party_id)
        pipe.pexpire(run_parties, int(b.settings.idle_party_ttl * 1000))
        reply, *_ = await pipe.execute()
    seq = int(reply[0])
    if seq == 0:
        return None
    return Event(binding.party_id, seq, t.PARTY_JOIN, payload, trace_id, codec.with_seq(body, seq))


async def disconnect(b: RedisBackend, binding: Binding, connection_id: str, now: float) -> bool:
    deadline = now + b.options.presence_grace + b.settings.presence_ttl
    async with unavailable("disconnect"), b.client.pipeline(transaction=False) as pipe:
        args = [_entry(binding, connection_id), binding.character_id, f"{deadline:.6f}"]
        await b.scripts.run("disconnect", binding.party_id, now, args, client=pipe)
        pipe.zadd(b.keys.presence_index(), {binding.party_id: deadline}, lt=True)
        last, _ = await pipe.execute()
    return bool(int(last))


async def settle(
    b: RedisBackend, binding: Binding, now: float, trace_id: str, reason: str
) -> Event | None:
    """``party.leave``: ``disconnected`` after grace (settle.lua), ``left`` (leave.lua)."""
    payload = {"character_id": binding.character_id, "reason": reason}
    body = codec.encode(codec.envelope(t.PARTY_LEAVE, payload, ts=now, trace_id=trace_id))
    script = "settle" if reason == t.LEAVE_DISCONNECTED else "leave"
    args: list[Arg] = [binding.character_id, body]
    if script == "leave":  # the tombstone's lifetime (refresh.lua must not announce it again)
        args.append(b.settings.presence_ttl)
    async with unavailable(script):
        reply = await b.scripts.run(script, binding.party_id, now, args)
    seq = int(reply[0])
    if seq == 0:
        return None
    return Event(binding.party_id, seq, t.PARTY_LEAVE, payload, trace_id, codec.with_seq(body, seq))


async def refresh(
    b: RedisBackend, connections: Sequence[tuple[Binding, str]], now: float
) -> list[Event]:
    """Push this node's connections' expiries forward, one script per party, one round trip.

    Returns the ``party.join`` events refresh.lua published for characters that were not online
    any more although a connection of theirs is live (see its header); rare, so the party's run
    is recorded in ``run_parties`` (as ``connect`` does) only for the parties that had one.
    """
    by_party: dict[str, list[Arg]] = defaultdict(list)
    runs: dict[str, str] = {}
    for binding, connection_id in connections:
        by_party[binding.party_id] += [_entry(binding, connection_id), binding.display_name]
        runs[binding.party_id] = binding.campaign_run_id
    if not by_party:
        return []
    ttl = b.settings.presence_ttl
    timestamp = codec.rfc3339(now)
    async with unavailable("refresh"):
        async with b.client.pipeline(transaction=False) as pipe:
            for party_id, pairs in by_party.items():
                trace_prefix = codec.new_trace_id()[:24]  # the joins' trace ids, if any
                args = [ttl, trace_prefix, timestamp, runs[party_id], *pairs]
                await b.scripts.run("refresh", party_id, now, args, client=pipe)
                pipe.zadd(b.keys.presence_index(), {party_id: now + ttl}, lt=True)
            replies = await pipe.execute()
        events: list[Event] = []
        for party_id, reply in zip(by_party, replies[::2], strict=True):
            events.extend(event_from(party_id, bytes(data)) for data in reply[1:])
        if events:
            async with b.client.pipeline(transaction=False) as pipe:
                for party_id in dict.fromkeys(e.party_id for e in events):
                    run_parties = b.keys.run_parties(runs[party_id])
                    pipe.sadd(run_parties, party_id)
                    pipe.pexpire(run_parties, int(b.settings.idle_party_ttl * 1000))
                await pipe.execute()
    return events


async def expire(b: RedisBackend, now: float) -> list[Event]:
    """Sweep the parties due in the index; returns the ``party.leave`` events it published."""
    index = b.keys.presence_index()
    async with unavailable("expire"):
        due = cast(
            list[tuple[bytes, float]],
            await b.client.zrangebyscore(
                index, "-inf", now, start=0, num=SWEEP_BATCH, withscores=True
            ),
        )
        if not due:
            return []
        timestamp = codec.rfc3339(now)
        async with b.client.pipeline(transaction=False) as pipe:
            for party, _ in due:
                args = [codec.new_trace_id()[:24], timestamp]
                await b.scripts.run("expire", text(party), now, args, client=pipe)
            replies = await pipe.execute()
        events: list[Event] = []
        async with b.client.pipeline(transaction=False) as pipe:
            for (party, score), reply in zip(due, replies, strict=True):
                party_id = text(party)
                events.extend(event_from(party_id, bytes(data)) for data in reply[1:])
                next_look = text(reply[0])
                if next_look:
                    pipe.zadd(index, {party_id: float(next_look)})
                else:
                    await b.scripts.index_forget(
                        keys=[index], args=[party_id, repr(float(score))], client=pipe
                    )
            await pipe.execute()
    return events
