"""A loopback TCP proxy, to inject the network failures a test cannot get from a real server.

One proxy serves every tier: in front of a party_sync server (``base``: HTTP and WebSocket pass
through unchanged, so a browser page loaded through it talks to the server only through it) or in
front of a test Redis (``url``). What it can do to the connections through it:

- ``cut()`` closes every open connection (both sides: a client sees its WebSocket drop, the server
  sees the client go away);
- while ``refusing``, a new connection is accepted and closed at once (counted in ``refused``), so
  a client's reconnects fail until ``refusing`` is set back to False;
- ``freeze_subscribers()`` makes every connection that has sent SUBSCRIBE stop receiving (its bytes
  from upstream are dropped) while its socket stays open: the wedged pub/sub reader of
  centrifugo#1189, which only a liveness probe can notice. Connections made afterwards work;
- ``reset()`` resets every open connection towards the client (a TCP RST: a NAT or conntrack
  timeout, a resetting proxy, a crashed host), which the client notices only when it next
  writes; the upstream side is closed;
- ``stall()`` silences every current connection both ways (its bytes are dropped, no FIN, no
  RST): a phone that changed networks, a NAT that forgot the flow. Connections made afterwards
  work.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType

#: A (P|S)SUBSCRIBE *command* (a RESP bulk string of its own), not the word inside a Lua script's
#: text that a script connection sends with SCRIPT LOAD.
_SUBSCRIBE = re.compile(rb"\r\n[PpSs]?[Ss][Uu][Bb][Ss][Cc][Rr][Ii][Bb][Ee]\r\n")


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    subscriber: bool = False  # the client has sent SUBSCRIBE (Redis pub/sub)
    frozen: bool = False  # bytes from upstream are dropped
    stalled: bool = False  # bytes both ways are dropped
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            with contextlib.suppress(Exception):
                writer.close()


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.refusing = False
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def base(self) -> str:
        """The proxied party_sync server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The proxied Redis's URL (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def cut(self) -> int:
        """Close every open connection through the proxy; returns how many there were."""
        links = list(self._links)
        self._links.clear()
        for link in links:
            link.close()
        return len(links)

    def reset(self) -> int:
        """Reset every open connection towards its client (RST, not FIN: ``SO_LINGER`` 0);
        returns how many there were."""
        links = list(self._links)
        self._links.clear()
        for link in links:
            sock = link.client.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            link.client.transport.abort()
            link.close()
        return len(links)

    def freeze_subscribers(self) -> int:
        """Silence every current pub/sub connection; returns how many."""
        frozen = 0
        for link in self._links:
            if link.subscriber and not link.frozen:
                link.frozen = True
                frozen += 1
        return frozen

    def stall(self) -> int:
        """Silence every current connection both ways (sockets stay open); returns how many."""
        stalled = 0
        for link in self._links:
            if not link.stalled:
                link.stalled = True
                stalled += 1
        return stalled

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            self.refused += 1
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        loop = asyncio.get_running_loop()
        for source, sink, upstream in ((reader, up_writer, True), (up_reader, writer, False)):
            task = loop.create_task(self._pipe(source, sink, link, upstream=upstream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        *,
        upstream: bool,
    ) -> None:
        """Copy one direction until either side closes; then close both."""
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if upstream and not link.subscriber and _SUBSCRIBE.search(data):
                    link.subscriber = True
                if link.stalled or (not upstream and link.frozen):
                    continue  # the socket stays open; nothing gets through
                writer.write(data)
                await writer.drain()
        self._links.discard(link)
        link.close()
