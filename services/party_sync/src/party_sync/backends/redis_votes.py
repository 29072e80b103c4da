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
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from party_sync.backends.redis_scripts import fold_args, text, unavailable
from party_sync.core import votes
from party_sync.core.events import Event
from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.errors import BackendUnavailable, VoteConflict

if TYPE_CHECKING:
    from party_sync.backends.redis_backend import RedisBackend

T = TypeVar("T")
TRIES = 20  # optimistic retries under contention before giving up (retryable for the caller)


def _load(fields: Mapping[Any, Any], ballots: Mapping[Any, Any]) -> votes.Vote | None:
    if not fields:
        return None
    f = {text(k): text(v) for k, v in fields.items()}
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

    def __init__(self, b: RedisBackend, pipe: Pipeline, party_id: str, now: float) -> None:
        self.b, self.pipe, self.party_id, self.now = b, pipe, party_id, now
        self.messages: list[dict[str, Any]] = []

    async def publish(self, message: dict[str, Any]) -> None:
        """Queue ``publish.lua`` for one event (inside MULTI)."""
        type_, payload = message["type"], message["payload"]
        args = [codec.encode(message), type_, *fold_args(type_, payload)]
        await self.b.scripts.run("publish", self.party_id, self.now, args, client=self.pipe)
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


async def _transact(
    b: RedisBackend,
    party_id: str,
    now: float,
    decide: Callable[[_Txn, votes.Vote | None, list[str]], Awaitable[T]],
) -> T:
    keys = b.keys.party_keys(party_id)
    online_key, vote_key, ballots_key = keys[4], keys[9], keys[10]
    async with unavailable("vote"):
        for _ in range(TRIES):
            async with b.client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(vote_key, ballots_key, online_key)
                    vote = _load(await pipe.hgetall(vote_key), await pipe.hgetall(ballots_key))
                    online = sorted(text(c) for c in await pipe.smembers(online_key))
                    pipe.multi()  # type: ignore[no-untyped-call]
                    return await decide(_Txn(b, pipe, party_id, now), vote, online)
                except WatchError:
                    continue
    raise BackendUnavailable("vote: too much contention, retry")


async def party_run(b: RedisBackend, party_id: str) -> str | None:
    async with unavailable("party_run"):
        run = await b.client.hget(b.keys.party_keys(party_id)[0], "run")
    return text(run) if run is not None else None


async def start_vote(
    b: RedisBackend, party_id: str, spec: votes.VoteSpec, run: str, now: float, trace_id: str
) -> Event:
    async def decide(txn: _Txn, current: votes.Vote | None, online: list[str]) -> Event:
        if current is not None and not current.finished:
            raise VoteConflict(f"party {party_id} already has an open vote")
        if current is not None and current.vote_id == spec.vote_id:
            raise VoteConflict(f"vote {spec.vote_id} already ran")
        vote = votes.open_vote(spec, now, trace_id, run)
        payload = votes.started_payload(vote, codec.rfc3339(vote.deadline))
        keys = b.keys.party_keys(party_id)
        txn.pipe.delete(keys[10], keys[9])  # the last vote's record goes with its ballots
        txn.pipe.hset(
            keys[9],
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
        await txn.publish(codec.envelope(t.VOTE_STARTED, payload, ts=now, trace_id=trace_id))
        events = txn.events(await txn.pipe.execute())
        await b.client.zadd(b.keys.vote_index(), {party_id: vote.deadline})
        return events[0]

    return await _transact(b, party_id, now, decide)


def _record_finish(txn: _Txn, vote_key: str, finished: dict[str, Any], now: float) -> None:
    """Closed, in the same transaction: the ``vote.finished`` body is kept until its action has
    been handed to the engine (``mark_vote_applied``), so that any node can hand it over if the
    one that closed it could not (``unapplied_votes``): a decision announced is never lost."""
    txn.pipe.hset(
        vote_key,
        mapping={
            "finished": "1",
            "finished_at": repr(now),
            "finished_body": codec.encode(finished),
        },
    )


def _finished(vote: votes.Vote, reason: str, now: float) -> dict[str, Any]:
    outcome = votes.decide(vote, reason)
    payload = votes.finished_payload(vote, outcome)
    return codec.envelope(t.VOTE_FINISHED, payload, ts=now, trace_id=vote.trace_id)


async def cast_vote(
    b: RedisBackend,
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
        keys = b.keys.party_keys(party_id)
        txn.pipe.hset(keys[10], character_id, option)
        update = votes.update_payload(vote, len(online))
        await txn.publish(codec.envelope(t.VOTE_UPDATE, update, ts=now, trace_id=trace_id))
        if votes.due(vote, online, now) == "all_voted":
            finished = _finished(vote, "all_voted", now)
            await txn.publish(finished)
            _record_finish(txn, keys[9], finished, now)
        return None, txn.events(await txn.pipe.execute())

    return await _transact(b, party_id, now, decide)


async def finish_vote(b: RedisBackend, party_id: str, vote_id: str, now: float) -> Event | None:
    async def decide(txn: _Txn, vote: votes.Vote | None, online: list[str]) -> Event | None:
        if vote is None or vote.vote_id != vote_id or votes.due(vote, (), now) != "timeout":
            return None
        finished = _finished(vote, "timeout", now)
        await txn.publish(finished)
        _record_finish(txn, b.keys.party_keys(party_id)[9], finished, now)
        return txn.events(await txn.pipe.execute())[0]

    return await _transact(b, party_id, now, decide)


async def due_votes(b: RedisBackend, now: float) -> list[tuple[str, str]]:
    """Open votes past their deadline; applied or vanished ones leave the index (a finished vote
    whose action was not handed over yet stays: ``unapplied_votes``)."""
    index = b.keys.vote_index()
    async with unavailable("due_votes"):
        parties = [text(p) for p in await b.client.zrangebyscore(index, "-inf", now)]
        if not parties:
            return []
        async with b.client.pipeline(transaction=False) as pipe:
            for party_id in parties:
                pipe.hmget(
                    b.keys.party_keys(party_id)[9], ["vote_id", "finished", "deadline", "applied"]
                )
            found = await pipe.execute()
        due: list[tuple[str, str]] = []
        gone: list[str] = []
        for party_id, (vote_id, finished, deadline, applied) in zip(parties, found, strict=True):
            if vote_id is None or (finished == b"1" and applied == b"1"):
                gone.append(party_id)
            elif finished != b"1" and float(deadline) <= now:
                due.append((party_id, text(vote_id)))
        if gone:
            await b.client.zrem(index, *gone)
    return due


async def vote_run(b: RedisBackend, party_id: str, vote_id: str) -> str | None:
    async with unavailable("vote_run"):
        found, run = await b.client.hmget(b.keys.party_keys(party_id)[9], ["vote_id", "run"])
    if found is None or text(found) != vote_id:
        return None
    return text(run) if run else await party_run(b, party_id)


async def unapplied_votes(b: RedisBackend, now: float, older_than: float) -> list[Event]:
    """``vote.finished`` of votes closed at least ``older_than`` ago whose action was not handed
    to the engine (the node that closed it failed or died meanwhile); seq 0 (not re-sequenced)."""
    index = b.keys.vote_index()
    async with unavailable("unapplied_votes"):
        parties = [text(p) for p in await b.client.zrangebyscore(index, "-inf", "+inf")]
        if not parties:
            return []
        async with b.client.pipeline(transaction=False) as pipe:
            for party_id in parties:
                pipe.hmget(
                    b.keys.party_keys(party_id)[9],
                    ["finished", "applied", "finished_at", "finished_body"],
                )
            found = await pipe.execute()
    events: list[Event] = []
    for party_id, (finished, applied, at, body) in zip(parties, found, strict=True):
        if finished != b"1" or applied == b"1" or body is None or at is None:
            continue
        if float(at) > now - older_than:
            continue
        message = codec.decode(body)
        events.append(
            Event(party_id, 0, message["type"], message["payload"], message["trace_id"], body)
        )
    return events


async def mark_vote_applied(b: RedisBackend, party_id: str, vote_id: str) -> None:
    key = b.keys.party_keys(party_id)[9]
    async with unavailable("mark_vote_applied"):
        current = await b.client.hget(key, "vote_id")
        if current is not None and text(current) == vote_id:
            await b.client.hset(key, "applied", "1")
            await b.client.zrem(b.keys.vote_index(), party_id)
