"""Servers for tests: in-process on a real loopback port, or as a real ``party-sync`` process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from party_sync.auth import issue_token
from party_sync.backends.base import Backend
from party_sync.config import Settings
from party_sync.engine.inprocess import InProcessLink
from party_sync.engine.interface import Engine, EngineLink
from party_sync.server import Server, build_server, start_serving

from ps_testkit.client import Client

SECRET = "test-secret-0123456789abcdef0123456789abcdef"


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux; 32768 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


#: Every port ``free_port`` gave in this test session: never given twice. A port is free when
#: it is chosen, not until its server binds it, and a test often chooses several before it starts
#: any (a Sentinel system, then its nodes): without this, two of them could draw the same one.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port for a server a test starts, chosen *below* the ephemeral range.

    A port the kernel picks (bind to 0) comes from the range it also gives every outgoing
    connection (to Redis, HTTP clients): between this call and the server's own bind, one of
    those could take it ("address already in use", seen in CI). Below the range only another
    server can, and the tests start theirs one at a time.
    """
    high = max(10_001, _ephemeral_low())
    for _ in range(200):
        port = random.randrange(10_000, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    with socket.socket() as sock:  # a crowded machine: fall back to the kernel's choice
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def token(
    character: str,
    *,
    party: str = "p1",
    run: str = "r1",
    name: str | None = None,
    ttl: float = 3600.0,
    secret: str = SECRET,
) -> str:
    return issue_token(
        secret,
        party_id=party,
        campaign_run_id=run,
        character_id=character,
        display_name=name or character.capitalize(),
        now=time.time(),
        ttl=ttl,
    )


@dataclass
class Running:
    base: str  # http://127.0.0.1:PORT
    http: aiohttp.ClientSession
    server: Server | None = None
    process: subprocess.Popen[bytes] | None = None

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """A sample of the in-process server's metrics (None: not counted yet)."""
        assert self.server is not None, "an in-process server"
        value: float | None = self.server.gateway.metrics.registry.get_sample_value(
            name, dict(labels or {})
        )
        return value

    @property
    def ws_url(self) -> str:
        return self.base.replace("http://", "ws://") + "/ws"

    async def connect(
        self,
        character: str,
        *,
        party: str = "p1",
        run: str = "r1",
        epoch: str | None = None,
        last_seq: int | None = None,
        token_value: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Client:
        params: dict[str, str] = {"token": token_value or token(character, party=party, run=run)}
        if epoch is not None and last_seq is not None:
            params.update(epoch=epoch, last_seq=str(last_seq))
        ws = await self.http.ws_connect(self.ws_url, params=params, headers=headers)
        return Client(ws)

    async def join(self, character: str, **kwargs: Any) -> tuple[Client, dict[str, Any]]:
        """Connect and read the ``system.hello``."""
        client = await self.connect(character, **kwargs)
        hello = await client.expect("system.hello")
        return client, hello

    async def handshake_status(self, params: Mapping[str, str], **kwargs: Any) -> int:
        try:
            ws = await self.http.ws_connect(self.ws_url, params=params, **kwargs)
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


#: Set by the ``backend_kind`` fixture: in-process servers given no ``redis_url`` (and no backend)
#: run on this Redis instead of the embedded backend.
redis_url_for_tests: str | None = None
#: Set with it by ``backend_kind`` ``cluster``: ``redis_url_for_tests`` names a Redis Cluster node.
redis_cluster_for_tests = False


def make_settings(**overrides: Any) -> Settings:
    base = Settings(jwt_secret=SECRET, presence_grace=0.2, log_level="WARNING")
    return replace(base, **overrides)


@contextlib.asynccontextmanager
async def serve_in_process(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    backend: Backend | None = None,
    dev_mode: bool = False,
    link: EngineLink | None = None,
) -> AsyncIterator[Running]:
    """The real app on a real loopback port, in this event loop (``dev_mode``: with the
    development-only routes, as when no secret is configured)."""
    settings = settings or make_settings()
    if redis_url_for_tests and backend is None and settings.redis_url is None:
        # The same behaviour suite on Redis; the engine stays in-process (not the stream default).
        auto = settings.engine_transport == "auto" and not settings.engine_url
        transport = "inprocess" if auto else settings.engine_transport
        settings = replace(
            settings,
            redis_url=redis_url_for_tests,
            redis_cluster=redis_cluster_for_tests,
            engine_transport=transport,
        )
    if link is None and engine is not None:
        link = InProcessLink(engine)
    server = build_server(settings, link=link, backend=backend, dev_mode=dev_mode)
    # As `party-sync serve` starts it: with the connection limits (keep-alive, head deadline, caps).
    listening = await start_serving(server, "127.0.0.1", 0, shutdown_timeout=2.0)
    http = aiohttp.ClientSession()
    try:
        yield Running(f"http://127.0.0.1:{listening.port}", http, server=server)
    finally:
        try:
            # The test's clients go first: one that reads nothing never answers the drain's
            # close frame, and the server waits for that answer (the close handshake, bounded
            # at 3 s) before it ends the connection. A test of the drain drains in its body.
            await http.close()
        finally:
            await listening.stop()


def party_sync_command() -> list[str]:
    return [sys.executable, "-m", "party_sync"]


def run_serve(
    *args: str, env: Mapping[str, str] | None = None, port: int | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``party-sync serve ARGS`` run to its end (a start-up that must fail): its exit code and
    output."""
    return subprocess.run(
        [*party_sync_command(), "serve", "--port", str(port or free_port()), *args],
        env={**os.environ, "PARTY_SYNC_JWT_SECRET": SECRET, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


@contextlib.asynccontextmanager
async def serve_process(
    args: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> AsyncIterator[Running]:
    """``party-sync serve`` as its own process; stopped with SIGTERM (then SIGKILL) at the end."""
    port = port or free_port()
    full_env = {
        **os.environ,
        "PARTY_SYNC_JWT_SECRET": SECRET,
        "PARTY_SYNC_LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    proc = subprocess.Popen(
        [*party_sync_command(), "serve", *(args or []), "--port", str(port)],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        try:
            await wait_healthy(http, base, proc)
            yield Running(base, http, process=proc)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, 10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    await asyncio.to_thread(proc.wait)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


async def wait_healthy(
    http: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes], timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"server exited with {proc.returncode}: {err[-2000:]}")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(base + "/healthz") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.05)  # polling for a condition (the process listening), bounded
    raise AssertionError("server did not become healthy in time")
