"""The engine driven through the recording publisher: joins, choices, skill checks, refusals."""

from __future__ import annotations

import logging

import pytest
from campaign_engine.engine import ReferenceEngine
from campaign_engine.testing import RecordingPublisher, ScriptedRandom, action_request, join_notice
from party_sync.engine import Engine, EngineRejected, EventPublisher


async def test_first_join_starts_the_run(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    await engine.handle_join(join_notice("aria", "Aria", trace_id="t-join"))

    assert publisher.types() == ["scene.update", "party.state"]
    scene = publisher.last("scene.update")
    assert (scene["scene_number"], scene["scene_id"], scene["kind"]) == (1, "harbor", "story")
    assert [o["id"] for o in scene["options"]] == ["row", "swim"]  # tide_path needs its flag
    assert scene["difficulty"] == 12
    assert publisher.last("party.state") == {
        "status": "active",
        "run_status": "in_progress",
        "scene_number": 1,
        "characters": {"aria": {"hp": 20, "max_hp": 20, "effects": []}},
    }
    assert {e.trace_id for e in publisher.published} == {"t-join"}
    assert {e.party_id for e in publisher.published} == {"party-1"}


async def test_joins_never_restart_the_run(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    await engine.handle_join(join_notice("aria"))
    await engine.handle_action(action_request("choice", {"option": "row"}))
    publisher.clear()

    await engine.handle_join(join_notice("aria"))  # the same character again: nothing new
    assert publisher.published == []
    await engine.handle_join(join_notice("bram", "Bram", trace_id="t-bram"))  # a new member
    assert publisher.types() == ["scene.update", "party.state"]
    scene = publisher.last("scene.update")
    assert (scene["scene_id"], scene["scene_number"]) == ("reef", 2)  # re-stated, not restarted
    assert scene["narration"].startswith("Bram joins the party.")
    assert publisher.last("party.state")["scene_number"] == 2
    assert {e.trace_id for e in publisher.published} == {"t-bram"}
    state = await engine.run_state("run-1")
    assert state is not None
    assert (state.scene_id, state.scene_number) == ("reef", 2)
    assert state.characters["bram"].name == "Bram"


async def test_a_choice_moves_on_and_publishes_result_then_scene_with_its_trace(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    await engine.handle_join(join_notice("aria"))
    publisher.clear()

    action = action_request("choice", {"option": "row"}, trace_id="trace-row")
    await engine.handle_action(action)

    assert publisher.types() == ["action.result", "scene.update"]  # no HP changed: no party.state
    assert [e.trace_id for e in publisher.published] == ["trace-row", "trace-row"]
    result = publisher.last("action.result")
    assert result["action_id"] == action.action_id
    assert (result["character_id"], result["action_type"], result["outcome"]) == (
        "aria",
        "choice",
        "success",
    )
    assert result["state"] == {"hp": 20, "max_hp": 20, "effects": [], "scene_flags": {}}
    assert "roll" not in result  # a plain option rolls nothing
    scene = publisher.last("scene.update")
    assert (scene["scene_number"], scene["scene_id"], scene["title"]) == (
        2,
        "reef",
        "The Reef Gate",
    )
    assert scene["narration"].startswith("Aria chose: Row out to the reef.")


async def test_an_empty_skill_check_is_valid_and_restates_the_scene(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    await engine.handle_join(join_notice("aria"))
    publisher.clear()

    await engine.handle_action(action_request("skill_check", {}))

    assert publisher.types()[:2] == ["action.result", "scene.update"]
    result = publisher.last("action.result")
    assert result["outcome"] in ("success", "partial", "failure")
    assert result["roll"]["difficulty"] == 12  # the harbor's difficulty
    assert result["roll"]["modifier"] == 1  # wits, the scene's default skill
    scene = publisher.last("scene.update")
    assert (scene["scene_number"], scene["scene_id"]) == (1, "harbor")  # same scene, re-stated


async def test_a_successful_check_sets_the_flag_opens_the_option_and_inspires(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    dice.push(11)  # 11 + wits 1 = 12 vs 12: success
    await arena_engine.handle_action(action_request("skill_check", {"skill": "wits"}))

    result = publisher.last("action.result")
    assert result["outcome"] == "success"
    assert result["state"]["scene_flags"] == {"key": True}
    assert result["state"]["effects"] == ["inspired"]
    assert "A key!" in result["narration"]
    assert "secret" in [o["id"] for o in publisher.last("scene.update")["options"]]
    assert publisher.last("party.state")["characters"]["aria"]["effects"] == ["inspired"]

    with pytest.raises(EngineRejected, match="already made a skill check"):
        await arena_engine.handle_action(action_request("skill_check", {}))

    dice.push(2)  # inspired: +2 on the next roll, then spent
    await arena_engine.handle_action(action_request("choice", {"option": "leap"}))
    result = publisher.last("action.result")
    assert result["roll"]["modifier"] == 2 + 2  # agility 2 + inspired 2 (the arena's defaults)
    assert (result["roll"]["total"], result["outcome"]) == (6, "partial")  # 6 >= 10 - 4
    assert result["state"]["hp"] == 15  # harm_on_partial 5
    assert "inspired" not in result["state"]["effects"]
    assert publisher.last("scene.update")["scene_id"] == "pit"


async def test_an_unknown_option_is_rejected_and_leaves_no_trace(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    await engine.handle_join(join_notice("aria"))
    publisher.clear()
    before = await engine.run_state("run-1")

    with pytest.raises(
        EngineRejected, match=r"'fly' is not an option here; open options: row, swim"
    ):
        await engine.handle_action(action_request("choice", {"option": "fly"}))
    with pytest.raises(EngineRejected, match="not an option"):  # gated: the flag is not set
        await engine.handle_action(action_request("choice", {"option": "tide_path"}))

    assert publisher.published == []
    after = await engine.run_state("run-1")
    assert after is not None and before is not None
    assert len(after.refused) == 2  # remembered, to be refused again the same way
    after.refused.clear()
    assert after == before  # and nothing else changed
    assert await engine.chronicle("run-1") == []


async def test_an_action_refused_before_is_refused_again_not_worked_out_anew(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    """Chaos probe: party_sync lost its record of a refusal (Redis restarted empty), a client
    resent the same action_id once the party had moved on, and the engine worked it out again
    on the newer state and applied it, after the player and the party had been told it failed.
    A refused action_id is refused again with the same text, whatever the state is now."""
    dice.push(11)
    await arena_engine.handle_action(action_request("skill_check", {}, action_id="a1"))
    second = action_request("skill_check", {}, action_id="a2")
    with pytest.raises(EngineRejected, match="already made a skill check") as first:
        await arena_engine.handle_action(second)
    dice.push(2)
    await arena_engine.handle_action(action_request("choice", {"option": "leap"}, action_id="a3"))
    assert publisher.last("scene.update")["scene_id"] == "pit"  # a new scene: a check is fine
    chronicle, published = await arena_engine.chronicle("run-1"), list(publisher.published)
    dice.push(11)
    with pytest.raises(EngineRejected) as again:
        await arena_engine.handle_action(second)  # resent after party_sync forgot the refusal
    assert str(again.value) == str(first.value)
    assert await arena_engine.chronicle("run-1") == chronicle  # not applied
    assert publisher.published == published
    # a new action_id is worked out on the state as it is
    await arena_engine.handle_action(action_request("skill_check", {}, action_id="a4"))
    assert publisher.last("action.result")["action_id"] == "a4"


@pytest.mark.parametrize(
    ("action_type", "payload", "message"),
    [
        ("choice", {}, "missing 'option'"),
        ("choice", {"option": 5}, "must be an id"),
        ("choice", {"option": "row", "extra": 1}, "unknown payload key"),
        ("skill_check", {"skill": 3}, "skill name"),
        ("skill_check", {"skill": "juggling"}, "unknown skill 'juggling'"),
        ("combat", {"move": "dance"}, "'move' must be"),
        ("combat", {"move": "attack"}, "no fight here"),
        ("teleport", {}, "unknown action_type"),
    ],
)
async def test_malformed_or_misplaced_actions_are_rejected(
    engine: ReferenceEngine,
    publisher: RecordingPublisher,
    action_type: str,
    payload: dict[str, object],
    message: str,
) -> None:
    await engine.handle_join(join_notice("aria"))
    publisher.clear()
    with pytest.raises(EngineRejected, match=message):
        await engine.handle_action(action_request(action_type, payload))
    assert publisher.published == []


async def test_a_duplicate_action_id_changes_nothing_and_only_answers_again(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    await engine.handle_join(join_notice("aria"))
    action = action_request("skill_check", {})
    await engine.handle_action(action)
    published, state = list(publisher.published), await engine.run_state("run-1")

    await engine.handle_action(action)  # redelivered
    await engine.handle_action(
        action_request("choice", {"option": "row"}, action_id=action.action_id)
    )

    # Each delivery of the applied action_id (whatever its payload) gets the first answer again:
    # party_sync keeps the first it has; it is the answer if party_sync lost its record.
    first = next(p.payload for p in published if p.type == "action.result")
    assert publisher.published[: len(published)] == published
    again = publisher.published[len(published) :]
    assert [p.type for p in again] == ["action.result", "action.result"]
    for p in again:
        assert {k: p.payload[k] for k in first if k != "state"} == {
            k: v for k, v in first.items() if k != "state"
        }
    assert await engine.run_state("run-1") == state
    assert len(await engine.chronicle("run-1")) == 1


async def test_an_action_before_any_join_starts_the_run(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    await engine.handle_action(action_request("choice", {"option": "row"}, character_id="cy"))

    assert publisher.types() == ["scene.update", "action.result", "scene.update", "party.state"]
    assert [
        p.payload.get("scene_number") for p in publisher.published if p.type == "scene.update"
    ] == [1, 2]
    assert publisher.last("party.state")["characters"] == {
        "cy": {"hp": 20, "max_hp": 20, "effects": []}
    }


async def test_the_party_chooses_as_one_and_its_best_member_rolls(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    await arena_engine.handle_join(join_notice("aria"))
    await arena_engine.handle_join(join_notice("bram"))
    publisher.clear()
    dice.push(15)
    await arena_engine.handle_action(  # exactly what party_sync submits for a finished vote
        action_request(
            "choice",
            {"option": "leap", "vote_id": "v-1"},
            character_id="party",
            action_id="vote:v-1",
        )
    )

    result = publisher.last("action.result")
    assert result["character_id"] == "party"
    assert result["state"] == {"effects": [], "scene_flags": {}}  # a party has no HP
    assert result["roll"]["value"] == 15
    decision = (await arena_engine.chronicle("run-1"))[-1]
    assert decision.extra == {"rolled_by": "aria"}

    with pytest.raises(EngineRejected, match="Only a choice"):
        await arena_engine.handle_action(
            action_request("combat", {"move": "attack"}, character_id="party")
        )


async def test_the_party_cannot_act_with_nobody_in_it(arena_engine: ReferenceEngine) -> None:
    with pytest.raises(EngineRejected, match="no characters"):
        await arena_engine.handle_action(
            action_request("choice", {"option": "enter"}, character_id="party")
        )


async def test_harm_outside_combat_never_downs(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    dice.push(1)  # natural 1: failure, harm 50, and the destination is the same scene: stay
    await arena_engine.handle_action(action_request("choice", {"option": "leap"}))

    result = publisher.last("action.result")
    assert (result["outcome"], result["state"]["hp"], result["state"]["effects"]) == (
        "failure",
        1,
        [],
    )
    assert publisher.last("scene.update")["scene_number"] == 1  # stayed
    assert publisher.types()[-1] == "party.state"


async def test_the_l1_chronicle_records_each_decision(
    arena_engine: ReferenceEngine, dice: ScriptedRandom
) -> None:
    dice.push(8)  # 8 + 2 = 10 vs 10: success
    action = action_request("choice", {"option": "leap"}, trace_id="trace-leap")
    await arena_engine.handle_action(action)

    [decision] = await arena_engine.chronicle("run-1")
    assert (decision.seq, decision.action_id, decision.character_id) == (
        1,
        action.action_id,
        "aria",
    )
    assert (decision.scene_id, decision.scene_number, decision.outcome) == ("gate", 1, "success")
    assert decision.roll == {"die": "d20", "value": 8, "modifier": 2, "total": 10, "difficulty": 10}
    assert decision.trace_id == "trace-leap"
    assert decision.at == "2026-11-25T21:04:05.123Z"
    assert decision.changes["scene"] == {"from": "gate", "to": "pit", "scene_number": 2}
    assert decision.to_dict()["payload"] == {"option": "leap"}


async def test_a_finished_run_accepts_no_action(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    dice.push(20)
    await arena_engine.handle_action(action_request("skill_check", {}))
    await arena_engine.handle_action(action_request("choice", {"option": "secret"}))
    assert publisher.last("scene.update")["kind"] == "ending"
    assert publisher.last("scene.update")["options"] == []
    assert "difficulty" not in publisher.last("scene.update")
    assert publisher.last("party.state")["run_status"] == "finished"

    with pytest.raises(EngineRejected, match="campaign has ended"):
        await arena_engine.handle_action(action_request("skill_check", {}))


async def test_a_run_belongs_to_one_party(engine: ReferenceEngine) -> None:
    await engine.handle_join(join_notice("aria"))
    with pytest.raises(EngineRejected, match="another party"):
        await engine.handle_action(action_request("skill_check", {}, party_id="party-2"))


async def test_it_is_an_engine_and_the_fake_is_a_publisher(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    assert isinstance(engine, Engine)
    assert isinstance(publisher, EventPublisher)


async def test_a_late_join_names_a_character_that_acted_first(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    await engine.handle_action(action_request("skill_check", {}, character_id="cy"))
    publisher.clear()
    await engine.handle_join(join_notice("cy", "Cyrus"))  # no HP reset, nothing to publish
    assert publisher.published == []
    state = await engine.run_state("run-1")
    assert state is not None
    assert state.characters["cy"].name == "Cyrus"
    await engine.handle_join(join_notice("zed", party_id="party-2"))  # another party: ignored
    assert publisher.published == []
    assert await engine.run_state("run-1") == state


async def test_joins_to_another_partys_run_are_logged_once_a_minute_with_their_count(
    engine: ReferenceEngine, publisher: RecordingPublisher, caplog: pytest.LogCaptureFixture
) -> None:
    """Security probe: one WARNING per such join (1,485 in a few minutes of tokens minted for
    another party's run): now one a minute, the next one saying how many it left out."""
    await engine.handle_action(action_request("skill_check", {}, character_id="cy"))
    with caplog.at_level(logging.WARNING, logger="campaign_engine"):
        for n in range(50):
            await engine.handle_join(join_notice(f"zed{n}", party_id="party-2"))
    lines = [r.getMessage() for r in caplog.records if "another party" in r.getMessage()]
    assert lines == [
        "ignoring a join to run run-1 from another party (0 more since the last such line)"
    ]


async def test_a_runs_lock_goes_once_nothing_holds_it(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    """The engine serialises each run with a lock of its own; a plain dict kept one for every
    run the process ever served (churn probe)."""
    for n in range(5):
        await engine.handle_join(join_notice("aria", party_id=f"party-{n}", run_id=f"run-{n}"))
    assert len(engine._locks) == 0
    held = engine._lock("run-0")
    assert engine._lock("run-0") is held  # one lock per run while it is in use
