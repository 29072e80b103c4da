"""Resume probe: how long a reconnect that resumes 100 missed events takes (target: under 50 ms).

One party of 4 members. Member c0 notes its ``epoch`` and ``last_seq`` and disconnects; the others
act 50 times (50 × ``action.result`` + ``scene.update`` = 100 events); c0 reconnects with
``epoch`` and ``last_seq``. Timed: from starting the reconnect (TCP connect, handshake, JWT) to
receiving the last of the 100 replayed events, after a ``system.hello`` with ``resumed: true``.
Each replayed event's ``seq`` must follow the previous one, or the round counts as failed.

Prints one JSON object (``p50_ms``, ``p99_ms``, ``max_ms``, ``n``, ``failed``) on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
from party_sync.auth import issue_token

from bench.common import RUN_ID, SECRET, install_uvloop, pin

MISSED_ACTIONS = 50  # × 2 events each = 100 missed events
#: Actions a second per acting member: under party_sync's per-connection rate limit (30/s).
PACE = 20.0


def _url(base: str, character: str, party: str, resume: tuple[str, int] | None = None) -> str:
    token = issue_token(
        SECRET,
        party_id=party,
        campaign_run_id=RUN_ID,
        character_id=character,
        display_name=character,
        now=time.time(),
        ttl=3600,
    )
    url = f"{base}/ws?token={token}"
    if resume is not None:
        url += f"&epoch={resume[0]}&last_seq={resume[1]}"
    return url


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=10)
    if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
        raise ConnectionError(f"unexpected frame {msg.type}")
    data = orjson.loads(msg.data)
    assert isinstance(data, dict)
    return data


async def _until(ws: aiohttp.ClientWebSocketResponse, type_: str, trace_id: str) -> None:
    while True:
        data = await _receive(ws)
        if data.get("type") == type_ and data.get("trace_id") == trace_id:
            return


async def probe(base: str, rounds: int, party: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        others = [await http.ws_connect(_url(base, f"c{i}", party)) for i in (1, 2, 3)]
        for ws in others:
            await _until_type(ws, "system.hello")
        c0 = await http.ws_connect(_url(base, "c0", party))
        hello = await _until_type(c0, "system.hello")
        epoch, last_seq = hello["payload"]["epoch"], hello["payload"]["seq"]
        # c0 follows the live stream up to now, so its last_seq is exact.
        n = 0
        times: list[float] = []
        failed = 0
        for _ in range(rounds):
            last_seq = await _drain_to_now(c0, last_seq)
            await c0.close()
            for _ in range(MISSED_ACTIONS):
                actor = others[n % 3]
                trace = f"r{n}"
                body = {
                    "type": "action.request",
                    "trace_id": trace,
                    "payload": {
                        "action_id": f"ra{n}-{time.monotonic_ns()}",
                        "character_id": f"c{n % 3 + 1}",
                        "campaign_run_id": RUN_ID,
                        "action_type": "skill_check",
                        "payload": {},
                    },
                }
                sent_at = time.monotonic()
                await actor.send_str(orjson.dumps(body).decode())
                await _until(actor, "scene.update", trace)
                n += 1
                # Stay under the rate limit: 3 actors in turn, each at most PACE actions a second.
                await asyncio.sleep(max(0.0, 1 / (3 * PACE) - (time.monotonic() - sent_at)))
            started = time.perf_counter()
            c0 = await http.ws_connect(_url(base, "c0", party, (epoch, last_seq)))
            hello = await _until_type(c0, "system.hello")
            payload = hello["payload"]
            if not payload.get("resumed"):
                failed += 1
                last_seq = payload["seq"]
                epoch = payload["epoch"]
                continue
            expected = last_seq
            ok = True
            while expected < payload["seq"]:
                event = await _receive(c0)
                if event.get("seq") != expected + 1:
                    ok = False
                    break
                expected += 1
            elapsed = time.perf_counter() - started
            if ok and payload["seq"] - last_seq >= 2 * MISSED_ACTIONS:
                times.append(elapsed * 1000)
            else:
                failed += 1
            last_seq = expected
        for ws in [*others, c0]:
            await ws.close()
    times.sort()

    def pct(q: float) -> float | None:
        if not times:
            return None
        return times[min(len(times) - 1, max(0, math.ceil(q / 100 * len(times)) - 1))]

    return {
        "n": len(times),
        "failed": failed,
        "missed_events": 2 * MISSED_ACTIONS,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": times[-1] if times else None,
    }


async def _until_type(ws: aiohttp.ClientWebSocketResponse, type_: str) -> dict[str, Any]:
    while True:
        data = await _receive(ws)
        if data.get("type") == type_:
            return data


async def _drain_to_now(ws: aiohttp.ClientWebSocketResponse, last_seq: int) -> int:
    """Read what is already queued for ``ws`` (briefly), returning the last seq seen."""
    while True:
        try:
            msg = await ws.receive(timeout=0.05)
        except TimeoutError:
            return last_seq
        if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            return last_seq
        seq = orjson.loads(msg.data).get("seq")
        if isinstance(seq, int):
            last_seq = seq


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="party_sync resume probe (benchmark)")
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--party", default="resume-probe")
    parser.add_argument("--cpu", type=int, default=None)
    args = parser.parse_args(argv)
    if args.cpu is not None:
        pin([args.cpu])
    install_uvloop()

    async def bounded() -> dict[str, Any]:
        async with asyncio.timeout(120):
            return await probe(args.url, args.rounds, args.party)

    print(orjson.dumps(asyncio.run(bounded())).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
