"""The systems under test, and how each one is started.

Every system is a command line (plus environment) per node; the orchestrator fills in ``{python}``,
``{node}`` (the ``node`` binary on PATH), ``{port}`` and ``{redis_url}``. A system with a
``node_package`` gets ``npm ci`` in that directory first, when its ``node_modules`` is missing or
stale (``bench/run.py``). party_sync's command can be replaced from ``bench/run.py``'s own command
line (``--ps-command``, ``--ps-env``), so another build or backend of party_sync plugs in without
editing this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: party_sync as a user runs it: the real CLI, with the benchmark's engine.
PS_COMMAND = "{python} -m party_sync serve --port {port} --engine bench.engine:create_engine"
#: On Redis, the engine still runs in each server process and answers at once (the scenario), so
#: the engine transport is pinned to in-process (``auto`` would pick a Redis stream + worker).
PS_REDIS_ARGS = "--redis-url {redis_url} --engine-transport inprocess"
#: On a Redis Cluster: ``{redis_url}`` names one node, party_sync discovers the others.
PS_CLUSTER_ARGS = f"{PS_REDIS_ARGS} --redis-cluster"
#: Masters of the benchmark's cluster (the smallest ``redis-cli --cluster create`` accepts).
CLUSTER_SHARDS = 3


@dataclass(frozen=True)
class System:
    name: str
    label: str
    kind: str  # party_sync | peer | floor
    protocol: str  # the load generator's protocol
    command: str  # a template, see the module docstring
    nodes: int = 1
    redis: bool = False
    shards: int = 0  # > 0: a private Redis Cluster of that many masters instead of one Redis
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""
    node_package: str = ""  # a Node.js package under the repository root, installed by `npm ci`


def all_systems(ps_command: str = PS_COMMAND, ps_env: dict[str, str] | None = None) -> list[System]:
    # Every load-generator client comes from 127.0.0.1: lift the per-address cap (default 200).
    env = {"PARTY_SYNC_MAX_CONNECTIONS_PER_IP": "0", **(ps_env or {})}
    redis_cmd = f"{ps_command} {PS_REDIS_ARGS}"
    return [
        System(
            "party_sync-memory",
            "party_sync, embedded memory backend, 1 process",
            "party_sync",
            "party_sync",
            ps_command,
            env=env,
            note="the product: JWT, schema validation in and out, idempotency ledger, seq, history",
        ),
        System(
            "party_sync-redis-1",
            "party_sync on Redis, 1 process",
            "party_sync",
            "party_sync",
            redis_cmd,
            redis=True,
            env=env,
        ),
        System(
            "party_sync-redis-1-delay",
            "party_sync on Redis, 1 process, redis_write_delay 1 ms",
            "party_sync",
            "party_sync",
            redis_cmd,
            redis=True,
            env={"PARTY_SYNC_REDIS_WRITE_DELAY": "0.001", **env},
            note="the optional write delay (docs/redis.md): less CPU, more latency",
        ),
        System(
            "party_sync-redis-2",
            "party_sync on Redis, 2 processes (members of a party split across them)",
            "party_sync",
            "party_sync",
            redis_cmd,
            nodes=2,
            redis=True,
            env=env,
        ),
        System(
            "party_sync-redis-cluster",
            f"party_sync on a Redis Cluster of {CLUSTER_SHARDS} masters, 1 process",
            "party_sync",
            "party_sync",
            f"{ps_command} {PS_CLUSTER_ARGS}",
            redis=True,
            shards=CLUSTER_SHARDS,
            env=env,
            note="every shard's redis-server pinned with the node, CPU reported per shard",
        ),
        System(
            "socketio-redis",
            "python-socketio + AsyncRedisManager on uvicorn (peer, 1 process)",
            "peer",
            "socketio",
            "{python} -m bench.peers.socketio_server --port {port} --redis-url {redis_url}",
            redis=True,
            note="baseline in bench/peers/, not the product",
        ),
        System(
            "socketio-node-redis",
            "Socket.IO 4 on Node.js + @socket.io/redis-adapter (peer, 1 process)",
            "peer",
            "socketio",
            "{node} bench/peers/socketio_node/server.js --port {port} --redis-url {redis_url}",
            redis=True,
            note="baseline in bench/peers/socketio_node/, not the product",
            node_package="bench/peers/socketio_node",
        ),
        System(
            "floor-picows",
            "floor: picows (uvloop)",
            "floor",
            "floor",
            "{python} -m bench.peers.floor_picows --port {port} --loop uvloop",
        ),
        System(
            "floor-aiohttp",
            "floor: aiohttp (uvloop)",
            "floor",
            "floor",
            "{python} -m bench.peers.floor_aiohttp --port {port} --loop uvloop",
        ),
        System(
            "floor-aiohttp-asyncio",
            "floor: aiohttp (stock asyncio loop; party_sync runs on uvloop)",
            "floor",
            "floor",
            "{python} -m bench.peers.floor_aiohttp --port {port} --loop asyncio",
        ),
        System(
            "floor-websockets",
            "floor: websockets asyncio API (uvloop)",
            "floor",
            "floor",
            "{python} -m bench.peers.floor_websockets --port {port} --loop uvloop",
        ),
    ]
