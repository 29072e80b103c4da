"""A private Redis Sentinel set for tests: a master, a replica and three sentinels, on free
loopback ports, from the ``redis-server`` binary (``--sentinel`` with a generated config).

``start`` returns once every sentinel monitors the master and knows the replica and the two other
sentinels, and the replica's link is up: a failover can happen from then on. Sentinels declare
the master down after ``DOWN_AFTER_MS`` and elect a leader among themselves, so a failover takes
about a second and a half or two after a kill (measured by the tests that use it). Every wait is a
bounded poll of a condition; ``close`` kills everything and removes the temp dir.

No persistence anywhere: what the replica did not receive before the master died is lost, which
is the point of ``isolate_replica`` (the rollback test).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError

from ps_testkit.faults import CLAIM_IDLE, START_LIMIT, WORKER_GROUP, Proc, RedisSystem, poll
from ps_testkit.redis_server import redis_server_binary
from ps_testkit.servers import free_port

MASTER_NAME = "party"
#: Sentinel's down-after-milliseconds and failover-timeout for the set.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (OSError, RedisError):  # not listening yet
            pass
        time.sleep(0.02)  # polling a condition, bounded
    raise RuntimeError(f"timed out waiting for {what}")


class _Proc:
    def __init__(
        self, name: str, argv: list[str], port: int, log: Path, password: str | None = None
    ) -> None:
        self.name, self.argv, self.port, self.log = name, argv, port, log
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)

    def client(self) -> Redis:
        return Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0, password=self.password)


class SentinelSet:
    """A master, a replica of it and three sentinels monitoring it as ``MASTER_NAME``."""

    def __init__(self, *, password: str | None = None) -> None:
        """``password``: the sentinels' own (``requirepass`` in sentinel.conf)."""
        self.password = password
        self._dir = Path(tempfile.mkdtemp(prefix="ps-sentinel-"))
        binary = redis_server_binary()
        self.redis: list[_Proc] = []
        master_port = free_port()
        for index, replica_of in enumerate((None, master_port)):
            port = master_port if replica_of is None else self._free_port()
            work = self._dir / f"redis{index}"
            work.mkdir()
            argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            argv += ["--appendonly", "no", "--dir", str(work), "--logfile", str(work / "log")]
            argv += ["--repl-diskless-sync-delay", "0"]  # the replica syncs at once, not in 5 s
            if replica_of is not None:
                argv += ["--replicaof", "127.0.0.1", str(replica_of)]
            self.redis.append(_Proc(f"redis{index}", argv, port, work / "log"))
        self.sentinels: list[_Proc] = []
        for index in range(3):
            port = self._free_port()
            work = self._dir / f"sentinel{index}"
            work.mkdir()
            conf = work / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {work}\nlogfile {work / 'log'}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
                + (f"requirepass {password}\n" if password else "")
            )
            argv = [binary, str(conf), "--sentinel"]
            self.sentinels.append(_Proc(f"sentinel{index}", argv, port, work / "log", password))

    def _free_port(self) -> int:
        taken = {p.port for p in (*self.redis, *getattr(self, "sentinels", []))}
        while (port := free_port()) in taken:
            pass
        return port

    # -- what the tests read --------------------------------------------------------------------
    @property
    def addresses(self) -> str:
        """``PARTY_SYNC_REDIS_SENTINELS``'s value."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers says."""
        for sentinel in self.sentinels:
            if not sentinel.alive:
                continue
            try:
                with sentinel.client() as r:
                    _, port = r.sentinel_get_master_addr_by_name(MASTER_NAME)
                return int(port)
            except (OSError, RedisError):
                continue
        raise RuntimeError("no sentinel answers")

    def node(self, port: int) -> _Proc:
        return next(p for p in self.redis if p.port == port)

    def master(self) -> _Proc:
        return self.node(self.master_port())

    def replica(self) -> _Proc:
        """The live Redis that is not the master."""
        master = self.master_port()
        return next(p for p in self.redis if p.port != master and p.alive)

    def info(self, proc: _Proc, section: str) -> dict[str, str]:
        with proc.client() as r:
            info = r.info(section)
        return {str(key): str(value) for key, value in info.items()}

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> None:
        for proc in self.redis:
            proc.start()
        replica = self.redis[1]
        _wait(
            lambda: self.info(replica, "replication").get("master_link_status") == "up",
            timeout,
            "the replica's link to the master",
        )
        # Only now: a sentinel's first INFO of the master then lists the replica (else it learns
        # of it at the next INFO, 10 s later).
        for proc in self.sentinels:
            proc.start()
        for sentinel in self.sentinels:
            _wait(partial(self._sees_everything, sentinel), timeout, f"{sentinel.name} ready")

    def _sees_everything(self, sentinel: _Proc) -> bool:
        with sentinel.client() as r:
            state: dict[str, object] = r.sentinel_master(MASTER_NAME)
        return (
            state.get("num-slaves") == 1
            and state.get("num-other-sentinels") == 2
            and not state.get("is_sdown")
        )

    def wait_failover(self, old_port: int, timeout: float = 20.0) -> int:
        """Until every sentinel names another master than ``old_port`` and it says it is the
        master; its port."""

        def moved() -> bool:
            ports = set()
            for sentinel in self.sentinels:
                with sentinel.client() as r:
                    _, port = r.sentinel_get_master_addr_by_name(MASTER_NAME)
                ports.add(int(port))
            if len(ports) != 1 or old_port in ports:
                return False
            return self.info(self.node(ports.pop()), "replication").get("role") == "master"

        _wait(moved, timeout, "the sentinels to promote the replica")
        return self.master_port()

    def close(self) -> None:
        for proc in (*self.sentinels, *self.redis):
            proc.signal(signal.SIGCONT)
            proc.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


class SentinelSystem(RedisSystem):
    """The fault tier's Redis system (two nodes in stream mode, two engine workers) on a
    ``SentinelSet``: every process finds the master through the sentinels (no redis_url)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.sentinel = SentinelSet()
        self.env["PARTY_SYNC_REDIS_SENTINELS"] = self.sentinel.addresses
        self.env["PARTY_SYNC_REDIS_SENTINEL_MASTER"] = MASTER_NAME

    async def start(self) -> None:
        await asyncio.to_thread(self.sentinel.start)
        args = ["--engine-transport", "stream"]
        starting = [self.start_server(f"node{i}", p, *args) for i, p in enumerate(self.ports, 1)]
        self.nodes = list(await asyncio.gather(*starting))
        await asyncio.gather(self.start_worker("worker1"), self.start_worker("worker2"))

    async def start_worker(self, name: str) -> Proc:
        args = ["engine-worker", "campaign_engine:create_engine"]
        args += ["--claim-idle", str(CLAIM_IDLE), "--consumer", name]
        proc = self.spawn(name, args)
        self.workers.append(proc)

        async def consuming() -> bool:
            if not proc.alive:
                raise AssertionError(f"{name} exited: {proc.tail()}")
            started = f"engine worker {name} on" in proc.tail(50)
            return started and WORKER_GROUP in await self.groups()

        await poll(consuming, START_LIMIT, f"{name} to consume the actions stream", 0.1)
        return proc

    def redis_client(self) -> AsyncRedis:
        """A plain client of the current master (for the harness's own reads)."""
        port = self.sentinel.master_port()
        return AsyncRedis(host="127.0.0.1", port=port, socket_timeout=2.0)

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            await asyncio.to_thread(self.sentinel.close)
