"""Idempotent actions (seed §7): one engine call per ``action_id``, one in flight per character.

Decisions for an incoming ``action.request``:

- ``ACCEPT``     — new action_id, the character is free: record it in flight, forward it;
- ``IN_FLIGHT``  — the same action_id is still being processed: refuse, never forward twice;
- ``DONE``       — the action finished: return the original ``action.result`` (same bytes, same
                   seq) to the sender only;
- ``BUSY``       — the character has another action in flight: refuse until its result arrives or
                   ``action_timeout`` passes (the seed's "simple mechanism against repeated sends").

A timed-out action keeps its in-flight record (the engine may still answer, and the action must
not run twice); only the character's lock is released.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple


class Decision(Enum):
    ACCEPT = "accept"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    BUSY = "busy"


class _Record(NamedTuple):
    """One action_id's record. A tuple of atoms on purpose: CPython's GC stops tracking such
    tuples, so the ledger (one record per action for ``record_ttl``) adds nothing to the cost of a
    full collection, which otherwise grew to ~200 ms of stopped event loop under load."""

    character_id: str
    started: float
    expires: float
    result: bytes | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    result: bytes | None = None  # the original action.result when DONE
    blocking_action_id: str | None = None  # the action in flight when BUSY


class ActionLedger:
    """Per-party records ``action_id → in flight | result`` and per-character locks."""

    def __init__(self, action_timeout: float, record_ttl: float, max_records: int = 10_000) -> None:
        self.action_timeout = action_timeout
        self.record_ttl = max(record_ttl, action_timeout)
        self.max_records = max_records
        self._records: dict[str, _Record] = {}
        self._locks: dict[str, tuple[str, float]] = {}  # character_id → (action_id, until)

    def begin(self, character_id: str, action_id: str, now: float) -> Verdict:
        self._collect(now)
        record = self._records.get(action_id)
        if record is not None:
            if record.result is not None:
                return Verdict(Decision.DONE, result=record.result)
            return Verdict(Decision.IN_FLIGHT)
        lock = self._locks.get(character_id)
        if lock is not None and lock[1] > now:
            return Verdict(Decision.BUSY, blocking_action_id=lock[0])
        self._records[action_id] = _Record(character_id, now, now + self.record_ttl)
        self._locks[character_id] = (action_id, now + self.action_timeout)
        return Verdict(Decision.ACCEPT)

    def complete(self, action_id: str, character_id: str, result: bytes, now: float) -> None:
        """The engine's ``action.result`` was published: keep it for repeats, free the character."""
        existing = self._records.get(action_id)
        if existing is not None and existing.result is not None:
            return  # a second result for one action: the first one stands, untouched
        record = self._records.pop(action_id, None)
        if record is None:
            record = _Record(character_id, now, 0.0)
        record = record._replace(result=result, expires=now + self.record_ttl)
        self._records[action_id] = record  # re-inserted: the dict stays ordered by expiry
        self._release(record.character_id, action_id)

    def abandon(self, action_id: str) -> None:
        """The action was refused or could not be delivered: forget it so a retry may run.

        A finished action is kept: it ran, so a resend must get its result, not a second run.
        """
        record = self._records.get(action_id)
        if record is not None and record.result is None:
            del self._records[action_id]
            self._release(record.character_id, action_id)

    def time_out(self, action_id: str, now: float) -> bool:
        """True (once) if the action is still in flight after ``action_timeout``: free its lock."""
        record = self._records.get(action_id)
        if record is None or record.result is not None:
            return False
        if now < record.started + self.action_timeout:
            return False
        lock = self._locks.get(record.character_id)
        if lock is None or lock[0] != action_id:
            return False
        del self._locks[record.character_id]
        return True

    def result_of(self, action_id: str) -> bytes | None:
        """The stored ``action.result`` of a finished action (what a repeat gets back)."""
        record = self._records.get(action_id)
        return record.result if record is not None else None

    def state_of(self, action_id: str) -> Decision | None:
        record = self._records.get(action_id)
        if record is None:
            return None
        return Decision.DONE if record.result is not None else Decision.IN_FLIGHT

    def __len__(self) -> int:
        return len(self._records)

    def _release(self, character_id: str, action_id: str) -> None:
        lock = self._locks.get(character_id)
        if lock is not None and lock[0] == action_id:
            del self._locks[character_id]

    def _collect(self, now: float) -> None:
        """Drop expired records (oldest first) and keep at most ``max_records``."""
        while self._records:
            action_id, record = next(iter(self._records.items()))
            if record.expires > now and len(self._records) <= self.max_records:
                break
            del self._records[action_id]
            self._release(record.character_id, action_id)
