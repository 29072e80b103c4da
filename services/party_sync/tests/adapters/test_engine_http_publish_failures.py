"""``party-sync engine-http``'s host: a failure in the publish step (after the engine applied the
action and while it publishes its events) is never answered ``engine_error`` (which says "not
applied" and, after the fifth, tells the player so) but 503 ``backend_unavailable``: party_sync
retries it, the engine deduplicates by ``action_id`` and publishes again. Only the engine's own
raise is 500 ``engine_error`` (docs/engines.md, "Guarantee").
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from party_sync.engine import wire
from party_sync.engine.http_host import ApiPublisher, build_host_app
from party_sync.engine.interface import ActionRequest, RestateNotice
from ps_testkit.engines import RestatingEngine, ScriptedEngine
from ps_testkit.hosts import make_action, serving

KEY = "api-key-0123456789abcdef0123456789"


def party_sync_api(status: int) -> web.Application:
    """party_sync's events API, answering every publish ``status`` (202: a seq)."""

    async def events(request: web.Request) -> web.Response:
        if status == 202:
            return web.json_response({"seq": 1}, status=202)
        return web.json_response({"detail": f"scripted {status}"}, status=status)

    app = web.Application()
    app.router.add_post("/api/v1/parties/{party_id}/events", events)
    return app


async def deliver(base: str, action_id: str) -> tuple[int, Any]:
    action = make_action(action_id)
    body = {"party_id": "p1", "campaign_run_id": "r1", "envelope": dict(action.envelope)}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/actions",
            data=orjson.dumps(body),
            headers={"Authorization": f"Bearer {KEY}"},
        ) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


async def test_a_publish_the_http_client_cannot_even_make_is_backend_unavailable() -> None:
    """The probe's case: a party_sync URL with user:password@ made aiohttp raise ``ValueError``
    (the API key's Authorization header and the URL's credentials) on every publish, after the
    engine had applied the action: that was answered 500 engine_error, and the player told
    ``engine_error`` ("never applied"), which was false."""
    engine = ScriptedEngine()  # applies, then publishes action.result
    publisher = ApiPublisher("http://127.0.0.1:9", KEY, retries=0)
    publisher._bases = ["http://user:pw@127.0.0.1:9"]  # (the setter now refuses such a URL)
    async with serving(build_host_app(engine, publisher)) as base:
        status, answer = await deliver(base, "applied-1")
    assert len(engine.calls) == 1  # the engine did apply it
    assert (status, answer["error"]) == (503, "backend_unavailable")
    assert "pw" not in str(answer)


async def test_a_publish_party_sync_cannot_take_now_is_backend_unavailable() -> None:
    """party_sync answering 5xx (unreachable behind it) after the engine applied the action:
    503, retried (the engine publishes again), not "not applied"."""
    engine = ScriptedEngine()
    async with serving(party_sync_api(503)) as api:
        app = build_host_app(engine, ApiPublisher(api, KEY, retries=0))
        async with serving(app) as base:
            status, answer = await deliver(base, "applied-2")
    assert len(engine.calls) == 1
    assert (status, answer["error"]) == (503, "backend_unavailable")


@pytest.mark.parametrize("refusal", [401, 409, 422])
async def test_a_publish_refused_the_same_way_every_time_is_the_engines_failure(
    refusal: int,
) -> None:
    """``InvalidEvent`` (a wrong API key: 401; an event refused: 422) or a conflict (409): the
    same answer on every attempt, so retrying for action_record_ttl would only leave the player
    waiting; it is the engine's failure (500 engine_error, told after the fifth), as in the
    in-process and stream transports."""
    engine = ScriptedEngine()
    async with serving(party_sync_api(refusal)) as api:
        app = build_host_app(engine, ApiPublisher(api, KEY, retries=0))
        async with serving(app) as base:
            status, answer = await deliver(base, "applied-2b")
    assert (status, answer["error"]) == (500, "engine_error")


class WrappingEngine(ScriptedEngine):
    """Publishes, and turns a failed publish into an error of its own (``raise ... from``, or
    inside an ``except`` block, or out of a task group)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    async def handle_action(self, action: ActionRequest) -> None:
        if self.how == "group":
            async with asyncio.TaskGroup() as group:
                group.create_task(super().handle_action(action))
            return
        try:
            await super().handle_action(action)
        except Exception as exc:
            if self.how == "from":
                raise RuntimeError("could not tell the party") from exc
            raise RuntimeError("could not tell the party")  # noqa: B904 (the implicit context)


@pytest.mark.parametrize("how", ["from", "context", "group"])
async def test_an_engine_error_that_stems_from_a_failed_publish_is_backend_unavailable(
    how: str,
) -> None:
    engine = WrappingEngine(how)
    async with serving(party_sync_api(503)) as api:
        app = build_host_app(engine, ApiPublisher(api, KEY, retries=0))
        async with serving(app) as base:
            status, answer = await deliver(base, "applied-3")
    assert (status, answer["error"]) == (503, "backend_unavailable")


async def test_the_engines_own_raise_is_still_engine_error() -> None:
    """Not applied, by the engine contract: 500 engine_error, whatever publishes succeeded or
    failed in other deliveries."""
    engine = ScriptedEngine()
    async with serving(party_sync_api(503)) as api:
        app = build_host_app(engine, ApiPublisher(api, KEY, retries=0))
        async with serving(app) as base:
            assert (await deliver(base, "applied-4"))[0] == 503  # a failed publish first
            engine.mode = "crash"  # then the engine itself raises
            status, answer = await deliver(base, "crashed")
    assert (status, answer["error"]) == (500, "engine_error")


async def test_a_publish_that_succeeds_is_202() -> None:
    engine = ScriptedEngine()
    async with serving(party_sync_api(202)) as api:
        app = build_host_app(engine, ApiPublisher(api, KEY, retries=0))
        async with serving(app) as base:
            status, answer = await deliver(base, "applied-5")
    assert (status, answer) == (202, {"status": "accepted"})


@pytest.mark.parametrize(
    "url", ["http://user:pw@127.0.0.1:8080", "http://a:1,http://:secret@b:2", "http://u@h:1"]
)
def test_the_api_publisher_refuses_a_url_with_credentials(url: str) -> None:
    with pytest.raises(ValueError, match="API key") as refused:
        ApiPublisher(url, KEY)
    assert "pw" not in str(refused.value) and "secret" not in str(refused.value)


async def test_a_re_statement_party_sync_cannot_take_now_is_503_and_no_error_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A notice whose handling publishes (a re-statement) while party_sync cannot take events
    (Redis down behind it): 503 ``backend_unavailable``, which the link tries again, and one
    WARNING, not an ERROR with a traceback (HTTP link probe, Redis restarted empty: an outage
    logged as a bug)."""
    caplog.set_level(logging.WARNING, "party_sync.engine.http_host")
    engine = RestatingEngine()
    engine.scene_number = 2  # it has a scene to re-state
    async with serving(party_sync_api(503)) as api:
        publisher = ApiPublisher(api, KEY, retries=0)
        engine.publisher = publisher
        app = build_host_app(engine, publisher)
        async with serving(app) as base:
            notice = RestateNotice("p1", "r1", "ep-1", "0" * 32, at=time.time())
            envelope = wire.restate_envelope(notice)
            body = {"kind": "restate", "party_id": "p1", "campaign_run_id": "r1"}
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{base}/notices",
                    data=orjson.dumps({**body, "envelope": envelope}),
                    headers={"Authorization": f"Bearer {KEY}"},
                ) as resp,
            ):
                status, answer = resp.status, orjson.loads(await resp.read())
    assert (status, answer["error"]) == (503, "backend_unavailable")
    assert len(engine.restates) == 1
    levels = [r.levelno for r in caplog.records if r.name == "party_sync.engine.http_host"]
    assert logging.ERROR not in levels and logging.WARNING in levels
