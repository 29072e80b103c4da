"""Campaigns as data: the built-in one, loading from a file, and what a bad document is told."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from campaign_engine.campaign import (
    CampaignError,
    builtin_campaign,
    load_campaign,
    parse_campaign,
)
from campaign_engine.rules import Dice
from campaign_engine.sunken_lantern import SUNKEN_LANTERN


def test_the_built_in_campaign() -> None:
    campaign = builtin_campaign()
    assert campaign.title == "The Sunken Lantern"
    assert len(campaign.scenes) >= 4
    assert {s.kind for s in campaign.scenes.values()} == {"story", "combat", "ending"}
    assert [s.id for s in campaign.endings()] == ["relit", "drowned"]
    claws = campaign.scene("claws")
    assert [e.id for e in claws.enemies] == ["reefclaw_old", "reefclaw_young"]
    assert claws.enemies[0].damage == Dice(1, 4, 1)
    assert (claws.on_victory, claws.on_defeat) == ("lighthouse", "drowned")
    swim = campaign.scene("harbor").option("swim")
    assert swim is not None and swim.check is not None
    assert swim.check.destination("failure") == "reef"
    assert swim.check.harm("partial") == 3
    assert campaign.scene("harbor").difficulty == 12
    votes = {s.id: s.vote for s in campaign.scenes.values() if s.vote}
    assert sorted(votes) == ["bargain", "reef"]  # never the opening scene
    assert votes["reef"].default_option == "wade"
    assert campaign.vote_timeout_s == 60


def test_a_campaign_loads_from_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "lantern.json"
    path.write_text(json.dumps(SUNKEN_LANTERN), encoding="utf-8")
    assert load_campaign(path) == builtin_campaign()


def test_an_unreadable_file_is_a_campaign_error(tmp_path: Path) -> None:
    with pytest.raises(CampaignError, match="cannot read"):
        load_campaign(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CampaignError, match="cannot read"):
        load_campaign(tmp_path / "bad.json")


def scene(data: dict[str, Any], scene_id: str) -> dict[str, Any]:
    return next(s for s in data["scenes"] if s["id"] == scene_id)


def set_(path: list[str | int], value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(data: dict[str, Any]) -> None:
        target: Any = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return apply


BREAKAGES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("unknown key", set_(["colour"], "blue"), r"campaign: unknown key\(s\) colour"),
    ("missing start scene", set_(["start"], "nowhere"), "no scene 'nowhere'"),
    (
        "dangling link",
        lambda d: scene(d, "harbor")["options"][0].update(next="atlantis"),
        "leads to unknown scene 'atlantis'",
    ),
    ("bad id", lambda d: scene(d, "harbor").update(id="the harbor"), "is not an id"),
    ("bad dice", lambda d: scene(d, "claws")["enemies"][0].update(damage="lots"), "dice"),
    ("combat without enemies", lambda d: scene(d, "vault").update(enemies=[]), "needs enemies"),
    (
        "ending with options",
        lambda d: scene(d, "relit").update(options=[{"id": "x", "label": "X", "next": "harbor"}]),
        "an ending has no options",
    ),
    (
        "both next and check",
        lambda d: scene(d, "harbor")["options"][0].update(
            check={"skill": "wits", "difficulty": 5, "on_success": "reef", "on_failure": "reef"}
        ),
        "exactly one of 'next' or 'check'",
    ),
    (
        "unknown skill",
        lambda d: scene(d, "reef")["check"].update(skill="juggling"),
        "unknown skill",
    ),
    (
        "flag nobody sets",
        lambda d: scene(d, "harbor")["options"][2].update(requires="moon"),
        "never sets",
    ),
    ("duplicate numbers", lambda d: scene(d, "reef").update(number=1), "numbers must be unique"),
    ("difficulty out of range", lambda d: scene(d, "reef").update(difficulty=99), "1..40"),
    ("title too long", lambda d: scene(d, "reef").update(title="x" * 201), "at most 200"),
    (
        "vote in a fight",
        lambda d: scene(d, "claws").update(party_vote=True),
        "only a story scene can have a party_vote",
    ),
    (
        "vote on one option",
        lambda d: scene(d, "bargain")["options"].pop(),
        "at least two of them without 'requires'",
    ),
    (
        "vote tie option unknown",
        lambda d: scene(d, "reef")["party_vote"].update(default_option="fly"),
        "default_option 'fly' is not an option here",
    ),
    (
        "vote not an object",
        lambda d: scene(d, "reef").update(party_vote="yes"),
        "party_vote: expected true, false or an object",
    ),
    (
        "vote timeout",
        lambda d: scene(d, "reef")["party_vote"].update(timeout_s=0),
        r"party_vote.timeout_s: expected an integer in 1\.\.86400",
    ),
    (
        "vote unknown key",
        lambda d: scene(d, "reef")["party_vote"].update(colour="red"),
        r"party_vote: unknown key\(s\) colour",
    ),
]


@pytest.mark.parametrize(("name", "breaks", "message"), BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_invalid_campaigns_are_refused_with_the_path(
    name: str, breaks: Callable[[dict[str, Any]], None], message: str
) -> None:
    data = copy.deepcopy(SUNKEN_LANTERN)
    breaks(data)
    with pytest.raises(CampaignError, match=message):
        parse_campaign(data)


def test_an_ending_unreachable_from_the_start_is_refused() -> None:
    data = copy.deepcopy(SUNKEN_LANTERN)
    scene(data, "harbor")["options"] = [{"id": "wait", "label": "Wait", "next": "reef"}]
    scene(data, "reef")["options"] = [{"id": "back", "label": "Back", "next": "harbor"}]
    del scene(data, "reef")["party_vote"]  # one option: nothing left to vote on
    with pytest.raises(CampaignError, match="no ending can be reached"):
        parse_campaign(data)
