"""The connection limits (docs/security.md, "Limits") as ``party-sync serve`` applies them: its
own event loop (uvloop when installed), flags from the command line, ``server.run``'s wiring."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from ps_testkit.servers import serve_process

pytestmark = pytest.mark.e2e

GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: party\r\n\r\n"


async def until_closed(reader: asyncio.StreamReader, within: float = 10.0) -> bytes:
    """What the server sent until it closed the socket (fails if it is still open)."""
    received = b""
    async with asyncio.timeout(within):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


async def test_the_process_closes_late_heads_and_extra_connections_but_not_websockets() -> None:
    args = [
        "--request-head-timeout",
        "1",
        "--keepalive-timeout",
        "30",
        "--max-connections-per-ip",
        "2",
        "--heartbeat",
        "60",
    ]
    async with serve_process(args) as srv:
        port = int(srv.base.rsplit(":", 1)[1])

        async def raw(source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))

        aria, _ = await srv.join("aria")  # from 127.0.0.1, idle from now on
        # 127.0.0.3 may hold two connections (idle keep-alive, 30 s): the third is closed.
        held = [await raw("127.0.0.3") for _ in range(2)]
        for reader, writer in held:
            writer.write(GET_HEALTHZ)
            async with asyncio.timeout(10):
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        over, over_writer = await raw("127.0.0.3")
        assert await until_closed(over) == b""
        # From another address, half a header: closed by the head deadline.
        slow, slow_writer = await raw("127.0.0.4")
        slow_writer.write(b"GET /healthz HTTP/1.1\r\nHost: par")
        assert await until_closed(slow) == b""
        # aria, idle for longer than that deadline, is still served.
        await aria.send("{not json")
        assert (await aria.until("system.error"))["payload"]["code"] == "bad_json"
        async with srv.http.get(srv.base + "/metrics") as resp:
            text = await resp.text()
        assert 'party_sync_connections_refused_total{reason="per_address"} 1.0' in text
        assert 'party_sync_connections_refused_total{reason="head_timeout"} 1.0' in text
        await aria.close()
        for _, writer in [*held, (over, over_writer), (slow, slow_writer)]:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
