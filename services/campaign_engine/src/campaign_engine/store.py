"""Where run states and the L1 chronicle live: a small interface and its in-memory implementation.

The engine needs exactly two things from storage: load a run, and *commit* a new run state together
with the decisions (L1 chronicle entries) that produced it — atomically, so that a crash can never
leave an action marked as applied without its chronicle entry, or the reverse. That is the whole
:class:`RunStore` protocol (plus reading the chronicle back). The SQLite/PostgreSQL store of a
later issue implements the same three methods with a transaction; the L2 scene summaries arrive
with it.

:class:`InMemoryRunStore` keeps runs as the plain-JSON documents ``RunState.to_dict`` produces
(never the live objects), so a test against it also proves the state survives serialisation, and
no caller can change a stored run by mutating what it loaded.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from campaign_engine.rules import Outcome
from campaign_engine.state import RunState


@dataclass(frozen=True, slots=True)
class Decision:
    """One L1 chronicle entry: who did what, the roll, the outcome and what it changed.

    ``seq`` numbers a run's decisions from 1; ``at`` is the server timestamp of the action (the
    engine never reads a clock of its own), ``trace_id`` ties the entry to the events and logs.
    """

    run_id: str
    seq: int
    action_id: str
    character_id: str
    action_type: str
    payload: Mapping[str, Any]
    scene_id: str
    scene_number: int
    outcome: Outcome
    roll: Mapping[str, Any] | None
    narration: str
    changes: Mapping[str, Any]
    trace_id: str
    at: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))


class RunStore(Protocol):
    """Persistence of run states and the L1 chronicle (see the module docstring)."""

    async def load(self, run_id: str) -> RunState | None:
        """The run's last committed state (an independent copy), or None if it never started."""
        ...

    async def commit(self, state: RunState, decisions: Sequence[Decision] = ()) -> None:
        """Store ``state`` and append ``decisions`` to the run's L1 chronicle, atomically."""
        ...

    async def decisions(self, run_id: str) -> list[Decision]:
        """The run's L1 chronicle, oldest first."""
        ...


class InMemoryRunStore:
    """The embedded default store: per process, lost on exit, fine for one engine instance."""

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, Any]] = {}
        self._chronicle: dict[str, list[Decision]] = {}

    async def load(self, run_id: str) -> RunState | None:
        document = self._runs.get(run_id)
        return RunState.from_dict(copy.deepcopy(document)) if document is not None else None

    async def commit(self, state: RunState, decisions: Sequence[Decision] = ()) -> None:
        for decision in decisions:
            if decision.run_id != state.run_id:
                raise ValueError(f"decision of run {decision.run_id!r} committed with another run")
        # Build everything first, then assign: nothing is half-committed if a step fails.
        document = copy.deepcopy(state.to_dict())
        chronicle = [*self._chronicle.get(state.run_id, []), *decisions]
        self._runs[state.run_id] = document
        self._chronicle[state.run_id] = chronicle

    async def decisions(self, run_id: str) -> list[Decision]:
        return list(self._chronicle.get(run_id, []))

    def run_ids(self) -> list[str]:
        """Every run this store knows (for diagnostics and tests)."""
        return list(self._runs)
