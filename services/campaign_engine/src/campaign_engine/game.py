"""The game: what an action does to a run. Pure — no I/O, no clock, randomness injected.

:class:`Game` binds a campaign to a ``random.Random`` and applies typed actions (``actions.py``) to
a ``RunState``. It mutates the state it is given; the engine hands it a copy and commits that copy
only if the action was applied, so an action refused halfway (``EngineRejected``) leaves nothing
behind. Every refusal says what would have been valid, because the message goes to the player.

Rules of movement (see also ``campaign.py``):

- entering a scene (a *new* scene id) increments ``scene_number`` and clears the scene's flags
  and who has made a plain check there; entering a combat scene starts a fight with every enemy
  at full HP; entering an ending finishes the run;
- leaving a fight, however it ended (victory, defeat, flight), gets downed characters back up with
  1 HP and drops ``defending`` — so nobody is stuck unable to act in the next scene.

Plain ``skill_check``: once per character per scene visit (rolling until it works is not a plan).
Success sets the scene's flag (if it has one; it may open an option) and leaves the character
``inspired`` (+2 on their next d20, then spent); a partial success sets the flag only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from party_sync.engine import EngineRejected

from campaign_engine.actions import PARTY_ACTOR, Action, Choice, CombatMove, SkillCheck
from campaign_engine.campaign import Campaign, Option, Scene
from campaign_engine.combat import take_turn
from campaign_engine.rules import INSPIRED_BONUS, Outcome, Roll, apply_harm, roll_check
from campaign_engine.state import (
    DEFENDING,
    DOWNED,
    INSPIRED,
    CharacterState,
    CombatState,
    RunState,
)


@dataclass(frozen=True, slots=True)
class Applied:
    """What an applied action did: enough for ``action.result`` and the L1 chronicle."""

    outcome: Outcome
    narration: str
    roll: Roll | None = None
    rolled_by: str | None = None  # who rolled, when the party (not a character) acted


class Game:
    def __init__(self, campaign: Campaign, rng: random.Random) -> None:
        self.campaign = campaign
        self.rng = rng

    def scene(self, state: RunState) -> Scene:
        return self.campaign.scene(state.scene_id)

    def open_options(self, state: RunState) -> list[Option]:
        """The current scene's options whose required flag (if any) is set."""
        return [
            o
            for o in self.scene(state).options
            if o.requires is None or state.scene_flags.get(o.requires, False)
        ]

    # --- run lifecycle ---------------------------------------------------------------------

    def start(self, state: RunState) -> bool:
        """Enter the first scene if the run has not started; report whether it did."""
        if state.status != "pending":
            return False
        state.status = "in_progress"
        self.enter(state, self.campaign.start)
        return True

    def register(self, state: RunState, character_id: str, name: str | None = None) -> bool:
        """Add a character at full HP, or rename one (a join knows the display name, an action
        does not); never resets a character. Reports whether anything changed."""
        if character_id == PARTY_ACTOR:
            return False
        existing = state.characters.get(character_id)
        if existing is not None:
            if name and existing.name != name:
                existing.name = name
                return True
            return False
        hp = self.campaign.character.max_hp
        state.characters[character_id] = CharacterState(character_id, name or character_id, hp, hp)
        return True

    def enter(self, state: RunState, scene_id: str) -> bool:
        """Move the party to ``scene_id``; "entering" the current scene is staying (False)."""
        if scene_id == state.scene_id:
            return False
        if state.combat is not None and state.combat.active:
            state.combat.active = False
            for char in state.characters.values():
                char.remove_effect(DEFENDING)
                if char.remove_effect(DOWNED):
                    char.hp = 1
        scene = self.campaign.scene(scene_id)
        state.scene_id = scene_id
        state.scene_number += 1
        state.scene_flags = {}
        state.checked = []
        if scene.kind == "combat":
            state.combat = CombatState(scene.id, {e.id: e.hp for e in scene.enemies})
        if scene.kind == "ending":
            state.status = "finished"
        return True

    # --- actions ---------------------------------------------------------------------------

    def apply(self, state: RunState, actor_id: str, action: Action) -> Applied:
        """Apply ``action`` by ``actor_id`` (a registered character, or ``PARTY_ACTOR``)."""
        if state.status == "finished":
            raise EngineRejected("The campaign has ended; no more actions are possible.")
        if actor_id == PARTY_ACTOR:
            if not state.characters:
                raise EngineRejected("The party has no characters yet.")
            if not isinstance(action, Choice):
                raise EngineRejected("Only a choice can be made on the party's behalf.")
            return self._choose(state, None, action)
        char = state.character(actor_id)
        if char.downed:
            raise EngineRejected(f"{char.name} is downed and cannot act until the fight ends.")
        if isinstance(action, Choice):
            return self._choose(state, char, action)
        if isinstance(action, SkillCheck):
            return self._skill_check(state, char, action)
        return self._fight(state, char, action)

    def _champion(self, state: RunState, skill: str) -> CharacterState:
        """Who rolls when the party acts as one: the standing character best at ``skill``."""
        standing = [c for c in state.characters.values() if not c.downed]
        if not standing:
            raise EngineRejected("Nobody in the party can act right now.")
        # Everyone shares the campaign's modifiers, so this is the first to join, but a campaign
        # with per-character modifiers only has to change the key.
        return max(standing, key=lambda c: self.campaign.character.skills[skill])

    def _choose(self, state: RunState, char: CharacterState | None, choice: Choice) -> Applied:
        open_ids = [o.id for o in self.open_options(state)]
        option = self.scene(state).option(choice.option)
        if option is None or option.id not in open_ids:
            shown = ", ".join(open_ids) or "none (this is a fight: use combat moves)"
            raise EngineRejected(f"{choice.option!r} is not an option here; open options: {shown}")
        who = char.name if char else "The party"
        if option.check is None:
            assert option.next is not None  # campaign validation: exactly one of next / check
            self.enter(state, option.next)
            return Applied("success", f"{who} chose: {option.label}.")
        check = option.check
        roller = char or self._champion(state, check.skill)
        bonus = INSPIRED_BONUS if roller.remove_effect(INSPIRED) else 0
        roll = roll_check(
            self.rng, self.campaign.character.skills[check.skill] + bonus, check.difficulty
        )
        outcome = roll.outcome
        line = f"{who} chose: {option.label}. {roller.name} rolls {check.skill} ({roll.describe()})"
        line += {
            "success": ": success.",
            "partial": ": success, at a cost.",
            "failure": ": failure.",
        }[outcome]
        if harm := check.harm(outcome):
            roller.hp = apply_harm(roller.hp, harm)
            line += f" {roller.name} is hurt ({roller.hp}/{roller.max_hp} HP)."
        self.enter(state, check.destination(outcome))
        rolled_by = roller.character_id if char is None else None
        return Applied(outcome, line, roll, rolled_by=rolled_by)

    def _skill_check(self, state: RunState, char: CharacterState, action: SkillCheck) -> Applied:
        scene = self.scene(state)
        skill = action.skill or scene.check.skill
        if skill not in self.campaign.character.skills:
            known = ", ".join(self.campaign.character.skills)
            raise EngineRejected(f"skill_check: unknown skill {skill!r}; skills: {known}")
        if char.character_id in state.checked:
            raise EngineRejected(f"{char.name} has already made a skill check in this scene.")
        state.checked.append(char.character_id)
        bonus = INSPIRED_BONUS if char.remove_effect(INSPIRED) else 0
        roll = roll_check(self.rng, self.campaign.character.skills[skill] + bonus, scene.difficulty)
        outcome = roll.outcome
        if outcome != "failure" and scene.check.flag:
            state.scene_flags[scene.check.flag] = True
        if outcome == "success":
            char.add_effect(INSPIRED)
        line = f"{char.name} tries {skill} ({roll.describe()}): {scene.check.text(outcome)}"
        return Applied(outcome, line, roll)

    def _fight(self, state: RunState, char: CharacterState, move: CombatMove) -> Applied:
        scene = self.scene(state)
        turn = take_turn(self.campaign, state, char, move, self.rng)
        if turn.status == "victory" and scene.on_victory:
            self.enter(state, scene.on_victory)
        elif turn.status == "defeat" and scene.on_defeat:
            self.enter(state, scene.on_defeat)
        return Applied(turn.outcome, turn.narration, turn.roll)
