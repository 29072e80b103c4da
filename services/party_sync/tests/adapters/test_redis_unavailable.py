"""``unavailable``: every failure of Redis becomes ``BackendUnavailable``, anything else passes,
with ``with`` and ``async with`` alike (no Redis needed: the errors are made here)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import pytest
from party_sync.backends import redis_scripts
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.backends.redis_connect import RedisTarget, Sentinels, make_client
from party_sync.backends.redis_scripts import unavailable
from party_sync.protocol.errors import BackendUnavailable
from redis.exceptions import ClusterDownError, RedisError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

REDIS_FAILURES = [
    RedisConnectionError("connection reset"),
    RedisTimeoutError("timed out"),
    ClusterDownError("CLUSTERDOWN"),
    TryAgainError("TRYAGAIN"),
    ResponseError("ERR refused"),
    OSError("no route"),
    TimeoutError(),
    # uvloop, when redis-py writes on a transport that closed under it (Redis restarting)
    RuntimeError(
        "unable to perform operation on <TCPTransport closed=True reading=False>; "
        "the handler is closed"
    ),
]


@pytest.mark.parametrize("failure", REDIS_FAILURES, ids=lambda e: type(e).__name__)
async def test_a_redis_failure_becomes_backend_unavailable_with_either_with(
    failure: BaseException,
) -> None:
    with pytest.raises(BackendUnavailable) as sync, unavailable("publish"):
        raise failure
    assert sync.value.__cause__ is failure
    with pytest.raises(BackendUnavailable) as async_:
        async with unavailable("publish"):
            raise failure
    assert async_.value.__cause__ is failure


async def test_other_errors_and_success_pass_through() -> None:
    with pytest.raises(KeyError), unavailable("publish"):
        raise KeyError("a bug stays a bug")
    with pytest.raises(RuntimeError), unavailable("publish"):
        raise RuntimeError("another RuntimeError is a bug too")
    with unavailable("publish"):
        value = 1
    async with unavailable("publish"):
        value += 1
    assert value == 2


def test_a_refused_command_is_logged_as_a_bug(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (refusals are logged at most once per 5 s per process: this test's own count)
    monkeypatch.setattr(redis_scripts, "REFUSALS", redis_scripts.Refusals())
    caplog.set_level(logging.ERROR)
    refused = pytest.raises(BackendUnavailable, match="redis refused begin_action")
    with refused, unavailable("begin_action"):
        raise ResponseError("ERR wrong number of arguments")
    assert "redis refused begin_action" in caplog.text


def test_exec_without_multi_says_the_multi_was_refused(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user without MULTI: redis-py raises EXEC's reply, "EXEC without MULTI", which hid the
    NOPERM (recheck probe). The line says what it means."""
    monkeypatch.setattr(redis_scripts, "REFUSALS", redis_scripts.Refusals())
    caplog.set_level(logging.ERROR)
    with pytest.raises(BackendUnavailable), unavailable("vote"):
        raise ResponseError("EXEC without MULTI")
    assert "EXEC without MULTI (Redis refused the MULTI before it" in caplog.text
    assert "+@transaction" in caplog.text


# -- a stalled Redis: one command timeout, not several -------------------------------------------


async def _commands(reader: asyncio.StreamReader) -> AsyncIterator[list[bytes]]:
    """The RESP commands a client sends (arrays of bulk strings), until it hangs up."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while True:
            count = int((await reader.readuntil(b"\r\n"))[1:-2])
            command = []
            for _ in range(count):
                size = int((await reader.readuntil(b"\r\n"))[1:-2])
                command.append((await reader.readexactly(size + 2))[:-2])
            yield command


def _reply(command: list[bytes]) -> bytes:
    """What a healthy Redis would answer to the client's set-up: the fence's EVAL (vouched),
    the rest OK."""
    if command[0].upper() == b"EVAL":
        return b"*3\r\n:0\r\n:0\r\n$1\r\nx\r\n"
    return b"+OK\r\n"


class SilentRedis:
    """A TCP server that answers a client's set-up but never a GET (a stalled Redis, as
    SIGSTOP makes one, but deterministic): it counts the GETs received."""

    def __init__(self, stalls: bytes = b"GET") -> None:
        self.stalls = stalls  # the command it never answers
        self.gets = 0  # how many of those it received
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            async for command in _commands(reader):
                if command[0].upper() == self.stalls:
                    self.gets += 1
                    continue  # stalled
                writer.write(_reply(command))
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_timed_out_command_is_not_sent_again() -> None:
    """Every client party_sync makes of one Redis (``make_client``: the backend's, the stream
    link's, the directory's, the monitors') gives a command that timed out up after one
    ``socket_timeout``: redis-py's default would send it again, ten times, on new connections."""
    silent = SilentRedis()
    async with silent as url:
        for client in (
            make_client(url, socket_timeout=0.2, socket_connect_timeout=1.0),
            RedisBackend(RedisOptions(url, command_timeout=0.2)).client,
        ):
            before = silent.gets
            with pytest.raises(RedisTimeoutError):
                await client.get("x")
            assert silent.gets - before == 1
            await client.aclose()


async def test_a_command_on_a_broken_connection_is_sent_again_on_a_new_one() -> None:
    """The retry that stays: a pooled socket that a Redis restart left dead."""
    server = await asyncio.start_server(_answer_then_hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = make_client(f"redis://127.0.0.1:{port}/0", socket_timeout=2.0)
    try:
        assert await client.get("x") == b"1"  # the first connection answers, then closes
        assert await client.get("x") == b"1"  # the dead socket, then a new one: answered
    finally:
        await client.aclose()
        server.close()


async def _answer_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer the set-up and one GET (``1``), then close the connection."""
    async for command in _commands(reader):
        if command[0].upper() == b"GET":
            writer.write(b"$1\r\n1\r\n")
            await writer.drain()
            break
        writer.write(_reply(command))
    writer.close()


async def test_a_silent_sentinel_is_asked_once() -> None:
    """The sentinels' own clients: a sentinel that does not answer costs one timeout per
    attempt (then the next sentinel is asked), not redis-py's ten retries of it."""
    silent = SilentRedis(stalls=b"SENTINEL")
    async with silent as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        sentinels = Sentinels((("127.0.0.1", port),), "mymaster")
        client = make_client(RedisTarget("redis://127.0.0.1/0", sentinels), socket_timeout=2.5)
        try:
            with pytest.raises(RedisConnectionError):  # MasterNotFoundError: none answered
                await client.get("x")
            # once per attempt (SENTINEL_TIMEOUT, 1 s): the command's one retry on a broken
            # connection (MasterNotFoundError is a ConnectionError) asks again; redis-py's
            # default asked it eleven times an attempt
            assert silent.gets == 2
            # and never past the command's bound in all (socket_timeout), asking included
            short = make_client(RedisTarget("redis://127.0.0.1/0", sentinels), socket_timeout=0.2)
            started = time.monotonic()
            with pytest.raises(RedisError):
                await short.get("x")
            assert time.monotonic() - started < 1.0
            await short.aclose()
        finally:
            await client.aclose()
