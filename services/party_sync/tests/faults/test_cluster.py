"""Redis Cluster in the fault tier (docs/redis.md, "Redis Cluster").

A private cluster (three masters, a replica each), two ``party-sync serve --redis-cluster`` nodes
naming one node of it, the reference engine behind HTTP (``engine-http``: the actions stream on a
cluster is the partitioning work, not this test's), four players; the master serving the party's
slot is SIGKILLed. party_sync follows the promoted replica by itself (the shard's fence gives the
party a new epoch), every player acts again within ``FAILOVER_BOUND`` of the kill, and the fault
tier's history check holds (every action answered once, applied at most once, nobody told
"failed" about an applied action, one message per ``(epoch, seq)``, every client converged).

The players go on acting through the kill (an earlier version stopped them first: on the HTTP
engine transport an engine's event could open the new epoch unseen and leave it without a scene;
since every process re-states the party whatever event opens the epoch, convergence holds with
them acting: seven runs of seven).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from ps_testkit.fault_players import Player
from ps_testkit.fault_runner import FaultWindow, run_scenario, scenario_directory
from ps_testkit.faults import PARTY, START_LIMIT, Proc, RedisSystem, poll
from ps_testkit.redis_cluster import RedisCluster
from ps_testkit.servers import free_port

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(120)]

#: Seconds from the master's SIGKILL to every player's first action.result on the new master.
FAILOVER_BOUND = 10.0
API_KEY = "api-key-cluster-0123456789abcdef0123"


class ClusterSystem(RedisSystem):
    """Two nodes on a Redis Cluster, the engine behind HTTP (see the module)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.kit = RedisCluster(masters=3, replicas=1)
        self.engine_port = free_port()
        self.engine: Proc | None = None
        self.env["PARTY_SYNC_API_KEY"] = API_KEY

    async def start(self) -> None:
        await asyncio.to_thread(self.kit.start)
        self.engine = self.spawn(
            "engine",
            [
                "engine-http",
                "campaign_engine:create_engine",
                "--port",
                str(self.engine_port),
                "--party-sync-url",
                f"http://127.0.0.1:{self.ports[0]}",
            ],
        )
        engine = self.engine

        async def listening() -> bool:
            if not engine.alive:
                raise AssertionError(f"engine-http exited: {engine.tail()}")
            return "engine campaign_engine:create_engine on" in engine.tail(50)

        await poll(listening, START_LIMIT, "engine-http to listen", 0.1)
        base = f"http://127.0.0.1:{self.engine_port}"
        args = ["--redis-cluster", "--redis-url", self.kit.url]
        args += ["--engine-url", f"{base}/actions", "--engine-notice-url", f"{base}/notices"]
        starting = [self.start_server(f"node{i}", p, *args) for i, p in enumerate(self.ports, 1)]
        self.nodes = list(await asyncio.gather(*starting))

    async def close(self) -> None:
        try:
            for proc in reversed(self.procs()):
                await proc.stop()
            await self.http.close()
        finally:
            await asyncio.to_thread(self.kit.close)


async def test_a_killed_master_party_sync_follows_the_promoted_replica() -> None:
    system = ClusterSystem(scenario_directory("cluster_failover"))

    async def inject(players: Sequence[Player]) -> FaultWindow:
        kit = system.kit
        slot = kit.keyslot(f"party:{PARTY}")
        master = kit.slot_owner(slot)
        killed = time.monotonic()
        promoted = await asyncio.to_thread(kit.kill_master, master)
        took = time.monotonic() - killed
        detail = {"killed": f"master {master.port} (SIGKILL)", "promoted_s": took}
        detail["promoted"] = promoted.port
        return FaultWindow(killed, killed, detail)

    report = await run_scenario("cluster_failover", "the party's master SIGKILLed", system, inject)
    print(report.summary())
    assert report.passed, report.summary()
    assert report.recover_all_s is not None and report.recover_all_s < FAILOVER_BOUND
