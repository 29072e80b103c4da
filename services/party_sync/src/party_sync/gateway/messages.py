"""Builders of the server's own messages: ``system.hello`` and ``system.error``."""

from __future__ import annotations

from typing import Any

from party_sync.backends.base import Binding, Snapshot
from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.errors import ErrorCode, ProtocolError


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
        vote = {**snapshot.vote, "your_vote": your_vote}
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
        "limits": limits,
    }
    if resumed_from is not None:
        payload["resumed_from"] = resumed_from
    return codec.envelope(t.HELLO, payload, ts=now)


def error(
    code: ErrorCode,
    message: str,
    *,
    now: float,
    trace_id: str | None = None,
    in_reply_type: str | None = None,
    action_id: str | None = None,
    vote_id: str | None = None,
) -> dict[str, Any]:
    in_reply_to: dict[str, Any] = {"trace_id": trace_id, "type": in_reply_type}
    if action_id is not None:
        in_reply_to["action_id"] = action_id
    if vote_id is not None:
        in_reply_to["vote_id"] = vote_id
    payload = {
        "code": code.value,
        "message": message,
        "retryable": ProtocolError(code, message).retryable,
        "in_reply_to": in_reply_to,
    }
    return codec.envelope(t.ERROR, payload, ts=now, trace_id=trace_id)


def from_protocol_error(exc: ProtocolError, *, now: float) -> dict[str, Any]:
    return error(
        exc.code,
        exc.message,
        now=now,
        trace_id=exc.trace_id,
        in_reply_type=exc.type,
        action_id=exc.action_id,
        vote_id=exc.vote_id,
    )
