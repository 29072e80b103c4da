"""One Redis connection, one write per batch: the script calls of a node, pipelined.

A gateway under load issues many independent scripts at once (each connection's begin_action,
each engine's publish); awaiting each alone costs a round trip and redis-py's per-command overhead
apiece (~10k publishes/s one at a time, ~85k/s in pipelined batches). Here every script
call of a node goes through one dedicated connection: the calls queued while the previous batch
is on the wire (and, at the least, those of one event-loop tick) leave as one write, and their
replies are read in order. Redis still runs every script atomically and in the order queued, so
ordering and atomicity per call are unchanged (the order is now FIFO across ticks too); only the
round trips are shared. Under load batches grow by themselves (Nagle-like, with no timer); an
idle node sends a lone call at once.

What is written by hand, and why: the batch is packed with hiredis's C ``pack_command`` and sent
on a raw redis-py connection (``redis_wire.RawConnection``, which keeps connecting, AUTH, SELECT,
TLS and the hiredis reply parser), bypassing redis-py's ``Pipeline``: that object,
the pool checkout, the pure-Python packer and a ``wait_for`` task per socket operation cost more
than Redis's own work per script (measured in docs/benchmarks.md). The batch is bounded by one
``asyncio.timeout``; a batch that fails or times out drops the connection (its replies can no
longer be matched) and fails its calls and the calls queued behind it, and the next call
reconnects. An idle connection that Redis closed is noticed (EOF in its buffer) and replaced
before a batch is sent on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from party_sync.backends.redis_wire import RawConnection, Script, pack_evalsha

_Call = tuple[Script, Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    """Every script call of a node, sent in batches on one connection (see the module)."""

    def __init__(self, client: Redis, max_batch: int = 256, timeout: float = 5.0) -> None:
        self._client = client
        self._max_batch = max_batch
        self._timeout = timeout
        self._queue: list[_Call] = []
        self._pump: asyncio.Task[None] | None = None
        self._conn: RawConnection | None = None
        self._closed = False
        self.batches = 0  # observability and tests: batches sent
        self.calls = 0

    def run(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue one EVALSHA; the future gets its reply (or its error)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(ConnectionError("the script batcher is closed"))
            return future
        self._queue.append((script, keys, args, future))
        if self._pump is None:  # starts next tick: this tick's calls go together
            self._pump = loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._send(batch)
        finally:
            self._pump = None

    async def _connection(self) -> RawConnection:
        conn = self._conn
        if conn is not None and conn.connected:
            # As redis-py's pool does on every checkout: a connection that Redis closed while
            # it was idle (a restart, a CLIENT KILL, an idle timeout) shows EOF or stray data
            # in its buffer; replace it before sending, rather than fail the batch (no I/O).
            try:
                stale = await conn.stale()
            except Exception:
                stale = True
            if stale:
                await self._drop()
                conn = None
        if conn is None:
            # No socket timeout: the batch has one deadline (asyncio.timeout) instead.
            conn = self._conn = RawConnection(self._client.connection_pool, timeout=False)
        return conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _send(self, batch: list[_Call]) -> None:
        self.batches += 1
        self.calls += len(batch)
        packed = pack_evalsha(batch)
        replies: list[Any] = []
        try:
            async with asyncio.timeout(self._timeout):
                conn = await self._connection()
                await conn.send_packed(packed)
                read = conn.read
                for _ in batch:
                    try:
                        replies.append(await read())
                    except ResponseError as exc:  # an error reply: the stream is still in step
                        replies.append(exc)
        except BaseException as exc:  # the connection failed or timed out: every call failed
            await self._drop()
            # And so does every call queued behind it: they would each wait for a batch of their
            # own to fail in turn (k batches: k timeouts). They are retryable for their callers,
            # and the next call connects afresh.
            queued, self._queue = self._queue, []
            for *_, future in (*batch, *queued):
                _fail(future, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):  # Redis lost its scripts (restart, flush)
                await self._direct(call)
            elif isinstance(reply, BaseException):
                _fail(call[3], reply)
            elif not call[3].done():
                call[3].set_result(reply)

    async def _direct(self, call: _Call) -> None:
        script, keys, args, future = call
        try:
            result = await script(keys=keys, args=args, client=self._client)  # reloads on NOSCRIPT
        except BaseException as exc:
            _fail(future, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if not future.done():
            future.set_result(result)

    async def close(self) -> None:
        self._closed = True
        pump = self._pump
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        queue, self._queue = self._queue, []
        for *_, future in queue:
            _fail(future, ConnectionError("the script batcher is closed"))
        await self._drop()


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
