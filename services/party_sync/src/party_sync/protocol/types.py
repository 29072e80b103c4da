"""Message types of protocol v1 and which way each one flows (docs/protocol.md)."""

from __future__ import annotations

from typing import Final

PROTOCOL_VERSION: Final = 1

HELLO: Final = "system.hello"
ERROR: Final = "system.error"
PING: Final = "system.ping"
PONG: Final = "system.pong"
PARTY_JOIN: Final = "party.join"
PARTY_LEAVE: Final = "party.leave"
PARTY_STATE: Final = "party.state"
ACTION_REQUEST: Final = "action.request"
ACTION_RESULT: Final = "action.result"
VOTE_STARTED: Final = "vote.started"
VOTE_UPDATE: Final = "vote.update"
VOTE_FINISHED: Final = "vote.finished"
VOTE_CAST: Final = "vote.cast"
COMBAT_UPDATE: Final = "combat.update"
SCENE_UPDATE: Final = "scene.update"
ACTION_ACCEPTED: Final = "action.accepted"
ACTION_FAILED: Final = "action.failed"
NARRATION_DELTA: Final = "narration.delta"

#: Server → client messages that are not part of a party's stream: no ``seq``.
SYSTEM_TYPES: Final = frozenset({HELLO, ERROR, PONG})

#: Server → client messages to every member of a party that are not part of its sequenced
#: stream either (no ``seq``, never replayed; ``system.hello`` restates what they tell).
TRANSIENT_TYPES: Final = frozenset({ACTION_ACCEPTED, ACTION_FAILED, NARRATION_DELTA})

#: Server → client events of a party's stream: each carries a per-party ``seq``.
EVENT_TYPES: Final = frozenset(
    {
        PARTY_JOIN,
        PARTY_LEAVE,
        PARTY_STATE,
        ACTION_RESULT,
        VOTE_STARTED,
        VOTE_UPDATE,
        VOTE_FINISHED,
        COMBAT_UPDATE,
        SCENE_UPDATE,
    }
)

#: What a client may send. ``party.leave`` flows both ways (a voluntary leave / the broadcast);
#: ``system.ping`` asks for a ``system.pong`` (a liveness check for clients that cannot see the
#: server's WebSocket pings).
CLIENT_TYPES: Final = frozenset({ACTION_REQUEST, PARTY_LEAVE, VOTE_CAST, PING})

#: Every type the protocol knows; anything else from a client is ``unknown_type``.
ALL_TYPES: Final = SYSTEM_TYPES | TRANSIENT_TYPES | EVENT_TYPES | CLIENT_TYPES

#: ``party.leave`` reasons.
LEAVE_LEFT: Final = "left"
LEAVE_DISCONNECTED: Final = "disconnected"
LEAVE_EXPIRED: Final = "expired"

#: The actor of party-level actions (a vote's result); no character may be called that.
PARTY_ACTOR: Final = "party"
#: Prefix of the action ids party_sync makes itself (a finished vote: ``vote:<vote_id>``);
#: clients may not use it, so these ids cannot be taken or forged (docs/security.md).
RESERVED_ACTION_PREFIX: Final = "vote:"
