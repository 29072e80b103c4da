"""Redis's own cost per action, counted in instructions: what the benchmark scenario asks of Redis.

Time is a poor measure of Redis's share on a small, noisy machine (a script's duration in
``INFO commandstats`` is wall time, and it swings by a fifth between identical runs here);
instructions are exact. This runs a private ``redis-server`` under valgrind's callgrind, puts the
real ``Gateway`` (``party_sync.server.build_server`` with the benchmark engine, in process, as
``bench/hotpath.py`` does) on it, plays the benchmark's scenario (an ``action.request``; the
engine's ``action.result`` and ``scene.update`` to the party's four members) for a warm-up, zeroes
the counters, plays ``--actions`` more, and reports Redis's instructions per action, with the
script calls and the commands they ran (``INFO commandstats`` over the same window).

The same actions give nearly the same count, so a change to a Lua script or to what the node sends
is measured by running this before and after it. The node's periodic work runs by the clock, and
the clock runs about fifty times longer per action with Redis under valgrind, so it is kept out of
the window: the presence refresh (one script call per party every ``presence_ttl / 3``; in the
benchmark, 250 parties at 417 actions/s, about 0.06 calls per action) is set to an hour.

Usage: ``make bench-redis-cost`` or ``python -m bench.redis_cost [--actions N] [--batch B]
[--redis-server PATH]``; prints a table, and JSON with ``--json``. Needs ``valgrind``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import redis
from party_sync import logs
from party_sync.auth import Claims
from party_sync.config import Settings
from party_sync.engine.inprocess import InProcessLink
from party_sync.server import build_server

from bench.common import RUN_ID, SECRET, free_port, redis_server_argv
from bench.hotpath import PARTIES, CountingSink, K, _request

#: Frames one action gives the party: action.accepted, action.result, scene.update, to 4 members.
FRAMES_PER_ACTION = 3 * K


class WaitingSink(CountingSink):
    """Counts frames; ``reached`` is set once ``target`` frames have been sent."""

    __slots__ = ("reached", "target")

    def __init__(self) -> None:
        super().__init__()
        self.target = 0
        self.reached = asyncio.Event()

    def send(self, data: bytes) -> bool:
        self.frames += 1
        if self.frames >= self.target:
            self.reached.set()
        return True

    def expect(self, more: int) -> None:
        self.target = self.frames + more
        self.reached.clear()


@contextlib.contextmanager
def callgrind_redis(binary: str, workdir: Path) -> Iterator[tuple[int, int]]:
    """``redis-server`` under callgrind on a free loopback port: yields (port, pid)."""
    port = free_port()
    argv = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={workdir}/callgrind.%p",
        *redis_server_argv(binary, port, str(workdir)),
    ]
    log_file = (workdir / "redis.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server under valgrind did not start: see {workdir}")
            time.sleep(0.2)
        yield port, proc.pid
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()
        log_file.close()


def instructions_since_zero(pid: int, workdir: Path) -> int:
    """Dump callgrind's counters (zeroed before the window) and read their total."""
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    newest = max(glob.glob(f"{workdir}/callgrind.{pid}.*"), key=os.path.getmtime)
    with open(newest) as dump:
        for line in dump:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {newest}")


async def play(
    port: int, pid: int, workdir: Path, actions: int, warm: int, batch: int
) -> dict[str, Any]:
    logs.configure("warning", "json")
    logging.getLogger().handlers[0].stream = io.StringIO()  # type: ignore[attr-defined]
    client = redis.Redis(port=port)
    settings = replace(
        Settings(),
        jwt_secret=SECRET,
        log_level="warning",
        redis_url=f"redis://127.0.0.1:{port}/0",
        # Redis is ~50x slower under valgrind: give its commands room (not the measure's business)
        redis_command_timeout=30.0,
        # the per-action cost only: the presence refresh (one script call per party every
        # presence_ttl / 3, by the clock) would weigh fifty times more than in a real run
        presence_ttl=3600.0,
    )
    from bench.engine import BenchEngine

    server = build_server(settings, link=InProcessLink(BenchEngine()))
    gateway = server.gateway
    await gateway.start()
    sink = WaitingSink()
    sessions = []
    for p in range(PARTIES):
        for m in range(K):
            claims = Claims(f"p{p}", RUN_ID, f"c{m}", f"Member {m}", time.time() + 3600)
            sessions.append(await gateway.open(claims, sink))

    async def run(first: int, count: int) -> None:
        for start in range(first, first + count, batch):
            ids = range(start, min(start + batch, first + count))
            sink.expect(FRAMES_PER_ACTION * len(ids))  # every member has the actions' frames
            await asyncio.gather(
                *(
                    gateway.receive(
                        sessions[(n % PARTIES) * K + (n // PARTIES) % K],
                        _request(n, (n // PARTIES) % K),
                    )
                    for n in ids
                )
            )
            await sink.reached.wait()

    try:
        await run(0, warm)
        client.config_resetstat()
        # blocking on purpose: nothing else may run between the zero and the window
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)  # noqa: ASYNC221
        await run(warm, actions)
        total = instructions_since_zero(pid, workdir)
        stats: dict[str, Any] = client.info("commandstats")
    finally:
        await gateway.stop()
    calls = {  # in this scenario the node sends Redis nothing but script calls in the window
        name.removeprefix("cmdstat_"): int(v["calls"])
        for name, v in stats.items()
        if name != "cmdstat_config|resetstat"  # this tool's own
    }
    scripts = calls.get("evalsha", 0) + calls.get("eval", 0)
    nested = sum(n for name, n in calls.items() if name not in ("evalsha", "eval"))
    return {
        "actions": actions,
        "batch": batch,
        "instructions_per_action": total / actions,
        "instructions_per_delivered_message": total / (actions * FRAMES_PER_ACTION),
        "script_calls_per_action": scripts / actions,
        "commands_in_scripts_per_action": nested / actions,
        "commands_per_action": {name: n / actions for name, n in sorted(calls.items())},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actions", type=int, default=1000, help="measured actions (1000)")
    parser.add_argument("--warm", type=int, default=1000, help="actions before the window (1000)")
    parser.add_argument("--batch", type=int, default=20, help="actions sent at once (20)")
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="write callgrind's dumps to DIR and keep them (callgrind_annotate reads them; a "
        "redis-server built with symbols, e.g. from source, names Lua's own functions too)",
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench.redis_cost needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            workdir = args.keep.resolve()
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="redis-cost-")))
        with callgrind_redis(args.redis_server, workdir) as (port, pid):
            result = asyncio.run(play(port, pid, workdir, args.actions, args.warm, args.batch))
    if args.json:
        print(orjson.dumps(result).decode())
        return 0
    print(f"Redis instructions per action:            {result['instructions_per_action']:,.0f}")
    print(
        f"  per delivered message ({FRAMES_PER_ACTION} per action):  "
        f"{result['instructions_per_delivered_message']:,.0f}"
    )
    print(f"script calls per action:                  {result['script_calls_per_action']:.2f}")
    nested = result["commands_in_scripts_per_action"]
    print(f"commands run by the scripts, per action:  {nested:.2f}")
    for name, n in result["commands_per_action"].items():
        print(f"  {name:24s} {n:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
