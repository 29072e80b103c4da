"""Where party_sync's time goes: py-spy samples of the server under a steady load.

The server runs the usual scenario at a moderate rate (``--profile-rate``) while py-spy samples it
(``--nonblocking``, so the server is never paused). The raw stacks are summarised two ways: the
functions that hold the CPU themselves (self time), and a breakdown by component, each sample given
to the innermost frame that belongs to a known component.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

#: (component, regex over "function (path:line)"), checked from the innermost frame outwards.
COMPONENTS: list[tuple[str, str]] = [
    ("logging: one JSON log line per action", r"logging/|party_sync/logs\.py"),
    ("metrics: prometheus_client counters", r"prometheus_client/"),
    ("schema validation (jsonschema-rs)", r"party_sync/protocol/schemas\.py"),
    ("JWT verification", r"party_sync/auth\.py|/jwt/"),
    ("JSON encode/decode, timestamps, trace ids (codec)", r"party_sync/protocol/codec\.py"),
    ("inbound checks (protocol.inbound)", r"party_sync/protocol/inbound\.py"),
    ("send queue and writer task (transport.sink)", r"party_sync/transport/sink\.py"),
    ("aiohttp: WebSocket frame writing", r"aiohttp/_websocket/writer|aiohttp/http_writer"),
    ("aiohttp: WebSocket frame reading", r"aiohttp/_websocket/reader|aiohttp/streams\.py"),
    ("aiohttp: other (web_ws, handshake, server)", r"aiohttp/"),
    ("fan-out: hub, session, seq check", r"party_sync/gateway/(hub|session)\.py|core/sequence"),
    ("backend + core: seq, history, projection, ledger", r"party_sync/backends/|party_sync/core/"),
    ("publisher: event envelope", r"party_sync/gateway/publisher\.py|core/snapshot\.py"),
    ("gateway: action flow", r"party_sync/gateway/gateway\.py"),
    ("engine link + benchmark engine", r"party_sync/engine/|bench/engine\.py"),
    ("socket I/O syscalls (asyncio transports)", r"asyncio/selector_events\.py"),
    ("asyncio event loop: scheduling, tasks, futures", r"asyncio/|selectors\.py|uvloop"),
]
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<where>.*)\)$")


def summarise(raw: Path, top: int = 20) -> dict[str, Any]:
    """Self time per function and time per component, from py-spy's ``--format raw`` output."""
    self_time: Counter[str] = Counter()
    components: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    patterns = [(name, re.compile(rx)) for name, rx in COMPONENTS]
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaf = frames[-1]
        self_time[_short(leaf)] += count
        for name in {_short(f) for f in frames}:
            inclusive[name] += count
        for frame in reversed(frames):
            match = next((n for n, rx in patterns if rx.search(frame)), None)
            if match is not None:
                components[match] += count
                break
        else:
            components["other"] += count
    if total == 0:
        return {"samples": 0}

    def share(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, count / total) for name, count in counter.most_common(n)]

    return {
        "samples": total,
        "self": share(self_time, top),
        "components": share(components, len(components)),
        "inclusive": share(inclusive, 40),
    }


def _short(frame: str) -> str:
    """``f (/…/site-packages/aiohttp/x.py:123)`` → ``f (aiohttp/x.py)``."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    where = match["where"].rsplit(":", 1)[0]
    for marker in ("site-packages/", "/src/", "/lib/python3.11/", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{match['func']} ({where})"


def profile_party_sync(
    system: Any, cfg: argparse.Namespace, workdir: Path, rate: float | None = None
) -> dict[str, Any]:
    """Run ``system`` at ``rate`` (default ``cfg.profile_rate``); py-spy its first process."""
    from bench import run

    rate = rate or cfg.profile_rate
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = workdir / f"{system.name}-profile.txt"
    sampler: dict[str, Any] = {}

    def hook(server_pids: list[int]) -> None:
        duration = max(2, int(cfg.profile_seconds) - 2)
        sampler["proc"] = subprocess.Popen(
            [
                pyspy,
                "record",
                "--pid",
                str(server_pids[0]),
                "--duration",
                str(duration),
                "--rate",
                "250",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    print(f"== profile: {system.name} at {rate:.0f} delivered msgs/s (py-spy)", flush=True)
    started = time.monotonic()
    long = argparse.Namespace(**{**vars(cfg), "duration": cfg.profile_seconds})
    try:
        result = run.run_system(
            system,
            long,
            workdir,
            mode="load",
            parties=cfg.parties,
            delivered_rates=[rate],
            on_measure=hook,
        )
    finally:
        proc = sampler.get("proc")
        if proc is not None:
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode:
                print(f"  py-spy failed: {err.decode(errors='replace')[-400:]}", flush=True)
    summary = summarise(raw) if raw.exists() else {"samples": 0, "error": "py-spy wrote nothing"}
    summary["rate"] = rate
    summary["system"] = system.name
    summary["step"] = (result.get("steps") or [None])[0]
    summary["elapsed_s"] = round(time.monotonic() - started, 1)
    return summary


if __name__ == "__main__":
    # Summarise an existing raw profile: python -m bench.profile FILE
    import json

    print(json.dumps(summarise(Path(sys.argv[1])), indent=1))
