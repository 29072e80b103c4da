"""A party's event history and the all-or-nothing resume decision (after Centrifugo's recovery).

The history is identified by an ``epoch``: a new epoch means the history was lost (a restart of the
in-memory backend, a Redis flush), so a client's ``last_seq`` from another epoch is never trusted.
A resume replays *every* event after ``last_seq`` or none: never a partial replay.

The history is bounded three ways (``HistoryBounds``, docs/redis.md "History"): by count, by the
encoded bytes it holds and by the age of its events. Each append drops the oldest events while the
history holds more than ``size`` events, or its oldest event does not fit: the held events from it
to the newest make more than ``max_bytes`` bytes, or it is older than ``max_age`` seconds. The
newest event is always kept. Ages are counted in whole milliseconds (``stamp``), as ``_lib.lua``
``append()`` counts them, so both backends drop exactly the same events. Trimming happens on
append only: an idle party's history is not aged until its next event (its state expires with
``party_ttl``). A resume whose next seq was dropped, by any bound, gets a snapshot (``can_resume``).
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """What a reconnecting client says it has: the epoch and the last seq it processed."""

    epoch: str
    last_seq: int


def can_resume(
    point: ResumePoint, *, epoch: str, top_seq: int, oldest_seq: int, max_replay: int
) -> bool:
    """True if every event in ``(point.last_seq, top_seq]`` can be replayed.

    ``oldest_seq`` is the first seq the history still holds (``top_seq + 1`` when it holds none).
    """
    if point.epoch != epoch or point.last_seq < 0 or point.last_seq > top_seq:
        return False
    missed = top_seq - point.last_seq
    if missed == 0:
        return True
    return missed <= max_replay and point.last_seq + 1 >= oldest_seq


@dataclass(frozen=True, slots=True)
class HistoryBounds:
    """How much history a party keeps: ``size`` events at most; ``max_bytes`` encoded bytes and
    ``max_age`` seconds at most, 0 meaning no bound of that kind."""

    size: int
    max_bytes: int = 0
    max_age: float = 0.0
    #: ``max_age`` in whole milliseconds, as ages are counted (``stamp``)
    max_age_ms: int = field(init=False, repr=False, compare=False)
    #: True when entries need their time and size (a bytes or an age bound is set)
    stamped: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("history capacity must be at least 1")
        if self.max_bytes < 0 or not math.isfinite(self.max_age) or self.max_age < 0:
            raise ValueError("history bounds must be >= 0")
        max_age_ms = round(self.max_age * 1000)
        object.__setattr__(self, "max_age_ms", max_age_ms)  # frozen: derived once, here
        object.__setattr__(self, "stamped", self.max_bytes > 0 or max_age_ms > 0)

    def header(self) -> str:
        """The history argument of every Redis party script (``_lib.lua`` ARGV[4]): ``"300"``
        with no bytes or age bound (what earlier versions send), else ``"300:262144:1800000"``
        (size, bytes, age in ms)."""
        if not self.stamped:
            return str(self.size)
        return f"{self.size}:{self.max_bytes}:{self.max_age_ms}"


def stamp(now: float) -> int:
    """``now`` (Unix seconds) in whole milliseconds: the time an event is recorded with."""
    return math.floor(now * 1000)


class Held(Protocol):
    """The held entries as ``to_drop`` reads them: ``(stamp, encoded bytes)`` by index, oldest
    first (a list of pairs, or ``EventLog``'s view of its own columns)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> tuple[int, int]: ...


def to_drop(held: Held, held_bytes: int, bounds: HistoryBounds, now_ms: int) -> int:
    """How many of the oldest entries to drop, given ``held``: ``(stamp, encoded bytes)`` of
    every held entry, oldest first, the one just appended last, and ``held_bytes`` their sum.

    Drops while more than ``bounds.size`` entries are held, or the oldest held entry does not
    fit: the entries from it to the newest hold more than ``max_bytes`` bytes, or it is older than
    ``max_age`` (``now_ms - stamp > max_age_ms``). Never the newest entry. Looks only at the
    entries it drops and the first one it keeps.
    """
    count = len(held)
    drop = max(0, count - bounds.size)
    max_bytes, max_age_ms = bounds.max_bytes, bounds.max_age_ms
    if not (max_bytes or max_age_ms):
        return drop
    total = held_bytes
    for i in range(drop):
        total -= held[i][1]
    while drop < count - 1:
        at, size = held[drop]
        if not ((max_bytes and total > max_bytes) or (max_age_ms and now_ms - at > max_age_ms)):
            break
        total -= size
        drop += 1
    return drop


class _Columns:
    """``Held`` over an ``EventLog``'s events and stamps, made only for the entries read."""

    __slots__ = ("_events", "_stamps")

    def __init__(self, events: deque[bytes], stamps: array[int]) -> None:
        self._events = events
        self._stamps = stamps

    def __len__(self) -> int:
        return len(self._events)

    def __getitem__(self, index: int, /) -> tuple[int, int]:
        return (self._stamps[index] if self._stamps else 0), len(self._events[index])


class EventLog:
    """The encoded events of one party still held under its ``HistoryBounds``, by seq."""

    def __init__(self, epoch: str, capacity: int | HistoryBounds) -> None:
        bounds = capacity if isinstance(capacity, HistoryBounds) else HistoryBounds(capacity)
        self.epoch = epoch
        self.bounds = bounds
        self.top_seq = 0
        self._events: deque[bytes] = deque()
        # each held event's stamp, in step with _events, only with an age bound: 8 bytes an
        # event (memory per party is what these bounds are for); sizes are the events' lengths
        self._stamps: array[int] = array("q")
        self._aged = bounds.max_age_ms > 0
        self._held = _Columns(self._events, self._stamps)
        self._bytes = 0

    @property
    def oldest_seq(self) -> int:
        return self.top_seq - len(self._events) + 1

    @property
    def held_bytes(self) -> int:
        """Encoded bytes of the events held."""
        return self._bytes

    def append(self, data: bytes, now: float) -> int:
        """Record the next event at ``now``, drop what the bounds no longer allow (never this
        event); returns its seq."""
        self.top_seq += 1
        events = self._events
        events.append(data)
        self._bytes += len(data)
        if not self.bounds.stamped:  # the count alone (to_drop's first rule), without a call
            if len(events) > self.bounds.size:
                self._bytes -= len(events.popleft())
            return self.top_seq
        now_ms = stamp(now)
        if self._aged:
            self._stamps.append(now_ms)
        drop = to_drop(self._held, self._bytes, self.bounds, now_ms)
        if drop:
            for _ in range(drop):
                self._bytes -= len(self._events.popleft())
            if self._aged:
                del self._stamps[:drop]
        return self.top_seq

    def after(self, last_seq: int) -> list[bytes]:
        """The events with seq > ``last_seq`` that are still held, in order."""
        skip = max(0, last_seq - self.oldest_seq + 1)
        return list(self._events)[skip:]

    def replay(self, point: ResumePoint, max_replay: int) -> list[bytes] | None:
        """Every event after ``point.last_seq``, or None when resume is not possible."""
        if not can_resume(
            point,
            epoch=self.epoch,
            top_seq=self.top_seq,
            oldest_seq=self.oldest_seq,
            max_replay=max_replay,
        ):
            return None
        return self.after(point.last_seq)
