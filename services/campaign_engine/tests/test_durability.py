"""The engine over durable stores: a restart continues the run where it was, events left unsent
survive it, and engines sharing one database never apply an action twice nor lose a move.

``durable_url`` is a SQLite file or a PostgreSQL schema; the races also run in memory (two
engines sharing one in-memory store).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from campaign_engine.campaign import Campaign, builtin_campaign
from campaign_engine.chronicle import SceneSummary
from campaign_engine.engine import ReferenceEngine, create_engine
from campaign_engine.state import RunState
from campaign_engine.store import (
    CommitConflict,
    CommitOutcomeUnknown,
    Decision,
    InMemoryRunStore,
    RunStore,
    open_store,
)
from campaign_engine.testing import (
    PublishFailed,
    RecordingPublisher,
    ScriptedRandom,
    action_request,
    join_notice,
)


async def started(
    url: str, campaign: Campaign, dice: ScriptedRandom, publisher: RecordingPublisher
) -> ReferenceEngine:
    engine = ReferenceEngine(campaign, rng=dice, store=open_store(url))
    await engine.start(publisher)
    return engine


async def test_an_engine_restarted_between_actions_continues_the_run(
    durable_url: str, arena_campaign: Campaign, dice: ScriptedRandom
) -> None:
    first = RecordingPublisher()
    engine = await started(durable_url, arena_campaign, dice, first)
    await engine.handle_join(join_notice("aria", "Aria"))
    check = action_request("skill_check", {}, trace_id="t-check")
    dice.push(15)  # 15+1 = 16 vs 12: success, the flag "key" is set and Aria is inspired
    await engine.handle_action(check)
    await engine.close()

    second = RecordingPublisher()
    engine = await started(durable_url, arena_campaign, dice, second)
    dice.push(1)  # a natural 1 on the leap (inspired is spent): 50 harm, back to the gate
    await engine.handle_action(action_request("choice", {"option": "leap"}, trace_id="t-leap"))
    assert second.last("scene.update")["scene_number"] == 1  # stayed: the counter did not move
    assert [o["id"] for o in second.last("scene.update")["options"]] == ["enter", "secret", "leap"]
    await engine.handle_action(check)  # redelivered after the restart: only its answer again
    assert second.types() == ["action.result", "scene.update", "party.state", "action.result"]
    again = second.last("action.result")
    assert (again["action_id"], again["outcome"]) == (check.action_id, "success")
    assert again["roll"]["value"] == 15  # the roll it was applied with, not a new one
    await engine.close()

    third = RecordingPublisher()
    engine = await started(durable_url, arena_campaign, dice, third)
    await engine.handle_action(action_request("choice", {"option": "secret"}, trace_id="t-door"))
    scene = third.last("scene.update")
    assert (scene["scene_id"], scene["scene_number"], scene["kind"]) == ("won", 2, "ending")
    state = await engine.run_state("run-1")
    assert state is not None and state.status == "finished"
    aria = state.characters["aria"]
    assert (aria.name, aria.hp, aria.effects) == ("Aria", 1, [])  # harmed, inspiration spent

    chronicle = await engine.chronicle("run-1")
    assert [(d.seq, d.trace_id, d.scene_number) for d in chronicle] == [
        (1, "t-check", 1),
        (2, "t-leap", 1),
        (3, "t-door", 1),
    ]
    assert chronicle[0].action_id == check.action_id
    assert chronicle[1].changes["hp"] == {"aria": {"from": 20, "to": 1}}
    gate, ending = await engine.scene_summaries("run-1")
    assert (gate.scene_id, gate.outcome, gate.decisions) == ("gate", "moved_on", [1, 2, 3])
    assert (gate.next_scene_id, gate.next_scene_number) == ("won", 2)
    assert (ending.scene_number, ending.outcome, ending.trace_id) == (2, "ending", "t-door")
    await engine.close()


async def test_a_commit_whose_outcome_is_unknown_is_never_told_as_not_applied(
    durable_url: str, arena_campaign: Campaign, dice: ScriptedRandom
) -> None:
    """Engine DB probe: the database connection lost after the COMMIT was applied, before its
    reply: the engine raised, which says *not applied*, and the in-process link told the
    player ``engine_error`` while the run had moved on. The engine raises
    ``CommitOutcomeUnknown`` (a ``TimeoutError``: every party_sync host hands the action again),
    and so on every attempt that cannot tell (the database still down), until one settles it:
    applied, its result published once."""
    store: Any = open_store(durable_url)
    engine = ReferenceEngine(arena_campaign, rng=dice, store=store)
    publisher = RecordingPublisher()
    await engine.start(publisher)
    await engine.handle_join(join_notice("aria", "Aria"))
    publisher.clear()
    check = action_request("skill_check", {}, trace_id="t-check")
    dice.push(15)
    real_transaction, real_load = store._transaction, store.load

    @contextlib.asynccontextmanager
    async def reply_lost(**options: Any) -> AsyncIterator[Any]:
        async with real_transaction(**options) as tx:
            yield tx
        raise ConnectionError("server closed the connection unexpectedly")  # after COMMIT

    async def down(run_id: str) -> Any:
        raise RuntimeError("couldn't get a connection after 10.00 sec")

    store._transaction = reply_lost
    with pytest.raises(CommitOutcomeUnknown) as raised:
        await engine.handle_action(check)
    assert isinstance(raised.value, TimeoutError)
    store._transaction, store.load = real_transaction, down
    with pytest.raises(CommitOutcomeUnknown):  # cannot tell: not "not applied" either
        await engine.handle_action(check)
    store.load = real_load
    assert publisher.types() == []
    await engine.handle_action(check)  # it had landed: answered from the run, once
    assert publisher.types() == ["action.result", "scene.update", "party.state"]
    assert publisher.last("action.result")["action_id"] == check.action_id
    assert len(await store.decisions("run-1")) == 1
    store.load = down  # settled: a failure now is an ordinary one again
    other = action_request("choice", {"option": "leap"}, trace_id="t-leap")
    with pytest.raises(RuntimeError):
        await engine.handle_action(other)
    await engine.close()


async def test_events_left_unsent_survive_a_restart(durable_url: str) -> None:
    env = {"CAMPAIGN_ENGINE_DATABASE_URL": durable_url, "CAMPAIGN_ENGINE_SEED": "7"}
    crashed = RecordingPublisher()
    engine = create_engine(env)
    await engine.start(crashed)
    await engine.handle_join(join_notice("aria"))
    action = action_request("choice", {"option": "row"})
    crashed.fail_next = 1
    with pytest.raises(PublishFailed):
        await engine.handle_action(action)  # committed, then the publish failed: the outbox stays
    await engine.close()

    publisher = RecordingPublisher()
    engine = create_engine(env)
    await engine.start(publisher)
    await engine.handle_action(action)  # party_sync redelivers it to the restarted engine
    assert publisher.types() == ["action.result", "scene.update"]
    assert publisher.last("scene.update")["scene_number"] == 2
    assert {e.trace_id for e in publisher.published} == {action.trace_id}
    await engine.handle_action(action)  # everything is out: only its action.result again
    assert publisher.types() == ["action.result", "scene.update", "action.result"]
    assert publisher.published[2].payload == publisher.published[0].payload
    assert len(await engine.chronicle("run-1")) == 1
    await engine.close()


async def test_one_engine_serves_many_runs_at_once(store_url: str) -> None:
    engine = ReferenceEngine(builtin_campaign(), seed=3, store=open_store(store_url))
    publisher = RecordingPublisher()
    await engine.start(publisher)

    async def play(n: int) -> None:
        run, party = f"run-{n}", f"party-{n}"
        await engine.handle_join(join_notice("aria", run_id=run, party_id=party))
        await engine.handle_action(action_request("skill_check", {}, run_id=run, party_id=party))
        await engine.handle_action(
            action_request("choice", {"option": "row"}, run_id=run, party_id=party)
        )

    await asyncio.gather(*(play(n) for n in range(12)))
    for n in range(12):
        state = await engine.run_state(f"run-{n}")
        assert state is not None and (state.scene_id, state.scene_number) == ("reef", 2)
        assert [d.seq for d in await engine.chronicle(f"run-{n}")] == [1, 2]
        assert len(await engine.scene_summaries(f"run-{n}")) == 1
    await engine.close()


class AlwaysLosing(InMemoryRunStore):
    """Another process always commits first."""

    async def commit(
        self,
        state: RunState,
        decisions: Sequence[Decision] = (),
        summaries: Sequence[SceneSummary] = (),
    ) -> None:
        if decisions:
            raise CommitConflict("another process was faster")
        await super().commit(state, decisions, summaries)


async def test_an_engine_that_always_loses_the_race_gives_up_and_publishes_nothing() -> None:
    store = AlwaysLosing()
    engine = ReferenceEngine(builtin_campaign(), seed=3, store=store)
    publisher = RecordingPublisher()
    await engine.start(publisher)
    await engine.handle_join(join_notice("aria"))
    publisher.clear()
    with pytest.raises(CommitConflict):  # party_sync reports a retryable engine_error
        await engine.handle_action(action_request("choice", {"option": "row"}))
    assert publisher.published == []
    assert await engine.chronicle("run-1") == []


class RacingStore:
    """A store through which something else happens between an engine's load and its commit: the
    first commit carrying a decision runs ``meanwhile`` first (another engine process, acting)."""

    def __init__(self, inner: RunStore, meanwhile: Callable[[], Awaitable[None]]) -> None:
        self.inner = inner
        self.url = inner.url
        self.meanwhile: Callable[[], Awaitable[None]] | None = meanwhile
        self.commits = 0

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def load(self, run_id: str) -> RunState | None:
        return await self.inner.load(run_id)

    async def commit(
        self,
        state: RunState,
        decisions: Sequence[Decision] = (),
        summaries: Sequence[SceneSummary] = (),
    ) -> None:
        if decisions and self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            await meanwhile()
        self.commits += 1
        await self.inner.commit(state, decisions, summaries)

    async def decisions(self, run_id: str, *, scene_number: int | None = None) -> list[Decision]:
        return await self.inner.decisions(run_id, scene_number=scene_number)

    async def decision(self, run_id: str, action_id: str) -> Decision | None:
        return await self.inner.decision(run_id, action_id)

    async def summaries(self, run_id: str) -> list[SceneSummary]:
        return await self.inner.summaries(run_id)


async def two_engines(
    url: str, meanwhile: Callable[[ReferenceEngine], Awaitable[None]]
) -> tuple[ReferenceEngine, RecordingPublisher, ReferenceEngine, RecordingPublisher]:
    """Engine one, and engine two whose first decision commit lets engine one act first."""
    shared = open_store(url)  # memory:// is per store object: then both engines share this one
    one = ReferenceEngine(builtin_campaign(), seed=1, store=shared)
    other = shared if url == "memory://" else open_store(url)
    two = ReferenceEngine(
        builtin_campaign(), seed=2, store=RacingStore(other, lambda: meanwhile(one))
    )
    pub_one, pub_two = RecordingPublisher(), RecordingPublisher()
    await one.start(pub_one)
    await two.start(pub_two)
    await one.handle_join(join_notice("aria"))
    await one.handle_join(join_notice("bram"))
    pub_one.clear()
    return one, pub_one, two, pub_two


async def test_the_same_action_in_two_engines_is_applied_once(store_url: str) -> None:
    action = action_request("choice", {"option": "row"}, trace_id="t-row")

    async def meanwhile(one: ReferenceEngine) -> None:
        await one.handle_action(action)  # a reclaimed delivery: the first worker was only slow

    one, pub_one, two, pub_two = await two_engines(store_url, meanwhile)
    await two.handle_action(action)  # lost the race, worked it out again: already applied

    assert pub_one.types() == ["action.result", "scene.update"]
    assert pub_two.types() == ["action.result"]  # its answer again (party_sync keeps the first)
    assert pub_two.published[0].payload["action_id"] == action.action_id
    assert [d.action_id for d in await two.chronicle("run-1")] == [action.action_id]
    state = await two.run_state("run-1")
    assert state is not None and (state.scene_id, state.scene_number) == ("reef", 2)
    await one.close()
    await two.close()


async def test_actions_racing_in_two_engines_both_apply_in_turn(store_url: str) -> None:
    row = action_request("choice", {"option": "row"}, character_id="aria", trace_id="t-row")
    look = action_request("skill_check", {}, character_id="bram", trace_id="t-look")

    async def meanwhile(one: ReferenceEngine) -> None:
        await one.handle_action(row)

    one, pub_one, two, pub_two = await two_engines(store_url, meanwhile)
    await two.handle_action(look)  # worked out at the harbor, committed at the reef

    chronicle = await two.chronicle("run-1")
    assert [(d.seq, d.trace_id, d.scene_id, d.scene_number) for d in chronicle] == [
        (1, "t-row", "harbor", 1),
        (2, "t-look", "reef", 2),
    ]
    assert pub_one.last("action.result")["action_id"] == row.action_id
    assert pub_two.types()[:2] == ["action.result", "scene.update"]
    assert pub_two.last("scene.update")["scene_number"] == 2
    [harbor] = await two.scene_summaries("run-1")
    assert (harbor.scene_id, harbor.decisions, harbor.next_scene_id) == ("harbor", [1], "reef")
    await one.close()
    await two.close()
