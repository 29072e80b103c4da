"""A party's event history and the all-or-nothing resume decision (after Centrifugo's recovery).

The history is identified by an ``epoch``: a new epoch means the history was lost (a restart of the
in-memory backend, a Redis flush), so a client's ``last_seq`` from another epoch is never trusted.
A resume replays *every* event after ``last_seq`` or none: never a partial replay.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


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


class EventLog:
    """The last ``capacity`` encoded events of one party, by seq."""

    def __init__(self, epoch: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("history capacity must be at least 1")
        self.epoch = epoch
        self.top_seq = 0
        self._events: deque[bytes] = deque(maxlen=capacity)

    @property
    def oldest_seq(self) -> int:
        return self.top_seq - len(self._events) + 1

    def append(self, data: bytes) -> int:
        """Record the next event; returns its seq."""
        self.top_seq += 1
        self._events.append(data)
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
