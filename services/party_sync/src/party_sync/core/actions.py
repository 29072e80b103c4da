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
from typing import Final


class Decision(Enum):
    ACCEPT = "accept"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    BUSY = "busy"


# One action_id's record: (character_id, started, expires, result or None). A plain tuple of
# atoms on purpose: CPython's GC stops tracking *exact* tuples whose items are untracked (not
# tuple subclasses such as NamedTuple), so the ledger, which keeps one record per action for
# ``record_ttl``, adds nothing to the cost of a full collection (measured: ~200 ms of stopped
# event loop after 200k actions with one tracked object per record).
_Record = tuple[str, float, float, bytes | None]
_CHARACTER: Final = 0
_STARTED: Final = 1
_EXPIRES: Final = 2
_RESULT: Final = 3


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    result: bytes | None = None  # the original action.result when DONE
    blocking_action_id: str | None = None  # the action in flight when BUSY


_ACCEPTED: Final = Verdict(Decision.ACCEPT)  # the verdicts without data, made once
_IN_FLIGHT: Final = Verdict(Decision.IN_FLIGHT)


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
            if record[_RESULT] is not None:
                return Verdict(Decision.DONE, result=record[_RESULT])
            return _IN_FLIGHT
        lock = self._locks.get(character_id)
        if lock is not None and lock[1] > now:
            return Verdict(Decision.BUSY, blocking_action_id=lock[0])
        self._records[action_id] = (character_id, now, now + self.record_ttl, None)
        self._locks[character_id] = (action_id, now + self.action_timeout)
        return _ACCEPTED

    def complete(self, action_id: str, character_id: str, result: bytes, now: float) -> None:
        """The engine's ``action.result`` was published: keep it for repeats, free the character."""
        existing = self._records.get(action_id)
        if existing is not None and existing[_RESULT] is not None:
            return  # a second result for one action: the first one stands, untouched
        record = self._records.pop(action_id, None)
        owner, started = (record[_CHARACTER], record[_STARTED]) if record else (character_id, now)
        self._records[action_id] = (owner, started, now + self.record_ttl, result)  # re-inserted:
        self._release(owner, action_id)  # the dict stays ordered by expiry

    def abandon(self, action_id: str) -> None:
        """The action was refused or could not be delivered: forget it so a retry may run.

        A finished action is kept: it ran, so a resend must get its result, not a second run.
        """
        record = self._records.get(action_id)
        if record is not None and record[_RESULT] is None:
            del self._records[action_id]
            self._release(record[_CHARACTER], action_id)

    def time_out(self, action_id: str, now: float) -> bool:
        """True (once) if the action is still in flight after ``action_timeout``: free its lock."""
        record = self._records.get(action_id)
        if record is None or record[_RESULT] is not None:
            return False
        if now < record[_STARTED] + self.action_timeout:
            return False
        lock = self._locks.get(record[_CHARACTER])
        if lock is None or lock[0] != action_id:
            return False
        del self._locks[record[_CHARACTER]]
        return True

    def result_of(self, action_id: str) -> bytes | None:
        """The stored ``action.result`` of a finished action (what a repeat gets back)."""
        record = self._records.get(action_id)
        return record[_RESULT] if record is not None else None

    def state_of(self, action_id: str) -> Decision | None:
        record = self._records.get(action_id)
        if record is None:
            return None
        return Decision.DONE if record[_RESULT] is not None else Decision.IN_FLIGHT

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
            if record[_EXPIRES] > now and len(self._records) <= self.max_records:
                break
            del self._records[action_id]
            self._release(record[_CHARACTER], action_id)
