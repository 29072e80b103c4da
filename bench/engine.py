"""The benchmark's in-process engine: it answers every action at once.

``BenchEngine`` implements ``party_sync.engine.interface.Engine``: each accepted action is answered
with an ``action.result`` then a ``scene.update`` (scene number + 1), both carrying the action's
``trace_id`` (the load generator correlates on it). ``answer`` is the game logic alone, shared with
the python-socketio peer (``bench/peers/socketio_server.py``) so both run the same engine.

Run party_sync with it: ``party-sync serve --engine bench.engine:create_engine`` (with the
repository root on ``PYTHONPATH``).
"""

from __future__ import annotations

from typing import Any

from party_sync.engine.interface import ActionRequest, EventPublisher, JoinNotice, RestateNotice

#: A narration of realistic length (the scene text a player reads), ~150 bytes.
_NARRATION = (
    "Black water laps at a gate of rusted iron. Beyond it, the stair descends into the "
    "flooded crypt. Something scrapes against the bars."
)
_OPTIONS = (
    {"id": "open-gate", "label": "Force the rusted gate"},
    {"id": "search-walls", "label": "Search the walls for a hidden lever"},
    {"id": "turn-back", "label": "Turn back to Millbrook"},
)


class BenchLogic:
    """Per-party scene counters and the two payloads of an answer; no I/O."""

    __slots__ = ("_scenes",)

    def __init__(self) -> None:
        self._scenes: dict[str, int] = {}

    def answer(
        self, party_id: str, action_id: str, character_id: str, action_type: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(action.result payload, scene.update payload)`` for one action."""
        scene_number = self._scenes.get(party_id, 0) + 1
        self._scenes[party_id] = scene_number
        result = {
            "action_id": action_id,
            "character_id": character_id,
            "action_type": action_type,
            "outcome": "success",
            "state": {"hp": 18, "max_hp": 20, "effects": [], "scene_flags": {"gate_seen": True}},
            "roll": {"die": "d20", "value": 12, "modifier": 3, "total": 15, "difficulty": 14},
            "narration": "Aria's fingers find a loose stone. Behind it, a corroded lever.",
        }
        return result, _scene(scene_number)

    def current_scene(self, party_id: str) -> dict[str, Any] | None:
        """The party's current ``scene.update`` payload (None before its first action)."""
        scene_number = self._scenes.get(party_id)
        return None if scene_number is None else _scene(scene_number)


def _scene(scene_number: int) -> dict[str, Any]:
    return {
        "scene_number": scene_number,
        "scene_id": f"scene-{scene_number}",
        "title": "The Sunken Gate",
        "narration": _NARRATION,
        "options": [dict(option) for option in _OPTIONS],
        "kind": "story",
        "difficulty": 14,
    }


class BenchEngine:
    """party_sync's ``Engine`` over ``BenchLogic``: publishes the result, then the scene."""

    def __init__(self) -> None:
        self.logic = BenchLogic()
        self._publisher: EventPublisher | None = None

    async def start(self, publisher: EventPublisher) -> None:
        self._publisher = publisher

    async def handle_action(self, action: ActionRequest) -> None:
        publisher = self._publisher
        assert publisher is not None, "handle_action() before start()"
        result, scene = self.logic.answer(
            action.party_id, action.action_id, action.character_id, action.action_type
        )
        await publisher.publish(action.party_id, "action.result", result, trace_id=action.trace_id)
        await publisher.publish(action.party_id, "scene.update", scene, trace_id=action.trace_id)

    async def handle_join(self, notice: JoinNotice) -> None:
        return None

    async def handle_restate(self, notice: RestateNotice) -> None:
        """party_sync lost the party's state: publish its current scene again (idempotent)."""
        scene = self.logic.current_scene(notice.party_id)
        if scene is not None and self._publisher is not None:
            await self._publisher.publish(
                notice.party_id, "scene.update", scene, trace_id=notice.trace_id
            )

    async def close(self) -> None:
        return None


def create_engine() -> BenchEngine:
    """The factory named on the command line (``--engine bench.engine:create_engine``)."""
    return BenchEngine()
