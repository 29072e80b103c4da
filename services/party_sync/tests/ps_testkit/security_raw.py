"""Raw sockets for the security tier: HTTP requests written byte by byte, WebSocket frames built
by hand (half frames, clients that never read), and a capture of every log record.

Nothing here sleeps to synchronise: reads are bounded waits for bytes or EOF.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Raw:
    """One raw TCP connection to a test server."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, base: str, *, rcvbuf: int | None = None, limit: int = 1 << 22) -> Raw:
        """``limit``: what the reader buffers before it stops reading the socket (a small one
        leaves the rest in the kernel, as a client application that reads slowly does)."""
        parts = urlsplit(base)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # a small receive window: a client that never reads fills fast
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        return cls(reader, writer)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def eof(self, timeout: float) -> bool:
        """True if the server closes the connection within ``timeout`` (what it sent is read
        and dropped); False if it is still open then."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    async def early(self, timeout: float) -> bytes:
        """What the server sends within ``timeout`` (``b""``: nothing, it is still waiting for
        the rest of the request). A bounded wait for bytes, never a sleep."""
        try:
            return await asyncio.wait_for(self.reader.read(65536), timeout)
        except TimeoutError:
            return b""

    async def response(self, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        """Read one HTTP/1.1 response: status, headers (lower-case names), body."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = b""
            if "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                    chunk = await self.reader.readexactly(size + 2)
                    if size == 0:
                        break
                    body += chunk[:-2]
            return status, headers, body

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def request_head(
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    host: str = "127.0.0.1",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked(*pieces: bytes) -> list[bytes]:
    """A body in ``Transfer-Encoding: chunked``: one chunk per piece, then the last chunk."""
    return [b"%x\r\n%b\r\n" % (len(piece), piece) for piece in pieces] + [b"0\r\n\r\n"]


# -- WebSocket by hand ---------------------------------------------------------------------------


def ws_handshake(path: str, headers: dict[str, str] | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return request_head(
        "GET",
        path,
        {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": key,
            "Sec-WebSocket-Version": "13",
            **(headers or {}),
        },
    )


def client_frame(
    payload: bytes, opcode: int = 0x1, *, fin: bool = True, length: int | None = None
) -> bytes:
    """A masked client frame (RFC 6455 §5.2). ``length`` may claim more bytes than ``payload``
    has: a half frame."""
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        header = struct.pack("!BB", first, 0x80 | size)
    elif size < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


@dataclass
class ServerFrame:
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != 0x8 or len(self.payload) < 2:
            return None
        return int(struct.unpack("!H", self.payload[:2])[0])


async def read_frame(reader: asyncio.StreamReader) -> ServerFrame:
    """One unmasked server frame."""
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
    elif size == 127:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
    return ServerFrame(first & 0x0F, await reader.readexactly(size))


async def ws_open(base: str, path: str, *, rcvbuf: int | None = None, limit: int = 1 << 22) -> Raw:
    """A raw WebSocket connection after a successful (101) handshake."""
    raw = await Raw.open(base, rcvbuf=rcvbuf, limit=limit)
    await raw.write(ws_handshake(path))
    async with asyncio.timeout(10):
        head = await raw.reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    return raw


async def close_code(raw: Raw, timeout: float = 10.0) -> int | None:
    """Read frames until the server's close frame; its code (None if the socket just ended)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                frame = await read_frame(raw.reader)
                if frame.opcode == 0x8:
                    return frame.close_code
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


# -- logs ----------------------------------------------------------------------------------------


class LogCapture(logging.Handler):
    """Every log record of every logger in this process, formatted (with tracebacks)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        try:
            self.lines.append(self.format(record))
        except Exception as exc:  # a record that cannot be formatted is a finding too
            self.lines.append(f"UNFORMATTABLE {record.name}: {exc!r}")

    def errors(self) -> list[str]:
        """Records at ERROR or above."""
        return [line for line, r in zip(self.lines, self.records, strict=True) if r.levelno >= 40]

    def containing(self, secret: str) -> list[str]:
        """Records whose text (message, arguments, traceback, extra fields) holds ``secret``."""
        found = []
        for line, record in zip(self.lines, self.records, strict=True):
            extra = " ".join(repr(v) for v in record.__dict__.values())
            if secret in line or secret in extra:
                found.append(line)
        return found


@contextlib.contextmanager
def capture_logs(level: int = logging.DEBUG) -> Iterator[LogCapture]:
    """Capture every record from ``level`` up (the root level is lowered meanwhile)."""
    capture = LogCapture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(level)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)


__all__ = [
    "LogCapture",
    "Raw",
    "ServerFrame",
    "capture_logs",
    "chunked",
    "client_frame",
    "close_code",
    "read_frame",
    "request_head",
    "ws_handshake",
    "ws_open",
]
