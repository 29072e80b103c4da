"""The backend interface: the party state every gateway node shares, and the party event bus.

A backend owns, per party: the sequenced event stream (seq, epoch, bounded history), the
projection behind ``system.hello``, presence, and the action ledger. Each operation that reads and
writes state is *atomic* in every backend (plain synchronous code in memory, one Lua script in
Redis), so two connections or two nodes can never both announce the same join or run one action
twice.

Events reach a node's listeners in seq order with no gap: a backend that receives from a lossy bus
(Redis pub/sub) repairs gaps from history before it calls ``on_event``, or calls ``on_resync``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from party_sync.core.actions import Claim, Sweep, Verdict
from party_sync.core.events import Event
from party_sync.core.history import ResumePoint
from party_sync.core.votes import CastRefusal, VoteSpec


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


@dataclass(frozen=True, slots=True)
class Binding:
    """What a connection is bound to (from its token)."""

    party_id: str
    campaign_run_id: str
    character_id: str
    display_name: str


class PartyListener(Protocol):
    """A node's receiver of one party's stream (the gateway's local hub of that party)."""

    def on_event(self, event: Event) -> None:
        """The next event of the party, in seq order."""

    def on_direct(self, character_id: str, data: bytes) -> None:
        """A non-sequenced message for one character's connections (e.g. an engine rejection)."""

    def on_resync(self) -> None:
        """Continuity was lost and could not be repaired: every client must resync."""


class Subscription(Protocol):
    async def close(self) -> None: ...


class Backend(Protocol):
    """Shared party state and the event bus. All times are Unix seconds passed in by the caller."""

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        """True while the backend can serve (Redis reachable); drives ``/readyz``."""
        ...

    # -- the stream -------------------------------------------------------------------------
    async def publish(self, party_id: str, message: dict[str, Any], now: float) -> Event:
        """Sequence one event (``message`` has no seq), record it, fold it, deliver it.

        An ``action.result`` also completes its action in the ledger, in the same atomic step;
        a second ``action.result`` for an action that already has one is not published again: the
        first is returned (so an engine that re-sends after a redelivery cannot double it).
        """
        ...

    async def publish_run(self, campaign_run_id: str, message: dict[str, Any]) -> None:
        """Deliver a run-wide message on ``run:<campaign_run_id>`` (not sequenced, no history)."""
        ...

    async def subscribe(self, party_id: str, listener: PartyListener) -> Subscription:
        """Start delivering the party's events to ``listener``; returns once it is live."""
        ...

    async def subscribe_run(
        self, campaign_run_id: str, callback: Callable[[bytes], None]
    ) -> Subscription:
        """Start delivering ``run:<campaign_run_id>`` messages to ``callback``."""
        ...

    async def send_direct(self, party_id: str, character_id: str, data: bytes) -> None:
        """Deliver ``data`` to every connection of one character, on whichever node."""
        ...

    async def run_parties(self, campaign_run_id: str) -> list[str]:
        """The parties known to play ``campaign_run_id`` (recorded when their members connect)."""
        ...

    async def snapshot(self, party_id: str) -> Snapshot: ...

    async def replay(
        self, party_id: str, point: ResumePoint, max_replay: int
    ) -> Sequence[bytes] | None:
        """Every event after ``point.last_seq``, or None when that cannot be done completely."""
        ...

    # -- presence ---------------------------------------------------------------------------
    async def connect(
        self, binding: Binding, connection_id: str, now: float, trace_id: str
    ) -> Event | None:
        """Register a connection; publish and return ``party.join`` if the character was offline."""
        ...

    async def disconnect(self, binding: Binding, connection_id: str, now: float) -> bool:
        """Forget a connection; True if the character has no live connection left anywhere."""
        ...

    async def settle(self, binding: Binding, now: float, trace_id: str) -> Event | None:
        """After the grace period: publish ``party.leave`` (disconnected) if still unconnected."""
        ...

    async def leave(self, binding: Binding, now: float, trace_id: str) -> Event | None:
        """A voluntary leave: publish ``party.leave`` (left) if the character is a member."""
        ...

    async def refresh(self, connections: Sequence[tuple[Binding, str]], now: float) -> list[Event]:
        """Heartbeat for this node's live connections (keeps their presence from expiring).

        A refreshed connection's character that is not online in the projection any more (the
        sweep announced it expired during a stall, or the party's state was lost and starts a new
        epoch) is announced again: returns the ``party.join`` events this published. Never for a
        character that left on purpose within the last ``presence_ttl`` (its tabs are closing).
        """
        ...

    async def expire(self, now: float) -> list[Event]:
        """Publish ``party.leave`` (expired) for characters whose connections all expired."""
        ...

    # -- votes ------------------------------------------------------------------------------
    async def party_run(self, party_id: str) -> str | None:
        """The campaign run a party plays (recorded when its members connect)."""
        ...

    async def start_vote(
        self, party_id: str, spec: VoteSpec, campaign_run_id: str, now: float, trace_id: str
    ) -> Event:
        """Open a vote and publish ``vote.started``; ``VoteConflict`` if one is already open."""
        ...

    async def cast_vote(
        self, party_id: str, character_id: str, vote_id: str, option: str, now: float, trace_id: str
    ) -> tuple[CastRefusal | None, list[Event]]:
        """Record a ballot: ``vote.update``, then ``vote.finished`` if every online member voted.

        A refusal changes nothing and publishes nothing.
        """
        ...

    async def finish_vote(self, party_id: str, vote_id: str, now: float) -> Event | None:
        """At the deadline: publish ``vote.finished`` (timeout) unless it already finished.

        Exactly one caller, on whichever node, gets the event; the others get None.
        """
        ...

    async def due_votes(self, now: float) -> list[tuple[str, str]]:
        """``(party_id, vote_id)`` of open votes past their deadline (a sweep's safety net)."""
        ...

    async def vote_run(self, party_id: str, vote_id: str) -> str | None:
        """The campaign run a (finished) vote was started for."""
        ...

    # -- actions ----------------------------------------------------------------------------
    async def begin_action(
        self, party_id: str, character_id: str, action_id: str, now: float
    ) -> Verdict: ...

    async def claim_action(
        self, party_id: str, action_id: str, now: float, refusal: bytes, deadline: float | None
    ) -> tuple[Claim, bytes | None]:
        """An engine host is about to start the action (``ActionLedger.claim``): may it?"""
        ...

    async def time_out_action(
        self, party_id: str, action_id: str, now: float, refusal: bytes
    ) -> tuple[Sweep, bytes | None]:
        """The deadline passed (``ActionLedger.time_out``): refused now unless it was started."""
        ...

    async def refuse_action(
        self, party_id: str, action_id: str, character_id: str, refusal: bytes, now: float
    ) -> bool:
        """Make ``refusal`` the action's final answer; False if it already has one."""
        ...
