"""The client's WebSocket behind a small interface, with aiohttp's client as the implementation.

Tests of the reconnect logic give ``PartyClient`` a fake ``Transport`` instead (no sockets).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Final, Protocol

import aiohttp

from party_sync.client.policy import handshake_reason, retry_after_seconds
from party_sync.protocol.errors import PartySyncError

ABNORMAL_CLOSURE = 1006  # RFC 6455: the connection ended without a close frame


class HandshakeRejected(PartySyncError):
    """The server answered the upgrade with an HTTP error (401 token, 403 origin, ...)."""

    def __init__(self, status: int, reason: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"handshake refused with {status}")
        self.status = status
        self.reason = reason
        #: the answer's ``Retry-After``, in seconds from when it came (None: none, unreadable)
        self.retry_after = retry_after


class TransportError(PartySyncError):
    """The connection could not be made (network error, timeout)."""


class Connection(Protocol):
    """One open WebSocket."""

    @property
    def close_code(self) -> int | None:
        """The server's close code once ``receive`` returned None."""
        ...

    @property
    def close_reason(self) -> str: ...

    async def receive(self) -> str | bytes | None:
        """The next text frame, or None once the connection is closed."""
        ...

    async def send(self, text: str) -> None:
        """Send one text frame; raises ``TransportError`` if the connection is gone."""
        ...

    async def close(self, code: int = 1000) -> None: ...


class Transport(Protocol):
    async def connect(self, url: str, *, token: str, params: Mapping[str, str]) -> Connection:
        """Open ``url`` with the token (``Authorization: Bearer``) and the query ``params``."""
        ...

    async def close(self) -> None: ...


class AiohttpConnection:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._code: int | None = None
        self._reason = ""

    @property
    def close_code(self) -> int | None:
        return self._code

    @property
    def close_reason(self) -> str:
        return self._reason

    async def receive(self) -> str | bytes | None:
        while True:
            msg = await self._ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                return str(msg.data)
            if msg.type is aiohttp.WSMsgType.BINARY:
                return bytes(msg.data)
            if msg.type is aiohttp.WSMsgType.CLOSE:
                # The code of the server's close frame (ws.close_code may say 1006 when the
                # server dropped the socket before our reply got out).
                self._code = msg.data if isinstance(msg.data, int) else self._ws.close_code
                self._reason = str(msg.extra or "")
                return None
            if msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                self._code = self._code or self._ws.close_code or ABNORMAL_CLOSURE
                return None
            if msg.type is aiohttp.WSMsgType.ERROR:
                self._code = ABNORMAL_CLOSURE
                self._reason = str(msg.data)
                return None
            # PING/PONG are answered by aiohttp itself (autoping); nothing else is expected.

    async def send(self, text: str) -> None:
        try:
            await self._ws.send_str(text)
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            raise TransportError(str(exc)) from exc

    async def close(self, code: int = 1000) -> None:
        await self._ws.close(code=code)


#: Seconds between the client's WebSocket pings (``AiohttpTransport(heartbeat=...)``).
DEFAULT_HEARTBEAT: Final = 20.0


class AiohttpTransport:
    """WebSockets with aiohttp's client. Uses ``session`` if given, else makes (and closes) one.

    ``heartbeat``: the client pings the server every so many seconds (WebSocket ping frames,
    which the server answers) and drops a connection whose pong is not back within half that:
    a link gone silent (a network change, a NAT that forgot the flow: no FIN, no RST) is found
    within 1.5 × ``heartbeat`` and the client reconnects and resumes. None: no pings (a silent
    link then stays "connected" until the operating system gives up on it, which can take many
    minutes)."""

    def __init__(
        self,
        session: aiohttp.ClientSession | None = None,
        *,
        connect_timeout: float = 10.0,
        heartbeat: float | None = DEFAULT_HEARTBEAT,
    ) -> None:
        self._session = session
        self._own = session is None
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat

    async def connect(self, url: str, *, token: str, params: Mapping[str, str]) -> Connection:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(self._connect_timeout):
                ws = await self._session.ws_connect(
                    url,
                    params=dict(params),
                    # The header keeps the token out of access logs (browsers must use ?token=).
                    headers={"Authorization": f"Bearer {token}"},
                    heartbeat=self._heartbeat,
                    autoping=True,
                )
        except aiohttp.WSServerHandshakeError as exc:
            headers = exc.headers
            reason = handshake_reason(
                exc.status,
                headers.get("Retry-After") if headers else None,
                exc.message,
                headers.get("WWW-Authenticate") if headers else None,
            )
            retry_after = retry_after_seconds(headers.get("Retry-After") if headers else None)
            raise HandshakeRejected(exc.status, reason, retry_after) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        return AiohttpConnection(ws)

    async def close(self) -> None:
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None
