"""A private Redis Cluster for tests: real ``redis-server`` processes on free loopback ports.

``RedisCluster(masters=3, replicas=0|1)`` starts one process per node with ``--cluster-enabled
yes`` (each with its own client port, its own cluster bus port and its own directory under one
temp dir, no persistence), joins them with ``redis-cli --cluster create … --cluster-yes`` and
returns once every node answers ``cluster_state:ok``, agrees on who serves every slot, and every
replica's link to its master is up. Every wait polls a condition with a deadline, never a blind
sleep.

Faults and topology changes the Redis tier needs:

- ``kill_master(node)``: SIGKILL a master and wait until one of its replicas is promoted and every
  surviving node routes the dead master's slots to it (``cluster-node-timeout`` is short, so this
  takes about 2-3 s);
- ``restart(node)``: start a killed node again on its ports (it rejoins with its ``nodes.conf``;
  a failed-over master comes back as a replica of its successor);
- ``migrate_slot(slot, target)``: the whole resharding of one slot, by hand, as ``redis-cli
  --cluster reshard`` does it (``CLUSTER SETSLOT … IMPORTING`` on the target, ``… MIGRATING`` on
  the source, ``MIGRATE`` of its keys in batches, ``CLUSTER SETSLOT … NODE`` on every master);
  ``begin_migration`` returns the steps one by one (``SlotMigration``), so a test can act while
  some keys of the slot have moved and others not (clients then get ``ASK``).

``close`` kills every process and removes the temp dir.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from redis import Redis

from ps_testkit.redis_server import redis_server_binary
from ps_testkit.servers import free_port

#: Slots of a Redis Cluster.
SLOTS = 16384

#: ``cluster-node-timeout`` of the test clusters (ms): a dead master is failed over in ~2-3 s.
NODE_TIMEOUT_MS = 1000


def redis_cli_binary() -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        raise RuntimeError("redis-cli is not installed (it comes with redis-server / redis-tools)")
    return binary


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; RuntimeError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (OSError, ConnectionError) as exc:  # a node not up yet, or just killed
            last: BaseException | None = exc
        else:
            last = None
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}") from last
        time.sleep(0.02)  # polling a condition, bounded by the deadline


@dataclass
class ClusterNode:
    """One ``redis-server`` of the cluster; ``node_id`` is its cluster id (``CLUSTER MYID``)."""

    port: int
    bus_port: int
    dir: Path
    node_id: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self) -> Redis:
        """A plain (non-cluster) connection to this node alone; the caller closes it."""
        return Redis(
            host="127.0.0.1",
            port=self.port,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=2,
        )

    def call(self, *args: str | int) -> object:
        """One command on this node alone (CLUSTER …, INFO, DEBUG …)."""
        with self.client() as client:
            return client.execute_command(*args)

    def info(self, section: str) -> dict[str, object]:
        with self.client() as client:
            return dict(client.info(section))


class RedisCluster:
    """``masters`` masters with ``replicas`` replicas each, on loopback (see the module)."""

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters_wanted = masters
        self.replicas = replicas
        self._dir = Path(tempfile.mkdtemp(prefix="ps-redis-cluster-"))
        ports: list[int] = []
        while len(ports) < 2 * masters * (1 + replicas):
            port = free_port()
            if port not in ports:
                ports.append(port)
        self.nodes = [
            ClusterNode(port=ports[2 * i], bus_port=ports[2 * i + 1], dir=self._dir / f"n{i}")
            for i in range(masters * (1 + replicas))
        ]

    # -- addresses ------------------------------------------------------------------------------
    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every node's (host, port), masters and replicas, in start order."""
        return [node.address for node in self.nodes]

    @property
    def url(self) -> str:
        """A URL naming one live node (a cluster client discovers the others from it)."""
        return next(node.url for node in self.nodes if node.running)

    def live(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.running]

    def masters(self) -> list[ClusterNode]:
        """The live masters, as the live nodes' own INFO says."""
        return [n for n in self.live() if n.info("replication").get("role") == "master"]

    def by_id(self, node_id: str) -> ClusterNode:
        return next(node for node in self.nodes if node.node_id == node_id)

    def slot_owner(self, slot: int) -> ClusterNode:
        """The master serving ``slot``, as a live node's slot map says."""
        for first, last, port in self.slot_map(self.live()[0]):
            if first <= slot <= last:
                return next(node for node in self.nodes if node.port == port)
        raise RuntimeError(f"slot {slot} is not served")

    def keyslot(self, key: str) -> int:
        result = self.live()[0].call("CLUSTER", "KEYSLOT", key)
        assert isinstance(result, int)
        return result

    @staticmethod
    def slot_map(node: ClusterNode) -> list[tuple[int, int, int]]:
        """``node``'s routing table: (first slot, last slot, master's port), by first slot."""
        return sorted((first, last, port) for first, last, port, _ in RedisCluster._slots(node))

    @staticmethod
    def _slots(node: ClusterNode) -> list[tuple[int, int, int, int]]:
        """(first, last, master's port, replicas serving) per range of ``CLUSTER SLOTS``."""
        raw = node.call("CLUSTER", "SLOTS")  # [[first, last, [host, port, id, …], replicas…]]
        assert isinstance(raw, list)
        return [(int(row[0]), int(row[1]), int(row[2][1]), len(row) - 3) for row in raw]

    # -- start and stop -------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            self._spawn(node)
        for node in self.nodes:
            wait_for(partial(_pong, node), timeout, f"redis-server on port {node.port}")
            node.node_id = str(node.call("CLUSTER", "MYID"))
        create = [
            redis_cli_binary(),
            "--cluster",
            "create",
            *(f"127.0.0.1:{node.port}" for node in self.nodes),
            "--cluster-replicas",
            str(self.replicas),
            "--cluster-yes",
        ]
        done = subprocess.run(create, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]!r}")
        self.wait_stable(timeout)

    def _spawn(self, node: ClusterNode) -> None:
        node.dir.mkdir(parents=True, exist_ok=True)
        node.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(node.port),
                "--cluster-port",
                str(node.bus_port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                "--repl-diskless-sync-delay",  # a replica's first sync starts at once (not 5 s)
                "0",
                "--repl-ping-replica-period",  # so replicas' offsets (gossiped) move when idle
                "1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(node.dir),
                "--logfile",
                str(node.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_stable(self, timeout: float = 30.0) -> None:
        """Every live node: ``cluster_state:ok``, the same owner for every slot (all 16384
        covered), and every replica's link to its master up."""
        live = self.live()

        def stable() -> bool:
            routes = set()
            for node in live:
                if "cluster_state:ok" not in str(node.call("CLUSTER", "INFO")):
                    return False
                routing = tuple(self.slot_map(node))
                if sum(last - first + 1 for first, last, _ in routing) != SLOTS:
                    return False
                routes.add(routing)
                if any(n != self.replicas for *_, n in self._slots(node)):
                    return False  # a replica not yet known (synced) to this node
                repl = node.info("replication")
                if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                    return False
            masters = sum(1 for n in live if n.info("replication").get("role") == "master")
            return len(routes) == 1 and masters == self.masters_wanted

        wait_for(stable, timeout, "the cluster to be stable on every node")

    def stop_node(self, node: ClusterNode) -> None:
        """SIGKILL one node (as abrupt as a crash) and reap it."""
        if node.proc is not None:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(timeout=10)
            node.proc = None

    def close(self) -> None:
        for node in self.nodes:
            self.stop_node(node)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- failover -------------------------------------------------------------------------------
    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        ids = str(master.call("CLUSTER", "NODES"))
        return [
            self.by_id(line.split()[0])
            for line in ids.splitlines()
            if line.split()[3] == master.node_id and "fail" not in line.split()[2]
        ]

    def kill_master(self, master: ClusterNode, timeout: float = 20.0) -> ClusterNode:
        """SIGKILL ``master``; wait until a replica of it serves its slots on every live node
        and the cluster is ``ok`` again. Returns the promoted node."""
        replicas = self.replicas_of(master)
        if not replicas:
            raise RuntimeError(f"master {master.port} has no replica to promote")
        self.stop_node(master)

        def promoted() -> bool:
            return any(r.info("replication").get("role") == "master" for r in replicas)

        wait_for(promoted, timeout, f"a replica of {master.port} to be promoted")
        new = next(r for r in replicas if r.info("replication").get("role") == "master")
        self.wait_stable_without(master, timeout)
        return new

    def wait_stable_without(self, dead: ClusterNode, timeout: float = 20.0) -> None:
        """As ``wait_stable``, with ``dead`` down (so replicas it had need no link up)."""
        live = self.live()

        def stable() -> bool:
            routes = set()
            for node in live:
                text = str(node.call("CLUSTER", "INFO"))
                if "cluster_state:ok" not in text:
                    return False
                routing = tuple(self.slot_map(node))
                if any(port == dead.port for *_, port in routing):
                    return False
                routes.add(routing)
            return len(routes) == 1

        wait_for(stable, timeout, f"every live node to route around {dead.port}")

    def restart(self, node: ClusterNode, timeout: float = 20.0) -> None:
        """Start a stopped node again (same ports, same ``nodes.conf``) and wait until the whole
        cluster is stable with it (a failed-over master rejoins as a replica)."""
        if node.running:
            return
        self._spawn(node)
        wait_for(lambda: _pong(node), timeout, f"redis-server on port {node.port}")
        self.wait_stable(timeout)

    # -- resharding -----------------------------------------------------------------------------
    def begin_migration(self, slot: int, target: ClusterNode) -> SlotMigration:
        """Mark ``slot`` IMPORTING on ``target`` and MIGRATING on its owner (nothing moved)."""
        return SlotMigration(self, slot, self.slot_owner(slot), target)

    def migrate_slot(self, slot: int, target: ClusterNode, batch: int = 100) -> int:
        """Move ``slot`` (and its keys) to ``target``; returns how many keys moved."""
        migration = self.begin_migration(slot, target)
        moved = 0
        while True:
            step = migration.move(batch)
            if not step:
                break
            moved += step
        migration.finish()
        return moved


class SlotMigration:
    """One slot on its way from ``source`` to ``target`` (``RedisCluster.begin_migration``)."""

    def __init__(
        self, cluster: RedisCluster, slot: int, source: ClusterNode, target: ClusterNode
    ) -> None:
        if source is target:
            raise ValueError(f"slot {slot} is already served by {target.port}")
        self.cluster, self.slot, self.source, self.target = cluster, slot, source, target
        target.call("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)

    def keys(self, count: int = 100) -> list[str]:
        """Keys of the slot still on the source."""
        found = self.source.call("CLUSTER", "GETKEYSINSLOT", self.slot, count)
        assert isinstance(found, list)
        return [str(key) for key in found]

    def move(self, count: int = 100, keys: list[str] | None = None) -> int:
        """MIGRATE ``keys`` (else up to ``count`` keys still on the source) to the target;
        returns how many were moved (0: none left)."""
        keys = keys if keys is not None else self.keys(count)
        if keys:
            host, port = self.target.address
            self.source.call("MIGRATE", host, port, "", 0, 5000, "KEYS", *keys)
        return len(keys)

    def finish(self, timeout: float = 20.0) -> None:
        """Hand the slot over: SETSLOT NODE on the target, the source, then every other master
        (as redis-cli does), and wait until every live node routes it to the target."""
        if self.keys(1):
            raise RuntimeError(f"slot {self.slot} still has keys on the source")
        order = [self.target, self.source]
        order += [n for n in self.cluster.masters() if n not in order]
        for node in order:
            node.call("CLUSTER", "SETSLOT", self.slot, "NODE", self.target.node_id)

        def routed() -> bool:
            return all(
                any(
                    first <= self.slot <= last and port == self.target.port
                    for first, last, port in self.cluster.slot_map(node)
                )
                for node in self.cluster.live()
            )

        wait_for(routed, timeout, f"every node to route slot {self.slot} to {self.target.port}")


def _pong(node: ClusterNode) -> bool:
    if not node.running:
        raise RuntimeError(f"redis-server on port {node.port} exited")
    with node.client() as client:
        return bool(client.ping())


def slots_of(cluster: RedisCluster) -> Iterator[tuple[ClusterNode, int, int]]:
    """(owner, first, last) for every slot range, as the first live node's map says."""
    node = cluster.live()[0]
    for first, last, port in cluster.slot_map(node):
        yield next(n for n in cluster.nodes if n.port == port), first, last
