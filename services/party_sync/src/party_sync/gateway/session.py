"""One client connection as the gateway sees it, independent of the WebSocket library."""

from __future__ import annotations

from typing import Protocol

from party_sync.core.binding import Binding
from party_sync.core.events import Event
from party_sync.core.limits import ConnectionLimits
from party_sync.core.sequence import SeqTracker, SeqVerdict
from party_sync.protocol.errors import CloseCode


class Sink(Protocol):
    """The transport's side of a connection."""

    def send(self, data: bytes) -> bool:
        """Queue one text frame without waiting; False if the send queue is full."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Close the connection (soon, without waiting)."""
        ...


class Session:
    """A connection bound to its token's party, run and character.

    Until ``go_live`` the session is *syncing*: live events are buffered while its
    ``system.hello`` (and any replay) is prepared, then delivered in seq order with duplicates
    dropped, so the stream a client sees starts exactly after the hello's ``seq``.
    """

    __slots__ = (
        "_buffer",
        "_closed",
        "_sink",
        "binding",
        "expires_at",
        "id",
        "limits",
        "tracker",
    )

    def __init__(
        self,
        session_id: str,
        binding: Binding,
        sink: Sink,
        limits: ConnectionLimits,
        expires_at: float,
    ) -> None:
        self.id = session_id
        self.binding = binding
        self.limits = limits
        self.expires_at = expires_at
        self.tracker = SeqTracker(0)
        self._sink = sink
        self._buffer: list[Event] | None = []
        self._closed = False

    @property
    def party_id(self) -> str:
        return self.binding.party_id

    @property
    def character_id(self) -> str:
        return self.binding.character_id

    @property
    def closed(self) -> bool:
        return self._closed

    def deliver(self, event: Event) -> bool:
        """Offer the next party event; True if it was sent now."""
        if self._closed:
            return False
        if self._buffer is not None:
            self._buffer.append(event)
            return False
        tracker = self.tracker
        if event.seq == tracker.last + 1:  # the common case, inline: SeqTracker.observe's DELIVER
            tracker.last = event.seq
            return self.send(event.data)
        if tracker.observe(event.seq) is SeqVerdict.GAP:  # else STALE: a duplicate, dropped
            # The backend repairs gaps before delivering; reaching here means it could not.
            self.close(CloseCode.RESYNC, "stream gap: resync")
        return False

    def go_live(self, last_seq: int) -> None:
        """The client holds everything up to ``last_seq``: deliver what was buffered after it."""
        self.tracker = SeqTracker(last_seq)
        buffered, self._buffer = self._buffer or [], None
        for event in buffered:
            self.deliver(event)

    def send(self, data: bytes) -> bool:
        if self._closed:
            return False
        if not self._sink.send(data):
            self.close(CloseCode.SLOW_CONSUMER, "send queue full: reconnect and resume")
            return False
        return True

    def close(self, code: int, reason: str) -> None:
        if not self._closed:
            self._closed = True
            self._sink.close(code, reason)
