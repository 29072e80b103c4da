"""What every floor server shares: the command line, rooms, and the one-line message path."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import orjson

#: Path prefix of a floor's WebSocket endpoint: ``/ws/<room>``.
PREFIX = "/ws/"


def room_of(path: str) -> str:
    """The room named by a request path (``/ws/p7`` → ``p7``; anything else → ``""``)."""
    path = path.split("?", 1)[0]
    return path[len(PREFIX) :] if path.startswith(PREFIX) else ""


def reencode(data: bytes | str) -> bytes:
    """One message in, decoded and re-encoded (the minimal work a real server must do)."""
    return orjson.dumps(orjson.loads(data))


def parse_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (uvloop)"
    )
    return parser.parse_args(argv)
