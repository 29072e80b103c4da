"""``campaign-engine``: look at a campaign from the command line.

``campaign-engine describe [--campaign PATH]`` prints the campaign's scenes (what each offers and
where it leads), the character every player starts as, and the payload each ``action_type`` takes
— what a client author or a campaign writer needs without reading the code. The campaign is the
built-in one unless ``--campaign`` or ``CAMPAIGN_ENGINE_CAMPAIGN`` names a JSON file; describing a
file also validates it (exit status 2 and the offending path if it is invalid). The L1/L2
chronicle command arrives with the persistence issue.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from campaign_engine.actions import ACTION_PAYLOADS, PARTY_ACTOR
from campaign_engine.campaign import (
    Campaign,
    CampaignError,
    Option,
    builtin_campaign,
    load_campaign,
)
from campaign_engine.engine import ENV_CAMPAIGN
from campaign_engine.rules import DEFEND_BONUS, INSPIRED_BONUS, PARTIAL_MARGIN


def _option_line(option: Option) -> str:
    gate = f"  [needs flag {option.requires}]" if option.requires else ""
    if option.check is None:
        return f"      - {option.id}: {option.label} -> {option.next}{gate}"
    c = option.check
    harm = ""
    if c.harm_on_partial or c.harm_on_failure:
        harm = f"; harm partial {c.harm_on_partial} / failure {c.harm_on_failure}"
    return (
        f"      - {option.id}: {option.label}{gate}\n"
        f"          check {c.skill} DC {c.difficulty}: success -> {c.on_success}, "
        f"partial -> {c.on_partial}, failure -> {c.on_failure}{harm}"
    )


def describe(campaign: Campaign, out: TextIO) -> None:
    """Print ``campaign`` and the action payloads to ``out``."""
    t = campaign.character
    skills = ", ".join(f"{name} {mod:+d}" for name, mod in t.skills.items())
    w = out.write
    w(f"{campaign.title}  (id {campaign.id}, {len(campaign.scenes)} scenes, ")
    w(f"start {campaign.start})\n")
    if campaign.summary:
        w(f"{campaign.summary}\n")
    w(
        f"\nCharacters: {t.max_hp} HP, attack {t.attack:+d}, defense {t.defense}, "
        f"damage {t.damage}; skills: {skills}\n"
        f"Checks: d20 + modifier vs DC; total >= DC success, >= DC-{PARTIAL_MARGIN} partial, "
        "else failure; natural 20 always succeeds, natural 1 always fails.\n"
        f"Effects: inspired (+{INSPIRED_BONUS} on the next d20), defending "
        f"(+{DEFEND_BONUS} defense until your next action), downed (0 HP: cannot act).\n"
    )
    w("\nScenes:\n")
    for scene in sorted(campaign.scenes.values(), key=lambda s: s.number):
        w(f"  {scene.number}. {scene.title}  [{scene.id}, {scene.kind}]\n")
        if scene.kind == "ending":
            continue
        flag = f", success or partial sets flag {scene.check.flag}" if scene.check.flag else ""
        w(f"      skill check: {scene.check.skill} DC {scene.difficulty}{flag}\n")
        for enemy in scene.enemies:
            w(
                f"      enemy {enemy.id}: {enemy.name}, {enemy.hp} HP, AC {enemy.armor_class}, "
                f"attack {enemy.attack:+d}, damage {enemy.damage}\n"
            )
        if scene.kind == "combat":
            w(f"      victory -> {scene.on_victory}, defeat -> {scene.on_defeat}\n")
        for option in scene.options:
            w(_option_line(option) + "\n")
    w("\nAction payloads (action.request payload.payload, by action_type):\n")
    for action_type, shape in ACTION_PAYLOADS.items():
        w(f"  {action_type:<12} {shape}\n")
    w(f'  (character_id "{PARTY_ACTOR}" = the whole party, e.g. a finished vote: choices only)\n')


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="campaign-engine", description="Look at a campaign: scenes, rules, action payloads."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    desc = commands.add_parser("describe", help="print the campaign and the action payloads")
    desc.add_argument(
        "--campaign",
        metavar="PATH",
        default=os.environ.get(ENV_CAMPAIGN) or None,
        help=f"a campaign JSON file (default: ${ENV_CAMPAIGN}, else the built-in campaign)",
    )
    args = parser.parse_args(argv)
    try:
        campaign = load_campaign(args.campaign) if args.campaign else builtin_campaign()
    except CampaignError as exc:
        print(f"campaign-engine: {exc}", file=sys.stderr)
        return 2
    describe(campaign, sys.stdout)
    return 0
