"""Whole runs of "The Sunken Lantern", from scene 1 to an ending, with seeded dice."""

from __future__ import annotations

import itertools

import pytest
from campaign_engine.campaign import builtin_campaign
from campaign_engine.engine import ReferenceEngine
from campaign_engine.testing import Published, RecordingPublisher, action_request, join_notice
from party_sync.engine import EngineRejected

PARTY = ("aria", "bram")


async def play(
    engine: ReferenceEngine, publisher: RecordingPublisher, route: dict[str, str]
) -> int:
    """Play until an ending: ``route`` picks the option per story scene (in a vote scene the
    party's vote picks it: the vote is finished and its action fed as party_sync would); fights
    are fought by every standing character in turn. Returns the number of actions taken."""
    for char in PARTY:
        await engine.handle_join(join_notice(char))
    for step in range(200):
        scene = publisher.last("scene.update")
        if scene["kind"] == "ending":
            return step
        state = await engine.run_state("run-1")
        assert state is not None
        standing = [c for c in PARTY if not state.characters[c].downed]
        actor = standing[step % len(standing)]
        if scene["kind"] == "combat":
            await engine.handle_action(
                action_request("combat", {"move": "attack"}, character_id=actor)
            )
        elif publisher.open_vote("party-1") is not None:
            option = route[scene["scene_id"]]
            await engine.handle_action(publisher.finish_vote("party-1", option))
        else:
            await engine.handle_action(
                action_request("choice", {"option": route[scene["scene_id"]]}, character_id=actor)
            )
    raise AssertionError("no ending after 200 actions")


def check_protocol_order(published: list[Published]) -> None:
    """Each action's events: action.result, then scene.update, all with the action's trace_id;
    scene_number only ever grows by one."""
    numbers = [e.payload["scene_number"] for e in published if e.type == "scene.update"]
    assert all(b - a in (0, 1) for a, b in itertools.pairwise(numbers))
    for i, event in enumerate(published):
        if event.type == "action.result":
            assert published[i + 1].type == "scene.update"
            assert published[i + 1].trace_id == event.trace_id
    assert [e.seq for e in published] == list(range(1, len(published) + 1))


FIGHTING_ROUTE = {"harbor": "row", "reef": "wade", "lighthouse": "descend", "bargain": "refuse"}


async def test_a_full_playthrough_from_scene_1_to_an_ending(
    publisher: RecordingPublisher,
) -> None:
    engine = ReferenceEngine(builtin_campaign(), seed=2026)
    await engine.start(publisher)
    steps = await play(engine, publisher, FIGHTING_ROUTE)

    scenes = [e.payload["scene_id"] for e in publisher.published if e.type == "scene.update"]
    assert scenes[0] == "harbor"
    assert {"reef", "claws"} <= set(scenes)  # both fights were fought (claws at least)
    ending = publisher.last("scene.update")
    assert ending["kind"] == "ending"
    assert ending["scene_id"] in {"relit", "drowned"}
    assert publisher.last("party.state")["run_status"] == "finished"
    assert publisher.last("combat.update")["active"] is False
    assert publisher.vote_requests[0].vote_id == "run-1.s2"  # the party voted at the Reef Gate
    check_protocol_order(publisher.published)
    assert len(await engine.chronicle("run-1")) == steps
    with pytest.raises(EngineRejected, match="ended"):
        await engine.handle_action(action_request("skill_check", {}))


async def test_the_same_seed_replays_the_same_game() -> None:
    logs = []
    for _ in range(2):
        publisher = RecordingPublisher()
        engine = ReferenceEngine(builtin_campaign(), seed=99)
        await engine.start(publisher)
        await play(engine, publisher, FIGHTING_ROUTE)
        logs.append([(e.type, {**e.payload, "action_id": ""}) for e in publisher.published])
    assert logs[0] == logs[1]


@pytest.mark.parametrize("seed", range(25))
async def test_every_route_ends_for_any_seed(seed: int, publisher: RecordingPublisher) -> None:
    """No seed gets a party stuck: with risky routes too, every run reaches an ending."""
    route = (
        FIGHTING_ROUTE
        if seed % 2
        else {"harbor": "swim", "reef": "climb", "lighthouse": "parley", "bargain": "carry"}
    )
    engine = ReferenceEngine(builtin_campaign(), seed=seed)
    await engine.start(publisher)
    await play(engine, publisher, route)
    assert publisher.last("scene.update")["kind"] == "ending"
    check_protocol_order(publisher.published)


@pytest.mark.parametrize("seed", range(8))
async def test_the_party_votes_its_way_through_a_whole_run(
    seed: int, publisher: RecordingPublisher
) -> None:
    """Rowing out always reaches the Reef Gate, where the party votes (play() finishes the vote
    and feeds its action, as party_sync does); every run still reaches an ending."""
    engine = ReferenceEngine(builtin_campaign(), seed=seed)
    await engine.start(publisher)
    await play(engine, publisher, FIGHTING_ROUTE)
    assert publisher.last("scene.update")["kind"] == "ending"
    results = [e.payload for e in publisher.published if e.type == "action.result"]
    party = [r for r in results if r["character_id"] == "party"]
    assert party[0]["action_id"] == "vote:run-1.s2"  # the Reef Gate
    assert party[0]["state"] == {"effects": [], "scene_flags": {}}
    assert publisher.open_vote("party-1") is None
    check_protocol_order(publisher.published)
