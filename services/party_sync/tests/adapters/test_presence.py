"""Presence over real connections: hello, joins once per character, grace, reconnect, leave."""

from __future__ import annotations

import asyncio
import time

import pytest
from party_sync.core.binding import Binding
from ps_testkit.client import Client, Closed, wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import Running, make_settings, serve_in_process, token

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis


def settled(srv: Running, outcome: str) -> int:
    assert srv.server is not None
    for line in srv.server.gateway.metrics.render().decode().splitlines():
        if line.startswith(f'party_sync_presence_settles_total{{outcome="{outcome}"}}'):
            return int(float(line.split()[-1]))
    return 0


async def test_hello_reports_members_scene_and_stream_position() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        a, hello = await srv.join("aria")
        p = hello["payload"]
        assert p["you"] == "aria" and p["party_id"] == "p1" and p["campaign_run_id"] == "r1"
        assert p["members"] == [{"character_id": "aria", "display_name": "Aria", "online": True}]
        assert p["seq"] == 1  # aria's own join is the party's first event
        assert p["resumed"] is False and p["scene_number"] == 0 and p["scene"] is None
        assert p["epoch"]
        await a.close()


async def test_second_tab_does_not_announce_a_second_join() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        b, _ = await srv.join("borin")
        a1, _ = await srv.join("aria")
        join = await b.expect("party.join")
        assert join["payload"] == {"character_id": "aria", "display_name": "Aria"}
        a2, hello2 = await srv.join("aria")  # a second tab
        assert hello2["payload"]["seq"] == join["seq"]  # nothing was published for it
        await a2.act("x1", "aria", "r1")
        nxt = await b.expect("action.result")  # the very next event is the action, no join
        assert nxt["seq"] == join["seq"] + 1
        for c in (a1, a2, b):
            await c.close()


async def test_leave_after_grace_and_no_flap_on_quick_reconnect() -> None:
    settings = make_settings(presence_grace=0.3)
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        b, _ = await srv.join("borin")
        a, _ = await srv.join("aria")
        await b.expect("party.join")

        await a.close()
        a, hello = await srv.join("aria")  # back within the grace period
        assert {m["character_id"]: m["online"] for m in hello["payload"]["members"]} == {
            "borin": True,
            "aria": True,
        }
        # wait until the grace timer has run and found aria connected again
        await wait_until(lambda: settled(srv, "stayed") == 1)
        await a.act("y1", "aria", "r1")
        # no leave/join flapped in between (expect passes over the transient action.accepted)
        await b.expect("action.result")
        await b.expect("scene.update")

        await a.close()
        leave = await b.expect("party.leave")
        assert leave["payload"] == {"character_id": "aria", "reason": "disconnected"}
        a, hello = await srv.join("aria")
        members = {m["character_id"]: m["online"] for m in hello["payload"]["members"]}
        assert members == {"borin": True, "aria": True}
        assert (await b.expect("party.join"))["payload"]["character_id"] == "aria"
        await a.close()
        await b.close()


async def test_reconnect_gets_hello_with_current_scene_and_members() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await a.act("s1", "aria", "r1")
        await b.until("scene.update")
        await a.act("s2", "aria", "r1")
        scene = await b.until("scene.update")
        await b.close()
        b, hello = await srv.join("borin")
        p = hello["payload"]
        assert p["scene_number"] == 2 == scene["payload"]["scene_number"]
        assert p["scene"] == scene["payload"]
        assert p["seq"] == scene["seq"]
        assert {m["character_id"] for m in p["members"]} == {"aria", "borin"}
        await a.close()
        await b.close()


async def test_voluntary_leave_closes_every_tab_and_tells_the_party() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        b, _ = await srv.join("borin")
        a1, _ = await srv.join("aria")
        a2, _ = await srv.join("aria")
        await b.expect("party.join")
        await a1.send({"type": "party.leave", "payload": {"character_id": "aria"}})
        leave = await b.expect("party.leave")
        assert leave["payload"] == {"character_id": "aria", "reason": "left"}
        assert await a1.closed() == 1000
        assert await a2.closed() == 1000
        _, hello = await srv.join("borin")
        assert [m["character_id"] for m in hello["payload"]["members"]] == ["borin"]
        await b.close()


async def test_leave_for_another_character_is_forbidden() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        await a.send(
            {"type": "party.leave", "payload": {"character_id": "borin"}, "trace_id": "t9"}
        )
        err = await a.expect("system.error")
        assert err["payload"]["code"] == "forbidden"
        assert err["payload"]["in_reply_to"] == {"trace_id": "t9", "type": "party.leave"}
        await a.act("ok", "aria", "r1")
        assert (await a.expect("action.result"))["payload"]["action_id"] == "ok"
        await a.close()


async def test_token_expiry_on_an_open_connection_closes_with_4001() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        client, _ = await srv.join("aria")
        short = await srv.connect("short", token_value=token("short", ttl=1))
        await short.expect("system.hello")
        err = await short.until("system.error", timeout=5)
        assert err["payload"]["code"] == "token_expired"
        try:
            code = await short.closed()
        except Closed as exc:
            code = exc.code
        assert code == 4001
        await client.close()


async def test_a_token_taken_within_the_leeway_is_not_closed_the_moment_it_opens() -> None:
    # Expired 5 s ago by the server's clock, within the 30-s leeway: the handshake takes it,
    # so the connection lives until the leeway ends; it used to get 4001 right after its
    # hello, and a client whose own clock said "valid" reconnected with it in a loop.
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        late = await srv.connect("late", token_value=token("late", ttl=-5))
        await late.expect("system.hello")
        await late.act("after-hello", "late", "r1")
        result = await late.expect("action.result")
        assert result["payload"]["action_id"] == "after-hello"
        assert not [m for m in late.received if m["type"] == "system.error"]
        await late.close()


# -- presence after a stall (docs/redis.md, "Guarantees") --------------------------------------


def presence_view(client: Client) -> dict[str, bool]:
    """Who is online, as one client's own stream says (its hello, then joins and leaves)."""
    view: dict[str, bool] = {}
    for m in client.received:
        if m["type"] == "system.hello":
            view = {x["character_id"]: x["online"] for x in m["payload"]["members"]}
        elif m["type"] in ("party.join", "party.leave"):
            view[m["payload"]["character_id"]] = m["type"] == "party.join"
    return view


async def test_players_swept_as_expired_while_connected_are_announced_again() -> None:
    ttl = 1.5
    async with serve_in_process(make_settings(presence_ttl=ttl), engine=ScriptedEngine()) as srv:
        assert srv.server is not None
        backend = srv.server.gateway.backend
        b, _ = await srv.join("borin")
        a, _ = await srv.join("aria")
        await b.expect("party.join")
        mark = len(b.received)
        # What the sweep finds after a stall longer than the ttl: every entry past its expiry.
        leaves = await backend.expire(time.time() + 2 * ttl)
        assert sorted(e.payload["character_id"] for e in leaves) == ["aria", "borin"]
        # The connections never closed: the node's next refresh announces both again.
        async with asyncio.timeout(5):
            while sum(m["type"] == "party.join" for m in b.received[mark:]) < 2:
                await b.until("party.join")
        presence = [
            (m["type"], m["payload"]["character_id"])
            for m in b.received[mark:]
            if m["type"] in ("party.join", "party.leave")
        ]
        assert sorted(presence[:2]) == [("party.leave", "aria"), ("party.leave", "borin")]
        assert sorted(presence[2:]) == [("party.join", "aria"), ("party.join", "borin")]
        _, hello = await srv.join("borin")  # a second tab: no join, the snapshot is the truth
        members = {m["character_id"]: m["online"] for m in hello["payload"]["members"]}
        assert members == {"aria": True, "borin": True}
        await a.act("after", "aria", "r1")
        for client in (a, b):  # everything published before the action has been read
            assert (await client.until("action.result"))["payload"]["action_id"] == "after"
            assert presence_view(client) == {"aria": True, "borin": True}
        assert len(presence) == len(
            [m for m in b.received[mark:] if m["type"] in ("party.join", "party.leave")]
        )  # no spurious join (nor leave) since
        await a.close()
        await b.close()


async def test_refresh_announces_again_only_characters_that_are_not_online_and_did_not_leave() -> (
    None
):
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        assert srv.server is not None
        backend = srv.server.gateway.backend
        ttl = srv.server.gateway.settings.presence_ttl
        aria, borin = Binding("p9", "r9", "aria", "Aria"), Binding("p9", "r9", "borin", "Borin")
        t0 = time.time() + 1000  # beyond the node's own sweeps, which run at the real time
        await backend.connect(aria, "a1", t0, "t" * 32)
        await backend.connect(borin, "b1", t0, "t" * 32)
        await backend.connect(borin, "b2", t0, "t" * 32)
        assert await backend.refresh([(aria, "a1"), (borin, "b1")], t0 + 1) == []  # online

        late = t0 + ttl + 5  # aria's node stalled; borin's refreshed in time
        assert await backend.refresh([(borin, "b1"), (borin, "b2")], late - 1) == []
        (leave,) = await backend.expire(late)
        assert leave.payload == {"character_id": "aria", "reason": "expired"}
        (join,) = await backend.refresh([(aria, "a1"), (borin, "b1"), (borin, "b2")], late)
        assert join.seq == leave.seq + 1
        assert join.payload == {"character_id": "aria", "display_name": "Aria"}
        assert await backend.refresh([(aria, "a1")], late + 1) == []  # once

        # A voluntary leave racing with the refresh of a closing tab: not brought back.
        assert await backend.leave(borin, late + 2, "t" * 32) is not None
        assert await backend.refresh([(borin, "b1")], late + 3) == []
        assert await backend.expire(late + 3) == []
        members = (await backend.snapshot("p9")).members
        assert {m["character_id"]: m["online"] for m in members} == {"aria": True}
