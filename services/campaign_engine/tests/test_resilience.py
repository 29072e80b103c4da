"""What happens when publishing fails, and when actions of one run arrive at once."""

from __future__ import annotations

import asyncio

import pytest
from campaign_engine.engine import ReferenceEngine
from campaign_engine.testing import (
    PublishFailed,
    RecordingPublisher,
    ScriptedRandom,
    action_request,
    join_notice,
)
from party_sync.protocol.errors import BackendUnavailable


async def test_a_redelivered_action_publishes_what_a_failure_left_unsent(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    await engine.handle_join(join_notice("aria"))
    publisher.clear()
    action = action_request("choice", {"option": "row"})
    publisher.fail_next = 1
    with pytest.raises(PublishFailed):
        await engine.handle_action(action)  # applied and committed, nothing published
    state = await engine.run_state("run-1")
    assert state is not None and state.scene_id == "reef"
    assert len(await engine.chronicle("run-1")) == 1

    await engine.handle_action(action)  # party_sync redelivers the same action_id
    assert publisher.types() == ["action.result", "scene.update"]
    assert publisher.last("scene.update")["scene_number"] == 2
    await engine.handle_action(action)  # and once everything is out: only its answer again
    assert publisher.types() == ["action.result", "scene.update", "action.result"]
    assert len(await engine.chronicle("run-1")) == 1  # never applied twice


async def test_leftovers_are_published_before_the_next_action(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    await engine.handle_join(join_notice("aria"))
    publisher.clear()
    first = action_request("choice", {"option": "row"})
    publisher.fail_next = 1
    with pytest.raises(PublishFailed):
        await engine.handle_action(first)
    await engine.handle_action(action_request("skill_check", {}))
    assert [(e.type, e.trace_id) for e in publisher.published[:2]] == [
        ("action.result", first.trace_id),
        ("scene.update", first.trace_id),
    ]
    assert publisher.types()[2:4] == ["action.result", "scene.update"]


async def test_leftovers_that_still_fail_are_dropped_and_the_game_goes_on(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    await arena_engine.handle_join(join_notice("aria"))
    dice.push(1)  # a failed leap: harm, so this action's events include a party.state
    publisher.fail_next = 3  # the action, then the retry of its leftovers, then the next try
    with pytest.raises(PublishFailed):
        await arena_engine.handle_action(action_request("choice", {"option": "leap"}))
    publisher.fail_next = 1
    publisher.clear()
    await arena_engine.handle_action(action_request("choice", {"option": "enter"}))

    # the leap's events are gone, but this action re-states the scene and (since the party.state
    # with the harm was never published) the party's HP: every client converges
    assert publisher.types() == ["action.result", "scene.update", "combat.update", "party.state"]
    assert publisher.last("party.state")["characters"]["aria"]["hp"] == 1
    state = await arena_engine.run_state("run-1")
    assert state is not None and state.outbox == []


async def test_leftovers_wait_while_party_sync_is_unavailable_and_go_out_after_it(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    """party_sync unreachable (a Redis stall): an earlier action's events that could not be
    published are not dropped by the next message, which fails with them (its transport gives
    it again). Dropped, a party whose next action was refused (no scene of its own) stayed on
    the old scene for good while the engine was a scene ahead (recovery probe, a 15-s stall)."""
    await engine.handle_join(join_notice("aria"))
    publisher.clear()
    publisher.fail_as = BackendUnavailable
    first = action_request("choice", {"option": "row"})  # moves the party to scene 2
    publisher.fail_next = 1
    with pytest.raises(BackendUnavailable):
        await engine.handle_action(first)
    publisher.fail_next = 1  # still down when the next message comes
    second = action_request("skill_check", {})
    with pytest.raises(BackendUnavailable):
        await engine.handle_action(second)
    state = await engine.run_state("run-1")
    assert state is not None
    assert [e.type for e in state.outbox][:2] == ["action.result", "scene.update"]  # kept
    assert publisher.published == []

    await engine.handle_action(second)  # party_sync is back: the transport gives it again
    assert [(e.type, e.trace_id) for e in publisher.published[:2]] == [
        ("action.result", first.trace_id),
        ("scene.update", first.trace_id),
    ]
    assert publisher.last("scene.update")["scene_number"] == 2  # the screens follow the game


async def test_concurrent_actions_of_one_run_apply_one_at_a_time(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    await engine.handle_join(join_notice("aria"))
    await engine.handle_join(join_notice("bram"))
    publisher.clear()
    row = action_request("choice", {"option": "row"}, character_id="aria")
    swim = action_request("choice", {"option": "row"}, character_id="bram")
    results = await asyncio.gather(
        engine.handle_action(row), engine.handle_action(swim), return_exceptions=True
    )
    # the first moves the party to the reef; the second's option is no longer open there
    assert results[0] is None
    assert "not an option" in str(results[1])
    assert publisher.types() == ["action.result", "scene.update"]
