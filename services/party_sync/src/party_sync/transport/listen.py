"""Start listening for an aiohttp runner, or say in one line why not (serve, engine-http)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from party_sync.protocol.errors import ListenError

T = TypeVar("T")


async def listen(
    runner: web.BaseRunner, host: str, port: int, start: Callable[[], Awaitable[T]]
) -> T:
    """``start()`` (bind and listen); on failure the runner is cleaned up, and a port in use, a
    port not permitted or a host that is no address of this machine is a ``ListenError``."""
    try:
        return await start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except BaseException:
        await runner.cleanup()
        raise
