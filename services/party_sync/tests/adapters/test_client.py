"""``party_sync.client.PartyClient`` against a real in-process server over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
from party_sync.client import (
    ActionFailed,
    ActionResult,
    AiohttpTransport,
    Backoff,
    ClientClosed,
    ClientEvent,
    Connected,
    ConnectRefused,
    Disconnected,
    MemberLeft,
    PartyClient,
    PartyEvent,
    SceneChanged,
    ServerError,
    Subscription,
    VoteFinished,
    VoteRefused,
    VoteStarted,
)
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.proxy import TcpProxy
from ps_testkit.servers import Running, make_settings, serve_in_process, token

E = TypeVar("E")
KEY = "api-key-0123456789abcdef0123456789"


def make_client(
    srv: Running,
    character: str,
    *,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    **kwargs: Any,
) -> PartyClient:
    if "token_provider" not in kwargs:
        kwargs.setdefault("token", token(character))

    async def no_wait(delay: float) -> None:
        await asyncio.sleep(0)

    return PartyClient(
        srv.ws_url,
        transport=AiohttpTransport(srv.http),
        backoff=Backoff(random=lambda: 0.0),
        sleep=sleep or no_wait,
        **kwargs,
    )


@asynccontextmanager
async def connected(srv: Running, character: str, **kwargs: Any) -> AsyncIterator[PartyClient]:
    client = make_client(srv, character, **kwargs)
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


async def next_of(sub: Subscription, kind: type[E], timeout: float = 5.0) -> E:
    async with asyncio.timeout(timeout):
        return await sub.next_of(kind)


def drop(srv: Running, character: str, code: int = 4002) -> None:
    """The server side drops the character's connections (like a slow consumer: 4002)."""
    assert srv.server is not None
    sessions = [s for s in srv.server.gateway.sessions if s.character_id == character]
    assert sessions, f"{character} has no connection"
    for session in sessions:
        session.close(code, "dropped by the test")


def seqs_after(events: list[ClientEvent]) -> list[int]:
    """The party seqs a subscriber applied, checked gap-free across (resumed) hellos."""
    applied: list[int] = []
    last: int | None = None
    for event in events:
        if isinstance(event, Connected):
            last = event.hello["resumed_from"] if event.resumed else event.hello["seq"]
        elif isinstance(event, PartyEvent):
            assert last is not None and event.seq == last + 1, f"{event.seq} after {last}"
            last = event.seq
            applied.append(event.seq)
    return applied


async def test_a_refused_token_stops_the_client_with_the_servers_reason() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        client = make_client(srv, "aria", token=token("aria", secret="another-secret-" * 3))
        with pytest.raises(ConnectRefused) as refused:
            await client.connect()
        assert refused.value.status == 401 and "token was refused" in str(refused.value)
        # which check failed, from the 401's WWW-Authenticate (RFC 6750)
        assert refused.value.reason.startswith("bad token signature: ")
        await client.close()
        # a client with its own HTTP session (the default) closes it when it stops for good,
        # without close(): `async with PartyClient(...)` whose connect() raised leaves nothing
        alone = PartyClient(srv.ws_url, token=token("aria", secret="another-secret-" * 3))
        with pytest.raises(ConnectRefused):
            await alone.connect()
        await alone.wait_closed()
        assert alone._transport._session is None  # type: ignore[attr-defined]


async def test_a_refused_handshake_names_the_check_in_www_authenticate() -> None:
    import aiohttp

    async with serve_in_process(engine=ScriptedEngine()) as srv, aiohttp.ClientSession() as http:
        cases = {
            "": 'Bearer realm="party_sync"',
            "not-a-jwt": 'Bearer realm="party_sync", error="invalid_token", '
            'error_description="malformed token"',
            token("aria", secret="another-secret-" * 3): 'Bearer realm="party_sync", '
            'error="invalid_token", error_description="bad token signature"',
        }
        for bad, challenge in cases.items():
            async with http.get(srv.ws_url, params={"token": bad} if bad else {}) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"] == challenge


async def test_two_clients_act_and_both_see_the_result_and_the_scene() -> None:
    async with (
        serve_in_process(engine=ScriptedEngine()) as srv,
        connected(srv, "aria") as a,
        connected(srv, "borin") as b,
    ):
        seen = b.events()
        result = await a.send_action("skill_check", {"stat": "wits"})
        assert isinstance(result, ActionResult) and result.outcome == "success"
        assert (await next_of(seen, ActionResult)).action_id == result.action_id
        scene = await next_of(seen, SceneChanged)
        assert scene.scene_number == 1 and b.state.scene_number == 1
        await wait_until(lambda: a.state.scene_number == 1)
        assert set(a.state.online) == set(b.state.online) == {"aria", "borin"}
        assert a.state.you == "aria" and a.state.campaign_run_id == "r1"


async def test_concurrent_actions_of_one_client_are_sent_one_at_a_time_and_all_answered() -> None:
    """Outside client probe: three concurrent send_action calls: the first resolved, the other
    two raised ActionFailed character_busy (the server allows one action in flight per
    character); the browser library queues them. Now each is sent once the one before it is
    answered, and all three resolve, in order."""
    engine = ScriptedEngine()
    async with serve_in_process(engine=engine) as srv, connected(srv, "aria") as a:
        results = await asyncio.gather(
            *(a.send_action("skill_check", action_id=f"c-{i}") for i in range(3))
        )
        assert [r.action_id for r in results] == ["c-0", "c-1", "c-2"]
        assert [r.seq for r in results] == sorted(r.seq for r in results)
        assert [engine.count(f"c-{i}") for i in range(3)] == [1, 1, 1]


async def test_a_call_cancelled_leaves_the_calls_that_joined_its_action_waiting() -> None:
    """Cancelling one ``send_action`` call cancelled the action's shared future: every call that
    had joined it under the same ``action_id`` raised ``CancelledError`` though nobody cancelled
    it. The others wait on for the answer now; the action is sent once and answered."""
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()  # hold the action in flight
    async with serve_in_process(engine=engine) as srv, connected(srv, "aria") as a:
        first = asyncio.create_task(a.send_action("skill_check", action_id="j-1"))
        await wait_until(lambda: engine.count("j-1") == 1)
        joined = asyncio.create_task(a.send_action("skill_check", action_id="j-1"))
        await wait_until(lambda: a._action_callers.get("j-1") == 2)  # (it joined the call)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert not joined.done()
        engine.gate.set()
        async with asyncio.timeout(10):
            result = await joined
        assert result.action_id == "j-1" and engine.count("j-1") == 1


async def test_every_call_of_an_action_cancelled_lets_the_next_action_go_out() -> None:
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    async with serve_in_process(engine=engine) as srv, connected(srv, "aria") as a:
        calls = [asyncio.create_task(a.send_action("skill_check", action_id="k-1"))]
        await wait_until(lambda: engine.count("k-1") == 1)
        calls.append(asyncio.create_task(a.send_action("skill_check", action_id="k-1")))
        queued = asyncio.create_task(a.send_action("skill_check", action_id="k-2"))
        await wait_until(lambda: a._action_callers.get("k-1") == 2 and "k-2" in a._actions)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        # k-2 went out at once (k-1 still in flight on the server: its character is busy, as
        # send_action's docstring says), not after k-1's answer
        with pytest.raises(ActionFailed) as refused:
            async with asyncio.timeout(10):
                await queued
        assert refused.value.code == "character_busy" and engine.count("k-1") == 1


async def test_an_action_id_or_trace_id_that_breaks_the_rule_is_refused_before_it_is_sent() -> None:
    """Clients probe: ``send_action(action_id="x" * 65)`` got a ``schema_violation`` that could
    not name the action; the call, and every action after it, waited for ever. Refused at once
    now, nothing sent, and the next action goes out."""
    engine = ScriptedEngine()
    async with serve_in_process(engine=engine) as srv, connected(srv, "aria") as a:
        for bad in ("x" * 65, "bad id!", "é", ""):
            with pytest.raises(ValueError, match="action_id"):
                await a.send_action("skill_check", action_id=bad)
        for bad in ("t" * 129, ""):
            with pytest.raises(ValueError, match="trace_id"):
                await a.send_action("skill_check", trace_id=bad)
        # larger than the server takes (over 4x its limit it closes the connection, and the
        # resend after every reconnect was closed again): refused, with the limit
        with pytest.raises(ValueError, match="at most 65536 bytes"):
            await a.send_action("skill_check", {"skill": "x" * 300_000}, action_id="too-big")
        with pytest.raises(ValueError, match="option"):
            await a.cast_vote("v-1", "x" * 300_000)
        with pytest.raises(ValueError, match="vote_id"):
            await a.cast_vote("bad vote", "A")
        async with asyncio.timeout(10):
            done = await a.send_action("skill_check", action_id="after-1")
        assert done.action_id == "after-1" and engine.count("after-1") == 1


async def test_an_action_sent_again_under_its_id_gets_its_result_again() -> None:
    """Soak probe: an ``action_id`` sent again on the same connection (after a refusal that is
    not final, or to learn its result) was never put on the wire: the call waited until a
    reconnect. The server answers the repeat with the original result; the engine ran it once."""
    engine = ScriptedEngine()
    async with serve_in_process(engine=engine) as srv, connected(srv, "aria") as a:
        first = await a.send_action("skill_check", action_id="again-1")
        async with asyncio.timeout(10):
            repeat = await a.send_action("skill_check", action_id="again-1")
        assert (repeat.action_id, repeat.seq) == (first.action_id, first.seq)
        assert engine.count("again-1") == 1


async def test_a_dropped_connection_resumes_and_misses_nothing() -> None:
    gate = asyncio.Event()

    async def gated(delay: float) -> None:
        await gate.wait()  # the test decides when the client may reconnect

    async with (
        serve_in_process(engine=ScriptedEngine()) as srv,
        connected(srv, "aria", sleep=gated) as a,
        connected(srv, "borin") as b,
    ):
        events: list[ClientEvent] = []
        a.on(object, events.append)
        seen = a.events()
        drop(srv, "aria")
        gone = await next_of(seen, Disconnected)
        assert gone.code == 4002 and gone.reconnecting
        missed = await b.send_action("combat")  # while aria is away
        gate.set()
        hello = await next_of(seen, Connected)
        assert hello.resumed is True
        replayed = await next_of(seen, ActionResult)
        assert replayed.action_id == missed.action_id
        await next_of(seen, SceneChanged)
        live = await a.send_action("skill_check")
        assert live.seq > replayed.seq
        await next_of(seen, SceneChanged)
        applied = seqs_after(events)  # gap-free and without a duplicate, across the drop
        assert applied[0] == hello.hello["resumed_from"] + 1 and applied[-1] == live.seq + 1


async def test_an_action_pending_across_a_reconnect_happens_once() -> None:
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()  # hold the action in flight
    async with serve_in_process(engine=engine) as srv, connected(srv, "aria") as a:
        seen = a.events()
        acting = asyncio.create_task(a.send_action("skill_check", action_id="once-1"))
        await wait_until(lambda: engine.count("once-1") == 1)
        drop(srv, "aria")
        await next_of(seen, Connected)  # reconnected; the action was resent with its id
        in_flight = await next_of(seen, ServerError)
        assert in_flight.code == "action_in_flight" and not acting.done()
        engine.gate.set()
        result = await asyncio.wait_for(acting, 5)
        assert result.action_id == "once-1"
        assert engine.count("once-1") == 1


async def test_a_link_gone_silent_is_found_by_the_heartbeat_and_the_action_answered_once() -> None:
    """No FIN, no RST: the proxy drops every byte both ways. The client's pings go unanswered,
    it drops the link, reconnects (a new connection passes) and resends with the same id."""
    engine = ScriptedEngine()
    async with (
        serve_in_process(engine=engine) as srv,
        TcpProxy(int(srv.base.rsplit(":", 1)[1])) as proxy,
    ):
        client = PartyClient(
            proxy.base.replace("http", "ws") + "/ws",
            token=token("aria"),
            transport=AiohttpTransport(srv.http, heartbeat=0.5),
            backoff=Backoff(random=lambda: 0.0),
        )
        await client.connect()
        seen = client.events()
        assert proxy.stall() == 1
        acting = asyncio.create_task(client.send_action("skill_check", action_id="hb-1"))
        assert (await next_of(seen, Disconnected)).reconnecting is True
        assert (await next_of(seen, Connected)).resumed is True
        result = await asyncio.wait_for(acting, 5)
        assert result.action_id == "hb-1" and engine.count("hb-1") == 1
        await client.close()


async def test_a_result_published_while_away_settles_the_action_from_the_replay() -> None:
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    reconnect = asyncio.Event()

    async def gated(delay: float) -> None:
        await reconnect.wait()

    async with (
        serve_in_process(engine=engine) as srv,
        connected(srv, "aria", sleep=gated) as a,
    ):
        seen = a.events()
        acting = asyncio.create_task(a.send_action("skill_check", action_id="away-1"))
        await wait_until(lambda: engine.count("away-1") == 1)
        drop(srv, "aria")
        await next_of(seen, Disconnected)
        engine.gate.set()  # the result is published while aria is disconnected
        await wait_until(lambda: engine.scene_number == 1)
        reconnect.set()
        result = await asyncio.wait_for(acting, 5)
        assert result.action_id == "away-1" and engine.count("away-1") == 1


async def test_an_expired_token_is_refreshed_through_the_provider() -> None:
    issued: list[float] = []

    async def provider() -> str:
        # the first one expires a second or two after the handshake: 4001 then (a token already
        # past exp is taken within the leeway, and lives until the leeway ends)
        ttl = 2.0 if not issued else 3600.0
        issued.append(ttl)
        return token("aria", ttl=ttl)

    async with serve_in_process(engine=ScriptedEngine()) as srv:
        client = make_client(srv, "aria", token_provider=provider)
        seen = client.events()
        await client.connect()
        expired = await next_of(seen, ServerError)
        assert expired.code == "token_expired"
        assert (await next_of(seen, Disconnected)).code == 4001
        assert (await next_of(seen, Connected)).resumed is True
        assert (await client.send_action("skill_check")).outcome == "success"
        assert issued == [2.0, 3600.0]
        await client.close()


async def test_a_refused_handshake_asks_the_provider_again() -> None:
    tokens = [token("aria", secret="not-the-server-secret-0123456789abcdef"), token("aria")]
    calls: list[int] = []

    async def provider() -> str:
        calls.append(1)
        return tokens[len(calls) - 1]

    async with serve_in_process(engine=ScriptedEngine()) as srv:
        client = make_client(srv, "aria", token_provider=provider)
        state = await client.connect()
        assert state.you == "aria" and len(calls) == 2
        await client.close()


async def test_leave_stops_the_client_for_good() -> None:
    async with (
        serve_in_process(engine=ScriptedEngine()) as srv,
        connected(srv, "borin") as b,
    ):
        a = make_client(srv, "aria")
        await a.connect()
        seen = b.events()
        assert await asyncio.wait_for(a.leave(), 5) is True
        assert a.close_code == 1000 and a.error is None and a.left
        left = await next_of(seen, MemberLeft)
        assert (left.character_id, left.reason) == ("aria", "left")
        assert "aria" not in b.state.members
        assert srv.server is not None
        assert not [s for s in srv.server.gateway.sessions if s.character_id == "aria"]
        with pytest.raises(ClientClosed):
            await a.send_action("skill_check")
        with pytest.raises(ClientClosed):  # (it returned the stale state: outside client probe)
            await a.connect()


async def test_a_leave_that_never_reached_the_server_says_so() -> None:
    """Client probe: the server gone, ``leave()`` and then ``close()`` while it reconnected:
    ``leave()`` returned as after a leave, with the character not removed. It returns False
    then (True only after the server's 1000)."""
    async with (
        serve_in_process(engine=ScriptedEngine()) as srv,
        TcpProxy(int(srv.base.rsplit(":", 1)[1])) as proxy,
    ):
        a = PartyClient(
            proxy.base.replace("http", "ws") + "/ws",
            token=token("aria"),
            transport=AiohttpTransport(srv.http),
            backoff=Backoff(random=lambda: 0.0),
        )
        await a.connect()
        seen = a.events()
        proxy.refusing = True
        proxy.cut()
        assert (await next_of(seen, Disconnected)).reconnecting is True
        leaving = asyncio.create_task(a.leave())
        await asyncio.sleep(0.05)
        await a.close()
        assert await asyncio.wait_for(leaving, 5) is False
        assert not a.left


async def test_close_reports_the_normal_closure_it_made() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        client = make_client(srv, "aria")
        await client.connect()
        seen = client.events()
        await asyncio.wait_for(client.close(), 5)
        gone = await next_of(seen, Disconnected)  # (it said 1006: outside client probe)
        assert (gone.code, gone.reconnecting) == (1000, False)
        assert client.close_code == 1000 and client.error is None


async def test_a_policy_close_is_not_retried() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        client = make_client(srv, "aria")
        await client.connect()
        seen = client.events()
        drop(srv, "aria", code=1008)
        assert (await next_of(seen, Disconnected)).reconnecting is False
        await asyncio.wait_for(client.wait_closed(), 5)
        assert isinstance(client.error, ClientClosed) and client.close_code == 1008
        await client.close()


async def test_votes_are_cast_and_followed() -> None:
    async with (
        serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv,
        connected(srv, "aria") as a,
        connected(srv, "borin") as b,
    ):
        await wait_until(lambda: set(a.state.online) == {"aria", "borin"})
        seen = a.events()
        body = {
            "question": "Which way?",
            "options": [{"id": "L", "label": "Left"}, {"id": "R", "label": "Right"}],
            "timeout_s": 30,
        }
        headers = {"Authorization": f"Bearer {KEY}"}
        async with srv.http.post(
            f"{srv.base}/api/v1/parties/p1/votes", json=body, headers=headers
        ) as resp:
            assert resp.status == 201
        started = await next_of(seen, VoteStarted)
        assert a.state.vote is not None and a.state.vote["vote_id"] == started.vote_id
        with pytest.raises(VoteRefused) as refused:
            await a.cast_vote(started.vote_id, "up")
        assert refused.value.code == "vote_bad_option"
        update = await a.cast_vote(started.vote_id, "R")
        assert update.payload["tallies"] == {"L": 0, "R": 1}
        assert a.state.vote["your_vote"] == "R"
        await b.cast_vote(started.vote_id, "R")
        finished = await next_of(seen, VoteFinished)
        assert finished.winner == "R" and a.state.vote is None


async def test_a_callback_can_be_removed() -> None:
    async with (
        serve_in_process(engine=ScriptedEngine()) as srv,
        connected(srv, "aria") as a,
    ):
        seen: list[str] = []
        off = a.on(ActionResult, lambda e: seen.append(e.action_id))
        await a.send_action("skill_check", action_id="cb-1")
        await wait_until(lambda: seen == ["cb-1"])
        off()
        off()  # twice: nothing more
        await a.send_action("skill_check", action_id="cb-2")
        await a.send_action("skill_check", action_id="cb-3")
        assert seen == ["cb-1"]
