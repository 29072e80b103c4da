"""Gap detection on a live stream: each event must be the previous seq + 1."""

from __future__ import annotations

from enum import Enum


class SeqVerdict(Enum):
    DELIVER = "deliver"  # the next event: deliver it
    STALE = "stale"  # already delivered (a replay overlap or a duplicate): drop it
    GAP = "gap"  # events are missing before this one: repair from history or resync


class SeqTracker:
    """Tracks the last delivered seq of one stream."""

    __slots__ = ("last",)

    def __init__(self, last: int) -> None:
        self.last = last

    def observe(self, seq: int) -> SeqVerdict:
        if seq <= self.last:
            return SeqVerdict.STALE
        if seq != self.last + 1:
            return SeqVerdict.GAP
        self.last = seq
        return SeqVerdict.DELIVER
