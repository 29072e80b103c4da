"""An aiohttp WebSocket as a gateway ``Sink``: frames written straight to the transport.

A broadcast event is already encoded once (``Event.data``); here each recipient costs one header
of 2–10 bytes and one ``transport.write`` — no per-connection queue, no writer task, no copy of the
payload. This is the one piece of the WebSocket protocol written by hand (RFC 6455 §5.2: a server
frame is FIN + opcode, the payload length, the payload; never masked, never compressed here),
because going through aiohttp's per-message coroutine costs a task switch per recipient.

The bound on a slow client is the transport's write buffer: when more than ``max_buffer`` bytes
are waiting for a client that does not read, it is closed with 4002 (it will reconnect and resume)
instead of growing the server's memory. Control frames (ping, pong, close) stay with aiohttp,
which writes them whole to the same transport, so frames never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct

from aiohttp import web

log = logging.getLogger(__name__)

_TEXT = 0x81  # FIN + opcode 1 (text)


def frame_header(length: int) -> bytes:
    """The header of an unmasked, final text frame carrying ``length`` bytes (RFC 6455 §5.2)."""
    if length < 126:
        return bytes((_TEXT, length))
    if length < 65536:
        return struct.pack("!BBH", _TEXT, 126, length)
    return struct.pack("!BBQ", _TEXT, 127, length)


class WebSocketSink:
    __slots__ = ("_close_task", "_closing", "_max_buffer", "_transport", "_ws")

    def __init__(
        self, ws: web.WebSocketResponse, transport: asyncio.Transport, max_buffer: int
    ) -> None:
        self._ws = ws
        self._transport = transport
        self._max_buffer = max_buffer
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None

    def send(self, data: bytes) -> bool:
        transport = self._transport
        if self._closing or transport.is_closing():
            return False
        if transport.get_write_buffer_size() > self._max_buffer:
            return False
        transport.write(frame_header(len(data)) + data)
        return True

    def close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self._close_task = asyncio.get_running_loop().create_task(
            self._close(code, reason.encode()[:120])
        )

    async def _close(self, code: int, reason: bytes) -> None:
        try:
            await self._ws.close(code=code, message=reason)
        except (ConnectionError, RuntimeError):
            pass  # the peer is gone already
        except Exception:
            log.exception("websocket close failed")

    async def stop(self) -> None:
        """The connection is over: let a pending close frame go out (bounded), then stop."""
        task = self._close_task
        if task is not None and not task.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout=1.0)
            task.cancel()
