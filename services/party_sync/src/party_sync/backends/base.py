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

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from party_sync.core.actions import Claim, Sweep, Verdict
from party_sync.core.binding import Binding
from party_sync.core.events import Event
from party_sync.core.history import ResumePoint
from party_sync.core.snapshot import Snapshot
from party_sync.core.transient import Outcome, Piece, Transient
from party_sync.core.votes import CastRefusal, VoteSpec
from party_sync.protocol import codec
from party_sync.protocol.errors import InvalidEvent

#: Bytes an event's envelope adds to what an API body of it holds (type, timestamp, trace_id,
#: seq: ``max_event_bytes``).
EVENT_OVERHEAD: Final = 4096


def checked_body(message: dict[str, Any], limit: int) -> bytes:
    """``message`` encoded (``codec.encode``), or ``InvalidEvent`` when it is larger than
    ``limit`` bytes (``BackendSettings.max_event_bytes``): raised before anything is recorded."""
    body = codec.encode(message)
    if len(body) > limit:
        raise InvalidEvent(
            f"{message['type']} is {len(body)} bytes encoded: an event may be at most {limit} "
            "(api_max_body_bytes and its envelope)"
        )
    return body


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """Limits shared by every backend."""

    #: history per party (core/history.py HistoryBounds): events, encoded bytes (0 = no bound)
    #: and seconds (0 = no bound); docs/redis.md "History" tells how the defaults were chosen
    history_size: int = 300
    history_max_bytes: int = 262_144
    history_max_age: float = 1800.0
    presence_ttl: float = 30.0
    action_timeout: float = 10.0
    action_record_ttl: float = 600.0
    idle_party_ttl: float = 3600.0
    #: a narration stream without a new piece for this long is closed (docs/protocol.md)
    narration_idle: float = 30.0
    #: the most encoded bytes of one event (``api_max_body_bytes`` and the envelope's own
    #: fields): an in-process engine's 5 MB ``party.state`` was taken, and every member's
    #: client, and every snapshot after it, carried it (engine probe)
    max_event_bytes: int = 262_144 + EVENT_OVERHEAD


class PartyListener(Protocol):
    """A node's receiver of one party's stream (the gateway's local hub of that party)."""

    def on_event(self, event: Event) -> None:
        """The next event of the party, in seq order."""

    def on_direct(self, character_id: str, data: bytes) -> None:
        """A non-sequenced message for one character's connections (e.g. an engine rejection)."""

    def on_resync(self, epoch: str | None = None) -> None:
        """Continuity was lost and could not be repaired: every client must resync, except,
        when the party's history moved to another ``epoch`` (Redis lost it), the clients whose
        snapshot was of that epoch already (opened in it before the stream saw it change)."""

    def on_transient(self, items: Sequence[Transient]) -> None:
        """Messages for every member outside the sequenced stream (``core.transient``), in the
        order they were made."""


class Subscription(Protocol):
    """A live delivery (``subscribe``, ``watch_closes``); ``close`` stops it."""

    async def close(self) -> None: ...


# -- the backend's interfaces -------------------------------------------------------------------
# ``Backend`` is the union of the small interfaces below; a caller that uses only one part of a
# backend types against that part (``BackendPublisher`` against the stream, the ledger and the
# votes; the admin API against ``Operated``), so what it depends on is visible in its signature.


class Lifecycle(Protocol):
    """Starting, stopping and readiness (``/readyz``)."""

    @property
    def name(self) -> str:
        """``memory`` or ``redis`` (logs, ``/readyz``)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        """True while the backend can serve (Redis reachable); drives ``/readyz``."""
        ...


class EventStream(Protocol):
    """Each party's sequenced event stream, its history and projection, and its delivery."""

    async def publish(
        self, party_id: str, message: dict[str, Any], now: float, *, key: str | None = None
    ) -> Event:
        """Sequence one event (``message`` has no seq), record it, fold it, deliver it.

        An ``action.result`` also completes its action in the ledger, in the same atomic step;
        a second ``action.result`` for an action that already has one is not published again: the
        first is returned (so an engine that re-sends after a redelivery cannot double it).
        ``key`` (the events API's ``Idempotency-Key``) does the same for any other event: the
        first event published under it in the party is recorded for ``action_record_ttl``, and a
        publish under that key in that time returns it and publishes nothing
        (``core/published.py``). An ``action.result`` is kept by its ``action_id`` instead.
        """
        ...

    async def publish_many(
        self,
        party_id: str,
        messages: Sequence[dict[str, Any]],
        now: float,
        *,
        key: str | None = None,
    ) -> list[Event]:
        """``publish`` for several events of one party, in one atomic step: they are sequenced
        consecutively in their order, as by as many ``publish`` calls with nothing between them,
        and delivered together (one message per node in Redis mode, so one write per member).
        Every event is checked (encoding, fold) before any is recorded. A second
        ``action.result`` of an action returns the first and the others are still published, as
        ``publish`` would, except in a late copy of a whole answer (every ``action.result`` of the
        call already has its result, ``core.published.replayed``): then nothing is published, the
        results return the first ones and the other events come back unpublished (seq 0).
        ``key`` (an ``Idempotency-Key``) does for the whole call what it does for ``publish``:
        a call under a key that already has one publishes nothing and returns each event with
        the seq the same event of that call got. Returns the events in the order given.
        """
        ...

    async def publish_run(self, campaign_run_id: str, message: dict[str, Any]) -> None:
        """Deliver a run-wide message on ``run:<campaign_run_id>`` (not sequenced, no history)."""
        ...

    async def subscribe(self, party_id: str, listener: PartyListener) -> Subscription:
        """Start delivering the party's events to ``listener``; returns once it is live."""
        ...

    async def send_direct(self, party_id: str, character_id: str, data: bytes) -> None:
        """Deliver ``data`` to every connection of one character, on whichever node."""
        ...

    async def run_parties(self, campaign_run_id: str) -> list[str]:
        """The parties known to play ``campaign_run_id`` (recorded when their members connect)."""
        ...

    async def snapshot(self, party_id: str, now: float | None = None) -> Snapshot:
        """The party's state (``now``, default the wall clock: which actions are in flight)."""
        ...

    async def replay(
        self, party_id: str, point: ResumePoint, max_replay: int
    ) -> Sequence[bytes] | None:
        """Every event after ``point.last_seq``, or None when that cannot be done completely."""
        ...


class PresenceStore(Protocol):
    """Who is connected, counted per character across tabs and nodes, with expiry."""

    async def connect(
        self, binding: Binding, connection_id: str, now: float, trace_id: str
    ) -> Event | None:
        """Register a connection; publish and return ``party.join`` if the character was offline."""
        ...

    async def disconnect(
        self, binding: Binding, connection_id: str, now: float, *, handover: bool = False
    ) -> bool:
        """Forget a connection; True if the character has no live connection left anywhere.
        ``handover``: this node is stopping (a drain), so its grace timer will not run: where
        other nodes share the presence, one of them settles the character at the grace's end."""
        ...

    async def hand_over_grace(self, binding: Binding, since: float) -> None:
        """This node stops (a drain) while the grace that began at ``since`` runs (its timer
        will not): where other nodes share the presence, one of them settles the character at
        the grace's end, unless a later disconnect began another grace meanwhile."""
        ...

    async def settle(
        self, binding: Binding, now: float, trace_id: str, since: float | None = None
    ) -> Event | None:
        """After the grace period: publish ``party.leave`` (disconnected) if still unconnected.

        ``since``: the ``now`` of the ``disconnect`` that began this grace. A grace is void
        once the character connected again after it began, even if that connection is gone
        too (a second blip): the later disconnect's own grace settles it, on whichever node
        (a reconnect within grace produces neither a leave nor a join). None: no such check."""
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


class VoteStore(Protocol):
    """Party votes: opened, cast, finished exactly once, handed to the engine exactly once."""

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
        """Publish ``vote.finished`` if the vote is due: at the deadline (``timeout``), or when
        every member still online has voted (``all_voted``: a member left since the last
        ballot); unless it already finished.

        Exactly one caller, on whichever node, gets the event; the others get None.
        """
        ...

    async def due_votes(self, now: float) -> list[tuple[str, str]]:
        """``(party_id, vote_id)`` of open votes past their deadline (a sweep's safety net)."""
        ...

    async def vote_run(self, party_id: str, vote_id: str) -> str | None:
        """The campaign run a (finished) vote was started for."""
        ...

    async def unapplied_votes(self, now: float, older_than: float) -> list[Event]:
        """``vote.finished`` of votes closed at least ``older_than`` ago whose action has not
        been handed to the engine yet (its node failed or died): any node hands it over."""
        ...

    async def mark_vote_applied(self, party_id: str, vote_id: str) -> None:
        """The vote's action was handed to the engine (or is done)."""
        ...


class ActionStore(Protocol):
    """The action ledger (``core.actions.ActionLedger``), shared: one final answer per action."""

    async def begin_action(
        self,
        party_id: str,
        character_id: str,
        action_id: str,
        now: float,
        timed: bool = True,
        action_type: str = "choice",
        trace_id: str = "",
        claimed: bool = False,
        deadline_in: float | None = None,
    ) -> Verdict:
        """``ActionLedger.begin`` (``deadline_in``: the deadline this many seconds from ``now``
        instead of ``action_timeout``, the character's lock still lapsing after that;
        ``timed=False``: no deadline, for party_sync's own actions;
        ``claimed``: an accepted action is claimed in the same atomic step, as ``claim_action``
        would, for a link that starts it at once).

        An accepted action is announced to every member (``action.accepted``, with
        ``action_type`` and ``trace_id``) in the same atomic step. Every refusal that becomes an
        action's final answer (``refuse_action``, an expired ``claim_action``, a timed-out
        ``time_out_action``) is announced as ``action.failed`` the same way.
        """
        ...

    async def claim_action(
        self,
        party_id: str,
        action_id: str,
        now: float,
        refusal: bytes,
        deadline: float | None,
        claimer: str | None = None,
    ) -> tuple[Claim, bytes | str | None]:
        """An engine host is about to start the action (``ActionLedger.claim``): may it?
        ``claimer``: the serving node whose own link delivers it (recorded, so that another
        node takes it over if that node dies: ``take_over``); None for an engine host elsewhere.
        ``(FINAL, its final answer)``, ``(START, None)``, ``(EXPIRED, the character whose action
        it is)`` when the refusal was recorded now (the record's: not one the caller names), or
        ``(EXPIRED, None)`` when there was no record (lost) and the carried deadline passed."""
        ...

    async def action_claimer(self, party_id: str, action_id: str) -> str | None:
        """The claimer an action's record names (``claim_action``'s: a serving node, '1' for an
        engine host elsewhere), or None (not claimed, or no record). A look: nothing changes.
        Only a backend shared by several nodes (Redis) records one."""
        ...

    async def action_answered(self, party_id: str, action_id: str) -> bool:
        """Whether the action has its final answer (a result or a refusal) in the ledger: a
        look that changes nothing (a claim would start it). False when its record is gone."""
        ...

    async def time_out_action(
        self, party_id: str, action_id: str, now: float, refusal: bytes
    ) -> tuple[Sweep, bytes | None]:
        """The deadline passed (``ActionLedger.time_out``): refused now unless it was started."""
        ...

    async def refuse_action(
        self, party_id: str, action_id: str, character_id: str, refusal: bytes, now: float
    ) -> str | None:
        """Make ``refusal`` the action's final answer: the character whose action it is (the
        record's; ``character_id`` only when there is no record), or None if it already has one
        (nothing changed). A caller from outside may name another character than the sender."""
        ...

    async def node_alive(self, node_id: str) -> bool:
        """Whether the serving node ``node_id`` is still there (its heartbeat); this node is."""
        ...

    async def take_over(self, party_id: str, action_id: str, gone: str, now: float) -> bool:
        """Claim for this node an action that the gone node ``gone`` claimed for its own link
        (its in-process engine, its HTTP link) and never answered; True if this node now holds
        it (and gives it to its link). Only a backend shared by several nodes (Redis) ever
        reports a claimer (``Verdict``)."""
        ...


class NarrationStore(Protocol):
    """Live narration (``core.transient.NarrationBook``): pieces in, sent to every member."""

    async def narrate(self, party_id: str, pieces: Sequence[Piece], now: float) -> list[Outcome]:
        """Apply the pieces in order (one atomic step) and send the taken ones to every member;
        the outcome of each, in order."""
        ...

    async def close_narration(
        self,
        party_id: str,
        stream_id: str,
        now: float,
        trace_id: str,
        action_id: str | None = None,
    ) -> float | str | None:
        """Close the stream if it has had no piece for ``narration_idle`` (its empty last piece
        goes to every member); when to look again if it had one since; None: nothing to do (it
        is closed); ``core.transient.GONE``: the backend does not know the stream any more (its
        keep time passed, say during a long stall), so whoever still shows it must close it.
        ``action_id``: the action the stream narrates, as the caller knows it: if the stream does
        narrate it and its result is out, the stream is closed now, idle or not (a narration is
        over with its action)."""
        ...


class Operated(Protocol):
    """A backend's operators' view (``transport/admin.py`` serves it)."""

    @property
    def admin(self) -> AdminView: ...


class EngineSide(EventStream, ActionStore, VoteStore, NarrationStore, Protocol):
    """The parts the engine's side uses (``BackendPublisher``): publishing events, claiming and
    refusing actions, opening votes, narrating. No presence, no lifecycle: it never owns the
    backend."""


class Backend(
    Lifecycle,
    EventStream,
    PresenceStore,
    VoteStore,
    ActionStore,
    NarrationStore,
    Operated,
    Protocol,
):
    """Shared party state and the event bus: every part. All times are Unix seconds passed in by
    the caller, read from ``clock()``. ``MemoryBackend`` and ``RedisBackend`` implement it."""

    def clock(self) -> float:
        """Now, as every process of the deployment reads it (Unix seconds): the machine's clock
        for the embedded backend, Redis's for the Redis backend (``RedisBackend.clock``)."""
        ...

    def clock_known(self) -> bool:
        """Whether ``clock()`` is the deployment's clock yet: False while a Redis backend has
        not measured Redis's clock since it started (Redis has not answered), when ``clock()``
        is only this machine's."""
        ...


# -- the operators' view (the admin API, transport/admin.py) ---------------------------------------
@dataclass(frozen=True, slots=True)
class PartySummary:
    """One line of ``GET /api/v1/parties``."""

    party_id: str
    campaign_run_id: str | None
    epoch: str
    seq: int
    members_total: int
    members_online: int
    vote: Mapping[str, Any] | None  # the open vote (as in ``system.hello``), or None
    actions_in_flight: int


@dataclass(frozen=True, slots=True)
class LiveConnection:
    """A live connection of a character: its id, its node (None if unknown), its expiry."""

    character_id: str
    connection_id: str
    node_id: str | None
    expires_at: float


def node_of(connection_id: str) -> str | None:
    """The node of a connection (the gateway's ids are ``<node_id>.<random>``), else None."""
    node, dot, _ = connection_id.partition(".")
    return node if dot and node else None


@dataclass(frozen=True, slots=True)
class ActionInFlight:
    """An accepted action holding its character's lock (no final answer, deadline not passed)."""

    character_id: str
    action_id: str
    deadline: float


@dataclass(frozen=True, slots=True)
class PartyDetail:
    """``GET /api/v1/parties/{party_id}``: the party's projection, presence and actions."""

    campaign_run_id: str | None
    snapshot: Snapshot
    connections: list[LiveConnection]
    actions: list[ActionInFlight]


@dataclass(frozen=True, slots=True)
class HeldEvents:
    """What the party's history holds after a seq: ``oldest_seq`` is the first seq it holds."""

    epoch: str
    last_seq: int
    oldest_seq: int
    events: list[bytes]


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A gateway node as its heartbeat describes it (``seen_at``: that heartbeat's time)."""

    node_id: str
    version: str
    connections: int
    started_at: float
    seen_at: float
    #: the settings every node should share (``shared_settings.NODES``; empty from a node of an
    #: earlier release)
    settings: Mapping[str, float] = field(default_factory=dict, compare=False)


#: ``(party_id, character_id, close code, reason)``: close that character's connections here.
CloseRequest = Callable[[str, str, int, str], object]


class AdminView(Protocol):
    """Read-mostly operations for operators, answering for the whole service (every node).

    Each backend carries one as ``backend.admin``; ``transport/admin.py`` serves it. Times are
    Unix seconds passed in by the caller.
    """

    async def parties(self, after: str | None, limit: int, now: float) -> list[PartySummary]:
        """Parties with state, by ``party_id``, those after ``after``; at most ``limit``."""
        ...

    async def party(self, party_id: str, now: float) -> PartyDetail | None:
        """One party's detail; None if it has no state."""
        ...

    async def events(self, party_id: str, after_seq: int, limit: int) -> HeldEvents | None:
        """Held events with seq > ``after_seq`` (at most ``limit``); None if no state."""
        ...

    async def heartbeat(self, node: NodeInfo, parties: Sequence[str], ttl: float) -> None:
        """Register this node (live for ``ttl`` seconds) and the parties it serves."""
        ...

    async def forget_node(self, node_id: str) -> None:
        """This node stops: take it off the list at once."""
        ...

    async def nodes(self, now: float) -> list[NodeInfo]:
        """The nodes whose heartbeat has not expired, by ``node_id``."""
        ...

    async def block(self, party_id: str, character_id: str, until: float, now: float) -> None:
        """Refuse the character's handshakes until ``until``."""
        ...

    async def blocked_until(self, party_id: str, character_id: str, now: float) -> float | None:
        """Until when the character's handshakes are refused; None if they are not."""
        ...

    async def request_close(self, party_id: str, character_id: str, code: int, reason: str) -> None:
        """Ask every node to close the character's connections (``watch_closes`` callbacks)."""
        ...

    async def watch_closes(self, callback: CloseRequest) -> Subscription:
        """Deliver close requests meant for this node's connections to ``callback``."""
        ...


def another_actor(payload: Mapping[str, Any], owner: str) -> str:
    """Why both backends refuse an ``action.result`` that names another character than its
    action's (an engine's slip: it reached every member and settled the action under the wrong
    name; engine developer probe). Nothing of it is recorded."""
    return (
        f"action.result names character {str(payload.get('character_id'))[:64]!r}, but action "
        f"{str(payload.get('action_id'))[:64]!r} is {owner[:64]!r}'s: a result carries its "
        "action's character_id"
    )


def warn_result_after_refusal(logger: logging.Logger, trace_id: str, action_id: str) -> None:
    """The one WARNING of both backends for an ``action.result`` published for an action that
    already had a final refusal (docs/engines.md, *A result after a refusal*)."""
    logger.warning(
        "the engine published a result for an action party_sync had already refused "
        "(action_timeout, action_rejected, engine_error or engine_unavailable, told to its "
        "player): it applied the action, so the result stands as the action's answer",
        extra={"trace_id": trace_id, "action_id": action_id},
    )
