"""The in-memory store: stored runs are documents, never live objects; commits are whole."""

from __future__ import annotations

import pytest
from campaign_engine.state import CharacterState, CombatState, OutboxEvent, RunState, changes
from campaign_engine.store import Decision, InMemoryRunStore


def sample_state() -> RunState:
    state = RunState(
        run_id="run-1", party_id="party-1", status="in_progress", scene_id="pit", scene_number=2
    )
    state.characters["aria"] = CharacterState("aria", "Aria", 12, 20, ["inspired"])
    state.combat = CombatState("pit", {"rat": 0, "ogre": 7}, round=3, participants=["aria"])
    state.applied.add("act-1")
    state.outbox.append(OutboxEvent("act-1", "scene.update", {"scene_number": 2}, "t-1"))
    return state


def decision(seq: int, run_id: str = "run-1") -> Decision:
    return Decision(
        run_id=run_id,
        seq=seq,
        action_id=f"act-{seq}",
        character_id="aria",
        action_type="skill_check",
        payload={},
        scene_id="pit",
        scene_number=2,
        outcome="partial",
        roll=None,
        narration="",
        changes={},
        trace_id="t",
    )


def test_run_state_round_trips_through_plain_json() -> None:
    state = sample_state()
    assert RunState.from_dict(state.to_dict()) == state
    assert state.copy() == state and state.copy() is not state


async def test_loaded_states_are_independent_copies() -> None:
    store = InMemoryRunStore()
    assert await store.load("run-1") is None
    await store.commit(sample_state())
    loaded = await store.load("run-1")
    assert loaded is not None
    loaded.characters["aria"].hp = 0
    loaded.applied.add("act-2")
    assert await store.load("run-1") == sample_state()
    assert store.run_ids() == ["run-1"]


async def test_commit_appends_decisions_in_order() -> None:
    store = InMemoryRunStore()
    await store.commit(sample_state(), [decision(1)])
    await store.commit(sample_state(), [decision(2), decision(3)])
    assert [d.seq for d in await store.decisions("run-1")] == [1, 2, 3]
    with pytest.raises(ValueError, match="another run"):
        await store.commit(sample_state(), [decision(4, run_id="run-9")])
    assert len(await store.decisions("run-1")) == 3  # the refused commit changed nothing


def test_changes_names_only_what_changed() -> None:
    before = sample_state()
    after = before.copy()
    assert changes(before, after) == {}
    after.characters["aria"].hp = 5
    after.scene_flags["key"] = True
    assert after.combat is not None
    after.combat.enemies["ogre"] = 2
    assert changes(before, after) == {
        "hp": {"aria": {"from": 12, "to": 5}},
        "scene_flags": {"key": True},
        "enemies": {"ogre": {"from": 7, "to": 2}},
    }
