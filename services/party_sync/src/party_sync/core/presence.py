"""Presence: which characters of a party have live connections, across tabs and nodes.

A character is *connected* while at least one of its connections is live. Each connection carries
an expiry (``now + ttl``) that its node refreshes with heartbeats; a node that dies stops
refreshing, so its connections expire and its players go offline within ``ttl`` (+ one sweep).

Whether a character is *online* in the party (what ``party.join``/``party.leave`` announce) lives in
the projection; the gateway compares the two: join when a connected character is not online, leave
after the grace period when an online character is no longer connected. That gap is what keeps a
network blip or a page reload from flapping leave/join.
"""

from __future__ import annotations


class Presence:
    """Live connections of one party: ``character_id → {connection_id: expires_at}``."""

    def __init__(self, ttl: float) -> None:
        if ttl <= 0:
            raise ValueError("presence ttl must be positive")
        self.ttl = ttl
        self._connections: dict[str, dict[str, float]] = {}

    def connect(self, character_id: str, connection_id: str, now: float) -> bool:
        """Register a connection; True if it is the character's only live one."""
        live = self._live(character_id, now)
        live[connection_id] = now + self.ttl
        self._connections[character_id] = live
        return len(live) == 1

    def disconnect(self, character_id: str, connection_id: str, now: float) -> bool:
        """Forget a connection; True if the character has no live connection left."""
        live = self._live(character_id, now)
        live.pop(connection_id, None)
        if not live:
            self._connections.pop(character_id, None)
            return True
        return False

    def refresh(self, character_id: str, connection_id: str, now: float) -> None:
        """Heartbeat: push a live connection's expiry forward (a forgotten one is re-added)."""
        self._connections.setdefault(character_id, {})[connection_id] = now + self.ttl

    def is_connected(self, character_id: str, now: float) -> bool:
        return bool(self._live(character_id, now))

    def connected(self, now: float) -> list[str]:
        return [c for c in list(self._connections) if self._live(c, now)]

    def expire(self, now: float) -> list[str]:
        """Drop expired connections; return the characters left with none (their node died)."""
        gone: list[str] = []
        for character_id in list(self._connections):
            if not self._live(character_id, now):
                self._connections.pop(character_id, None)
                gone.append(character_id)
        return gone

    def connection_count(self, now: float) -> int:
        return sum(len(self._live(c, now)) for c in list(self._connections))

    def _live(self, character_id: str, now: float) -> dict[str, float]:
        conns = self._connections.get(character_id)
        if not conns:
            return {}
        expired = [cid for cid, until in conns.items() if until <= now]
        for cid in expired:
            del conns[cid]
        return conns
