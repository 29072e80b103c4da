"""One party's state in the embedded backend, read by ``MemoryBackend`` and ``MemoryAdmin``.

Its own module so that both can use it without importing each other: the backend changes a
party through the pure core (``core/``), the operators' view only reads it.
"""

from __future__ import annotations

import secrets

from party_sync.backends.base import BackendSettings, PartyListener
from party_sync.core import votes
from party_sync.core.actions import ActionLedger
from party_sync.core.history import EventLog, HistoryBounds
from party_sync.core.presence import Presence
from party_sync.core.projection import Projection
from party_sync.core.published import PublishedKeys
from party_sync.core.snapshot import Snapshot
from party_sync.core.transient import NarrationBook


class MemoryParty:
    """A party of one process: its history, projection, presence, ledger, vote and listeners."""

    __slots__ = (
        "last_active",
        "ledger",
        "listeners",
        "log",
        "narration",
        "party_id",
        "presence",
        "projection",
        "published",
        "run_id",
        "unapplied",
        "vote",
    )

    def __init__(self, party_id: str, settings: BackendSettings, now: float) -> None:
        self.party_id = party_id
        bounds = HistoryBounds(
            settings.history_size, settings.history_max_bytes, settings.history_max_age
        )
        self.log = EventLog(secrets.token_hex(8), bounds)
        self.projection = Projection()
        self.presence = Presence(settings.presence_ttl)
        self.ledger = ActionLedger(settings.action_timeout, settings.action_record_ttl)
        self.narration = NarrationBook(settings.narration_idle)
        # Idempotency-Key → the event first published under it (the events API)
        self.published = PublishedKeys(settings.action_record_ttl)
        self.listeners: list[PartyListener] = []
        self.last_active = now
        self.run_id: str | None = None
        self.vote: votes.Vote | None = None
        # vote id → (when it finished, its vote.finished body without seq) of every finished vote
        # whose action was not handed to the engine yet (a new vote leaves them alone); as Redis's
        # ``unapplied`` hash, forgotten only with the whole party
        self.unapplied: dict[str, tuple[float, bytes]] = {}

    def snapshot(self, now: float) -> Snapshot:
        """The party as ``system.hello`` tells it at ``now``."""
        p = self.projection
        return Snapshot(
            epoch=self.log.epoch,
            seq=p.seq,
            members=p.member_list(),
            status=p.status,
            run_status=p.run_status,
            scene_number=p.scene_number,
            scene=p.scene,
            combat=p.combat,
            party_state=p.party_state,
            vote=dict(p.vote) if p.vote is not None else None,
            ballots=dict(self.vote.ballots) if self.vote and not self.vote.finished else {},
            actions_in_flight=self.ledger.in_flight(now),
            narration=self.narration.open_streams(now),
        )
