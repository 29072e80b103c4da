#!/usr/bin/env python3
"""``make soak``: party_sync under steady traffic for a long time, its memory sampled.

    python3 bench/soak.py                          # 10 minutes, embedded backend, the defaults
    python3 bench/soak.py --history-size 1000      # a bound that limits memory, passed through
    python3 bench/soak.py --redis --minutes 20     # on Redis: Redis's ``used_memory`` too

One party_sync server (the real CLI with the benchmark's engine, ``bench/engine.py``: every action
answered by an ``action.result`` and a ``scene.update``) on CPU 0, started and pinned as
``bench/run.py`` starts it (a frozen copy of the sources, nice -10, a private ``redis-server`` on a
free port in Redis mode), and the load generator (``bench/loadgen.py``) on CPU 1: ``--parties`` ×
``--k`` members (10,000 in 2,500 parties of 4), each its own user, connected and joined; then one
``action.request`` per party every ``--interval`` seconds (10), the acting member rotating, for
``--minutes`` (10) on one open-loop timeline. The server's RSS (and, on Redis, ``INFO memory``) is
sampled every ``--sample-every`` seconds (10) from before the clients connect until they have
left.

It reports what the load generator counts over the whole soak (lost, duplicated and out-of-order
events, ``system.error``s, disconnects and close codes: all must be 0), latency, RSS over time
(first and last sample under traffic, growth per minute over each half, by least squares), and
**memory per active party**: (RSS at the end of the traffic - RSS with every member joined and no
action sent yet) / parties, and the same for Redis's ``used_memory``. It says whether RSS
flattened (the last half grew by less than 5 % of the whole growth) and, from the settings, when
the bounds fill at this traffic: a party's history after ``history_size`` events (two per action)
or ``history_max_age`` seconds, whichever is first, its action records after
``action_record_ttl`` seconds. A soak shorter than both cannot show the
steady state: the figure is then a lower bound, and the summary says so.

Writes ``bench/results/soak-<backend>-<date>.json`` (every sample) and a ``.txt`` summary beside
it (``--out``: another path, without the suffix); the server and load generator logs go under
``bench/results/soak/``. Like ``bench/run.py`` it first makes ``bench/.venv`` (unless
``--no-install``) and re-runs itself there. Only loopback addresses; every wait is bounded; every
process it starts is stopped by its pid, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import run as harness  # noqa: E402 - the repository root is on sys.path only now

MIB = 1 << 20
#: The settings of party_sync that bound its memory per party, passed through to the server.
BOUNDS = (
    "history_size",
    "history_max_bytes",
    "history_max_age",
    "action_record_ttl",
    "max_replay",
)
#: RSS flattened: the last half of the soak grew by less than this share of the whole growth.
FLAT_SHARE = 0.05


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="party_sync soak (make soak)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=float(os.environ.get("SOAK_MINUTES") or 10),
        help="minutes of traffic (env SOAK_MINUTES; default 10)",
    )
    parser.add_argument("--parties", type=int, default=2500, help="parties (2500)")
    parser.add_argument("--k", type=int, default=4, help="members per party (4)")
    parser.add_argument(
        "--interval", type=float, default=10.0, help="seconds between two actions of a party (10)"
    )
    parser.add_argument(
        "--sample-every", type=float, default=10.0, help="seconds between samples (10)"
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=10.0,
        help="seconds with every member joined before the first action (10): the baseline",
    )
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds for the last answers to arrive (10)"
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="party_sync on Redis (a private redis-server on CPU 0; its used_memory sampled too)",
    )
    parser.add_argument("--history-size", type=int, default=None, help="server's history_size")
    parser.add_argument(
        "--history-max-bytes",
        type=int,
        default=None,
        help="server's history_max_bytes (encoded bytes of history per party; 0 = no bound)",
    )
    parser.add_argument(
        "--history-max-age",
        type=float,
        default=None,
        help="server's history_max_age (s; 0 = no bound)",
    )
    parser.add_argument(
        "--action-record-ttl", type=float, default=None, help="server's action_record_ttl (s)"
    )
    parser.add_argument("--max-replay", type=int, default=None, help="server's max_replay")
    parser.add_argument(
        "--ps-env",
        action="append",
        default=[],
        help="KEY=VALUE for the party_sync server (repeatable), e.g. another PARTY_SYNC_* bound",
    )
    parser.add_argument(
        "--nice", type=int, default=-10, help="niceness of the server and the load generator"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="result path without suffix (default bench/results/soak-<backend>-<date>)",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="do not create or refresh bench/.venv"
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.parties < 1 or args.k < 2:
        parser.error("--minutes > 0, --parties >= 1 and --k >= 2")
    if args.interval <= 0 or args.sample_every <= 0:
        parser.error("--interval and --sample-every must be > 0")
    for item in args.ps_env:
        if "=" not in item:
            parser.error(f"--ps-env {item!r}: KEY=VALUE")
    return args


# -- figures --------------------------------------------------------------------------------------
def slope_per_minute(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(seconds, value)`` points, per minute; None under 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var <= 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60.0


def series_figures(
    samples: Sequence[dict[str, Any]], key: str, baseline: float | None, end: float | None, cfg: Any
) -> dict[str, Any]:
    """RSS (or Redis memory) under traffic: first, last, growth per minute per half, per party."""
    traffic = [
        (float(s["t"]), float(s[key]))
        for s in samples
        if s["phase"] == "traffic" and s.get(key) is not None
    ]
    half = cfg.minutes * 60.0 / 2
    first_half = slope_per_minute([p for p in traffic if p[0] < half])
    last_half = slope_per_minute([p for p in traffic if p[0] >= half])
    out: dict[str, Any] = {
        "idle": baseline,
        "first": traffic[0][1] if traffic else None,
        "last": traffic[-1][1] if traffic else None,
        "end": end,
        "growth_per_min_first_half": first_half,
        "growth_per_min_last_half": last_half,
    }
    if baseline is not None and end is not None:
        grown = end - baseline
        out["growth"] = grown
        out["per_party"] = grown / cfg.parties
        if last_half is not None:
            last_growth = last_half * half / 60.0
            out["last_half_share"] = last_growth / grown if grown > 0 else None
            out["flattened"] = grown <= 0 or last_growth <= FLAT_SHARE * grown
    return out


def effective_bounds(cfg: Any) -> dict[str, Any]:
    """The values the server runs with: the flag, else the environment, else its default."""
    from party_sync import config

    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(config.Settings)}
    env = dict(os.environ)
    env.update(item.split("=", 1) for item in cfg.ps_env)
    out: dict[str, Any] = {}
    for name in BOUNDS:
        given = getattr(cfg, name)
        raw = env.get(config.ENV_PREFIX + name.upper())
        kind = type(defaults[name])
        out[name] = given if given is not None else (kind(raw) if raw else defaults[name])
    return out


def fill_times(cfg: Any, bounds: dict[str, Any]) -> dict[str, float]:
    """Minutes of this traffic before each bound is reached (two history events per action):
    the history stops growing at ``history_size`` events or at ``history_max_age``, whichever
    comes first (the bytes bound binds only on events larger than the benchmark's)."""
    events_per_s = 2.0 / cfg.interval
    history_s = bounds["history_size"] / events_per_s
    if bounds["history_max_age"]:
        history_s = min(history_s, float(bounds["history_max_age"]))
    return {
        "history_full_min": history_s / 60.0,
        "action_records_full_min": float(bounds["action_record_ttl"]) / 60.0,
    }


# -- the soak -------------------------------------------------------------------------------------
def soak(cfg: Any, raw: Sequence[str]) -> dict[str, Any]:
    import orjson
    import psutil

    from bench.systems import PS_COMMAND, all_systems

    bounds = effective_bounds(cfg)
    command = PS_COMMAND + "".join(
        f" --{name.replace('_', '-')} {getattr(cfg, name)}"
        for name in BOUNDS
        if getattr(cfg, name) is not None
    )
    ps_env = dict(item.split("=", 1) for item in cfg.ps_env)
    wanted = "party_sync-redis-1" if cfg.redis else "party_sync-memory"
    system = next(s for s in all_systems(command, ps_env) if s.name == wanted)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    workdir = harness.BENCH / "results" / "soak" / stamp
    workdir.mkdir(parents=True, exist_ok=True)
    snapshot = harness.snapshot_product(workdir)
    duration = cfg.minutes * 60.0
    rate = cfg.parties / cfg.interval  # actions per second in all
    result: dict[str, Any] = {
        "meta": meta(cfg, raw, snapshot, system),
        "settings": {
            "backend": "redis" if cfg.redis else "embedded",
            "parties": cfg.parties,
            "k": cfg.k,
            "connections": cfg.parties * cfg.k,
            "interval_s": cfg.interval,
            "actions_per_s": rate,
            "minutes": cfg.minutes,
            "sample_every_s": cfg.sample_every,
            "idle_s": cfg.idle,
            "settle_s": cfg.settle,
            "server": bounds,
            "ps_env": cfg.ps_env,
            "nice": cfg.nice,
            "server_cpu": harness.SERVER_CPU,
            "loadgen_cpu": harness.LOADGEN_CPU,
        },
        "fill": fill_times(cfg, bounds),
        "samples": [],
        "workdir": str(workdir.relative_to(harness.ROOT)),
    }
    samples: list[dict[str, Any]] = result["samples"]
    started = time.monotonic()
    print(
        f"soak: {system.label}; {cfg.parties * cfg.k} members in {cfg.parties} parties of "
        f"{cfg.k}, one action per party every {cfg.interval:g} s ({rate:g} actions/s), "
        f"{cfg.minutes:g} min; server {bounds}",
        flush=True,
    )
    with harness.serving(system, cfg, workdir, "soak") as (ports, servers, redis_pids, urls):
        time.sleep(1.0)  # the server's start-up allocations are done
        server_procs = [psutil.Process(s.pid) for s in servers]
        result["rss_start"] = sum(p.memory_info().rss for p in server_procs)
        result["redis_memory_start"] = harness.redis_memory(urls)
        argv = [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--protocol",
            "party_sync",
            "--parties",
            str(cfg.parties),
            "--k",
            str(cfg.k),
            "--mode",
            "load",
            "--cpu",
            str(harness.LOADGEN_CPU),
            "--rates",
            f"{rate:.6f}",
            "--warmup",
            "0",
            "--duration",
            str(duration),
            "--settle",
            str(cfg.settle),
            "--interactive",
            "--max-seconds",
            str(duration + cfg.idle + cfg.settle + 900),
            *(arg for port in ports for arg in ("--url", f"ws://127.0.0.1:{port}")),
        ]
        loadgen = harness.LoadGenProcess(argv, cfg.nice)
        try:
            sampler = harness.Sampler([s.pid for s in servers], redis_pids, loadgen.proc.pid, urls)
            loadgen_proc = psutil.Process(loadgen.proc.pid)
            state: dict[str, Any] = {
                "phase": "connect",
                "t0": None,
                "prev": sampler.snapshot(),
                "minute": -1,
            }

            def take(phase: str) -> dict[str, Any]:
                snap = sampler.snapshot()
                cpu = sampler.delta(state["prev"], snap)
                state["prev"] = snap
                t0 = state["t0"]
                sample: dict[str, Any] = {
                    # seconds since the first action (before it: since the start, fixed below)
                    "t": round(snap["t"] - (started if t0 is None else t0), 2),
                    "since_start": round(snap["t"] - started, 2),
                    "phase": phase,
                    "rss": sampler.rss(),
                    "server_cpu": round(cpu["server_cpu"], 4),
                    "redis_cpu": round(cpu["redis_cpu"], 4),
                    "other_cpu": round(cpu["foreign_cpu"], 4),
                }
                with contextlib.suppress(psutil.Error):
                    sample["loadgen_rss"] = loadgen_proc.memory_info().rss
                memory = sampler.redis_memory()
                if memory is not None:
                    sample["redis_used_memory"] = memory["used_memory"]
                    sample["redis_used_memory_rss"] = memory["used_memory_rss"]
                samples.append(sample)
                return sample

            next_sample = time.monotonic()

            def pump(done: Callable[[str], bool], timeout: float, *, wait: bool = False) -> str:
                """Read the load generator's lines, sampling on time, until ``done`` (or, with
                ``wait``, until ``timeout`` has passed: returns "")."""
                nonlocal next_sample
                deadline = time.monotonic() + timeout
                while True:
                    now = time.monotonic()
                    if now >= next_sample:
                        sample = take(state["phase"])
                        next_sample += cfg.sample_every
                        if sample["phase"] == "traffic":
                            state["minute"] = _progress(sample, cfg, state["minute"])
                    if now >= deadline:
                        if wait:
                            return ""
                        raise RuntimeError(f"load generator: nothing after {timeout:.0f} s")
                    if not all(s.alive() for s in servers):
                        raise RuntimeError(f"server exited: {servers[0].tail()}")
                    line = loadgen.next_line(max(0.05, min(next_sample, deadline) - now))
                    if line is None:
                        exited = loadgen.proc.poll() is not None and loadgen.lines.empty()
                        if exited and not wait:
                            raise RuntimeError(
                                f"load generator exited: {''.join(loadgen.stderr)[-1500:]}"
                            )
                        continue
                    if line.startswith("FAILED"):
                        raise RuntimeError(f"load generator: {line[7:][:1500]}")
                    if done(line):
                        return line

            ready = pump(lambda x: x.startswith("READY"), 120 + cfg.parties * cfg.k / 100)
            result["ready"] = orjson.loads(ready[6:])
            print(f"soak: connected {result['ready']}", flush=True)
            state["phase"] = "idle"
            pump(lambda x: False, cfg.idle, wait=True)  # every member joined, no action yet
            idle = take("idle")  # the baseline
            result["rss_idle"] = idle["rss"]
            result["redis_used_memory_idle"] = idle.get("redis_used_memory")
            loadgen.command("GO")
            pump(lambda x: x.startswith("MEASURE_START"), 60)
            state["t0"] = time.monotonic()
            result["traffic_from_s"] = round(state["t0"] - started, 2)
            state["phase"] = "traffic"
            next_sample = state["t0"] + cfg.sample_every
            take("traffic")
            pump(lambda x: x.startswith("MEASURE_END"), duration + 120)
            state["phase"] = "settle"
            end = take("end")  # traffic stopped, connections still open
            result["rss_end"] = end["rss"]
            result["redis_used_memory_end"] = end.get("redis_used_memory")
            step_line = pump(lambda x: x.startswith("STEP "), cfg.settle + 120)
            result["loadgen"] = orjson.loads(step_line[5:])
            loadgen.command("STOP")
            state["phase"] = "closing"
            pump(lambda x: x == "DONE", 60)
            state["phase"] = "closed"
            pump(lambda x: False, min(5.0, cfg.sample_every), wait=True)  # closes noticed
            closed = take("closed")
            result["rss_closed"] = closed["rss"]
            result["redis_used_memory_closed"] = closed.get("redis_used_memory")
            result["server_alive"] = all(s.alive() for s in servers)
        finally:
            loadgen.stop()
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    offset = result.get("traffic_from_s", 0.0)
    for sample in samples:  # one time axis: seconds since the first action
        sample["t"] = round(sample["since_start"] - offset, 2)
    summarise(result, cfg)
    return result


def _progress(sample: dict[str, Any], cfg: Any, printed: int) -> int:
    """One line a minute of traffic; returns the minute printed last."""
    minute = int(sample["t"] // 60)
    if minute == printed:
        return printed
    redis = sample.get("redis_used_memory")
    print(
        f"  t {sample['t'] / 60:5.1f} min  RSS {sample['rss'] / MIB:7.1f} MiB"
        + (f"  redis used_memory {redis / MIB:7.1f} MiB" if redis is not None else "")
        + f"  server CPU {sample['server_cpu']:4.0%}  other {sample['other_cpu']:4.0%}",
        flush=True,
    )
    return minute


def summarise(result: dict[str, Any], cfg: Any) -> None:
    """Figures from the samples and the load generator's counts, into ``result``."""
    samples = result["samples"]
    lg = result.get("loadgen") or {}
    errors = sum((lg.get("errors") or {}).values())
    closes = sum((lg.get("closes") or {}).values())
    result["checks"] = {
        "sent": lg.get("sent"),
        "lost": lg.get("lost"),
        "duplicates": lg.get("duplicates"),
        "out_of_order": lg.get("out_of_order"),
        "errors": lg.get("errors"),
        "disconnects": lg.get("disconnects"),
        "closes": lg.get("closes"),
        "server_alive": result.get("server_alive"),
        "clean": bool(lg)
        and lg.get("lost") == 0
        and lg.get("duplicates") == 0
        and lg.get("out_of_order") == 0
        and errors == 0
        and lg.get("disconnects") == 0
        and closes == 0
        and lg.get("samples", 0) > 0
        and bool(result.get("server_alive")),
    }
    result["latency_ms"] = {k: lg.get(f"{k}_ms") for k in ("p50", "p99", "p999", "max")}
    result["rss"] = series_figures(samples, "rss", result["rss_idle"], result["rss_end"], cfg)
    if cfg.redis:
        result["redis_used_memory"] = series_figures(
            samples,
            "redis_used_memory",
            result.get("redis_used_memory_idle"),
            result.get("redis_used_memory_end"),
            cfg,
        )
    traffic = [s for s in samples if s["phase"] == "traffic"]
    others = [s["other_cpu"] for s in traffic[1:]]
    result["noise"] = {
        "other_cpu_mean": sum(others) / len(others) if others else None,
        "other_cpu_max": max(others) if others else None,
        "server_cpu_mean": (
            sum(s["server_cpu"] for s in traffic[1:]) / len(traffic[1:]) if traffic[1:] else None
        ),
    }
    fill = result["fill"]
    result["steady_state_by_design"] = cfg.minutes >= max(fill.values())


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f} MiB"


def _per_min(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:+.2f} MiB/min"


def text_summary(result: dict[str, Any]) -> str:
    s = result["settings"]
    checks = result["checks"]
    rss = result["rss"]
    lines = [
        f"party_sync soak ({s['backend']}), {result['meta']['date']}, "
        f"commit {result['meta']['party_sync_commit']}, snapshot "
        f"{result['meta']['product_snapshot']['sha256']}",
        f"  {s['connections']} members in {s['parties']} parties of {s['k']}, one action per "
        f"party every {s['interval_s']:g} s ({s['actions_per_s']:g} actions/s), "
        f"{s['minutes']:g} min; server {s['server']}"
        + (f", env {' '.join(s['ps_env'])}" if s["ps_env"] else ""),
        f"  checks: sent {checks['sent']} actions, lost {checks['lost']}, duplicated "
        f"{checks['duplicates']}, out of order {checks['out_of_order']}, errors "
        f"{checks['errors'] or 0}, disconnects {checks['disconnects']}, closes "
        f"{checks['closes'] or 0}, server alive {checks['server_alive']}: "
        + ("CLEAN" if checks["clean"] else "NOT CLEAN"),
        "  latency (acting member's send to each other member's receipt): "
        + ", ".join(
            f"{k} {v:.1f} ms"
            for k, v in result["latency_ms"].items()
            if isinstance(v, int | float) and math.isfinite(v)
        ),
        f"  RSS: before connecting {_mib(result.get('rss_start'))}, joined and idle "
        f"{_mib(rss['idle'])}, first under traffic {_mib(rss['first'])}, last "
        f"{_mib(rss['last'])}, end {_mib(rss['end'])}, after the clients left "
        f"{_mib(result.get('rss_closed'))}",
        f"  RSS growth: first half {_per_min(rss['growth_per_min_first_half'])}, last half "
        f"{_per_min(rss['growth_per_min_last_half'])}; "
        + (
            "flattened"
            if rss.get("flattened")
            else "NOT flattened (the last half grew by "
            + (f"{rss['last_half_share']:.0%}" if rss.get("last_half_share") is not None else "n/a")
            + " of the whole growth)"
        ),
        f"  memory per active party: {rss.get('per_party', 0) / 1024:.1f} KiB of RSS "
        "((end - joined and idle) / parties)",
    ]
    redis = result.get("redis_used_memory")
    if redis:
        lines.append(
            f"  Redis used_memory: idle {_mib(redis['idle'])}, end {_mib(redis['end'])}, growth "
            f"first half {_per_min(redis['growth_per_min_first_half'])}, last half "
            f"{_per_min(redis['growth_per_min_last_half'])}; per active party "
            f"{(redis.get('per_party') or 0) / 1024:.1f} KiB"
            + ("" if redis.get("flattened") else " (NOT flattened)")
        )
    fill = result["fill"]
    lines.append(
        f"  at this traffic a party's history is full (history_size events or history_max_age) "
        f"after "
        f"{fill['history_full_min']:.1f} min and its action records reach action_record_ttl "
        f"after {fill['action_records_full_min']:.1f} min: "
        + (
            "the soak is long enough to reach the steady state"
            if result["steady_state_by_design"]
            else "the soak is SHORTER: memory per active party above is a lower bound of the "
            "steady state"
        )
    )
    noise = result["noise"]
    if noise["other_cpu_mean"] is not None:
        lines.append(
            f"  server CPU {noise['server_cpu_mean']:.0%} of a core on average; other processes "
            f"used {noise['other_cpu_mean']:.2f} cores on average "
            f"(max {noise['other_cpu_max']:.2f}) of the machine's {os.cpu_count()}"
        )
    lines.append("  RSS over time (min: MiB" + (", Redis used_memory MiB" if redis else "") + "):")
    row = []
    minute = -1
    for sample in result["samples"]:
        if sample["phase"] == "end":
            minute = -1  # the end of the traffic, whatever the minute
        elif sample["phase"] != "traffic" or int(sample["t"] // 60) == minute:
            continue
        minute = int(sample["t"] // 60)
        text = f"{sample['t'] / 60:.0f}{' (end)' if sample['phase'] == 'end' else ''}: "
        text += f"{sample['rss'] / MIB:.0f}"
        if sample.get("redis_used_memory") is not None:
            text += f"/{sample['redis_used_memory'] / MIB:.0f}"
        row.append(text)
    lines.extend("    " + "  ".join(row[i : i + 10]) for i in range(0, len(row), 10))
    return "\n".join(lines) + "\n"


def meta(cfg: Any, raw: Sequence[str], snapshot: dict[str, str], system: Any) -> dict[str, Any]:
    def run(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip()

    import psutil

    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "",
    )
    commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = bool(run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "make soak" + (f"  (bench/soak.py {' '.join(raw)})" if raw else ""),
        "system": system.name,
        "server_command": system.command,
        "machine": {
            "cpu": cpu_model,
            "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "party_sync_commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "product_snapshot": snapshot,
    }


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(raw)
    if not harness.in_bench_env():
        if not cfg.no_install:
            harness.ensure_env()
            if cfg.redis:
                harness.ensure_redis()
        os.execv(
            str(harness.VENV_PYTHON),
            [str(harness.VENV_PYTHON), str(Path(__file__).resolve()), *raw],
        )
    from bench.common import pin

    pin([harness.LOADGEN_CPU])  # the orchestrator stays off the server's core
    signal.signal(signal.SIGTERM, harness._interrupted)
    signal.signal(signal.SIGINT, harness._interrupted)
    result = soak(cfg, raw)
    backend = "redis" if cfg.redis else "memory"
    out = (
        Path(cfg.out)
        if cfg.out
        else harness.BENCH / "results" / f"soak-{backend}-{result['workdir'].rsplit('/', 1)[-1]}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = text_summary(result)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    Path(f"{out}.txt").write_text(summary)
    print(summary, end="", flush=True)
    print(f"soak: wrote {out}.json and {out}.txt", flush=True)
    return 0 if result["checks"]["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
