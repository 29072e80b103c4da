"""Which sequenced events open a party's new epoch, and the re-statements they call for.

A party's stream is numbered from seq 1 in each epoch; a backend gives seq 1 to exactly one event
of an epoch, atomically (one Lua script in Redis, plain code in memory). An epoch is opened when
the party's short-lived state is gone: new, expired, Redis restarted empty or flushed, or the
rollback fence deleted every ``meta`` after a failover (docs/redis.md). Whatever event gets seq 1,
the engine is asked to re-state the party (docs/engines.md, ``RestateNotice``), once:

- the process whose backend call got the seq-1 event asks (no other process learns of it, so no
  two nodes ask for the same opening);
- a ``party.join`` at seq 1 is left to the party core (``PartySessions.opened`` /
  ``refreshed``: its ``Announce`` asks before that member's join notice, in order); every other
  opening (an engine's event, a leave, a vote's event, a narration-less run event) is recorded
  here;
- the re-stated events come after the opening, in the same epoch (seq > 1): no new request, no
  loop;
- a seq-1 event seen again (an ``action.result`` sent twice returns the one that stands, with its
  seq) is not a second opening.

``Openings`` is the pure book of one process: what it has seen open, which campaign run each party
plays (a ``RestateNotice`` names it; after a fence the backend has lost it with ``meta``), and the
openings waiting for their request. No I/O and no clock: the adapter
(``party_sync.engine.restating.EpochWatch``) asks the backend for a run it does not know and
sends the requests.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from party_sync.core.events import Event
from party_sync.protocol import types as t

#: How many parties' runs (and last openings) one process remembers; the oldest are forgotten.
REMEMBERED = 10_000


def opens_epoch(event: Event) -> bool:
    """The event is the first of its party's epoch (a new or lost party state), sequenced by
    the call that returned it (one returned as standing, under a key already used, opened
    nothing now: its bytes differ from the first answer's, so ``Openings`` could not tell)."""
    return event.seq == 1 and not event.standing


@dataclass(frozen=True, slots=True)
class Opening:
    """A party whose new epoch this process opened: the engine is to re-state it.

    ``trace_id``: the opening event's (the request is logged and traced under it);
    ``campaign_run_id``: the run it plays, None while this process does not know it.
    """

    party_id: str
    trace_id: str
    campaign_run_id: str | None


V = TypeVar("V")


class _Bounded(OrderedDict[str, V]):
    """A dict that forgets its oldest entries past ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: str, value: V) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class Openings:
    """The epoch openings one process has seen and the re-statements it owes (module docstring).

    ``seen``: the events a backend call of this process returned; ``knows``: a party's run, from
    whatever names it (a member's binding, an action handed to the engine); ``take``: the
    openings due now (their run filled in where known), each taken once; ``parked``: openings
    whose run is unknown; a later ``knows`` makes them due again.
    """

    def __init__(self, remembered: int = REMEMBERED) -> None:
        self._runs: _Bounded[str] = _Bounded(remembered)
        self._last: _Bounded[bytes] = _Bounded(remembered)  # party → its last opening's bytes
        self._due: dict[str, str] = {}  # party → trace id of the opening, not requested yet
        self._parked: _Bounded[str] = _Bounded(remembered)  # party → trace id; run unknown
        #: party → when this process last wrote an event of it (``writes_lost``): a plain dict
        #: (one assignment per publish), halved to the newest when it outgrows ``remembered``
        self._wrote: dict[str, float] = {}
        self._remembered = remembered

    def knows(self, party_id: str, campaign_run_id: str) -> bool:
        """Remember the party's run; True if that makes a parked opening due."""
        if campaign_run_id:
            self._runs.put(party_id, campaign_run_id)
            trace_id = self._parked.pop(party_id, None)
            if trace_id is not None:
                self._due[party_id] = trace_id
                return True
        return False

    def run_of(self, party_id: str) -> str | None:
        return self._runs.get(party_id)

    def seen(self, events: Iterable[Event], campaign_run_id: str | None = None) -> bool:
        """Record the openings among ``events`` (one backend call's); True if one is due now.

        ``campaign_run_id``: the run of the events' party, if the caller knows it.
        """
        new = False
        for event in events:
            party_id = event.party_id
            opens = opens_epoch(event)
            if opens and event.type == t.PARTY_JOIN:
                # the core's Announce asks for this epoch: an older opening waiting is covered
                self._due.pop(party_id, None)
                self._parked.pop(party_id, None)
            if campaign_run_id:
                new = self.knows(party_id, campaign_run_id) or new
            if not opens or event.type == t.PARTY_JOIN:
                continue
            if self._last.get(party_id) == event.data:
                continue  # the same seq-1 event returned again: not a new epoch
            self._last.put(party_id, event.data)
            self._parked.pop(party_id, None)
            self._due[party_id] = event.trace_id
            new = True
        return new

    def wrote(self, party_id: str, at: float) -> None:
        """This process wrote an event of ``party_id`` at ``at``."""
        wrote = self._wrote
        wrote[party_id] = at
        if len(wrote) > self._remembered:
            newest = sorted(wrote.items(), key=lambda item: item[1])[len(wrote) // 2 :]
            self._wrote = dict(newest)

    def writes_lost(self, now: float, window: float, trace_id: str) -> int:
        """This process met a Redis server it never met (a failover, a restart): what it wrote
        in the last ``window`` seconds may have gone to the old master after the new one took
        over, and be lost with it (a re-statement the engine had just made, a scene). Every
        party it wrote to since is due a re-statement (the engine re-states the run's current
        state: at least once is safe); how many."""
        due = 0
        for party_id, at in list(self._wrote.items()):
            if at < now - window:
                del self._wrote[party_id]  # (older than any window: never due for this)
                continue
            self._parked.pop(party_id, None)
            self._due.setdefault(party_id, trace_id)
            due += 1
        return due

    def take(self) -> list[Opening]:
        """The openings due, each once, with the run this process knows (else None)."""
        due, self._due = self._due, {}
        return [Opening(p, trace, self._runs.get(p)) for p, trace in due.items()]

    def park(self, opening: Opening) -> None:
        """No run is known for the party: wait for ``knows`` to name it."""
        if opening.party_id not in self._due:
            self._parked.put(opening.party_id, opening.trace_id)

    def again(self, opening: Opening) -> None:
        """The request failed: due again (unless a newer opening replaced it)."""
        self._due.setdefault(opening.party_id, opening.trace_id)

    @property
    def pending(self) -> bool:
        """An opening is due (not yet taken)."""
        return bool(self._due)

    @property
    def parked(self) -> list[str]:
        """Parties whose opening waits for their run."""
        return list(self._parked)
