"""Floor: a minimal picows broadcast server.

A baseline for the benchmark, not part of the product.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from bench.common import install_uvloop
from bench.peers._floor import parse_args, reencode, room_of

ROOMS: dict[str, set[WSTransport]] = {}


class Member(WSListener):
    __slots__ = ("members",)

    def __init__(self, room: str) -> None:
        self.members = ROOMS.setdefault(room, set())

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.members.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.members.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            out = reencode(frame.get_payload_as_bytes())
            for member in self.members:
                member.send(WSMsgType.TEXT, out)
        elif kind is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


def listener_for(request: WSUpgradeRequest) -> Member | None:
    path = request.path.decode() if isinstance(request.path, bytes) else str(request.path)
    room = room_of(path)
    return Member(room) if room else None


async def serve(host: str, port: int) -> None:
    # A 2 KiB initial read buffer: what the fastest setups use to idle at ~14 KiB a connection.
    server = await ws_create_server(listener_for, host, port, read_buffer_init_size=2048)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"floor-picows listening on {host}:{port}", flush=True)
    await stop.wait()
    server.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, "minimal picows broadcast server (benchmark floor)")
    if args.loop == "uvloop":
        install_uvloop()
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
