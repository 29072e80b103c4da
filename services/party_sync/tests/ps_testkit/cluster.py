"""Several real ``party-sync serve`` processes sharing one private redis-server (the Redis tier).

Nodes load ``ps_testkit.engines:node_engine`` (so the test can count engine calls across nodes
and hold actions in flight) and run with short presence timings, so a dead node's players leave
within about a second. Helpers check what clients saw: per connection, events in seq order with
no gap (``assert_ordered``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ps_testkit.client import Client, wait_until
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import Running, serve_process

TESTS_DIR = Path(__file__).resolve().parents[1]

#: Presence timings of the nodes: a dead node's players leave within TTL + TTL/3 (the sweep).
PRESENCE_TTL = 1.0
PRESENCE_GRACE = 0.2


@dataclass
class Cluster:
    redis: RedisServer
    engine_dir: Path

    @contextlib.asynccontextmanager
    async def node(self, *args: str) -> AsyncIterator[Running]:
        """One node: ``party-sync serve --redis-url ...`` with the recording test engine."""
        env = {
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p
            ),
            "PS_ENGINE_DIR": str(self.engine_dir),
        }
        argv = [
            "--redis-url",
            self.redis.url,
            "--engine",
            "ps_testkit.engines:node_engine",
            "--engine-transport",
            "inprocess",
            "--presence-ttl",
            str(PRESENCE_TTL),
            "--presence-grace",
            str(PRESENCE_GRACE),
            "--redis-probe-interval",
            "1",
            *args,
        ]
        async with serve_process(argv, env=env) as running:
            await wait_ready(running)
            yield running


async def status(running: Running, path: str) -> int:
    async with running.http.get(running.base + path) as resp:
        return resp.status


async def wait_ready(running: Running, ready: bool = True, timeout: float = 10.0) -> None:
    """Poll ``/readyz`` until it says ``ready`` (bounded)."""
    want = 200 if ready else 503
    statuses: list[int] = []

    async def check() -> bool:
        statuses.append(await status(running, "/readyz"))
        return statuses[-1] == want

    await wait_async(check, timeout)


async def wait_async(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    """``wait_until`` for an async condition."""
    done = False

    async def poll() -> None:
        nonlocal done
        done = bool(await condition())

    async with asyncio.timeout(timeout):
        await poll()
        while not done:
            await asyncio.sleep(0.02)  # polling a condition in another process, bounded
            await poll()


async def metric(running: Running, name: str, **labels: str) -> float:
    """One sample of a node's ``/metrics`` (0 when absent)."""
    async with running.http.get(running.base + "/metrics") as resp:
        body = await resp.text()
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    wanted = f"{name}{{{label_text}}}" if labels else name
    for line in body.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def assert_ordered(client: Client) -> None:
    """Every connection's stream: after each hello, events at exactly +1, no gap, no duplicate.

    (A repeated ``action.request`` gets its original ``action.result``, old seq: allowed.)
    """
    last: int | None = None
    for message in client.received:
        if message["type"] == "system.hello":
            p = message["payload"]
            last = p["resumed_from"] if p["resumed"] else p["seq"]
        elif "seq" in message:
            assert last is not None, "an event before the hello"
            if message["seq"] <= last and message["type"] == "action.result":
                continue
            assert message["seq"] == last + 1, f"after seq {last} came {message}"
            last = message["seq"]


__all__ = ["Cluster", "assert_ordered", "metric", "status", "wait_async", "wait_until"]
