"""Recovery rules of the gateway, on both backends (docs/redis.md, "Guarantees"): the engine is
asked to re-state a party whose stream starts a new epoch, and a final answer lost on the way
still reaches its sender, once."""

from __future__ import annotations

import pytest
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import make_settings, serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis


async def test_the_first_join_of_an_epoch_asks_the_engine_to_restate_once() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(engine=engine) as srv:
        a, hello = await srv.join("aria")
        await wait_until(lambda: len(engine.restates) == 1)
        notice = engine.restates[0]
        assert (notice.party_id, notice.campaign_run_id) == ("p1", "r1")
        assert notice.epoch == hello["payload"]["epoch"]
        # the restate comes before that member's join notice (a known character's join then
        # changes nothing; a new run is started by the join)
        await wait_until(lambda: len(engine.joins) == 1)
        b, _ = await srv.join("borin")  # the same epoch: no new restate
        await wait_until(lambda: len(engine.joins) == 2)
        assert len(engine.restates) == 1
        await a.close()
        await b.close()


async def test_a_refusal_lost_on_the_way_reaches_its_sender_once_anyway() -> None:
    engine = ScriptedEngine()
    engine.mode = "reject"
    async with serve_in_process(make_settings(action_timeout=0.4), engine=engine) as srv:
        assert srv.server is not None
        backend = srv.server.gateway.backend
        original = backend.send_direct
        dropped: list[bytes] = []

        async def lossy(party_id: str, character_id: str, data: bytes) -> None:
            if not dropped:  # the pub/sub connection broke just then
                dropped.append(data)
                return
            await original(party_id, character_id, data)

        backend.send_direct = lossy  # type: ignore[method-assign]
        a, _ = await srv.join("aria")
        await a.act("bad", "aria", "r1")
        err = await a.expect("system.error", timeout=5)  # sent again by the sweep
        assert dropped, "the refusal was not sent through send_direct"
        assert err["payload"]["code"] == "action_rejected"
        assert err["payload"]["in_reply_to"]["action_id"] == "bad"
        # once: nothing more comes for it (the next message is the answer to a new action)
        engine.mode = "answer"
        await a.act("good", "aria", "r1")
        assert (await a.expect("action.result"))["payload"]["action_id"] == "good"
        await a.close()
