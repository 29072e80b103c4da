"""The server API's engine routes with Redis down: 503 ``backend_unavailable`` (problem details,
a fixed detail), never a 500 nor a hang; once Redis is back, the same calls are taken."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from party_sync.problems import UNAVAILABLE
from ps_testkit.api_events import SCENE
from ps_testkit.engines import ScriptedEngine
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import Running, make_settings, serve_in_process

pytestmark = pytest.mark.redis

KEY = "api-key-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def piece(index: int, text: str) -> dict[str, Any]:
    return {"stream_id": "n-1", "index": index, "text": text, "done": False}


async def post(srv: Running, path: str, body: Any) -> tuple[int, str, Any]:
    async with srv.http.post(srv.base + path, json=body, headers=AUTH) as resp:
        return resp.status, resp.content_type, await resp.json(content_type=None)


async def test_with_redis_down_narration_and_events_are_503_then_taken_again(
    redis: RedisServer,
) -> None:
    settings = make_settings(
        api_key=KEY, redis_url=redis.url, engine_transport="inprocess", redis_command_timeout=0.5
    )
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        narration = "/api/v1/parties/p1/narration"
        assert (await post(srv, narration, piece(0, "Before ")))[0] == 202
        redis.stop()
        for path, body in ((narration, piece(1, "during ")), ("/api/v1/parties/p1/events", SCENE)):
            async with asyncio.timeout(10):  # a bounded answer, not a hang
                status, media, problem = await post(srv, path, body)
            assert (status, media) == (503, "application/problem+json"), (path, problem)
            assert (problem["error"], problem["detail"]) == (
                "backend_unavailable",
                UNAVAILABLE,
            )
        redis.start()
        # Redis is back (empty: it kept nothing); the node reconnects in its own time
        async with asyncio.timeout(15):
            while (await post(srv, narration, piece(0, "After ")))[0] == 503:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # (a bounded poll: no event says "reconnected")
        assert (await post(srv, narration, piece(0, "After ")))[0] == 202  # taken: 202 again
        assert (await post(srv, narration, piece(1, "again.")))[0] == 202


async def test_metrics_say_when_the_backend_is_down_and_when_it_is_back(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Security and operator probe: during a Redis outage /metrics showed nothing of it (only
    /readyz did). ``party_sync_backend_ok`` follows what /readyz asks, every few seconds."""
    from party_sync.transport import http

    monkeypatch.setattr(http, "BACKEND_WATCH_EVERY", 0.1)
    settings = make_settings(
        api_key=KEY, redis_url=redis.url, engine_transport="inprocess", redis_command_timeout=0.5
    )

    async def backend_ok(srv: Running) -> str:
        async with srv.http.get(srv.base + "/metrics") as resp:
            text = await resp.text()
        return next(line for line in text.splitlines() if line.startswith("party_sync_backend_ok"))

    async def until(srv: Running, value: str) -> None:
        async with asyncio.timeout(15):
            while (await backend_ok(srv)).split()[-1] != value:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # (a bounded poll of the exposition)

    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        await until(srv, "1.0")
        redis.stop()
        await until(srv, "0.0")
        redis.start()
        await until(srv, "1.0")
