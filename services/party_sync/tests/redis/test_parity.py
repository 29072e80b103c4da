"""One behaviour, two backends: the same story played on ``MemoryBackend`` and ``RedisBackend``
gives the same events (seq, type, payload), verdicts and snapshots (issue 3; the Redis scripts
render the pure rules of ``party_sync.core``, this keeps them in step). Votes are checked across
two Redis nodes, where "exactly once" has teeth."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from party_sync.backends.base import Backend, BackendSettings
from party_sync.backends.memory import MemoryBackend
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.core.binding import Binding
from party_sync.core.events import Event
from party_sync.core.history import ResumePoint
from party_sync.core.votes import VoteSpec
from party_sync.protocol import codec
from party_sync.protocol.errors import VoteConflict
from ps_testkit.redis_server import RedisServer

pytestmark = pytest.mark.redis

SETTINGS = BackendSettings(history_size=50, presence_ttl=10.0, action_timeout=2.0)
ARIA = Binding("p1", "r1", "aria", "Aria")
BORIN = Binding("p1", "r1", "borin", "Borin")
T0 = 1_800_000_000.0
TRACE = "0" * 32


def result(action_id: str, character_id: str = "aria") -> dict[str, Any]:
    payload = {
        "action_id": action_id,
        "character_id": character_id,
        "action_type": "skill_check",
        "outcome": "success",
        "state": {"hp": 9, "max_hp": 10, "effects": [], "scene_flags": {}},
        "narration": "Done.",
    }
    return codec.envelope("action.result", payload, ts=T0, trace_id=TRACE)


def message(type_: str, payload: dict[str, Any]) -> dict[str, Any]:
    return codec.envelope(type_, payload, ts=T0, trace_id=TRACE)


SCENE = {
    "scene_number": 2,
    "scene_id": "gate",
    "title": "The Gate",
    "narration": "A gate.",
    "options": [{"id": "A", "label": "Open"}],
    "kind": "story",
}
STATE = {"status": "active", "run_status": "running", "scene_number": 2, "turn": 3}


async def story(b: Backend) -> list[Any]:
    """Everything a backend answers, as comparable data."""
    out: list[Any] = []

    def ev(event: Event | None) -> Any:
        return None if event is None else (event.seq, event.type, dict(event.payload))

    out.append(ev(await b.connect(ARIA, "c1", T0, TRACE)))
    out.append(ev(await b.connect(BORIN, "c2", T0, TRACE)))
    out.append(ev(await b.connect(ARIA, "c3", T0, TRACE)))  # a second tab: no join
    out.append(await b.begin_action("p1", "aria", "a1", T0))
    out.append(await b.begin_action("p1", "aria", "a1", T0))  # in flight
    out.append(await b.begin_action("p1", "aria", "a2", T0))  # busy
    done = await b.publish("p1", result("a1"), T0)
    out.append(ev(done))
    repeat = await b.begin_action("p1", "aria", "a1", T0 + 1)
    out.append((repeat.decision, repeat.result == done.data))  # the same bytes
    out.append(ev(await b.publish("p1", result("a1"), T0 + 1)))  # a second result: not re-sent
    out.append(ev(await b.publish("p1", message("scene.update", SCENE), T0)))
    out.append(ev(await b.publish("p1", message("party.state", STATE), T0)))
    out.append(await b.begin_action("p1", "borin", "b1", T0))
    out.append(await b.time_out_action("p1", "b1", T0 + 1, b"T1"))  # too early
    out.append(await b.time_out_action("p1", "b1", T0 + 3, b"T1"))  # nobody started it
    out.append(await b.time_out_action("p1", "b1", T0 + 3, b"T2"))  # its answer: the first
    out.append(await b.claim_action("p1", "b1", T0 + 3, b"E", None))  # never starts now
    out.append(await b.begin_action("p1", "borin", "b1", T0 + 3))  # a resend: the refusal
    out.append(await b.begin_action("p1", "borin", "b2", T0 + 3))
    out.append(await b.claim_action("p1", "b2", T0 + 3, b"E", None))  # started
    out.append(await b.claim_action("p1", "b2", T0 + 3, b"E", None))  # a redelivery
    out.append(await b.time_out_action("p1", "b2", T0 + 6, b"T"))  # started: not refused
    out.append(await b.refuse_action("p1", "b2", "borin", b"R", T0 + 6))
    out.append(await b.refuse_action("p1", "b2", "borin", b"R2", T0 + 6))  # once
    out.append(await b.begin_action("p1", "borin", "b2", T0 + 6))  # the refusal again
    out.append(await b.begin_action("p1", "borin", "b3", T0 + 6))  # the character is free
    spec = VoteSpec("v1", "Which way?", (("L", "Left"), ("R", "Right")), 30.0)
    out.append(ev(await b.start_vote("p1", spec, "r1", T0, TRACE)))
    out.append((await b.snapshot("p1")).ballots)
    refusal, events = await b.cast_vote("p1", "aria", "v1", "X", T0, TRACE)
    out.append((refusal, [ev(e) for e in events]))
    refusal, events = await b.cast_vote("p1", "aria", "v1", "R", T0, TRACE)
    out.append((refusal, [ev(e) for e in events]))
    out.append((await b.snapshot("p1")).ballots)
    refusal, events = await b.cast_vote("p1", "borin", "v1", "L", T0, TRACE)
    out.append((refusal, [ev(e) for e in events]))  # everyone voted: finished
    out.append(await b.vote_run("p1", "v1"))
    out.append(await b.finish_vote("p1", "v1", T0 + 60))  # already finished
    out.append(await b.disconnect(ARIA, "c1", T0))  # a tab is left
    out.append(await b.disconnect(ARIA, "c3", T0))
    out.append(ev(await b.settle(ARIA, T0 + 1, TRACE)))
    out.append(ev(await b.settle(ARIA, T0 + 1, TRACE)))  # once
    out.append(ev(await b.leave(BORIN, T0 + 2, TRACE)))
    snap = await b.snapshot("p1")
    out.append((snap.seq, snap.members, snap.scene, snap.party_state, snap.vote, snap.status))
    replay = await b.replay("p1", ResumePoint(snap.epoch, 3), 100)
    out.append([codec.decode(d)["seq"] for d in replay or ()])
    out.append(await b.replay("p1", ResumePoint(snap.epoch, 3), 2))  # too many: None
    out.append(await b.run_parties("r1"))
    out.append(await b.party_run("p1"))
    return out


async def test_memory_and_redis_tell_the_same_story(redis: RedisServer) -> None:
    memory = MemoryBackend(SETTINGS)
    shared = RedisBackend(RedisOptions(redis.url), SETTINGS)
    await shared.start()
    try:
        assert await story(shared) == await story(memory)
    finally:
        await shared.close()


async def test_a_vote_across_nodes_finishes_exactly_once(redis: RedisServer) -> None:
    n1 = RedisBackend(RedisOptions(redis.url), SETTINGS)
    n2 = RedisBackend(RedisOptions(redis.url), SETTINGS)
    await n1.start()
    await n2.start()
    try:
        now = time.time()
        await n1.connect(ARIA, "c1", now, TRACE)
        await n2.connect(BORIN, "c2", now, TRACE)
        spec = VoteSpec("v1", "Which way?", (("L", "Left"), ("R", "Right")), 0.5)
        await n1.start_vote("p1", spec, "r1", now, TRACE)
        with pytest.raises(VoteConflict):
            await n2.start_vote("p1", spec, "r1", now, TRACE)
        refusal, events = await n2.cast_vote("p1", "borin", "v1", "L", now, TRACE)
        assert refusal is None and [e.type for e in events] == ["vote.update"]
        later = now + 1
        assert await n1.due_votes(later) == [("p1", "v1")]
        finished = await asyncio.gather(
            *(b.finish_vote("p1", "v1", later) for b in (n1, n2, n1, n2))
        )
        winners = [e for e in finished if e is not None]
        assert len(winners) == 1 and winners[0].payload["reason"] == "timeout"
        assert winners[0].payload["winner"] == "L"
        assert await n2.due_votes(later) == []
        refusal, _ = await n1.cast_vote("p1", "aria", "v1", "R", later, TRACE)
        assert refusal is not None and refusal.value == "vote_closed"
    finally:
        await n1.close()
        await n2.close()
