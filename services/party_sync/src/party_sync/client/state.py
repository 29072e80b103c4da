"""The party as a client sees it, folded from ``system.hello`` and the party events (pure).

A non-resumed hello replaces everything (it is a full snapshot); a resumed one keeps the state
and the missed events that follow it are applied as usual (docs/protocol.md, "Resuming").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from party_sync.protocol import types as t


@dataclass(slots=True)
class Member:
    """A party member. ``display_name`` is text chosen by whoever registered the character: the
    server strips control, line-break and bidi characters from it, but it may hold anything
    else (``<b>`` included), so show it as text, never as markup or a format string."""

    character_id: str
    display_name: str
    online: bool


@dataclass(slots=True)
class PartyState:
    """Members, scene, combat, party state and the open vote, as of ``seq`` in ``epoch``.

    ``vote`` is the open vote in the shape of ``system.hello.vote`` (``vote_id``, ``question``,
    ``options``, ``deadline``, ``tallies``, ``voted``, ``eligible``, ``your_vote``), or None.
    ``last_vote`` is the payload of the latest ``vote.finished``.
    """

    party_id: str = ""
    campaign_run_id: str = ""
    you: str = ""
    epoch: str = ""
    seq: int = 0
    status: str = "active"
    run_status: str = "pending"
    members: dict[str, Member] = field(default_factory=dict)
    scene: Mapping[str, Any] | None = None
    combat: Mapping[str, Any] | None = None
    party_state: Mapping[str, Any] | None = None
    vote: dict[str, Any] | None = None
    last_vote: Mapping[str, Any] | None = None
    limits: Mapping[str, Any] = field(default_factory=dict)

    @property
    def scene_number(self) -> int:
        return int(self.scene["scene_number"]) if self.scene else 0

    @property
    def online(self) -> list[str]:
        """The character ids online now, in roster order."""
        return [m.character_id for m in self.members.values() if m.online]

    @classmethod
    def from_hello(cls, payload: Mapping[str, Any]) -> PartyState:
        """The full snapshot of a ``system.hello``."""
        vote = payload.get("vote")
        return cls(
            party_id=payload["party_id"],
            campaign_run_id=payload["campaign_run_id"],
            you=payload["you"],
            epoch=payload["epoch"],
            seq=payload["seq"],
            status=payload.get("status", "active"),
            run_status=payload.get("run_status", "pending"),
            members={
                m["character_id"]: Member(m["character_id"], m["display_name"], m["online"])
                for m in payload.get("members", ())
            },
            scene=payload.get("scene"),
            combat=payload.get("combat"),
            party_state=payload.get("party_state"),
            vote=dict(vote) if vote else None,
            limits=payload.get("limits") or {},
        )

    def apply(self, type_: str, seq: int, payload: Mapping[str, Any]) -> None:
        """Fold the next party event (the caller checked that ``seq`` is the next one)."""
        self.seq = seq
        if type_ == t.PARTY_JOIN:
            character = payload["character_id"]
            self.members[character] = Member(character, payload["display_name"], True)
        elif type_ == t.PARTY_LEAVE:
            character = payload["character_id"]
            if payload.get("reason") == t.LEAVE_LEFT:
                self.members.pop(character, None)
            elif character in self.members:
                self.members[character].online = False
        elif type_ == t.SCENE_UPDATE:
            self.scene = payload
        elif type_ == t.COMBAT_UPDATE:
            self.combat = payload
        elif type_ == t.PARTY_STATE:
            self.party_state = payload
            self.status = str(payload.get("status", self.status))
            self.run_status = str(payload.get("run_status", self.run_status))
        elif type_ == t.VOTE_STARTED:
            self._vote_started(payload)
        elif type_ == t.VOTE_UPDATE:
            if self.vote is not None and self.vote.get("vote_id") == payload["vote_id"]:
                for key in ("tallies", "voted", "eligible"):
                    self.vote[key] = payload[key]
        elif type_ == t.VOTE_FINISHED:
            self.last_vote = payload
            if self.vote is not None and self.vote.get("vote_id") == payload["vote_id"]:
                self.vote = None

    def _vote_started(self, payload: Mapping[str, Any]) -> None:
        self.vote = {
            "vote_id": payload["vote_id"],
            "question": payload["question"],
            "options": list(payload["options"]),
            "deadline": payload["deadline"],
            "tallies": {option["id"]: 0 for option in payload["options"]},
            "voted": 0,
            "eligible": len(self.online),
            "your_vote": None,
        }

    def voted(self, vote_id: str, option: str) -> None:
        """Our ballot was accepted: remember it as ``your_vote``."""
        if self.vote is not None and self.vote.get("vote_id") == vote_id:
            self.vote["your_vote"] = option
