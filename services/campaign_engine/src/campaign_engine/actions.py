"""The payload each ``action_type`` takes, parsed strictly into a typed action.

The protocol leaves ``action.request``'s ``payload`` to the engine (protocol-v1: "action-type
specific; engine documents it"), so this module *is* that documentation; ``ACTION_PAYLOADS`` is
printed by ``campaign-engine describe`` and copied into the README. Parsing is strict (unknown keys
and wrong types are refused) so that a typo in a client surfaces as a clear ``action_rejected``
instead of an action that silently did something else.

Only the payload's *shape* is checked here; whether the option exists in the current scene, the
target is alive or the character can act is the game's business (``game.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from party_sync.engine import EngineRejected

#: ``character_id`` of actions taken on the party's behalf (a finished vote applies its winner as
#: a ``choice`` by "party"; protocol-v1, vote.finished ``applied``). Only choices may use it.
PARTY_ACTOR: Final = "party"

CombatMoveName = Literal["attack", "defend"]
_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@dataclass(frozen=True, slots=True)
class Choice:
    """Pick one of the options the current scene offers (``{"option": "row"}``).

    ``vote_id`` is set when party_sync applies a finished party vote (``{"option", "vote_id"}``).
    """

    option: str
    vote_id: str | None = None


@dataclass(frozen=True, slots=True)
class SkillCheck:
    """A plain check against the current scene's difficulty; ``skill`` defaults to the scene's."""

    skill: str | None = None


@dataclass(frozen=True, slots=True)
class CombatMove:
    """One turn in a fight: ``attack`` a target (default: the first enemy standing), or ``defend``.

    ``defend`` also names the enemy to brace against (``target``, default the first standing).
    """

    move: CombatMoveName
    target: str | None = None


Action = Choice | SkillCheck | CombatMove

#: One line per action_type: the payload it takes (shown by the CLI and the README).
ACTION_PAYLOADS: Final[dict[str, str]] = {
    "choice": '{"option": "<id of an option the current scene offers>"}',
    "skill_check": '{} or {"skill": "<skill name>"}  (default: the scene\'s skill)',
    "combat": '{"move": "attack" | "defend", "target": "<enemy id>"}  (target optional)',
}


def _keys(payload: Mapping[str, Any], action_type: str, allowed: set[str]) -> None:
    if unknown := sorted(map(str, payload.keys() - allowed)):
        shown = ", ".join(repr(k) for k in unknown)
        expected = ACTION_PAYLOADS[action_type]
        raise EngineRejected(f"{action_type}: unknown payload key(s) {shown}; expected {expected}")


def _id(payload: Mapping[str, Any], key: str, action_type: str) -> str:
    value = payload[key]
    if not isinstance(value, str) or not _ID.match(value):
        raise EngineRejected(f"{action_type}: '{key}' must be an id string, got {value!r:.80}")
    return value


def parse_action(action_type: str, payload: Mapping[str, Any]) -> Action:
    """Parse ``payload`` for ``action_type``; raise ``EngineRejected`` saying what is wrong."""
    if not isinstance(payload, Mapping):
        raise EngineRejected(f"{action_type}: the payload must be an object")
    if action_type == "choice":
        # party_sync applies a finished vote as the party's choice {"option", "vote_id"}
        # (protocol-v1, Votes): the vote's id says which vote it settles (see votes.py).
        _keys(payload, action_type, {"option", "vote_id"})
        if "option" not in payload:
            raise EngineRejected(f"choice: missing 'option'; expected {ACTION_PAYLOADS['choice']}")
        vote_id = _id(payload, "vote_id", action_type) if "vote_id" in payload else None
        return Choice(_id(payload, "option", action_type), vote_id)
    if action_type == "skill_check":
        _keys(payload, action_type, {"skill"})
        skill = payload.get("skill")
        if skill is not None and (not isinstance(skill, str) or not 1 <= len(skill) <= 32):
            raise EngineRejected("skill_check: 'skill' must be a skill name (a short string)")
        return SkillCheck(skill)
    if action_type == "combat":
        _keys(payload, action_type, {"move", "target"})
        move = payload.get("move")
        if move not in ("attack", "defend"):
            raise EngineRejected(f'combat: \'move\' must be "attack" or "defend", got {move!r:.40}')
        target = _id(payload, "target", action_type) if payload.get("target") is not None else None
        return CombatMove(move, target)
    raise EngineRejected(
        f"unknown action_type {action_type!r:.40}; expected one of {', '.join(ACTION_PAYLOADS)}"
    )
