"""Presence on Redis: connections counted per character across nodes and tabs, with expiry.

Each connection is an entry ``"<connection_id>:<character_id>"`` → ``expires_at`` in the party's
``presence`` sorted set, refreshed by its node every ``presence_ttl / 3`` (the gateway's presence
loop); the pure rules are ``core/presence.py``. A node that
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

``RedisPresence`` is given what it uses (the client, the scripts, the key names and its limits)
by the ``RedisBackend`` that owns it; it knows nothing else of the backend.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import cast

from redis.asyncio import Redis, RedisCluster

from party_sync.backends.keys import KeySpace
from party_sync.backends.redis_scripts import Arg, Scripts, text, unavailable
from party_sync.backends.redis_stream import event_from
from party_sync.core.binding import Binding
from party_sync.core.events import Event
from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.errors import BackendUnavailable

log = logging.getLogger(__name__)

#: Parties swept per call at most (the rest on the next sweep, ``presence_ttl / 3`` later).
SWEEP_BATCH = 1000


def _entry(binding: Binding, connection_id: str) -> str:
    return f"{connection_id}:{binding.character_id}"


class RedisPresence:
    """Presence of every party on Redis (``PresenceStore``); one per ``RedisBackend``."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        scripts: Scripts,
        keys: KeySpace,
        *,
        presence_ttl: float,
        presence_grace: float,
        idle_party_ttl: float,
    ) -> None:
        self._client = client
        self._scripts = scripts
        self._keys = keys
        self._ttl = presence_ttl
        self._grace = presence_grace
        self._run_ttl_ms = int(idle_party_ttl * 1000)  # a run's party list lives as its parties

    async def connect(
        self,
        binding: Binding,
        connection_id: str,
        now: float,
        trace_id: str,
        *,
        sent: float | None = None,
        stale: float = 0.0,
    ) -> Event | None:
        """Register a connection; publish ``party.join`` if the character was offline.

        ``sent`` (Unix seconds on Redis's clock) and ``stale``: a call Redis runs more than
        ``stale`` seconds after ``sent`` registers nothing and raises ``BackendUnavailable``
        (Redis was stalled: the handshake has been refused by then)."""
        cid, name = binding.character_id, binding.display_name
        payload = {"character_id": cid, "display_name": name}
        body = codec.encode(codec.envelope(t.PARTY_JOIN, payload, ts=now, trace_id=trace_id))
        ttl = self._ttl
        async with unavailable("connect"), self._client.pipeline(transaction=False) as pipe:
            args: list[Arg] = [
                _entry(binding, connection_id),
                cid,
                body,
                name,
                ttl,
                binding.campaign_run_id,
                "0" if sent is None else repr(sent),
                repr(stale),
            ]
            await self._scripts.run("connect", binding.party_id, now, args, client=pipe)
            pipe.zadd(self._keys.presence_index(), {binding.party_id: now + ttl}, lt=True)
            # listed at once (re-check: a party that had just connected was missing from the
            # admin listing until its node's next heartbeat, up to presence_ttl / 3)
            pipe.zadd(self._keys.party_index(), {binding.party_id: 0}, nx=True)
            run_parties = self._keys.run_parties(binding.campaign_run_id)
            pipe.sadd(run_parties, binding.party_id)
            pipe.pexpire(run_parties, self._run_ttl_ms)
            reply, *_ = await pipe.execute()
        seq = int(reply[0])
        if seq < 0:
            log.warning(
                "redis ran connect late (a stall): refused it",
                extra={"party_id": binding.party_id, "character_id": cid},
            )
            raise BackendUnavailable("redis ran connect too late: refused it")
        if seq == 0:
            return None
        return Event(
            binding.party_id, seq, t.PARTY_JOIN, payload, trace_id, codec.with_seq(body, seq)
        )

    async def disconnect(
        self, binding: Binding, connection_id: str, now: float, *, handover: bool = False
    ) -> bool:
        """Forget a connection (its character settles within grace, by any node); True if the
        character has no live connection left. ``handover`` (a draining node, which will not
        settle it): the deadline is the grace's own end, and the next sweep after it announces
        the leave (``expired``), not ``presence_ttl`` later as for a node that died."""
        deadline = f"{now + self._grace:.6f}" if handover else self._gone_deadline(now)
        async with unavailable("disconnect"), self._client.pipeline(transaction=False) as pipe:
            args = [_entry(binding, connection_id), binding.character_id, deadline]
            await self._scripts.run("disconnect", binding.party_id, now, args, client=pipe)
            pipe.zadd(self._keys.presence_index(), {binding.party_id: float(deadline)}, lt=True)
            last, _ = await pipe.execute()
        return bool(int(last))

    async def hand_over_grace(self, binding: Binding, since: float) -> None:
        """A draining node's grace still running: the deadline in ``gone`` becomes the grace's
        end, if it is still the one this node's disconnect at ``since`` wrote (a later one,
        another grace, is left as it is); the sweep after it announces the leave (re-check
        probe: a grace begun before the drain ran on to grace + presence_ttl)."""
        end = since + self._grace
        async with unavailable("hand over"), self._client.pipeline(transaction=False) as pipe:
            args = [binding.character_id, f"{end:.6f}", self._gone_deadline(since)]
            await self._scripts.run("hand_over_grace", binding.party_id, since, args, client=pipe)
            pipe.zadd(self._keys.presence_index(), {binding.party_id: end}, lt=True)
            await pipe.execute()

    def _gone_deadline(self, disconnected: float) -> str:
        """What ``disconnect`` at ``disconnected`` writes in ``gone``: the time by which its node
        settles the character (else the sweep does), and the grace's mark for ``settle``."""
        return f"{disconnected + self._grace + self._ttl:.6f}"

    async def settle(
        self, binding: Binding, now: float, trace_id: str, since: float | None = None
    ) -> Event | None:
        """After grace: ``party.leave`` (disconnected) unless the character is connected again,
        or connected and disconnected again since ``since`` (``gone`` holds another deadline:
        that later grace settles it)."""
        mark = "" if since is None else self._gone_deadline(since)
        return await self._leave(binding, now, trace_id, t.LEAVE_DISCONNECTED, mark)

    async def leave(self, binding: Binding, now: float, trace_id: str) -> Event | None:
        """A voluntary leave: ``party.leave`` (left) if the character is a member."""
        return await self._leave(binding, now, trace_id, t.LEAVE_LEFT)

    async def _leave(
        self, binding: Binding, now: float, trace_id: str, reason: str, mark: str = ""
    ) -> Event | None:
        """``party.leave``: ``disconnected`` after grace (settle.lua), ``left`` (leave.lua)."""
        payload = {"character_id": binding.character_id, "reason": reason}
        body = codec.encode(codec.envelope(t.PARTY_LEAVE, payload, ts=now, trace_id=trace_id))
        script = "settle" if reason == t.LEAVE_DISCONNECTED else "leave"
        args: list[Arg] = [binding.character_id, body]
        if script == "leave":  # the tombstone's lifetime (refresh.lua must not announce it again)
            args.append(self._ttl)
        else:
            args.append(mark)
        with unavailable(script):
            reply = await self._scripts.run(script, binding.party_id, now, args)
        seq = int(reply[0])
        if seq == 0:
            return None
        return Event(
            binding.party_id, seq, t.PARTY_LEAVE, payload, trace_id, codec.with_seq(body, seq)
        )

    async def refresh(self, connections: Sequence[tuple[Binding, str]], now: float) -> list[Event]:
        """Push this node's connections' expiries forward, one script per party, one round trip.

        Returns the ``party.join`` events refresh.lua published for characters that were not online
        any more although a connection of theirs is live (see its header). Each party's place in
        its run's ``run_parties`` is renewed too (as ``connect`` records it): the list lives as
        its parties do, and a party whose members stayed connected past ``idle_party_ttl`` since
        they connected was dropped from it (leak probe: its run-wide events stopped reaching it).
        """
        by_party: dict[str, list[Arg]] = defaultdict(list)
        runs: dict[str, str] = {}
        for binding, connection_id in connections:
            by_party[binding.party_id] += [_entry(binding, connection_id), binding.display_name]
            runs[binding.party_id] = binding.campaign_run_id
        if not by_party:
            return []
        ttl = self._ttl
        timestamp = codec.rfc3339(now)
        with unavailable("refresh"):
            async with self._client.pipeline(transaction=False) as pipe:
                for party_id, pairs in by_party.items():
                    trace_prefix = codec.new_trace_id()[:24]  # the joins' trace ids, if any
                    args = [ttl, trace_prefix, timestamp, runs[party_id], *pairs]
                    await self._scripts.run("refresh", party_id, now, args, client=pipe)
                    pipe.zadd(self._keys.presence_index(), {party_id: now + ttl}, lt=True)
                    run_parties = self._keys.run_parties(runs[party_id])
                    pipe.sadd(run_parties, party_id)
                    pipe.pexpire(run_parties, self._run_ttl_ms)
                replies = await pipe.execute()
            events: list[Event] = []
            for party_id, reply in zip(by_party, replies[::4], strict=True):
                events.extend(event_from(party_id, bytes(data)) for data in reply[1:])
        return events

    async def expire(self, now: float) -> list[Event]:
        """Sweep the parties due in the index; returns the ``party.leave`` events it published."""
        index = self._keys.presence_index()
        with unavailable("expire"):
            due = cast(
                list[tuple[bytes, float]],
                await self._client.zrangebyscore(
                    index, "-inf", now, start=0, num=SWEEP_BATCH, withscores=True
                ),
            )
            if not due:
                return []
            timestamp = codec.rfc3339(now)
            async with self._client.pipeline(transaction=False) as pipe:
                for party, _ in due:
                    args = [codec.new_trace_id()[:24], timestamp]
                    await self._scripts.run("expire", text(party), now, args, client=pipe)
                replies = await pipe.execute()
            events: list[Event] = []
            async with self._client.pipeline(transaction=False) as pipe:
                for (party, score), reply in zip(due, replies, strict=True):
                    party_id = text(party)
                    events.extend(event_from(party_id, bytes(data)) for data in reply[1:])
                    next_look = text(reply[0])
                    if next_look:
                        pipe.zadd(index, {party_id: float(next_look)})
                    else:
                        await self._scripts.forget_index(pipe, index, party_id, float(score))
                await pipe.execute()
        return events
