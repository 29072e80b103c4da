"""Health, readiness and metrics share the WebSocket port."""

from __future__ import annotations

from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import serve_in_process


async def test_health_readiness_and_metrics() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        async with srv.http.get(srv.base + "/healthz") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok"}
        async with srv.http.get(srv.base + "/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["backend"] == "memory"
        a, _ = await srv.join("aria")
        await a.send("{bad")
        await a.expect("system.error")
        async with srv.http.get(srv.base + "/metrics") as resp:
            text = await resp.text()
        assert "party_sync_connections 1.0" in text
        assert 'party_sync_errors_total{code="bad_json"} 1.0' in text
        assert 'party_sync_messages_out_total{type="system.hello"} 1.0' in text
        assert 'party_sync_messages_out_total{type="party.join"} 1.0' in text  # aria saw her join
        await a.close()
