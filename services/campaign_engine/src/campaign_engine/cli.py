"""``campaign-engine``: look at a campaign, and at a run's chronicle, from the command line.

``campaign-engine describe [--campaign PATH]`` prints the campaign's scenes (what each offers and
where it leads), the character every player starts as, and the payload each ``action_type`` takes
— what a client author or a campaign writer needs without reading the code. The campaign is the
built-in one unless ``--campaign`` or ``CAMPAIGN_ENGINE_CAMPAIGN`` names a JSON file; describing a
file also validates it (exit status 2 and the offending path if it is invalid).

``campaign-engine chronicle RUN_ID [--json] [--database-url URL]`` prints a run's chronicle from
the configured database (``CAMPAIGN_ENGINE_DATABASE_URL``, as the engine uses it): scene by scene,
every L1 decision and the scene's L2 summary; ``--json`` prints the records themselves. Exit status
1 if the database holds no such run, 2 if the database cannot be opened (a SQLite file is never
created by reading it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from campaign_engine.actions import ACTION_PAYLOADS, PARTY_ACTOR
from campaign_engine.campaign import (
    Campaign,
    CampaignError,
    Option,
    builtin_campaign,
    load_campaign,
)
from campaign_engine.chronicle import Decision, SceneSummary, actor_name, roll_text
from campaign_engine.engine import ENV_CAMPAIGN, ENV_DATABASE_URL, ENV_VOTE_TIMEOUT
from campaign_engine.rules import DEFEND_BONUS, INSPIRED_BONUS, PARTIAL_MARGIN
from campaign_engine.state import RunState
from campaign_engine.store import DEFAULT_DATABASE_URL, StoreUnavailable, open_store
from campaign_engine.votes import question_for


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
    if any(scene.vote for scene in campaign.scenes.values()):
        w(
            "Party votes: in a scene marked [party vote] the whole party decides. On arrival "
            "the engine starts a vote over the open options; until it ends, a character's choice "
            "of an option on the ballot is refused (checks and fights go on). party_sync applies "
            "the winner as the party's choice; a tie goes to the scene's tie option, else the "
            f"first listed. Votes last {campaign.vote_timeout_s} s unless the scene says "
            f"otherwise (${ENV_VOTE_TIMEOUT} overrides all).\n"
        )
    w("\nScenes:\n")
    for scene in sorted(campaign.scenes.values(), key=lambda s: s.number):
        w(f"  {scene.number}. {scene.title}  [{scene.id}, {scene.kind}]\n")
        if scene.kind == "ending":
            continue
        flag = f", success or partial sets flag {scene.check.flag}" if scene.check.flag else ""
        w(f"      skill check: {scene.check.skill} DC {scene.difficulty}{flag}\n")
        if (rule := scene.vote) is not None:
            tie = f"; a tie: {rule.default_option}" if rule.default_option else ""
            timeout = rule.timeout_s or campaign.vote_timeout_s
            w(f"      [party vote] {question_for(scene)} ({timeout} s{tie})\n")
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


# --- chronicle ---------------------------------------------------------------------------------
# The text goes scene visit by scene visit: a heading, every L1 decision made there (when, who,
# what, the outcome and roll, the narration, what it changed, its trace_id), then the scene's L2
# summary once the scene has ended. The scene the party is in has no summary yet.

INDENT = " " * 9


@dataclass(frozen=True, slots=True)
class Chronicle:
    """Everything stored about one run."""

    url: str
    run: RunState | None
    decisions: list[Decision]
    summaries: list[SceneSummary]

    def to_dict(self) -> dict[str, Any]:
        run = None
        if self.run is not None:
            document = self.run.to_dict()
            run = {
                key: document[key]
                for key in ("run_id", "party_id", "status", "scene_id", "scene_number")
            }
            run["characters"] = document["characters"]
            run["scene_flags"] = document["scene_flags"]
        return {
            "database": self.url,
            "run": run,
            "decisions": [d.to_dict() for d in self.decisions],
            "scenes": [s.to_dict() for s in self.summaries],
        }


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _arrow(change: Mapping[str, Any]) -> str:
    return f"{change.get('from')}→{change.get('to')}"


def change_text(changes: Mapping[str, Any], run: RunState | None) -> str:
    """What a decision changed, in one line (``Decision.changes`` as ``state.changes`` makes it)."""

    def name(cid: str) -> str:
        return actor_name(run, cid) if run is not None else cid

    parts: list[str] = []
    if scene := changes.get("scene"):
        parts.append(f"scene {scene['from']} → {scene['to']} (#{scene['scene_number']})")
    if status := changes.get("run_status"):
        parts.append(f"run {status['from']} → {status['to']}")
    for cid, hp in changes.get("hp", {}).items():
        joined = hp.get("from") is None
        parts.append(
            f"{name(cid)} joins ({hp['to']} HP)" if joined else f"{name(cid)} HP {_arrow(hp)}"
        )
    for cid, effects in changes.get("effects", {}).items():
        if effects.get("from") is not None:
            parts.append(f"{name(cid)} effects: {', '.join(effects['to']) or 'none'}")
    if "scene_flags" in changes:
        flags = [f"{k}={json.dumps(v)}" for k, v in changes["scene_flags"].items()]
        parts.append(f"flags {', '.join(flags) or 'cleared'}")
    for enemy, hp in changes.get("enemies", {}).items():
        fresh = hp.get("from") is None  # a fight begins
        parts.append(f"{enemy} {hp['to']} HP" if fresh else f"{enemy} HP {_arrow(hp)}")
    return "; ".join(parts) or "nothing"


def decision_text(d: Decision, run: RunState | None) -> list[str]:
    who = actor_name(run, d.character_id) if run is not None else d.character_id
    payload = json.dumps(dict(d.payload), ensure_ascii=False, separators=(", ", ": "))
    result = d.outcome + (f" · {roll_text(d.roll)}" if d.roll else "")
    if rolled_by := d.extra.get("rolled_by"):
        result += f" (rolled by {rolled_by})"
    return [
        f"  L1 #{d.seq:<3} {d.at or '-'}  {who} ({d.character_id}): {d.action_type} {payload}",
        f"{INDENT}→ {result}",
        *(f"{INDENT}{line}" for line in d.narration.splitlines() if line.strip()),
        f"{INDENT}changed: {change_text(d.changes, run)}",
        f"{INDENT}action {d.action_id} · trace {d.trace_id}",
    ]


def summary_text(s: SceneSummary) -> list[str]:
    lines = [f"  L2 {s.text}"]
    if s.decisions:
        lines.append(f"{INDENT}decisions {', '.join(f'#{n}' for n in s.decisions)}")
        lines.extend(f"{INDENT}{who}: {'; '.join(deeds)}" for who, deeds in s.actors.items())
    lines.append(f"{INDENT}outcome: {s.outcome} · trace {s.trace_id}")
    return lines


def render(chronicle: Chronicle) -> str:
    """The whole chronicle as text (see the module docstring)."""
    run, out = chronicle.run, []
    if run is not None:
        out.append(
            f"Run {run.run_id} · party {run.party_id} · {run.status} · scene {run.scene_number} "
            f"({run.scene_id}) · {_count(len(chronicle.decisions), 'decision', 'decisions')} · "
            f"{_count(len(chronicle.summaries), 'scene summary', 'scene summaries')}"
        )
        roster = [
            f"{c.name} ({c.character_id}) {c.hp}/{c.max_hp} HP"
            + (f" [{', '.join(c.effects)}]" if c.effects else "")
            for c in run.characters.values()
        ]
        out.append(f"Characters: {', '.join(roster) or 'none'}")
    out.append(f"Database: {chronicle.url}")
    summaries = {s.scene_number: s for s in chronicle.summaries}
    by_scene: dict[int, list[Decision]] = {}
    for d in chronicle.decisions:
        by_scene.setdefault(d.scene_number, []).append(d)
    current = {run.scene_number: run.scene_id} if run is not None and run.scene_number else {}
    for number in sorted(set(summaries) | set(by_scene) | set(current)):
        summary, decisions = summaries.get(number), by_scene.get(number, [])
        scene_id = summary.scene_id if summary else current.get(number) or decisions[0].scene_id
        title = f"{summary.title} [{scene_id}]" if summary else f"[{scene_id}] (in progress)"
        out += ["", f"Scene {number} · {title}"]
        for d in decisions:
            out += decision_text(d, run)
        if summary is not None:
            out += summary_text(summary)
    return "\n".join(out) + "\n"


async def read_chronicle(url: str, run_id: str) -> Chronicle:
    """A run's state and chronicles from the database at ``url`` (never creating one)."""
    if url.strip().lower().startswith("memory:"):
        raise StoreUnavailable("memory:// keeps nothing across processes: there is nothing to read")
    store = open_store(url, create=False)
    await store.open()
    try:
        return Chronicle(
            url=store.url,
            run=await store.load(run_id),
            decisions=await store.decisions(run_id),
            summaries=await store.summaries(run_id),
        )
    finally:
        await store.close()


def chronicle(run_id: str, url: str, as_json: bool) -> int:
    try:
        found = asyncio.run(read_chronicle(url, run_id))
    except (StoreUnavailable, ValueError) as exc:
        print(f"campaign-engine: {exc}", file=sys.stderr)
        return 2
    if found.run is None and not found.decisions:
        print(f"campaign-engine: no run {run_id!r} in {found.url}", file=sys.stderr)
        return 1
    text = json.dumps(found.to_dict(), indent=2, ensure_ascii=False) + "\n" if as_json else ""
    try:
        sys.stdout.write(text or render(found))
        sys.stdout.flush()
    except BrokenPipeError:  # `campaign-engine chronicle … | head`: fine, stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="campaign-engine",
        description="Look at a campaign (scenes, rules, action payloads) or a run's chronicle.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    desc = commands.add_parser("describe", help="print the campaign and the action payloads")
    desc.add_argument(
        "--campaign",
        metavar="PATH",
        default=os.environ.get(ENV_CAMPAIGN) or None,
        help=f"a campaign JSON file (default: ${ENV_CAMPAIGN}, else the built-in campaign)",
    )
    chron = commands.add_parser("chronicle", help="print a run's chronicle (L1 and L2)")
    chron.add_argument("run_id", metavar="RUN_ID", help="the campaign_run_id")
    chron.add_argument("--json", action="store_true", help="print the records as JSON")
    chron.add_argument(
        "--database-url",
        metavar="URL",
        default=os.environ.get(ENV_DATABASE_URL) or DEFAULT_DATABASE_URL,
        help=f"where the engine keeps its runs (default: ${ENV_DATABASE_URL}, "
        f"else {DEFAULT_DATABASE_URL})",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "chronicle":
            return chronicle(args.run_id, args.database_url, args.json)
        try:
            campaign = load_campaign(args.campaign) if args.campaign else builtin_campaign()
        except CampaignError as exc:
            print(f"campaign-engine: {exc}", file=sys.stderr)
            return 2
        describe(campaign, sys.stdout)
        sys.stdout.flush()  # a closed pipe shows here, inside the try
        return 0
    except BrokenPipeError:
        # the reader went away (`campaign-engine describe | head`): no traceback, and no second
        # error when Python flushes stdout at exit (docs.python.org, "Note on SIGPIPE")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
