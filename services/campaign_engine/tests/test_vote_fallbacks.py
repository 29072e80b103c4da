"""Party votes when things go wrong: no ``start_vote``, a failing one, a vote already open, a
redelivered action, events dropped, a restart. A vote never gets the game stuck."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import pytest
from campaign_engine.campaign import builtin_campaign
from campaign_engine.chronicle import SceneSummary
from campaign_engine.engine import ReferenceEngine, create_engine
from campaign_engine.state import RunState, VoteState
from campaign_engine.store import Decision, InMemoryRunStore, open_store
from campaign_engine.testing import (
    Published,
    PublishFailed,
    RecordingPublisher,
    action_request,
    join_notice,
)
from campaign_engine.votes import MAX_VOTE_ID, is_run_vote, vote_id_for
from party_sync.engine import ActionRequest, EngineRejected, EventPublisher

REFUSED = "The party is voting on this — cast your vote"
ROW = {"option": "row"}
OPTIONS = [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]


class PublishOnly:
    """A publisher from before votes: ``publish`` and ``reject``, no ``start_vote``."""

    def __init__(self, inner: RecordingPublisher) -> None:
        self.inner = inner

    async def publish(
        self, party_id: str, type: str, payload: Mapping[str, Any], *, trace_id: str | None = None
    ) -> int:
        return await self.inner.publish(party_id, type, payload, trace_id=trace_id)

    async def reject(self, action: ActionRequest, message: str) -> None:
        await self.inner.reject(action, message)


async def at_the_reef(
    engine: ReferenceEngine, publisher: Any, *, fail_next: int = 0, **row: Any
) -> None:
    """Start ``engine``; Aria and Bram join; Aria rows to the Reef Gate (``fail_next``: that
    many of the row's publishes fail)."""
    await engine.start(publisher)
    await engine.handle_join(join_notice("aria"))
    await engine.handle_join(join_notice("bram"))
    if fail_next:
        publisher.fail_next = fail_next
    await engine.handle_action(action_request("choice", ROW, **row))


async def vote_status(engine: ReferenceEngine) -> str | None:
    state = await engine.run_state("run-1")
    assert state is not None
    return state.vote.status if state.vote else None


async def test_without_start_vote_the_characters_choose(
    publisher: RecordingPublisher, caplog: pytest.LogCaptureFixture
) -> None:
    engine = ReferenceEngine(builtin_campaign(), seed=7)
    with caplog.at_level(logging.WARNING, logger="campaign_engine"):
        await at_the_reef(engine, cast(EventPublisher, PublishOnly(publisher)))
    assert "cannot start votes" in caplog.text
    assert await vote_status(engine) == "off"
    await engine.handle_action(action_request("choice", {"option": "wade"}))
    assert publisher.last("scene.update")["scene_id"] == "claws"


async def test_a_failing_start_vote_leaves_the_choice_to_the_characters(
    publisher: RecordingPublisher, caplog: pytest.LogCaptureFixture
) -> None:
    engine = ReferenceEngine(builtin_campaign(), seed=7)
    publisher.fail_next_vote = ConnectionError("party_sync is unreachable")
    with caplog.at_level(logging.WARNING, logger="campaign_engine"):
        await at_the_reef(engine, publisher)  # the action itself succeeds
    assert "could not be started" in caplog.text
    assert publisher.types()[-2:] == ["action.result", "scene.update"]
    assert await vote_status(engine) == "off"
    # had party_sync opened it after all, the party's choice would still be welcome
    await engine.handle_action(
        action_request("choice", {"option": "wade", "vote_id": "run-1.s2"}, character_id="party")
    )
    assert publisher.last("scene.update")["scene_id"] == "claws"
    assert await vote_status(engine) == "done"


async def test_a_vote_already_open_is_logged_and_waited_for_until_it_lapses(
    publisher: RecordingPublisher, caplog: pytest.LogCaptureFixture
) -> None:
    engine = ReferenceEngine(builtin_campaign(), seed=7)
    await publisher.start_vote("party-1", "Someone else's?", OPTIONS, 30, vote_id="other")
    with caplog.at_level(logging.INFO, logger="campaign_engine"):
        await at_the_reef(engine, publisher)  # at 21:04:05.123, a 60 s vote
    assert "a vote is open already" in caplog.text
    assert await vote_status(engine) == "open"
    assert publisher.open_vote("party-1") is not None
    with pytest.raises(EngineRejected, match=REFUSED):
        await engine.handle_action(
            action_request("choice", {"option": "wade"}, timestamp="2026-11-25T21:05:10.000Z")
        )
    with pytest.raises(EngineRejected, match=REFUSED):  # a minute past its deadline: waited
        await engine.handle_action(
            action_request("choice", {"option": "wade"}, timestamp="2026-11-25T21:06:06.000Z")
        )
    await engine.handle_action(  # 60 s + 300 s of grace later: the characters choose
        action_request("choice", {"option": "wade"}, timestamp="2026-11-25T21:10:06.000Z")
    )
    assert publisher.last("scene.update")["scene_id"] == "claws"


class CrashAfterPublishing(InMemoryRunStore):
    """Dies (once) instead of committing the emptied outbox: everything was published and the
    vote started, but the store still holds the outbox, as after a crash at that moment."""

    armed = True

    async def commit(
        self,
        state: RunState,
        decisions: Sequence[Decision] = (),
        summaries: Sequence[SceneSummary] = (),
    ) -> None:
        if self.armed and not decisions and not state.outbox and state.vote is not None:
            self.armed = False
            raise OSError("the engine died here")
        await super().commit(state, decisions, summaries)


async def test_a_redelivered_action_asks_for_its_vote_again_and_gets_a_conflict(
    publisher: RecordingPublisher,
) -> None:
    engine = ReferenceEngine(builtin_campaign(), seed=7, store=CrashAfterPublishing())
    with pytest.raises(OSError, match="died"):
        await at_the_reef(engine, publisher, action_id="a-row", trace_id="t-row")
    assert await vote_status(engine) == "requested"  # as stored before the crash
    started = publisher.open_vote("party-1")

    await engine.handle_action(action_request("choice", ROW, action_id="a-row", trace_id="t-row"))
    assert [r.vote_id for r in publisher.vote_requests] == ["run-1.s2", "run-1.s2"]
    assert publisher.open_vote("party-1") == started  # still the one vote
    assert await vote_status(engine) == "open"
    with pytest.raises(EngineRejected, match=REFUSED):
        await engine.handle_action(action_request("choice", {"option": "climb"}))
    await engine.handle_action(publisher.finish_vote("party-1", "wade"))
    assert publisher.last("scene.update")["scene_id"] == "claws"
    assert len(await engine.chronicle("run-1")) == 2  # row, the party's wade: each once


async def test_a_vote_dropped_with_unsendable_events_leaves_the_choice_to_the_characters(
    publisher: RecordingPublisher,
) -> None:
    engine = ReferenceEngine(builtin_campaign(), seed=7)
    with pytest.raises(PublishFailed):
        await at_the_reef(engine, publisher, fail_next=1)
    publisher.fail_next = 1  # the next action's retry of those leftovers fails too: dropped
    await engine.handle_action(action_request("skill_check", {}, character_id="bram"))
    assert publisher.vote_requests == []
    assert await vote_status(engine) == "off"
    await engine.handle_action(action_request("choice", {"option": "wade"}))
    assert publisher.last("scene.update")["scene_id"] == "claws"


async def test_a_leftover_vote_start_goes_out_with_the_next_action(
    publisher: RecordingPublisher,
) -> None:
    engine = ReferenceEngine(builtin_campaign(), seed=7)
    with pytest.raises(PublishFailed):
        await at_the_reef(engine, publisher, fail_next=1, trace_id="t-row")
    await engine.handle_action(action_request("skill_check", {}, character_id="bram"))
    [request] = publisher.vote_requests
    assert (request.vote_id, request.trace_id) == ("run-1.s2", "t-row")
    assert await vote_status(engine) == "open"


async def test_the_open_vote_survives_a_restart(
    durable_url: str, schema_check: Callable[[Published], None] | None
) -> None:
    first = RecordingPublisher(check=schema_check)
    engine = ReferenceEngine(builtin_campaign(), seed=7, store=open_store(durable_url))
    await at_the_reef(engine, first)
    await engine.close()

    second = RecordingPublisher(check=schema_check)
    engine = ReferenceEngine(builtin_campaign(), seed=7, store=open_store(durable_url))
    await engine.start(second)
    with pytest.raises(EngineRejected, match=REFUSED):
        await engine.handle_action(action_request("choice", {"option": "climb"}))
    vote = first.finish_vote("party-1", "wade")  # party_sync kept the vote; the engine restarted
    await engine.handle_action(vote)
    await engine.handle_action(vote)  # redelivered: only its answer again
    assert second.types() == ["action.result", "scene.update", "combat.update", "action.result"]
    assert second.vote_requests == []
    await engine.close()


def test_the_vote_state_round_trips_and_older_documents_load() -> None:
    state = RunState("run-1", "party-1", status="in_progress", scene_id="reef", scene_number=2)
    state.vote = VoteState("run-1.s2", 2, 1, ["climb", "wade"], 60.0, "open", None, "2026-…Z")
    assert RunState.from_dict(state.to_dict()) == state
    document = state.to_dict()
    del document["vote"]  # a run stored before votes
    assert RunState.from_dict(document).vote is None


@pytest.mark.parametrize(
    "run_id", ["r1", "run with spaces/and ünïcode", "x" * 64, "a.b:c-d_e", "r" * 41]
)
def test_vote_ids_are_protocol_ids_that_fit_the_action_id(run_id: str) -> None:
    ids = [vote_id_for(run_id, n, r) for n in (1, 2, 12345) for r in (1, 2)]
    for vote_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", vote_id)
        assert len(vote_id) <= MAX_VOTE_ID and len(f"vote:{vote_id}") <= 64
        assert is_run_vote(run_id, vote_id)
        assert not is_run_vote(run_id + "x", vote_id)
    assert len(set(ids)) == len(ids)
    assert vote_id_for(run_id, 2) == vote_id_for(run_id, 2)  # the same every time
    assert vote_id_for("r1", 2) == "r1.s2"
    assert not is_run_vote("r1", "v-1")


async def test_the_vote_timeout_comes_from_the_environment(
    publisher: RecordingPublisher,
) -> None:
    engine = create_engine(
        {"CAMPAIGN_ENGINE_DATABASE_URL": "memory://", "CAMPAIGN_ENGINE_VOTE_TIMEOUT": "7.5"}
    )
    await at_the_reef(engine, publisher)
    assert publisher.vote_requests[0].timeout_s == 7.5
    for bad in ("soon", "0", "-3", "100000"):
        with pytest.raises(ValueError, match="CAMPAIGN_ENGINE_VOTE_TIMEOUT"):
            create_engine({"CAMPAIGN_ENGINE_VOTE_TIMEOUT": bad})
