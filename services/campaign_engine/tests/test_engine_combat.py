"""Fights, with every die scripted: hits, counterblows, defending, downed, victory and defeat.

The arena's pit: Rat (3 HP, AC 5, attack +0, 1d4) and Ogre (30 HP, AC 15, attack +5, 1d10).
Characters: 20 HP, attack +4, defense 12, damage 1d8+2. Dice order per turn: attack d20, damage
dice if it landed, the enemy's d20, its damage dice if it hit (see ``combat.py``).
"""

from __future__ import annotations

import pytest
from campaign_engine.engine import ReferenceEngine
from campaign_engine.testing import RecordingPublisher, ScriptedRandom, action_request, join_notice
from party_sync.engine import EngineRejected


async def enter_pit(engine: ReferenceEngine, publisher: RecordingPublisher, *chars: str) -> None:
    for char in chars:
        await engine.handle_join(join_notice(char))
    await engine.handle_action(action_request("choice", {"option": "enter"}, character_id=chars[0]))
    publisher.clear()


def hp_of(publisher: RecordingPublisher, combatant: str) -> int:
    combatants = publisher.last("combat.update")["combatants"]
    return int(next(c["hp"] for c in combatants if c["id"] == combatant))


async def test_entering_a_fight_publishes_the_fight(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    await arena_engine.handle_join(join_notice("aria"))
    publisher.clear()
    await arena_engine.handle_action(action_request("choice", {"option": "enter"}))

    assert publisher.types() == ["action.result", "scene.update", "combat.update"]
    scene = publisher.last("scene.update")
    assert (scene["kind"], scene["scene_number"]) == ("combat", 2)
    assert scene["options"] == [{"id": "run", "label": "Run for the gate"}]
    combat = publisher.last("combat.update")
    assert (combat["active"], combat["round"]) == (True, 1)
    assert combat["combatants"] == [
        {"id": "aria", "name": "Aria", "side": "party", "hp": 20, "max_hp": 20},
        {"id": "rat", "name": "Rat", "side": "enemy", "hp": 3, "max_hp": 3},
        {"id": "ogre", "name": "Ogre", "side": "enemy", "hp": 30, "max_hp": 30},
    ]


async def test_an_attack_hits_and_the_target_strikes_back(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    await enter_pit(arena_engine, publisher, "aria")
    dice.push(11, 3, 7, 6)  # 11+4=15 vs AC 15 hits; 3+2=5 damage; ogre 7+5=12 vs 12 hits for 6
    await arena_engine.handle_action(
        action_request("combat", {"move": "attack", "target": "ogre"}, trace_id="t-hit")
    )

    assert publisher.types() == ["action.result", "scene.update", "combat.update", "party.state"]
    assert {e.trace_id for e in publisher.published} == {"t-hit"}
    result = publisher.last("action.result")
    assert result["outcome"] == "success"
    assert result["roll"] == {
        "die": "d20",
        "value": 11,
        "modifier": 4,
        "total": 15,
        "difficulty": 15,
    }
    assert result["state"]["hp"] == 14
    assert (hp_of(publisher, "ogre"), hp_of(publisher, "aria")) == (25, 14)
    assert publisher.last("combat.update")["round"] == 2  # the only character has acted
    assert publisher.last("party.state")["characters"]["aria"]["hp"] == 14
    assert publisher.last("scene.update")["scene_id"] == "pit"


async def test_a_glancing_blow_deals_half_and_a_miss_nothing(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    await enter_pit(arena_engine, publisher, "aria")
    dice.push(7, 8, 1)  # 7+4=11 vs 15: partial; (8+2)//2 = 5; ogre rolls a natural 1: miss
    await arena_engine.handle_action(action_request("combat", {"move": "attack", "target": "ogre"}))
    assert publisher.last("action.result")["outcome"] == "partial"
    assert hp_of(publisher, "ogre") == 25
    assert publisher.types() == ["action.result", "scene.update", "combat.update"]  # no HP lost

    dice.push(2, 1)  # 2+4=6 vs 15: failure, no damage dice; ogre misses again
    await arena_engine.handle_action(action_request("combat", {"move": "attack", "target": "ogre"}))
    assert publisher.last("action.result")["outcome"] == "failure"
    assert hp_of(publisher, "ogre") == 25


async def test_defending_raises_defense_until_the_next_action(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    await enter_pit(arena_engine, publisher, "aria")
    dice.push(10)  # ogre: 10+5=15 would hit defense 12, not 12+4=16
    await arena_engine.handle_action(action_request("combat", {"move": "defend", "target": "ogre"}))
    result = publisher.last("action.result")
    assert (result["outcome"], result["state"]["hp"]) == ("success", 20)
    assert result["state"]["effects"] == ["defending"]
    assert "roll" not in result

    dice.push(2, 10, 4)  # the stance ends when aria acts again: the same 10 now hits
    await arena_engine.handle_action(action_request("combat", {"move": "attack", "target": "ogre"}))
    assert publisher.last("action.result")["state"] == {
        "hp": 16,
        "max_hp": 20,
        "effects": [],
        "scene_flags": {},
    }


async def test_a_downed_character_cannot_act(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    await enter_pit(arena_engine, publisher, "aria", "bram")
    dice.push(2, 1)  # bram misses the ogre, the ogre misses bram: bram is in the fight, standing
    await arena_engine.handle_action(
        action_request("combat", {"move": "attack", "target": "ogre"}, character_id="bram")
    )
    dice.push(2, 20, 10)  # aria misses; the ogre's natural 20 hits for 10 ...
    await arena_engine.handle_action(action_request("combat", {"move": "attack", "target": "ogre"}))
    dice.push(2, 20, 10)  # ... and again: 20 - 10 - 10 = 0
    await arena_engine.handle_action(action_request("combat", {"move": "attack", "target": "ogre"}))

    result = publisher.last("action.result")
    assert (result["state"]["hp"], result["state"]["effects"]) == (0, ["downed"])
    assert publisher.last("party.state")["characters"]["aria"] == {
        "hp": 0,
        "max_hp": 20,
        "effects": ["downed"],
    }
    assert publisher.last("scene.update")["scene_id"] == "pit"  # bram still stands: no defeat
    publisher.clear()

    for action_type, payload in [
        ("combat", {"move": "defend"}),
        ("skill_check", {}),
        ("choice", {"option": "run"}),
    ]:
        with pytest.raises(EngineRejected, match="Aria is downed and cannot act"):
            await arena_engine.handle_action(action_request(action_type, payload))
    assert publisher.published == []


async def test_victory_moves_on_and_gets_the_downed_back_up(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    await enter_pit(arena_engine, publisher, "aria", "bram")
    dice.push(2, 1)  # bram joins the fight (a miss each way), so aria's fall is not a defeat
    await arena_engine.handle_action(
        action_request("combat", {"move": "attack", "target": "ogre"}, character_id="bram")
    )
    dice.push(2, 20, 10, 2, 20, 10)  # aria misses the ogre twice and is downed by its counters
    for _ in range(2):
        await arena_engine.handle_action(
            action_request("combat", {"move": "attack", "target": "ogre"})
        )
    assert publisher.last("combat.update")["combatants"][0]["hp"] == 0
    dice.push(10, 1)  # bram: 10+4=14 vs AC 5 hits the rat for 1+2=3: it falls, no counterblow
    await arena_engine.handle_action(
        action_request("combat", {"move": "attack", "target": "rat"}, character_id="bram")
    )
    with pytest.raises(EngineRejected, match="already defeated"):
        await arena_engine.handle_action(
            action_request("combat", {"move": "attack", "target": "rat"}, character_id="bram")
        )
    with pytest.raises(EngineRejected, match="no enemy 'dragon' here"):
        await arena_engine.handle_action(
            action_request("combat", {"move": "attack", "target": "dragon"}, character_id="bram")
        )
    publisher.clear()

    # natural 20s for 8+2 damage; the ogre's counterblows miss (1s); the last blow fells it
    dice.push(20, 8, 1, 20, 8, 1, 20, 8)
    for _ in range(3):
        await arena_engine.handle_action(
            action_request("combat", {"move": "attack"}, character_id="bram")
        )

    last_four = ["action.result", "scene.update", "combat.update", "party.state"]
    assert publisher.types()[-4:] == last_four
    combat = publisher.last("combat.update")
    assert combat["active"] is False
    assert all(c["hp"] == 0 for c in combat["combatants"] if c["side"] == "enemy")
    assert "Victory" in combat["narration"]
    scene = publisher.last("scene.update")
    assert (scene["scene_id"], scene["kind"], scene["scene_number"]) == ("won", "ending", 3)
    party = publisher.last("party.state")
    assert party["run_status"] == "finished"
    assert party["characters"]["aria"] == {"hp": 1, "max_hp": 20, "effects": []}


async def test_defeat_when_everyone_who_fought_is_downed(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    await enter_pit(arena_engine, publisher, "aria", "bram")  # bram never fights
    dice.push(2, 20, 10, 2, 20, 10)
    await arena_engine.handle_action(action_request("combat", {"move": "attack", "target": "ogre"}))
    await arena_engine.handle_action(action_request("combat", {"move": "attack", "target": "ogre"}))

    combat = publisher.last("combat.update")
    assert combat["active"] is False
    assert publisher.last("scene.update")["scene_id"] == "lost"
    assert publisher.last("party.state")["run_status"] == "finished"


async def test_rounds_advance_when_everyone_standing_has_acted(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    await enter_pit(arena_engine, publisher, "aria", "bram")
    dice.push(*[1] * 8)  # every d20 a natural 1: misses all round
    rounds = []
    for char in ("aria", "aria", "bram", "aria"):
        await arena_engine.handle_action(
            action_request("combat", {"move": "attack", "target": "ogre"}, character_id=char)
        )
        rounds.append(publisher.last("combat.update")["round"])
    # aria acts (round 1 goes on), aria again (round 2 begins), bram completes it, aria opens 3
    assert rounds == [1, 2, 3, 3]


async def test_a_newcomer_joins_the_fight(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    await enter_pit(arena_engine, publisher, "aria")
    await arena_engine.handle_join(join_notice("cy", "Cy"))
    assert publisher.types() == ["scene.update", "combat.update", "party.state"]
    names = [c["name"] for c in publisher.last("combat.update")["combatants"]]
    assert names == ["Aria", "Cy", "Rat", "Ogre"]


async def test_fleeing_ends_the_fight_and_combat_moves_need_a_fight(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    await enter_pit(arena_engine, publisher, "aria")
    await arena_engine.handle_action(action_request("choice", {"option": "run"}))
    assert publisher.types() == ["action.result", "scene.update", "combat.update"]
    assert publisher.last("combat.update")["active"] is False
    assert publisher.last("scene.update")["scene_number"] == 3
    with pytest.raises(EngineRejected, match="no fight here"):
        await arena_engine.handle_action(action_request("combat", {"move": "attack"}))


async def test_inspiration_is_spent_on_the_next_attack(
    arena_engine: ReferenceEngine, publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    await enter_pit(arena_engine, publisher, "aria")
    dice.push(20)  # a plain check in the fight: success, inspired
    await arena_engine.handle_action(action_request("skill_check", {}))
    assert publisher.last("action.result")["state"]["effects"] == ["inspired"]
    assert "combat.update" in publisher.types()  # in a fight, every action reports it
    dice.push(9, 1, 1)  # 9+4+2 = 15 vs AC 15: the bonus makes it a hit
    await arena_engine.handle_action(action_request("combat", {"move": "attack", "target": "ogre"}))
    result = publisher.last("action.result")
    assert (result["roll"]["modifier"], result["outcome"]) == (6, "success")
    assert result["state"]["effects"] == []
