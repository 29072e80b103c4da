"""Votes over real connections: started by the engine, cast by players, finished exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from party_sync.protocol.errors import BackendUnavailable
from ps_testkit.client import Closed, wait_until
from ps_testkit.cluster import wait_async
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import Running, make_settings, serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis

KEY = "api-key-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPTIONS = [{"id": "A", "label": "Storm the gate"}, {"id": "B", "label": "Sneak round"}]


async def start(srv: Running, party: str = "p1", **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"question": "How do we get in?", "options": OPTIONS, "timeout_s": 30, **extra}
    async with srv.http.post(
        f"{srv.base}/api/v1/parties/{party}/votes", json=body, headers=AUTH
    ) as r:
        return r.status, await r.json()


def cast(vote_id: str, option: str) -> dict[str, Any]:
    return {"type": "vote.cast", "payload": {"vote_id": vote_id, "option": option}}


async def test_a_vote_runs_to_all_voted_and_its_winner_reaches_the_engine_once() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(make_settings(api_key=KEY), engine=engine) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await a.expect("party.join")
        status, vote = await start(srv, vote_id="v-gate", trace_id="trace-vote")
        assert status == 201
        assert vote["vote_id"] == "v-gate"
        started = await b.expect("vote.started")
        assert started["payload"]["deadline"] == vote["deadline"]
        assert started["trace_id"] == "trace-vote"
        await a.expect("vote.started")

        await a.send(cast("v-gate", "B"))
        update = await b.expect("vote.update")
        assert update["payload"] == {
            "vote_id": "v-gate",
            "tallies": {"A": 0, "B": 1},
            "voted": 1,
            "eligible": 2,
        }
        await b.send(cast("v-gate", "B"))
        await b.expect("vote.update")
        finished = await b.expect("vote.finished")
        p = finished["payload"]
        assert (p["winner"], p["reason"], p["tie_broken"]) == ("B", "all_voted", False)
        assert p["applied"] == {
            "action_id": "vote:v-gate",
            "action_type": "choice",
            "option": "B",
            "character_id": "party",
        }
        result = await b.expect("action.result")  # the engine applied the party's choice
        assert result["payload"]["action_id"] == "vote:v-gate"
        assert result["payload"]["character_id"] == "party"
        assert [c.action_id for c in engine.calls] == ["vote:v-gate"]
        call = engine.calls[0]
        assert (call.character_id, call.action_type, dict(call.payload)) == (
            "party",
            "choice",
            {"option": "B", "vote_id": "v-gate"},
        )
        assert call.trace_id == "trace-vote"
        for c in (a, b):
            await c.close()


async def test_a_member_leaving_finishes_a_vote_every_member_still_online_voted() -> None:
    """Votes probe: aria and borin voted, cara left the party (or dropped offline for good), and
    the vote waited for its deadline: a minute of nobody to wait for. A ``party.leave`` now
    finishes it when the members still online have all voted (``all_voted``), once."""
    engine = ScriptedEngine()
    async with serve_in_process(make_settings(api_key=KEY), engine=engine) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        c, _ = await srv.join("cara")
        assert (await start(srv, vote_id="v-leave", timeout_s=300))[0] == 201
        for member in (a, b, c):
            await member.until("vote.started")
        await a.send(cast("v-leave", "A"))
        await b.send(cast("v-leave", "A"))
        await a.until("vote.update")
        update = await a.until("vote.update")
        assert (update["payload"]["voted"], update["payload"]["eligible"]) == (2, 3)  # not cara
        await c.send({"type": "party.leave", "payload": {"character_id": "cara"}})
        finished = await a.until("vote.finished")
        p = finished["payload"]
        assert (p["winner"], p["reason"], p["vote_id"]) == ("A", "all_voted", "v-leave")
        await b.until("vote.finished")
        result = await a.until("action.result")
        assert result["payload"]["action_id"] == "vote:v-leave"
        assert [call.action_id for call in engine.calls] == ["vote:v-leave"]  # applied once
        for member in (a, b, c):
            await member.close()


async def test_a_member_leaving_without_voting_is_no_longer_counted_as_eligible() -> None:
    """(and one coming online is counted at once) UX probe: after a member who had not voted
    left, the two still online saw "1/3 voted",
    and a snapshot said the same. The leave is followed by a ``vote.update`` with the count
    recounted (members online and those who voted), once, and a hello after it says so."""
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        c, _ = await srv.join("cara")
        assert (await start(srv, vote_id="v-count", timeout_s=300))[0] == 201
        for member in (a, b, c):
            await member.until("vote.started")
        await a.send(cast("v-count", "A"))
        update = await b.until("vote.update")
        assert (update["payload"]["voted"], update["payload"]["eligible"]) == (1, 3)
        await c.send({"type": "party.leave", "payload": {"character_id": "cara"}})
        await b.until("party.leave")
        recount = await b.until("vote.update")
        assert recount["payload"] == {
            "vote_id": "v-count",
            "tallies": {"A": 1, "B": 0},
            "voted": 1,
            "eligible": 2,
        }
        d, hello = await srv.join("dain")  # online, not voted: counted
        assert (hello["payload"]["vote"]["voted"], hello["payload"]["vote"]["eligible"]) == (1, 3)
        await b.until("party.join")
        # and told to those online at once, not from the next ballot on
        assert (await b.until("vote.update"))["payload"]["eligible"] == 3
        await b.send(cast("v-count", "B"))  # dain, online now, has not voted: not all voted
        assert (await b.until("vote.update"))["payload"]["eligible"] == 3
        # one recount for the leave and one for the join, no more
        assert [m["type"] for m in b.received].count("vote.update") == 4
        for member in (a, b, c, d):
            await member.close()


async def test_the_deadline_finishes_it_with_the_tie_rule() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(make_settings(api_key=KEY), engine=engine) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await a.expect("party.join")
        status, _ = await start(
            srv, vote_id="v-t", timeout_s=0.3, tie_rule="default_option", default_option="B"
        )
        assert status == 201
        await a.expect("vote.started")
        await a.send(cast("v-t", "A"))
        await a.expect("vote.update")
        finished = await a.expect("vote.finished", timeout=5)
        assert (finished["payload"]["winner"], finished["payload"]["reason"]) == ("A", "timeout")
        await a.send(cast("v-t", "B"))  # after the close
        err = await a.until("system.error")
        assert err["payload"]["code"] == "vote_closed"
        assert err["payload"]["in_reply_to"]["vote_id"] == "v-t"
        assert [c.action_id for c in engine.calls] == ["vote:v-t"]
        for c in (a, b):
            await c.close()


async def test_one_open_vote_per_party_and_bad_requests() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        status, first = await start(srv)
        assert status == 201
        status, problem = await start(srv)
        assert status == 409
        assert problem["error"] == "vote_open"
        # the open vote is named (ops probe: an engine whose start's answer was lost could not
        # tell its own vote from another's), and so is the same start sent again
        assert problem["detail"] == f"the party already has an open vote: {first['vote_id']}"
        status, problem = await start(srv, vote_id=first["vote_id"])
        assert (status, problem["error"]) == (409, "vote_open")
        assert problem["detail"].startswith(f"vote {first['vote_id']} is open already")
        status, problem = await start(srv, party="p1", options=OPTIONS[:1])
        assert (status, problem["error"]) == (422, "invalid_vote")  # checked before the conflict
        assert (await start(srv, party="nobody"))[0] == 422  # no known run for that party
        # another run than the party plays: its decision would be refused by the engine after
        # vote.finished said it was applied (votes probe)
        status, problem = await start(srv, campaign_run_id="r-other")
        assert (status, problem["error"]) == (422, "invalid_vote"), problem
        assert "is not the run party p1 plays" in problem["detail"]
        async with srv.http.post(f"{srv.base}/api/v1/parties/p1/votes", json={}) as r:
            assert r.status == 401
        await a.close()


async def test_bad_casts_get_their_codes_and_change_nothing() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        await start(srv, vote_id="v1")
        await a.expect("vote.started")
        await a.send(cast("v2", "A"))
        assert (await a.expect("system.error"))["payload"]["code"] == "vote_unknown"
        await a.send(cast("v1", "Z"))
        assert (await a.expect("system.error"))["payload"]["code"] == "vote_bad_option"
        await a.send(cast("v1", "A"))
        update = await a.expect("vote.update")
        assert update["payload"]["voted"] == 1
        await a.close()


async def test_a_reconnecting_member_sees_the_open_vote_and_their_own_ballot() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await start(srv, vote_id="v-r")
        await b.until("vote.started")
        await b.send(cast("v-r", "A"))
        await b.until("vote.update")
        await b.close()
        b, hello = await srv.join("borin")
        vote = hello["payload"]["vote"]
        assert vote["vote_id"] == "v-r"
        assert vote["tallies"] == {"A": 1, "B": 0}
        assert vote["your_vote"] == "A"
        assert [o["id"] for o in vote["options"]] == ["A", "B"]
        _, hello_a = await srv.join("aria")
        assert hello_a["payload"]["vote"]["your_vote"] is None
        await a.close()
        await b.close()


async def test_the_hello_counts_the_open_votes_eligible_members_as_they_are_now() -> None:
    """Demo probe: members who came online after a vote's last ballot got ``eligible`` 1 in
    their hello with four members online (the count of the vote's start), until the next
    ballot. The hello counts as ``vote.update`` does: the members online and those who voted."""
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        assert (await start(srv, vote_id="v-e"))[0] == 201
        await a.until("vote.started")
        b, hello_b = await srv.join("borin")
        assert hello_b["payload"]["vote"]["eligible"] == 2
        await b.send(cast("v-e", "A"))
        assert (await a.until("vote.update"))["payload"]["eligible"] == 2
        await b.close()  # borin voted: still counted, offline
        c, hello_c = await srv.join("cara")
        assert hello_c["payload"]["vote"]["eligible"] == 3
        await a.close()
        await c.close()


async def test_in_process_engines_start_votes_through_the_publisher() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        assert engine.publisher is not None
        vote = await engine.publisher.start_vote("p1", "Left or right?", OPTIONS, 30)
        started = await a.expect("vote.started")
        assert started["payload"]["vote_id"] == vote["vote_id"]
        await a.send(cast(vote["vote_id"], "A"))
        await a.expect("vote.update")
        finished = await a.expect("vote.finished")
        assert finished["payload"]["reason"] == "all_voted"
        await asyncio.wait_for(a.expect("action.result"), 5)
        await a.close()


async def test_a_backend_error_while_applying_a_finished_vote_never_loses_its_decision() -> None:
    """Review finding: vote.finished said "applied", then one backend error dropped the choice."""
    engine = ScriptedEngine()
    async with serve_in_process(make_settings(api_key=KEY), engine=engine) as srv:
        assert srv.server is not None
        backend = srv.server.gateway.backend
        original = backend.vote_run
        failures = [BackendUnavailable("redis blip")]

        async def flaky(party_id: str, vote_id: str) -> str | None:
            if failures:
                raise failures.pop()
            return await original(party_id, vote_id)

        backend.vote_run = flaky  # type: ignore[method-assign]
        a, _ = await srv.join("aria")
        status, _ = await start(srv, vote_id="v-blip")
        assert status == 201
        await a.until("vote.started")
        await a.send(cast("v-blip", "A"))
        finished = await a.until("vote.finished")
        assert finished["payload"]["winner"] == "A"
        result = await a.until("action.result")
        assert result["payload"]["action_id"] == "vote:v-blip"
        assert engine.count("vote:v-blip") == 1 and not failures
        await a.close()


async def test_a_vote_its_node_could_not_hand_over_is_applied_by_the_sweep() -> None:
    """The node that closed the vote died before handing its decision to the engine (here: it
    never tries): the votes sweep hands it over, once, after one action timeout."""
    engine = ScriptedEngine()
    settings = make_settings(api_key=KEY, action_timeout=0.5, presence_ttl=1.2)
    async with serve_in_process(settings, engine=engine) as srv:
        assert srv.server is not None
        gateway = srv.server.gateway

        def dies_first(finished: Any, now: float) -> list[Any]:
            return []  # the node never hands the decision over itself

        gateway.core._apply_soon = dies_first  # type: ignore[method-assign]
        a, _ = await srv.join("aria")
        status, _ = await start(srv, vote_id="v-orphan")
        assert status == 201
        await a.until("vote.started")
        await a.send(cast("v-orphan", "B"))
        await a.until("vote.finished")
        result = await a.until("action.result", timeout=10)
        assert result["payload"]["action_id"] == "vote:v-orphan"
        await wait_until(lambda: engine.count("vote:v-orphan") == 1)

        async def applied() -> bool:  # on Redis, the next sweep after the engine's answer
            return await gateway.backend.unapplied_votes(gateway.clock() + 60, 0) == []

        await wait_async(applied)
        assert engine.count("vote:v-orphan") == 1  # handed over once, however many sweeps
        await a.close()


async def test_one_characters_ballots_are_limited_over_all_its_connections() -> None:
    """Each accepted ballot is a vote.update in the party's history: a member re-casting as
    fast as its connections allow would push the others' resume points out of it. Five at
    once, then one a second, per character; another member is not affected."""
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a1, _ = await srv.join("aria")
        a2, _ = await srv.join("aria")  # a second tab of the same character
        b, _ = await srv.join("borin")
        c, _ = await srv.join("cato")  # three members: two ballots never finish the vote
        assert (await start(srv, vote_id="v-spam"))[0] == 201
        await b.until("vote.started")
        for i in range(3):  # three from one tab, each accepted
            await a2.send({**cast("v-spam", "AB"[i % 2]), "trace_id": f"s{i}"})
            await b.until("vote.update")
        for i in range(3, 13):  # then the other tab: the sixth ballot on is refused (bar one
            await a1.send({**cast("v-spam", "AB"[i % 2]), "trace_id": f"s{i}"})  # a second
        refused = await a1.until("system.error")  # may have given back)
        assert refused["payload"]["code"] == "rate_limited"
        assert refused["payload"]["in_reply_to"]["vote_id"] == "v-spam"
        assert refused["payload"]["in_reply_to"]["trace_id"] in {f"s{i}" for i in range(5, 13)}
        await b.send(cast("v-spam", "B"))  # another member votes as usual
        while (await b.until("vote.update"))["payload"]["voted"] != 2:
            pass
        for client in (a1, a2, b, c):
            await client.close()


async def test_refused_ballots_spend_none_of_the_characters_ballots() -> None:
    """docs/protocol.md: 5 ballots at once, counted because each accepted one is a vote.update
    in the history. Ballots refused (an option the vote does not have) make none: three of them,
    then five good ones, are all taken (protocol probe: the last three were rate_limited)."""
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        c, _ = await srv.join("cato")  # three members: two ballots never finish the vote
        assert (await start(srv, vote_id="v-bad"))[0] == 201
        await a.until("vote.started")
        for i in range(3):
            await a.send({**cast("v-bad", "Z"), "trace_id": f"bad{i}"})
            refused = await a.until("system.error")
            assert refused["payload"]["code"] == "vote_bad_option"
        for i in range(5):
            await a.send({**cast("v-bad", "AB"[i % 2]), "trace_id": f"good{i}"})
        for i in range(5):
            update = await b.until("vote.update")
            assert update["trace_id"] == f"good{i}"
        updates = 0
        while updates < 5:  # the voter's own stream: its five updates, and no refusal
            message = await a.recv()
            assert message["type"] != "system.error", message
            updates += message["type"] == "vote.update"
        for client in (a, b, c):
            await client.close()


async def test_refused_ballots_without_end_close_the_connection() -> None:
    """Code review: a refused ballot gives its token back, and each costs a backend call; so
    refused ballots are strikes, as bad input is: sent without end they end in a 1008."""
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        for i in range(40):
            try:
                await a.send({**cast(f"v-none-{i}", "A"), "trace_id": f"x{i}"})
            except ConnectionError:
                break
        codes: list[str] = []

        async def errors_until_closed() -> None:
            while True:
                message = await a.recv()
                if message["type"] == "system.error":
                    codes.append(message["payload"]["code"])

        with pytest.raises(Closed) as closed:
            await errors_until_closed()
        assert closed.value.code == 1008
        assert codes and set(codes) <= {"vote_unknown", "rate_limited"}
