"""The reference engine, unchanged, behind HTTP: two real processes (party-sync + engine-http)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import pytest
from ps_testkit.servers import free_port, party_sync_command, serve_process

pytestmark = pytest.mark.e2e

KEY = "api-key-0123456789abcdef0123456789"


async def test_seed_flow_with_the_reference_engine_behind_http() -> None:
    engine_port, ps_port = free_port(), free_port()
    engine = subprocess.Popen(
        [
            *party_sync_command(),
            "engine-http",
            "campaign_engine:create_engine",
            "--port",
            str(engine_port),
            "--party-sync-url",
            f"http://127.0.0.1:{ps_port}",
        ],
        env={
            **os.environ,
            "PARTY_SYNC_API_KEY": KEY,
            "CAMPAIGN_ENGINE_SEED": "3",
            "CAMPAIGN_ENGINE_DATABASE_URL": "memory://",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert engine.stdout is not None
        line = await asyncio.to_thread(engine.stdout.readline)
        assert b"engine campaign_engine:create_engine on" in line, line
        env = {
            "PARTY_SYNC_API_KEY": KEY,
            "PARTY_SYNC_ENGINE_URL": f"http://127.0.0.1:{engine_port}/actions",
            "PARTY_SYNC_ENGINE_NOTICE_URL": f"http://127.0.0.1:{engine_port}/notices",
        }
        async with serve_process(["--port", str(ps_port)], env=env, port=ps_port) as srv:
            a, _ = await srv.join("aria")
            b, _ = await srv.join("borin")
            opening = await b.until("scene.update")  # the join notice reached /notices
            option = opening["payload"]["options"][0]["id"]
            await a.act("hx-1", "aria", "r1", action_type="choice", payload={"option": option})
            result = await b.until("action.result")
            assert result["payload"]["action_id"] == "hx-1"
            scene = await b.until("scene.update")
            assert scene["seq"] > result["seq"]
            assert scene["trace_id"] == result["trace_id"]
            await a.act("hx-2", "aria", "r1", action_type="choice", payload={"option": "nope"})
            err = await a.until("system.error")
            assert err["payload"]["code"] == "action_rejected"  # the engine's 422
            await a.close()
            await b.close()
    finally:
        engine.send_signal(signal.SIGTERM)
        await asyncio.to_thread(engine.wait, 10)
        for stream in (engine.stdout, engine.stderr):
            if stream is not None:
                stream.close()
