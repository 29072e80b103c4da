"""Action ids cannot be used against another actor, on both backends.

A finished vote is applied as the party's action ``vote:<vote_id>`` and the vote id is broadcast:
a member who sends that id first must not cancel or replace the party's decision. And the ledger
never answers one actor's id with another actor's record (neither its result nor "in flight")."""

from __future__ import annotations

import asyncio

import pytest
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import make_settings, serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis

KEY = "api-key-0123456789abcdef0123456789"
OPTIONS = [{"id": "A", "label": "Storm the gate"}, {"id": "B", "label": "Sneak round"}]


async def test_a_member_cannot_take_the_id_of_the_party_vote() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(make_settings(api_key=KEY), engine=engine) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await a.expect("party.join")
        body = {"question": "Which way?", "options": OPTIONS, "timeout_s": 30, "vote_id": "v1"}
        async with srv.http.post(
            f"{srv.base}/api/v1/parties/p1/votes",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
        ) as r:
            assert r.status == 201
        await a.expect("vote.started")
        # aria tries to pre-empt the party's decision with its id, plain and as a choice
        await a.act("vote:v1", "aria", "r1")
        refused = await a.expect("system.error")
        assert refused["payload"]["code"] == "forbidden"
        assert refused["payload"]["in_reply_to"]["action_id"] == "vote:v1"
        await a.act("vote:v1", "aria", "r1", action_type="choice", payload={"option": "A"})
        assert (await a.expect("system.error"))["payload"]["code"] == "forbidden"
        assert engine.count("vote:v1") == 0
        # the party votes B: B is what is applied, once, as the party's action
        await a.send({"type": "vote.cast", "payload": {"vote_id": "v1", "option": "B"}})
        await b.send({"type": "vote.cast", "payload": {"vote_id": "v1", "option": "B"}})
        finished = await b.until("vote.finished")
        assert finished["payload"]["winner"] == "B"
        result = await b.until("action.result")
        assert result["payload"]["action_id"] == "vote:v1"
        assert result["payload"]["character_id"] == "party"
        await wait_until(lambda: engine.count("vote:v1") == 1)
        applied = [c for c in engine.calls if c.action_id == "vote:v1"]
        assert applied[0].character_id == "party" and applied[0].payload["option"] == "B"
        await a.close()
        await b.close()


async def test_another_actors_action_id_tells_nothing_about_it() -> None:
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await a.expect("party.join")
        await a.act("mine", "aria", "r1")
        await wait_until(lambda: engine.count("mine") == 1)
        await b.act("mine", "borin", "r1")  # in flight for aria: borin learns nothing
        taken = await b.expect("system.error")
        assert taken["payload"]["code"] == "forbidden"
        assert taken["payload"]["in_reply_to"]["action_id"] == "mine"
        engine.gate.set()
        await a.until("action.result")
        await a.until("scene.update")
        await b.until("action.result")  # the broadcast
        await b.until("scene.update")
        await b.act("mine", "borin", "r1")  # finished for aria: not aria's result, a refusal
        again = await b.expect("system.error")
        assert again["payload"]["code"] == "forbidden"
        await a.act("mine", "aria", "r1")  # aria's own resend still gets her result
        assert (await a.expect("action.result"))["payload"]["action_id"] == "mine"
        assert engine.count("mine") == 1
        await a.close()
        await b.close()
