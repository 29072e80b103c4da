"""The basic flow, over real WebSockets to a real server on loopback: two players join, one acts,
and the other sees the action's result, then the scene it caused."""

from __future__ import annotations

import pytest
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis


async def test_two_clients_one_acts_the_other_sees_result_then_scene() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        b, hello_b = await srv.join("borin")
        assert hello_b["payload"]["you"] == "borin"
        assert {m["character_id"] for m in hello_b["payload"]["members"]} == {"aria", "borin"}
        await a.until("party.join")  # borin arrived

        await a.act("act-1", "aria", "r1", trace_id="trace-seed-1")
        result = await b.expect("action.result")
        scene = await b.expect("scene.update")

        assert result["payload"]["action_id"] == "act-1"
        assert result["payload"]["character_id"] == "aria"
        assert scene["seq"] == result["seq"] + 1
        assert result["trace_id"] == scene["trace_id"] == "trace-seed-1"  # carried through
        assert engine.calls[0].trace_id == "trace-seed-1"
        assert engine.count("act-1") == 1
        # the actor sees the same broadcast, byte for byte
        assert (await a.expect("action.result"))["seq"] == result["seq"]
        await a.close()
        await b.close()


async def test_seed_flow_with_the_reference_engine() -> None:
    async with serve_in_process() as srv:  # default engine: campaign_engine:create_engine
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        opening = await b.until("scene.update")  # the engine opens the run on the first join
        option = opening["payload"]["options"][0]["id"]
        await a.act("go-1", "aria", "r1", action_type="choice", payload={"option": option})
        result = await b.until("action.result")
        assert result["payload"]["action_id"] == "go-1"
        scene = await b.until("scene.update")
        assert scene["seq"] > result["seq"]
        assert scene["trace_id"] == result["trace_id"]
        await a.close()
        await b.close()
