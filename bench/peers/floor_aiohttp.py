"""Floor: a minimal aiohttp broadcast server.

A baseline for the benchmark, not part of the product.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

from aiohttp import WSMsgType, web

from bench.common import install_uvloop
from bench.peers._floor import parse_args, reencode

ROOMS: dict[str, set[web.WebSocketResponse]] = {}


async def websocket(request: web.Request) -> web.WebSocketResponse:
    members = ROOMS.setdefault(request.match_info["room"], set())
    ws = web.WebSocketResponse(compress=False, decode_text=False)
    await ws.prepare(request)
    members.add(ws)
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                out = reencode(msg.data)
                for member in list(members):
                    await member.send_frame(out, WSMsgType.TEXT)
    finally:
        members.discard(ws)
    return ws


async def serve(host: str, port: int) -> None:
    app = web.Application()
    app.router.add_get("/ws/{room}", websocket)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"floor-aiohttp listening on {host}:{port}", flush=True)
    await stop.wait()
    await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, "minimal aiohttp broadcast server (benchmark floor)")
    if args.loop == "uvloop":
        install_uvloop()
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
