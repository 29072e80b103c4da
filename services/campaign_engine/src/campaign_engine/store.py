"""Where run states and the chronicles live: the :class:`RunStore` interface, the in-memory store,
and :func:`open_store`, which picks a store from a database URL.

The engine needs little from storage: load a run, and *commit* a new run state together with the
L1 decisions and L2 scene summaries that produced it — atomically, so that a crash can never leave
an action marked as applied without its chronicle entry, or the reverse. Commits are optimistic:
a state remembers the stored ``version`` it was loaded from, and a commit succeeds only if the
stored run is still at that version (and none of its decisions' ``action_id`` is recorded yet);
otherwise nothing is written and :class:`CommitConflict` is raised, so two engine processes
sharing one database can never both apply an action, nor overwrite each other's moves.

Stores: :class:`InMemoryRunStore` (``memory://``: per process, for tests and throwaway servers),
``sql_drivers.SqliteRunStore`` (``sqlite:///PATH``, the default) and
``sql_drivers.PostgresRunStore`` (``postgresql://…``). The in-memory store keeps the same
plain-JSON documents the SQL stores write (never live objects), so a test against it also proves
the state survives serialisation, and no caller can change a stored run by mutating what it loaded.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any, Final, Protocol

from campaign_engine.chronicle import Decision, SceneSummary
from campaign_engine.state import RunState

#: The store ``create_engine`` uses when ``CAMPAIGN_ENGINE_DATABASE_URL`` is unset or empty: a
#: SQLite file in the working directory.
DEFAULT_DATABASE_URL: Final = "sqlite:///campaign_engine.sqlite3"


class CommitConflict(Exception):
    """A commit lost a race and wrote nothing: the run changed since the state was loaded (another
    engine instance committed first), or a decision's ``action_id`` is already recorded. Reload
    and try again: the reloaded state says whether the action is now applied."""


class CommitOutcomeUnknown(TimeoutError):
    """The database failed while committing (the connection lost with the ``COMMIT`` sent): the
    commit may have landed or not. Not a refusal ("raising means not applied", the engine
    contract): a ``TimeoutError``, which every party_sync host takes for an outcome it cannot
    know yet and hands the action to the engine again, whose reloaded run then says (engine
    DB probe: a commit whose reply was lost was told to its player as ``engine_error``, not
    applied, while the run had moved on)."""


class StoreUnavailable(Exception):
    """The database cannot be opened (a missing SQLite file, PostgreSQL unreachable, a bad URL)."""


class RunStore(Protocol):
    """Persistence of run states and the L1/L2 chronicles (see the module docstring)."""

    url: str  # where the data lives, printable (no password)

    async def open(self) -> None:
        """Connect and bring the schema up to date; idempotent. Raises ``StoreUnavailable``."""
        ...

    async def close(self) -> None:
        """Release connections (``open`` again to go on using the store)."""
        ...

    async def load(self, run_id: str) -> RunState | None:
        """The run's last committed state (an independent copy), or None if it never started."""
        ...

    async def commit(
        self,
        state: RunState,
        decisions: Sequence[Decision] = (),
        summaries: Sequence[SceneSummary] = (),
    ) -> None:
        """Store ``state``, append ``decisions`` (L1) and ``summaries`` (L2), atomically, if the
        stored run is still at ``state.version``; then advance ``state.version``. Raises
        ``CommitConflict`` (nothing written) otherwise, ``ValueError`` for records of another run.
        """
        ...

    async def decisions(self, run_id: str, *, scene_number: int | None = None) -> list[Decision]:
        """The run's L1 chronicle, oldest first (only one scene visit's, if ``scene_number``)."""
        ...

    async def decision(self, run_id: str, action_id: str) -> Decision | None:
        """The run's L1 decision of ``action_id`` (one at most: unique per run), or None."""
        ...

    async def summaries(self, run_id: str) -> list[SceneSummary]:
        """The run's L2 chronicle, by scene number."""
        ...


def check_records(
    state: RunState, decisions: Sequence[Decision], summaries: Sequence[SceneSummary]
) -> None:
    """Refuse (``ValueError``) to commit a chronicle record of another run with ``state``."""
    for run_id in [d.run_id for d in decisions] + [s.run_id for s in summaries]:
        if run_id != state.run_id:
            raise ValueError(f"a record of run {run_id!r} committed with another run")


class InMemoryRunStore:
    """The embedded store of tests and ``memory://``: per process, lost on exit."""

    url = "memory://"

    def __init__(self) -> None:
        self._runs: dict[str, tuple[int, dict[str, Any]]] = {}  # run_id -> (version, document)
        self._chronicle: dict[str, list[Decision]] = {}
        self._summaries: dict[str, list[SceneSummary]] = {}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def load(self, run_id: str) -> RunState | None:
        stored = self._runs.get(run_id)
        if stored is None:
            return None
        state = RunState.from_dict(copy.deepcopy(stored[1]))
        state.version = stored[0]
        return state

    async def commit(
        self,
        state: RunState,
        decisions: Sequence[Decision] = (),
        summaries: Sequence[SceneSummary] = (),
    ) -> None:
        check_records(state, decisions, summaries)
        version = self._runs.get(state.run_id, (0, {}))[0]
        if version != state.version:
            raise CommitConflict(
                f"run {state.run_id!r} is at version {version}, not {state.version}"
            )
        # Build everything first, then assign: nothing is half-committed if a step fails.
        chronicle = [*self._chronicle.get(state.run_id, []), *decisions]
        scenes = [*self._summaries.get(state.run_id, []), *summaries]
        for what, keys in (
            ("action_id", [d.action_id for d in chronicle]),
            ("seq", [d.seq for d in chronicle]),
            ("scene summary", [s.scene_number for s in scenes]),
        ):
            if len(set(keys)) != len(keys):
                raise CommitConflict(f"run {state.run_id!r}: a {what} is already recorded")
        self._runs[state.run_id] = (version + 1, copy.deepcopy(state.to_dict()))
        self._chronicle[state.run_id] = chronicle
        self._summaries[state.run_id] = sorted(scenes, key=lambda s: s.scene_number)
        state.version = version + 1

    async def decisions(self, run_id: str, *, scene_number: int | None = None) -> list[Decision]:
        return [
            d
            for d in self._chronicle.get(run_id, [])
            if scene_number is None or d.scene_number == scene_number
        ]

    async def decision(self, run_id: str, action_id: str) -> Decision | None:
        return next((d for d in self._chronicle.get(run_id, []) if d.action_id == action_id), None)

    async def summaries(self, run_id: str) -> list[SceneSummary]:
        return list(self._summaries.get(run_id, []))


def redact(url: str) -> str:
    """``url`` without its password, fit for logs and messages. The credentials are what stands
    between ``scheme://`` and the last ``@`` (a password with an unencoded ``/``, ``#`` or ``?``
    is not where ``urlsplit`` looks for it, and was shown whole)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, tail = rest.rpartition("@")
    if ":" not in credentials:
        return url  # a user name, no password
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{tail}"


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error about ``url``) with ``url``'s password, and every piece of it
    a parser may have split off (at ``/ # ? @ :``), replaced by ``***``."""
    _, sep, rest = url.partition("://")
    credentials = rest.rpartition("@")[0] if sep else ""
    password = credentials.split(":", 1)[1] if ":" in credentials else ""
    if not password:
        return text
    pieces = {password, *re.split(r"[/#?@:]", password)}
    for piece in sorted((p for p in pieces if len(p) >= 3), key=len, reverse=True):
        text = text.replace(piece, "***")
    return text


def open_store(url: str | None = None, *, create: bool = True) -> RunStore:
    """The store a database URL names (not connected yet: ``await store.open()``).

    ``memory://``; ``sqlite:///relative/path`` or ``sqlite:////absolute/path`` (a SQLite file,
    created if ``create``, else it must exist); ``postgresql://user@host:port/db`` (also
    ``postgres://``; any libpq URI). None or "" means :data:`DEFAULT_DATABASE_URL`.
    """
    url = (url or "").strip() or DEFAULT_DATABASE_URL
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "memory":
        return InMemoryRunStore()
    if scheme == "sqlite":
        if not url.lower().startswith("sqlite:///") or len(url) == len("sqlite:///"):
            raise ValueError(f"a SQLite URL is sqlite:///PATH (relative) or sqlite:////PATH: {url}")
        from campaign_engine.sql_drivers import SqliteRunStore

        return SqliteRunStore(url[len("sqlite:///") :], create=create)
    if scheme in ("postgresql", "postgres"):
        from campaign_engine.sql_drivers import PostgresRunStore

        return PostgresRunStore(url)
    raise ValueError(
        f"unsupported database URL {redact(url)!r}: expected sqlite:///PATH, "
        "postgresql://USER@HOST:PORT/DB or memory://"
    )


__all__ = [
    "DEFAULT_DATABASE_URL",
    "CommitConflict",
    "CommitOutcomeUnknown",
    "Decision",
    "InMemoryRunStore",
    "RunStore",
    "SceneSummary",
    "StoreUnavailable",
    "check_records",
    "open_store",
    "redact",
]
