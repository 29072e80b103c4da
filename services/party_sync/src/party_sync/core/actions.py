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


# An action in flight: (character_id, started, expires, order). Few at a time: a tuple is fine.
_Flight = tuple[str, float, float, int]
_CHARACTER: Final = 0
_STARTED: Final = 1
_EXPIRES: Final = 2
_ORDER: Final = 3


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    result: bytes | None = None  # the original action.result when DONE
    blocking_action_id: str | None = None  # the action in flight when BUSY


_ACCEPTED: Final = Verdict(Decision.ACCEPT)  # the verdicts without data, made once
_IN_FLIGHT: Final = Verdict(Decision.IN_FLIGHT)


class ActionLedger:
    """Per-party records ``action_id → in flight | result`` and per-character locks.

    Records are collected oldest first (by the time they began or, once finished, completed), when
    they expire or the ledger holds more than ``max_records``. The finished ones, one per action
    for ``record_ttl``, are the bulk: they live in three dicts of atoms (result bytes, expiry,
    order), which CPython's garbage collector never tracks, so a full collection does not walk
    them (measured: 71 ms per full collection with 2M records kept as tuples, 0.7 ms this way).
    """

    def __init__(self, action_timeout: float, record_ttl: float, max_records: int = 10_000) -> None:
        self.action_timeout = action_timeout
        self.record_ttl = max(record_ttl, action_timeout)
        self.max_records = max_records
        self._flights: dict[str, _Flight] = {}  # in begin order
        self._results: dict[str, bytes] = {}  # finished: in completion order, like the two below
        self._expires: dict[str, float] = {}
        self._orders: dict[str, int] = {}
        self._locks: dict[str, tuple[str, float]] = {}  # character_id → (action_id, until)
        self._order = 0

    def _next(self) -> int:
        self._order += 1
        return self._order

    def begin(self, character_id: str, action_id: str, now: float) -> Verdict:
        self._collect(now)
        result = self._results.get(action_id)
        if result is not None:
            return Verdict(Decision.DONE, result=result)
        if action_id in self._flights:
            return _IN_FLIGHT
        lock = self._locks.get(character_id)
        if lock is not None and lock[1] > now:
            return Verdict(Decision.BUSY, blocking_action_id=lock[0])
        self._flights[action_id] = (character_id, now, now + self.record_ttl, self._next())
        self._locks[character_id] = (action_id, now + self.action_timeout)
        return _ACCEPTED

    def complete(self, action_id: str, character_id: str, result: bytes, now: float) -> None:
        """The engine's ``action.result`` was published: keep it for repeats, free the character."""
        if action_id in self._results:
            return  # a second result for one action: the first one stands, untouched
        flight = self._flights.pop(action_id, None)
        owner = flight[_CHARACTER] if flight is not None else character_id
        self._results[action_id] = result
        self._expires[action_id] = now + self.record_ttl
        self._orders[action_id] = self._next()
        self._release(owner, action_id)

    def abandon(self, action_id: str) -> None:
        """The action was refused or could not be delivered: forget it so a retry may run.

        A finished action is kept: it ran, so a resend must get its result, not a second run.
        """
        flight = self._flights.pop(action_id, None)
        if flight is not None:
            self._release(flight[_CHARACTER], action_id)

    def time_out(self, action_id: str, now: float) -> bool:
        """True (once) if the action is still in flight after ``action_timeout``: free its lock."""
        flight = self._flights.get(action_id)
        if flight is None or now < flight[_STARTED] + self.action_timeout:
            return False
        lock = self._locks.get(flight[_CHARACTER])
        if lock is None or lock[0] != action_id:
            return False
        del self._locks[flight[_CHARACTER]]
        return True

    def result_of(self, action_id: str) -> bytes | None:
        """The stored ``action.result`` of a finished action (what a repeat gets back)."""
        return self._results.get(action_id)

    def state_of(self, action_id: str) -> Decision | None:
        if action_id in self._results:
            return Decision.DONE
        return Decision.IN_FLIGHT if action_id in self._flights else None

    def __len__(self) -> int:
        return len(self._flights) + len(self._results)

    def _release(self, character_id: str, action_id: str) -> None:
        lock = self._locks.get(character_id)
        if lock is not None and lock[0] == action_id:
            del self._locks[character_id]

    def _collect(self, now: float) -> None:
        """Drop expired records (oldest first) and keep at most ``max_records``."""
        flights, results = self._flights, self._results
        expires, orders = self._expires, self._orders
        while flights or results:
            done = next(iter(results)) if results else None
            flight = next(iter(flights.items())) if flights else None
            if done is not None and (flight is None or orders[done] < flight[1][_ORDER]):
                if expires[done] > now and len(self) <= self.max_records:
                    return
                del results[done], expires[done], orders[done]
            else:
                assert flight is not None
                action_id, record = flight
                if record[_EXPIRES] > now and len(self) <= self.max_records:
                    return
                del flights[action_id]
                self._release(record[_CHARACTER], action_id)
