"""The chronicles: L2 scene summaries written as scenes end, and ``campaign-engine chronicle``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from campaign_engine.campaign import Campaign
from campaign_engine.cli import main
from campaign_engine.engine import ReferenceEngine
from campaign_engine.store import open_store
from campaign_engine.testing import RecordingPublisher, ScriptedRandom, action_request, join_notice


async def play_to_defeat(engine: ReferenceEngine, dice: ScriptedRandom) -> None:
    """Arena: Aria finds the key, Bram leads into the pit, Aria fights the ogre and goes down."""
    await engine.handle_join(join_notice("aria", "Aria"))
    await engine.handle_join(join_notice("bram", "Bram"))
    dice.push(15)  # 15+1 vs 12: success (flag key, Aria inspired)
    await engine.handle_action(action_request("skill_check", {}, trace_id="t-1"))
    await engine.handle_action(
        action_request("choice", {"option": "enter"}, character_id="bram", trace_id="t-2")
    )
    for n in (3, 4):  # a miss, and the ogre's natural 20 for 10, twice: Aria is downed
        dice.push(2, 20, 10)
        await engine.handle_action(
            action_request("combat", {"move": "attack", "target": "ogre"}, trace_id=f"t-{n}")
        )


async def test_scene_summaries_are_written_as_scenes_end(
    arena_engine: ReferenceEngine, dice: ScriptedRandom
) -> None:
    await arena_engine.handle_join(join_notice("aria", "Aria"))
    assert await arena_engine.scene_summaries("run-1") == []
    await play_to_defeat(arena_engine, dice)

    gate, pit, lost = await arena_engine.scene_summaries("run-1")
    assert (gate.scene_number, gate.title, gate.outcome) == (1, "The Gate", "moved_on")
    assert gate.decisions == [1, 2]
    assert gate.actors == {
        "Aria": ["made a skill check: success (d20 15+1 = 16 vs 12)"],
        "Bram": ["chose enter: success"],
    }
    assert gate.text.endswith("The party moved on to The Pit (scene 2).")
    assert (gate.trace_id, gate.at) == ("t-2", "2026-11-25T21:04:05.123Z")

    assert (pit.scene_number, pit.kind, pit.outcome, pit.decisions) == (
        2,
        "combat",
        "defeat",
        [3, 4],
    )
    assert pit.actors["Aria"] == [
        "attacked ogre: failure (d20 2+6 = 8 vs 15), Aria HP 20→10",  # inspired: +2
        "attacked ogre: failure (d20 2+4 = 6 vs 15), Aria HP 10→1",  # downed, up after the fight
    ]
    assert "Defeat. The party ended up in Lost (scene 3)." in pit.text
    assert len(pit.happened) == 2 and "Ogre strikes back" in pit.happened[0]
    assert (lost.scene_number, lost.outcome, lost.next_scene_id) == (3, "ending", None)
    assert lost.text == "Scene 3, Lost: the campaign ends. Dust."


@pytest.fixture
async def played(durable_url: str, arena_campaign: Campaign, dice: ScriptedRandom) -> str:
    """The URL of a database holding run-1, played to its defeat."""
    engine = ReferenceEngine(arena_campaign, rng=dice, store=open_store(durable_url))
    await engine.start(RecordingPublisher())
    await play_to_defeat(engine, dice)
    await engine.close()
    return durable_url


def test_the_chronicle_command_prints_decisions_and_summaries(
    played: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["chronicle", "run-1", "--database-url", played]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == (
        "Run run-1 · party party-1 · finished · scene 3 (lost) · 4 decisions · 3 scene summaries"
    )
    assert lines[1] == "Characters: Aria (aria) 1/20 HP, Bram (bram) 20/20 HP"
    for expected in (
        "Scene 1 · The Gate [gate]",
        "  L1 #1   2026-11-25T21:04:05.123Z  Aria (aria): skill_check {}",
        "         → success · d20 15+1 = 16 vs 12",
        "         changed: Aria effects: inspired; flags key=true",
        "         changed: scene gate → pit (#2); flags cleared; rat 3 HP; ogre 30 HP",
        "  L2 Scene 1, The Gate: 2 decisions. Aria: made a skill check: success (d20 15+1 = 16 "
        "vs 12). Bram: chose enter: success. The party moved on to The Pit (scene 2).",
        "Scene 2 · The Pit [pit]",
        "         changed: Aria HP 20→10; Aria effects: none",
        "         changed: scene pit → lost (#3); run in_progress → finished; Aria HP 10→1",
        "         outcome: defeat · trace t-4",
        "Scene 3 · Lost [lost]",
        "  L2 Scene 3, Lost: the campaign ends. Dust.",
    ):
        assert expected in lines, f"{expected!r} not in:\n{out}"
    assert out.index("L1 #4") < out.index("L2 Scene 2")


def test_the_chronicle_command_reads_the_environment_and_prints_json(
    played: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAMPAIGN_ENGINE_DATABASE_URL", played)
    assert main(["chronicle", "run-1", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["run"]["status"] == "finished"
    assert document["run"]["characters"][0] == {
        "character_id": "aria",
        "name": "Aria",
        "hp": 1,
        "max_hp": 20,
        "effects": [],
    }
    assert [d["trace_id"] for d in document["decisions"]] == ["t-1", "t-2", "t-3", "t-4"]
    assert document["decisions"][0]["roll"]["value"] == 15
    assert [s["outcome"] for s in document["scenes"]] == ["moved_on", "defeat", "ending"]


def test_the_chronicle_of_an_unknown_run(played: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chronicle", "run-9", "--database-url", played]) == 1
    assert "no run 'run-9'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://", "keeps nothing across processes"),
        ("mysql://db/x", "unsupported database URL"),
        ("sqlite:///{tmp}/missing.sqlite3", "no such database file"),
        ("postgresql://postgres@127.0.0.1:1/postgres", "cannot connect"),
    ],
)
def test_the_chronicle_command_explains_a_database_it_cannot_read(
    url: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["chronicle", "run-1", "--database-url", url.format(tmp=tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # reading never creates a database
