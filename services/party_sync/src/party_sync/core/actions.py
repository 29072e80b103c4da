"""Idempotent actions: one engine call per ``action_id``, one in flight per character.

docs/protocol.md states the rules for clients; this module decides them.

Decisions for an incoming ``action.request``:

- ``ACCEPT``     — new action_id, the character is free: record it in flight, forward it;
- ``IN_FLIGHT``  — the same action_id is still being processed: refuse, never forward twice;
- ``DONE``       — the action finished: return the original ``action.result`` (same bytes, same
                   seq) to the sender only;
- ``BUSY``       — the character has another action in flight: refuse until its result arrives or
                   ``action_timeout`` passes (a simple mechanism against repeated sends).
- ``TAKEN``      — another actor's action_id (in flight or finished): refuse without saying which,
                   and never answer one actor's id with another actor's record.

Every accepted action ends with exactly one *final answer*, kept for ``record_ttl`` so that a
resend of the same ``action_id`` gets it again: its ``action.result``, or a refusal that promises
the action was not and will never be applied (``refuse``). Between the two, an engine host
*claims* the action right before it starts it (``claim``), and the timeout sweep (``time_out``)
refuses it with ``action_timeout`` at its deadline only if nobody started it. Both are decided on
the one record, so an action is either started before its deadline or refused, never both: no
player is told "timed out" about an action that is then applied. A started action that outlives
its deadline only frees the character's lock; its answer comes from the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Final


class Decision(Enum):
    ACCEPT = "accept"
    IN_FLIGHT = "in_flight"
    DONE = "done"  # it has its final answer (``Verdict.result``: the result or the refusal)
    BUSY = "busy"
    TAKEN = "taken"  # another actor's action_id: nothing about it is told (docs/security.md)


class Claim(Enum):
    """What an engine host may do with an action it is about to hand to the engine."""

    START = "start"  # run it (first delivery, or a redelivery of one already started)
    EXPIRED = "expired"  # past its deadline and never started: now refused with action_timeout
    FINAL = "final"  # it already has its final answer (a result or a refusal): skip it


class Sweep(Enum):
    """What the timeout sweep found when an action's deadline passed."""

    TIMED_OUT = "timed_out"  # nobody started it: refused now (the refusal given is its answer)
    STARTED = "started"  # an engine started it: its answer will come from the engine
    NOT_DUE = "not_due"  # its deadline has not passed yet
    FINAL = "final"  # it has its final answer already (returned: the sender may have missed it)
    #: a refusal made while a connection of its character was live, which it reached (returned:
    #: the node's own sender may still be owed it, a connection opened since is not)
    TOLD = "told"
    GONE = "gone"  # no record (expired, or the state was lost): the outcome is unknown


# An action in flight: (character_id, began, expires, order, deadline, started by an engine).
_Flight = tuple[str, float, float, int, float, bool]
_CHARACTER: Final = 0
_STARTED: Final = 1
_EXPIRES: Final = 2
_ORDER: Final = 3
_DEADLINE: Final = 4
_ENGINE: Final = 5


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    result: bytes | None = None  # the original action.result when DONE
    blocking_action_id: str | None = None  # the action in flight when BUSY
    # IN_FLIGHT: the node whose in-process engine holds it, if the backend knows (a hint for a
    # take-over, not part of the decision: two backends' verdicts compare equal without it)
    claimer: str | None = field(default=None, compare=False)
    # IN_FLIGHT: when the action was accepted (the record's, on the ledger's clock), if the
    # backend says: a node that meets a resend of another node's action watches it by the age
    # of its record, not from the resend (fix-check probe: at the record's end it took the
    # record's absence for a lost state and told the player so)
    began: float | None = field(default=None, compare=False)


_ACCEPTED: Final = Verdict(Decision.ACCEPT)  # the verdicts without data, made once
_IN_FLIGHT: Final = Verdict(Decision.IN_FLIGHT)
_TAKEN: Final = Verdict(Decision.TAKEN)


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
        self._results: dict[
            str, bytes
        ] = {}  # final answers: in completion order, like the two below
        self._refused: dict[str, bool] = {}  # refused → told (``refuse``)
        self._owners: dict[str, str] = {}  # the actor of each final answer
        self._expires: dict[str, float] = {}
        self._orders: dict[str, int] = {}
        # character_id → (action_id, until, action_type): the action that holds the character
        self._locks: dict[str, tuple[str, float, str]] = {}
        # action_id → (character_id, until, action_type, expires) of the actions still in flight
        # without holding their character: started by an engine and past their deadline, or
        # untimed (a vote's choice); listed by ``in_flight`` until their final answer
        self._outliving: dict[str, tuple[str, float, str, float]] = {}
        self._order = 0

    def _next(self) -> int:
        self._order += 1
        return self._order

    def begin(
        self,
        character_id: str,
        action_id: str,
        now: float,
        timed: bool = True,
        action_type: str = "choice",
        claimed: bool = False,
        deadline_in: float | None = None,
    ) -> Verdict:
        """Record a new action in flight (deadline ``now + action_timeout``, or ``now +
        deadline_in``; the character's lock lapses after ``action_timeout`` either way), or say
        why not.

        ``claimed``: an accepted action is also claimed in the same step (``claim`` would say
        START at once): for an engine link that starts every action it is given at once
        (``EngineLink.claims_on_accept``), so its claim costs no second step.

        ``timed=False``: no deadline (it is never refused with ``action_timeout``); for the actions
        party_sync makes itself, which nobody waits for and which must not be lost (a vote's).
        The character's lock still lapses after ``action_timeout``. ``action_type`` is kept with
        the lock for ``in_flight``.
        """
        self._collect(now)
        result = self._results.get(action_id)
        if result is not None:
            if self._owners.get(action_id, character_id) != character_id:
                return _TAKEN
            return Verdict(Decision.DONE, result=result)
        flight = self._flights.get(action_id)
        if flight is not None:
            if flight[_CHARACTER] != character_id:
                return _TAKEN
            return Verdict(Decision.IN_FLIGHT, began=flight[1])
        lock = self._locks.get(character_id)
        if lock is not None and lock[1] > now:
            return Verdict(Decision.BUSY, blocking_action_id=lock[0])
        until = now + self.action_timeout
        deadline = until if deadline_in is None else now + deadline_in
        self._flights[action_id] = (
            character_id,
            now,
            now + self.record_ttl,
            self._next(),
            deadline if timed else math.inf,
            claimed,
        )
        self._locks[character_id] = (action_id, until, action_type)
        if not timed:
            self._outliving[action_id] = (character_id, until, action_type, now + self.record_ttl)
        return _ACCEPTED

    def in_flight(self, now: float) -> list[dict[str, str]]:
        """``system.hello``'s ``actions_in_flight``: the actions with no final answer that hold
        their character (deadline not passed), or that an engine started and works on past
        their deadline, or that have none (a vote's choice), oldest first (by the deadline they
        were given). An action outliving its deadline is listed until its final answer or
        ``record_ttl``."""
        found: dict[str, tuple[float, str, str, str]] = {}
        for character_id, (action_id, until, action_type) in self._locks.items():
            if until > now:
                found[action_id] = (until, action_id, character_id, action_type)
        for action_id, (character_id, until, action_type, expires) in self._outliving.items():
            if expires > now:
                found[action_id] = (until, action_id, character_id, action_type)
        return [
            {"action_id": action_id, "character_id": character_id, "action_type": action_type}
            for _, action_id, character_id, action_type in sorted(found.values())
        ]

    def character_of(self, action_id: str) -> str | None:
        """The actor of an action in flight, else None."""
        flight = self._flights.get(action_id)
        return flight[_CHARACTER] if flight is not None else None

    def deadline_of(self, action_id: str) -> float | None:
        flight = self._flights.get(action_id)
        return flight[_DEADLINE] if flight is not None else None

    def answered(self, action_id: str) -> bool:
        """Whether the action has its final answer (a look: nothing changes)."""
        return action_id in self._results

    def claim(
        self, action_id: str, now: float, refusal: bytes, deadline: float | None = None
    ) -> tuple[Claim, bytes | None]:
        """An engine host is about to start the action: START, or EXPIRED / FINAL (skip it).

        EXPIRED records ``refusal`` (an ``action_timeout`` error) as the final answer. An action
        without a record (its state was lost) may start unless ``deadline`` (the one it carries)
        has passed.
        """
        answer = self._results.get(action_id)
        if answer is not None:
            return Claim.FINAL, answer
        flight = self._flights.get(action_id)
        if flight is None:
            if deadline is not None and now > deadline:
                return Claim.EXPIRED, None
            return Claim.START, None
        if flight[_ENGINE]:
            return Claim.START, None  # a redelivery: the engine deduplicates by action_id
        if now > flight[_DEADLINE]:
            self.refuse(action_id, flight[_CHARACTER], refusal, now)
            return Claim.EXPIRED, None
        self._flights[action_id] = (*flight[:_ENGINE], True)
        return Claim.START, None

    def time_out(self, action_id: str, now: float, refusal: bytes) -> tuple[Sweep, bytes | None]:
        """The sweep at the action's deadline: refuse it if nobody started it (see ``Sweep``)."""
        answer = self._results.get(action_id)
        if answer is not None:
            return (Sweep.TOLD if self._refused.get(action_id) else Sweep.FINAL), answer
        flight = self._flights.get(action_id)
        if flight is None:
            return Sweep.GONE, None
        if now < flight[_DEADLINE]:
            return Sweep.NOT_DUE, None
        if flight[_ENGINE]:
            lock = self._locks.get(flight[_CHARACTER])
            if lock is not None and lock[0] == action_id:  # still listed in flight, unlocked
                self._outliving[action_id] = (
                    flight[_CHARACTER],
                    lock[1],
                    lock[2],
                    flight[_EXPIRES],  # with its record
                )
            self._release(flight[_CHARACTER], action_id)
            return Sweep.STARTED, None
        self.refuse(action_id, flight[_CHARACTER], refusal, now)
        return Sweep.TIMED_OUT, None

    def refuse(
        self, action_id: str, character_id: str, refusal: bytes, now: float, told: bool = False
    ) -> bool:
        """The action will never be applied: ``refusal`` is its final answer. False (nothing
        changes) if it already has one. ``told``: a connection of its character was live as it
        was made (the deadline's look then owes it to no connection opened since: ``TOLD``)."""
        if action_id in self._results:
            return False
        flight = self._flights.pop(action_id, None)
        owner = flight[_CHARACTER] if flight is not None else character_id
        self._results[action_id] = refusal
        self._refused[action_id] = told
        self._owners[action_id] = owner
        self._expires[action_id] = now + self.record_ttl
        self._orders[action_id] = self._next()
        self._release(owner, action_id)
        if self._outliving:
            self._outliving.pop(action_id, None)
        self._collect(now)  # (the newest record: never the one collected)
        return True

    def complete(self, action_id: str, character_id: str, result: bytes, now: float) -> bool:
        """The engine's ``action.result`` was published: keep it for repeats, free the character.

        True if it replaced a refusal: the engine applied an action it had been refused (it
        ignored the deadline it was given); the result is the truth, so it stands.
        """
        refused = action_id in self._refused
        if action_id in self._results and not refused:
            return False  # a second result for one action: the first one stands, untouched
        owner = self._owners.get(action_id, character_id)  # a refusal's actor stays the owner
        if refused:
            del self._refused[action_id], self._results[action_id]
            del self._expires[action_id], self._orders[action_id], self._owners[action_id]
        flight = self._flights.pop(action_id, None)
        if flight is not None:
            owner = flight[_CHARACTER]
        self._results[action_id] = result
        self._owners[action_id] = owner
        self._expires[action_id] = now + self.record_ttl
        self._orders[action_id] = self._next()
        self._release(owner, action_id)
        if self._outliving:
            self._outliving.pop(action_id, None)
        # Bounded here too, not only at the next begin: results published through the server
        # API for actions no player began (bounds probe: 100k records in a party where nobody
        # acted, 64 MiB, kept for ever).
        self._collect(now)
        return refused

    def actor_of(self, action_id: str) -> str | None:
        """The character of an action the ledger holds (in flight, refused or answered), else
        None."""
        flight = self._flights.get(action_id)
        if flight is not None:
            return flight[_CHARACTER]
        return self._owners.get(action_id)

    def result_of(self, action_id: str) -> bytes | None:
        """The stored ``action.result`` of a finished action (not a refusal)."""
        if action_id in self._refused:
            return None
        return self._results.get(action_id)

    def answer_of(self, action_id: str) -> bytes | None:
        """The final answer (result or refusal) a repeat gets back."""
        return self._results.get(action_id)

    def state_of(self, action_id: str) -> Decision | None:
        if action_id in self._results:
            return Decision.DONE
        return Decision.IN_FLIGHT if action_id in self._flights else None

    def __len__(self) -> int:
        return len(self._flights) + len(self._results)

    def _release(self, character_id: str, action_id: str) -> None:
        """The action no longer holds its character; with its final answer, or forgotten, it is
        no longer in flight either (callers that keep it listed record it in ``_outliving``)."""
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
                self._refused.pop(done, None)
                self._owners.pop(done, None)
            else:
                assert flight is not None
                action_id, record = flight
                if record[_EXPIRES] > now and len(self) <= self.max_records:
                    return
                del flights[action_id]
                self._release(record[_CHARACTER], action_id)
                self._outliving.pop(action_id, None)


def outlived_record(accepted_at: float | None, now: float, record_ttl: float) -> bool:
    """Whether an action claimed at ``now`` with no record left may have lost it to its age
    (``record_ttl`` after its acceptance at ``accepted_at``) rather than to lost state: its
    sender was then answered at its deadline, or has had a snapshot without it since, and
    nothing more is owed (as a node's sweep finds it: ``Sweep.GONE`` at that age). Unknown
    acceptance: False (the refusal is told)."""
    return accepted_at is not None and now >= accepted_at + record_ttl
