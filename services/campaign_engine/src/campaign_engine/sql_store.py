"""The SQL side of the stores: one schema, its migrations, and every query — for SQLite and
PostgreSQL alike.

Schema (version 1; the same tables, columns and constraints in both databases; JSON documents are
kept as TEXT in both, so a document round-trips byte for byte — on PostgreSQL cast to ``jsonb`` to
query inside one):

``ce_schema_version (version PK, applied_at)``
    one row per migration applied.
``ce_runs (run_id PK, party_id, version, status, scene_id, scene_number, state, updated_at)``
    a run's current state: ``state`` is ``RunState.to_dict()`` as JSON (scene, ``scene_number``,
    characters with HP and effects, the scene's flags, the fight, the applied ``action_id``\\ s and
    the outbox of events not yet published); the other columns copy what an operator looks for.
    ``version`` is the optimistic-concurrency token every commit checks and advances.
``ce_l1_decisions (run_id, seq, action_id, character_id, action_type, scene_id, scene_number,
outcome, trace_id, at, entry, recorded_at)``
    the L1 chronicle, append-only: PK ``(run_id, seq)``, **UNIQUE** ``(run_id, action_id)`` — the
    deduplication record the database enforces; ``entry`` is the whole ``Decision`` as JSON.
``ce_l2_scenes (run_id, scene_number, scene_id, outcome, trace_id, at, entry, recorded_at)``
    the L2 chronicle: PK ``(run_id, scene_number)``; ``entry`` is the ``SceneSummary`` as JSON.

Migrations: :data:`MIGRATIONS` lists each version's statements (``CREATE … IF NOT EXISTS``). On
open, a store applies — in one transaction, serialised between processes — those above the
highest version recorded, and refuses a database written by a newer engine.

A commit is one transaction: the run row is inserted (version 0 → 1; ``ON CONFLICT DO NOTHING``)
or updated ``WHERE version = <loaded version>``; no row touched means another writer was first
→ ``CommitConflict``. Then the L1 and L2 rows are inserted; a unique violation (an ``action_id``
recorded already) rolls everything back → ``CommitConflict`` too.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from campaign_engine.chronicle import Decision, SceneSummary
from campaign_engine.state import RunState
from campaign_engine.store import (
    CommitConflict,
    CommitOutcomeUnknown,
    StoreUnavailable,
    check_records,
)

MIGRATIONS: Final[tuple[tuple[int, tuple[str, ...]], ...]] = (
    (
        1,
        (
            """CREATE TABLE IF NOT EXISTS ce_runs (
                run_id TEXT PRIMARY KEY,
                party_id TEXT NOT NULL,
                version BIGINT NOT NULL,
                status TEXT NOT NULL,
                scene_id TEXT NOT NULL,
                scene_number INTEGER NOT NULL,
                state TEXT NOT NULL,
                updated_at TEXT NOT NULL
            )""",
            """CREATE TABLE IF NOT EXISTS ce_l1_decisions (
                run_id TEXT NOT NULL REFERENCES ce_runs (run_id),
                seq INTEGER NOT NULL,
                action_id TEXT NOT NULL,
                character_id TEXT NOT NULL,
                action_type TEXT NOT NULL,
                scene_id TEXT NOT NULL,
                scene_number INTEGER NOT NULL,
                outcome TEXT NOT NULL,
                trace_id TEXT NOT NULL,
                at TEXT,
                entry TEXT NOT NULL,
                recorded_at TEXT NOT NULL,
                PRIMARY KEY (run_id, seq),
                UNIQUE (run_id, action_id)
            )""",
            """CREATE INDEX IF NOT EXISTS ce_l1_decisions_by_scene
                ON ce_l1_decisions (run_id, scene_number)""",
            """CREATE TABLE IF NOT EXISTS ce_l2_scenes (
                run_id TEXT NOT NULL REFERENCES ce_runs (run_id),
                scene_number INTEGER NOT NULL,
                scene_id TEXT NOT NULL,
                outcome TEXT NOT NULL,
                trace_id TEXT NOT NULL,
                at TEXT,
                entry TEXT NOT NULL,
                recorded_at TEXT NOT NULL,
                PRIMARY KEY (run_id, scene_number)
            )""",
        ),
    ),
)
LATEST_VERSION: Final = MIGRATIONS[-1][0]


class Tx(Protocol):
    """One open transaction (or, for reads, a connection), with ``?`` placeholders."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; the number of rows it changed."""
        ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...


def dumps(document: Any) -> str:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def now() -> str:
    """The store's own clock, for ``recorded_at``/``updated_at`` (UTC, ISO 8601)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SqlRunStore(ABC):
    """``RunStore`` over SQL; a subclass supplies the driver: connections and transactions."""

    url: str

    def __init__(self) -> None:
        self._opened = False
        self._opening = asyncio.Lock()

    # --- what a driver implements ------------------------------------------------------------

    @abstractmethod
    async def _connect(self) -> None:
        """Open the connection(s); raise ``StoreUnavailable`` if the database cannot be reached."""

    @abstractmethod
    async def _disconnect(self) -> None: ...

    @abstractmethod
    def _transaction(self, *, migration: bool = False) -> AbstractAsyncContextManager[Tx]:
        """A write transaction (committed on exit, rolled back on error); ``migration``: also
        serialised against other processes migrating the same database."""

    @abstractmethod
    def _reader(self) -> AbstractAsyncContextManager[Tx]:
        """A connection for reads (each statement sees committed data)."""

    @abstractmethod
    def _is_unique_violation(self, exc: BaseException) -> bool: ...

    # --- RunStore ----------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._opening:  # one opener at a time; the others find it open
            if self._opened:
                return
            await self._connect()
            try:
                await self._migrate()
            except BaseException:
                await self._disconnect()
                raise
            self._opened = True

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            await self._disconnect()

    async def load(self, run_id: str) -> RunState | None:
        rows = await self._read("SELECT version, state FROM ce_runs WHERE run_id = ?", [run_id])
        if not rows:
            return None
        version, document = rows[0]
        state = RunState.from_dict(json.loads(document))
        state.version = int(version)
        return state

    async def commit(
        self,
        state: RunState,
        decisions: Sequence[Decision] = (),
        summaries: Sequence[SceneSummary] = (),
    ) -> None:
        check_records(state, decisions, summaries)
        stamp, document = now(), dumps(state.to_dict())
        committing = False  # every statement ran: what fails now is the COMMIT itself
        try:
            async with self._transaction() as tx:
                columns = [state.party_id, state.status, state.scene_id, state.scene_number]
                if state.version == 0:
                    changed = await tx.execute(
                        "INSERT INTO ce_runs (run_id, party_id, status, scene_id, scene_number,"
                        " state, updated_at, version) VALUES (?, ?, ?, ?, ?, ?, ?, 1)"
                        " ON CONFLICT (run_id) DO NOTHING",
                        [state.run_id, *columns, document, stamp],
                    )
                else:
                    changed = await tx.execute(
                        "UPDATE ce_runs SET party_id = ?, status = ?, scene_id = ?,"
                        " scene_number = ?, state = ?, updated_at = ?, version = version + 1"
                        " WHERE run_id = ? AND version = ?",
                        [*columns, document, stamp, state.run_id, state.version],
                    )
                if changed != 1:
                    raise CommitConflict(
                        f"run {state.run_id!r} is no longer at version {state.version}"
                    )
                for d in decisions:
                    await tx.execute(
                        "INSERT INTO ce_l1_decisions (run_id, seq, action_id, character_id,"
                        " action_type, scene_id, scene_number, outcome, trace_id, at, entry,"
                        " recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            *(d.run_id, d.seq, d.action_id, d.character_id, d.action_type),
                            *(d.scene_id, d.scene_number, d.outcome, d.trace_id, d.at),
                            *(dumps(d.to_dict()), stamp),
                        ],
                    )
                for s in summaries:
                    await tx.execute(
                        "INSERT INTO ce_l2_scenes (run_id, scene_number, scene_id, outcome,"
                        " trace_id, at, entry, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            *(s.run_id, s.scene_number, s.scene_id, s.outcome, s.trace_id, s.at),
                            *(dumps(s.to_dict()), stamp),
                        ],
                    )
                committing = True
        except Exception as exc:
            if self._is_unique_violation(exc):
                raise CommitConflict(
                    f"run {state.run_id!r}: a decision or scene summary is already recorded"
                ) from exc
            if committing:
                raise CommitOutcomeUnknown(
                    f"run {state.run_id!r}: the commit failed ({type(exc).__name__}); it may "
                    "have landed"
                ) from exc
            raise
        state.version += 1

    async def decisions(self, run_id: str, *, scene_number: int | None = None) -> list[Decision]:
        sql = "SELECT entry FROM ce_l1_decisions WHERE run_id = ?"
        params: list[Any] = [run_id]
        if scene_number is not None:
            sql += " AND scene_number = ?"
            params.append(scene_number)
        rows = await self._read(sql + " ORDER BY seq", params)
        return [Decision.from_dict(json.loads(entry)) for (entry,) in rows]

    async def decision(self, run_id: str, action_id: str) -> Decision | None:
        rows = await self._read(  # UNIQUE (run_id, action_id): its index answers
            "SELECT entry FROM ce_l1_decisions WHERE run_id = ? AND action_id = ?",
            [run_id, action_id],
        )
        return Decision.from_dict(json.loads(rows[0][0])) if rows else None

    async def summaries(self, run_id: str) -> list[SceneSummary]:
        rows = await self._read(
            "SELECT entry FROM ce_l2_scenes WHERE run_id = ? ORDER BY scene_number", [run_id]
        )
        return [SceneSummary.from_dict(json.loads(entry)) for (entry,) in rows]

    # --- internals ---------------------------------------------------------------------------

    async def _read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        async with self._reader() as tx:
            return await tx.fetchall(sql, params)

    async def _migrate(self) -> None:
        async with self._transaction(migration=True) as tx:
            await tx.execute(
                "CREATE TABLE IF NOT EXISTS ce_schema_version "
                "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            rows = await tx.fetchall("SELECT MAX(version) FROM ce_schema_version")
            current = int(rows[0][0] or 0)
            if current > LATEST_VERSION:
                raise StoreUnavailable(
                    f"{self.url}: schema version {current} is newer than this engine's "
                    f"({LATEST_VERSION}); upgrade campaign_engine"
                )
            for version, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    await tx.execute(statement)
                await tx.execute(
                    "INSERT INTO ce_schema_version (version, applied_at) VALUES (?, ?)",
                    [version, now()],
                )

    async def schema_version(self) -> int:
        """The highest migration applied (for diagnostics and tests)."""
        rows = await self._read("SELECT MAX(version) FROM ce_schema_version", [])
        return int(rows[0][0] or 0)


__all__ = ["LATEST_VERSION", "MIGRATIONS", "SqlRunStore", "Tx", "dumps", "now"]
