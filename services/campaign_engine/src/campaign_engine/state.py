"""The state of one campaign run, and how it turns into plain JSON and back.

Everything the engine must remember between two actions of a run lives in :class:`RunState`: the
current scene and the ``scene_number`` counter, each character's HP and effects, the flags of the
current scene, the fight in progress, the ``action_id``s already applied (idempotency), the events
of the last action not yet published (the outbox), the last ``party.state`` actually published
and the party vote of the current scene, if any.

It round-trips through ``to_dict``/``from_dict`` (plain JSON types only) because every store keeps
it that way (``store.py``: in memory, SQLite, PostgreSQL). ``version`` is not part of that
document: it is the store's concurrency token (the stored version the state was loaded from, 0 for
a run never stored), checked and advanced by every commit. :func:`changes` describes what an action
changed, for the L1 chronicle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

RunStatus = Literal["pending", "in_progress", "finished"]
#: requested: in the outbox, not yet asked of party_sync; open: party_sync runs it (or said one was
#: open already); off: it could not be started, characters choose; done: the party's choice came.
VoteStatus = Literal["requested", "open", "off", "done"]

#: Refusals a run remembers (``RunState.refused``): minutes of a party's play, far more than a
#: resend after party_sync lost its records of actions needs, and a few kilobytes of state.
REFUSED_KEPT = 100

DOWNED = "downed"
DEFENDING = "defending"
INSPIRED = "inspired"


@dataclass(slots=True)
class CharacterState:
    character_id: str
    name: str
    hp: int
    max_hp: int
    effects: list[str] = field(default_factory=list)

    @property
    def downed(self) -> bool:
        return DOWNED in self.effects

    def add_effect(self, effect: str) -> None:
        if effect not in self.effects:
            self.effects.append(effect)

    def remove_effect(self, effect: str) -> bool:
        """Remove ``effect``; report whether it was there (e.g. to spend ``inspired``)."""
        if effect in self.effects:
            self.effects.remove(effect)
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return {
            "character_id": self.character_id,
            "name": self.name,
            "hp": self.hp,
            "max_hp": self.max_hp,
            "effects": list(self.effects),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharacterState:
        return cls(
            data["character_id"],
            data["name"],
            int(data["hp"]),
            int(data["max_hp"]),
            list(data["effects"]),
        )


@dataclass(slots=True)
class CombatState:
    """A fight in a combat scene; kept (``active=False``) after it ends so it can be reported."""

    scene_id: str
    enemies: dict[str, int]  # enemy id -> current hp (max hp is in the campaign)
    round: int = 1
    active: bool = True
    acted: list[str] = field(default_factory=list)  # who has acted in the current round
    participants: list[str] = field(default_factory=list)  # who has acted in this fight at all
    last: str = ""  # the latest exchange, for combat.update's narration

    def to_dict(self) -> dict[str, Any]:
        return {
            "scene_id": self.scene_id,
            "enemies": dict(self.enemies),
            "round": self.round,
            "active": self.active,
            "acted": list(self.acted),
            "participants": list(self.participants),
            "last": self.last,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CombatState:
        return cls(
            scene_id=data["scene_id"],
            enemies={str(k): int(v) for k, v in data["enemies"].items()},
            round=int(data["round"]),
            active=bool(data["active"]),
            acted=list(data["acted"]),
            participants=list(data["participants"]),
            last=str(data["last"]),
        )


@dataclass(slots=True)
class VoteState:
    """The party vote of a scene visit (``votes.py``): which, on what, and how far it got."""

    vote_id: str
    scene_number: int  # the visit it decides
    round: int  # 1, or more when the party's choice kept it in the scene
    options: list[str]  # the option ids on the ballot
    timeout_s: float
    status: VoteStatus = "requested"
    requested_at: str | None = None  # server time (RFC 3339) of the action that asked for it
    deadline: str | None = None  # when party_sync closes it (from vote.started)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vote_id": self.vote_id,
            "scene_number": self.scene_number,
            "round": self.round,
            "options": list(self.options),
            "timeout_s": self.timeout_s,
            "status": self.status,
            "requested_at": self.requested_at,
            "deadline": self.deadline,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VoteState:
        return cls(
            vote_id=str(data["vote_id"]),
            scene_number=int(data["scene_number"]),
            round=int(data["round"]),
            options=[str(o) for o in data["options"]],
            timeout_s=float(data["timeout_s"]),
            status=data["status"],
            requested_at=data.get("requested_at"),
            deadline=data.get("deadline"),
        )


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event of an applied action, waiting to be published (see ``engine.ReferenceEngine``)."""

    action_id: str
    type: str
    payload: dict[str, Any]
    trace_id: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "action_id": self.action_id,
            "type": self.type,
            "payload": self.payload,
            "trace_id": self.trace_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutboxEvent:
        return cls(data["action_id"], data["type"], data["payload"], data["trace_id"])


@dataclass(slots=True)
class RunState:
    run_id: str
    party_id: str
    status: RunStatus = "pending"
    scene_id: str = ""  # "" until the run starts
    scene_number: int = 0  # scenes entered so far; the first scene is 1
    characters: dict[str, CharacterState] = field(default_factory=dict)  # in joining order
    scene_flags: dict[str, bool] = field(default_factory=dict)  # flags of the current scene
    checked: list[str] = field(default_factory=list)  # who made a plain check in this scene
    combat: CombatState | None = None
    applied: set[str] = field(default_factory=set)  # action_ids already applied
    #: The last ``REFUSED_KEPT`` action_ids the game refused, with the refusal's text, oldest
    #: first: one handed again is refused the same way, not worked out again (engine.py).
    refused: dict[str, str] = field(default_factory=dict)
    decisions: int = 0  # L1 entries recorded (the next one gets decisions + 1)
    outbox: list[OutboxEvent] = field(default_factory=list)
    published_party_state: dict[str, Any] | None = None
    vote: VoteState | None = None  # the latest party vote the engine asked for
    #: Wall-clock time (Unix seconds) until which the process that committed the outbox is
    #: narrating it live: another process leaves the outbox to it until then (engine.py).
    narrating_until: float | None = None
    #: The action_ids whose unpublished events a process dropped (the last few, engine.py): only
    #: their results are published again by a process that finds its events gone.
    dropped: list[str] = field(default_factory=list)
    #: The process first in line for the run while another narrates (engine.py), and until when
    #: its place holds: the narrating process's next message waits behind it (fair turns).
    waiter: str | None = None
    waiter_until: float | None = None
    version: int = field(default=0, compare=False)  # the store's token, not part of the document

    @property
    def in_combat(self) -> bool:
        return self.combat is not None and self.combat.active

    def character(self, character_id: str) -> CharacterState:
        return self.characters[character_id]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "party_id": self.party_id,
            "status": self.status,
            "scene_id": self.scene_id,
            "scene_number": self.scene_number,
            "characters": [c.to_dict() for c in self.characters.values()],
            "scene_flags": dict(self.scene_flags),
            "checked": list(self.checked),
            "combat": self.combat.to_dict() if self.combat else None,
            "applied": sorted(self.applied),
            "refused": [[action_id, text] for action_id, text in self.refused.items()],
            "decisions": self.decisions,
            "outbox": [e.to_dict() for e in self.outbox],
            "published_party_state": self.published_party_state,
            "vote": self.vote.to_dict() if self.vote else None,
            "narrating_until": self.narrating_until,
            "dropped": list(self.dropped),
            "waiter": self.waiter,
            "waiter_until": self.waiter_until,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        characters = [CharacterState.from_dict(c) for c in data["characters"]]
        return cls(
            run_id=data["run_id"],
            party_id=data["party_id"],
            status=data["status"],
            scene_id=data["scene_id"],
            scene_number=int(data["scene_number"]),
            characters={c.character_id: c for c in characters},
            scene_flags={str(k): bool(v) for k, v in data["scene_flags"].items()},
            checked=list(data["checked"]),
            combat=CombatState.from_dict(data["combat"]) if data["combat"] else None,
            applied=set(data["applied"]),
            refused={str(a): str(t) for a, t in data.get("refused") or ()},  # (absent: older)
            decisions=int(data["decisions"]),
            outbox=[OutboxEvent.from_dict(e) for e in data["outbox"]],
            published_party_state=data["published_party_state"],
            vote=VoteState.from_dict(data["vote"]) if data.get("vote") else None,  # absent: older
            narrating_until=data.get("narrating_until"),  # (absent in older documents)
            dropped=list(data.get("dropped") or ()),
            waiter=data.get("waiter"),
            waiter_until=data.get("waiter_until"),
        )

    def remember_refusal(self, action_id: str, text: str) -> None:
        """Remember that the game refused ``action_id`` (the ``REFUSED_KEPT`` latest)."""
        self.refused.pop(action_id, None)
        self.refused[action_id] = text[:300]
        while len(self.refused) > REFUSED_KEPT:
            del self.refused[next(iter(self.refused))]

    def copy(self) -> RunState:
        """A deep, independent copy (an action works on one and is committed only if applied)."""
        twin = RunState.from_dict(self.to_dict())
        twin.version = self.version
        return twin


def changes(before: RunState, after: RunState) -> dict[str, Any]:
    """What an action changed, as the L1 chronicle records it (only the keys that changed)."""
    out: dict[str, Any] = {}
    if before.scene_id != after.scene_id:
        out["scene"] = {
            "from": before.scene_id,
            "to": after.scene_id,
            "scene_number": after.scene_number,
        }
    if before.status != after.status:
        out["run_status"] = {"from": before.status, "to": after.status}
    hp, effects = {}, {}
    for cid, now in after.characters.items():
        was = before.characters.get(cid)
        if was is None or was.hp != now.hp:
            hp[cid] = {"from": was.hp if was else None, "to": now.hp}
        if was is None or was.effects != now.effects:
            effects[cid] = {"from": was.effects if was else None, "to": list(now.effects)}
    if hp:
        out["hp"] = hp
    if effects:
        out["effects"] = effects
    if before.scene_flags != after.scene_flags:
        out["scene_flags"] = dict(after.scene_flags)
    if after.combat is not None and (before.combat is None or before.combat != after.combat):
        was_enemies = before.combat.enemies if before.combat else {}
        out["enemies"] = {
            e: {"from": was_enemies.get(e), "to": h}
            for e, h in after.combat.enemies.items()
            if was_enemies.get(e) != h
        }
        if not out["enemies"]:
            del out["enemies"]
    return out
