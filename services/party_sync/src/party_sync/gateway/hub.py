"""A party's backend subscription on this node, feeding its stream to the party core."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from party_sync.backends.base import Subscription
from party_sync.core.commands import Command
from party_sync.core.events import Event
from party_sync.core.session import PartySessions
from party_sync.core.transient import Transient
from party_sync.gateway.session import carry_local


class PartyHub:
    """The backend's listener of one party (``backends.base.PartyListener``).

    One hub (and so one backend subscription) per party per node, however many connections: it
    is made with the party's first local connection and dropped with its last. Each event is
    handed to the core, which says who gets it; the frames go out here, at once, encoded once.
    """

    __slots__ = ("_clock", "_core", "_later", "party_id", "subscription")

    def __init__(
        self,
        party_id: str,
        core: PartySessions,
        clock: Callable[[], float],
        later: Callable[[list[Command]], None],
    ) -> None:
        self.party_id = party_id
        self.subscription: Subscription | None = None
        self._core = core
        self._clock = clock
        self._later = later  # what is not a frame or a close (none today) runs as a task

    def on_event(self, event: Event) -> None:
        to, rest = self._core.event_received(event, self._clock())
        data = event.data
        for session in to:
            session.send(data)  # type: ignore[attr-defined]  # the gateway's Sessions
        if rest:
            rest = carry_local(rest)
            if rest:
                self._later(rest)

    def on_direct(self, character_id: str, data: bytes) -> None:
        carry_local(self._core.direct_received(self.party_id, character_id, data))

    def on_transient(self, items: Sequence[Transient]) -> None:
        carry_local(self._core.transient_received(self.party_id, items, self._clock()))

    def on_resync(self, epoch: str | None = None) -> None:
        carry_local(self._core.resync(self.party_id, epoch))
