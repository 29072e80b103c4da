"""``engine_http_claim = engine``: the engine host claims each action itself, right before its
engine starts it (docs/engines.md, "An engine host does not start an action past its
deadline"). The node does not claim before its POST; it asks the host to
(``X-Party-Sync-Claim: engine``), and the host's answer says what its claim got
(``X-Party-Sync-Claimed``). So an action whose deliveries wait in a frozen host past its
deadline is refused with ``action_timeout`` at the deadline, and never applied when the host
wakes; and a host that does not claim is found out at its first answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from party_sync.engine import wire
from party_sync.engine.http_host import ApiPublisher, build_host_app
from party_sync.engine.interface import ENGINE_FAILURES, ActionRequest, EngineRejected
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.hosts import make_action, post_event, result_for, serving
from ps_testkit.servers import Running, make_settings, serve_in_process

KEY = "api-key-0123456789abcdef0123456789"


@dataclass
class Freezer:
    """A middleware in front of the engine host: while ``frozen``, every request waits unread,
    as in the socket of a host stopped with SIGSTOP; ``held`` and ``done`` count them."""

    awake: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0
    done: int = 0

    def __post_init__(self) -> None:
        self.awake.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.awake.is_set():
            return await handler(request)
        self.held += 1
        try:
            await self.awake.wait()
            return await handler(request)
        finally:
            self.done += 1


@asynccontextmanager
async def claiming_deployment(
    engine: ScriptedEngine, freezer: Freezer, **settings: Any
) -> AsyncIterator[Running]:
    """party_sync (this test's backend) with ``engine_http_claim = engine``, and
    ``party-sync engine-http``'s app in front of ``engine``, behind ``freezer``."""
    publisher = ApiPublisher("http://127.0.0.1:9", KEY, retries=2, timeout=2.0)
    app = build_host_app(engine, publisher)
    app.middlewares.insert(0, freezer.middleware)
    async with serving(app, shutdown_timeout=5.0) as host:
        config = make_settings(
            engine_url=f"{host}/actions",
            api_key=KEY,
            **{"engine_http_claim": "engine", "engine_http_timeout": 0.3, **settings},
        )
        async with serve_in_process(config) as srv:
            publisher.base_url = srv.base  # (known once it listens)
            yield srv


async def until_result(client: Any, action_id: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            message = await client.until("action.result", 10)
            if message["payload"]["action_id"] == action_id:
                return message  # type: ignore[no-any-return]


@pytest.mark.usefixtures("backend_kind")  # memory and redis
async def test_a_frozen_host_past_the_deadline_times_the_action_out_and_never_applies_it() -> None:
    engine, freezer = ScriptedEngine(), Freezer()
    async with claiming_deployment(engine, freezer, action_timeout=1.5) as srv:
        a, _ = await srv.join("aria")
        await a.act("cl-0", "aria", "r1")
        await until_result(a, "cl-0")  # awake: claimed by the host, applied

        freezer.awake.clear()
        await a.act("cl-1", "aria", "r1")
        error = await a.until("system.error", 10)
        assert error["payload"]["code"] == "action_timeout", error
        assert error["payload"]["in_reply_to"]["action_id"] == "cl-1"
        await wait_until(lambda: freezer.held >= 1)  # its delivery waits in the host
        freezer.awake.set()
        await wait_until(lambda: freezer.done == freezer.held)  # each answered: nothing to run

        await a.act("cl-2", "aria", "r1")
        await until_result(a, "cl-2")
        assert [call.action_id for call in engine.calls] == ["cl-0", "cl-2"]
        assert not any(
            m["type"] == "action.result" and m["payload"]["action_id"] == "cl-1" for m in a.received
        )
        assert [m["payload"]["code"] for m in a.received if m["type"] == "system.error"] == [
            "action_timeout"
        ]
        await a.close()


class SlowRefusingEngine(ScriptedEngine):
    """Refuses its first call one second after it started it (slower than the node's HTTP
    timeout: that delivery's request is cut short before the refusal); any later call never
    ends until ``release`` (the test's end), so only that first refusal can answer the action."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_action(self, action: ActionRequest) -> None:
        self.calls.append(action)
        if len(self.calls) > 1:
            await self.release.wait()
            return
        await asyncio.sleep(1.0)
        self.refused.set()
        raise EngineRejected("not now")


@pytest.mark.usefixtures("backend_kind")
@pytest.mark.parametrize("claim", ["node", "engine"])
async def test_a_refusal_slower_than_the_http_timeout_still_reaches_the_player(claim: str) -> None:
    """The engine refuses after party_sync stopped waiting for the delivery (its HTTP timeout,
    0.3 s here): the 422 went nowhere, and the player waited until the record expired (a
    fault test's take-over, on a loaded machine, where every delivery sent again ran the
    engine again and was cut short again). The host records the refusal through the API when
    its sender is gone. (The deliveries sent again wait here until the engine refused, as in a
    busy host, so that none is there to take the 422.)"""
    engine, freezer = SlowRefusingEngine(), Freezer()
    async with claiming_deployment(engine, freezer, engine_http_claim=claim) as srv:
        a, _ = await srv.join("aria")
        await a.act("slow-no", "aria", "r1")
        await wait_until(lambda: len(engine.calls) == 1)
        freezer.awake.clear()  # the next deliveries wait...
        await engine.refused.wait()
        freezer.awake.set()  # ...until the engine has refused the first
        error = await a.until("system.error", 15)
        assert error["payload"]["code"] == "action_rejected", error
        assert error["payload"]["message"] == "not now"
        engine.release.set()
        await a.close()


class SlowFailingEngine(ScriptedEngine):
    """Raises on every call, half a second after it started it: slower than the node's HTTP
    timeout (0.3 s), so no delivery's request is answered its 500. ``raised`` counts the calls
    that ended so (a delivery the node sent just as the fifth call's refusal was recorded may
    start a sixth call, which raises half a second later)."""

    raised = 0

    async def handle_action(self, action: ActionRequest) -> None:
        self.calls.append(action)
        await asyncio.sleep(0.5)
        self.raised += 1
        raise RuntimeError("the engine broke")


@pytest.mark.usefixtures("backend_kind")
@pytest.mark.parametrize("claim", ["node", "engine"])
async def test_an_engine_failing_slower_than_the_http_timeout_ends_in_engine_error(
    claim: str,
) -> None:
    """The engine fails every time, each time after party_sync stopped waiting for the delivery:
    the link, which never saw a 500, had to assume the engine might still be applying it and
    delivered it again until the action's record expired, while its player heard nothing. The
    host counts its engine's failures of the action and, at the fifth, records
    ``engine_error`` as its final answer (each call raised: not applied)."""
    engine, freezer = SlowFailingEngine(), Freezer()
    async with claiming_deployment(engine, freezer, engine_http_claim=claim) as srv:
        a, _ = await srv.join("aria")
        await a.act("slow-fail", "aria", "r1")
        error = await a.until("system.error", 20)
        assert error["payload"]["code"] == "engine_error", error
        assert error["payload"]["in_reply_to"]["action_id"] == "slow-fail"
        assert engine.raised == ENGINE_FAILURES  # the fifth failure, not a later one
        await wait_until(lambda: len(engine.calls) == engine.raised)  # (no call running)
        engine.calls.clear()
        await a.act("after", "aria", "r1")  # (a new action is run again, and counted anew)
        error = await a.until("system.error", 20)
        assert error["payload"]["in_reply_to"]["action_id"] == "after"
        assert not any(m["type"] == "action.result" for m in a.received)
        await a.close()


@pytest.mark.usefixtures("backend_kind")
async def test_a_host_that_does_not_claim_is_found_out_and_the_node_claims_for_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A host of your own that takes the delivery (2xx) without claiming: the node claims the
    action itself at once (its engine ran it: a deadline must not refuse it), logs one ERROR
    naming the setting, and claims before each delivery from then on (no header asked)."""
    caplog.set_level(logging.ERROR, "party_sync.engine.http_link")
    asked: list[str | None] = []
    running: set[asyncio.Task[None]] = set()
    base: list[str] = []

    async def publish(body: dict[str, Any]) -> None:
        await post_event(base[0], KEY, body["party_id"], result_for(body["envelope"]))

    async def handle(request: web.Request) -> web.Response:
        asked.append(request.headers.get(wire.CLAIM_HEADER))
        body = await request.json()
        if body["envelope"]["type"] == "action.request":
            task = asyncio.get_running_loop().create_task(publish(body))
            running.add(task)
            task.add_done_callback(running.discard)
        return web.json_response({"status": "accepted"}, status=202)

    app = web.Application()
    app.router.add_post("/actions", handle)
    async with serving(app) as host:
        config = make_settings(
            engine_url=f"{host}/actions", api_key=KEY, engine_http_claim="engine"
        )
        async with serve_in_process(config) as srv:
            base.append(srv.base)
            a, _ = await srv.join("aria")
            for action_id in ("own-1", "own-2"):
                await a.act(action_id, "aria", "r1")
                await until_result(a, action_id)
            await a.close()
    assert asked == [wire.CLAIM_BY_ENGINE, None]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "PARTY_SYNC_ENGINE_HTTP_CLAIM" in errors[0].getMessage()


def claim_api(answer: Callable[[], Awaitable[web.Response]], claims: list[Any]) -> web.Application:
    """party_sync's claim route, answering each claim with ``answer()``; the bodies in
    ``claims``."""

    async def claim(request: web.Request) -> web.Response:
        claims.append((request.match_info["action_id"], await request.json()))
        return await answer()

    app = web.Application()
    app.router.add_post("/api/v1/parties/{party_id}/actions/{action_id}/claim", claim)
    return app


@asynccontextmanager
async def host_behind(
    answer: Callable[[], Awaitable[web.Response]],
    claims: list[Any],
    engine: ScriptedEngine,
    *,
    reachable: bool = True,
) -> AsyncIterator[str]:
    """``party-sync engine-http``'s app for ``engine``, publishing to ``claim_api`` (or to a
    port nobody listens on): its base URL."""
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(serving(claim_api(answer, claims)))
        url = api if reachable else "http://127.0.0.1:9"
        app = build_host_app(engine, ApiPublisher(url, KEY, retries=0))
        yield await stack.enter_async_context(serving(app))


async def deliver(base: str, action_id: str, *, ask: bool = True) -> tuple[int, Any, str | None]:
    action = make_action(action_id)
    body = {
        "party_id": "p1",
        "campaign_run_id": "r1",
        "envelope": dict(action.envelope),
        "deadline": 1_900_000_000.5,
    }
    headers = {"Authorization": f"Bearer {KEY}", "X-Delivery-Attempt": "1"}
    if ask:
        headers[wire.CLAIM_HEADER] = wire.CLAIM_BY_ENGINE
        headers[wire.NODE_HEADER] = "node-7"
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base}/actions", data=orjson.dumps(body), headers=headers) as resp,
    ):
        return resp.status, orjson.loads(await resp.read()), resp.headers.get(wire.CLAIMED_HEADER)


@pytest.mark.parametrize(
    ("said", "status", "error", "runs"),
    [
        ("start", 202, None, True),
        ("final", 200, None, False),
        ("expired", 409, "expired", False),
    ],
)
async def test_the_host_claims_when_asked_and_answers_by_its_claim(
    said: str, status: int, error: str | None, runs: bool
) -> None:
    claims: list[Any] = []

    async def answer() -> web.Response:
        return web.json_response({"claim": said})

    engine = ScriptedEngine()
    engine.mode = "silent"  # (nothing to publish: this API has no events route)
    async with host_behind(answer, claims, engine) as base:
        got, body, claimed = await deliver(base, "h-1")
    assert (got, body.get("error"), claimed) == (status, error, said)
    assert [c[0] for c in claims] == ["h-1"]
    # the deadline claimed is party_sync's own, as sent (not this host's reading of it)
    assert claims[0][1]["deadline"] == 1_900_000_000.5
    assert claims[0][1]["envelope"]["payload"]["action_id"] == "h-1"
    assert claims[0][1]["node"] == "node-7"  # the node that sent the delivery
    assert [call.action_id for call in engine.calls] == (["h-1"] if runs else [])


async def test_a_delivery_not_asking_to_claim_is_not_claimed() -> None:
    claims: list[Any] = []

    async def answer() -> web.Response:
        raise AssertionError("no claim expected")

    engine = ScriptedEngine()
    engine.mode = "silent"
    async with host_behind(answer, claims, engine) as base:
        got, _, claimed = await deliver(base, "h-2", ask=False)
    assert (got, claimed, claims) == (202, None, [])
    assert [call.action_id for call in engine.calls] == ["h-2"]


@pytest.mark.parametrize(
    ("api_status", "status", "error"),
    [(None, 503, "backend_unavailable"), (401, 500, "engine_error")],
)
async def test_a_claim_that_cannot_be_made_never_runs_the_engine(
    api_status: int | None, status: int, error: str
) -> None:
    """party_sync unreachable: 503 (retried; nothing started, so the deadline still holds);
    party_sync refusing the host's claim (its key): 500 ``engine_error`` (not applied)."""
    claims: list[Any] = []

    async def answer() -> web.Response:
        return web.json_response({"detail": "no"}, status=api_status or 500)

    engine = ScriptedEngine()
    async with host_behind(answer, claims, engine, reachable=api_status is not None) as base:
        got, body, _ = await deliver(base, "h-3")
    assert (got, body["error"]) == (status, error)
    assert engine.calls == []
