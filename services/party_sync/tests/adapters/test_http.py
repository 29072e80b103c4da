"""Health, readiness and metrics share the WebSocket port."""

from __future__ import annotations

import pytest
from party_sync.engine.health import EngineHealth
from party_sync.transport.http import readiness
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import serve_in_process


async def test_health_readiness_and_metrics() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        async with srv.http.get(srv.base + "/healthz") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok"}
        async with srv.http.get(srv.base + "/readyz") as resp:
            assert resp.status == 200
            body = await resp.json()
            assert body["status"] == "ready"
            assert body["backend"] == {"name": "memory", "ok": True}
            assert body["engine"]["transport"] == "inprocess"
            assert body["engine"]["ok"] is True
            assert "ScriptedEngine" in body["engine"]["detail"]
        a, _ = await srv.join("aria")
        await a.send("{bad")
        await a.expect("system.error")
        b, _ = await srv.join("borin")
        await a.expect("party.join")
        async with srv.http.get(srv.base + "/metrics") as resp:
            text = await resp.text()
            # docs/metrics.md: the Prometheus text format 0.0.4
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert "party_sync_connections 2.0" in text
        assert 'party_sync_errors_total{code="bad_json"} 1.0' in text
        assert 'party_sync_messages_out_total{type="system.hello"} 2.0' in text
        # one frame: borin's join, to aria (each one's own join is in its hello, not sent)
        assert 'party_sync_messages_out_total{type="party.join"} 1.0' in text
        await a.close()
        await b.close()


OK_ENGINE = EngineHealth(
    "stream", True, "1 consumer(s) (engine-worker read loops) consume party_sync:actions"
)
NO_WORKER = EngineHealth("stream", False, "no engine worker consumes party_sync:actions")


@pytest.mark.parametrize(
    ("backend_ok", "draining", "engine", "code", "status"),
    [
        (True, False, OK_ENGINE, 200, "ready"),
        (True, False, NO_WORKER, 200, "degraded"),  # the node still serves: stays in rotation
        (False, False, OK_ENGINE, 503, "unavailable"),
        (False, False, NO_WORKER, 503, "unavailable"),
        (True, True, OK_ENGINE, 503, "unavailable"),
    ],
)
def test_readiness_is_503_only_when_the_node_cannot_serve(
    backend_ok: bool, draining: bool, engine: EngineHealth, code: int, status: str
) -> None:
    got, body = readiness("redis", backend_ok, draining, engine)
    assert got == code
    assert body == {
        "status": status,
        "draining": draining,
        "backend": {"name": "redis", "ok": backend_ok},
        "engine": {"transport": "stream", "ok": engine.ok, "detail": engine.detail},
    }


async def test_readyz_is_unavailable_while_draining() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        assert srv.server is not None
        srv.server.gateway.stopping = True
        async with srv.http.get(srv.base + "/readyz") as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body["status"] == "unavailable" and body["draining"] is True
        srv.server.gateway.stopping = False


async def test_every_answer_says_nosniff() -> None:
    """``X-Content-Type-Options: nosniff`` on every HTTP answer, not only the demo's and
    /admin's pages (browser-surfaces probe: the API's JSON and problems had none): the probes,
    /metrics, the descriptions, the API's answers and problems, aiohttp's own 404 and 405, a
    WebSocket handshake refused."""
    async with serve_in_process(engine=ScriptedEngine(), dev_mode=True) as srv:
        asked = [
            ("GET", "/healthz", None),
            ("GET", "/readyz", None),
            ("GET", "/metrics", None),
            ("GET", "/openapi.json", None),
            ("GET", "/asyncapi.json", None),
            ("GET", "/demo", None),
            ("GET", "/nowhere", None),  # aiohttp's 404
            ("GET", "/api/v1/nowhere", None),  # the API's 404 problem
            ("DELETE", "/healthz", None),  # 405
            ("POST", "/api/v1/parties/p1/events", {"junk": True}),  # 401 problem
            ("POST", "/api/v1/dev/token", {"party_id": "p1"}),  # a 4xx problem
            ("POST", "/api/v1/dev/token", {"character_id": "aria"}),
            ("GET", "/ws", None),  # not an upgrade
        ]
        statuses = set()
        for method, path, body in asked:
            async with srv.http.request(method, srv.base + path, json=body) as resp:
                statuses.add(resp.status // 100)
                assert resp.headers.get("X-Content-Type-Options") == "nosniff", (method, path)
        assert statuses >= {2, 4}
