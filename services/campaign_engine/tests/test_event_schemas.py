"""Every event the engine publishes validates against the protocol's JSON Schemas.

The ``publisher`` fixture already validates each event in every test when the schema files exist;
this module makes that visible: through the ``live_check`` fixture it skips, saying why, when
they do not, and proves the check is live (a broken payload is caught) when they do.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from campaign_engine.campaign import builtin_campaign
from campaign_engine.engine import ReferenceEngine
from campaign_engine.testing import Published, RecordingPublisher, action_request, join_notice

EventCheck = Callable[[Published], None]


async def test_all_event_types_validate(live_check: EventCheck) -> None:
    publisher = RecordingPublisher(check=live_check)
    engine = ReferenceEngine(builtin_campaign(), seed=5)
    await engine.start(publisher)
    await engine.handle_join(join_notice("aria"))
    await engine.handle_action(action_request("skill_check", {}))
    await engine.handle_action(
        action_request("choice", {"option": "row"}, character_id="party", action_id="vote:v-1")
    )
    await engine.handle_action(publisher.finish_vote("party-1", "wade"))  # the party's vote
    while publisher.last("scene.update")["kind"] == "combat":
        await engine.handle_action(action_request("combat", {"move": "attack"}))
    assert set(publisher.types()) == {
        "action.result",
        "scene.update",
        "combat.update",
        "party.state",
    }


def test_the_check_is_live(live_check: EventCheck) -> None:
    broken = {
        "scene_number": 0,
        "scene_id": "bad id!",
        "title": "",
        "narration": "",
        "options": [],
        "kind": "story",
    }
    with pytest.raises(AssertionError, match="breaks its schema"):
        live_check(Published("party-1", "scene.update", broken, "trace-1", 1))
