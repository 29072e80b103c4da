"""party_sync's hot path without sockets: what one action costs, and what each step of it costs.

The real ``Gateway`` (built by ``party_sync.server.build_server`` with default settings and the
benchmark engine) gets ``action.request`` messages through ``Gateway.receive`` for sessions whose
sink only counts frames. So the figures are the product's own CPU per action, with no WebSocket
library and no kernel in them. Also measured: the single steps on the path, in isolation, and the
objects left tracked by the garbage collector per action (they make full collections slower).

Usage: ``python -m bench.hotpath [--actions N]`` prints JSON; ``bench/run.py`` stores it with the
results and ``docs/benchmarks.md`` shows it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import logging
import sys
import time
import timeit
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
from party_sync import logs
from party_sync.auth import Claims
from party_sync.config import Settings
from party_sync.engine.inprocess import InProcessLink
from party_sync.protocol import codec, inbound
from party_sync.server import build_server

from bench.common import RUN_ID, SECRET

PARTIES = 250
K = 4


class CountingSink:
    __slots__ = ("frames",)
    lost = False  # (Sink: the client is never gone)

    def __init__(self) -> None:
        self.frames = 0

    def send(self, data: bytes) -> bool:
        self.frames += 1
        return True

    def close(self, code: int, reason: str) -> None:
        return None


def _request(n: int, member: int) -> bytes:
    return orjson.dumps(
        {
            "type": "action.request",
            "trace_id": f"b{n}",
            "payload": {
                "action_id": f"a{n}",
                "character_id": f"c{member}",
                "campaign_run_id": RUN_ID,
                "action_type": "skill_check",
                "payload": {"skill": "perception"},
            },
        }
    )


async def per_action(actions: int, log_level: str) -> dict[str, Any]:
    """Microseconds of CPU per action through ``Gateway.receive`` (engine answers included)."""
    logs.configure(log_level, "json")
    logging.getLogger().handlers[0].stream = io.StringIO()  # type: ignore[attr-defined]
    settings = replace(Settings(), jwt_secret=SECRET, log_level=log_level)
    from bench.engine import BenchEngine

    server = build_server(settings, link=InProcessLink(BenchEngine()))
    gateway = server.gateway
    await gateway.start()
    sessions = []
    sink = CountingSink()
    for p in range(PARTIES):
        for m in range(K):
            claims = Claims(f"p{p}", RUN_ID, f"c{m}", f"Member {m}", time.time() + 3600)
            sessions.append(await gateway.open(claims, sink))
    requests = [
        (sessions[(n % PARTIES) * K + (n // PARTIES) % K], _request(n, (n // PARTIES) % K))
        for n in range(actions)
    ]
    tracked_before = _census()
    frames_before = sink.frames
    cpu0 = time.process_time()
    for index, (session, data) in enumerate(requests):
        await gateway.receive(session, data)
        if index % 64 == 63:
            await asyncio.sleep(0)  # let the engine tasks run, as the event loop would
    await asyncio.sleep(0)
    while gateway.link._tasks:  # type: ignore[attr-defined]  # noqa: ASYNC110 - drain engine tasks
        await asyncio.sleep(0)
    cpu = time.process_time() - cpu0
    tracked_after = _census()
    retained = tracked_after - tracked_before
    t0 = time.perf_counter()
    gc.collect()
    full_gc_ms = (time.perf_counter() - t0) * 1000
    frames = sink.frames - frames_before
    await gateway.stop()
    logging.getLogger().handlers.clear()
    return {
        "log_level": log_level,
        "actions": actions,
        "frames": frames,
        "us_per_action": cpu / actions * 1e6,
        "us_per_frame": cpu / max(1, frames) * 1e6,
        "gc_tracked_objects_retained_per_action": sum(retained.values()) / actions,
        "gc_tracked_retained_types": {
            name: count / actions for name, count in retained.most_common(3)
        },
        "gc_tracked_objects_total": sum(tracked_after.values()),
        "full_gc_ms": full_gc_ms,
    }


def _census() -> Counter[str]:
    """Objects the garbage collector tracks (and so walks in a full collection), by type."""
    gc.collect()
    return Counter(type(o).__qualname__ for o in gc.get_objects())


async def per_session_bytes(sessions: int = 2000) -> dict[str, float]:
    """Bytes the product itself keeps per joined session (no WebSocket library, no socket)."""
    import tracemalloc

    logs.configure("WARNING", "json")
    settings = replace(Settings(), jwt_secret=SECRET, log_level="WARNING")
    from bench.engine import BenchEngine

    server = build_server(settings, link=InProcessLink(BenchEngine()))
    gateway = server.gateway
    await gateway.start()
    sink = CountingSink()
    claims = [
        Claims(f"p{i // K}", RUN_ID, f"c{i % K}", f"Member {i % K}", time.time() + 3600)
        for i in range(sessions)
    ]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for c in claims:
        await gateway.open(c, sink)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    await gateway.stop()
    logging.getLogger().handlers.clear()
    return {"sessions": sessions, "bytes_per_session": (after - before) / sessions}


def _time(fn: Callable[[], object], number: int = 20000) -> float:
    """Best of 5 runs, microseconds per call."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def steps() -> dict[str, float]:
    """Single steps of the path, in isolation (µs per call)."""
    from party_sync.gateway.gateway import log as gateway_log
    from party_sync.metrics import Metrics
    from party_sync.protocol.schemas import Contracts

    contracts = Contracts()
    data = _request(7, 1)
    engine_event = {
        "type": "scene.update",
        "timestamp": "2026-11-25T21:00:04.120Z",
        "trace_id": "b7",
        "seq": 1,
        "payload": {
            "scene_number": 3,
            "scene_id": "scene-3",
            "title": "The Sunken Gate",
            "narration": "Black water laps at a gate of rusted iron.",
            "options": [{"id": "open-gate", "label": "Force the rusted gate"}],
            "kind": "story",
        },
    }
    from prometheus_client import CollectorRegistry, Counter

    metrics = Metrics("bench")
    registry = CollectorRegistry()
    counter = Counter("bench_messages", "a labelled counter", ["type"], registry=registry)
    child = counter.labels("action.request")
    logs.configure("INFO", "json")
    logging.getLogger().handlers[0].stream = io.StringIO()  # type: ignore[attr-defined]
    extra = {"trace_id": "b7", "party_id": "p7", "action_id": "a7"}
    loop = asyncio.new_event_loop()

    def timer() -> None:
        loop.call_later(10.0, _noop).cancel()

    now = time.time()
    body = codec.encode(engine_event)
    result = {
        "inbound.parse(action.request): JSON + checks + schema": _time(
            lambda: inbound.parse(data, contracts, 65536)
        ),
        "Contracts.validate(scene.update)": _time(
            lambda: contracts.validate("scene.update", engine_event)
        ),
        "codec.encode(event) (orjson)": _time(lambda: codec.encode(engine_event)),
        "codec.with_seq(body, seq)": _time(lambda: codec.with_seq(body, 12345)),
        "codec.rfc3339(now) (the second's text cached)": _time(lambda: codec.rfc3339(now)),
        "datetime.isoformat (rfc3339 before the cache)": _time(
            lambda: datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        ),
        "codec.new_trace_id() (secrets)": _time(codec.new_trace_id),
        "prometheus_client: counter.labels(type).inc()": _time(
            lambda: counter.labels("action.request").inc()
        ),
        "prometheus_client: cached child .inc()": _time(child.inc),
        "metrics: Metrics.received(type) (a dict increment)": _time(
            lambda: metrics.received("action.request")
        ),
        "one INFO log line, JSON, with extra= (the per-action log before 1f78e97)": _time(
            lambda: gateway_log.info("action accepted", extra=extra), number=5000
        ),
        "loop.call_later(10 s) + cancel (a per-action timeout)": _time(timer),
    }
    logging.getLogger().handlers.clear()
    loop.close()
    return result


def _noop() -> None:
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="party_sync hot path, in process (benchmark)")
    parser.add_argument("--actions", type=int, default=20000)
    parser.add_argument(
        "--gc-actions", type=int, default=0, help="also time a full GC after this many actions"
    )
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"steps_us": steps()}
    out["memory"] = asyncio.run(per_session_bytes())
    out["per_action"] = [
        asyncio.run(per_action(args.actions, "INFO")),
        asyncio.run(per_action(args.actions, "WARNING")),
    ]
    if args.gc_actions:
        out["gc_after"] = asyncio.run(per_action(args.gc_actions, "WARNING"))
    print(orjson.dumps(out).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
