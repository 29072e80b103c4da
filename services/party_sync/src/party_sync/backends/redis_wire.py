"""Every use of redis-py below its client API, in one place (checked by a contract test).

Two parts of the Redis backend talk to Redis more directly than redis-py's ``Redis`` client
allows, for reasons measured in docs/benchmarks.md and explained in their modules:

- ``redis_batch`` packs a batch of EVALSHA calls itself and sends it as one write on a dedicated
  connection (the pipeline object, the pool checkout and the pure-Python packer cost more than
  Redis's own work per script);
- ``redis_bus`` reads pub/sub replies itself on a raw connection (redis-py's ``PubSub`` retries
  and re-subscribes silently, hiding the reconnects a node must see).

Both use a redis-py ``Connection`` taken straight from the pool's factory and its lower methods
(``make_connection``, ``send_command``, ``send_packed_command``, ``read_response`` with
``timeout=math.inf``, ``can_read``, ``disconnect``, the ``socket_timeout`` attribute), the
hiredis ``Reader`` and ``StreamReader`` of its parser (``_parser._reader``, ``_parser._stream``,
and ``NOT_ENOUGH_DATA``, the reader's "no whole reply yet": a batch's replies and a burst of
pub/sub messages are taken from hiredis in one loop, one await per socket read, where
``read_response`` costs about 3 µs per reply; without hiredis's parser, ``read_response`` is
used), and the ``sha`` and ``script`` attributes of redis-py's ``Script``. None of these is
documented as stable, so they are wrapped here and nowhere else, and
``tests/redis/test_redis_wire_contract.py`` exercises exactly them against a real redis-server: a
redis-py upgrade that changes one fails there, loudly, rather than as a hang or a lost message in
production. redis-py is pinned to the major version this was verified with (pyproject.toml).

Costs: a batch's replies and the pub/sub messages that arrived together are read in one loop
over hiredis (``read_replies``, ``read_pushes``); a batch's write and ``pack_evalsha`` add one
plain call per batch, not per call.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any, Protocol

from hiredis import Reader as HiredisReader
from hiredis import pack_command
from redis._parsers.hiredis import NOT_ENOUGH_DATA  # what its Reader returns for "not yet"
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

#: Bytes asked of the socket per read (redis-py's own read size).
READ_SIZE = 65536

#: A registered Lua script (``Redis.register_script``).
Script = AsyncScript

#: One script call of a batch: the script, its KEYS, its ARGV (anything after them is ignored).
ScriptCall = tuple[Script, Sequence[Any], Sequence[Any], object]


def pack_evalsha(calls: Iterable[ScriptCall]) -> bytes:
    """The RESP bytes of ``EVALSHA`` for each call, in order, as one buffer to write at once.

    hiredis's C packer (redis-py's own is pure Python); ``Script.sha`` is the SHA1 redis-py
    computed when the script was registered.
    """
    return b"".join(
        [
            pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))
            for script, keys, args, _ in calls
        ]
    )


def pack_asking_eval(script: Script, keys: Sequence[Any], args: Sequence[Any]) -> bytes:
    """``ASKING`` then ``EVAL`` of the script's text (not EVALSHA: the node a slot is moving to
    may not have it cached yet), as one write: the answer to an ``ASK`` redirection of a Cluster
    (both on one connection, as Redis requires)."""
    return b"".join(
        [pack_command(("ASKING",)), pack_command(("EVAL", script.script, len(keys), *keys, *args))]
    )


class ConnectionSource(Protocol):
    """What a ``RawConnection`` is made from: a redis-py pool, or one Cluster node's options."""

    def make_connection(self) -> Any: ...


class NodeConnections:
    """Connections to one node of a Redis Cluster, made as redis-py's ``ClusterNode`` makes its
    own (its ``connection_class`` and ``connection_kwargs``: host, port, AUTH, TLS, timeouts and
    the fence hook of ``redis_connect``), but outside its pool."""

    __slots__ = ("node",)

    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    def make_connection(self) -> AbstractConnection:
        return self.node.connection_class(**self.node.connection_kwargs)


async def load_script(client: Redis | RedisCluster, script: Script) -> None:
    """``SCRIPT LOAD`` a registered script (so the first EVALSHA of a batch finds it)."""
    script.sha = await client.script_load(script.script)


class RawConnection:
    """One connection of ``pool``'s kind (host, AUTH, SELECT, TLS, hiredis parser), outside the
    pool: never checked out or back, owned and closed by its user. ``pool`` may be a redis-py
    ``ConnectionPool`` or a Cluster node's ``NodeConnections``.

    ``timeout=False``: no socket timeout on reads or writes; the user bounds each exchange itself
    (the batcher's one ``asyncio.timeout`` per batch). Otherwise the pool's ``socket_timeout``
    bounds each read and write, except ``read_push``, which waits for as long as it takes.
    """

    __slots__ = ("_conn", "read", "read_push", "send")

    def __init__(self, pool: ConnectionSource, *, timeout: bool = True) -> None:
        conn: AbstractConnection = pool.make_connection()
        if not timeout:
            conn.socket_timeout = None
        self._conn = conn
        #: The next reply (a ``ResponseError`` reply is raised); bound once, called per reply.
        self.read: Callable[[], Awaitable[Any]] = conn.read_response
        #: The next reply, however long it takes (pub/sub messages): ``timeout=math.inf`` is
        #: redis-py's "no timeout" for one read, whatever the socket timeout. Positional
        #: arguments (``disable_decoding``, ``timeout``) keep the partial on C's fast path: no
        #: allocation and no Python frame per message.
        self.read_push: Callable[[], Awaitable[Any]] = partial(conn.read_response, False, math.inf)
        #: Pack and send one command (no reply is read).
        self.send: Callable[..., Awaitable[None]] = conn.send_command

    @property
    def connected(self) -> bool:
        return bool(self._conn.is_connected)

    async def connect(self) -> None:
        """Connect (and AUTH, SELECT, HELLO as the pool's URL says)."""
        await self._conn.connect()  # type: ignore[no-untyped-call]

    async def read_replies(self, count: int) -> list[Any]:
        """The next ``count`` replies, an error reply as its exception (returned, not raised):
        a batch's replies, with one await per socket read instead of one per reply."""
        return await self._take(count, self.read)

    async def read_pushes(self) -> list[Any]:
        """At least one reply, and every other one already received, however long the first
        takes (pub/sub messages); an error reply as its exception (returned, not raised)."""
        return await self._take(None, self.read_push)

    async def _take(self, count: int | None, read_one: Callable[[], Awaitable[Any]]) -> list[Any]:
        """``count`` replies, or (None) at least one and all that are already here."""
        replies: list[Any] = []
        reader = self._hiredis()
        if reader is None:  # not hiredis's parser: redis-py's reads, one per reply
            for _ in range(1 if count is None else count):
                try:
                    replies.append(await read_one())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        gets = reader[0].gets
        while count is None or len(replies) < count:
            reply = gets()
            if reply is NOT_ENOUGH_DATA:
                if count is None and replies:
                    break
                await self._fill(reader)
            elif isinstance(reply, RedisConnectionError):
                raise reply
            else:
                replies.append(reply)
        return replies

    def _hiredis(self) -> tuple[HiredisReader, asyncio.StreamReader] | None:
        """The hiredis ``Reader`` of the connected connection and the ``StreamReader`` it is
        fed from (redis-py's parser's ``_reader`` and ``_stream``), or None when redis-py does
        not parse with hiredis."""
        parser = self._conn._parser
        reader = getattr(parser, "_reader", None)
        stream = getattr(parser, "_stream", None)
        if not isinstance(reader, HiredisReader) or not isinstance(stream, asyncio.StreamReader):
            return None
        return reader, stream

    @staticmethod
    async def _fill(reader: tuple[HiredisReader, asyncio.StreamReader]) -> None:
        """Feed hiredis what the socket has (as redis-py's ``read_from_socket``); EOF or a
        socket error is redis-py's ``ConnectionError``."""
        try:
            data = await reader[1].read(READ_SIZE)
        except OSError as exc:
            raise RedisConnectionError(f"Error while reading from redis: {exc.args}") from exc
        if not data:
            raise RedisConnectionError("Connection closed by server.")
        reader[0].feed(data)

    def send_packed(self, data: bytes) -> Awaitable[None]:
        """Write already packed commands as they are (no health check: no extra round trip)."""
        return self._conn.send_packed_command(data, check_health=False)

    async def stale(self) -> bool:
        """True if the idle connection has something in its buffer: EOF (Redis closed it) or
        stray data. Either way it cannot be trusted with a batch. No I/O beyond a peek.

        redis-py 8 named this ``can_read`` (``can_read_destructive`` before, deprecated in 8).
        """
        return bool(await self._conn.can_read())

    async def close(self, *, wait: bool = False) -> None:
        """Close (no QUIT); ``wait``: until the socket is closed, else at once."""
        await self._conn.disconnect(nowait=not wait)
