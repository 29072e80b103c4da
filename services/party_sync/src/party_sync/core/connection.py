"""One client connection as the party core sees it: what it is bound to, where its stream is.

No socket here: the gateway's ``Session`` extends this with the transport's sink. The core
decides what a connection receives; the gateway sends it.

Until ``go_live`` a connection is *syncing*: live events are buffered while its ``system.hello``
(and any replay) is prepared, then delivered in seq order with duplicates dropped, so the stream
a client sees starts exactly after the hello's ``seq`` (docs/protocol.md, "Resuming").
"""

from __future__ import annotations

from enum import Enum

from party_sync.core.binding import Binding
from party_sync.core.events import Event
from party_sync.core.limits import ConnectionLimits
from party_sync.core.sequence import SeqTracker, SeqVerdict


class Offer(Enum):
    """What to do with a party event offered to a connection."""

    SEND = "send"  # the next event: send it now
    HOLD = "hold"  # syncing, buffered (or the connection is closed): nothing now
    DROP = "drop"  # a duplicate (a replay overlap): nothing
    GAP = "gap"  # events are missing before it: the connection must resync


class Connection:
    """A connection bound to its token's party, run and character (``binding``)."""

    __slots__ = (
        "binding",
        "buffer",
        "character_id",
        "closed",
        "expires_at",
        "id",
        "limits",
        "party_id",
        "tracker",
    )

    def __init__(
        self, connection_id: str, binding: Binding, limits: ConnectionLimits, expires_at: float
    ) -> None:
        self.id = connection_id
        self.binding = binding
        # copied out of ``binding`` (never rebound): read on every action and fan-out, where a
        # property costs a Python call each time
        self.party_id = binding.party_id
        self.character_id = binding.character_id
        self.limits = limits
        self.expires_at = expires_at
        self.tracker = SeqTracker(0)
        self.buffer: list[Event] | None = []  # None once live
        self.closed = False

    def offer(self, event: Event) -> Offer:
        """Offer the next party event (``PartySessions`` inlines the common case)."""
        if self.closed:
            return Offer.HOLD
        if self.buffer is not None:
            self.buffer.append(event)
            return Offer.HOLD
        verdict = self.tracker.observe(event.seq)
        if verdict is SeqVerdict.DELIVER:
            return Offer.SEND
        # a gap: the backend repairs gaps before delivering; reaching here means it could not
        return Offer.GAP if verdict is SeqVerdict.GAP else Offer.DROP

    def go_live(self, last_seq: int) -> tuple[list[bytes], bool]:
        """The client holds everything up to ``last_seq``: the buffered frames to send after it,
        and whether a gap was met among them (then the connection must resync)."""
        self.tracker = SeqTracker(last_seq)
        buffered, self.buffer = self.buffer or [], None
        frames: list[bytes] = []
        for event in buffered:
            offer = self.offer(event)
            if offer is Offer.SEND:
                frames.append(event.data)
            elif offer is Offer.GAP:
                return frames, True
        return frames, False
