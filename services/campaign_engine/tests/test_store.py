"""One behavioural suite for every store (memory, SQLite, PostgreSQL: the ``store`` fixture).

What the engine relies on: stored runs are documents, never live objects; a commit is whole or
nothing; a state loaded before another commit cannot be committed over it; an ``action_id`` is
recorded once per run; the chronicles come back in order.
"""

from __future__ import annotations

import pytest
from campaign_engine.chronicle import SceneSummary
from campaign_engine.state import CharacterState, CombatState, OutboxEvent, RunState, changes
from campaign_engine.store import CommitConflict, Decision, RunStore


def sample_state(run_id: str = "run-1") -> RunState:
    state = RunState(
        run_id=run_id, party_id="party-1", status="in_progress", scene_id="pit", scene_number=2
    )
    state.characters["aria"] = CharacterState("aria", "Aria", 12, 20, ["inspired"])
    state.characters["bram"] = CharacterState("bram", "Bram «the Bold»", 0, 20, ["downed"])
    state.combat = CombatState("pit", {"rat": 0, "ogre": 7}, round=3, participants=["aria"])
    state.scene_flags = {"key": True, "alarm": False}
    state.applied.add("act-1")
    state.outbox.append(OutboxEvent("act-1", "scene.update", {"scene_number": 2}, "t-1"))
    state.published_party_state = {"run_status": "in_progress", "characters": {}}
    return state


def decision(seq: int, run_id: str = "run-1", scene_number: int = 2) -> Decision:
    return Decision(
        run_id=run_id,
        seq=seq,
        action_id=f"act-{seq}",
        character_id="aria",
        action_type="skill_check",
        payload={"skill": "wits"},
        scene_id="pit",
        scene_number=scene_number,
        outcome="partial",
        roll={"die": "d20", "value": 9, "modifier": 1, "total": 10, "difficulty": 12},
        narration="Aria peers into the dark.",
        changes={"scene_flags": {"key": True}},
        trace_id=f"t-{seq}",
        at="2026-11-25T21:04:05.123Z",
    )


def summary(scene_number: int, run_id: str = "run-1") -> SceneSummary:
    return SceneSummary(
        run_id=run_id,
        scene_number=scene_number,
        scene_id="pit",
        title="The Pit",
        kind="combat",
        outcome="victory",
        next_scene_id="won",
        next_scene_number=scene_number + 1,
        decisions=[1, 2],
        actors={"Aria": ["attacked rat: success"]},
        happened=["Aria attacks."],
        text="Scene 2, The Pit: ...",
        trace_id="t-2",
        at="2026-11-25T21:04:05.123Z",
    )


def test_run_state_round_trips_through_plain_json() -> None:
    state = sample_state()
    assert RunState.from_dict(state.to_dict()) == state
    state.version = 4
    twin = state.copy()
    assert twin == state and twin is not state and twin.version == 4


async def test_an_unknown_run_has_nothing(store: RunStore) -> None:
    assert await store.load("run-1") is None
    assert await store.decisions("run-1") == []
    assert await store.summaries("run-1") == []


async def test_a_committed_state_loads_back_equal(store: RunStore) -> None:
    state = sample_state()
    await store.commit(state)
    assert state.version == 1  # the commit advanced the caller's token
    loaded = await store.load("run-1")
    assert loaded == sample_state() and loaded is not None
    assert loaded.version == 1
    assert list(loaded.characters) == ["aria", "bram"]  # joining order survives
    await store.open()  # idempotent


async def test_loaded_states_are_independent_copies(store: RunStore) -> None:
    await store.commit(sample_state())
    loaded = await store.load("run-1")
    assert loaded is not None
    loaded.characters["aria"].hp = 0
    loaded.applied.add("act-2")
    assert await store.load("run-1") == sample_state()


async def test_commits_append_decisions_in_order(store: RunStore) -> None:
    state = sample_state()
    await store.commit(state, [decision(1, scene_number=1)])
    await store.commit(state, [decision(2), decision(3)])
    assert state.version == 2
    assert await store.decisions("run-1") == [decision(1, scene_number=1), decision(2), decision(3)]
    assert [d.seq for d in await store.decisions("run-1", scene_number=2)] == [2, 3]
    assert await store.decisions("run-1", scene_number=9) == []


async def test_a_decision_is_found_by_its_action_id_in_its_run_only(store: RunStore) -> None:
    state = sample_state()
    await store.commit(state, [decision(1), decision(2)])
    assert await store.decision("run-1", "act-2") == decision(2)
    assert await store.decision("run-1", "act-9") is None
    assert await store.decision("run-2", "act-1") is None


async def test_scene_summaries_come_back_by_scene(store: RunStore) -> None:
    state = sample_state()
    await store.commit(state, [decision(1)], [summary(3)])
    await store.commit(state, [], [summary(1), summary(2)])
    assert [s.scene_number for s in await store.summaries("run-1")] == [1, 2, 3]
    assert (await store.summaries("run-1"))[2] == summary(3)


async def test_records_of_another_run_are_refused(store: RunStore) -> None:
    state = sample_state()
    await store.commit(state, [decision(1)])
    with pytest.raises(ValueError, match="another run"):
        await store.commit(state, [decision(2, run_id="run-9")])
    with pytest.raises(ValueError, match="another run"):
        await store.commit(state, [], [summary(2, run_id="run-9")])
    assert len(await store.decisions("run-1")) == 1  # the refused commits changed nothing
    assert state.version == 1


async def test_a_state_loaded_before_another_commit_cannot_overwrite_it(store: RunStore) -> None:
    await store.commit(sample_state())
    first, second = await store.load("run-1"), await store.load("run-1")
    assert first is not None and second is not None
    first.scene_number = 3
    await store.commit(first, [decision(1)])
    second.characters["aria"].hp = 1
    with pytest.raises(CommitConflict):
        await store.commit(second, [decision(2)])
    stored = await store.load("run-1")
    assert stored is not None
    assert (stored.scene_number, stored.characters["aria"].hp) == (3, 12)
    assert [d.seq for d in await store.decisions("run-1")] == [1]


async def test_two_first_commits_of_a_run_race_and_one_wins(store: RunStore) -> None:
    await store.commit(sample_state(), [decision(1)])
    late = sample_state()
    late.scene_number = 7
    with pytest.raises(CommitConflict):
        await store.commit(late, [decision(2)])  # also version 0: the run exists now
    stored = await store.load("run-1")
    assert stored is not None and stored.scene_number == 2
    assert late.version == 0


async def test_an_action_id_is_recorded_once_and_a_failed_commit_writes_nothing(
    store: RunStore,
) -> None:
    state = sample_state()
    await store.commit(state, [decision(1)])
    again = decision(2)
    again = Decision(**{**again.to_dict(), "action_id": "act-1"})  # the same action, redelivered
    state.scene_number = 5
    with pytest.raises(CommitConflict):
        await store.commit(state, [again], [summary(2)])
    assert state.version == 1  # not advanced: the caller's token still matches the store
    stored = await store.load("run-1")
    assert stored is not None and stored.scene_number == 2  # the state change was rolled back
    assert await store.summaries("run-1") == []
    assert [d.action_id for d in await store.decisions("run-1")] == ["act-1"]
    await store.commit(state, [decision(2)])  # and the store is fine afterwards
    assert state.version == 2


async def test_runs_are_independent(store: RunStore) -> None:
    await store.commit(sample_state("run-1"), [decision(1, run_id="run-1")])
    await store.commit(sample_state("run-2"), [decision(1, run_id="run-2")])  # same action_id
    assert [d.run_id for d in await store.decisions("run-2")] == ["run-2"]
    assert len(await store.decisions("run-1")) == 1


def test_changes_names_only_what_changed() -> None:
    before = sample_state()
    after = before.copy()
    assert changes(before, after) == {}
    after.characters["aria"].hp = 5
    after.scene_flags["key"] = False
    assert after.combat is not None
    after.combat.enemies["ogre"] = 2
    assert changes(before, after) == {
        "hp": {"aria": {"from": 12, "to": 5}},
        "scene_flags": {"key": False, "alarm": False},
        "enemies": {"ogre": {"from": 7, "to": 2}},
    }
