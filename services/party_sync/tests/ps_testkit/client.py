"""A test WebSocket client that validates every message it receives against the schemas."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from party_sync.protocol import types as t
from party_sync.protocol.schemas import Contracts

CONTRACTS = Contracts()


def check_server_message(message: Any) -> None:
    """Fail unless ``message`` is a valid server → client message (schema and seq rules)."""
    assert isinstance(message, dict), message
    type_ = message.get("type")
    assert isinstance(type_, str) and CONTRACTS.has(type_), f"unknown type in {message}"
    CONTRACTS.validate(type_, message)
    if type_ in t.SYSTEM_TYPES or type_ in t.TRANSIENT_TYPES:
        assert "seq" not in message, f"system or transient message with seq: {message}"
    else:
        assert type_ in t.EVENT_TYPES, f"{type_} is not a server → client type"
        assert isinstance(message.get("seq"), int), f"event without seq: {message}"


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds, checking every 10 ms; fail after ``timeout``.

    For state with no event to await (a counter in another object, a metric); everything that
    arrives on a socket is awaited directly instead.
    """
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 (a bounded poll of state with no event)
            await asyncio.sleep(0.01)


def _close_code(ws: aiohttp.ClientWebSocketResponse, msg: aiohttp.WSMessage) -> int | None:
    """The server's close code: from its close frame when there was one (``ws.close_code`` says
    1006 if the server dropped the socket before our close reply got out)."""
    if msg.type is aiohttp.WSMsgType.CLOSE and isinstance(msg.data, int):
        return msg.data
    return ws.close_code


class Closed(Exception):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"connection closed with {code}")
        self.code = code


class Client:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.received: list[dict[str, Any]] = []
        self.raw: list[bytes] = []

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSING,
            aiohttp.WSMsgType.CLOSED,
        ):
            raise Closed(_close_code(self.ws, msg))
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        data = msg.data.encode() if isinstance(msg.data, str) else msg.data
        message = orjson.loads(data)
        check_server_message(message)
        self.raw.append(data)
        self.received.append(message)
        return message  # type: ignore[no-any-return]

    async def expect(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next message, which must be of ``type_``. Transient messages to every member
        (``action.accepted``, ``action.failed``, ``narration.delta``: kept in ``received``) are
        passed over unless ``type_`` is one: they tell what the sequenced events and the hello
        tell too, and tests of those read them with ``until`` or by asking for them."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.recv(timeout)
                if message["type"] in t.TRANSIENT_TYPES and type_ not in t.TRANSIENT_TYPES:
                    continue
                assert message["type"] == type_, f"expected {type_}, got {message}"
                return message

    async def until(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        """Skip messages until one of ``type_`` arrives."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.recv(timeout)
                if message["type"] == type_:
                    return message

    async def pieces(self, stream_id: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The payloads of every ``narration.delta`` of ``stream_id`` from now up to and
        including its last piece (``done``), passing over the other messages."""
        pieces: list[dict[str, Any]] = []
        while True:
            message = await self.until("narration.delta", timeout)
            if message["payload"]["stream_id"] == stream_id:
                pieces.append(message["payload"])
                if message["payload"]["done"]:
                    return pieces

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, dict):
            await self.ws.send_str(orjson.dumps(message).decode())
        elif isinstance(message, bytes):
            await self.ws.send_bytes(message)
        else:
            await self.ws.send_str(message)

    async def flood(self, message: str, times: int = 200) -> None:
        """Send ``message`` ``times`` times, or until the socket refuses (closed for it)."""
        for _ in range(times):
            try:
                await self.send(message)
            except ConnectionError:
                return

    async def act(
        self,
        action_id: str,
        character_id: str,
        run: str,
        action_type: str = "skill_check",
        payload: dict[str, Any] | None = None,
        trace_id: str | None = None,
    ) -> None:
        message: dict[str, Any] = {
            "type": "action.request",
            "payload": {
                "action_id": action_id,
                "character_id": character_id,
                "campaign_run_id": run,
                "action_type": action_type,
                "payload": payload or {},
            },
        }
        if trace_id:
            message["trace_id"] = trace_id
        await self.send(message)

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Wait for the server to close the connection; return the close code."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.receive()
                if msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.CLOSED,
                ):
                    return _close_code(self.ws, msg)
                if msg.type is aiohttp.WSMsgType.TEXT:
                    message = orjson.loads(msg.data)
                    check_server_message(message)
                    self.received.append(message)

    async def close(self) -> None:
        await self.ws.close()
