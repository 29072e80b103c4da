"""One combat turn: a character attacks or defends, and the enemy facing them strikes back.

Pure like the rest of the game logic: it mutates the ``RunState`` copy it is given, draws only
from the ``random.Random`` it is passed, and raises ``EngineRejected`` *before* changing anything
when the move is invalid. Whether the fight is won or lost is reported, not acted on: moving the
party to the victory or defeat scene is ``game.Game``'s job, like every other transition.

Turn order is free (a realtime party cannot wait for an absent player): each ``combat`` action is
one character's turn. A round ends when every standing character has acted; a character who acts
again before that starts the next round. Only the enemy the character faced strikes back, so a
kill spares the attacker the counterblow.

Dice are drawn in a fixed order — the attack d20, the damage dice if it landed, the enemy's d20,
its damage dice if it hit — so a seeded game replays exactly and a test can script each die.

Victory: every enemy at 0 HP. Defeat: every character who has taken part in the fight (acted in
it at least once) is downed; characters who never joined in do not hold the fight open.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from party_sync.engine import EngineRejected

from campaign_engine.actions import CombatMove
from campaign_engine.campaign import Campaign, Enemy, Scene
from campaign_engine.rules import (
    INSPIRED_BONUS,
    Outcome,
    Roll,
    apply_damage,
    attack_damage,
    defense_of,
    roll_check,
    roll_d20,
    strike_hits,
)
from campaign_engine.state import DEFENDING, DOWNED, INSPIRED, CharacterState, RunState

FightStatus = Literal["continue", "victory", "defeat"]


@dataclass(frozen=True, slots=True)
class TurnResult:
    outcome: Outcome
    roll: Roll | None
    narration: str
    status: FightStatus


def _pick_target(scene: Scene, hp: dict[str, int], target: str | None) -> Enemy:
    standing = [e for e in scene.enemies if hp.get(e.id, 0) > 0]
    if target is None:
        return standing[0]  # a live fight always has a standing enemy
    enemy = scene.enemy(target)
    if enemy is None:
        ids = ", ".join(e.id for e in standing)
        raise EngineRejected(f"combat: no enemy {target!r} here; enemies standing: {ids}")
    if hp.get(enemy.id, 0) <= 0:
        raise EngineRejected(f"combat: {enemy.name} is already defeated")
    return enemy


def take_turn(
    campaign: Campaign,
    state: RunState,
    char: CharacterState,
    move: CombatMove,
    rng: random.Random,
) -> TurnResult:
    """Resolve ``char``'s ``move`` in the current fight (the caller checked the char can act)."""
    combat = state.combat
    if combat is None or not combat.active:
        raise EngineRejected("combat: there is no fight here; combat moves need a combat scene")
    scene = campaign.scene(combat.scene_id)
    enemy = _pick_target(scene, combat.enemies, move.target)  # may reject: nothing changed yet

    if char.character_id in combat.acted:  # acting twice: the next round has begun
        combat.round += 1
        combat.acted.clear()
    combat.acted.append(char.character_id)
    if char.character_id not in combat.participants:
        combat.participants.append(char.character_id)
    char.remove_effect(DEFENDING)  # a defensive stance lasts until the character's next action

    lines: list[str] = []
    roll: Roll | None = None
    if move.move == "attack":
        bonus = INSPIRED_BONUS if char.remove_effect(INSPIRED) else 0
        roll = roll_check(rng, campaign.character.attack + bonus, enemy.armor_class)
        outcome = roll.outcome
        rolled = campaign.character.damage.roll(rng) if outcome != "failure" else 0
        damage = attack_damage(outcome, rolled)
        combat.enemies[enemy.id] = apply_damage(combat.enemies[enemy.id], damage)
        left = combat.enemies[enemy.id]
        verdict = {"success": "hits", "partial": "lands a glancing blow", "failure": "misses"}
        line = f"{char.name} attacks {enemy.name} ({roll.describe()}) and {verdict[outcome]}"
        if damage:
            line += f" for {damage}" + (
                f"; {enemy.name} falls" if left == 0 else f" ({left} HP left)"
            )
        lines.append(line + ".")
    else:
        char.add_effect(DEFENDING)
        lines.append(f"{char.name} raises their guard against {enemy.name}.")
        outcome = "success"

    if combat.enemies[enemy.id] > 0:  # a standing enemy strikes back at the one who faced it
        value = roll_d20(rng)
        defense = defense_of(campaign.character.defense, defending=DEFENDING in char.effects)
        strike = Roll(value, enemy.attack, defense).describe()
        if strike_hits(value, enemy.attack, defense):
            damage = enemy.damage.roll(rng)
            char.hp = apply_damage(char.hp, damage)
            lines.append(
                f"{enemy.name} strikes back ({strike}) for {damage} ({char.hp}/{char.max_hp} HP)."
            )
            if move.move == "defend":
                outcome = "partial"
            if char.hp == 0:
                char.effects[:] = [DOWNED]
                lines.append(f"{char.name} is downed!")
        else:
            lines.append(f"{enemy.name} strikes back ({strike}) and misses.")

    status: FightStatus = "continue"
    if all(hp == 0 for hp in combat.enemies.values()):
        status = "victory"
        lines.append("The last enemy falls. Victory!")
    elif all(state.character(cid).downed for cid in combat.participants):
        status = "defeat"
        lines.append("No one is left standing.")
    elif all(c.character_id in combat.acted for c in state.characters.values() if not c.downed):
        combat.round += 1  # everyone standing has acted: the next round begins
        combat.acted.clear()
    combat.last = " ".join(lines)
    return TurnResult(outcome, roll, combat.last, status)
