"""One HTTP/1.1 request over a raw socket, its body cut into separate TCP writes (a body that
arrives in several segments must be read whole)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

from ps_testkit.servers import Running


async def raw_request(
    srv: Running,
    method: str,
    path: str,
    body: bytes,
    *,
    headers: dict[str, str] | None = None,
    pieces: int = 1,
    chunked: bool = False,
) -> tuple[int, Any]:
    """One HTTP/1.1 request over a raw socket, its body written in ``pieces`` TCP writes with a
    pause after each (so the server sees them arrive separately); the status and the JSON body."""
    host, port = srv.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        framing = (
            {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(len(body))}
        )
        head = {
            "Host": f"{host}:{port}",
            "Content-Type": "application/json",
            "Connection": "close",
            **framing,
            **(headers or {}),
        }
        lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
        writer.write("\r\n".join(lines).encode())
        size = -(-len(body) // pieces) if body else 0
        parts = [body[i : i + size] for i in range(0, len(body), size)] if body else []
        for i, part in enumerate(parts):
            writer.write(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
            await writer.drain()
            if chunked or i < len(parts) - 1:  # (nothing follows a plain body's last part)
                # The stimulus, not a synchronisation: a gap between segments is what the
                # finding is about (the old handler read only what had arrived by then).
                await asyncio.sleep(0.05)
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=10)
        head_bytes, _, payload = response.partition(b"\r\n\r\n")
        status = int(head_bytes.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head_bytes.lower():
            payload = _dechunk(payload)
        return status, json.loads(payload) if payload else None
    finally:  # on every path: a writer left open warns when collected after its loop closed
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, data = out + rest[:size], rest[size + 2 :]
    return out
