"""``party-sync engine-worker`` stopped (SIGTERM) while its engine is inside an action that never
returns: the read loops get ``shutdown_timeout``, then are cancelled (the action stays pending in
the stream for another worker) and the engine is closed; a worker something still holds (a
thread of the engine's that never ends) is ended 2 s later with exit code 1."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from ps_testkit.client import wait_until
from ps_testkit.engines import HANGING_ENGINE
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import make_settings, party_sync_command, serve_in_process
from redis.asyncio import Redis

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.timeout(60)]


@pytest.mark.parametrize("leak", [False, True])
async def test_sigterm_mid_action_ends_the_worker_within_the_budget(
    redis: RedisServer, tmp_path: Path, leak: bool
) -> None:
    (tmp_path / "ps_hanging_engine.py").write_text(HANGING_ENGINE)
    mark = tmp_path / "started"
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "PS_MARK": str(mark),
        "PARTY_SYNC_SHUTDOWN_TIMEOUT": "1",
        "PARTY_SYNC_LOG_LEVEL": "WARNING",
        **({"LEAK": "1"} if leak else {}),
    }
    settings = make_settings(redis_url=redis.url, engine_transport="stream")
    logged, url = tmp_path / "worker.log", ("--redis-url", redis.url)
    with logged.open("wb") as sink:
        worker = subprocess.Popen(
            [*party_sync_command(), "engine-worker", "ps_hanging_engine:create_engine", *url],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        async with serve_in_process(settings) as srv:
            a, _ = await srv.join("aria")
            await a.act("a-1", "aria", "r1")
            await a.expect("action.accepted")
            await wait_until(mark.exists, timeout=20)  # the engine is inside the action
            signalled = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            returncode = await asyncio.to_thread(worker.wait, 20)
            took = time.monotonic() - signalled
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    log = logged.read_text()
    assert "still in an engine call" in log
    if leak:
        assert returncode == 1 and 3.0 <= took < 6.0, (returncode, took)
        assert "did not exit within shutdown_timeout" in log and "engine-db" in log
    else:
        assert returncode == 0 and took < 3.0, (returncode, took, log[-2000:])
    # the cancelled action is still pending in the stream: another worker may claim it
    client = Redis.from_url(redis.url)
    try:
        pending = await client.xpending("party_sync:actions", "campaign-engine")
        assert pending["pending"] >= 1
    finally:
        await client.aclose()
