"""The chronicles: L1, every applied decision; L2, a summary of every scene visit that ended.

- **L1** (:class:`Decision`): one entry per applied action, appended in the same commit as the state
  change it produced — who, what (the payload), where (scene), the roll, the outcome, the
  narration, what changed (HP, effects, flags, enemies, scene), the ``trace_id`` and the server
  timestamp of the action. ``seq`` numbers a run's decisions from 1. The entry's ``action_id`` is
  unique per run: it is also the deduplication record of that action.
- **L2** (:class:`SceneSummary`): written when a scene visit ends — in the same commit as the
  decision that ended it — from the L1 entries of that visit: what happened, who did what, and how
  the scene ended (the party moved on, won or lost a fight). Entering an ending also writes the
  ending's own entry (``outcome`` ``"ending"``), so a finished run's L2 reads to its last page.

Both are plain-JSON records (``to_dict``/``from_dict``) so every store keeps them the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from campaign_engine.actions import PARTY_ACTOR
from campaign_engine.campaign import Campaign
from campaign_engine.events import clip
from campaign_engine.rules import Outcome
from campaign_engine.state import RunState

SceneOutcome = Literal["moved_on", "victory", "defeat", "ending"]

MAX_HAPPENED = 600  # one narration line of an L2 entry


@dataclass(frozen=True, slots=True)
class Decision:
    """One L1 chronicle entry: who did what, the roll, the outcome and what it changed.

    ``at`` is the server timestamp of the action (the engine never reads a clock of its own),
    ``trace_id`` ties the entry to the events and logs.
    """

    run_id: str
    seq: int
    action_id: str
    character_id: str
    action_type: str
    payload: Mapping[str, Any]
    scene_id: str
    scene_number: int
    outcome: Outcome
    roll: Mapping[str, Any] | None
    narration: str
    changes: Mapping[str, Any]
    trace_id: str
    at: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        return cls(**copy.deepcopy(dict(data)))


@dataclass(frozen=True, slots=True)
class SceneSummary:
    """One L2 chronicle entry: a scene visit (``scene_number``) from its first decision to its end.

    ``actors`` maps each actor's display name to what they did there, in order; ``happened`` is
    the visit's narration, one line per decision; ``text`` is the whole entry as one paragraph.
    """

    run_id: str
    scene_number: int
    scene_id: str
    title: str
    kind: str
    outcome: SceneOutcome
    next_scene_id: str | None
    next_scene_number: int | None
    decisions: list[int]  # the L1 seqs of the visit
    actors: dict[str, list[str]]
    happened: list[str]
    text: str
    trace_id: str  # of the decision that ended the scene
    at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SceneSummary:
        return cls(**copy.deepcopy(dict(data)))


def actor_name(state: RunState, character_id: str) -> str:
    if character_id == PARTY_ACTOR:
        return "The party"
    char = state.characters.get(character_id)
    return char.name if char is not None else character_id


def roll_text(roll: Mapping[str, Any]) -> str:
    """``d20 15+4 = 19 vs 15`` (the shape of protocol-v1's ``roll``)."""
    return (
        f"{roll['die']} {roll['value']}{int(roll['modifier']):+d} = {roll['total']} "
        f"vs {roll['difficulty']}"
    )


def deed(decision: Decision, state: RunState) -> str:
    """What one decision was, in a few words: ``chose leap: partial (d20 …), HP 20→15``."""
    p = decision.payload
    if decision.action_type == "choice":
        what = f"chose {p.get('option')}"
        if rolled_by := decision.extra.get("rolled_by"):
            what += f" ({actor_name(state, str(rolled_by))} rolled)"
    elif decision.action_type == "skill_check":
        what = f"made a {p['skill']} check" if p.get("skill") else "made a skill check"
    else:
        move = {"attack": "attacked", "defend": "defended"}.get(str(p.get("move")), "fought")
        what = f"{move} {p['target']}" if p.get("target") else move
    what += f": {decision.outcome}"
    if decision.roll:
        what += f" ({roll_text(decision.roll)})"
    hp = decision.changes.get("hp", {})
    hurt = [
        f"{actor_name(state, cid)} HP {c['from']}→{c['to']}"
        for cid, c in hp.items()
        if c.get("from") is not None
    ]
    return what + (", " + ", ".join(hurt) if hurt else "")


def _outcome(campaign: Campaign, closing: Decision, after: RunState) -> SceneOutcome:
    scene = campaign.scene(closing.scene_id)
    if scene.kind == "combat" and closing.action_type == "combat":
        won = after.combat is not None and all(hp == 0 for hp in after.combat.enemies.values())
        return "victory" if won else "defeat"
    return "moved_on"


def scene_summaries(
    campaign: Campaign, visit: Sequence[Decision], after: RunState
) -> list[SceneSummary]:
    """The L2 entries of a decision that moved the party on: the scene it left (``visit`` holds
    every decision of that visit, the closing one last) and, if it led into an ending, the
    ending's own entry. ``after`` is the run state after the closing decision."""
    closing = visit[-1]
    scene = campaign.scene(closing.scene_id)
    nxt = campaign.scene(after.scene_id)
    outcome = _outcome(campaign, closing, after)
    actors: dict[str, list[str]] = {}
    for decision in visit:
        actors.setdefault(actor_name(after, decision.character_id), []).append(
            deed(decision, after)
        )
    ending = {
        "moved_on": "The party moved on to",
        "victory": "Victory! The party moved on to",
        "defeat": "Defeat. The party ended up in",
    }[outcome] + f" {nxt.title} (scene {after.scene_number})."
    who = ". ".join(f"{name}: {'; '.join(deeds)}" for name, deeds in actors.items())
    n = len(visit)
    left = SceneSummary(
        run_id=after.run_id,
        scene_number=closing.scene_number,
        scene_id=scene.id,
        title=scene.title,
        kind=scene.kind,
        outcome=outcome,
        next_scene_id=nxt.id,
        next_scene_number=after.scene_number,
        decisions=[d.seq for d in visit],
        actors=actors,
        happened=[clip(d.narration, MAX_HAPPENED) for d in visit],
        text=f"Scene {closing.scene_number}, {scene.title}: {n} decision{'s' * (n != 1)}. "
        f"{who}. {ending}",
        trace_id=closing.trace_id,
        at=closing.at,
    )
    if nxt.kind != "ending":
        return [left]
    final = SceneSummary(
        run_id=after.run_id,
        scene_number=after.scene_number,
        scene_id=nxt.id,
        title=nxt.title,
        kind=nxt.kind,
        outcome="ending",
        next_scene_id=None,
        next_scene_number=None,
        decisions=[],
        actors={},
        happened=[clip(nxt.narration, MAX_HAPPENED)],
        text=f"Scene {after.scene_number}, {nxt.title}: the campaign ends. "
        f"{clip(nxt.narration, MAX_HAPPENED)}",
        trace_id=closing.trace_id,
        at=closing.at,
    )
    return [left, final]


__all__ = [
    "Decision",
    "SceneOutcome",
    "SceneSummary",
    "actor_name",
    "deed",
    "roll_text",
    "scene_summaries",
]
