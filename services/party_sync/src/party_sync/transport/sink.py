"""An aiohttp WebSocket as a gateway ``Sink``: a bounded send queue drained by one writer task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from aiohttp import WSMsgType, web

from party_sync.protocol.errors import CloseCode

log = logging.getLogger(__name__)


class WebSocketSink:
    """Queues pre-encoded frames; the writer sends them in order, then the close frame.

    The queue is bounded (``max_queue`` messages): a client that cannot keep up is closed with
    4002 (it will reconnect and resume) instead of growing the server's memory.
    """

    __slots__ = ("_close", "_max_queue", "_queue", "_task", "_wake", "_ws")

    def __init__(self, ws: web.WebSocketResponse, max_queue: int) -> None:
        self._ws = ws
        self._max_queue = max_queue
        self._queue: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._close: tuple[int, str] | None = None
        self._task = asyncio.get_running_loop().create_task(self._write_loop())

    def send(self, data: bytes) -> bool:
        if self._close is not None or len(self._queue) >= self._max_queue:
            return False
        self._queue.append(data)
        self._wake.set()
        return True

    def close(self, code: int, reason: str) -> None:
        if self._close is not None:
            return
        self._close = (code, reason)
        if code == CloseCode.SLOW_CONSUMER:
            self._queue.clear()  # nothing more for a client that is not reading
        self._wake.set()

    async def _write_loop(self) -> None:
        ws = self._ws
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    await ws.send_frame(self._queue.popleft(), WSMsgType.TEXT)
                if self._close is not None:
                    code, reason = self._close
                    await ws.close(code=code, message=reason.encode()[:120])
                    return
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            return  # the peer went away; the reader side notices and cleans up
        except Exception:
            log.exception("websocket writer failed")

    async def stop(self) -> None:
        """The connection is over: stop the writer (after a pending close was sent)."""
        if self._close is not None and not self._task.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout=1.0)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
