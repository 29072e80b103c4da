"""A TCP proxy in front of a test Redis, to inject the failure a Redis cannot: a silent socket.

``freeze_subscribers()`` makes every connection that has sent SUBSCRIBE stop receiving (its bytes
from Redis are dropped) while the socket stays open: the wedged pub/sub reader of centrifugo#1189,
which only a liveness probe can notice. Connections made afterwards work normally.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class _Link:
    def __init__(self) -> None:
        self.subscriber = False
        self.frozen = False
        self.tasks: list[asyncio.Task[None]] = []
        self.writers: list[asyncio.StreamWriter] = []


class RedisProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> RedisProxy:
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
        for link in self._links:
            for writer in link.writers:
                writer.close()
            for task in link.tasks:
                task.cancel()
        await asyncio.gather(
            *(t for link in self._links for t in link.tasks), return_exceptions=True
        )
        await self._server.wait_closed()

    def freeze_subscribers(self) -> int:
        """Silence every current pub/sub connection; returns how many."""
        frozen = 0
        for link in self._links:
            if link.subscriber and not link.frozen:
                link.frozen = True
                frozen += 1
        return frozen

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        link = _Link()
        link.writers = [writer, up_writer]
        self._links.append(link)
        loop = asyncio.get_running_loop()
        link.tasks = [
            loop.create_task(self._pipe(reader, up_writer, link, upstream=True)),
            loop.create_task(self._pipe(up_reader, writer, link, upstream=False)),
        ]

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        *,
        upstream: bool,
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if upstream and b"SUBSCRIBE" in data.upper():
                    link.subscriber = True
                if not upstream and link.frozen:
                    continue  # the socket stays open; nothing gets through
                writer.write(data)
                await writer.drain()
        writer.close()
