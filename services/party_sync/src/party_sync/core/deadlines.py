"""One table of everything a node waits for: ``(kind, key) → due time``.

The party core never reads a clock and never sleeps: it *arms* a deadline (a token's expiry, an
action's timeout, a presence grace period, a vote's close, the next presence tick) and is told
later that it is reached. The gateway runs one timer over this table: it sleeps until
``next_due()`` and hands ``pop_due(now)`` back to the core (docs/architecture.md).

A heap ordered by due time, with lazy cancellation: ``cancel`` and re-arming only change the
dict, and a heap entry that no longer matches the dict is dropped when it reaches the top.

Kinds armed with one fixed delay (an action's timeout, a presence grace period) come due in the
order they were armed: they are kept in a *lane*, a dict in insertion order, so arming one on the
hot path (every accepted action) is one dict insertion and its cancellation (the action's result)
one deletion, with no heap entry at all. A lane deadline armed earlier than its lane's last one
(an action looked at again sooner after a backend error, a clock stepped back) goes to the heap.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Hashable
from enum import StrEnum


class Kind(StrEnum):
    """What a deadline is for; the key says for whom.

    A ``StrEnum``: every arm and cancel hashes its ``(kind, key)``, and a plain ``Enum`` hashes
    in Python (``Enum.__hash__``), a ``str`` one in C (measured with bench/hotpath.py)."""

    TOKEN = "token"  # noqa: S105 - not a secret. Key: a connection id; its token expires: close it (4001)
    GRACE = "grace"  # key: a connection id; its character's presence grace is over: settle
    ACTION = "action"  # key: (party_id, action_id); look at an action without a final answer
    VOTE = "vote"  # key: (party_id, vote_id); the vote's deadline: close it
    APPLY = "apply"  # key: (party_id, vote_id); try again to hand a vote's decision over
    PRESENCE = "presence"  # key: None; the next presence refresh (and votes sweep)
    NARRATION = "narration"  # key: (party_id, stream_id); a narration stream may have gone idle


DeadlineKey = tuple[Kind, Hashable]

#: The kinds armed with one fixed delay, kept in arming order (the module docstring).
LANES: tuple[Kind, ...] = (Kind.ACTION, Kind.GRACE)


class Deadlines:
    """``(kind, key) → due``, the earliest found in O(log n); see the module docstring."""

    __slots__ = ("_due", "_heap", "_lanes", "_last", "_order", "_spilled")

    def __init__(self, lanes: tuple[Kind, ...] = LANES) -> None:
        self._due: dict[DeadlineKey, tuple[float, int]] = {}
        self._heap: list[tuple[float, int, Kind, Hashable]] = []
        self._order = itertools.count()  # ties in due time: first armed, first due
        self._lanes: dict[Kind, dict[Hashable, float]] = {kind: {} for kind in lanes}
        self._last: dict[Kind, float] = dict.fromkeys(lanes, -math.inf)  # each lane's latest due
        self._spilled: set[DeadlineKey] = set()  # lane kinds' deadlines that went to the heap

    def arm(self, kind: Kind, key: Hashable, due: float) -> bool:
        """Set (or move) the deadline of ``(kind, key)``; True if it is now the earliest one, so
        that a timer sleeping for a later one must wake up sooner."""
        lane = self._lanes.get(kind)
        if lane is not None:
            if self._spilled and (kind, key) in self._spilled:
                self._spilled.discard((kind, key))
                del self._due[(kind, key)]
            if lane.pop(key, None) is not None and not lane:
                self._last[kind] = -math.inf
            was_empty = not lane
            if due >= self._last[kind]:
                lane[key] = due
                self._last[kind] = due
                return was_empty and self._earliest_other(kind, due)
            self._spilled.add((kind, key))
        order = next(self._order)
        self._due[(kind, key)] = (due, order)
        heap = self._heap
        heapq.heappush(heap, (due, order, kind, key))
        if len(heap) > 64 and len(heap) > 4 * len(self._due):
            self._compact()
        return heap[0][1] == order and self._earliest_other(None, due)

    def cancel(self, kind: Kind, key: Hashable) -> bool:
        """Forget the deadline of ``(kind, key)``; False if there was none."""
        lane = self._lanes.get(kind)
        if lane is not None and lane.pop(key, None) is not None:
            if not lane:
                self._last[kind] = -math.inf
            return True
        if self._spilled:
            self._spilled.discard((kind, key))
        return self._due.pop((kind, key), None) is not None

    def due_at(self, kind: Kind, key: Hashable) -> float | None:
        lane = self._lanes.get(kind)
        if lane is not None and key in lane:
            return lane[key]
        entry = self._due.get((kind, key))
        return entry[0] if entry is not None else None

    def __contains__(self, item: DeadlineKey) -> bool:
        lane = self._lanes.get(item[0])
        return (lane is not None and item[1] in lane) or item in self._due

    def __len__(self) -> int:
        return len(self._due) + sum(len(lane) for lane in self._lanes.values())

    def next_due(self) -> float | None:
        """The earliest due time armed, or None."""
        heap, due = self._heap, self._due
        earliest: float | None = None
        while heap:
            at, order, kind, key = heap[0]
            if due.get((kind, key)) == (at, order):
                earliest = at
                break
            heapq.heappop(heap)  # cancelled or moved: dropped now that it is on top
        for lane in self._lanes.values():
            first = next(iter(lane.values()), None)
            if first is not None and (earliest is None or first < earliest):
                earliest = first
        return earliest

    def pop_due(self, now: float) -> list[DeadlineKey]:
        """Remove and return every deadline due at or before ``now``, earliest first."""
        heap, due = self._heap, self._due
        reached: list[tuple[float, DeadlineKey]] = []
        while heap and heap[0][0] <= now:
            at, order, kind, key = heapq.heappop(heap)
            if due.get((kind, key)) == (at, order):
                del due[(kind, key)]
                self._spilled.discard((kind, key))
                reached.append((at, (kind, key)))
        for kind, lane in self._lanes.items():
            keys = []
            for key, at in lane.items():
                if at > now:
                    break
                keys.append(key)
                reached.append((at, (kind, key)))
            for key in keys:
                del lane[key]
            if not lane:
                self._last[kind] = -math.inf
        reached.sort(key=_due_time)  # stable: in arming order within one due time
        return [entry for _, entry in reached]

    def _earliest_other(self, kind: Kind | None, due: float) -> bool:
        """No deadline outside lane ``kind`` (None: outside the heap) is earlier than ``due``."""
        if kind is not None:
            top = self.next_heap_due()
            if top is not None and top <= due:
                return False
        for other, lane in self._lanes.items():
            if other is not kind:
                first = next(iter(lane.values()), None)
                if first is not None and first <= due:
                    return False
        return True

    def next_heap_due(self) -> float | None:
        heap, due = self._heap, self._due
        while heap:
            at, order, kind, key = heap[0]
            if due.get((kind, key)) == (at, order):
                return at
            heapq.heappop(heap)
        return None

    def _compact(self) -> None:
        """Rebuild the heap from the live entries (many were cancelled before they were due)."""
        self._heap = [(at, order, kind, key) for (kind, key), (at, order) in self._due.items()]
        heapq.heapify(self._heap)


def _due_time(entry: tuple[float, DeadlineKey]) -> float:
    return entry[0]
