#!/usr/bin/env python3
"""``make bench``: party_sync side by side with the peer and the floors, in one run.

    python3 bench/run.py            # full mode: rate sweeps, repeats, memory at 1k/10k, profile
    python3 bench/run.py --quick    # quick mode (a few minutes): one short sweep per system
    python3 bench/run.py --scenarios narration --merge   # the narration scenario alone

Two scenarios: ``actions`` (every system: action.request answered by action.result and
scene.update) and ``narration`` (party_sync on one node only, embedded and Redis: every party
streaming ``narration.delta`` at 30 pieces a second from the engine; the peers have no such
feature).

It first makes ``bench/.venv`` from ``bench/requirements.lock`` (plus party_sync and
campaign_engine, editable, without dependencies) and re-runs itself there; the Node.js peer gets
``npm ci`` in its directory when its ``node_modules`` is missing or stale. Then, per system:
start it (and a private ``redis-server`` on a free port when it needs Redis) pinned to CPU 0,
start the load generator pinned to CPU 1, sweep increasing rates, sample the server's CPU and RSS
(and Redis's CPU and ``INFO memory``), stop everything it started. Full mode writes
``docs/benchmarks.md``, ``docs/bench/results.json`` and ``docs/bench/p99_vs_load.png``; quick mode
writes the same under ``bench/results/``.

Only loopback addresses are used; every loop and wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from queue import Empty, Queue
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
VENV = BENCH / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
LOCK = BENCH / "requirements.lock"
PRODUCT = ("services/party_sync", "services/campaign_engine")
SERVER_CPU = 0
LOADGEN_CPU = 1

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import redis_server_argv  # noqa: E402 - stdlib only, after the path is set


# -- the environment ------------------------------------------------------------------------------
def _env_digest() -> str:
    digest = hashlib.sha256()
    for path in (LOCK, *(ROOT / p / "pyproject.toml" for p in PRODUCT)):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_env() -> None:
    """Create or refresh ``bench/.venv`` from the lock (a stamp file skips an up-to-date one)."""
    stamp = VENV / ".installed"
    wanted = _env_digest()
    if VENV_PYTHON.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return
    print(f"bench: installing the benchmark environment into {VENV.relative_to(ROOT)}", flush=True)
    if not VENV_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV_PYTHON), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(LOCK)], check=True, cwd=ROOT)
    editable = [arg for p in PRODUCT for arg in ("-e", p)]
    subprocess.run([*pip, "--no-deps", *editable], check=True, cwd=ROOT)
    stamp.write_text(wanted + "\n")


def ensure_redis() -> None:
    """The Redis systems need a redis-server binary: install Debian's when root and missing."""
    if shutil.which("redis-server") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    print("bench: installing redis-server (Debian package)", flush=True)
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        try:
            subprocess.run(argv, check=False, timeout=600, capture_output=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"bench: could not install redis-server: {exc}", flush=True)
            return


NODE_MIN_MAJOR = 18


def ensure_node_package(directory: Path, install: bool = True) -> None:
    """``npm ci`` in ``directory`` (a Node.js peer) when its ``node_modules`` is missing or stale.

    Stale = ``package.json``, ``package-lock.json`` or the Node.js major version changed since the
    last install (a stamp file in ``node_modules``, like ``bench/.venv``'s). Raises
    ``RuntimeError`` with what to do when node or npm is missing, too old, or the install fails.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    rel = directory.relative_to(ROOT)
    if node is None or npm is None:
        missing = " and ".join(n for n, p in (("node", node), ("npm", npm)) if p is None)
        raise RuntimeError(
            f"{missing} not found: the Node.js peer in {rel} needs Node.js >= {NODE_MIN_MAJOR} "
            "with npm (e.g. apt-get install nodejs npm), or leave it out with --systems"
        )
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    major = int(version.lstrip("v").split(".")[0]) if version[1:2].isdigit() else 0
    if major < NODE_MIN_MAJOR:
        raise RuntimeError(f"Node.js {version or '?'} is too old for {rel}: {NODE_MIN_MAJOR}+")
    digest = hashlib.sha256(f"node {major}\n".encode())
    for name in ("package.json", "package-lock.json"):
        digest.update((directory / name).read_bytes())
    wanted = digest.hexdigest()
    stamp = directory / "node_modules" / ".bench-installed"
    if stamp.exists() and stamp.read_text().strip() == wanted:
        return
    if not install:
        raise RuntimeError(f"{rel}/node_modules is missing or stale (--no-install: run npm ci)")
    print(f"bench: npm ci in {rel} (Node.js {version})", flush=True)
    try:
        out = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"npm ci in {rel} failed: {exc}") from None
    if out.returncode != 0:
        raise RuntimeError(f"npm ci in {rel} failed: {(out.stderr or out.stdout)[-800:]}")
    stamp.write_text(wanted + "\n")


def in_bench_env() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


# -- processes ------------------------------------------------------------------------------------
def _child_setup(cpu: int | None, nice: int) -> Any:
    def setup() -> None:
        import resource

        if cpu is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {cpu})
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        for limits in ((65536, max(hard, 65536)), (hard, hard)):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
                break
            except (ValueError, OSError):
                continue
        if nice:
            with contextlib.suppress(OSError):
                os.nice(nice)

    return setup


def snapshot_product(workdir: Path) -> dict[str, str]:
    """Freeze party_sync's sources and schemas for this run.

    The working tree may change while a full run takes its hour (others work in it); every
    server of one run must be the same code. Returns the snapshot's path and content hash.
    """
    target = workdir / "snapshot"
    shutil.rmtree(target, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(
        ROOT / "services/party_sync/src/party_sync", target / "party_sync", ignore=ignore
    )
    shutil.copytree(ROOT / "contracts/jsonschema/party_sync", target / "contracts", ignore=ignore)
    digest = hashlib.sha256()
    for path in sorted(target.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(target)).encode())
            digest.update(path.read_bytes())
    # In os.environ, so that every child of this process (whichever module starts it) gets it.
    os.environ["BENCH_SNAPSHOT"] = str(target)
    os.environ["PARTY_SYNC_CONTRACTS_DIR"] = str(target / "contracts")
    return {"path": str(target), "sha256": digest.hexdigest()[:16]}


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [env.get("BENCH_SNAPSHOT", ""), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    env.pop("VIRTUAL_ENV", None)
    env.update(extra or {})
    return env


class Started:
    """A process this run started: stopped (TERM, then KILL) only by its own pid."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        cpu: int | None,
        nice: int,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(env),
            cwd=ROOT,
            preexec_fn=_child_setup(cpu, nice),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: Started, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}: {proc.tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
        except OSError:
            time.sleep(0.05)  # polling for the listener, bounded by ``timeout``
        else:
            return  # polling for the listener, bounded by ``timeout``
    raise RuntimeError(f"{proc.name} did not listen on {port} within {timeout}s")


def wait_healthy(port: int, proc: Started, timeout: float = 30.0) -> None:
    """party_sync: /readyz answers 200 (the backend is up), not just an open port."""
    import urllib.request

    wait_port(port, proc, timeout)
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/readyz"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}: {proc.tail()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.1)  # polling readiness, bounded by ``timeout``
    raise RuntimeError(f"{proc.name} not ready within {timeout}s: {proc.tail()}")


@contextlib.contextmanager
def redis_server(workdir: Path, nice: int) -> Iterator[tuple[str, int]]:
    """A private redis-server on a free loopback port (never the shared one on 6379)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found (apt-get install redis-server)")
    port = free_port()
    proc = Started(
        "redis-server",
        redis_server_argv(binary, port, str(workdir)),
        workdir / f"redis-{port}.log",
        SERVER_CPU,
        nice,
    )
    try:
        wait_port(port, proc, 15)
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        proc.stop()


@contextlib.contextmanager
def redis_cluster(workdir: Path, nice: int, masters: int) -> Iterator[tuple[list[str], list[int]]]:
    """A private Redis Cluster of ``masters`` masters (no replicas) on free loopback ports.

    Each ``redis-server`` runs with ``--cluster-enabled yes`` in its own directory, pinned like a
    single Redis; ``redis-cli --cluster create`` assigns the slots evenly. Yields every node's URL
    and pid (one per shard, in start order). Waits (bounded) until every node says
    ``cluster_state:ok`` and routes all 16384 slots the same way.
    """
    import redis

    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise RuntimeError("redis-server/redis-cli not found (apt-get install redis-server)")
    ports: list[int] = []
    while len(ports) < 2 * masters:  # a client port and a cluster-bus port per node
        port = free_port()
        if port not in ports:
            ports.append(port)
    procs: list[Started] = []
    try:
        for i in range(masters):
            port, bus = ports[2 * i], ports[2 * i + 1]
            node_dir = workdir / f"cluster-{port}"
            shutil.rmtree(node_dir, ignore_errors=True)
            node_dir.mkdir(parents=True)
            argv = [server, "--port", str(port), "--cluster-port", str(bus)]
            argv += ["--bind", "127.0.0.1", "--cluster-enabled", "yes"]
            argv += ["--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no"]
            argv += ["--dir", str(node_dir), "--protected-mode", "yes"]
            procs.append(Started("redis-cluster", argv, node_dir / "redis.log", SERVER_CPU, nice))
            wait_port(port, procs[-1], 15)
        nodes = [f"127.0.0.1:{ports[2 * i]}" for i in range(masters)]
        done = subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-1500:]!r}")
        urls = [f"redis://{node}/0" for node in nodes]
        deadline = time.monotonic() + 30
        while True:
            views = set()
            ok = True
            for url in urls:
                client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
                try:
                    info = client.execute_command("CLUSTER INFO")  # redis-py parses it: a dict
                    ok = ok and info.get("cluster_state") == "ok"
                    slots = client.execute_command("CLUSTER SLOTS")
                    views.add(str(sorted((row[0], row[1], row[2][1]) for row in slots)))
                finally:
                    client.close()
            if ok and len(views) == 1:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the bench's Redis Cluster did not become stable in 30 s")
            time.sleep(0.1)  # polling the cluster's state, bounded by the deadline
        yield urls, [proc.pid for proc in procs]
    finally:
        for proc in procs:
            proc.stop()


# -- sampling -------------------------------------------------------------------------------------
def redis_memory(urls: Sequence[str]) -> dict[str, int] | None:
    """``used_memory`` and ``used_memory_rss`` (``INFO memory``) summed over ``urls``.

    None without Redis, or when a server does not answer (a missing sample, not a failed run).
    """
    if not urls:
        return None
    import redis

    total = {"used_memory": 0, "used_memory_rss": 0}
    for url in urls:
        try:
            client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
            try:
                info = client.info("memory")
            finally:
                client.close()
        except Exception:
            return None
        for key in total:
            total[key] += int(info.get(key, 0))
    return total


def redis_calls(urls: Sequence[str]) -> dict[str, int] | None:
    """Calls per command since Redis started (``INFO commandstats``; ``info`` itself left out),
    summed over ``urls``; None without Redis or when a server does not answer."""
    if not urls:
        return None
    import redis

    total: dict[str, int] = {}
    for url in urls:
        try:
            client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
            try:
                info = client.info("commandstats")
            finally:
                client.close()
        except Exception:
            return None
        for key, value in info.items():
            name = key.removeprefix("cmdstat_")
            if name != "info" and isinstance(value, dict):
                total[name] = total.get(name, 0) + int(value.get("calls", 0))
    return total


class Sampler:
    """CPU and RSS of the server processes, Redis, the load generator, and everything else.

    With ``redis_urls`` (the private redis-servers), also Redis's own memory accounting
    (``INFO memory``), read outside the CPU windows so that it costs the measured Redis nothing.
    """

    def __init__(
        self,
        servers: Sequence[int],
        redis: Sequence[int],
        loadgen: int,
        redis_urls: Sequence[str] = (),
    ) -> None:
        import psutil

        self.psutil = psutil
        self.servers = [psutil.Process(pid) for pid in servers]
        self.redis = [psutil.Process(pid) for pid in redis]
        self.loadgen = psutil.Process(loadgen)
        self.redis_urls = list(redis_urls)

    @staticmethod
    def _cpu(procs: Sequence[Any]) -> float:
        total = 0.0
        for proc in procs:
            with contextlib.suppress(Exception):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def rss(self) -> int:
        total = 0
        for proc in self.servers:
            with contextlib.suppress(Exception):
                total += proc.memory_info().rss
        return total

    def redis_memory(self) -> dict[str, int] | None:
        return redis_memory(self.redis_urls)

    def snapshot(self) -> dict[str, Any]:
        cpus = self.psutil.cpu_times(percpu=True)
        busy = sum(c.user + c.nice + c.system for c in cpus)
        irq = sum(c.irq + c.softirq for c in cpus)
        return {
            "t": time.monotonic(),
            "server": self._cpu(self.servers),
            "redis": self._cpu(self.redis),
            "redis_shards": [self._cpu([proc]) for proc in self.redis],
            "loadgen": self._cpu([self.loadgen]),
            "busy": busy,
            "irq": irq,
            "steal": sum(c.steal for c in cpus),
        }

    @staticmethod
    def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        wall = max(1e-9, b["t"] - a["t"])
        ours = (
            (b["server"] - a["server"]) + (b["redis"] - a["redis"]) + (b["loadgen"] - a["loadgen"])
        )
        return {
            "server_cpu": (b["server"] - a["server"]) / wall,
            "redis_cpu": (b["redis"] - a["redis"]) / wall,
            "foreign_cpu": max(0.0, (b["busy"] - a["busy"]) - ours) / wall,
            "irq_cpu": (b["irq"] - a["irq"]) / wall,
            "steal_cpu": (b["steal"] - a["steal"]) / wall,
            # Per redis-server (a Redis Cluster's shards, in start order); one entry otherwise.
            "redis_cpu_shards": [
                (y - x) / wall for x, y in zip(a["redis_shards"], b["redis_shards"], strict=True)
            ],
        }


# -- the load generator ---------------------------------------------------------------------------
class LoadGenProcess:
    """``bench/loadgen.py`` in its own process on CPU 1, talking by lines."""

    def __init__(self, argv: list[str], nice: int) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            cwd=ROOT,
            preexec_fn=_child_setup(LOADGEN_CPU, nice),
        )
        self.lines: Queue[str | None] = Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr.append(raw.decode(errors="replace"))
            del self.stderr[:-40]

    def next_line(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except Empty:
            return None

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write((text + "\n").encode())
            self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.command("STOP")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# -- one system -----------------------------------------------------------------------------------
EVENTS_PER_MESSAGE = {"party_sync": 2, "socketio": 2, "floor": 1}


@contextlib.contextmanager
def serving(
    system: Any, cfg: argparse.Namespace, workdir: Path, tag: str
) -> Iterator[tuple[list[int], list[Started], list[int], list[str]]]:
    """Start ``system`` (and its private redis-server).

    Yields (ports, servers, redis pids, redis URLs).
    """
    servers: list[Started] = []
    with contextlib.ExitStack() as stack:
        redis_url = ""
        redis_pids: list[int] = []
        redis_urls: list[str] = []
        if system.shards:
            redis_urls, redis_pids = stack.enter_context(
                redis_cluster(workdir, cfg.nice, system.shards)
            )
            redis_url = redis_urls[0]  # the client discovers the other shards from it
        elif system.redis:
            redis_url, redis_pid = stack.enter_context(redis_server(workdir, cfg.nice))
            redis_pids = [redis_pid]
            redis_urls = [redis_url]
        try:
            ports = []
            for node in range(system.nodes):
                port = free_port()
                argv = shlex.split(
                    system.command.format(
                        python=sys.executable,
                        node=shutil.which("node") or "node",
                        port=port,
                        redis_url=redis_url,
                    )
                )
                env = {"PARTY_SYNC_JWT_SECRET": _secret(), **system.env}
                server = Started(
                    f"{system.name}#{node}",
                    argv,
                    workdir / f"{system.name}-{tag}-{node}-{port}.log",
                    SERVER_CPU,
                    cfg.nice,
                    env,
                )
                servers.append(server)
                (wait_healthy if system.kind == "party_sync" else wait_port)(port, server)
                ports.append(port)
            yield ports, servers, redis_pids, redis_urls
        finally:
            for server in servers:
                server.stop()


def run_system(
    system: Any,
    cfg: argparse.Namespace,
    workdir: Path,
    *,
    mode: str,
    parties: int,
    delivered_rates: Sequence[float],
    on_measure: Callable[[list[int]], None] | None = None,
    party_steps: Sequence[int] = (),
) -> dict[str, Any]:
    """Start ``system``, connect ``parties`` × K clients, run the steps (or hold idle), stop.

    ``mode="narration"``: the narration scenario, one step per entry of ``party_steps`` (parties
    narrating; ``parties`` is the most), connected as the sweep goes; Redis's calls per command
    are counted over each measured window.
    """
    import orjson
    import psutil

    result: dict[str, Any] = {"mode": mode, "connections": parties * cfg.k, "parties": parties}
    loadgen: LoadGenProcess | None = None
    with serving(system, cfg, workdir, mode) as (ports, servers, redis_pids, redis_urls):
        try:
            time.sleep(0.5 if cfg.quick else 1.0)
            rss0 = sum(psutil.Process(s.pid).memory_info().rss for s in servers)
            redis0 = redis_memory(redis_urls)
            events = EVENTS_PER_MESSAGE[system.protocol]
            rates_in = [r / (events * cfg.k) for r in delivered_rates]
            argv = [
                sys.executable,
                "-m",
                "bench.loadgen",
                "--protocol",
                system.protocol,
                "--parties",
                str(parties),
                "--k",
                str(cfg.k),
                "--mode",
                mode,
                "--cpu",
                str(LOADGEN_CPU),
                "--warmup",
                str(cfg.warmup),
                "--duration",
                str(cfg.duration),
                "--settle",
                str(cfg.settle),
                "--interactive",
            ]
            narration = mode == "narration"
            if narration:
                argv[argv.index("--mode") + 1] = "load"
                argv += [
                    "--scenario",
                    "narration",
                    "--party-steps",
                    ",".join(str(n) for n in party_steps),
                    "--narration-rate",
                    str(cfg.narration_rate),
                    "--min-pieces",
                    str(cfg.narration_pieces[0]),
                    "--max-pieces",
                    str(cfg.narration_pieces[1]),
                ]
                rates_in = list(map(float, party_steps))
            elif rates_in:
                argv += ["--rates", ",".join(f"{r:.3f}" for r in rates_in)]
            for port in ports:
                argv += ["--url", f"ws://127.0.0.1:{port}"]
            loadgen = LoadGenProcess(argv, cfg.nice)
            sampler = Sampler([s.pid for s in servers], redis_pids, loadgen.proc.pid, redis_urls)
            line = loadgen.next_line(120 + parties * cfg.k / 200)
            if line is None or not line.startswith("READY"):
                raise RuntimeError(
                    f"load generator did not connect: {line} {''.join(loadgen.stderr)[-1500:]}"
                )
            result["ready"] = orjson.loads(line[6:])
            time.sleep(1.0 if cfg.quick else 2.0)  # let the server settle before reading RSS
            rss1 = sampler.rss()
            result["rss_before"] = rss0
            result["rss_idle"] = rss1
            connected = result["ready"].get("connections") or parties * cfg.k
            result["kib_per_idle_connection"] = (rss1 - rss0) / 1024 / max(1, connected)
            if redis_urls:  # Redis's own accounting: before connecting, with everyone joined
                result["redis_memory_before"] = redis0
                result["redis_memory_idle"] = sampler.redis_memory()
            if mode == "idle":
                loadgen.command("STOP")
                loadgen.next_line(30)
                return result
            loadgen.command("GO")
            steps: list[dict[str, Any]] = []
            start_snap: dict[str, Any] | None = None
            window: dict[str, Any] = {}
            failing = retries = 0
            per_step = cfg.warmup + cfg.duration + cfg.settle + 10
            if narration:  # the stop (5 s more) and the step's new parties connecting
                per_step += 5 + 30 + max(party_steps, default=0) * cfg.k / 100
            budget = len(rates_in) * per_step * (1 + cfg.noise_retries) + 60
            calls0: dict[str, int] | None = None
            warm_snap: dict[str, Any] | None = None
            warm_noise: float | None = None
            deadline = time.monotonic() + budget
            while time.monotonic() < deadline:
                line = loadgen.next_line(max(1.0, deadline - time.monotonic()))
                if line is None or line == "DONE":
                    break
                if line.startswith("FAILED"):
                    result.setdefault("loadgen_failed", []).append(line[7:][:800])
                    print(f"  {system.name}: load generator: {line[:400]}", flush=True)
                elif line.startswith("STEP_START"):
                    warm_snap = sampler.snapshot()
                elif line.startswith("MEASURE_START"):
                    calls0 = redis_calls(redis_urls) if narration else None  # before the window
                    start_snap = sampler.snapshot()
                    warm_noise = (
                        sampler.delta(warm_snap, start_snap)["foreign_cpu"]
                        if warm_snap is not None
                        else None
                    )
                    warm_snap = None
                    if on_measure is not None:
                        on_measure([s.pid for s in servers])
                        on_measure = None
                elif line.startswith("MEASURE_END") and start_snap is not None:
                    end_snap = sampler.snapshot()
                    window = sampler.delta(start_snap, end_snap)
                    if warm_noise is not None:  # (narration: other processes during warm-up)
                        window["foreign_cpu_warmup"] = warm_noise
                    window["server_rss"] = sampler.rss()
                    calls1 = redis_calls(redis_urls) if calls0 is not None else None
                    if calls0 is not None and calls1 is not None:  # after the window
                        wall = max(1e-9, end_snap["t"] - start_snap["t"])
                        window["redis_calls_per_s"] = {
                            name: (n - calls0.get(name, 0)) / wall
                            for name, n in calls1.items()
                            if n > calls0.get(name, 0)
                        }
                    memory = sampler.redis_memory()  # after the CPU snapshot: not in the window
                    if memory is not None:
                        window["redis_used_memory"] = memory["used_memory"]
                        window["redis_used_memory_rss"] = memory["used_memory_rss"]
                elif line.startswith("STEP "):
                    step = orjson.loads(line[5:])
                    step.update(window)
                    steps.append(step)
                    _print_step(system.name, step)
                    # A step that failed while other tenants took the CPU is run again.
                    noisy = (
                        max(step.get("foreign_cpu") or 0.0, step.get("foreign_cpu_warmup") or 0.0)
                        > cfg.noise_limit
                    )
                    if noisy and not _passed(step, 10.0) and retries < cfg.noise_retries:
                        step["discarded"] = "noisy: other processes used the CPU"
                        retries += 1
                        loadgen.command("REPEAT")
                        continue
                    retries = 0
                    failing = 0 if _passed(step, 50.0) else failing + 1
                    stop = failing >= cfg.fail_streak or step["disconnects"] > 0
                    loadgen.command("STOP" if stop else "NEXT")
            result["steps"] = steps
            result["ladder"] = list(delivered_rates)
            result["server_alive"] = all(s.alive() for s in servers)
            if not result["server_alive"]:
                result["server_tail"] = "\n".join(s.tail() for s in servers)
            return result
        finally:
            if loadgen is not None:
                loadgen.stop()


def run_resume(system: Any, cfg: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The resume probe (bench/resume.py) against a fresh ``system``."""
    import orjson

    with serving(system, cfg, workdir, "resume") as (ports, _, _, _):
        argv = [
            sys.executable,
            "-m",
            "bench.resume",
            "--url",
            f"http://127.0.0.1:{ports[0]}",
            "--rounds",
            str(cfg.resume_rounds),
            "--cpu",
            str(LOADGEN_CPU),
        ]
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=180,
            env=child_env(),
            cwd=ROOT,
            preexec_fn=_child_setup(LOADGEN_CPU, cfg.nice),
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"resume probe failed: {out.stderr[-800:]}")
        result: dict[str, Any] = orjson.loads(out.stdout.strip().splitlines()[-1])
        result["system"] = system.name
        return result


def run_hotpath(cfg: argparse.Namespace) -> dict[str, Any]:
    """bench/hotpath.py (party_sync in process, no sockets), pinned to the server's core."""
    import orjson

    argv = [
        sys.executable,
        "-m",
        "bench.hotpath",
        "--actions",
        str(cfg.hotpath_actions),
        "--gc-actions",
        str(cfg.gc_actions),
    ]
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
        cwd=ROOT,
        preexec_fn=_child_setup(SERVER_CPU, cfg.nice),
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"hotpath failed: {out.stderr[-800:]}")
    result: dict[str, Any] = orjson.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_narration(
    systems: Sequence[Any], cfg: argparse.Namespace, workdir: Path, meta: dict[str, Any]
) -> dict[str, Any]:
    """The narration scenario on party_sync's one-node systems: ``cfg.repeats`` sweeps each.

    Every party streams ``narration.delta`` (the benchmark engine writing ``cfg.narration_rate``
    pieces a second through ``party_sync.engine.Narration``); the steps are numbers of parties.
    """
    rate, k = cfg.narration_rate, cfg.k
    ladder = cfg.narration_ladder
    out: dict[str, Any] = {
        "meta": {
            "date": meta["date"],
            "mode": meta["mode"],
            "command": meta["command"],
            "party_sync_commit": meta["party_sync_commit"],
            "snapshot": meta["product_snapshot"]["sha256"],
            "machine": meta["machine"],
            "versions": meta["versions"],
            "settings": {
                "k": k,
                "rate": rate,
                "parties_ladder": ladder,
                "pieces_per_stream": list(cfg.narration_pieces),
                "words_per_piece": [3, 8],
                "warmup_s": cfg.warmup,
                "duration_s": cfg.duration,
                "settle_s": cfg.settle,
                "repeats": cfg.repeats,
                "fail_streak": cfg.fail_streak,
                "nice": cfg.nice,
                "ps_env": cfg.ps_env,
            },
        },
        "systems": {},
    }
    for system in systems:
        if system.kind != "party_sync" or system.nodes != 1 or system.shards:
            continue  # the peers have no live narration; one node (embedded, one Redis)
        entry: dict[str, Any] = {
            "label": system.label,
            "kind": system.kind,
            "nodes": system.nodes,
            "redis": system.redis,
            "command": system.command,
            "runs": [],
            "available": True,
            "measured": {
                "date": meta["date"],
                "party_sync_commit": meta["party_sync_commit"],
                "snapshot": meta["product_snapshot"]["sha256"],
            },
        }
        out["systems"][system.name] = entry
        print(f"== narration: {system.name}: {system.label}", flush=True)
        for repeat in range(cfg.repeats):
            try:
                run = run_system(
                    system,
                    cfg,
                    workdir,
                    mode="narration",
                    parties=max(ladder),
                    delivered_rates=[n * rate * k for n in ladder],
                    party_steps=ladder,
                )
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"[:1500]
                entry.setdefault("errors", []).append(reason)
                print(f"  {system.name}: sweep {repeat + 1} failed: {reason[:400]}", flush=True)
                if not entry["runs"] and repeat == 0:
                    break
                continue
            run["repeat"] = repeat
            entry["runs"].append(run)
        if not entry["runs"]:
            entry["available"] = False
            entry["reason"] = (entry.get("errors") or ["no sweep completed"])[-1]
    return out


def merge(results: dict[str, Any], previous: Path, *, actions_ran: bool = True) -> None:
    """Keep what an earlier run measured for the systems (and probes) this run did not do.

    The narration scenario's systems are merged the same way. A run without the action
    scenario (``--scenarios narration``) keeps everything else of the earlier results as it was,
    its meta (machine, versions, command, settings) included: this run's are in the narration
    scenario's own meta.
    """
    from bench.systems import all_systems

    if not previous.exists():
        return
    old = json.loads(previous.read_text())
    if not actions_ran and old.get("meta"):
        # Every other figure is the earlier run's: so are its machine, versions and command (the
        # narration scenario keeps this run's in its own meta).
        results["meta"] = {**old["meta"], "narration_merged": results["meta"]["date"]}
        return_early = True
    else:
        return_early = False
    old_narration = old.get("narration") or {}
    new_narration = results.get("narration")
    if new_narration is None:
        if old_narration:
            results["narration"] = old_narration
    elif old_narration.get("systems"):
        kept = {
            name: entry
            for name, entry in old_narration["systems"].items()
            if name not in new_narration["systems"]
        }
        new_narration["systems"] = {**kept, **new_narration["systems"]}
        if kept:
            new_narration["meta"]["merged_with"] = old_narration.get("meta", {}).get("date")
    if return_early:
        for key in ("systems", "hotpath", "resume", "profiles"):
            results[key] = old.get(key) or results.get(key) or ({} if key != "resume" else [])
        results.pop("profile", None)
        if old.get("profile") and "party_sync-memory" not in results["profiles"]:
            results["profiles"]["party_sync-memory"] = old["profile"]
        return
    combined = {**old.get("systems", {}), **results["systems"]}
    order = [s.name for s in all_systems()]
    results["systems"] = {
        name: combined[name]
        for name in sorted(combined, key=lambda n: order.index(n) if n in order else len(order))
    }
    for key in ("hotpath", "profile"):
        if not results.get(key) and old.get(key):
            results[key] = old[key]
    profiles = dict(old.get("profiles") or {})
    if old.get("profile") and "party_sync-memory" not in profiles:
        profiles["party_sync-memory"] = old["profile"]
    profiles.update(results.get("profiles") or {})
    results["profiles"] = profiles
    results.pop("profile", None)
    if not results.get("resume"):
        results["resume"] = []
    done = {r.get("system") for r in results.get("resume", [])}
    results["resume"] = results.get("resume", []) + [
        r for r in old.get("resume", []) if r.get("system") not in done
    ]
    results["meta"]["merged_with"] = old.get("meta", {}).get("date")


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _passed(step: dict[str, Any], limit_ms: float) -> bool:
    p99 = step.get("p99_ms")
    return (
        p99 is not None
        and p99 <= limit_ms
        and step["samples"] > 0
        and step["lost"] == 0
        and step["duplicates"] == 0
        and step["out_of_order"] == 0
        and not step["errors"]
        # narration: the engine kept its timeline (else the load was not offered)
        and (step.get("engine_lag_p99_ms") or 0.0) <= limit_ms
    )


def _secret() -> str:
    from bench.common import SECRET

    return SECRET


def _print_step(name: str, step: dict[str, Any]) -> None:
    lg = step["loadgen"]
    step = {k: (math.nan if v is None else v) for k, v in step.items()}
    if step.get("scenario") == "narration":
        cpu, delivered = step.get("server_cpu", 0.0), step["delivered_per_s"]
        calls = sum((step.get("redis_calls_per_s") or {}).values())
        print(
            f"  {name:24} parties {step['parties']:>5} offered {step['offered_delivered']:>7.0f}/s "
            f"delivered {delivered:>7.0f}/s p50 {step['p50_ms']:6.2f} p99 {step['p99_ms']:7.2f} "
            f"max {step['max_ms']:7.1f} ms engine lag99 {step['engine_lag_p99_ms']:6.2f} ms "
            f"lost {step['lost']} dup {step['duplicates']} ooo {step['out_of_order']} "
            f"err {sum(step['errors'].values())} srv {cpu:4.0%} "
            f"({f'{cpu / delivered * 1e6:5.1f}' if delivered > 0 else '  n/a'} µs/delta) "
            f"redis {step.get('redis_cpu', 0):4.0%} calls/piece "
            f"{calls / max(step['pieces_written_per_s'], 1e-9):4.2f} "
            f"lg {lg['cpu']:4.0%} lag99 {lg['loop_lag_p99_ms']:5.1f}ms "
            f"other {step.get('foreign_cpu', 0):4.0%} "
            f"(warm-up {step.get('foreign_cpu_warmup', 0):4.0%})",
            flush=True,
        )
        if step["errors"]:
            print(f"    errors {step['errors']} {step.get('engine_error', '')}", flush=True)
        return
    print(
        f"  {name:24} offered {step['offered_delivered']:>8.0f}/s delivered "
        f"{step['delivered_per_s']:>8.0f}/s p50 {step['p50_ms']:7.2f} p99 {step['p99_ms']:8.2f} "
        f"max {step['max_ms']:8.1f} ms lost {step['lost']} dup {step['duplicates']} "
        f"ooo {step['out_of_order']} err {sum(step['errors'].values())} "
        f"srv {step.get('server_cpu', 0):4.0%} redis {step.get('redis_cpu', 0):4.0%} "
        f"lg {lg['cpu']:4.0%} lag99 {lg['loop_lag_p99_ms']:5.1f}ms "
        f"other {step.get('foreign_cpu', 0):4.0%}",
        flush=True,
    )


# -- the run --------------------------------------------------------------------------------------
FULL_LADDER = [  # finer below 15k, where the Redis systems and the peer find their limits
    1e3,
    2.5e3,
    3.5e3,
    5e3,
    7.5e3,
    1e4,
    1.25e4,
    1.5e4,
    2e4,
    2.5e4,
    3e4,
    4e4,
    5e4,
    6e4,
    7e4,
    8e4,
    9e4,
    1e5,
    1.1e5,
    1.2e5,
    1.4e5,
    1.6e5,
]
QUICK_LADDER = [1e4, 4e4]
#: Narration: parties narrating at each step (each delivers 30 pieces/s × 4 members = 120/s).
NARRATION_LADDER = [10, 25, 50, 75, 100, 150, 200, 250, 300, 400, 500, 600, 800, 1000]
NARRATION_QUICK_LADDER = [25, 100]
SCENARIOS = ("actions", "narration")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="party_sync benchmarks (make bench)")
    parser.add_argument("--quick", action="store_true", help="quick mode (under two minutes)")
    parser.add_argument("--systems", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--parties", type=int, default=250, help="parties of K (250 → 1,000)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rates", default="", help="offered delivered msgs/s, comma-separated")
    parser.add_argument("--repeats", type=int, default=None, help="sweeps per system (3; quick 1)")
    parser.add_argument("--warmup", type=float, default=None)
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--settle", type=float, default=None)
    parser.add_argument(
        "--fail-streak",
        type=int,
        default=None,
        help="stop a sweep after this many failing steps in a row (full 2, quick 1)",
    )
    parser.add_argument(
        "--memory-sizes",
        default=None,
        help="idle connection counts for memory (full: 1000,10000; quick: none)",
    )
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated: actions (every system, the probes), narration (party_sync on one "
        "node; the peers have no live narration); default both. Without actions, the figures "
        "of the action scenario and the probes come only from --merge",
    )
    parser.add_argument(
        "--narration-parties",
        default="",
        help="narration: parties narrating at each step, comma-separated "
        f"(full: {','.join(map(str, NARRATION_LADDER))}; quick: "
        f"{','.join(map(str, NARRATION_QUICK_LADDER))})",
    )
    parser.add_argument(
        "--narration-rate", type=float, default=30.0, help="narration: pieces/s of each party"
    )
    parser.add_argument(
        "--narration-pieces",
        default="150-300",
        help="narration: pieces per stream, min-max (each piece 3-8 words)",
    )
    parser.add_argument(
        "--noise-limit",
        type=float,
        default=0.25,
        help="a failed step is run again when other processes used more CPU (cores) than this",
    )
    parser.add_argument("--noise-retries", type=int, default=2)
    parser.add_argument(
        "--resume-rounds", type=int, default=None, help="resume probe (20; quick 5)"
    )
    parser.add_argument("--hotpath-actions", type=int, default=20000)
    parser.add_argument(
        "--gc-actions",
        type=int,
        default=None,
        help="actions before timing a full GC in the hot-path probe (200000; quick 0 = skip)",
    )
    parser.add_argument(
        "--profile-rate",
        type=float,
        default=20000.0,
        help="offered delivered msgs/s while profiling party_sync",
    )
    parser.add_argument(
        "--profile-rate-redis",
        type=float,
        default=5000.0,
        help="offered delivered msgs/s while profiling party_sync on Redis",
    )
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument(
        "--probes-only",
        action="store_true",
        help="only the hot-path probe, the resume probes and the profiles (use with --merge)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="re-render the report from the results JSON in --out (no runs)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="niceness of the servers and the load generator (machine is shared)",
    )
    parser.add_argument(
        "--ps-command",
        default=None,
        help="party_sync command template ({python} {port}); Redis systems append "
        "--redis-url {redis_url}",
    )
    parser.add_argument(
        "--ps-env",
        action="append",
        default=[],
        help="KEY=VALUE for party_sync servers (repeatable)",
    )
    parser.add_argument(
        "--out", default=None, help="output directory (full: docs/, quick: bench/results/)"
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not touch bench/.venv nor run npm ci for the Node.js peer",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the systems of the existing results that this run does not measure",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.repeats = args.repeats or (1 if quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if quick else 2.0)
    args.duration = args.duration if args.duration is not None else (2.0 if quick else 6.0)
    args.settle = args.settle if args.settle is not None else (1.5 if quick else 3.0)
    args.fail_streak = args.fail_streak or (1 if quick else 2)
    args.resume_rounds = args.resume_rounds or (3 if quick else 20)
    if quick and args.hotpath_actions == 20000:
        args.hotpath_actions = 10000
    args.gc_actions = args.gc_actions if args.gc_actions is not None else (0 if quick else 200000)
    sizes = args.memory_sizes if args.memory_sizes is not None else ("" if quick else "1000,10000")
    args.memory_sizes = [int(x) for x in sizes.split(",") if x]
    args.ladder = [float(x) for x in args.rates.split(",") if x] or (
        QUICK_LADDER if quick else FULL_LADDER
    )
    args.scenarios = [x for x in args.scenarios.split(",") if x]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    args.narration_ladder = [int(x) for x in args.narration_parties.split(",") if x] or (
        NARRATION_QUICK_LADDER if quick else NARRATION_LADDER
    )
    low, _, high = args.narration_pieces.partition("-")
    args.narration_pieces = (int(low), int(high or low))
    if not 1 <= args.narration_pieces[0] <= args.narration_pieces[1]:
        parser.error("--narration-pieces: min-max with 1 <= min <= max")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(raw)
    if not in_bench_env():
        if not cfg.no_install:
            ensure_env()
            ensure_redis()
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *raw])
    from bench import report
    from bench.common import pin
    from bench.systems import PS_COMMAND, all_systems

    out = Path(cfg.out) if cfg.out else (ROOT / ("bench/results" if cfg.quick else "docs"))
    if cfg.report_only:
        data = out / ("quick.json" if cfg.quick else "bench/results.json")
        report.write_all(json.loads(data.read_text()), out, quick=cfg.quick)
        return 0
    if "actions" not in cfg.scenarios and not cfg.merge and not cfg.quick:
        print(
            "bench: without the actions scenario, full mode would rewrite docs/bench/results.json "
            "without its figures: add --merge (keeps them from the existing results)",
            file=sys.stderr,
        )
        return 2
    pin([LOADGEN_CPU])  # the orchestrator stays off the server's core
    # TERM/INT unwind through the ``finally`` blocks, so every process this run started stops.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    started = time.monotonic()
    ps_env = dict(item.split("=", 1) for item in cfg.ps_env)
    systems = all_systems(cfg.ps_command or PS_COMMAND, ps_env)
    if cfg.systems:
        wanted = cfg.systems.split(",")
        systems = [s for s in systems if s.name in wanted]
    workdir = BENCH / "results" / "logs"
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "meta": report.machine_meta(cfg, raw),
        "systems": {},
    }
    results["meta"]["product_snapshot"] = snapshot_product(workdir)
    partial = workdir / "partial-results.json"
    actions = "actions" in cfg.scenarios
    for system in systems if actions and not cfg.probes_only else []:
        entry: dict[str, Any] = {
            "label": system.label,
            "kind": system.kind,
            "nodes": system.nodes,
            "redis": system.redis,
            "shards": system.shards,
            "note": system.note,
            "command": system.command,
            "runs": [],
            "memory": {},
            "available": True,
            "measured": {
                "date": results["meta"]["date"],
                "party_sync_commit": results["meta"]["party_sync_commit"],
                "snapshot": results["meta"]["product_snapshot"]["sha256"],
            },
        }
        results["systems"][system.name] = entry
        print(f"== {system.name}: {system.label}", flush=True)
        if system.node_package:
            try:
                ensure_node_package(ROOT / system.node_package, install=not cfg.no_install)
            except RuntimeError as exc:
                entry["available"] = False
                entry["reason"] = str(exc)[:1500]
                print(f"  {system.name}: not measured: {exc}", flush=True)
                continue
        for repeat in range(cfg.repeats):
            try:
                run = run_system(
                    system,
                    cfg,
                    workdir,
                    mode="load",
                    parties=cfg.parties,
                    delivered_rates=cfg.ladder,
                )
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"[:1500]
                entry.setdefault("errors", []).append(reason)
                print(f"  {system.name}: sweep {repeat + 1} failed: {reason[:400]}", flush=True)
                if not entry["runs"] and repeat == 0:
                    break  # it does not even start: no point in repeating
                continue
            run["repeat"] = repeat
            entry["runs"].append(run)
            partial.write_text(json.dumps(results, default=str))
        if not entry["runs"]:
            entry["available"] = False
            entry["reason"] = (entry.get("errors") or ["no sweep completed"])[-1]
            continue
        entry["memory"]["1000"] = [
            r["kib_per_idle_connection"] for r in entry["runs"] if r["connections"] == 1000
        ]
        for size in cfg.memory_sizes:
            if size == cfg.parties * cfg.k and entry["memory"].get(str(size)):
                continue
            try:
                idle = run_system(
                    system, cfg, workdir, mode="idle", parties=size // cfg.k, delivered_rates=[]
                )
                entry["memory"][str(size)] = [idle["kib_per_idle_connection"]]
                print(
                    f"  {system.name}: {size} idle connections: "
                    f"{idle['kib_per_idle_connection']:.1f} KiB each",
                    flush=True,
                )
            except Exception as exc:
                entry["memory"][f"{size}_error"] = f"{type(exc).__name__}: {exc}"[:800]
                print(f"  {system.name}: {size} idle connections failed: {exc}", flush=True)
    if actions:
        print("== party_sync hot path in process (bench/hotpath.py)", flush=True)
        try:
            results["hotpath"] = run_hotpath(cfg)
        except Exception as exc:
            results["hotpath"] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
    resumes = []
    for system in systems if actions else []:
        if system.kind != "party_sync" or system.nodes != 1:
            continue
        if not results["systems"].get(system.name, {}).get("available", cfg.probes_only):
            continue
        print(f"== resume probe: {system.name}", flush=True)
        try:
            resumes.append(run_resume(system, cfg, workdir))
            print(f"  {resumes[-1]}", flush=True)
        except Exception as exc:
            resumes.append({"system": system.name, "error": f"{type(exc).__name__}: {exc}"[:800]})
    results["resume"] = resumes
    if not cfg.no_profile and not cfg.quick and actions:
        from bench import profile

        results["profiles"] = {}
        for system in systems:
            if system.kind != "party_sync" or system.nodes != 1 or system.shards:
                continue
            if not results["systems"].get(system.name, {}).get("available", cfg.probes_only):
                continue
            rate = cfg.profile_rate_redis if system.redis else cfg.profile_rate
            try:
                results["profiles"][system.name] = profile.profile_party_sync(
                    system, cfg, workdir, rate
                )
            except Exception as exc:
                results["profiles"][system.name] = {"error": f"{type(exc).__name__}: {exc}"}
    if "narration" in cfg.scenarios and not cfg.probes_only:
        narration_from = time.monotonic()
        results["narration"] = run_narration(systems, cfg, workdir, results["meta"])
        results["narration"]["meta"]["elapsed_s"] = round(time.monotonic() - narration_from, 1)
    elapsed = results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    broken = delivered_nothing(results)  # this run's systems only (before an earlier run's merge)
    if cfg.merge:
        merge(
            results,
            out / ("quick.json" if cfg.quick else "bench/results.json"),
            actions_ran=actions,
        )
    report.write_all(results, out, quick=cfg.quick)
    print(f"bench: done in {elapsed} s; wrote {out}", flush=True)
    for line in broken:
        print(f"bench: {line}", file=sys.stderr, flush=True)
    return 1 if broken else 0


def delivered_nothing(results: dict[str, Any]) -> list[str]:
    """The systems of this run whose every step delivered nothing: the harness or the system is
    broken (an overloaded system still delivers some), so the run fails instead of reporting a
    rate of 0 as a measurement. One line each, with the step's first errors."""
    lines = []
    sections = [("actions", results.get("systems") or {})]
    sections.append(("narration", (results.get("narration") or {}).get("systems") or {}))
    for scenario, systems in sections:
        for name, entry in systems.items():
            steps = [step for run in entry.get("runs") or [] for step in run.get("steps") or []]
            if not entry.get("available") or not steps:
                continue
            if any(step.get("delivered_per_s") for step in steps):
                continue
            errors = sorted({kind for step in steps for kind in step.get("errors") or {}})
            lines.append(
                f"{name} delivered nothing in the {scenario} scenario "
                f"({len(steps)} steps; errors: {', '.join(errors) or 'none'})"
            )
    return lines


if __name__ == "__main__":
    sys.exit(main())
