"""The Campaign Engine interface (what an engine implements) and the links that host it."""

from party_sync.engine.interface import (
    ENGINE_EVENT_TYPES,
    ActionRequest,
    Claim,
    Engine,
    EngineLink,
    EngineRejected,
    EventPublisher,
    JoinNotice,
    Narration,
    NarrationConflict,
    NarrationPiece,
    NarrationSender,
    RestateNotice,
    publish_all,
    restate_engine,
)
from party_sync.protocol.errors import (
    BackendUnavailable,
    IdempotencyKeyReused,
    InvalidEvent,
    VoteConflict,
)

__all__ = [
    "ENGINE_EVENT_TYPES",
    "ActionRequest",
    "BackendUnavailable",
    "Claim",
    "Engine",
    "EngineLink",
    "EngineRejected",
    "EventPublisher",
    "IdempotencyKeyReused",
    "InvalidEvent",
    "JoinNotice",
    "Narration",
    "NarrationConflict",
    "NarrationPiece",
    "NarrationSender",
    "RestateNotice",
    "VoteConflict",
    "publish_all",
    "restate_engine",
]
