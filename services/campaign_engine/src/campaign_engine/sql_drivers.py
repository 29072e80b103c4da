"""The SQL stores' drivers: ``SqliteRunStore`` (aiosqlite) and ``PostgresRunStore`` (psycopg 3).

Both are ``sql_store.SqlRunStore``: the schema, migrations and queries are shared; a driver only
supplies connections and transactions.

**SQLite** (``sqlite:///PATH``, the default): one connection per store, used by one coroutine at
a time (an ``asyncio.Lock``: a transaction of one action must never take in a statement of
another). Writes are ``BEGIN IMMEDIATE`` transactions, so writers in *other processes* on the same
file queue behind each other (up to ``busy_timeout``) instead of failing halfway; the commit's
version check then catches a writer that loaded the run before another one committed. The file is
in WAL mode (readers never block the writer) with ``synchronous=FULL``: a commit that returned
survives a power cut, not only a crash of the process.

**PostgreSQL** (``postgresql://…``): a small connection pool (psycopg_pool; each connection
checked before use, so a restarted server costs no failed action) serves any number of runs at
once. Each commit is one transaction at READ COMMITTED, which is enough here: the run row's update
is conditional on the version it was loaded at, and PostgreSQL re-checks that condition against
the newest row after waiting for a concurrent writer — so of two engine processes racing on one
run, exactly one commits. Schema migrations take a transaction-scoped advisory lock, so processes
starting together never run the same ``CREATE TABLE`` twice. Tables live in the connection's
``search_path`` (normally ``public``); to keep them apart, add
``?options=-csearch_path%3Dmy_schema`` to the URL.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import aiosqlite
import psycopg
import psycopg.errors
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from campaign_engine.sql_store import SqlRunStore
from campaign_engine.store import StoreUnavailable, redact, scrub

# --- SQLite --------------------------------------------------------------------------------------

BUSY_TIMEOUT_MS: Final = 10_000
PRAGMAS: Final = (
    f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",  # first: the pragmas after it may wait for a lock
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
)


async def _pragma(connection: aiosqlite.Connection, pragma: str) -> None:
    """Run a pragma, retrying "database is locked" for up to ``BUSY_TIMEOUT_MS``.

    Turning a new file to WAL needs its exclusive lock; when two processes open the file at once,
    SQLite may refuse one of them at once with SQLITE_BUSY (to avoid a deadlock, without calling
    the busy handler), so the busy timeout alone does not cover it (seen: a flaky test of two
    stores opening one file together).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            await connection.execute(pragma)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or loop.time() + delay > deadline:
                raise
        await asyncio.sleep(delay)  # a bounded backoff while the other opener holds the lock
        delay = min(delay * 2, 0.2)


class _SqliteTx:
    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._connection = connection

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = await self._connection.execute(sql, tuple(params))
        try:
            return cursor.rowcount
        finally:
            await cursor.close()

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = await self._connection.execute(sql, tuple(params))
        try:
            return [tuple(row) for row in await cursor.fetchall()]
        finally:
            await cursor.close()


class SqliteRunStore(SqlRunStore):
    """Run states and chronicles in the SQLite file ``path`` (created, with its directory, if
    ``create``; otherwise opening a missing file raises ``StoreUnavailable``)."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        super().__init__()
        self.path = Path(path)
        self.create = create
        self.url = f"sqlite:///{self.path}"
        self._connection: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def _connect(self) -> None:
        if not self.create and not self.path.is_file():
            raise StoreUnavailable(f"{self.url}: no such database file")
        if self.create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = "rwc" if self.create else "rw"
        try:
            connection = await aiosqlite.connect(
                f"{self.path.absolute().as_uri()}?mode={mode}", uri=True, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.url}: {exc}") from exc
        try:
            for pragma in PRAGMAS:
                await _pragma(connection, pragma)
        except sqlite3.Error as exc:
            await connection.close()
            raise StoreUnavailable(f"{self.url}: {exc}") from exc
        self._connection = connection

    async def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            async with self._lock:
                await connection.close()

    def _live(self) -> aiosqlite.Connection:
        if self._connection is None:
            raise RuntimeError(f"{self.url} is not open: call open() first")
        return self._connection

    @asynccontextmanager
    async def _transaction(self, *, migration: bool = False) -> AsyncIterator[_SqliteTx]:
        # BEGIN IMMEDIATE takes the file's write lock: it serialises migrations too.
        async with self._lock:
            connection = self._live()
            await connection.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(connection)
                await connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    await connection.execute("ROLLBACK")
                raise

    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[_SqliteTx]:
        async with self._lock:
            yield _SqliteTx(self._live())

    def _is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE constraint" in str(exc)


# --- PostgreSQL ----------------------------------------------------------------------------------

POOL_MIN: Final = 1
POOL_MAX: Final = 8
CONNECT_TIMEOUT_S: Final = 10.0
#: ``pg_advisory_xact_lock`` key of schema migrations (any constant; "ce_migr" in ASCII).
MIGRATION_LOCK: Final = 0x63655F6D696772

Connection = psycopg.AsyncConnection[TupleRow]


class _PostgresTx:
    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = await self._connection.execute(sql.replace("?", "%s"), list(params))
        return cursor.rowcount

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = await self._connection.execute(sql.replace("?", "%s"), list(params))
        return [tuple(row) for row in await cursor.fetchall()]


class PostgresRunStore(SqlRunStore):
    """Run states and chronicles in the PostgreSQL database ``conninfo`` names (a libpq URL)."""

    def __init__(self, conninfo: str) -> None:
        super().__init__()
        self.conninfo = conninfo
        self.url = redact(conninfo)
        self._pool: AsyncConnectionPool[Connection] | None = None

    async def _connect(self) -> None:
        try:  # one plain connection first: a wrong URL fails now, with libpq's own words
            probe = await psycopg.AsyncConnection.connect(
                self.conninfo, connect_timeout=int(CONNECT_TIMEOUT_S)
            )
        except psycopg.Error as exc:
            said = scrub(str(exc), self.conninfo)
            raise StoreUnavailable(f"{self.url}: cannot connect ({said})") from exc
        await probe.close()
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            self.conninfo,
            min_size=POOL_MIN,
            max_size=POOL_MAX,
            kwargs={"autocommit": True},  # transactions are explicit (conn.transaction())
            check=AsyncConnectionPool.check_connection,
            timeout=CONNECT_TIMEOUT_S,
            name="campaign_engine",
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except (PoolTimeout, psycopg.Error) as exc:
            await pool.close()
            said = scrub(str(exc), self.conninfo)
            raise StoreUnavailable(f"{self.url}: cannot connect ({said})") from exc
        self._pool = pool

    async def _disconnect(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _live(self) -> AsyncConnectionPool[Connection]:
        if self._pool is None:
            raise RuntimeError(f"{self.url} is not open: call open() first")
        return self._pool

    @asynccontextmanager
    async def _transaction(self, *, migration: bool = False) -> AsyncIterator[_PostgresTx]:
        async with self._live().connection() as connection, connection.transaction():
            tx = _PostgresTx(connection)
            if migration:
                await tx.execute("SELECT pg_advisory_xact_lock(?)", [MIGRATION_LOCK])
            yield tx

    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[_PostgresTx]:
        async with self._live().connection() as connection:
            yield _PostgresTx(connection)

    def _is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.errors.UniqueViolation)


__all__ = ["PostgresRunStore", "SqliteRunStore"]
