"""A campaign as data: scenes, the options that link them, checks, enemies, endings.

A campaign is authored as a JSON-compatible mapping (a file for ``CAMPAIGN_ENGINE_CAMPAIGN``, or
the built-in "The Sunken Lantern" in ``sunken_lantern.py``) and parsed here into frozen
dataclasses. Parsing is strict — unknown keys, dangling scene ids, out-of-range values and ids the
protocol would refuse all fail at load time with the path of the offending value — because a
mistake found while a party is mid-scene can only be answered with a broken event.

Two numbers are easy to confuse: a scene's ``number`` is its place in the author's outline (used
only for display and ordering), while the ``scene_number`` of ``scene.update`` counts the scenes a
party has entered during its run (it grows on every transition, even back to a visited scene).

A transition whose destination is the scene the party is already in means "stay": nothing is
entered, the counter does not move (e.g. a failed attempt to flee from a fight).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from campaign_engine.campaign_fields import ID_PATTERN as ID_PATTERN  # re-exported
from campaign_engine.campaign_fields import CampaignError as CampaignError  # re-exported
from campaign_engine.campaign_fields import dice as _dice
from campaign_engine.campaign_fields import ident as _id
from campaign_engine.campaign_fields import integer as _int
from campaign_engine.campaign_fields import items as _list
from campaign_engine.campaign_fields import obj_keys as _keys
from campaign_engine.campaign_fields import text as _str
from campaign_engine.rules import Dice, Outcome

SceneKind = Literal["story", "combat", "ending"]
SCENE_KINDS: Final = ("story", "combat", "ending")
MAX_SCENE_NARRATION: Final = 6000  # scene.update allows 8000; the rest is kept for "what happened"
DEFAULT_VOTE_TIMEOUT_S: Final = 60
MAX_VOTE_TIMEOUT_S: Final = 86_400  # party_sync's limit (a day)
MAX_VOTE_OPTIONS: Final = 10  # party_sync's limit; a vote also needs at least two


@dataclass(frozen=True, slots=True)
class Enemy:
    id: str
    name: str
    hp: int
    armor_class: int
    attack: int
    damage: Dice


@dataclass(frozen=True, slots=True)
class OptionCheck:
    """A roll an option asks for; each outcome leads somewhere and may cost the roller HP."""

    skill: str
    difficulty: int
    on_success: str
    on_partial: str
    on_failure: str
    harm_on_partial: int = 0
    harm_on_failure: int = 0

    def destination(self, outcome: Outcome) -> str:
        return {"success": self.on_success, "partial": self.on_partial}.get(
            outcome, self.on_failure
        )

    def harm(self, outcome: Outcome) -> int:
        return {"partial": self.harm_on_partial, "failure": self.harm_on_failure}.get(outcome, 0)


@dataclass(frozen=True, slots=True)
class Option:
    """A choice; open only while the scene flag ``requires`` (if any) is set."""

    id: str
    label: str
    next: str | None = None
    check: OptionCheck | None = None
    requires: str | None = None

    def destinations(self) -> tuple[str, ...]:
        if self.check is None:
            return (self.next,) if self.next else ()
        return (self.check.on_success, self.check.on_partial, self.check.on_failure)


@dataclass(frozen=True, slots=True)
class SceneCheck:
    """What a plain ``skill_check`` in a scene looks at: its default skill, the flag it can set."""

    skill: str = "wits"
    flag: str | None = None
    success: str = "You notice something that will help."
    partial: str = "You notice something, though not all of it."
    failure: str = "You find nothing of use."

    def text(self, outcome: Outcome) -> str:
        return {"success": self.success, "partial": self.partial}.get(outcome, self.failure)


@dataclass(frozen=True, slots=True)
class VoteRule:
    """A story scene where the party decides together (``party_vote``): on entering it, the
    engine starts a party vote over the scene's open options (see ``votes.py``)."""

    question: str | None = None  # default: "<scene title>: what does the party do?"
    timeout_s: int | None = None  # default: the campaign's ``vote_timeout_s``
    default_option: str | None = None  # wins a tie if it is on the ballot (else: first listed)


@dataclass(frozen=True, slots=True)
class Scene:
    id: str
    number: int
    title: str
    narration: str
    kind: SceneKind
    difficulty: int
    options: tuple[Option, ...] = ()
    check: SceneCheck = field(default_factory=SceneCheck)
    enemies: tuple[Enemy, ...] = ()
    on_victory: str | None = None
    on_defeat: str | None = None
    vote: VoteRule | None = None

    def option(self, option_id: str) -> Option | None:
        return next((o for o in self.options if o.id == option_id), None)

    def enemy(self, enemy_id: str) -> Enemy | None:
        return next((e for e in self.enemies if e.id == enemy_id), None)

    def destinations(self) -> tuple[str, ...]:
        exits = [d for o in self.options for d in o.destinations()]
        return (*exits, *(d for d in (self.on_victory, self.on_defeat) if d))


@dataclass(frozen=True, slots=True)
class CharacterTemplate:
    """What every character starts with (the reference engine keeps one shared set)."""

    max_hp: int = 20
    attack: int = 4
    defense: int = 12
    damage: Dice = field(default_factory=lambda: Dice(1, 8, 2))
    skills: Mapping[str, int] = field(
        default_factory=lambda: {"might": 2, "agility": 2, "wits": 1, "lore": 1, "presence": 0}
    )


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    title: str
    summary: str
    start: str
    scenes: Mapping[str, Scene]
    character: CharacterTemplate = field(default_factory=CharacterTemplate)
    vote_timeout_s: int = DEFAULT_VOTE_TIMEOUT_S  # how long a party vote lasts, by default

    def scene(self, scene_id: str) -> Scene:
        return self.scenes[scene_id]

    def endings(self) -> list[Scene]:
        return [s for s in self.scenes.values() if s.kind == "ending"]


# --- parsing ---------------------------------------------------------------------------------


def _option(raw: Any, path: str) -> Option:
    obj = _keys(raw, path, {"id", "label"}, {"next", "check", "requires"})
    if ("next" in obj) == ("check" in obj):
        raise CampaignError(f"{path}: give exactly one of 'next' or 'check'")
    check = None
    if "check" in obj:
        cp = f"{path}.check"
        c = _keys(
            obj["check"],
            cp,
            {"skill", "difficulty", "on_success", "on_failure"},
            {"on_partial", "harm_on_partial", "harm_on_failure"},
        )
        success = _id(c, "on_success", cp)
        check = OptionCheck(
            skill=_str(c, "skill", cp, 32),
            difficulty=_int(c, "difficulty", cp, 1, 40, 0),
            on_success=success,
            on_partial=_id(c, "on_partial", cp) if "on_partial" in c else success,
            on_failure=_id(c, "on_failure", cp),
            harm_on_partial=_int(c, "harm_on_partial", cp, 0, 100, 0),
            harm_on_failure=_int(c, "harm_on_failure", cp, 0, 100, 0),
        )
    return Option(
        id=_id(obj, "id", path),
        label=_str(obj, "label", path),
        next=_id(obj, "next", path) if "next" in obj else None,
        check=check,
        requires=_id(obj, "requires", path) if "requires" in obj else None,
    )


def _enemy(raw: Any, path: str) -> Enemy:
    obj = _keys(raw, path, {"id", "name", "hp", "armor_class", "damage"}, {"attack"})
    return Enemy(
        id=_id(obj, "id", path),
        name=_str(obj, "name", path, 100),
        hp=_int(obj, "hp", path, 1, 1000, 0),
        armor_class=_int(obj, "armor_class", path, 1, 40, 0),
        attack=_int(obj, "attack", path, -10, 30, 3),
        damage=_dice(obj, "damage", path),
    )


def _scene(raw: Any, path: str, default_difficulty: int) -> Scene:
    obj = _keys(
        raw,
        path,
        {"id", "number", "title", "narration", "kind"},
        {"difficulty", "options", "check", "enemies", "on_victory", "on_defeat", "party_vote"},
    )
    kind = obj["kind"]
    if kind not in SCENE_KINDS:
        raise CampaignError(f"{path}.kind: expected one of {', '.join(SCENE_KINDS)}")
    check = SceneCheck()
    if "check" in obj:
        c = _keys(
            obj["check"],
            f"{path}.check",
            set(),
            {"skill", "flag", "success", "partial", "failure"},
        )
        texts = {
            k: _str(c, k, f"{path}.check", 1000)
            for k in ("success", "partial", "failure")
            if k in c
        }
        check = SceneCheck(
            skill=_str(c, "skill", f"{path}.check", 32) if "skill" in c else "wits",
            flag=_id(c, "flag", f"{path}.check") if "flag" in c else None,
            **texts,
        )
    return Scene(
        id=_id(obj, "id", path),
        number=_int(obj, "number", path, 1, 10_000, 0),
        title=_str(obj, "title", path),
        narration=_str(obj, "narration", path, MAX_SCENE_NARRATION),
        kind=kind,
        difficulty=_int(obj, "difficulty", path, 1, 40, default_difficulty),
        options=tuple(
            _option(o, f"{path}.options[{i}]") for i, o in enumerate(_list(obj, "options", path))
        ),
        check=check,
        enemies=tuple(
            _enemy(e, f"{path}.enemies[{i}]") for i, e in enumerate(_list(obj, "enemies", path))
        ),
        on_victory=_id(obj, "on_victory", path) if "on_victory" in obj else None,
        on_defeat=_id(obj, "on_defeat", path) if "on_defeat" in obj else None,
        vote=_vote(obj.get("party_vote", False), f"{path}.party_vote"),
    )


def _vote(raw: Any, path: str) -> VoteRule | None:
    """``party_vote``: ``true`` (a vote with the defaults), ``false``, or an object."""
    if isinstance(raw, bool):
        return VoteRule() if raw else None
    if not isinstance(raw, Mapping):
        raise CampaignError(f"{path}: expected true, false or an object")
    obj = _keys(raw, path, set(), {"question", "timeout_s", "default_option"})
    return VoteRule(
        question=_str(obj, "question", path, 500) if "question" in obj else None,
        timeout_s=_int(obj, "timeout_s", path, 1, MAX_VOTE_TIMEOUT_S, 0)
        if "timeout_s" in obj
        else None,
        default_option=_id(obj, "default_option", path) if "default_option" in obj else None,
    )


def parse_campaign(data: Any) -> Campaign:
    """Build and validate a :class:`Campaign` from its JSON-compatible description."""
    top = _keys(
        data,
        "campaign",
        {"id", "title", "start", "scenes"},
        {"summary", "default_difficulty", "character", "vote_timeout_s"},
    )
    default_dc = _int(top, "default_difficulty", "campaign", 1, 40, 12)
    character = CharacterTemplate()
    if "character" in top:
        p = "campaign.character"
        c = _keys(top["character"], p, set(), {"max_hp", "attack", "defense", "damage", "skills"})
        skills = c.get("skills", dict(character.skills))
        if not isinstance(skills, Mapping) or not skills:
            raise CampaignError(f"{p}.skills: expected a non-empty object of skill: modifier")
        character = CharacterTemplate(
            max_hp=_int(c, "max_hp", p, 1, 1000, character.max_hp),
            attack=_int(c, "attack", p, -10, 30, character.attack),
            defense=_int(c, "defense", p, 1, 40, character.defense),
            damage=_dice(c, "damage", p) if "damage" in c else character.damage,
            skills={str(k): _int(skills, k, f"{p}.skills", -10, 30, 0) for k in skills},
        )
    scenes: dict[str, Scene] = {}
    for i, raw in enumerate(_list(top, "scenes", "campaign")):
        scene = _scene(raw, f"campaign.scenes[{i}]", default_dc)
        if scene.id in scenes:
            raise CampaignError(f"campaign.scenes[{i}].id: duplicate scene id {scene.id!r}")
        scenes[scene.id] = scene
    campaign = Campaign(
        id=_id(top, "id", "campaign"),
        title=_str(top, "title", "campaign"),
        summary=_str(top, "summary", "campaign", 2000) if "summary" in top else "",
        start=_id(top, "start", "campaign"),
        scenes=scenes,
        character=character,
        vote_timeout_s=_int(
            top, "vote_timeout_s", "campaign", 1, MAX_VOTE_TIMEOUT_S, DEFAULT_VOTE_TIMEOUT_S
        ),
    )
    _validate(campaign)
    return campaign


def _validate(campaign: Campaign) -> None:
    """Whole-campaign rules: links resolve, kinds are coherent, an ending can be reached."""
    scenes, skills = campaign.scenes, campaign.character.skills
    if campaign.start not in scenes:
        raise CampaignError(f"campaign.start: no scene {campaign.start!r}")
    if len({s.number for s in scenes.values()}) != len(scenes):
        raise CampaignError("campaign.scenes: scene numbers must be unique")
    for scene in scenes.values():
        where = f"scene {scene.id!r}"
        if scene.kind == "ending" and (scene.options or scene.enemies):
            raise CampaignError(f"{where}: an ending has no options and no enemies")
        if scene.kind == "combat" and not (scene.enemies and scene.on_victory and scene.on_defeat):
            raise CampaignError(f"{where}: a combat scene needs enemies, on_victory and on_defeat")
        if scene.kind != "combat" and (scene.enemies or scene.on_victory or scene.on_defeat):
            raise CampaignError(f"{where}: only combat scenes have enemies/on_victory/on_defeat")
        if scene.kind == "story" and not scene.options:
            raise CampaignError(f"{where}: a story scene needs at least one option")
        if len({o.id for o in scene.options}) != len(scene.options):
            raise CampaignError(f"{where}: option ids must be unique within the scene")
        if len({e.id for e in scene.enemies}) != len(scene.enemies):
            raise CampaignError(f"{where}: enemy ids must be unique within the scene")
        for target in scene.destinations():
            if target not in scenes:
                raise CampaignError(f"{where}: leads to unknown scene {target!r}")
        used = [scene.check.skill] + [o.check.skill for o in scene.options if o.check]
        if unknown := sorted(set(used) - skills.keys()):
            raise CampaignError(f"{where}: unknown skill(s) {', '.join(unknown)}")
        for option in scene.options:
            if option.requires and option.requires != scene.check.flag:
                raise CampaignError(
                    f"{where}: option {option.id!r} requires flag {option.requires!r}, "
                    "which this scene's check never sets"
                )
        if scene.vote is not None:
            _validate_vote(scene, where)
    reachable, queue = {campaign.start}, deque([campaign.start])
    while queue:
        for target in scenes[queue.popleft()].destinations():
            if target not in reachable:
                reachable.add(target)
                queue.append(target)
    if not any(scenes[s].kind == "ending" for s in reachable):
        raise CampaignError("campaign: no ending can be reached from the start scene")


def _validate_vote(scene: Scene, where: str) -> None:
    """A party vote needs a story scene with 2..10 options, two of them open on entry."""
    assert scene.vote is not None
    if scene.kind != "story":
        raise CampaignError(f"{where}: only a story scene can have a party_vote")
    if sum(o.requires is None for o in scene.options) < 2 or len(scene.options) > MAX_VOTE_OPTIONS:
        raise CampaignError(
            f"{where}: a party_vote scene needs at most {MAX_VOTE_OPTIONS} options, "
            "at least two of them without 'requires' (open when the party arrives)"
        )
    default = scene.vote.default_option
    if default is not None and scene.option(default) is None:
        raise CampaignError(f"{where}: party_vote.default_option {default!r} is not an option here")


def load_campaign(path: str | Path) -> Campaign:
    """Load a campaign from a JSON file (same shape as ``sunken_lantern.SUNKEN_LANTERN``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CampaignError(f"cannot read campaign file {path}: {exc}") from exc
    return parse_campaign(data)


def builtin_campaign() -> Campaign:
    """The built-in campaign, "The Sunken Lantern"."""
    from campaign_engine.sunken_lantern import SUNKEN_LANTERN

    return parse_campaign(SUNKEN_LANTERN)
