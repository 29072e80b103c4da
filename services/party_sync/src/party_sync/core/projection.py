"""The party projection: the state ``system.hello`` reports, folded from the event stream.

Every field is a function of the events up to ``seq`` (members from join/leave, the latest scene,
combat, party state and open vote), so a snapshot is exactly as fresh as its ``seq`` says and a
client that applies the events after it in order converges on the same state
(docs/protocol.md, "Resuming").

The rules are stated here once and used on both sides of the wire: the memory backend folds every
event it sequences into a ``Projection`` (``backends/lua/_lib.lua`` ``fold`` renders the same rules
in Redis, and the differential backend test keeps the two equal), and the Python client starts one
from a hello (``from_hello``) and folds the live events into it (``client/state.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from party_sync.protocol import types as t

DEFAULT_STATUS = "active"
DEFAULT_RUN_STATUS = "pending"


@dataclass(slots=True)
class Member:
    """A party member, online or not. ``display_name`` is text chosen by whoever registered the
    character: the server strips control, line-break and bidi characters from it, but it may hold
    anything else (``<b>`` included), so show it as text, never as markup or a format string."""

    character_id: str
    display_name: str
    online: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "character_id": self.character_id,
            "display_name": self.display_name,
            "online": self.online,
        }


@dataclass(slots=True)
class Projection:
    """One party's state as of ``seq``."""

    seq: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    scene: Mapping[str, Any] | None = None
    combat: Mapping[str, Any] | None = None
    party_state: Mapping[str, Any] | None = None
    vote: dict[str, Any] | None = None

    @classmethod
    def from_hello(cls, payload: Mapping[str, Any]) -> Projection:
        """The projection a ``system.hello`` payload reports: the inverse of what the hello is
        built from (``seq``, ``member_list()``, ``scene``, ``combat``, ``party_state``, ``vote``),
        so that folding the events after ``seq`` into it gives what the server's projection
        holds. The hello's ``vote`` carries the connection's ``your_vote`` too; it is kept."""
        vote = payload.get("vote")
        return cls(
            seq=int(payload["seq"]),
            members={
                m["character_id"]: Member(m["character_id"], m["display_name"], bool(m["online"]))
                for m in payload.get("members", ())
            },
            scene=payload.get("scene"),
            combat=payload.get("combat"),
            party_state=payload.get("party_state"),
            vote=dict(vote) if vote else None,
        )

    def online(self) -> list[str]:
        """The characters online now (a vote's eligible members, with those who voted)."""
        return [character_id for character_id, m in self.members.items() if m.online]

    def is_online(self, character_id: str) -> bool:
        member = self.members.get(character_id)
        return member is not None and member.online

    def apply(self, type_: str, payload: Mapping[str, Any], seq: int) -> None:
        """Fold one event into the state. ``seq`` must follow the last one applied."""
        if seq != self.seq + 1:
            raise ValueError(f"event seq {seq} does not follow {self.seq}")
        self.seq = seq
        if type_ == t.PARTY_JOIN:
            cid = payload["character_id"]
            self.members[cid] = Member(cid, payload["display_name"], online=True)
        elif type_ == t.PARTY_LEAVE:
            cid = payload["character_id"]
            if payload.get("reason") == t.LEAVE_LEFT:
                self.members.pop(cid, None)
            elif cid in self.members:
                self.members[cid].online = False
        elif type_ == t.SCENE_UPDATE:
            self.scene = payload
        elif type_ == t.COMBAT_UPDATE:
            self.combat = payload
        elif type_ == t.PARTY_STATE:
            self.party_state = payload
        elif type_ == t.VOTE_STARTED:
            self.vote = {
                "vote_id": payload["vote_id"],
                "question": payload["question"],
                "options": list(payload["options"]),
                "deadline": payload["deadline"],
                "tallies": {option["id"]: 0 for option in payload["options"]},
                "voted": 0,
                "eligible": sum(1 for m in self.members.values() if m.online),
            }
        elif type_ == t.VOTE_UPDATE:
            if self.vote is not None and self.vote["vote_id"] == payload["vote_id"]:
                self.vote["tallies"] = payload["tallies"]
                self.vote["voted"] = payload["voted"]
                self.vote["eligible"] = payload["eligible"]
        elif type_ == t.VOTE_FINISHED and (
            self.vote is not None and self.vote["vote_id"] == payload["vote_id"]
        ):
            self.vote = None

    @property
    def scene_number(self) -> int:
        if self.scene is not None:
            return int(self.scene["scene_number"])
        return 0

    @property
    def status(self) -> str:
        return str(self.party_state["status"]) if self.party_state else DEFAULT_STATUS

    @property
    def run_status(self) -> str:
        return str(self.party_state["run_status"]) if self.party_state else DEFAULT_RUN_STATUS

    def member_list(self) -> list[dict[str, Any]]:
        return [m.to_json() for m in self.members.values()]
