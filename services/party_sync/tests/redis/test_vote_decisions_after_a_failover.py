"""A finished vote's decision still waiting to be handed over survives the rollback fence.

With an in-process or HTTP link a node keeps a handed-over vote's decision in the party's
``unapplied`` hash until its votes sweep confirms it (``executor._volatile_votes``). After a
failover the fence deletes every ``meta`` (and with it the party's recorded run, written again
only when a member connects), and the party's vote record may by then be a newer vote's: the sweep
found no run for the decision, logged ERROR "finished vote without a run" and dropped it (Sentinel
probe, in-process engine: every vote finished shortly before a failover). The run is kept with the
decision itself."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from party_sync.backends.base import BackendSettings
from party_sync.backends.keys import KeySpace
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.core.votes import VoteSpec
from party_sync.metrics import Metrics
from party_sync.protocol import codec
from party_sync.protocol.errors import VoteConflict
from ps_testkit.redis_server import RedisServer
from redis.asyncio import Redis

pytestmark = [pytest.mark.redis]

KEYS = KeySpace()
OPTIONS = (("L", "Left"), ("R", "Right"))
SCENE = {"scene_number": 1, "scene_id": "s1", "title": "T", "narration": "N"}


@contextlib.asynccontextmanager
async def party(
    url: str, party_id: str, now: float, admin_url: str | None = None
) -> AsyncIterator[tuple[RedisBackend, Redis]]:
    """A started backend on ``url`` with the party ``party_id`` (its first scene published at
    ``now``), and a plain client (on ``admin_url``, else ``url``); both closed at the end."""
    b = RedisBackend(RedisOptions(url), BackendSettings(), metrics=Metrics("test"))
    await b.start()
    client = Redis.from_url(admin_url or url)
    try:
        await b.publish(party_id, codec.envelope("scene.update", SCENE, ts=now), now)
        yield b, client
    finally:
        await client.aclose()
        await b.close()


async def test_a_kept_decision_knows_its_run_after_the_fence_and_a_newer_vote(
    redis: RedisServer,
) -> None:
    now = time.time()
    async with party(redis.url, "p1", now) as (b, client):
        await b.start_vote("p1", VoteSpec("v1", "Which way?", OPTIONS, 0.1), "r1", now, "t1")
        finished = await b.finish_vote("p1", "v1", now + 1)
        assert finished is not None and finished.type == "vote.finished"
        # a newer vote replaces the party's vote record (the decision of v1 is still kept)
        await b.start_vote("p1", VoteSpec("v2", "And now?", OPTIONS, 30), "r1", now + 2, "t2")
        await client.delete(KEYS.party_keys("p1").meta)  # as the fence does on a new master
        # the new epoch's first event (it drops the vote record with the old epoch's state)
        await b.publish("p1", codec.envelope("scene.update", SCENE, ts=now + 3), now + 3)
        assert await b.party_run("p1") is None
        assert await b.vote_run("p1", "v1") == "r1"
        (kept,) = await b.unapplied_votes(now + 60, older_than=0)
        assert kept.payload["vote_id"] == "v1"


async def test_a_vote_whose_transaction_ran_unannounced_is_still_swept(redis: RedisServer) -> None:
    """Docs probe: ``multi`` taken from a running user makes Redis run a vote's transaction one
    command at a time and refuse only its EXEC. The start then failed before it indexed the
    party, so no sweep ever finished the vote or handed its decision over, even after ``multi``
    was given back. The party is indexed before anything of the vote is written."""
    redis.command("ACL", "SETUSER", "voter", "on", ">pw-voter-1", "~*", "&*", "+@all")
    url = f"redis://voter:pw-voter-1@127.0.0.1:{redis.port}/0"
    now = time.time()
    try:
        async with party(url, "p1", now, admin_url=redis.url) as (b, admin):
            await voted_without_multi(redis, b, admin, now)
    finally:
        redis.command("ACL", "DELUSER", "voter")


async def voted_without_multi(
    redis: RedisServer, b: RedisBackend, admin: Redis, now: float
) -> None:
    """(The test above, with ``voter`` made and later deleted around it.)"""
    redis.command("ACL", "SETUSER", "voter", "-multi")
    with pytest.raises(Exception, match="redis refused vote"):
        await b.start_vote("p1", VoteSpec("v1", "Which way?", OPTIONS, 5), "r1", now, "t1")
    redis.command("ACL", "SETUSER", "voter", "+multi")
    assert await admin.hget(KEYS.party_keys("p1").vote, "vote_id") == b"v1"  # it ran
    assert await b.due_votes(now + 1) == []  # not due yet
    assert await b.due_votes(now + 6) == [("p1", "v1")]  # the sweep finds it
    finished = await b.finish_vote("p1", "v1", now + 6)
    assert finished is not None and finished.payload["reason"] == "timeout"
    (kept,) = await b.unapplied_votes(now + 60, older_than=0)  # and its decision
    assert kept.payload["vote_id"] == "v1"


@pytest.mark.parametrize("closed_by", ["deadline", "all_voted"])
async def test_a_vote_closed_as_the_first_event_of_a_new_epoch_leaves_the_party_able_to_vote(
    redis: RedisServer, closed_by: str
) -> None:
    """Sentinel probe: a vote that closed as the first event of a new epoch (the fence had
    deleted ``meta``) left a vote record of ``finished`` alone (written after the publish that
    dropped the record with the old epoch); every later vote, ballot and sweep of the party then
    failed (KeyError 'spec': 500s, tracebacks) for as long as it played."""
    now = time.time()
    async with party(redis.url, "p1", now) as (b, client):
        await client.sadd(KEYS.party_keys("p1").online, "aria")
        await b.start_vote("p1", VoteSpec("v1", "Which way?", OPTIONS, 2), "r1", now, "t1")
        await client.delete(KEYS.party_keys("p1").meta)  # as the fence does on a new master
        if closed_by == "deadline":
            finished = await b.finish_vote("p1", "v1", now + 3)
            assert finished is not None
        else:
            refusal, events = await b.cast_vote("p1", "aria", "v1", "L", now + 1, "t2")
            assert refusal is None and events[-1].type == "vote.finished"
        record = await client.hgetall(KEYS.party_keys("p1").vote)
        assert b"finished" not in record or b"spec" in record, record  # never a part of one
        await b.start_vote("p1", VoteSpec("v2", "And now?", OPTIONS, 30), "r1", now + 4, "t3")
        assert await b.cast_vote("p1", "aria", "v2", "R", now + 5, "t4") is not None
        (kept,) = await b.unapplied_votes(now + 60, older_than=0)  # the decision is kept
        assert kept.payload["vote_id"] == "v1"


async def test_a_part_of_a_vote_record_left_by_an_earlier_version_is_no_vote(
    redis: RedisServer,
) -> None:
    now = time.time()
    async with party(redis.url, "p2", now) as (b, client):
        await client.hset(KEYS.party_keys("p2").vote, mapping={"finished": "1", "finished_at": "1"})
        assert await b.finish_vote("p2", "v0", now) is None
        await b.start_vote("p2", VoteSpec("v1", "Which way?", OPTIONS, 30), "r1", now, "t1")
        assert await client.hget(KEYS.party_keys("p2").vote, "vote_id") == b"v1"


async def test_a_vote_started_as_the_first_event_of_a_new_epoch_can_be_voted_and_finishes(
    redis: RedisServer,
) -> None:
    """Re-check probe: a vote started just after a FLUSHALL (its ``vote.started`` the first event
    of the party's new epoch) had its record deleted by that very publish, which drops the old
    epoch's vote: announced and shown open, its ballots refused ``vote_unknown``, never finished,
    and the next vote not refused as a second one."""
    now = time.time()
    async with party(redis.url, "p3", now) as (b, client):
        keys = KEYS.party_keys("p3")
        await client.delete(keys.meta)  # as an emptied Redis (or a failover's fence) leaves it
        started = await b.start_vote(
            "p3", VoteSpec("v1", "Which way?", OPTIONS, 5), "r1", now, "t1"
        )
        assert started.type == "vote.started" and started.seq == 1  # it opened the epoch
        record = await client.hgetall(keys.vote)
        assert record[b"vote_id"] == b"v1" and b"spec" in record, record
        assert 0 < await client.pttl(keys.vote) <= 3_600_000  # it expires with the party
        with pytest.raises(VoteConflict):  # it is open: no second vote
            await b.start_vote("p3", VoteSpec("v2", "And?", OPTIONS, 5), "r1", now + 1, "t2")
        await client.sadd(keys.online, "aria", "bran")
        refusal, events = await b.cast_vote("p3", "aria", "v1", "L", now + 1, "t3")
        assert refusal is None and [e.type for e in events] == ["vote.update"]
        assert await b.due_votes(now + 6) == [("p3", "v1")]  # the sweep finds it
        finished = await b.finish_vote("p3", "v1", now + 6)
        assert finished is not None and finished.payload["winner"] == "L"
