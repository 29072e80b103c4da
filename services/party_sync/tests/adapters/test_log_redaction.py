"""Credentials never reach the logs, even through aiohttp's own error logging (docs/security.md,
"Logs never hold a credential"): malformed requests carrying a real signed token, the API key,
the JWT secret and the bot token, sent over raw sockets; then everything the server logged is
searched for them.

1. A real ``party-sync serve`` process with its production logging (stderr to a file): nothing
   secret in any line, and 100 malformed requests give one WARNING line, no ERROR, no traceback.
2. In process, with the malformed-request limiter removed, so that aiohttp's ERROR tracebacks
   (which quote the raw request) are really written: the redaction alone must scrub them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import secrets
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from party_sync import logs
from party_sync.logs import MalformedRequestFilter
from ps_testkit.servers import (
    SECRET,
    free_port,
    make_settings,
    party_sync_command,
    serve_in_process,
    token,
    wait_healthy,
)

TOKEN = token("aria")
API_KEY = "psk_" + secrets.token_urlsafe(24)
BOT = "7000000001:" + secrets.token_urlsafe(24)


def secrets_in(text: str) -> list[str]:
    """Which credentials (or their secret parts) appear in ``text``."""
    _header, payload, signature = TOKEN.split(".")
    parts = {
        "token": TOKEN,
        "token signature": signature,
        "token payload+signature": f"{payload}.{signature}",
        "api key": API_KEY,
        "jwt secret": SECRET,
        "bot token": BOT,
        "bot secret": BOT.split(":", 1)[1],
    }
    return [name for name, value in parts.items() if value in text]


def malformed_requests() -> dict[str, bytes]:
    """One of each kind the parser refuses, each carrying credentials."""
    auth = f"Authorization: Bearer {API_KEY}\r\n"
    kinds = {
        "bad-char-after-token": f"GET /ws?token={TOKEN}\x01 HTTP/1.1\r\nHost: x\r\n{auth}\r\n",
        "http-9.9": f"GET /ws?token={TOKEN} HTTP/9.9\r\nHost: x\r\n{auth}\r\n",
        "lf-only": f"GET /ws?token={TOKEN} HTTP/1.1\nHost: x\nAuthorization: Bearer {API_KEY}\n\n",
        "nul-in-url": f"GET /ws?token={TOKEN}\x00x HTTP/1.1\r\nHost: x\r\n{auth}\r\n",
        "space-in-url": f"GET /ws?token={TOKEN} x HTTP/1.1\r\nHost: x\r\n{auth}\r\n",
        "control-char-in-authorization": (
            f"POST /api/v1/parties/p1/events HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {API_KEY}\x01\r\n\r\n"
        ),
        "token-in-authorization": (
            f"GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \x7f{TOKEN}\r\n\r\n"
        ),
        "secrets-in-a-header": f"GET / HTTP/1.1\r\nHost: x\r\nX-Note: {SECRET} {BOT}\x01\r\n\r\n",
        "bad-method": f"G\x01T /ws?token={TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n",
        # A bad method after a good request is logged at ERROR by aiohttp (not DEBUG).
        "bad-method-pipelined": (
            f"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nG\x01T /ws?token={TOKEN} HTTP/1.1\r\n\r\n"
        ),
        "line-too-long": f"GET /ws?token={TOKEN}&pad={'A' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n",
    }
    return {name: raw.encode("latin-1") for name, raw in kinds.items()}


def undecodable_bodies() -> dict[str, tuple[bytes, bytes]]:
    """Requests whose gzip or deflate body does not decode, each with the status it gets: a
    route that reads the body says 400, one that does not answers as usual (the body is never
    inflated: ``problems.RAW_BODIES``). ``Connection: close``: ``send_raw`` reads until EOF."""
    bodies: dict[str, tuple[bytes, bytes]] = {}
    for encoding in ("gzip", "deflate"):
        for path, status in (("/api/v1/auth/telegram", b"400"), ("/healthz", b"405")):
            raw = (
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {API_KEY}\r\nContent-Encoding: {encoding}\r\n"
                "Connection: close\r\n"
                "Content-Length: 10\r\n\r\n\x1f\x8b00000000"
            )
            bodies[f"{encoding}-{path}"] = (raw.encode("latin-1"), status)
    return bodies


async def send_raw(port: int, raw: bytes) -> bytes:
    """Send ``raw`` on a fresh connection and read until the server closes it (after its 400)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await reader.read()  # until EOF
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def serve_logging_to(log_file: Path, level: str) -> AsyncIterator[int]:
    """``party-sync serve`` with its production logging, stdout and stderr into ``log_file``."""
    port = free_port()
    env = {
        **os.environ,
        "PARTY_SYNC_JWT_SECRET": SECRET,
        "PARTY_SYNC_API_KEY": API_KEY,
        "PARTY_SYNC_TELEGRAM_BOT_TOKEN": BOT,
        "PARTY_SYNC_LOG_LEVEL": level,
    }
    with log_file.open("wb") as sink:
        proc = subprocess.Popen(
            [*party_sync_command(), "serve", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            async with aiohttp.ClientSession() as http:
                await wait_healthy(http, f"http://127.0.0.1:{port}", proc)
            yield port
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_a_real_server_logs_no_credential_and_one_line_per_interval(tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    async with serve_logging_to(log_file, "DEBUG") as port:
        for name, raw in malformed_requests().items():
            answer = await send_raw(port, raw)
            assert b" 400 " in answer.split(b"\r\n", 1)[0] or b"400" in answer, (name, answer)
        for name, (raw, status) in undecodable_bodies().items():
            answer = await send_raw(port, raw)
            assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == status, (name, answer)
        kinds = list(malformed_requests().values())
        for i in range(100):
            await send_raw(port, kinds[i % len(kinds)])
    text = log_file.read_text(errors="replace")
    assert secrets_in(text) == [], text[-3000:]
    lines = json_lines(text)
    assert any(line["msg"].startswith("party_sync serving") for line in lines), text[-3000:]
    from_parser = [line for line in lines if line["logger"] == "aiohttp.server"]
    # 115 malformed requests within one interval: one line, a WARNING without a traceback.
    assert 1 <= len(from_parser) <= 3, from_parser
    assert all(line["level"] in ("warning", "debug") and "exc" not in line for line in from_parser)
    assert [line for line in lines if line["level"] in ("error", "critical")] == []
    assert "Traceback" not in text
    loud = [line for line in lines if line["level"] == "warning"]
    assert len(loud) <= 3, loud


@pytest.fixture
def logging_without_limiter() -> Iterator[io.StringIO]:
    """The process's logging (``logs.configure``) into a buffer, minus the limiter: aiohttp's
    tracebacks are written, so only the redaction stands between them and the credentials."""
    root = logging.getLogger()
    server = logging.getLogger("aiohttp.server")
    saved = (root.handlers[:], root.level, server.filters[:])
    stream = io.StringIO()
    logs.configure("DEBUG", "json", stream=stream, secrets=[API_KEY, SECRET, BOT])
    for limiter in [f for f in server.filters if isinstance(f, MalformedRequestFilter)]:
        server.removeFilter(limiter)
    try:
        yield stream
    finally:
        root.handlers[:], server.filters[:] = saved[0], saved[2]
        root.setLevel(saved[1])


async def test_aiohttps_error_tracebacks_are_scrubbed(logging_without_limiter: io.StringIO) -> None:
    settings = make_settings(api_key=API_KEY, telegram_bot_token=BOT, log_level="DEBUG")
    async with serve_in_process(settings) as srv:
        port = int(srv.base.rsplit(":", 1)[1])
        for raw in malformed_requests().values():
            await send_raw(port, raw)
    text = logging_without_limiter.getvalue()
    lines = json_lines(text)
    errors = [line for line in lines if line["logger"] == "aiohttp.server" and "exc" in line]
    # aiohttp really logged the parser's errors with their quoted request, scrubbed:
    assert len(errors) >= len(malformed_requests()) - 1, text[-3000:]
    assert any("[redacted]" in line["exc"] for line in errors)
    assert secrets_in(text) == [], text[-3000:]
