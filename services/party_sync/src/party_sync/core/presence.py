"""Presence: which characters of a party have live connections, across tabs and nodes.

A character is *connected* while at least one of its connections is live. Each connection carries
an expiry (``now + ttl``) that its node refreshes with heartbeats; a node that dies stops
refreshing, so its connections expire and its players go offline within ``ttl`` (+ one sweep).

Whether a character is *online* in the party (what ``party.join``/``party.leave`` announce) lives in
the projection; the gateway compares the two: join when a connected character is not online, leave
after the grace period when an online character is no longer connected. That gap is what keeps a
network blip or a page reload from flapping leave/join.

After a stall (a Redis pause, a blocked event loop) a live connection's entry may have expired and
the sweep announced ``party.leave`` (expired) for a character whose connection never closed; its
node's next refresh re-adds the entry and announces ``party.join`` again (``announce_again``), so
presence tells the truth once the stall is over. A character who *left* the party on purpose keeps
a short tombstone (``ttl``) so that a refresh racing with its tabs closing cannot bring it back.
``RefreshSchedule`` is the gateway's side of the same problem: which connections a node refreshes
on each tick, and when it must refresh all of them before anyone sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass


def announce_again(*, online: bool, left: bool) -> bool:
    """Whether refreshing a live connection must publish ``party.join`` for its character.

    The connection is live (its node is refreshing it), so its character is connected: if the
    projection says it is not online (an expired leave during a stall, or a party state lost and
    started again), the projection is wrong and a join puts it right. Not after a voluntary leave
    (``left``): that character's tabs are being closed, and a refresh racing with the close must
    not make it a member again. Mirrored in ``backends/lua/refresh.lua``.
    """
    return not online and not left


class Presence:
    """Live connections of one party: ``character_id → {connection_id: expires_at}``."""

    def __init__(self, ttl: float) -> None:
        if ttl <= 0:
            raise ValueError("presence ttl must be positive")
        self.ttl = ttl
        self._connections: dict[str, dict[str, float]] = {}
        self._left: dict[str, float] = {}  # character → until when its voluntary leave holds
        # character → when its last connection closed (its grace began); a connection drops it
        self._gone: dict[str, float] = {}

    def connect(self, character_id: str, connection_id: str, now: float) -> bool:
        """Register a connection; True if it is the character's only live one."""
        live = self._live(character_id, now)
        live[connection_id] = now + self.ttl
        self._connections[character_id] = live
        self._left.pop(character_id, None)  # a new connection is a rejoin
        self._gone.pop(character_id, None)  # any grace begun before it is void
        return len(live) == 1

    def disconnect(self, character_id: str, connection_id: str, now: float) -> bool:
        """Forget a connection; True if the character has no live connection left."""
        live = self._live(character_id, now)
        live.pop(connection_id, None)
        if not live:
            self._connections.pop(character_id, None)
            self._gone[character_id] = now
            return True
        return False

    def grace_is_current(self, character_id: str, since: float) -> bool:
        """Whether the grace begun at ``since`` is the character's latest: no connection of it
        opened since (then closed again, starting a grace of its own). Mirrored in settle.lua
        (the ``gone`` deadline that ``disconnect`` wrote)."""
        gone = self._gone.get(character_id)
        if gone is not None and gone != since:
            return False
        self._gone.pop(character_id, None)  # settled now, one way or the other
        return True

    def refresh(self, character_id: str, connection_id: str, now: float) -> None:
        """Heartbeat: push a live connection's expiry forward (a forgotten one is re-added).

        Never backward: a heartbeat that was late (sent before a stall, carried out after a newer
        one) does not shorten the expiry (Redis: ``ZADD GT``).
        """
        conns = self._connections.setdefault(character_id, {})
        conns[connection_id] = max(conns.get(connection_id, 0.0), now + self.ttl)

    def mark_left(self, character_id: str, now: float) -> None:
        """The character left the party on purpose: no refresh announces it again for ``ttl``."""
        self._left[character_id] = now + self.ttl

    def has_left(self, character_id: str, now: float) -> bool:
        until = self._left.get(character_id)
        if until is not None and until <= now:
            del self._left[character_id]
            return False
        return until is not None

    def is_connected(self, character_id: str, now: float) -> bool:
        return bool(self._live(character_id, now))

    def connected(self, now: float) -> list[str]:
        return [c for c in list(self._connections) if self._live(c, now)]

    def expire(self, now: float) -> list[str]:
        """Drop expired connections; return the characters left with none (their node died)."""
        gone: list[str] = []
        for character_id in [c for c, until in self._left.items() if until <= now]:
            del self._left[character_id]
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


@dataclass(frozen=True, slots=True)
class PresenceTick:
    """One tick of a node's presence loop: what to refresh, and whether to sweep after it."""

    slice: int | None  # refresh the parties of this slice; None: every connection of the node
    sweep: bool  # run the expiry sweep (``Backend.expire``) after the refresh


class RefreshSchedule:
    """Which connections a node refreshes on each presence tick, and when it may sweep.

    Normally one slice of the parties per tick, every party once per period (``ttl / 3``), and a
    sweep every tick: a connection's entry has ``2/3 ttl`` of slack. A node that falls behind (a
    failed tick, or more than ``ttl / 6`` since the start of its last tick that succeeded: a Redis
    stall, a blocked event loop) may have entries at or past their expiry. Its next tick refreshes
    *all* its connections, and it holds its sweeps back for one period, so that every other node
    (which saw the same stall) has refreshed all of its own connections too before anyone's
    entries are declared expired. A node's entries are only ever swept while it is healthy, i.e.
    when it is dead (the reason sweeps exist).

    Pure: the gateway passes the clock in (``tick(now)``) and reports the outcome.
    """

    def __init__(self, ttl: float, slices: int) -> None:
        if ttl <= 0 or slices < 1:
            raise ValueError("presence ttl must be positive and slices at least 1")
        self.period = ttl / 3
        self.slices = slices
        self._late_after = ttl / 6
        self._step = 0
        self._behind = False
        self._last_ok: float | None = None  # the start of the last tick that succeeded
        self._started: float | None = None
        self._sweep_from = float("-inf")

    @property
    def interval(self) -> float:
        """Seconds between ticks."""
        return self.period / self.slices

    def tick(self, now: float) -> PresenceTick:
        self._step = (self._step + 1) % self.slices
        self._started = now
        late = self._last_ok is not None and now - self._last_ok > self._late_after
        if self._behind or late:
            self._behind = True  # until a full refresh succeeds
            self._sweep_from = now + self.period
            return PresenceTick(None, sweep=False)
        return PresenceTick(self._step, sweep=now >= self._sweep_from)

    def succeeded(self) -> None:
        """The tick's refresh (and sweep) went through."""
        self._behind = False
        self._last_ok = self._started

    def failed(self) -> None:
        """The tick failed (backend unavailable): refresh everything at the next one."""
        self._behind = True
