"""The events the engine publishes, built exactly as protocol-v1 defines their payloads.

Four types (``party_sync.engine.interface.ENGINE_EVENT_TYPES``): ``action.result``,
``scene.update``, ``combat.update`` and ``party.state``. After every applied action the engine
publishes, in this order and with the action's ``trace_id``:

1. ``action.result`` — the outcome for the acting character and their state afterwards;
2. ``scene.update`` — always, even if the scene did not change (it then re-states the scene, its
   narration led by what just happened), so a client only ever has to render the latest one;
3. ``combat.update`` — if the action happened in a fight or led into one (``active`` false once
   the fight is over);
4. ``party.state`` — if the run status or a character (HP, effects, the roster) changed since the
   last ``party.state`` published; it carries the current ``scene_number`` too.

When party_sync lost a party's state, the engine re-states it (:func:`restate_events`):
``scene.update`` (the scene as it stands, with its open options), ``combat.update`` if a fight is
on, and ``party.state`` always, whatever was published before (party_sync has lost that too).

Texts are clipped to the schema's limits here, so no campaign text can make an event invalid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from campaign_engine.actions import PARTY_ACTOR
from campaign_engine.game import Applied, Game
from campaign_engine.state import RunState

Event = tuple[str, dict[str, Any]]

MAX_ACTION_NARRATION: Final = 4000  # protocol-v1: action.result narration <= 4000
MAX_SCENE_NARRATION: Final = 8000  # protocol-v1: scene.update narration <= 8000


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def actor_state(state: RunState, actor_id: str) -> dict[str, Any]:
    """The actor's state after the action: a ``character_state``, or for the party as a whole
    (``PARTY_ACTOR``) a ``party_action_state``, which has no HP (common.json).

    ``scene_flags`` are *all* flags of the current scene, not only those the action set: a client
    that missed an event still ends up with the right flags.
    """
    flags = dict(state.scene_flags)
    if actor_id == PARTY_ACTOR:
        return {"effects": [], "scene_flags": flags}
    char = state.character(actor_id)
    return {
        "hp": char.hp,
        "max_hp": char.max_hp,
        "effects": list(char.effects),
        "scene_flags": flags,
    }


def action_result(
    state: RunState, action_id: str, actor_id: str, action_type: str, applied: Applied
) -> dict[str, Any]:
    roll = applied.roll.to_payload() if applied.roll is not None else None
    return result_payload(
        state, action_id, actor_id, action_type, applied.outcome, applied.narration, roll
    )


def result_payload(
    state: RunState,
    action_id: str,
    actor_id: str,
    action_type: str,
    outcome: str,
    narration: str,
    roll: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """An ``action.result`` payload: what the action did, and the actor's state in ``state``
    (after the action; for an answer given again, as it is now: ``ReferenceEngine``)."""
    payload: dict[str, Any] = {
        "action_id": action_id,
        "character_id": actor_id,
        "action_type": action_type,
        "outcome": outcome,
        "state": actor_state(state, actor_id),
        "narration": clip(narration, MAX_ACTION_NARRATION),
    }
    if roll is not None:
        payload["roll"] = dict(roll)
    return payload


def scene_update(game: Game, state: RunState, note: str = "") -> dict[str, Any]:
    """The current scene; ``note`` (what just happened) leads the narration."""
    scene = game.scene(state)
    narration = f"{note}\n\n{scene.narration}" if note else scene.narration
    payload: dict[str, Any] = {
        "scene_number": state.scene_number,
        "scene_id": scene.id,
        "title": scene.title,
        "narration": clip(narration, MAX_SCENE_NARRATION),
        "options": [{"id": o.id, "label": o.label} for o in game.open_options(state)],
        "kind": scene.kind,
    }
    if scene.kind != "ending":
        payload["difficulty"] = scene.difficulty
    return payload


def combat_update(game: Game, state: RunState) -> dict[str, Any]:
    """The fight of ``state.combat`` (the caller checked there is one), both sides with HP."""
    combat = state.combat
    assert combat is not None
    scene = game.campaign.scene(combat.scene_id)
    party = [
        {"id": c.character_id, "name": c.name, "side": "party", "hp": c.hp, "max_hp": c.max_hp}
        for c in state.characters.values()
    ]
    enemies = [
        {"id": e.id, "name": e.name, "side": "enemy", "hp": combat.enemies[e.id], "max_hp": e.hp}
        for e in scene.enemies
    ]
    payload: dict[str, Any] = {
        "active": combat.active,
        "round": combat.round,
        "combatants": party + enemies,
    }
    if combat.last:
        payload["narration"] = clip(combat.last, MAX_ACTION_NARRATION)
    return payload


def party_state(state: RunState) -> dict[str, Any]:
    run_status = "finished" if state.status == "finished" else "in_progress"
    return {
        "status": "active",
        "run_status": run_status,
        "scene_number": state.scene_number,
        "characters": {
            c.character_id: {"hp": c.hp, "max_hp": c.max_hp, "effects": list(c.effects)}
            for c in state.characters.values()
        },
    }


def party_state_if_changed(state: RunState) -> list[Event]:
    """``party.state`` if the run status or a character (roster, HP, effects) changed since the
    last one published; a scene change alone does not count (``scene.update`` says it)."""
    current, last = party_state(state), state.published_party_state
    if last is not None and all(current[k] == last.get(k) for k in ("run_status", "characters")):
        return []
    return [("party.state", current)]


def action_events(
    game: Game,
    state: RunState,
    *,
    action_id: str,
    actor_id: str,
    action_type: str,
    applied: Applied,
    was_in_combat: bool,
) -> list[Event]:
    """Everything one applied action publishes, in protocol order (see the module docstring)."""
    events: list[Event] = [
        ("action.result", action_result(state, action_id, actor_id, action_type, applied)),
        ("scene.update", scene_update(game, state, applied.narration)),
    ]
    if was_in_combat or state.in_combat:
        events.append(("combat.update", combat_update(game, state)))
    return events + party_state_if_changed(state)


def scene_events(game: Game, state: RunState, note: str = "") -> list[Event]:
    """The current scene (led by ``note``), and the fight if there is one going on."""
    events: list[Event] = [("scene.update", scene_update(game, state, note))]
    if state.in_combat:
        events.append(("combat.update", combat_update(game, state)))
    return events


def opening_events(game: Game, state: RunState) -> list[Event]:
    """What a party sees when its run starts: the first scene (and its fight, if it opens one)."""
    return scene_events(game, state)


def restate_events(game: Game, state: RunState) -> list[Event]:
    """The party's current state, for a party_sync that lost it: the scene (its plain narration
    and open options), the fight if one is on, and ``party.state`` (the run status, every
    character), unconditionally. The same state gives the same events (re-stating is idempotent).
    """
    return [*scene_events(game, state), ("party.state", party_state(state))]
