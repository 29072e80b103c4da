"""Party votes on Redis: the pure rules of ``core/votes.py``, made atomic across nodes.

Votes are rare (a few per scene), so instead of re-writing the tally and tie rules in Lua this
module runs the very same Python functions inside an optimistic transaction: WATCH the party's
``vote``, ``ballots`` and ``online`` keys, read them, decide with ``core.votes``, then MULTI the
writes together with the ``publish.lua`` calls of the events (allocating their seq in the same
EXEC). If another node changed a watched key meanwhile, EXEC fails and the decision is taken again
on fresh data. So a ballot is counted once, and a vote finishes exactly once on whichever node
gets there first (the timers of every node race; only one EXEC wins).

``vote-index`` (party → deadline of its open vote, outside the party slot) lets any node's sweep
find votes whose deadline passed while the node that armed the timer was down.

A finished vote's ``vote.finished`` is kept in the party's ``unapplied`` hash (by vote id, next to
the time it finished) until a node marks its action handed to the engine (``mark_vote_applied``);
any node's sweep hands over those still there after a while (``unapplied_votes``). It is not in
the ``vote`` record, which the next vote replaces: a decision announced is never lost, even if
another vote starts (or finishes) first. The party stays in ``vote-index`` while it holds one, so
the sweep finds it; like the party's other keys, ``unapplied`` expires with ``meta``.

``RedisVotes`` is given what it uses (the client, the scripts, the key names) by the
``RedisBackend`` that owns it; it knows nothing else of the backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import orjson
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.exceptions import AskError, MovedError, TryAgainError, WatchError

from party_sync.backends.keys import KeySpace
from party_sync.backends.redis_connect import SlotClients
from party_sync.backends.redis_scripts import Scripts, fold_args, text, unavailable
from party_sync.core import votes
from party_sync.core.events import Event
from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.errors import BackendUnavailable, VoteConflict

T = TypeVar("T")
#: The fields of a whole vote record (``start_vote``).
_RECORD = frozenset({"vote_id", "spec", "started", "deadline", "trace_id", "run", "finished"})
TRIES = 20  # optimistic retries under contention before giving up (retryable for the caller)


def _load(fields: Mapping[Any, Any], ballots: Mapping[Any, Any]) -> votes.Vote | None:
    """The vote record, or None if there is none, or only part of one (written by an earlier
    version after its vote's record went with an epoch: a vote started now replaces it)."""
    if not fields:
        return None
    f = {text(k): text(v) for k, v in fields.items()}
    if not _RECORD.issubset(f):
        return None
    spec = orjson.loads(f["spec"])
    return votes.Vote(
        votes.VoteSpec(
            vote_id=f["vote_id"],
            question=spec["question"],
            options=tuple((o[0], o[1]) for o in spec["options"]),
            timeout_s=float(spec["timeout_s"]),
            tie_rule=spec["tie_rule"],
            default_option=spec["default_option"],
        ),
        started_at=float(f["started"]),
        deadline=float(f["deadline"]),
        trace_id=f["trace_id"],
        campaign_run_id=f["run"],
        ballots={text(k): text(v) for k, v in ballots.items()},
        finished=f["finished"] == "1",
    )


class _Txn:
    """One attempt: the watched state, and the events queued for the EXEC."""

    def __init__(
        self, scripts: Scripts, pipe: Pipeline | ClusterPipeline, party_id: str, now: float
    ) -> None:
        self.scripts, self.pipe, self.party_id, self.now = scripts, pipe, party_id, now
        self.messages: list[dict[str, Any]] = []
        #: The ``eligible`` count the party was last told (read under WATCH: ``told=True``).
        self.told: int | None = None

    async def publish(self, message: dict[str, Any]) -> None:
        """Queue ``publish.lua`` for one event (inside MULTI)."""
        type_, payload = message["type"], message["payload"]
        args = [codec.encode(message), type_, *fold_args(type_, payload)]
        await self.scripts.run("publish", self.party_id, self.now, args, client=self.pipe)
        self.messages.append(message)

    def events(self, replies: Sequence[Any]) -> list[Event]:
        """The published events, from the EXEC replies of their ``publish.lua`` calls."""
        seqs = [int(r[0]) for r in replies if isinstance(r, list)]
        return [
            Event(
                self.party_id,
                seq,
                m["type"],
                m["payload"],
                m["trace_id"],
                codec.with_seq(codec.encode(m), seq),
            )
            for seq, m in zip(seqs, self.messages, strict=True)
        ]


def _record_finish(
    txn: _Txn, keys: KeySpace, vote: votes.Vote, finished: dict[str, Any], party_ttl: float
) -> None:
    """Closed, in the same transaction: the vote is marked finished, and its ``vote.finished``
    body is kept in ``unapplied`` (by vote id) until its action has been handed to the engine
    (``mark_vote_applied``), so that any node can hand it over if the one that closed it could
    not (``unapplied_votes``): a decision announced is never lost. ``unapplied`` lives as long as
    the party (the publish refreshes it; the sweep keeps it in step with ``meta``).

    Queued *before* the ``vote.finished`` publish: a publish that opens a new epoch (the party's
    ``meta`` gone: a failover's fence, an emptied Redis) deletes the vote record, and a mark
    written after it made a record of ``finished`` alone, which no node could read again, so
    the party could never vote again (Sentinel probe: 500s on every later vote)."""
    now, party_id = txn.now, txn.party_id
    txn.pipe.hset(
        keys.party_keys(party_id).vote, mapping={"finished": "1", "finished_at": repr(now)}
    )
    unapplied = keys.unapplied(party_id)
    # The run goes with the decision (an extra member of the kept envelope, never published):
    # the fence deletes the party's recorded run with ``meta`` and a new epoch drops the vote
    # record, while the decision may still be waiting (``vote_run``).
    kept = {**finished, KEPT_RUN: vote.campaign_run_id} if vote.campaign_run_id else finished
    txn.pipe.hset(unapplied, vote.vote_id, repr(now).encode() + b" " + codec.encode(kept))
    txn.pipe.pexpire(unapplied, _ms(party_ttl))


def _ms(seconds: float) -> int:
    """A key's lifetime in whole milliseconds, at least 1 (``PEXPIRE``)."""
    return max(1, int(seconds * 1000))


#: The member of a kept ``vote.finished`` envelope (in ``unapplied``) that names its run.
KEPT_RUN = "campaign_run_id"


def _unapplied_entry(vote_id: Any, value: Any) -> tuple[float, str, bytes]:
    """``(finished_at, vote_id, vote.finished body)`` of one ``unapplied`` field (in the order
    ``unapplied_votes`` hands them over: oldest first)."""
    at, _, body = bytes(value).partition(b" ")
    return float(at), text(vote_id), body


def _finished(vote: votes.Vote, reason: str, now: float) -> dict[str, Any]:
    outcome = votes.decide(vote, reason)
    payload = votes.finished_payload(vote, outcome)
    return codec.envelope(t.VOTE_FINISHED, payload, ts=now, trace_id=vote.trace_id)


class RedisVotes:
    """Votes of every party on Redis (``VoteStore``); one per ``RedisBackend``."""

    def __init__(self, client: Redis | RedisCluster, scripts: Scripts, keys: KeySpace) -> None:
        self._client = client
        self._scripts = scripts
        self._keys = keys
        # A Cluster: WATCH/MULTI on the party's master itself (redis_connect.SlotClients).
        self._slots = SlotClients(client) if isinstance(client, RedisCluster) else None

    async def close(self) -> None:
        if self._slots is not None:
            await self._slots.aclose()

    async def _transact(
        self,
        party_id: str,
        now: float,
        decide: Callable[[_Txn, votes.Vote | None, list[str]], Awaitable[T]],
        *,
        told: bool = False,
    ) -> T:
        """Run ``decide`` on the party's vote, ballots and online set, atomically (the module's
        optimistic transaction), again on fresh data as long as another node got there first.
        ``told``: also the ``eligible`` count the party was last told (``_Txn.told``), watched
        with the rest, so that of two nodes recounting at once only one tells the new count."""
        keys = self._keys.party_keys(party_id)
        online_key, vote_key, ballots_key = keys.online, keys.vote, keys.ballots
        watched = (vote_key, ballots_key, online_key, *((keys.state,) if told else ()))
        with unavailable("vote"):
            for _ in range(TRIES):
                client = self._client
                if self._slots is not None:  # a Cluster: the slot's master, directly
                    client = await self._slots.for_key(vote_key)
                async with client.pipeline(transaction=True) as pipe:
                    try:
                        await pipe.watch(*watched)
                        vote = _load(await pipe.hgetall(vote_key), await pipe.hgetall(ballots_key))
                        online = sorted(text(c) for c in await pipe.smembers(online_key))
                        txn = _Txn(self._scripts, pipe, party_id, now)
                        if told:
                            raw = await pipe.hget(keys.state, "vote_eligible")
                            txn.told = None if raw is None else int(raw)
                        pipe.multi()  # type: ignore[no-untyped-call]
                        return await decide(txn, vote, online)
                    except WatchError:
                        continue
                    except MovedError as exc:  # the slot moved (or a failover): follow it
                        assert self._slots is not None
                        await self._slots.moved(exc)
                    except (AskError, TryAgainError):  # the slot is migrating: wait for it
                        await asyncio.sleep(0.05)
        raise BackendUnavailable("vote: too much contention, retry")

    async def party_run(self, party_id: str) -> str | None:
        """The campaign run the party plays (recorded on connect)."""
        with unavailable("party_run"):
            run = await self._client.hget(self._keys.party_keys(party_id).meta, "run")
        return text(run) if run is not None else None

    async def start_vote(
        self, party_id: str, spec: votes.VoteSpec, run: str, now: float, trace_id: str
    ) -> Event:
        async def decide(txn: _Txn, current: votes.Vote | None, online: list[str]) -> Event:
            conflict = votes.start_conflict(current, spec)
            if conflict is not None:
                raise VoteConflict(conflict)
            vote = votes.open_vote(spec, now, trace_id, run)
            payload = votes.started_payload(vote, codec.rfc3339(vote.deadline))
            keys = self._keys.party_keys(party_id)
            txn.pipe.delete(keys.ballots, keys.vote)  # the last vote's record goes with its ballots
            # The record after the publish: a vote.started that opens a new epoch (the party's
            # ``meta`` gone: an emptied Redis, a failover's fence) deletes the party's vote
            # record with the old epoch's state, and took the one written before it: the vote
            # was announced, its ballots refused ``vote_unknown``, and it never finished
            # (re-check probe: a vote started just after a FLUSHALL). Given the party's lifetime
            # itself (the publish gives a key it wrote ``meta``'s; this one it did not write).
            await txn.publish(codec.envelope(t.VOTE_STARTED, payload, ts=now, trace_id=trace_id))
            txn.pipe.hset(
                keys.vote,
                mapping={
                    "vote_id": spec.vote_id,
                    "spec": orjson.dumps(
                        {
                            "question": spec.question,
                            "options": spec.options,
                            "timeout_s": spec.timeout_s,
                            "tie_rule": spec.tie_rule,
                            "default_option": spec.default_option,
                        }
                    ),
                    "started": repr(vote.started_at),
                    "deadline": repr(vote.deadline),
                    "trace_id": trace_id,
                    "run": run,
                    "finished": "0",
                },
            )
            txn.pipe.pexpire(keys.vote, _ms(self._scripts.limits.party_ttl))
            events = txn.events(await txn.pipe.execute())
            # (again, plain: a sweep that read the party's older score, and forgets it by that
            # score, leaves this vote indexed)
            await self._client.zadd(self._keys.vote_index(), {party_id: vote.deadline})
            return events[0]

        spec.check()
        # Indexed before anything of the vote is written (LT: never later than an open vote's
        # deadline already there): a transaction that ran but failed to say so (its MULTI
        # refused, a user's `multi` taken away, ran its commands one by one, docs probe) left a
        # vote, and then its decision, that no sweep ever found.
        with unavailable("start_vote"):
            await self._client.zadd(
                self._keys.vote_index(), {party_id: now + spec.timeout_s}, lt=True
            )
        return await self._transact(party_id, now, decide)

    async def cast_vote(
        self,
        party_id: str,
        character_id: str,
        vote_id: str,
        option: str,
        now: float,
        trace_id: str,
    ) -> tuple[votes.CastRefusal | None, list[Event]]:
        async def decide(
            txn: _Txn, vote: votes.Vote | None, online: list[str]
        ) -> tuple[votes.CastRefusal | None, list[Event]]:
            refusal = votes.cast(vote, vote_id, character_id, option, now)
            if refusal is not None or vote is None:
                return refusal or votes.CastRefusal.UNKNOWN, []
            keys = self._keys.party_keys(party_id)
            txn.pipe.hset(keys.ballots, character_id, option)
            update = votes.update_payload(vote, online)
            finished = None
            if votes.due(vote, online, now) == "all_voted":
                finished = _finished(vote, "all_voted", now)
                # (before the publishes: either may open a new epoch, see _record_finish)
                _record_finish(txn, self._keys, vote, finished, self._scripts.limits.party_ttl)
            await txn.publish(codec.envelope(t.VOTE_UPDATE, update, ts=now, trace_id=trace_id))
            if finished is not None:
                await txn.publish(finished)
            return None, txn.events(await txn.pipe.execute())

        return await self._transact(party_id, now, decide)

    async def finish_vote(self, party_id: str, vote_id: str, now: float) -> Event | None:
        async def decide(txn: _Txn, vote: votes.Vote | None, online: list[str]) -> Event | None:
            if vote is None or vote.vote_id != vote_id:
                return None
            reason = votes.due(vote, online, now)  # the deadline, or all still online voted
            if reason is None:
                # (the count told is watched: every node with members sees a join or a leave,
                # and two recounting at once both told it: re-check probe, every time)
                update = votes.recount(vote, online, txn.told)
                if update is None:
                    return None
                envelope = codec.envelope(t.VOTE_UPDATE, update, ts=now, trace_id=vote.trace_id)
                await txn.publish(envelope)
                await txn.pipe.execute()
                return None
            finished = _finished(vote, reason, now)
            _record_finish(txn, self._keys, vote, finished, self._scripts.limits.party_ttl)
            await txn.publish(finished)
            return txn.events(await txn.pipe.execute())[0]

        return await self._transact(party_id, now, decide, told=True)

    async def due_votes(self, now: float) -> list[tuple[str, str]]:
        """Open votes past their deadline. A party leaves the index once its vote is finished (or
        gone) and ``unapplied`` holds nothing (``unapplied_votes`` still needs it otherwise);
        unless another node indexed a new vote of it since (``index_forget``)."""
        index = self._keys.vote_index()
        with unavailable("due_votes"):
            found = cast(
                list[tuple[bytes, float]],
                await self._client.zrangebyscore(index, "-inf", now, withscores=True),
            )
            if not found:
                return []
            parties = [(text(p), float(score)) for p, score in found]
            async with self._client.pipeline(transaction=False) as pipe:
                for party_id, _ in parties:
                    pipe.hmget(
                        self._keys.party_keys(party_id).vote, ["vote_id", "finished", "deadline"]
                    )
                    pipe.hlen(self._keys.unapplied(party_id))
                replies = await pipe.execute()
            due: list[tuple[str, str]] = []
            async with self._client.pipeline(transaction=False) as pipe:
                for i, (party_id, score) in enumerate(parties):
                    (vote_id, finished, deadline), pending = replies[2 * i], replies[2 * i + 1]
                    if vote_id is not None and finished != b"1":
                        if float(deadline) <= now:
                            due.append((party_id, text(vote_id)))
                    elif not pending:
                        await self._scripts.forget_index(pipe, index, party_id, score)
                await pipe.execute()
        return due

    async def vote_run(self, party_id: str, vote_id: str) -> str | None:
        """The vote's run: its record's, else the one kept with its decision (the record is
        gone with a new epoch, or is a newer vote's), else the party's."""
        with unavailable("vote_run"):
            found, run = await self._client.hmget(
                self._keys.party_keys(party_id).vote, ["vote_id", "run"]
            )
            if found is not None and text(found) == vote_id and run:
                return text(run)
            value = await self._client.hget(self._keys.unapplied(party_id), vote_id)
        if value is not None:
            kept = codec.decode(_unapplied_entry(vote_id, value)[2]).get(KEPT_RUN)
            if isinstance(kept, str) and kept:
                return kept
        return await self.party_run(party_id)

    async def unapplied_votes(self, now: float, older_than: float) -> list[Event]:
        """``vote.finished`` of votes closed at least ``older_than`` ago whose action was not
        handed to the engine (the node that closed it failed or died meanwhile), oldest first in
        each party; seq 0 (not re-sequenced). A party whose state expired (no ``meta``) has
        forgotten them, as the embedded backend forgets an idle party; the others' ``unapplied``
        is given ``meta``'s remaining time, so that it expires with the party."""
        index = self._keys.vote_index()
        with unavailable("unapplied_votes"):
            parties = [text(p) for p in await self._client.zrange(index, 0, -1)]
            if not parties:
                return []
            async with self._client.pipeline(transaction=False) as pipe:
                for party_id in parties:
                    pipe.hgetall(self._keys.unapplied(party_id))
                    pipe.pttl(self._keys.party_keys(party_id).meta)
                replies = await pipe.execute()
            events: list[Event] = []
            async with self._client.pipeline(transaction=False) as pipe:
                for i, party_id in enumerate(parties):
                    kept, left = replies[2 * i], int(replies[2 * i + 1])
                    if not kept or left == -2:  # nothing kept, or the party is gone
                        continue
                    if left > 0:
                        pipe.pexpire(self._keys.unapplied(party_id), left)
                    for at, _, body in sorted(_unapplied_entry(k, v) for k, v in kept.items()):
                        if at > now - older_than:
                            continue
                        message = codec.decode(body)
                        if message.pop(KEPT_RUN, None) is not None:  # (ours, not the event's)
                            body = codec.encode(message)
                        events.append(
                            Event(
                                party_id,
                                0,
                                message["type"],
                                message["payload"],
                                message["trace_id"],
                                body,
                            )
                        )
                await pipe.execute()
        return events

    async def mark_vote_applied(self, party_id: str, vote_id: str) -> None:
        """The decision of a finished vote was handed to the engine: forget it. Nothing to do for
        a vote that is open (it has no decision yet: it stays due), unknown or already marked.
        The party leaves the index once nothing else needs it there (as in ``due_votes``)."""
        unapplied = self._keys.unapplied(party_id)
        index = self._keys.vote_index()
        with unavailable("mark_vote_applied"):
            if not await self._client.hdel(unapplied, vote_id):
                return
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hmget(self._keys.party_keys(party_id).vote, ["vote_id", "finished"])
                pipe.hlen(unapplied)
                pipe.zscore(index, party_id)
                (current, finished), pending, score = await pipe.execute()
            if (current is None or finished == b"1") and not pending and score is not None:
                await self._scripts.index_forget(keys=[index], args=[party_id, repr(float(score))])
