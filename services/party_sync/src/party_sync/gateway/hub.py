"""A node's local view of one party: its connections here, fed by one backend subscription."""

from __future__ import annotations

from collections.abc import Callable

from party_sync.backends.base import Subscription
from party_sync.core.events import Event
from party_sync.gateway.session import Session
from party_sync.protocol.errors import CloseCode


class PartyHub:
    """Fans each party event out to this node's sessions of the party; encoded once, sent N times.

    One hub (and so one backend subscription) per party per node, however many connections: it
    is created with the party's first local connection and dropped with its last.
    """

    __slots__ = ("_on_direct", "_on_event", "party_id", "sessions", "subscription")

    def __init__(
        self,
        party_id: str,
        on_event: Callable[[Event], None],
        on_direct: Callable[[str, str, bytes], None] | None = None,
    ) -> None:
        self.party_id = party_id
        self.sessions: set[Session] = set()
        self.subscription: Subscription | None = None
        self._on_event = on_event
        self._on_direct = on_direct

    def on_event(self, event: Event) -> None:
        for session in self.sessions:
            session.deliver(event)
        self._on_event(event)

    def on_direct(self, character_id: str, data: bytes) -> None:
        for session in self.sessions:
            if session.character_id == character_id:
                session.send(data)
        if self._on_direct is not None:
            self._on_direct(self.party_id, character_id, data)

    def on_resync(self) -> None:
        for session in list(self.sessions):
            session.close(CloseCode.RESYNC, "party stream lost continuity: resync")

    def sessions_of(self, character_id: str) -> list[Session]:
        return [s for s in self.sessions if s.character_id == character_id]
