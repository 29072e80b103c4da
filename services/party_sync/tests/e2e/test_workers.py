"""``party-sync serve --workers N`` (the README's "Using every core"): real processes on
loopback, a private redis-server, the reference engine in every worker sharing one SQLite file.

Every wait is on a condition: a log line of the group (its stderr, read as it comes), a message
on a socket, an HTTP answer; never a fixed sleep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from party_sync import config
from prometheus_client.parser import text_string_to_metric_families
from ps_testkit.client import Client, Closed, wait_until
from ps_testkit.cluster import assert_ordered, wait_async
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import SECRET, Running, free_port, party_sync_command, run_serve

pytestmark = pytest.mark.e2e

KEY = "workers-api-key-0123456789abcdef0123"
#: Characters tried, one connection each, until one lands on another worker than the first.
POOL = ["borin", "cora", "dain", "eira", "finn", "gale", "hale", "iris", "jory", "kell"]
POOL += [f"x{i}" for i in range(14)]  # P(all 24 on one of two workers) = 2**-24


@dataclass
class Group:
    """A running ``party-sync serve --workers N`` and what it has logged so far."""

    process: asyncio.subprocess.Process
    port: int
    http: aiohttp.ClientSession
    logs: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def running(self) -> Running:
        return Running(f"http://127.0.0.1:{self.port}", self.http)

    async def read_logs(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").strip()
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                entry = {"msg": line}
            self.logs.append(entry if isinstance(entry, dict) else {"msg": line})
            self.changed.set()
        self.changed.set()

    async def log(self, match: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> Any:
        """The first log entry (from the start) that ``match``es; waits for it."""
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for entry in self.logs[seen:]:
                    if match(entry):
                        return entry
                seen = len(self.logs)
                if self.process.returncode is not None and self.process.stderr is not None:
                    assert not self.process.stderr.at_eof(), f"exited: {self.tail()}"
                self.changed.clear()
                await self.changed.wait()

    def tail(self) -> str:
        return "\n".join(str(e.get("msg")) for e in self.logs[-30:])

    async def node_of(self, character: str, party: str = "p1") -> str:
        """The node id (one worker) of ``character``'s connection, from the admin API."""
        nodes: list[str] = []

        async def known() -> bool:
            url = f"{self.running.base}/api/v1/parties/{party}"
            headers = {"Authorization": f"Bearer {KEY}"}
            async with self.http.get(url, headers=headers) as resp:
                if resp.status != 200:
                    return False
                detail = await resp.json()
            for member in detail["presence"]:
                if member["character_id"] == character and member["nodes"]:
                    nodes[:] = member["nodes"]
            return bool(nodes)

        await wait_async(known)
        assert len(nodes) == 1, nodes
        return nodes[0]

    async def scrape(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        async with self.http.get(self.running.base + "/metrics") as resp:
            assert resp.status == 200
            # as one process's (workers probe: the group's said no format version)
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = await resp.text()
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                samples.setdefault(sample.name, {})[labels] = sample.value
        return samples


def serving(entry: dict[str, Any]) -> bool:
    return "workers" in entry and str(entry.get("msg", "")).startswith("party_sync serving")


def group_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PARTY_SYNC_JWT_SECRET": SECRET,
        "PARTY_SYNC_API_KEY": KEY,
        "PARTY_SYNC_LOG_LEVEL": "INFO",
        "PARTY_SYNC_LOG_FORMAT": "json",
        # One engine per worker (in-process), sharing their runs through one SQLite file.
        "CAMPAIGN_ENGINE_DATABASE_URL": f"sqlite:///{tmp_path / 'engine.sqlite3'}",
        "CAMPAIGN_ENGINE_SEED": "7",
    }


@contextlib.asynccontextmanager
async def workers_group(
    redis: RedisServer,
    tmp_path: Path,
    *args: str,
    workers: str = "2",
    new_session: bool = False,
) -> AsyncIterator[Group]:
    """``new_session``: the group in a process group of its own (a terminal's Ctrl-C)."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *party_sync_command(),
        "serve",
        "--workers",
        workers,
        "--port",
        str(port),
        "--redis-url",
        redis.url,
        "--engine-transport",
        "inprocess",
        "--presence-grace",
        "0.2",
        "--shutdown-timeout",
        "5",
        *args,
        env=group_env(tmp_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=new_session,
    )
    async with aiohttp.ClientSession() as http:
        group = Group(process, port, http)
        reader = asyncio.create_task(group.read_logs())
        try:
            await group.log(serving)
            yield group
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(20):
                        await process.wait()
                except TimeoutError:
                    process.kill()
                    await process.wait()
            await reader


async def spread(group: Group) -> tuple[Client, Client, str, str]:
    """Two members of party p1 on two different workers: (a, b, a's node, b's node)."""
    a, _ = await group.running.join("aria")
    node_a = await group.node_of("aria")
    for character in POOL:
        b, _ = await group.running.join(character)
        node_b = await group.node_of(character)
        if node_b != node_a:
            return a, b, node_a, node_b
        await b.close()
    raise AssertionError("every connection landed on one worker")


def is_dir(path: str) -> bool:
    return os.path.isdir(path)


def pids_by_node(group: Group) -> dict[str, int]:
    return {
        e["node"]: e["pid"]
        for e in group.logs
        if str(e.get("msg", "")).startswith("worker ") and "pid" in e and e.get("node")
    }


async def test_a_party_across_two_workers_plays_the_seed_flow_and_metrics_cover_both(
    redis: RedisServer, tmp_path: Path
) -> None:
    async with workers_group(redis, tmp_path) as group:
        up = await group.log(serving)
        assert up["workers"] == 2 and len(set(up["nodes"])) == 2  # two nodes, one port
        a, b, node_a, node_b = await spread(group)
        assert {node_a, node_b} == set(up["nodes"])
        # One player acts, the other watches, each on its own process: both see the action's
        # result and then the scene it caused, in seq order.
        scene = await b.until("scene.update")
        option = scene["payload"]["options"][0]["id"]
        await a.act("w-1", "aria", "r1", action_type="choice", payload={"option": option})
        for client in (a, b):
            result = await client.until("action.result", timeout=10)
            assert result["payload"]["action_id"] == "w-1"
            assert result["payload"]["outcome"] in {"success", "failure", "partial"}
            after = await client.until("scene.update", timeout=10)
            assert after["seq"] > result["seq"]
            assert_ordered(client)
        # /metrics on either worker reports both, each sample labelled with its worker.
        samples = await group.scrape()
        assert samples["party_sync_workers"][()] == 2
        assert samples["party_sync_worker_up"] == {(("worker", "1"),): 1, (("worker", "2"),): 1}
        nodes = {
            dict(labels)["node"]: dict(labels)["worker"]
            for labels in samples["party_sync_node_info"]
        }
        assert set(nodes) == {node_a, node_b}
        connections = samples["party_sync_connections"]
        assert connections[(("worker", nodes[node_a]),)] >= 1
        assert connections[(("worker", nodes[node_b]),)] >= 1
        messages = samples["party_sync_messages_in_total"]
        acted = {
            dict(k)["worker"]: v for k, v in messages.items() if dict(k)["type"] == "action.request"
        }
        assert acted == {nodes[node_a]: 1}  # the hot path's own counters, per worker
        for name in ("process_cpu_seconds_total", "party_sync_build_info"):
            assert {dict(labels)["worker"] for labels in samples[name]} == {"1", "2"}, name
        async with group.http.get(group.running.base + "/readyz") as resp:
            assert resp.status == 200
        await a.close()
        await b.close()


async def test_a_killed_worker_is_restarted_and_its_players_resume(
    redis: RedisServer, tmp_path: Path
) -> None:
    async with workers_group(redis, tmp_path) as group:
        a, b, node_a, node_b = await spread(group)
        scene = await b.until("scene.update")
        hello_b = next(m for m in b.received if m["type"] == "system.hello")
        epoch = hello_b["payload"]["epoch"]
        last_seq = max(m["seq"] for m in b.received if "seq" in m)
        pid = pids_by_node(group)[node_b]
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Closed):
            await b.closed(timeout=10)
        dead = await group.log(
            lambda e: "restarting it in" in str(e.get("msg")) and e.get("pid") == pid
        )
        assert dead["returncode"] == -signal.SIGKILL and dead["node"] == node_b
        # While it is down its restart count is still reported (the supervisor's: probe, it was
        # absent until the worker came back, already counted).
        down = (("worker", str(dead["worker"])),)
        samples = await group.scrape()
        if samples["party_sync_worker_up"][down] == 0:
            assert set(samples["party_sync_worker_restarts_total"]) == {
                (("worker", "1"),),
                (("worker", "2"),),
            }
        # While b is away, a (on the other worker) acts: b must get it on resuming.
        option = scene["payload"]["options"][0]["id"]
        await a.act("w-2", "aria", "r1", action_type="choice", payload={"option": option})
        result = await a.until("action.result", timeout=10)
        again = await group.log(
            lambda e: str(e.get("msg", "")).startswith(f"worker {dead['worker']} restarted")
        )
        assert again["pid"] != pid and again["node"] not in {node_a, node_b}
        assert again["restarts"] == 1
        character = str(hello_b["payload"]["you"])
        b2 = await group.running.connect(character, epoch=epoch, last_seq=last_seq)
        hello = await b2.expect("system.hello")
        assert hello["payload"]["resumed"] is True
        assert hello["payload"]["resumed_from"] == last_seq
        replayed = await b2.until("action.result", timeout=10)
        assert replayed["seq"] == result["seq"]
        assert_ordered(b2)  # seq continuity from last_seq, no gap, no duplicate
        samples = await group.scrape()
        assert samples["party_sync_worker_up"] == {(("worker", "1"),): 1, (("worker", "2"),): 1}
        restarts = samples["party_sync_worker_restarts_total"]
        assert restarts[(("worker", str(dead["worker"])),)] == 1
        await a.close()
        await b2.close()


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c", "hangup"])
async def test_sigterm_to_the_parent_drains_every_worker(
    redis: RedisServer, tmp_path: Path, stop: str
) -> None:
    """SIGTERM to ``serve``; or Ctrl-C in a terminal: SIGINT to every process of the group;
    or the terminal gone: SIGHUP to every process of the group (it killed the parent at once,
    exit 129, without a line: operator probe)."""
    async with workers_group(redis, tmp_path, new_session=stop != "sigterm") as group:
        group_dir = Path((await group.log(serving))["group_dir"])
        assert await asyncio.to_thread(group_dir.is_dir)
        a, b, _, _ = await spread(group)
        if stop == "sigterm":
            group.process.send_signal(signal.SIGTERM)
        else:
            os.killpg(group.process.pid, signal.SIGINT if stop == "ctrl-c" else signal.SIGHUP)
        for client in (a, b):
            try:
                code = await client.closed(timeout=10)
            except Closed as exc:
                code = exc.code
            assert code == 1001
        async with asyncio.timeout(20):
            code = await group.process.wait()
        await asyncio.sleep(0)  # the last log lines
        assert code == 0, [e for e in group.logs if e.get("level") not in ("info", "debug")]
        drained = [e for e in group.logs if e.get("msg") == "party_sync stopped"]
        assert len(drained) == 3  # each worker, then the parent
        assert not [e for e in group.logs if "restarting" in str(e.get("msg"))]
        assert not await asyncio.to_thread(group_dir.exists)


def children(pid: int) -> set[int]:
    """The processes ``pid`` started and that still run (Linux: /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found |= {int(c) for c in (task / "children").read_text().split()}
    return found


async def test_sigterm_while_a_replacement_worker_starts_is_a_clean_stop(
    redis: RedisServer, tmp_path: Path
) -> None:
    """The stop signal reaches a restarted worker before it can handle it (still importing): it
    never served anyone, so ``serve`` still exits 0 (it exited 1, as for a failed drain)."""
    async with workers_group(redis, tmp_path) as group:
        pids = (await group.log(serving))["pids"]
        os.kill(pids[0], signal.SIGKILL)
        await group.log(lambda e: "restarting it in" in str(e.get("msg")))
        before = set(pids)
        # the replacement's process exists (it takes about a second to import and serve)
        await wait_until(lambda: bool(children(group.process.pid) - before), timeout=10)
        group.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await group.process.wait() == 0
        assert not [e for e in group.logs if "restarted" in str(e.get("msg"))]


async def test_a_worker_that_cannot_drain_is_killed_and_serve_exits_1(
    redis: RedisServer, tmp_path: Path
) -> None:
    """A worker that cannot run (SIGSTOP) when the group stops: killed DRAIN_GRACE (5 s) past
    shutdown_timeout, and the exit code says the drain was not clean."""
    async with workers_group(redis, tmp_path, "--shutdown-timeout", "1") as group:
        pids = (await group.log(serving))["pids"]
        os.kill(pids[1], signal.SIGSTOP)
        started = time.monotonic()
        group.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await group.process.wait() == 1
        assert 5.0 <= time.monotonic() - started < 10.0
        assert [e for e in group.logs if "did not drain" in str(e.get("msg"))]


async def test_a_frozen_worker_is_killed_and_restarted_and_new_connections_are_served(
    redis: RedisServer, tmp_path: Path
) -> None:
    """A stopped worker (SIGSTOP; a loop stuck the same) keeps its share of the port's new
    connections, which would hang: past worker_timeout without a beat it is killed and started
    again, and every new connection is served."""
    async with workers_group(redis, tmp_path, "--worker-timeout", "3") as group:
        pids = (await group.log(serving))["pids"]
        os.kill(pids[1], signal.SIGSTOP)
        stopped = time.monotonic()
        frozen = await group.log(lambda e: "has not run for" in str(e.get("msg")))
        assert frozen["worker"] == 2 and frozen["pid"] == pids[1]
        # worker_timeout after its last beat (at most a beat before the stop), then two beats'
        # time more (the last chance: see the next test)
        assert 3.0 - 1.0 + 2.0 <= time.monotonic() - stopped < 12.0
        again = await group.log(lambda e: str(e.get("msg", "")).startswith("worker 2 restarted"))
        assert again["pid"] != pids[1]
        for n in range(8):  # the port's new connections, spread over both workers, all served
            client, hello = await group.running.join(POOL[n % len(POOL)])
            assert hello["type"] == "system.hello"
            await client.close()


async def test_a_whole_group_stopped_and_resumed_together_keeps_its_workers(
    redis: RedisServer, tmp_path: Path
) -> None:
    """Ctrl-Z then ``fg`` (a paused container the same): the supervisor did not run either, so
    every worker's silence timer ran out at once; the workers beat again within a second of
    running, inside the watch's last chance, and none is killed (review: all were)."""
    args = ("--worker-timeout", "3")
    async with workers_group(redis, tmp_path, *args, new_session=True) as group:
        pids = (await group.log(serving))["pids"]
        os.killpg(group.process.pid, signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            await wait_until(lambda: time.monotonic() - stopped_at >= 5.0, timeout=10)
        finally:
            os.killpg(group.process.pid, signal.SIGCONT)
        resumed = time.monotonic()
        # Watched for the whole last chance (two beats) and more: both workers answer scrapes.
        while time.monotonic() - resumed < 4.0:
            samples = await group.scrape()
            assert samples["party_sync_worker_up"] == {
                (("worker", "1"),): 1,
                (("worker", "2"),): 1,
            }, samples["party_sync_worker_up"]
        assert not [e for e in group.logs if "has not run for" in str(e.get("msg"))]
        assert (await group.log(serving))["pids"] == pids
        client, hello = await group.running.join("borin")
        assert hello["type"] == "system.hello"
        await client.close()


async def test_workers_leave_when_their_supervisor_is_killed(
    redis: RedisServer, tmp_path: Path
) -> None:
    async with workers_group(redis, tmp_path) as group:
        served = await group.log(serving)
        pids, group_dir = served["pids"], str(served["group_dir"])
        assert is_dir(group_dir)
        group.process.kill()
        await group.process.wait()

        def gone(pid: int) -> bool:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                return True
            return "State:\tZ" in status

        await wait_until(lambda: all(gone(pid) for pid in pids), timeout=20)
        assert not is_dir(group_dir)  # the last worker out removed it (not the supervisor)


async def test_auto_is_the_number_of_usable_cpus(redis: RedisServer, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    cpus = len(os.sched_getaffinity(0))
    flags = parser.parse_args(["--workers", "auto", "--redis-url", redis.url])
    assert config.load(flags, env={}).workers == cpus
    assert (
        config.load(
            None, env={"PARTY_SYNC_WORKERS": "auto", "PARTY_SYNC_REDIS_URL": redis.url}
        ).workers
        == cpus
    )
    if cpus < 2:
        pytest.skip("one usable CPU: auto is 1, today's single process")
    async with workers_group(redis, tmp_path, workers="auto") as group:
        up = await group.log(serving)
        assert up["workers"] == cpus
        samples = await group.scrape()
        assert samples["party_sync_workers"][()] == cpus


async def test_development_mode_shares_one_secret_across_workers(
    redis: RedisServer, tmp_path: Path
) -> None:
    """No secret configured (``make run`` with Redis): the development secret is made once by
    ``serve``, before the workers start; the links it prints work on every worker."""
    env = {k: v for k, v in group_env(tmp_path).items() if k != "PARTY_SYNC_JWT_SECRET"}
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *party_sync_command(),
        "serve",
        "--port",
        str(port),
        "--demo-tokens",
        env={**env, "PARTY_SYNC_WORKERS": "2", "PARTY_SYNC_REDIS_URL": redis.url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=tmp_path,
    )
    assert process.stdout is not None
    try:
        tokens: list[str] = []
        async with asyncio.timeout(20):
            while True:
                line = (await process.stdout.readline()).decode()
                assert line, "serve exited before printing its URLs"
                if "/demo?token=" in line:
                    tokens.append(line.split("token=")[-1].strip())
                if "Ctrl-C stops" in line:
                    break
        assert len(tokens) == 2  # printed once for the group
        async with aiohttp.ClientSession() as http:
            running = Running(f"http://127.0.0.1:{port}", http)
            # Enough connections to meet both workers (each has the secret, or some would fail).
            for _ in range(8):
                for character, value in zip(("aria", "borin"), tokens, strict=True):
                    client = await running.connect(character, token_value=value)
                    await client.expect("system.hello")
                    await client.close()
            url = f"http://127.0.0.1:{port}/api/v1/dev/token"
            for _ in range(8):
                async with http.post(url, json={"character_id": "cora"}) as resp:
                    assert resp.status == 200  # development routes on every worker
    finally:
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
    assert await asyncio.to_thread((tmp_path / ".party_sync_dev_secret").is_file)


@pytest.mark.parametrize(
    ("args", "env"), [(("--workers", "2"), {}), ((), {"PARTY_SYNC_WORKERS": "3"})]
)
def test_more_than_one_worker_on_the_embedded_backend_is_refused(
    args: tuple[str, ...], env: dict[str, str]
) -> None:
    proc = run_serve(*args, env=env)
    assert proc.returncode == 2
    assert "configuration error" in proc.stderr
    assert "needs the Redis backend" in proc.stderr


def test_workers_with_the_reference_engine_in_process_on_memory_are_refused(
    redis: RedisServer,
) -> None:
    """Ops probe: each worker's in-process engine on ``memory://`` keeps a state of its own, and
    a party's members land on several workers: README says not to, and the group started."""
    proc = run_serve(
        "--workers",
        "2",
        "--redis-url",
        redis.url,
        "--engine-transport",
        "inprocess",
        env={"CAMPAIGN_ENGINE_DATABASE_URL": "memory://"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "configuration error" in proc.stderr
    assert "each worker's engine would keep a state of its own" in proc.stderr


def test_a_worker_that_cannot_start_stops_the_group_with_its_code(redis: RedisServer) -> None:
    proc = run_serve(
        "--workers",
        "2",
        "--redis-url",
        redis.url,
        "--engine-transport",
        "inprocess",
        "--engine",
        "nonexistent_module:thing",
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "configuration error" in line]
    # the first worker starts alone: one error, not one per worker
    assert len(errors) == 1 and "nonexistent_module" in errors[0], proc.stderr


async def test_a_second_group_on_the_port_of_a_running_one_is_refused(
    redis: RedisServer, tmp_path: Path
) -> None:
    """As ``serve`` is refused a port in use: SO_REUSEPORT let a second group listen beside the
    first (workers probe: two groups on one port, each with its own Redis, the clients split
    between them, one party with two seq streams)."""
    async with workers_group(redis, tmp_path) as group:
        proc = await asyncio.to_thread(
            run_serve,
            "--workers",
            "2",
            "--redis-url",
            redis.url,
            "--engine-transport",
            "inprocess",
            port=group.port,
        )
        assert proc.returncode == 1, proc.stderr
        assert f"cannot listen on 127.0.0.1:{group.port}" in proc.stderr
        assert "in use" in proc.stderr
        assert (await group.scrape())["party_sync_workers"][()] == 2.0
