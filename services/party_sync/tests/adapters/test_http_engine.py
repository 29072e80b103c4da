"""The HTTP engine transport: party_sync POSTs actions to an engine URL (gateway_api's role)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from party_sync.protocol.schemas import Contracts, SchemaViolation
from ps_testkit.client import wait_until
from ps_testkit.hosts import post_event, result_for, serving
from ps_testkit.servers import make_settings, serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis

KEY = "api-key-0123456789abcdef0123456789"
CONTRACTS = Contracts()


@dataclass
class FakeGatewayApi:
    """Receives actions; fails the first ``fail_first`` deliveries with 503; answers with
    ``status``; for accepted actions posts the result back through party_sync's API."""

    party_sync: str = ""
    fail_first: int = 0
    status: int = 202
    received: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    notices: list[dict[str, Any]] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: Bodies that broke contracts/…/engine/http.action.json or http.notice.json (none may).
    violations: list[str] = field(default_factory=list)

    def conforms(self, schema: str, body: dict[str, Any]) -> None:
        try:
            CONTRACTS.validate_engine(schema, body)
        except SchemaViolation as exc:
            self.violations.append(f"{schema}: {exc}: {body}")

    async def handle(self, request: web.Request) -> web.Response:
        # every delivery carries the server API key (an engine host checks it: docs/engines.md)
        assert request.headers.get("Authorization") == f"Bearer {KEY}"
        body = await request.json()
        self.received.append((dict(request.headers), body))
        self.conforms("http.action", body)
        envelope = body["envelope"]
        if envelope["type"] != "action.request":
            return web.json_response({}, status=202)
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.json_response({"error": "busy"}, status=503)
        if self.status >= 400:
            return web.json_response({"detail": "no such option here"}, status=self.status)
        action_id = envelope["payload"]["action_id"]
        if action_id not in self.applied:  # the engine side deduplicates by action_id
            self.applied.append(action_id)
            task = asyncio.get_running_loop().create_task(self.answer(body))
            self.tasks.add(task)
        return web.json_response({"status": "accepted"}, status=202)

    async def notice(self, request: web.Request) -> web.Response:
        assert request.headers.get("Authorization") == f"Bearer {KEY}"
        self.notices.append(await request.json())
        self.conforms("http.notice", self.notices[-1])
        return web.json_response({}, status=202)

    async def answer(self, body: dict[str, Any]) -> None:
        result = result_for(body["envelope"], "partial")
        await post_event(self.party_sync, KEY, body["party_id"], result)


@contextlib.asynccontextmanager
async def gateway_api(fake: FakeGatewayApi) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/actions", fake.handle)
    app.router.add_post("/notices", fake.notice)
    async with serving(app, shutdown_timeout=60.0) as base:
        try:
            yield f"{base}/actions"
        finally:
            await asyncio.gather(*fake.tasks, return_exceptions=True)
    assert fake.violations == []  # what the engine received is what its schemas say


async def test_action_reaches_the_engine_with_its_trace_and_the_result_comes_back() -> None:
    fake = FakeGatewayApi()
    async with gateway_api(fake) as url:
        settings = make_settings(api_key=KEY, engine_url=url)
        async with serve_in_process(settings) as srv:
            fake.party_sync = srv.base
            a, _ = await srv.join("aria")
            b, _ = await srv.join("borin")
            await a.act("h1", "aria", "r1", trace_id="trace-http-1")
            result = await b.until("action.result")
            assert result["payload"]["action_id"] == "h1"
            assert result["trace_id"] == "trace-http-1"
            headers, body = next(
                r for r in fake.received if r[1]["envelope"]["type"] == "action.request"
            )
            assert headers["X-Trace-Id"] == "trace-http-1"
            assert headers["Idempotency-Key"] == "h1"
            assert body["party_id"] == "p1"
            assert body["envelope"]["payload"]["action_id"] == "h1"
            assert body["envelope"]["trace_id"] == "trace-http-1"
            await a.close()
            await b.close()


async def test_5xx_is_retried_and_the_action_is_applied_once() -> None:
    fake = FakeGatewayApi(fail_first=2)
    async with gateway_api(fake) as url:
        settings = make_settings(api_key=KEY, engine_url=url, engine_http_retries=5)
        async with serve_in_process(settings) as srv:
            fake.party_sync = srv.base
            a, _ = await srv.join("aria")
            await a.act("r1-act", "aria", "r1")
            result = await a.until("action.result")
            assert result["payload"]["action_id"] == "r1-act"
            deliveries = [r for r in fake.received if r[1]["envelope"]["type"] == "action.request"]
            assert len(deliveries) == 3
            assert fake.applied == ["r1-act"]
            await a.close()


async def test_4xx_is_final_and_reported_to_the_player() -> None:
    fake = FakeGatewayApi(status=409)
    async with (
        gateway_api(fake) as url,
        serve_in_process(make_settings(api_key=KEY, engine_url=url)) as srv,
    ):
        fake.party_sync = srv.base
        a, _ = await srv.join("aria")
        await a.act("nope", "aria", "r1")
        err = await a.until("system.error")
        assert err["payload"]["code"] == "action_rejected"
        assert err["payload"]["message"] == "no such option here"
        deliveries = [r for r in fake.received if r[1]["envelope"]["type"] == "action.request"]
        assert len(deliveries) == 1
        await a.close()


async def test_an_unreachable_engine_ends_in_a_retryable_error() -> None:
    from ps_testkit.servers import free_port

    url = f"http://127.0.0.1:{free_port()}/actions"  # nothing listens there
    settings = make_settings(api_key=KEY, engine_url=url, engine_http_retries=2)
    async with serve_in_process(settings) as srv:
        a, _ = await srv.join("aria")
        await a.act("lost", "aria", "r1")
        err = await a.until("system.error")
        assert err["payload"]["code"] == "engine_unavailable"
        assert err["payload"]["retryable"] is True
        await a.act("lost", "aria", "r1")  # freed: the retry is delivered again
        err = await a.until("system.error")
        assert err["payload"]["code"] == "engine_unavailable"
        await a.close()


async def test_join_notices_go_to_the_notice_url_and_never_to_the_action_url() -> None:
    fake = FakeGatewayApi()
    async with gateway_api(fake) as url:
        notice_url = url.removesuffix("/actions") + "/notices"
        settings = make_settings(api_key=KEY, engine_url=url, engine_notice_url=notice_url)
        async with serve_in_process(settings) as srv:
            fake.party_sync = srv.base
            a, _ = await srv.join("aria")
            await a.act("n1", "aria", "r1")
            await a.until("action.result")
            await wait_until(lambda: any(n["kind"] == "join" for n in fake.notices))
            await a.close()
    assert [body["envelope"]["type"] for _, body in fake.received] == ["action.request"]
    join = next(n for n in fake.notices if n["kind"] == "join")
    assert (join["party_id"], join["campaign_run_id"]) == ("p1", "r1")
    assert join["envelope"]["type"] == "party.join"
    assert join["envelope"]["payload"]["character_id"] == "aria"


async def test_without_a_notice_url_nothing_but_actions_is_posted() -> None:
    fake = FakeGatewayApi()
    async with gateway_api(fake) as url:
        settings = make_settings(api_key=KEY, engine_url=url)
        async with serve_in_process(settings) as srv:
            fake.party_sync = srv.base
            a, _ = await srv.join("aria")
            b, _ = await srv.join("borin")
            await a.expect("party.join")
            await a.act("n2", "aria", "r1")
            await a.until("action.result")
            await a.close()
            await b.close()
    assert [body["envelope"]["type"] for _, body in fake.received] == ["action.request"]
    assert fake.notices == []
