"""A ``PartyListener`` (backends/base.py) that keeps what a party's stream gives it."""

from __future__ import annotations

from collections.abc import Sequence

from party_sync.core.events import Event
from party_sync.core.transient import Transient


class Recorder:
    """Everything given, in order: the events, the direct messages, the transient ones, and how
    many times the clients were told to resync."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.directs: list[tuple[str, bytes]] = []
        self.transients: list[Transient] = []
        self.resyncs = 0

    @property
    def seqs(self) -> list[int]:
        return [event.seq for event in self.events]

    def on_event(self, event: Event) -> None:
        self.events.append(event)

    def on_direct(self, character_id: str, data: bytes) -> None:
        self.directs.append((character_id, data))

    def on_resync(self, epoch: str | None = None) -> None:
        self.resyncs += 1

    def on_transient(self, items: Sequence[Transient]) -> None:
        self.transients.extend(items)
