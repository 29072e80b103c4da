"""The action ledger behind ``Backend`` where the generated stories of ``test_differential.py``
do not reach (the ledger's rules are ``core/actions.py``'s, tested in ``core/test_actions.py``; the
differential test holds Redis's scripts to them):

- a party the backend knows nothing of (the stories' parties always exist);
- what is logged when an engine's result replaces a refusal (the stories compare answers, not logs);
- a repeated result being the very same bytes on one backend (the stories compare JSON);
- on Redis only: a ``begin_action`` that Redis runs after a stall longer than the command timeout
  must not leave an action in flight that no engine was ever given, and a node whose clock is off
  by seconds still accepts actions.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from party_sync.backends.base import Backend, BackendSettings
from party_sync.backends.memory import MemoryBackend
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.core.actions import Claim, Decision, Sweep, Verdict
from party_sync.protocol import codec
from party_sync.protocol.errors import BackendUnavailable, ErrorCode
from ps_testkit.redis_server import RedisServer

TIMEOUT = 2.0
SETTINGS = BackendSettings(history_size=50, action_timeout=TIMEOUT)
TRACE = "0" * 32
PARTY = "p1"
# The callers' clock (``now``), moved by hand; begin_action.lua judges staleness by the node's own
# wall clock, and an hour ahead of it keeps these tests clear of that check whichever clock it
# uses. A whole second, so that deadlines are exact in the scripts' fixed-point rendering too.
T0 = float(int(time.time()) + 3600)
DEADLINE = T0 + TIMEOUT  # of an action begun at T0
TIMED_OUT = codec.encode(
    codec.envelope(
        "system.error",
        {"code": "action_timeout", "message": "no answer in time"},
        ts=T0,
        trace_id=TRACE,
    )
)
FAILED = b'{"type":"system.error","payload":{"code":"engine_failed"}}'


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


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend(SETTINGS)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    server.command("FLUSHALL")
    shared = RedisBackend(RedisOptions(server.url), SETTINGS)
    await shared.start()
    try:
        yield shared
    finally:
        await shared.close()


async def test_claim_without_a_record_goes_by_the_deadline_the_action_carries(
    backend: Backend,
) -> None:
    b = backend

    async def claims() -> list[tuple[Claim, bytes | str | None]]:
        return [
            await b.claim_action(PARTY, "a1", T0, TIMED_OUT, None),
            await b.claim_action(PARTY, "a1", DEADLINE, TIMED_OUT, DEADLINE),
            await b.claim_action(PARTY, "a1", DEADLINE + 0.5, TIMED_OUT, DEADLINE),
        ]

    expected = [(Claim.START, None), (Claim.START, None), (Claim.EXPIRED, None)]
    assert await claims() == expected  # the party's state is unknown (lost)
    assert await b.begin_action(PARTY, "borin", "b1", T0) == Verdict(Decision.ACCEPT)
    assert await claims() == expected  # the party is known, this action is not
    # none of it left a record
    assert await b.time_out_action(PARTY, "a1", DEADLINE + 1, TIMED_OUT) == (Sweep.GONE, None)
    assert await b.begin_action(PARTY, "aria", "a1", T0) == Verdict(Decision.ACCEPT)


async def test_an_action_claimed_on_acceptance_is_started_not_timed_out(backend: Backend) -> None:
    """``begin_action(claimed=True)`` (the in-process link's acceptance) is begin and claim in one
    step: the deadline's sweep frees the character and refuses nothing, a claim says START, and
    the engine's answer is the one final answer. Without it the same sweep refuses the action."""
    b = backend
    assert await b.begin_action(PARTY, "aria", "a1", T0, claimed=True) == Verdict(Decision.ACCEPT)
    assert await b.begin_action(PARTY, "borin", "b1", T0) == Verdict(Decision.ACCEPT)
    assert await b.time_out_action(PARTY, "a1", DEADLINE + 1, TIMED_OUT) == (Sweep.STARTED, None)
    assert await b.time_out_action(PARTY, "b1", DEADLINE + 1, TIMED_OUT) == (
        Sweep.TIMED_OUT,
        None,
    )
    assert await b.claim_action(PARTY, "a1", DEADLINE + 1, TIMED_OUT, DEADLINE) == (
        Claim.START,
        None,
    )
    assert await b.begin_action(PARTY, "aria", "a2", DEADLINE + 1) == Verdict(Decision.ACCEPT)
    again = await b.begin_action(PARTY, "aria", "a1", DEADLINE + 1)
    assert again == Verdict(Decision.IN_FLIGHT)
    assert again.began == T0  # when it was accepted: a node meeting the resend watches its age


async def test_time_out_of_an_unknown_action_is_gone(backend: Backend) -> None:
    assert await backend.time_out_action("nowhere", "a1", T0, TIMED_OUT) == (Sweep.GONE, None)
    await backend.begin_action(PARTY, "aria", "a1", T0)
    assert await backend.time_out_action(PARTY, "zzz", T0, TIMED_OUT) == (Sweep.GONE, None)


async def test_a_second_result_of_one_action_is_not_published_again(backend: Backend) -> None:
    b = backend
    await b.begin_action(PARTY, "aria", "a1", T0)
    first = await b.publish(PARTY, result("a1"), T0 + 1)
    again = await b.publish(PARTY, result("a1"), T0 + 2)  # an engine's redelivery
    assert (again.seq, again.data) == (first.seq, first.data)
    assert (await b.snapshot(PARTY)).seq == first.seq  # nothing was sequenced the second time
    assert await b.begin_action(PARTY, "aria", "a1", T0 + 3) == Verdict(
        Decision.DONE, result=first.data
    )
    # a result for an action never begun (a party-level one) is remembered too; it takes no lock
    vote = await b.publish(PARTY, result("vote:v1", "party"), T0 + 3)
    assert vote.seq == first.seq + 1
    assert await b.begin_action(PARTY, "party", "vote:v1", T0 + 4) == Verdict(
        Decision.DONE, result=vote.data
    )
    assert await b.begin_action(PARTY, "party", "p2", T0 + 4) == Verdict(Decision.ACCEPT)


async def test_a_result_after_a_refusal_replaces_it_and_is_logged(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    # the engine ignored the deadline it was given: what it did is the truth, and is published
    b = backend
    await b.begin_action(PARTY, "aria", "a1", T0)
    assert await b.time_out_action(PARTY, "a1", DEADLINE, TIMED_OUT) == (Sweep.TIMED_OUT, None)
    with caplog.at_level(logging.WARNING, logger="party_sync"):
        event = await b.publish(PARTY, result("a1"), DEADLINE + 1)
        again = await b.publish(PARTY, result("a1"), DEADLINE + 2)
    assert event.seq == 1 and (again.seq, again.data) == (1, event.data)
    replaced = [r for r in caplog.records if "had already refused" in r.getMessage()]
    assert len(replaced) == 1, caplog.records
    done = Verdict(Decision.DONE, result=event.data)
    assert await b.begin_action(PARTY, "aria", "a1", DEADLINE + 3) == done
    assert await b.claim_action(PARTY, "a1", DEADLINE + 3, TIMED_OUT, DEADLINE) == (
        Claim.FINAL,
        event.data,
    )
    assert await b.time_out_action(PARTY, "a1", DEADLINE + 3, TIMED_OUT) == (
        Sweep.FINAL,
        event.data,
    )
    assert await b.refuse_action(PARTY, "a1", "aria", FAILED, DEADLINE + 3) is None
    assert await b.begin_action(PARTY, "aria", "a1", DEADLINE + 4) == done
    assert await b.begin_action(PARTY, "aria", "a2", DEADLINE + 4) == Verdict(Decision.ACCEPT)


async def test_an_expired_claim_and_a_refusal_name_the_sender_of_the_record(
    backend: Backend,
) -> None:
    """The server API's claim and refusal name their action in an envelope from outside, whose
    character may not be the sender (API probe: a refusal naming borin sent borin the error for
    aria's action). Both answer with the record's character, and the publisher tells that one;
    without a record, the one the caller names (its action's, as the entry says)."""
    from party_sync.protocol.schemas import Contracts
    from party_sync.publishing import BackendPublisher
    from ps_testkit.hosts import make_action

    b = backend
    assert await b.begin_action(PARTY, "aria", "a1", T0) == Verdict(Decision.ACCEPT)
    assert await b.begin_action(PARTY, "borin", "b1", T0) == Verdict(Decision.ACCEPT)
    assert await b.claim_action(PARTY, "a1", DEADLINE + 1, TIMED_OUT, DEADLINE) == (
        Claim.EXPIRED,
        "aria",
    )
    assert await b.refuse_action(PARTY, "b1", "aria", FAILED, T0 + 1) == "borin"
    assert await b.refuse_action(PARTY, "b1", "aria", FAILED, T0 + 2) is None  # answered
    assert await b.claim_action(PARTY, "z1", DEADLINE + 1, TIMED_OUT, DEADLINE) == (
        Claim.EXPIRED,
        None,
    )
    assert await b.refuse_action(PARTY, "z2", "cara", FAILED, T0 + 1) == "cara"

    told: list[str] = []

    async def send_direct(party_id: str, character_id: str, data: bytes) -> None:
        told.append(character_id)

    b.send_direct = send_direct  # type: ignore[method-assign]
    assert await b.begin_action(PARTY, "aria", "a2", T0 + 1) == Verdict(Decision.ACCEPT)
    assert await b.begin_action(PARTY, "borin", "b2", T0 + 1) == Verdict(Decision.ACCEPT)
    publisher = BackendPublisher(b, Contracts(), lambda: DEADLINE + 2)
    claimed = make_action("a2", character_id="borin", deadline=DEADLINE + 1, party_id=PARTY)
    assert await publisher.claim(claimed, trusted=False) is Claim.EXPIRED
    refused = make_action("b2", character_id="aria", party_id=PARTY)
    assert await publisher.refuse(refused, ErrorCode.ENGINE_ERROR, "failed") is True
    assert told == ["aria", "borin"]


async def test_a_claim_with_no_record_long_after_its_acceptance_tells_its_sender_nothing(
    backend: Backend,
) -> None:
    """Backlog probe: an engine worker back after more than ``action_record_ttl`` found the
    entries of actions timed out long before, their records expired with their age, and told
    each sender ``action_timeout`` again: a second final answer, to a connection opened since.
    An action whose record may have outlived it is refused in silence; one whose record was
    lost (younger than the TTL: Redis restarted empty) is still told."""
    from party_sync.protocol.schemas import Contracts
    from party_sync.publishing import BackendPublisher
    from ps_testkit.hosts import ACCEPTED_AT, make_action

    told: list[str] = []

    async def send_direct(party_id: str, character_id: str, data: bytes) -> None:
        told.append(character_id)

    backend.send_direct = send_direct  # type: ignore[method-assign]
    ttl = 600.0
    for age, expected in ((ttl + 1, []), (ttl - 1, ["aria"])):
        told.clear()
        clock = functools.partial(float, ACCEPTED_AT + age)
        publisher = BackendPublisher(backend, Contracts(), clock, record_ttl=ttl)
        action = make_action(f"o-{age}", deadline=ACCEPTED_AT + TIMEOUT, party_id=PARTY)
        assert await publisher.claim(action) is Claim.EXPIRED  # never started, either way
        assert told == expected, age


# -- Redis only: a stall, a skewed clock -----------------------------------------------------------


async def _evalsha_calls(client: Any) -> int:
    stats: dict[str, Any] = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.mark.redis
async def test_a_begin_action_redis_runs_after_a_stall_leaves_no_action_in_flight(
    redis: RedisServer,
) -> None:
    """Redis stalls longer than the command timeout: the node gives up on ``begin_action`` (the
    player gets ``backend_unavailable``), and when Redis resumes it runs the call still in its
    socket buffer. Before the fix that left the action in flight, never given to an engine, and
    every resend got ``action_in_flight`` for the record's TTL."""
    b = RedisBackend(RedisOptions(redis.url, command_timeout=0.5), SETTINGS)
    await b.start()
    try:
        # warm up: scripts loaded, the script connection open (the call will sit in its buffer)
        assert await b.begin_action(PARTY, "borin", "b0", time.time()) == Verdict(Decision.ACCEPT)
        info: dict[str, Any] = await b.client.info("server")
        pid = int(info["process_id"])
        before = await _evalsha_calls(b.client)
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(BackendUnavailable):
                await b.begin_action(PARTY, "aria", "a1", time.time())
        finally:
            os.kill(pid, signal.SIGCONT)
        # Redis did run the late call (it was in the socket when the node gave up on it) ...
        async with asyncio.timeout(5):
            while await _evalsha_calls(b.client) < before + 1:  # noqa: ASYNC110 (bounded poll)
                await asyncio.sleep(0.01)
        # ... and refused it: no record, no lock
        assert await b.client.exists(b.keys.action(PARTY, "a1")) == 0
        async with asyncio.timeout(5):  # the resend (backend_unavailable until Redis answers
            while True:  # the node's probe: "later", as for a client)
                try:
                    verdict = await b.begin_action(PARTY, "aria", "a1", time.time())
                    break
                except BackendUnavailable:
                    await asyncio.sleep(0.05)
        assert verdict == Verdict(Decision.ACCEPT)
    finally:
        await b.close()


@pytest.mark.redis
async def test_a_node_whose_clock_is_off_by_seconds_still_accepts_actions(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: the stale check compares Redis's clock with the node's; a node 10 s
    behind must not refuse every action (nor one ahead accept late ones): the offset is measured."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 10.0)  # this node's clock, 10 s late
    b = RedisBackend(RedisOptions(redis.url, command_timeout=1.0), SETTINGS)
    await b.start()
    try:
        verdict = await b.begin_action(PARTY, "aria", "skewed", T0)
        assert verdict == Verdict(Decision.ACCEPT)
    finally:
        await b.close()


async def test_a_longer_deadline_holds_the_action_but_not_the_character(backend: Backend) -> None:
    """``deadline_in`` (a resend of an action whose record Redis lost: core/session.py
    ``_lost_deadline``): refused only at that deadline, the character's lock lapsing after
    action_timeout as usual; on both backends alike."""
    b = backend
    later = 10 * TIMEOUT
    assert await b.begin_action(PARTY, "aria", "a1", T0, deadline_in=later) == Verdict(
        Decision.ACCEPT
    )
    assert await b.time_out_action(PARTY, "a1", DEADLINE + 1, TIMED_OUT) == (Sweep.NOT_DUE, None)
    assert await b.begin_action(PARTY, "aria", "a2", DEADLINE + 1) == Verdict(Decision.ACCEPT)
    assert await b.time_out_action(PARTY, "a1", T0 + later + 1, TIMED_OUT) == (
        Sweep.TIMED_OUT,
        None,
    )


@pytest.mark.parametrize("given", [DEADLINE * 1000, DEADLINE + 100], ids=["in-ms", "later"])
async def test_a_claim_from_outside_with_another_deadline_records_the_timeout(
    backend: Backend, given: float
) -> None:
    """The server API's claim takes the deadline a foreign worker sends (one in milliseconds,
    say). Past the record's own deadline the claim is EXPIRED, and it recorded the empty marker
    the publisher passes when it believes the action is not late: every member got an empty
    frame instead of action_timeout, and every resend too (reverify engine probe)."""
    from party_sync.protocol.schemas import Contracts
    from party_sync.publishing import BackendPublisher
    from ps_testkit.hosts import make_action

    assert await backend.begin_action(PARTY, "aria", "a1", T0) == Verdict(Decision.ACCEPT)
    publisher = BackendPublisher(backend, Contracts(), lambda: DEADLINE + 1)
    action = make_action("a1", deadline=given, party_id=PARTY)
    assert await publisher.claim(action, trusted=False) is Claim.EXPIRED
    claim, answer = await backend.claim_action(PARTY, "a1", DEADLINE + 2, b"x", DEADLINE)
    assert claim is Claim.FINAL and answer is not None
    assert codec.decode(answer)["payload"]["code"] == "action_timeout"


async def test_a_refusal_made_while_its_character_is_connected_is_told_on_both_backends(
    backend: Backend,
) -> None:
    """A refusal that reached a live connection of its character as it was made is ``TOLD`` at
    the deadline (no connection opened since is owed it); one made while the character had none
    is ``FINAL`` (the deadline's look tells whoever connects)."""
    from party_sync.core.binding import Binding

    b = backend
    aria = Binding(PARTY, "r1", "aria", "Aria")
    await b.connect(aria, "c1", T0, TRACE)
    for character, action_id in (("aria", "a1"), ("borin", "b1")):
        assert await b.begin_action(PARTY, character, action_id, T0) == Verdict(Decision.ACCEPT)
        assert await b.refuse_action(PARTY, action_id, character, FAILED, T0 + 1) == character
    assert await b.time_out_action(PARTY, "a1", DEADLINE, TIMED_OUT) == (Sweep.TOLD, FAILED)
    assert await b.time_out_action(PARTY, "b1", DEADLINE, TIMED_OUT) == (Sweep.FINAL, FAILED)


async def test_a_look_at_an_action_tells_its_answer_and_claimer_and_changes_nothing(
    backend: Backend,
) -> None:
    """``action_answered`` (the HTTP link's look between retries when the engine host claims
    for itself) is True for any final answer: a result, and a refusal such as the deadline's
    ``action_timeout`` (on Redis it read only results: a timed-out action looked unanswered);
    ``action_claimer`` names the node a claim named (Redis; one process records none). Neither
    starts or refuses anything."""
    b = backend
    for action_id, character in (("a1", "aria"), ("b1", "borin"), ("c1", "cora")):
        assert await b.begin_action(PARTY, character, action_id, T0) == Verdict(Decision.ACCEPT)
    assert not await b.action_answered(PARTY, "a1")
    assert await b.action_claimer(PARTY, "a1") is None
    assert not await b.action_answered("nowhere", "a1")
    await b.publish(PARTY, result("a1"), T0 + 1)
    assert await b.action_answered(PARTY, "a1")
    assert await b.time_out_action(PARTY, "b1", DEADLINE + 1, TIMED_OUT) == (Sweep.TIMED_OUT, None)
    assert await b.action_answered(PARTY, "b1")
    assert await b.claim_action(PARTY, "c1", T0 + 1, TIMED_OUT, DEADLINE, "node-7") == (
        Claim.START,
        None,
    )
    assert not await b.action_answered(PARTY, "c1")
    claimer = await b.action_claimer(PARTY, "c1")
    assert claimer == ("node-7" if isinstance(b, RedisBackend) else None)
    # the looks changed nothing: c1 is started (not timed out at its deadline)
    assert await b.time_out_action(PARTY, "c1", DEADLINE + 1, TIMED_OUT) == (Sweep.STARTED, None)
