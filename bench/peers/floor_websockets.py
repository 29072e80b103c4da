"""Floor: a minimal websockets (asyncio API) broadcast server.

A baseline for the benchmark, not part of the product.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from bench.common import install_uvloop
from bench.peers._floor import parse_args, reencode, room_of

ROOMS: dict[str, set[ServerConnection]] = {}


async def handler(ws: ServerConnection) -> None:
    room = room_of(ws.request.path if ws.request is not None else "")
    if not room:
        await ws.close(1008, "no room")
        return
    members = ROOMS.setdefault(room, set())
    members.add(ws)
    try:
        while True:
            message = await ws.recv(decode=False)  # bytes: no UTF-8 decode to str per frame
            broadcast(members, reencode(message), text=True)
    except ConnectionClosed:
        pass
    finally:
        members.discard(ws)


async def run(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # No permessage-deflate, as party_sync.
    async with serve(handler, host, port, compression=None, backlog=4096):
        print(f"floor-websockets listening on {host}:{port}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, "minimal websockets broadcast server (benchmark floor)")
    if args.loop == "uvloop":
        install_uvloop()
    asyncio.run(run(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
