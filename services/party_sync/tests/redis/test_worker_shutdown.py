"""``party-sync engine-worker`` stopped (SIGTERM) while its engine is inside an action that never
returns: the read loops get ``shutdown_timeout``, then are cancelled (the action stays pending in
the stream for another worker) and the engine is closed; a worker something still holds (a
thread of the engine's that never ends) is ended 2 s later with exit code 1."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from ps_testkit.engines import HANGING_ENGINE, assert_stopped_in_budget, stop_mid_action
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
            returncode, took = await stop_mid_action(srv, worker, mark, "a-1")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    log = logged.read_text()
    assert "still in an engine call" in log
    assert_stopped_in_budget(returncode, took, log, leak)
    # the cancelled action is still pending in the stream: another worker may claim it
    client = Redis.from_url(redis.url)
    try:
        pending = await client.xpending("party_sync:actions", "campaign-engine")
        assert pending["pending"] >= 1
    finally:
        await client.aclose()
