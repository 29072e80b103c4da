"""The fault tier's systems: real processes to break, one fault at a time.

- ``RedisSystem``: a private ``redis-server``, two ``party-sync serve`` nodes on it (engine
  transport ``stream``) and two ``party-sync engine-worker``s hosting the reference engine, which
  share one SQLite database;
- ``HttpSystem``: the same Redis and nodes with the engine behind ``party-sync engine-http``;
- ``EmbeddedSystem``: one ``party-sync serve`` with no Redis and the reference engine in-process,
  on a SQLite database that outlives the process.

Every process logs to a file under the run's directory (never a pipe that could fill and block
it) and is stopped at the end whatever happened (SIGCONT first if it was paused, SIGTERM, then
SIGKILL). The settings are small, so recovery is quick: ``action_timeout`` 2 s, ``presence_ttl``
2 s, ``presence_grace`` 0.5 s, ``redis_probe_interval`` 0.5 s, worker ``--claim-idle`` 1.5 s.

The reference engine plays ``LOOP_CAMPAIGN``: three story scenes in a ring, each offering
``onward`` (to the next) — every action the players send is valid, whatever they have seen, so
any refusal, loss or double application is the system's doing, not the game's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from campaign_engine.store import open_store
from party_sync.backends.keys import ACTIONS_STREAM
from party_sync.engine.partitions import stream_names
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from ps_testkit.client import Client
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import SECRET, free_port, party_sync_command, token

ACTION_TIMEOUT = 2.0
PRESENCE_TTL = 2.0
PRESENCE_GRACE = 0.5
PROBE_INTERVAL = 0.5
CLAIM_IDLE = 1.5
WORKER_GROUP = "campaign-engine"  # the engine-worker's default consumer group
#: How long a process may take to be ready (generous: the machine may be busy with other tests).
START_LIMIT = 30.0

PARTY = "fault-party"
RUN = "fault-run"


def _scene(scene_id: str, number: int, after: str) -> dict[str, Any]:
    options: list[dict[str, str]] = [{"id": "onward", "label": "Go on", "next": after}]
    if scene_id == "gate":
        options.append({"id": "rest", "label": "Rest for good", "next": "rest"})
    return {
        "id": scene_id,
        "number": number,
        "title": scene_id.capitalize(),
        "kind": "story",
        "narration": f"The road passes the {scene_id}.",
        "options": options,
    }


#: The fault tier's campaign (``CAMPAIGN_ENGINE_CAMPAIGN``): gate → mill → ford → gate → ...; an
#: ending (never chosen) only because a campaign must be able to end.
LOOP_CAMPAIGN: dict[str, Any] = {
    "id": "fault-loop",
    "title": "The Endless Road",
    "start": "gate",
    "scenes": [
        _scene("gate", 1, "mill"),
        _scene("mill", 2, "ford"),
        _scene("ford", 3, "gate"),
        {
            "id": "rest",
            "number": 4,
            "title": "Rest",
            "kind": "ending",
            "narration": "The road ends here.",
        },
    ],
}


class Proc:
    """One process of ours, logging to ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.log_path = log
        self._log = log.open("ab")
        self.popen = subprocess.Popen(list(argv), env=dict(env), stdout=self._log, stderr=self._log)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            self.popen.send_signal(sig)

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; idempotent."""
        if self.alive:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.popen.wait, timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        await asyncio.to_thread(self.popen.wait, 10)
        self._log.close()

    async def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.alive:
            self.popen.kill()
        await asyncio.to_thread(self.popen.wait, 10)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _env(extra: Mapping[str, str]) -> dict[str, str]:
    """Our environment minus the caller's PARTY_SYNC_* and CAMPAIGN_ENGINE_*, plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PARTY_SYNC_", "CAMPAIGN_ENGINE_"))
    }
    env.update(extra)
    return env


async def poll(condition: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    """Wait until ``await condition()``; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if await condition():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)  # polling a condition in another process, bounded


async def http_status(http: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return None


class System(Protocol):
    """What a scenario needs of the system under test."""

    directory: Path
    database_url: str

    @property
    def urls(self) -> list[str]:
        """The WebSocket URL of every node serving, the preferred one first."""
        ...

    def procs(self) -> list[Proc]: ...


class Base:
    """Shared by both systems: the run's directory, database, environment and processes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.database_url = f"sqlite:///{directory / 'engine.sqlite3'}"
        campaign = directory / "campaign.json"
        campaign.write_text(json.dumps(LOOP_CAMPAIGN))
        self.env = _env(
            {
                "PARTY_SYNC_JWT_SECRET": SECRET,
                "PARTY_SYNC_LOG_LEVEL": os.environ.get("PS_FAULTS_LOG_LEVEL", "WARNING"),
                "PARTY_SYNC_LOG_FORMAT": "text",
                "PARTY_SYNC_ACTION_TIMEOUT": str(ACTION_TIMEOUT),
                "PARTY_SYNC_PRESENCE_TTL": str(PRESENCE_TTL),
                "PARTY_SYNC_PRESENCE_GRACE": str(PRESENCE_GRACE),
                "PARTY_SYNC_REDIS_PROBE_INTERVAL": str(PROBE_INTERVAL),
                "PARTY_SYNC_SHUTDOWN_TIMEOUT": "1",
                "CAMPAIGN_ENGINE_DATABASE_URL": self.database_url,
                "CAMPAIGN_ENGINE_CAMPAIGN": str(campaign),
                "CAMPAIGN_ENGINE_SEED": "11",
            }
        )
        self.http = aiohttp.ClientSession()
        self._procs: list[Proc] = []
        self._starts: dict[str, int] = {}

    def procs(self) -> list[Proc]:
        return list(self._procs)

    def spawn(self, name: str, args: Sequence[str]) -> Proc:
        n = self._starts[name] = self._starts.get(name, 0) + 1
        log = self.directory / (f"{name}.log" if n == 1 else f"{name}.{n}.log")
        proc = Proc(name, [*party_sync_command(), *args], self.env, log)
        self._procs.append(proc)
        return proc

    async def start_server(self, name: str, port: int, *args: str) -> Proc:
        """``party-sync serve`` on ``port``, once ``/readyz`` says 200."""
        proc = self.spawn(name, ["serve", "--port", str(port), *args])
        base = f"http://127.0.0.1:{port}"

        async def ready() -> bool:
            if not proc.alive:
                raise AssertionError(f"{name} exited: {proc.tail()}")
            return await http_status(self.http, base + "/readyz") == 200

        try:
            await poll(ready, START_LIMIT, f"{name} to be ready")
        except AssertionError as exc:
            status = await http_status(self.http, base + "/readyz")
            raise AssertionError(f"{exc} (/readyz: {status}); its log:\n{proc.tail()}") from None
        return proc

    async def fresh_hello(self, url: str, character: str) -> dict[str, Any]:
        """A new connection's ``system.hello`` (as ``character``'s extra tab), then closed."""
        ws = await self.http.ws_connect(
            url, params={"token": token(character, party=PARTY, run=RUN)}
        )
        client = Client(ws)
        try:
            hello = await client.expect("system.hello", timeout=5)
        finally:
            await client.close()
        return dict(hello["payload"])

    async def chronicle(self) -> list[str]:
        """The action_id of every decision in the engine's chronicle of the run, in order."""
        store = open_store(self.database_url, create=False)
        await store.open()
        try:
            return [d.action_id for d in await store.decisions(RUN)]
        finally:
            await store.close()

    async def close(self) -> None:
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                await proc.stop()
        await self.http.close()


class RedisSystem(Base):
    """A private redis-server, two nodes (stream transport) and two engine workers; with
    ``partitions`` > 1 the actions stream is partitioned (``PARTY_SYNC_ACTIONS_STREAM_PARTITIONS``
    for the nodes and the workers alike)."""

    def __init__(self, directory: Path, *, partitions: int = 1) -> None:
        super().__init__(directory)
        self.streams = stream_names(ACTIONS_STREAM, partitions)
        if partitions > 1:
            self.env["PARTY_SYNC_ACTIONS_STREAM_PARTITIONS"] = str(partitions)
        self.redis = RedisServer()
        self.ports = [free_port()]
        while len(self.ports) < 2:  # two distinct ports, even if the kernel hands one out twice
            if (port := free_port()) not in self.ports:
                self.ports.append(port)
        self.nodes: list[Proc] = []
        self.workers: list[Proc] = []

    @property
    def urls(self) -> list[str]:
        return [
            f"ws://127.0.0.1:{p}/ws"
            for p, n in zip(self.ports, self.nodes, strict=False)
            if n.alive
        ]

    async def start(self) -> None:
        await asyncio.to_thread(self.redis.start)
        args = ["--redis-url", self.redis.url, "--engine-transport", "stream"]
        starting = [self.start_server(f"node{i}", p, *args) for i, p in enumerate(self.ports, 1)]
        self.nodes = list(await asyncio.gather(*starting))
        await asyncio.gather(self.start_worker("worker1"), self.start_worker("worker2"))

    async def start_worker(self, name: str) -> Proc:
        args = ["engine-worker", "campaign_engine:create_engine", "--redis-url", self.redis.url]
        args += ["--claim-idle", str(CLAIM_IDLE), "--consumer", name]
        proc = self.spawn(name, args)
        self.workers.append(proc)

        async def consuming() -> bool:
            # Its start-up line, then the group (created from the stream's first entry, so
            # nothing appended since is missed). A consumer shows in XINFO only once it has read.
            if not proc.alive:
                raise AssertionError(f"{name} exited: {proc.tail()}")
            started = f"engine worker {name} on" in proc.tail(50)
            return started and WORKER_GROUP in await self.groups()

        try:
            await poll(consuming, START_LIMIT, f"{name} to consume the actions stream", 0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log:\n{proc.tail()}") from None
        return proc

    def redis_client(self) -> Redis:
        return Redis.from_url(self.redis.url, socket_timeout=2.0, socket_connect_timeout=2.0)

    async def groups(self) -> list[str]:
        """The consumer groups on every partition of the actions stream ([] if one has no
        stream yet)."""
        found: set[str] | None = None
        async with self.redis_client() as r:
            for stream in self.streams:
                try:
                    rows: Any = await r.xinfo_groups(stream)
                except ResponseError:  # no such key
                    return []
                names = {_text(row["name"]) for row in rows}
                found = names if found is None else found & names
        return sorted(found or ())

    async def pending(self, consumer: str) -> int:
        """Entries of the actions stream (all partitions) delivered to ``consumer`` and not
        acknowledged."""
        total = 0
        async with self.redis_client() as r:
            for stream in self.streams:
                summary: Any = await r.xpending(stream, WORKER_GROUP)
                for row in summary.get("consumers") or ():
                    if _text(row["name"]) == consumer:
                        total += int(row["pending"])
        return total

    async def redis_pid(self) -> int:
        async with self.redis_client() as r:
            info: Any = await r.info("server")
        return int(info["process_id"])

    async def kill_pubsub(self) -> int:
        """``CLIENT KILL TYPE pubsub``; how many connections it closed."""
        async with self.redis_client() as r:
            killed: Any = await r.client_kill_filter(_type="pubsub")
        return int(killed)

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            await asyncio.to_thread(self.redis.close)


class HttpSystem(RedisSystem):
    """A private redis-server, two nodes (HTTP transport) and the reference engine behind one
    ``party-sync engine-http``, which publishes its answers through both nodes (either one
    that is alive). The engine host can be frozen, killed and started again."""

    API_KEY = "api-key-faults-http-0123456789abcdef"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.env["PARTY_SYNC_API_KEY"] = self.API_KEY
        self.engine_port = free_port()
        while self.engine_port in self.ports:
            self.engine_port = free_port()
        self.engine: Proc | None = None
        #: The engine ``engine-http`` hosts (``module:factory``)
        self.engine_spec = "campaign_engine:create_engine"

    async def start_engine(self) -> Proc:
        nodes = ",".join(f"http://127.0.0.1:{p}" for p in self.ports)
        args = ["engine-http", self.engine_spec, "--port", str(self.engine_port)]
        engine = self.engine = self.spawn("engine", [*args, "--party-sync-url", nodes])
        base = f"http://127.0.0.1:{self.engine_port}"

        async def listening() -> bool:
            if not engine.alive:
                raise AssertionError(f"engine-http exited: {engine.tail()}")
            return await http_status(self.http, base + "/actions") is not None  # 405: it is up

        await poll(listening, START_LIMIT, "engine-http to listen")
        return engine

    async def start(self) -> None:
        await asyncio.to_thread(self.redis.start)
        await self.start_engine()
        base = f"http://127.0.0.1:{self.engine_port}"
        args = ["--redis-url", self.redis.url, "--engine-transport", "http"]
        args += ["--engine-url", f"{base}/actions", "--engine-notice-url", f"{base}/notices"]
        starting = [self.start_server(f"node{i}", p, *args) for i, p in enumerate(self.ports, 1)]
        self.nodes = list(await asyncio.gather(*starting))


class EmbeddedSystem(Base):
    """One ``party-sync serve`` with the embedded backend and the engine in-process."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.port = free_port()
        self.server: Proc | None = None

    @property
    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{self.port}/ws"]

    async def start(self) -> None:
        self.server = await self.start_server(
            "server", self.port, "--engine", "campaign_engine:create_engine"
        )

    async def restart(self) -> float:
        """Stop the server (SIGTERM, as an operator's Ctrl-C) and start it again on the same
        port and database; the time it was ready again."""
        assert self.server is not None
        await self.server.stop()
        await self.start()
        return time.monotonic()
