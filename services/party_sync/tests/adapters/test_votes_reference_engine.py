"""The reference engine's party vote over real connections: rowing out to the Reef Gate starts a
vote, both players cast, the party's choice moves the game on (campaign_engine, ``votes.py``)."""

from __future__ import annotations

from typing import Any

import pytest
from ps_testkit.client import Client
from ps_testkit.servers import serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis


def cast(vote_id: str, option: str) -> dict[str, Any]:
    return {"type": "vote.cast", "payload": {"vote_id": vote_id, "option": option}}


async def test_the_party_votes_at_the_reef_gate_and_its_choice_moves_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CAMPAIGN_ENGINE_SEED", "11")  # read when the default engine is made
    async with serve_in_process() as srv:  # default engine: campaign_engine:create_engine
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        opening = await b.until("scene.update")
        assert opening["payload"]["scene_id"] == "harbor"  # scene 1: anyone chooses
        while "joins the party." not in (await a.until("scene.update"))["payload"]["narration"]:
            pass  # the engine has registered both: nothing of the joins comes after this

        await a.act("row-1", "aria", "r1", "choice", {"option": "row"}, trace_id="trace-row")
        started: dict[str, Any] = {}
        for client in (a, b):
            result = await client.until("action.result")
            assert (result["payload"]["action_id"], result["trace_id"]) == ("row-1", "trace-row")
            scene = await client.expect("scene.update")
            assert (scene["payload"]["scene_id"], scene["payload"]["scene_number"]) == ("reef", 2)
            started = await client.expect("vote.started")  # after the scene it is about
            assert started["seq"] == scene["seq"] + 1
            assert started["trace_id"] == "trace-row"
        vote = started["payload"]
        assert vote["vote_id"] == "r1.s2"
        assert vote["question"].startswith("The Reef Gate bars the way.")
        assert [o["id"] for o in vote["options"]] == ["climb", "wade"]
        assert (vote["timeout_s"], vote["tie_rule"], vote["default_option"]) == (
            60,
            "default_option",
            "wade",
        )

        # While the party votes, one character cannot decide for everyone.
        await a.act("climb-1", "aria", "r1", "choice", {"option": "climb"})
        refused = await a.expect("system.error")
        assert refused["payload"]["code"] == "action_rejected"
        assert "party is voting on this" in refused["payload"]["message"]

        await a.send(cast("r1.s2", "wade"))
        for client in (a, b):
            update = await client.expect("vote.update")
            assert (update["payload"]["voted"], update["payload"]["eligible"]) == (1, 2)
        await b.send(cast("r1.s2", "wade"))
        for client in (a, b):
            await expect_the_partys_choice(client)
        for client in (a, b):
            await client.close()


async def expect_the_partys_choice(client: Client) -> None:
    """The vote's last update, its result, then the engine applying it: into the fight."""
    assert (await client.expect("vote.update"))["payload"]["voted"] == 2
    finished = await client.expect("vote.finished")
    p = finished["payload"]
    assert (p["winner"], p["reason"], p["tie_broken"]) == ("wade", "all_voted", False)
    assert p["applied"]["action_id"] == "vote:r1.s2"
    result = await client.expect("action.result")
    assert result["payload"]["character_id"] == "party"
    assert result["payload"]["action_id"] == "vote:r1.s2"
    assert result["payload"]["state"] == {"effects": [], "scene_flags": {}}
    assert result["trace_id"] == finished["trace_id"] == "trace-row"
    scene = await client.expect("scene.update")
    assert (scene["payload"]["scene_id"], scene["payload"]["scene_number"]) == ("claws", 3)
    assert scene["payload"]["narration"].startswith("The party chose: Wade through the tide pools.")
    assert scene["trace_id"] == "trace-row"
    assert (await client.expect("combat.update"))["payload"]["active"] is True
