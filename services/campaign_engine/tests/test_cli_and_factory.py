"""``campaign-engine describe`` and ``create_engine`` (the factory party_sync loads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from campaign_engine.cli import main
from campaign_engine.engine import ReferenceEngine, create_engine
from campaign_engine.sunken_lantern import SUNKEN_LANTERN
from campaign_engine.testing import RecordingPublisher, action_request, join_notice


def test_describe_prints_scenes_and_payloads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe"]) == 0
    out = capsys.readouterr().out
    assert "The Sunken Lantern" in out
    for line in (
        "1. The Drowned Harbor  [harbor, story]",
        "check agility DC 14",
        "victory -> lighthouse, defeat -> drowned",
        "7. The Lantern Relit",
        '{"option": "<id of an option the current scene offers>"}',
        '"move": "attack" | "defend"',
        "natural 20 always succeeds",
        "Party votes: in a scene marked [party vote] the whole party decides.",
        "[party vote] The Reef Gate bars the way.",
        "(60 s; a tie: wade)",
    ):
        assert line in out


def test_describe_validates_a_campaign_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = dict(SUNKEN_LANTERN, start="nowhere")
    (tmp_path / "bad.json").write_text(json.dumps(bad), encoding="utf-8")
    assert main(["describe", "--campaign", str(tmp_path / "bad.json")]) == 2
    assert "no scene 'nowhere'" in capsys.readouterr().err


def test_describe_into_a_pipe_closed_early_ends_without_a_traceback() -> None:
    """`campaign-engine describe | head`: the reader leaves before the end."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "campaign_engine", "describe"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # gone before anything was written: the first write meets EPIPE
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.decode() == ""


def test_create_engine_defaults_to_the_built_in_campaign() -> None:
    engine = create_engine({})
    assert isinstance(engine, ReferenceEngine)
    assert engine.campaign.id == "sunken-lantern"


def test_create_engine_reads_the_campaign_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(dict(SUNKEN_LANTERN, id="mine", title="Mine")), encoding="utf-8")
    engine = create_engine({"CAMPAIGN_ENGINE_CAMPAIGN": str(path)})
    assert engine.campaign.title == "Mine"


def test_create_engine_refuses_a_bad_seed() -> None:
    with pytest.raises(ValueError, match="CAMPAIGN_ENGINE_SEED must be an integer"):
        create_engine({"CAMPAIGN_ENGINE_SEED": "lucky"})


async def test_the_seed_from_the_environment_makes_runs_reproducible() -> None:
    rolls = []
    for _ in range(2):
        engine = create_engine(
            {"CAMPAIGN_ENGINE_SEED": "42", "CAMPAIGN_ENGINE_DATABASE_URL": "memory://"}
        )
        publisher = RecordingPublisher()
        await engine.start(publisher)
        await engine.handle_join(join_notice("aria"))
        for i in range(3):
            await engine.handle_action(action_request("skill_check", {}, character_id=f"c{i}"))
        await engine.close()
        rolls.append(
            [p.payload["roll"]["value"] for p in publisher.published if "roll" in p.payload]
        )
    assert rolls[0] == rolls[1]


async def test_an_engine_must_be_started_before_it_publishes() -> None:
    with pytest.raises(RuntimeError, match="start"):
        await create_engine({}).handle_join(join_notice("aria"))
