"""The reference engine, unchanged, behind HTTP: two real processes (party-sync + engine-http)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ps_testkit.engines import HANGING_ENGINE, assert_stopped_in_budget, stop_mid_action
from ps_testkit.servers import free_port, party_sync_command, serve_process

pytestmark = pytest.mark.e2e

KEY = "api-key-0123456789abcdef0123456789"


def reference_engine_http(port: int, party_sync_url: str, stderr: Any) -> subprocess.Popen[bytes]:
    """``party-sync engine-http`` hosting the reference engine (seed 3, in memory) on ``port``,
    publishing to ``party_sync_url``."""
    return subprocess.Popen(
        [
            *party_sync_command(),
            "engine-http",
            "campaign_engine:create_engine",
            "--port",
            str(port),
            "--party-sync-url",
            party_sync_url,
        ],
        env={
            **os.environ,
            "PARTY_SYNC_API_KEY": KEY,
            "CAMPAIGN_ENGINE_SEED": "3",
            "CAMPAIGN_ENGINE_DATABASE_URL": "memory://",
        },
        stdout=subprocess.PIPE,
        stderr=stderr,
    )


async def test_seed_flow_with_the_reference_engine_behind_http() -> None:
    engine_port, ps_port, dead_port = free_port(), free_port(), free_port()
    # two nodes, the first gone: it publishes through the other
    nodes = f"http://127.0.0.1:{dead_port},http://127.0.0.1:{ps_port}"
    engine = reference_engine_http(engine_port, nodes, subprocess.PIPE)
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


@pytest.mark.parametrize("leak", [False, True])
async def test_sigterm_mid_action_ends_engine_http_within_the_budget(
    tmp_path: Path, leak: bool
) -> None:
    """``engine-http`` stopped while its engine is inside an action that never returns: the
    request is cancelled after PARTY_SYNC_SHUTDOWN_TIMEOUT, the engine closed (exit 0); a thread
    of the engine's that never ends cannot hold it past the budget + 2 s (exit 1)."""
    (tmp_path / "ps_hanging_engine.py").write_text(HANGING_ENGINE)
    mark, logged = tmp_path / "started", tmp_path / "engine.log"
    engine_port, ps_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "PS_MARK": str(mark),
        "PARTY_SYNC_API_KEY": KEY,
        "PARTY_SYNC_SHUTDOWN_TIMEOUT": "1",
        **({"LEAK": "1"} if leak else {}),
    }
    argv = ["engine-http", "ps_hanging_engine:create_engine", "--port", str(engine_port)]
    argv += ["--party-sync-url", f"http://127.0.0.1:{ps_port}"]
    with logged.open("wb") as sink:
        engine = subprocess.Popen(
            [*party_sync_command(), *argv], env=env, stdout=subprocess.PIPE, stderr=sink
        )
    try:
        assert engine.stdout is not None
        assert b"on" in await asyncio.to_thread(engine.stdout.readline)
        ps_env = {
            "PARTY_SYNC_API_KEY": KEY,
            "PARTY_SYNC_ENGINE_URL": f"http://127.0.0.1:{engine_port}/actions",
        }
        async with serve_process(["--port", str(ps_port)], env=ps_env, port=ps_port) as srv:
            returncode, took = await stop_mid_action(srv, engine, mark, "h-1")
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait(10)
        if engine.stdout is not None:
            engine.stdout.close()
    log = logged.read_text()
    assert_stopped_in_budget(returncode, took, log, leak)


async def test_a_frozen_engine_host_claims_for_itself_so_its_deadline_holds(tmp_path: Path) -> None:
    """``PARTY_SYNC_ENGINE_HTTP_CLAIM=engine``: the engine host claims each action right before
    its engine starts it. A host frozen (SIGSTOP) past an action's deadline holds every delivery
    of it in its socket; the player gets ``action_timeout`` at the deadline (the node does not
    claim for it), and when the host wakes its claims say the action is answered: the engine
    never applies it (with the node claiming, it was applied late and no timeout came: HTTP
    probe, docs/engines.md). Actions before the freeze and after it are applied as usual."""
    engine_port, ps_port = free_port(), free_port()
    logged = tmp_path / "engine.log"
    with logged.open("wb") as sink:
        engine = reference_engine_http(engine_port, f"http://127.0.0.1:{ps_port}", sink)
    stopped = False
    try:
        assert engine.stdout is not None
        assert b"on" in await asyncio.to_thread(engine.stdout.readline)
        env = {
            "PARTY_SYNC_API_KEY": KEY,
            "PARTY_SYNC_ENGINE_URL": f"http://127.0.0.1:{engine_port}/actions",
            "PARTY_SYNC_ENGINE_NOTICE_URL": f"http://127.0.0.1:{engine_port}/notices",
            "PARTY_SYNC_ENGINE_HTTP_CLAIM": "engine",
            "PARTY_SYNC_ACTION_TIMEOUT": "3",
            "PARTY_SYNC_ENGINE_HTTP_TIMEOUT": "0.5",
        }
        async with serve_process([], env=env, port=ps_port) as srv:
            a, _ = await srv.join("aria")
            b, _ = await srv.join("borin")
            await b.until("scene.update")  # the opening scene: the host is up
            await a.act("fz-0", "aria", "r1")
            assert (await a.until("action.result"))["payload"]["action_id"] == "fz-0"

            engine.send_signal(signal.SIGSTOP)
            stopped = True
            await b.act("fz-1", "borin", "r1")
            error = await b.until("system.error", timeout=15)
            assert error["payload"]["code"] == "action_timeout", error
            assert error["payload"]["in_reply_to"]["action_id"] == "fz-1", error
            engine.send_signal(signal.SIGCONT)
            stopped = False

            # The host woke and took its backlog; borin's skill check was never applied (the
            # engine allows one per scene and character: this one is applied, not refused)
            await b.act("fz-2", "borin", "r1")
            async with asyncio.timeout(20):
                while (await a.until("action.result", 20))["payload"]["action_id"] != "fz-2":
                    pass
            for client in (a, b):
                applied = [
                    m["payload"]["action_id"]
                    for m in client.received
                    if m["type"] == "action.result"
                ]
                assert "fz-1" not in applied, applied
            errors = [m for m in b.received if m["type"] == "system.error"]
            assert len(errors) == 1, errors  # one final answer for fz-1, and only one
            await a.close()
            await b.close()
    finally:
        if stopped:
            engine.send_signal(signal.SIGCONT)
        engine.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(engine.wait, 10)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait(10)
        if engine.stdout is not None:
            engine.stdout.close()
