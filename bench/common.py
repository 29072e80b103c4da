"""Small helpers shared by the benchmark's processes (servers, load generator, orchestrator)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
from collections.abc import Iterable

#: The JWT secret every benchmarked server and the load generator share (loopback only).
SECRET = "bench-secret-0123456789abcdef0123456789abcdef"  # noqa: S105 - loopback bench only
#: The campaign run every benchmark party plays.
RUN_ID = "bench-run"


def redis_server_argv(binary: str, port: int, workdir: str) -> list[str]:
    """A private redis-server's command line: loopback only, nothing saved, its files in
    ``workdir`` (never the shared one on 6379)."""
    return [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        workdir,
        "--protected-mode",
        "yes",
    ]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin(cpus: Iterable[int]) -> None:
    """Pin this process (and what it starts later) to ``cpus``, where the machine allows."""
    wanted = set(cpus)
    with contextlib.suppress(AttributeError, OSError):
        available = os.sched_getaffinity(0)
        if wanted and wanted <= available | set(range(os.cpu_count() or 1)):
            os.sched_setaffinity(0, wanted)


def raise_nofile(wanted: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (soft, and hard when allowed) towards ``wanted``; return the soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, wanted)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
    except (ValueError, OSError):
        pass  # no privilege to raise the hard limit: go as high as it allows
    else:
        return target
    new_soft = max(soft, min(wanted, hard))
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def install_uvloop() -> str:
    """Use uvloop when it is installed; return the loop's name."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def party_name(index: int) -> str:
    return f"p{index}"


def character_name(member: int) -> str:
    return f"c{member}"


def stamp(written: float, due: float) -> str:
    """The stamp a piece's text ends with: ``[<write µs>+<lag µs>]`` (``time.monotonic``)."""
    return f"[{int(written * 1e6)}+{max(0, int((written - due) * 1e6))}]"


def parse_stamp(text: str) -> tuple[float, float] | None:
    """``(written, due)`` in seconds from a piece's text, or None when it carries no stamp."""
    start = text.rfind("[")
    end = text.rfind("]")
    if start < 0 or end < start:
        return None
    written_us, _, lag_us = text[start + 1 : end].partition("+")
    try:
        written = int(written_us) / 1e6
        return written, written - int(lag_us) / 1e6
    except ValueError:
        return None
