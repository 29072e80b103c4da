"""Events the tests publish through the server API (``POST /api/v1/parties/{id}/events``)."""

from __future__ import annotations

from typing import Any

#: A valid ``scene.update`` envelope (no trace id: the server makes one).
SCENE: dict[str, Any] = {
    "type": "scene.update",
    "payload": {
        "scene_number": 1,
        "scene_id": "gate",
        "title": "The Gate",
        "narration": "Rain on iron.",
        "options": [{"id": "A", "label": "Knock"}],
        "kind": "story",
    },
}
