"""The party as a client sees it, folded from ``system.hello`` and the party events (pure).

A non-resumed hello replaces everything (it is a full snapshot); a resumed one keeps the state
and the missed events that follow it are applied as usual (docs/protocol.md, "Resuming").

The party rules (who is a member and online, the latest scene, combat and party state, the open
vote's tallies) are the server's own ``core.projection.Projection``: the client starts one from the
hello and folds each event into it, so it cannot drift from what the server's next hello says.
What is the client's alone is kept here: who it is (``you``, ``party_id``, ``campaign_run_id``),
the resume point's ``epoch``, the statuses as last told, its own ballot (``your_vote``), the last
finished vote and the connection's limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from party_sync.core.projection import DEFAULT_RUN_STATUS, DEFAULT_STATUS, Member, Projection
from party_sync.protocol import types as t

__all__ = ["Member", "PartyState"]


@dataclass(slots=True)
class PartyState:
    """Members, scene, combat, party state and the open vote, as of ``seq`` in ``epoch``.

    ``vote`` is the open vote in the shape of ``system.hello.vote`` (``vote_id``, ``question``,
    ``options``, ``deadline``, ``tallies``, ``voted``, ``eligible``, ``your_vote``), or None.
    ``last_vote`` is the payload of the latest ``vote.finished``. ``members``, ``scene``,
    ``combat``, ``party_state``, ``vote`` and ``seq`` are read from ``projection``.
    """

    party_id: str = ""
    campaign_run_id: str = ""
    you: str = ""
    epoch: str = ""
    status: str = DEFAULT_STATUS
    run_status: str = DEFAULT_RUN_STATUS
    last_vote: Mapping[str, Any] | None = None
    limits: Mapping[str, Any] = field(default_factory=dict)
    projection: Projection = field(default_factory=Projection)

    @property
    def seq(self) -> int:
        return self.projection.seq

    @property
    def members(self) -> dict[str, Member]:
        """Every member by ``character_id``, in roster order (first join first)."""
        return self.projection.members

    @property
    def scene(self) -> Mapping[str, Any] | None:
        return self.projection.scene

    @property
    def combat(self) -> Mapping[str, Any] | None:
        return self.projection.combat

    @property
    def party_state(self) -> Mapping[str, Any] | None:
        return self.projection.party_state

    @property
    def vote(self) -> dict[str, Any] | None:
        return self.projection.vote

    @property
    def scene_number(self) -> int:
        return self.projection.scene_number

    @property
    def online(self) -> list[str]:
        """The character ids online now, in roster order."""
        return [m.character_id for m in self.projection.members.values() if m.online]

    @classmethod
    def from_hello(cls, payload: Mapping[str, Any]) -> PartyState:
        """The full snapshot of a ``system.hello``."""
        return cls(
            party_id=payload["party_id"],
            campaign_run_id=payload["campaign_run_id"],
            you=payload["you"],
            epoch=payload["epoch"],
            # as told: the hello's statuses are the server's projection's (docs/protocol.md)
            status=payload.get("status", DEFAULT_STATUS),
            run_status=payload.get("run_status", DEFAULT_RUN_STATUS),
            limits=payload.get("limits") or {},
            projection=Projection.from_hello(payload),
        )

    def apply(self, type_: str, seq: int, payload: Mapping[str, Any]) -> None:
        """Fold the next party event. ``seq`` must follow the last one applied (the stream's
        ``SeqTracker`` checked it); ``ValueError`` otherwise, and nothing changes."""
        self.projection.apply(type_, payload, seq)
        if type_ == t.PARTY_STATE:
            self.status = str(payload.get("status", self.status))
            self.run_status = str(payload.get("run_status", self.run_status))
        elif type_ == t.VOTE_STARTED and self.projection.vote is not None:
            self.projection.vote["your_vote"] = None  # the hello's shape: nobody here voted yet
        elif type_ == t.VOTE_FINISHED:
            self.last_vote = payload

    def voted(self, vote_id: str, option: str) -> None:
        """Our ballot was accepted: remember it as ``your_vote``."""
        vote = self.projection.vote
        if vote is not None and vote.get("vote_id") == vote_id:
            vote["your_vote"] = option
