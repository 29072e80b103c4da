"""A party's state as of a seq (``Snapshot``, what every backend answers) and the one builder of
``system.hello`` from it (``system.error`` is built in ``protocol.replies``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from party_sync.core.binding import Binding
from party_sync.protocol import codec
from party_sync.protocol import types as t


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A party's state as of ``seq`` in history ``epoch`` (the body of ``system.hello``)."""

    epoch: str
    seq: int
    members: list[dict[str, Any]]
    status: str
    run_status: str
    scene_number: int
    scene: Mapping[str, Any] | None
    combat: Mapping[str, Any] | None
    party_state: Mapping[str, Any] | None
    vote: Mapping[str, Any] | None
    ballots: Mapping[str, str] = field(default_factory=dict)  # the open vote's: character → option
    #: the actions in flight, oldest first ({action_id, character_id, action_type})
    actions_in_flight: list[dict[str, str]] = field(default_factory=list)
    #: the open narration streams, oldest first ({stream_id, index, text[, action_id]})
    narration: list[dict[str, Any]] = field(default_factory=list)


def hello(
    binding: Binding,
    snapshot: Snapshot,
    *,
    resumed_from: int | None,
    limits: dict[str, int],
    your_vote: str | None,
    now: float,
) -> dict[str, Any]:
    vote: dict[str, Any] | None = None
    if snapshot.vote is not None:
        # ``eligible`` as ``vote.update`` counts it (core/votes.py), now: the vote's record has
        # the count of its last ballot, and members may have come online since
        online = {m["character_id"] for m in snapshot.members if m.get("online")}
        eligible = len(snapshot.ballots.keys() | online)
        vote = {**snapshot.vote, "eligible": eligible, "your_vote": your_vote}
    payload: dict[str, Any] = {
        "protocol": t.PROTOCOL_VERSION,
        "party_id": binding.party_id,
        "campaign_run_id": binding.campaign_run_id,
        "you": binding.character_id,
        "status": snapshot.status,
        "run_status": snapshot.run_status,
        "members": snapshot.members,
        "scene_number": snapshot.scene_number,
        "seq": snapshot.seq,
        "epoch": snapshot.epoch,
        "resumed": resumed_from is not None,
        "scene": snapshot.scene,
        "combat": snapshot.combat,
        "party_state": snapshot.party_state,
        "vote": vote,
        "actions_in_flight": snapshot.actions_in_flight,
        "narration": snapshot.narration,
        "limits": limits,
    }
    if resumed_from is not None:
        payload["resumed_from"] = resumed_from
    return codec.envelope(t.HELLO, payload, ts=now)
