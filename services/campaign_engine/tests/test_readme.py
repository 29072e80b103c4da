"""The README's examples work: its campaign JSON loads and plays, its example engine runs."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from campaign_engine.campaign import parse_campaign
from campaign_engine.engine import ReferenceEngine
from campaign_engine.testing import Published, RecordingPublisher, action_request, join_notice
from party_sync.engine import Engine, EngineRejected

README = Path(__file__).resolve().parents[1] / "README.md"


def code_block(language: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, f"expected one {language} block in the README"
    return str(blocks[0])


async def test_the_readme_campaign_loads_and_plays(
    schema_check: Callable[[Published], None] | None,
) -> None:
    campaign = parse_campaign(json.loads(code_block("json")))
    publisher = RecordingPublisher(check=schema_check)
    engine = ReferenceEngine(campaign, seed=1)
    await engine.start(publisher)
    await engine.handle_join(join_notice("aria"))
    await engine.handle_action(action_request("choice", {"option": "kick"}))
    assert publisher.last("scene.update")["scene_id"] in {"door", "hall"}


async def test_the_readme_example_engine_runs(
    schema_check: Callable[[Published], None] | None,
) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(code_block("python"), str(README), "exec"), namespace)  # noqa: S102 - our README
    engine = namespace["create_engine"]()
    assert isinstance(engine, Engine)
    publisher = RecordingPublisher(check=schema_check)
    await engine.start(publisher)
    action = action_request("skill_check", {})
    await engine.handle_action(action)
    await engine.handle_action(action)  # a repeat publishes its result again, nothing else
    assert publisher.types() == ["action.result", "scene.update", "action.result"]
    results = [p for p in publisher.published if p.type == "action.result"]
    assert results[0].payload == results[1].payload
    with pytest.raises(EngineRejected):
        await engine.handle_action(action_request("choice", {"option": "x"}))
