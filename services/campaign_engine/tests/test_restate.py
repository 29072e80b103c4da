"""Re-statement: party_sync lost a party's short-lived state, and the engine publishes the party's
current state again (``ReferenceEngine.handle_restate``; docs/redis.md, "Guarantees").

What is checked: exactly the current scene (open options), the fight, ``party.state`` and the
vote where one is due, with the notice's trace id; nothing for an unknown, pending or foreign run;
no die rolled (``ScriptedRandom`` fails on a roll nobody scripted), no decision, no chronicle
entry; twice is harmless; an unsent outbox goes first. The last tests replay that loss with
party_sync's own in-memory backend: a new backend (the state lost), a member reconnects to a
``system.hello`` with no scene, the notice is delivered, and the snapshot is playable again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
from campaign_engine.campaign import builtin_campaign, parse_campaign
from campaign_engine.chronicle import SceneSummary
from campaign_engine.engine import ReferenceEngine
from campaign_engine.events import party_state
from campaign_engine.store import Decision, InMemoryRunStore, open_store
from campaign_engine.testing import (
    PublishFailed,
    RecordingPublisher,
    ScriptedRandom,
    action_request,
    join_notice,
    restate_notice,
)
from party_sync.backends.memory import MemoryBackend
from party_sync.core.binding import Binding
from party_sync.engine import RestateNotice, restate_engine
from party_sync.protocol.schemas import Contracts
from party_sync.publishing import BackendPublisher

RESTATED_TRACE = "t-restate"


async def lantern(publisher: RecordingPublisher, dice: ScriptedRandom) -> ReferenceEngine:
    """ "The Sunken Lantern" with scripted dice, Aria and Bram joined (in the harbor)."""
    engine = ReferenceEngine(builtin_campaign(), rng=dice)
    await engine.start(publisher)
    await engine.handle_join(join_notice("aria"))
    await engine.handle_join(join_notice("bram"))
    return engine


async def chronicles(engine: ReferenceEngine) -> tuple[list[Decision], list[SceneSummary]]:
    return await engine.chronicle("run-1"), await engine.scene_summaries("run-1")


async def restated(
    engine: ReferenceEngine, publisher: RecordingPublisher, **notice: Any
) -> list[tuple[str, Mapping[str, Any]]]:
    """Deliver a restate notice on a fresh record; what it published (type, payload)."""
    publisher.clear()
    await engine.handle_restate(restate_notice(trace_id=RESTATED_TRACE, **notice))
    assert {e.trace_id for e in publisher.published} <= {RESTATED_TRACE}
    return [(e.type, e.payload) for e in publisher.published]


def plain_scene(update: Mapping[str, Any], narration: str) -> dict[str, Any]:
    """A ``scene.update`` payload with the plain scene narration (what a re-statement says)."""
    return {**update, "narration": narration}


async def test_a_scene_moved_on_is_restated_with_its_options_and_the_party(
    publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    engine = await lantern(publisher, dice)
    dice.push(11)  # swim: agility 11+2 = 13 vs 14, partial: to the lighthouse, Aria hurt 3
    await engine.handle_action(action_request("choice", {"option": "swim"}))
    scene = publisher.last("scene.update")
    before = await chronicles(engine)
    state = await engine.run_state("run-1")
    assert state is not None and state.scene_id == "lighthouse"

    events = await restated(engine, publisher)

    lighthouse = engine.campaign.scene("lighthouse")
    assert [t for t, _ in events] == ["scene.update", "party.state"]
    assert events[0][1] == plain_scene(scene, lighthouse.narration)
    assert [o["id"] for o in events[0][1]["options"]] == ["descend", "parley"]  # name: no flag
    assert events[0][1]["scene_number"] == 2
    assert events[1][1] == party_state(state)
    assert events[1][1]["run_status"] == "in_progress"
    assert events[1][1]["characters"]["aria"]["hp"] == 17
    assert await chronicles(engine) == before
    assert publisher.vote_requests == []
    assert not dice.values  # and no die was asked for (ScriptedRandom would have failed)


async def test_a_fight_is_restated_with_the_combatants(
    publisher: RecordingPublisher, arena_engine: ReferenceEngine, dice: ScriptedRandom
) -> None:
    await arena_engine.handle_join(join_notice("aria"))
    await arena_engine.handle_join(join_notice("bram"))
    await arena_engine.handle_action(action_request("choice", {"option": "enter"}))
    dice.push(11, 3, 7, 6)  # 11+4 vs AC 15 hits the ogre for 3+2; it strikes back for 6
    await arena_engine.handle_action(action_request("combat", {"move": "attack", "target": "ogre"}))
    scene, combat = publisher.last("scene.update"), publisher.last("combat.update")
    state = await arena_engine.run_state("run-1")
    assert state is not None and state.in_combat
    before = await chronicles(arena_engine)

    events = await restated(arena_engine, publisher)

    assert [t for t, _ in events] == ["scene.update", "combat.update", "party.state"]
    assert events[0][1] == plain_scene(scene, "A rat and an ogre.")
    assert events[0][1]["options"] == [{"id": "run", "label": "Run for the gate"}]
    assert events[1][1] == combat
    assert events[1][1]["active"] is True
    hp = {c["id"]: c["hp"] for c in events[1][1]["combatants"]}
    assert (hp["aria"], hp["bram"], hp["ogre"], hp["rat"]) == (14, 20, 25, 3)
    assert events[2][1] == party_state(state)
    assert await chronicles(arena_engine) == before


async def test_a_pending_vote_is_asked_for_again_and_its_result_applies(
    publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    engine = await lantern(publisher, dice)
    await engine.handle_action(action_request("choice", {"option": "row"}))  # to the Reef Gate
    first = publisher.vote_requests[-1]
    scene = publisher.last("scene.update")
    before = await chronicles(engine)
    publisher.lose_party()  # party_sync's vote died with its state

    events = await restated(engine, publisher)

    assert [t for t, _ in events] == ["scene.update", "party.state"]
    assert events[0][1] == plain_scene(scene, engine.campaign.scene("reef").narration)
    assert [o["id"] for o in events[0][1]["options"]] == ["climb", "wade"]
    # The same vote (id, ballot, timeout, tie rule), asked for with the notice's trace id.
    assert publisher.vote_requests == [replace(first, trace_id=RESTATED_TRACE)]
    assert first.vote_id == "run-1.s2"
    opened = publisher.open_vote()
    assert opened is not None and opened["vote_id"] == "run-1.s2"
    state = await engine.run_state("run-1")
    assert state is not None and state.vote is not None
    assert (state.vote.status, state.vote.deadline) == ("open", opened["deadline"])
    assert await chronicles(engine) == before

    await engine.handle_action(publisher.finish_vote(option="wade"))  # the party's choice
    assert publisher.last("scene.update")["scene_id"] == "claws"


async def test_restating_twice_publishes_the_same_state_and_changes_nothing(
    publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    engine = await lantern(publisher, dice)
    await engine.handle_action(action_request("choice", {"option": "row"}))
    publisher.lose_party()
    once = await restated(engine, publisher)
    state = await engine.run_state("run-1")
    before = await chronicles(engine)

    twice = await restated(engine, publisher)  # at least once: the same notice again

    assert twice == once
    assert [r.vote_id for r in publisher.vote_requests] == ["run-1.s2"]  # asked: VoteConflict
    again = await engine.run_state("run-1")
    assert state is not None and again is not None
    assert again.to_dict() == state.to_dict()  # the vote still open, the same deadline
    assert await chronicles(engine) == before


def vote_first() -> dict[str, Any]:
    """A campaign whose first scene is a vote scene: the join that starts the run asks for it."""
    return {
        "id": "fork",
        "title": "The Fork",
        "start": "fork",
        "scenes": [
            {
                "id": "fork",
                "number": 1,
                "title": "The Fork",
                "kind": "story",
                "narration": "Two roads.",
                "party_vote": {"question": "Which way?"},
                "options": [
                    {"id": "left", "label": "Go left", "next": "home"},
                    {"id": "right", "label": "Go right", "next": "home"},
                ],
            },
            {"id": "home", "number": 2, "title": "Home", "kind": "ending", "narration": "Home."},
        ],
    }


async def test_a_vote_the_opening_join_asked_for_stays_open_through_repeated_restatements(
    publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    engine = ReferenceEngine(parse_campaign(vote_first()), rng=dice)
    await engine.start(publisher)
    await engine.handle_join(join_notice("aria"))  # no action, so no server time: requested_at
    publisher.lose_party()
    await restated(engine, publisher)
    await restated(engine, publisher)  # party_sync has it open: VoteConflict

    state = await engine.run_state("run-1")
    assert state is not None and state.vote is not None
    assert state.vote.status == "open"  # still locks the ballot (it has a deadline to lapse)
    assert [r.vote_id for r in publisher.vote_requests] == ["run-1.s1"]  # the second asked too
    with pytest.raises(Exception, match="voting on this"):
        await engine.handle_action(action_request("choice", {"option": "left"}))


async def test_an_unknown_pending_or_foreign_run_publishes_nothing(
    publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    engine = await lantern(publisher, dice)
    assert await restated(engine, publisher, run_id="run-unknown") == []
    assert await engine.run_state("run-unknown") is None  # nor is a run made up for it
    assert await restated(engine, publisher, party_id="party-2") == []  # run-1 is party-1's
    stored = await engine.run_state("run-1")
    assert stored is not None
    stored.run_id, stored.status, stored.version = "run-pending", "pending", 0
    await engine.store.commit(stored)
    assert await restated(engine, publisher, run_id="run-pending") == []
    assert publisher.vote_requests == []


async def test_a_finished_run_is_restated_as_its_ending(
    publisher: RecordingPublisher, arena_engine: ReferenceEngine, dice: ScriptedRandom
) -> None:
    await arena_engine.handle_join(join_notice("aria"))
    dice.push(15)  # wits 15+1 vs 12: the key
    await arena_engine.handle_action(action_request("skill_check", {}))
    await arena_engine.handle_action(action_request("choice", {"option": "secret"}))

    events = await restated(arena_engine, publisher)

    assert [t for t, _ in events] == ["scene.update", "party.state"]
    assert events[0][1] == {
        "scene_number": 2,
        "scene_id": "won",
        "title": "Won",
        "narration": "Cheers.",
        "options": [],
        "kind": "ending",
    }
    assert events[1][1]["run_status"] == "finished"
    assert events[1][1]["characters"]["aria"]["effects"] == ["inspired"]


async def test_an_unsent_outbox_goes_out_first(
    publisher: RecordingPublisher, arena_engine: ReferenceEngine, dice: ScriptedRandom
) -> None:
    await arena_engine.handle_join(join_notice("aria"))
    dice.push(15)
    publisher.fail_next = 1
    with pytest.raises(PublishFailed):
        await arena_engine.handle_action(action_request("skill_check", {}, trace_id="t-check"))

    publisher.clear()
    await arena_engine.handle_restate(restate_notice(trace_id=RESTATED_TRACE))

    assert [(e.type, e.trace_id) for e in publisher.published] == [
        ("action.result", "t-check"),
        ("scene.update", "t-check"),
        ("party.state", "t-check"),
        ("scene.update", RESTATED_TRACE),
        ("party.state", RESTATED_TRACE),
    ]
    assert [o["id"] for o in publisher.last("scene.update")["options"]] == [
        "enter",
        "secret",
        "leap",
    ]
    state = await arena_engine.run_state("run-1")
    assert state is not None and state.outbox == []


async def test_a_restatement_cut_short_is_kept_and_published_by_the_next_delivery(
    publisher: RecordingPublisher, arena_engine: ReferenceEngine
) -> None:
    await arena_engine.handle_join(join_notice("aria"))
    publisher.fail_next = 1
    with pytest.raises(PublishFailed):
        await arena_engine.handle_restate(restate_notice(trace_id="t-lost"))
    state = await arena_engine.run_state("run-1")
    assert state is not None
    assert [(e.type, e.trace_id) for e in state.outbox] == [
        ("scene.update", "t-lost"),
        ("party.state", "t-lost"),
    ]

    publisher.clear()
    await arena_engine.handle_restate(restate_notice(trace_id=RESTATED_TRACE))  # redelivered

    assert [(e.type, e.trace_id) for e in publisher.published] == [
        ("scene.update", "t-lost"),
        ("party.state", "t-lost"),
        ("scene.update", RESTATED_TRACE),
        ("party.state", RESTATED_TRACE),
    ]
    assert publisher.published[0].payload == publisher.published[2].payload
    state = await arena_engine.run_state("run-1")
    assert state is not None and state.outbox == []


async def test_an_engine_restarted_on_its_database_restates_the_run(durable_url: str) -> None:
    """How the state is lost: the server restarts with the engine's database kept."""
    first = RecordingPublisher()
    engine = ReferenceEngine(
        builtin_campaign(), rng=ScriptedRandom(), store=open_store(durable_url)
    )
    await engine.start(first)
    await engine.handle_join(join_notice("aria"))
    await engine.handle_action(action_request("choice", {"option": "row"}))
    scene = first.last("scene.update")
    await engine.close()

    publisher = RecordingPublisher()  # party_sync restarted too: it knows nothing
    restarted = ReferenceEngine(
        builtin_campaign(), rng=ScriptedRandom(), store=open_store(durable_url)
    )
    await restarted.start(publisher)
    try:
        events = await restated(restarted, publisher)
        assert [t for t, _ in events] == ["scene.update", "party.state"]
        assert events[0][1] == plain_scene(scene, restarted.campaign.scene("reef").narration)
        assert [(e.seq, e.type) for e in publisher.published] == [
            (1, "scene.update"),
            (2, "party.state"),
        ]
        assert [r.vote_id for r in publisher.vote_requests] == ["run-1.s2"]
        assert len(await restarted.chronicle("run-1")) == 1
    finally:
        await restarted.close()


def scene_but_narration(scene: Mapping[str, Any] | None) -> dict[str, Any]:
    assert scene is not None
    return {k: v for k, v in scene.items() if k != "narration"}


async def test_party_syncs_lost_state_is_playable_again_after_the_restatement() -> None:
    """The lost state end to end, with party_sync's in-memory backend and its real publisher: the
    party's state is lost (a new backend: a restarted embedded server), the members reconnect to
    an empty ``system.hello``, the restatement arrives, and the snapshot has the scene, its
    options, the characters and the party's vote again; the vote then decides the scene."""
    contracts, store = Contracts(), InMemoryRunStore()  # the engine's database outlives it all
    members = [Binding("party-1", "run-1", c, c.capitalize()) for c in ("aria", "bram")]
    backend = MemoryBackend()
    engine = ReferenceEngine(builtin_campaign(), rng=ScriptedRandom(), store=store)
    await engine.start(BackendPublisher(backend, contracts, time.time))
    for member in members:
        await backend.connect(member, f"c-{member.character_id}", time.time(), "t-connect")
        await engine.handle_join(join_notice(member.character_id, member.display_name))
    await engine.handle_action(action_request("choice", {"option": "row"}))
    before = await backend.snapshot("party-1")
    assert before.scene is not None and before.vote is not None
    await engine.close()

    lost = MemoryBackend()  # the short-lived state is gone: a new epoch
    engine = ReferenceEngine(builtin_campaign(), rng=ScriptedRandom(), store=store)
    await engine.start(BackendPublisher(lost, contracts, time.time))
    for member in members:
        await lost.connect(member, f"c2-{member.character_id}", time.time(), "t-reconnect")
    hello = await lost.snapshot("party-1")
    assert (hello.run_status, hello.scene, hello.party_state, hello.vote) == (
        "pending",
        None,
        None,
        None,
    )
    notice = RestateNotice("party-1", "run-1", hello.epoch, "t-restate")

    assert await restate_engine(engine, notice)

    after = await lost.snapshot("party-1")
    assert after.epoch == hello.epoch
    assert after.run_status == "in_progress"
    assert scene_but_narration(after.scene) == scene_but_narration(before.scene)
    assert after.scene is not None and after.scene["scene_id"] == "reef"
    assert [o["id"] for o in after.scene["options"]] == ["climb", "wade"]
    # The party's state as it was, but current: its scene_number had not followed the move.
    assert before.party_state is not None and before.party_state["scene_number"] == 1
    assert after.party_state == {**before.party_state, "scene_number": 2}
    assert after.vote is not None
    assert after.vote["vote_id"] == before.vote["vote_id"] == "run-1.s2"
    assert after.vote["options"] == before.vote["options"]
    assert after.vote["eligible"] == 2

    assert await restate_engine(engine, notice)  # delivered again: the same state, one vote
    again = await lost.snapshot("party-1")
    # the same answer to the same notice, published under the same key: nothing again (a copy
    # from a worker that took the notice over would otherwise be sent twice)
    assert again.seq == after.seq
    assert (again.scene, again.party_state, again.vote) == (
        after.scene,
        after.party_state,
        after.vote,
    )

    events = []
    for member in members:
        refusal, cast = await lost.cast_vote(
            "party-1", member.character_id, "run-1.s2", "wade", time.time(), "t-vote"
        )
        assert refusal is None
        events += cast
    finished = events[-1]
    assert finished.type == "vote.finished"
    applied = finished.payload["applied"]
    await engine.handle_action(
        action_request(
            "choice",
            {"option": applied["option"], "vote_id": "run-1.s2"},
            character_id="party",
            action_id=applied["action_id"],
        )
    )
    moved = await lost.snapshot("party-1")
    assert moved.scene is not None and moved.scene["scene_id"] == "claws"
    assert moved.combat is not None and moved.combat["active"] is True
    assert len(await engine.chronicle("run-1")) == 2  # row, then the party's wade: nothing else
    await engine.close()
