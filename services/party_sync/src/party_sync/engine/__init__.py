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

__all__ = [
    "ENGINE_EVENT_TYPES",
    "ActionRequest",
    "Claim",
    "Engine",
    "EngineLink",
    "EngineRejected",
    "EventPublisher",
    "JoinNotice",
    "Narration",
    "NarrationConflict",
    "NarrationPiece",
    "NarrationSender",
    "RestateNotice",
    "publish_all",
    "restate_engine",
]
