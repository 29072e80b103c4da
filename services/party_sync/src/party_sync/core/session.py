"""A node's party sessions as a state machine: events in, commands out, no I/O and no clock.

``PartySessions`` decides what the gateway does for this node's connections: what to send to
whom, what to ask the backend and the engine, what to close, and when to look again. Its inputs
are the things that happen (a connection opened or lost, a client message, a backend or engine
answer, a party event, a deadline reached), each with ``now``; its outputs are the commands of
``core.commands``, which the gateway carries out, feeding every backend answer back in. Time is
one table (``core.deadlines``): token expiry, presence grace, action timeouts, vote deadlines, the
retries of a vote's decision and the periodic presence tick are all deadlines in it.

The recovery rules it carries (docs/architecture.md, docs/protocol.md):

- every accepted action is watched until its sender has a final answer; at its deadline the
  ledger says why not (``Sweep``): refused now (``action_timeout``), answered already (sent
  again), started by an engine (looked at again one timeout later), or lost with the party's
  state (a non-final ``backend_unavailable``); a backend that cannot be reached is asked again;
- a character's last connection starts a grace period before its leave (``settle``);
- the presence tick refreshes this node's connections (a slice at a time) and announces the
  joins a refresh had to publish again; a join at seq 1 opened a new epoch, and the engine is
  asked to re-state the party;
- a vote this node closed is handed to the engine, retried through backend errors for one action
  timeout; after that the votes sweep of any node hands it over (``unapplied_votes``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

import orjson

from party_sync.core import transient, votes
from party_sync.core.actions import Decision, Sweep, Verdict
from party_sync.core.binding import Binding
from party_sync.core.commands import (
    Announce,
    ApplyVote,
    BeginAction,
    CastVote,
    Close,
    CloseNarration,
    Commands,
    Connect,
    Disconnect,
    FailAction,
    FinishVote,
    HandOverGrace,
    Leave,
    PendingAction,
    Refresh,
    Refused,
    Send,
    SendDirect,
    Settle,
    Submit,
    SubmitVote,
    SweepVotes,
    TimeOut,
    Unsubscribe,
)
from party_sync.core.connection import Connection
from party_sync.core.deadlines import Deadlines, Kind
from party_sync.core.epochs import opens_epoch
from party_sync.core.events import Event
from party_sync.core.history import ResumePoint
from party_sync.core.limits import TokenBucket
from party_sync.core.presence import RefreshSchedule
from party_sync.core.sequence import SeqVerdict
from party_sync.core.snapshot import Snapshot, hello
from party_sync.core.transient import Transient
from party_sync.protocol import codec, inbound, replies
from party_sync.protocol import types as t
from party_sync.protocol.errors import BAD_INPUT, CloseCode, ErrorCode, ProtocolError
from party_sync.protocol.schemas import Contracts

log = logging.getLogger(__name__)

#: Enum members the hot path compares with, as module globals: reading ``Decision.ACCEPT`` goes
#: through the enum's descriptor (about 150 ns on CPython 3.11), a global about 15 ns, and an
#: accepted action makes several such reads (bench/hotpath.py).
_ACCEPT: Final = Decision.ACCEPT
_DONE: Final = Decision.DONE
_IN_FLIGHT: Final = Decision.IN_FLIGHT
_ACTION: Final = Kind.ACTION
#: the most actions ``PartySessions.lost_actions`` remembers (a Redis restart under heavy traffic)
_MAX_LOST: Final = 10_000
_DEBUG: Final = logging.DEBUG
_DELTA: Final = t.NARRATION_DELTA

#: The presence refresh period is cut in this many slices, each refreshing its share of parties.
PRESENCE_SLICES: Final = 8

#: A vote is closed this long after its deadline: the deadline itself is inclusive.
VOTE_CLOSE_DELAY: Final = 0.002

#: The first pause before handing a vote's decision over again, doubled up to ``MAX_PAUSE``.
FIRST_PAUSE: Final = 0.05
#: A character's ballots (all its connections on this node): a burst, then one a second.
BALLOT_BURST: Final = 5.0
BALLOT_RATE: Final = 1.0
#: Characters with a ballot bucket before the idle ones are forgotten.
BALLOT_TABLE: Final = 1024
MAX_PAUSE: Final = 1.0


class Meter(Protocol):
    """The counters the core moves (``metrics.Metrics`` behind an adapter in the gateway).

    ``family`` is one of ``errors``, ``closes``, ``resumes``, ``settles``, ``action_answers``,
    ``background_errors`` (``metrics.Metrics`` defines them with their labels; the README lists
    them).
    """

    def received(self, type_: str) -> None: ...

    def sent(self, type_: str, recipients: int = 1) -> None: ...

    def count(self, family: str, label: str) -> None: ...

    def connections(self, count: int) -> None: ...

    def engine_latency(self, seconds: float) -> None: ...

    def overdue(self, party_id: str, action_id: str, trace_id: str) -> None:
        """An action an engine started had no answer at its deadline (once per action)."""

    def forgotten(self, party_id: str, action_id: str, trace_id: str) -> None:
        """An action an engine started still had no answer when its record expired
        (``action_record_ttl`` after its acceptance): party_sync stops waiting for it."""


@dataclass(frozen=True, slots=True)
class Rules:
    """The settings the core decides with (from ``config.Settings``)."""

    action_timeout: float = 5.0
    presence_grace: float = 10.0
    presence_ttl: float = 30.0
    max_message_bytes: int = 65536
    heartbeat: float = 25.0
    narration_idle: float = 30.0
    action_record_ttl: float = 600.0


#: Seconds past its deadline before a started, unanswered action is called overdue
#: (``PartySessions._overdue_grace``).
OVERDUE_GRACE = 1.0


@dataclass(slots=True)
class _Applying:
    """A finished vote this node is handing over, retried until ``give_up_at``."""

    finished: Event
    give_up_at: float
    pause: float


class PartySessions:
    """This node's connections and the decisions about them (see the module docstring)."""

    def __init__(
        self,
        rules: Rules,
        contracts: Contracts,
        meter: Meter,
        on_earlier: Callable[[], None] | None = None,
    ) -> None:
        self.rules = rules
        self.contracts = contracts
        self.meter = meter
        #: every connection of this node, by id
        self.connections: dict[str, Connection] = {}
        self.lost = 0  # connections gone since start (the server paces full collections by it)
        #: party_id → its connections on this node (the fan-out set)
        self.parties: dict[str, set[Connection]] = {}
        #: (party_id, action_id) → the actions whose sender has no final answer yet
        self.pending: dict[tuple[str, str], PendingAction] = {}
        #: (party_id, action_id) → until when: actions this node accepted whose record the
        #: backend then lost (its state was lost: Redis restarted empty), oldest first
        self.lost_actions: dict[tuple[str, str], float] = {}
        #: (party_id, character_id) → until when: members whose connection here resumed from an
        #: epoch the backend no longer has (their resends may be of actions another node
        #: accepted before the loss), oldest first
        self.lost_members: dict[tuple[str, str], float] = {}
        self.deadlines = Deadlines()
        self.stopping = False
        self.limits = {
            "max_message_bytes": rules.max_message_bytes,
            "action_timeout_ms": int(rules.action_timeout * 1000),
            "heartbeat_ms": int(rules.heartbeat * 1000),
            "narration_idle_ms": max(1, int(rules.narration_idle * 1000)),
        }
        self._on_earlier = on_earlier
        # connection id → its binding and when its grace began (its disconnect's now)
        self._graces: dict[str, tuple[Binding, float]] = {}
        #: (party, character) → its ballots' bucket (``_admit_ballot``), whatever its connections
        self._ballots: dict[tuple[str, str], TokenBucket] = {}
        self._applying: dict[tuple[str, str], _Applying] = {}
        #: (party_id, stream_id) → when this node last saw a piece of that open narration stream
        self._narrating: dict[tuple[str, str], float] = {}
        #: (party_id, stream_id) → the last index of it seen here, for the streams watched
        self._narration_index: dict[tuple[str, str], int] = {}
        #: party_id → stream_id → the action_id it narrates, for the streams watched that do
        self._narration_action: dict[str, dict[str, str]] = {}
        #: The open vote of each party with connections here (``vote.started``, a hello's
        #: snapshot): a ``party.leave`` asks the backend whether the members still online have
        #: all voted (votes probe: a member leaving left the others waiting for the deadline)
        self._open_votes: dict[str, str] = {}
        #: (party_id, stream_id) of watched streams whose action has its result out (closed now)
        self._narration_over: set[tuple[str, str]] = set()
        self._schedule = RefreshSchedule(max(0.15, rules.presence_ttl), PRESENCE_SLICES)

    # -- time -----------------------------------------------------------------------------------
    def _arm(self, kind: Kind, key: Hashable, due: float) -> None:
        if self.deadlines.arm(kind, key, due) and self._on_earlier is not None:
            self._on_earlier()

    def start(self, now: float) -> None:
        """Arm the first presence tick."""
        self._arm(Kind.PRESENCE, None, now + self._schedule.interval)

    def deadlines_reached(self, now: float) -> list[Commands]:
        """Every deadline due at ``now``, each with its commands (run each chain on its own)."""
        out: list[Commands] = []
        for kind, key in self.deadlines.pop_due(now):
            try:
                commands = self.deadline_reached(kind, key, now)
            except Exception:  # a bug must not stop the other deadlines (or the node's timer)
                log.exception("deadline %s failed", kind.value)
                self.meter.count("background_errors", "timer")
                continue
            if commands:
                out.append(commands)
        return out

    def deadline_reached(self, kind: Kind, key: Any, now: float) -> Commands:
        if self.stopping:
            return []
        if kind is Kind.ACTION:
            pending = self.pending.pop(key, None)
            if pending is None:
                return []
            refusal = self._action_error(
                pending, ErrorCode.ACTION_TIMEOUT, "no engine started it in time", now
            )
            return [TimeOut(pending, now, refusal)]
        if kind is Kind.TOKEN:
            conn = self.connections.get(key)
            if conn is None:
                return []
            error = self._error_bytes(ErrorCode.TOKEN_EXPIRED, "token expired: reconnect", now)
            self.meter.count("errors", ErrorCode.TOKEN_EXPIRED.value)
            self.meter.sent(t.ERROR)
            out: Commands = [Send(error, [conn])]
            out.extend(self._close(conn, CloseCode.TOKEN_EXPIRED, "token expired"))
            return out
        if kind is Kind.GRACE:
            grace = self._graces.pop(key, None)
            if grace is None:
                return []
            binding, since = grace
            return [Settle(binding, now, codec.new_trace_id(), since)]
        if kind is Kind.VOTE:
            party_id, vote_id = key
            return [FinishVote(party_id, vote_id, now)]
        if kind is Kind.APPLY:
            applying = self._applying.get(key)
            return [] if applying is None else [ApplyVote(applying.finished, now, retry=True)]
        if kind is Kind.NARRATION:
            seen = self._narrating.get(key)
            if seen is None:
                return []
            if seen + self.rules.narration_idle > now and key not in self._narration_over:
                self._arm(Kind.NARRATION, key, seen + self.rules.narration_idle)
                return []
            party_id, stream_id = key
            action = self._narration_action.get(party_id, {}).get(stream_id)
            return [CloseNarration(party_id, stream_id, now, codec.new_trace_id(), action)]
        return self._presence_tick(now)

    # -- connections ----------------------------------------------------------------------------
    def open(self, conn: Connection, resume: ResumePoint | None, now: float) -> Commands:
        """A connection was accepted: it syncs (live events are buffered) until ``opened``."""
        self.connections[conn.id] = conn
        self.meter.connections(len(self.connections))
        self.parties.setdefault(conn.party_id, set()).add(conn)
        return [Connect(conn, resume, now, codec.new_trace_id())]

    def opened(
        self,
        conn: Connection,
        *,
        join: Event | None,
        snapshot: Snapshot,
        replay: Sequence[bytes] | None,
        resume: ResumePoint | None,
        now: float,
    ) -> Commands:
        """The backend announced it (``join`` if it brought its character online) and gave the
        party's ``snapshot`` and, for a resume, the ``replay`` (None: too far back, a snapshot
        instead): its ``system.hello``, the replay, and what was buffered meanwhile."""
        out: Commands = []
        if join is not None:
            restate = opens_epoch(join)  # (core.epochs: other openings are the EpochWatch's)
            out.append(Announce(conn.binding, join, snapshot.epoch, restate=restate))
        if resume is not None and resume.epoch != snapshot.epoch:
            # the party's state was lost since this member last heard of it: what it resends
            # now may have been started before the loss, on any node (``_lost_deadline``)
            member = (conn.party_id, conn.character_id)
            _remember(self.lost_members, member, now + self.rules.action_timeout, now)
        if snapshot.vote is not None and isinstance(snapshot.vote.get("vote_id"), str):
            self._open_votes[conn.party_id] = snapshot.vote["vote_id"]
        else:  # (one that finished while no event of it came here)
            self._open_votes.pop(conn.party_id, None)
        if resume is not None:
            self.meter.count("resumes", "resumed" if replay is not None else "snapshot")
        resumed_from = resume.last_seq if replay is not None and resume is not None else None
        greeting = hello(
            conn.binding,
            snapshot,
            resumed_from=resumed_from,
            limits=self.limits,
            your_vote=snapshot.ballots.get(conn.character_id),
            now=now,
        )
        out.append(Send(codec.encode(greeting), [conn]))
        self.meter.sent(t.HELLO)
        last = snapshot.seq
        if replay is not None and resume is not None:
            out.extend(Send(data, [conn]) for data in replay)
            last = max(last, resume.last_seq + len(replay))
        streams = {s["stream_id"]: s["index"] for s in snapshot.narration}
        for stream in snapshot.narration:
            if isinstance(stream.get("action_id"), str):
                actions = self._narration_action.setdefault(conn.party_id, {})
                actions[stream["stream_id"]] = stream["action_id"]
        for stream_id in streams:
            # Not seen here yet: when its last piece came is the backend's to say, so it is
            # asked at once (``close_narration`` closes it or says when to look again); a
            # reconnect never puts a dead stream's close off.
            key = (conn.party_id, stream_id)
            if key not in self._narrating:
                self._narrating[key] = now - self.rules.narration_idle
                self._narration_index[key] = streams[stream_id]
                self._arm(Kind.NARRATION, key, now)
        frames, gap = conn.go_live(last, streams)
        out.extend(Send(data, [conn]) for data in frames)
        moved_on = conn.epoch is not None and conn.epoch != snapshot.epoch
        conn.epoch = snapshot.epoch
        if gap:
            out.extend(self._close(conn, CloseCode.RESYNC, "stream gap: resync"))
        elif moved_on:  # its snapshot was read before the party's state was lost
            out.extend(self._close(conn, CloseCode.RESYNC, "party stream lost continuity: resync"))
        self._arm(Kind.TOKEN, conn.id, conn.expires_at)
        return out

    def open_failed(self, conn: Connection, now: float) -> Commands:
        """The backend could not be reached while opening: the client retries."""
        error = self._error_bytes(ErrorCode.BACKEND_UNAVAILABLE, "backend unavailable", now)
        self.meter.count("errors", ErrorCode.BACKEND_UNAVAILABLE.value)
        self.meter.sent(t.ERROR)
        out: Commands = [Send(error, [conn])]
        out.extend(self._close(conn, CloseCode.INTERNAL_ERROR, "backend unavailable: retry"))
        return out

    def connection_lost(self, conn: Connection, now: float) -> Commands:
        """The socket is gone: forget the connection and tell the backend (``disconnected``)."""
        conn.closed = True  # an answer owed to it goes to the character's other connections
        if self.connections.pop(conn.id, None) is None:
            return []
        self.lost += 1
        self.meter.connections(len(self.connections))
        self.deadlines.cancel(Kind.TOKEN, conn.id)
        out: Commands = []
        party = self.parties.get(conn.party_id)
        if party is not None:
            party.discard(conn)
            if not party:
                del self.parties[conn.party_id]
                out.append(Unsubscribe(conn.party_id))
                self._forget_narration(conn.party_id)
                self._open_votes.pop(conn.party_id, None)
        out.append(Disconnect(conn, now, handover=self.stopping))
        return out

    def disconnected(
        self, conn: Connection, last: bool, now: float, handover: bool = False
    ) -> Commands:
        """``last``: it was its character's last live connection: its grace period starts.
        ``handover``: its ``Disconnect`` handed the grace over already (a drain's)."""
        if not last:
            return []
        if not self.stopping:
            self._graces[conn.id] = (conn.binding, now)
            self._arm(Kind.GRACE, conn.id, now + self.rules.presence_grace)
            return []
        # the drain began while this disconnect was on its way: the grace is handed over too
        return [] if handover else [HandOverGrace(conn.binding, now)]

    def settled(self, left: bool) -> Commands:
        self.meter.count("settles", "left" if left else "stayed")
        return []

    def settle_failed(self) -> Commands:
        # the presence sweep announces the leave once Redis is back (presence_ttl)
        self.meter.count("background_errors", "settle")
        return []

    def close_character(
        self, party_id: str, character_id: str, code: int, reason: str
    ) -> tuple[int, Commands]:
        """An operator closes one character's connections here: how many, and the closes."""
        out: Commands = []
        for conn in self._of(party_id, character_id):
            out.extend(self._close(conn, code, reason))
        return len(out), out

    def drain(self) -> Commands:
        """Stop taking part: every client is told to reconnect (1001), elsewhere."""
        self.stopping = True
        out: Commands = []
        for conn in list(self.connections.values()):
            out.extend(self._close(conn, CloseCode.GOING_AWAY, "server shutting down: reconnect"))
        # the graces running here will not be settled here (no timer fires while stopping):
        # handed over, as the connections closed now are (``Disconnect.handover``)
        out.extend(HandOverGrace(binding, since) for binding, since in self._graces.values())
        self._graces.clear()
        return out

    def stop(self) -> None:
        self.stopping = True
        self.pending.clear()
        self.deadlines = Deadlines()

    # -- party stream ---------------------------------------------------------------------------
    def event_received(self, event: Event, now: float) -> tuple[list[Connection], Commands]:
        """The next event of a party: the live connections here that get its frame now (the
        same encoded bytes for each, sent first), then any other commands it calls for."""
        party = self.parties.get(event.party_id)
        if party is None:
            return [], []
        to: list[Connection] = []
        out: Commands = []
        seq = event.seq
        for conn in party:
            if conn.closed:
                continue
            tracker = conn.tracker
            buffer = conn.buffer
            if buffer is None and seq == tracker.last + 1:  # the common case, inline
                tracker.last = seq
                to.append(conn)
            elif buffer is not None:
                buffer.append(event)
            elif tracker.observe(seq) is SeqVerdict.GAP:  # else a duplicate, dropped
                # The backend repairs gaps before delivering; reaching here means it could not.
                out.extend(self._close(conn, CloseCode.RESYNC, "stream gap: resync"))
        type_ = event.type
        self.meter.sent(type_, len(to))
        if type_ == t.ACTION_RESULT:
            pending = self.pending.pop((event.party_id, event.payload["action_id"]), None)
            if pending is not None:
                self.deadlines.cancel(_ACTION, (pending.party_id, pending.action_id))
                self.meter.engine_latency(max(0.0, now - pending.accepted))
            answered = event.payload["action_id"]
            out.extend(self._narration_answered(event.party_id, answered, event.trace_id, now))
        elif type_ == t.VOTE_STARTED:
            key = (event.party_id, event.payload["vote_id"])
            self._open_votes[event.party_id] = event.payload["vote_id"]
            if (Kind.VOTE, key) not in self.deadlines:
                deadline = datetime.fromisoformat(event.payload["deadline"]).timestamp()
                self._arm(Kind.VOTE, key, max(deadline, now) + VOTE_CLOSE_DELAY)
        elif type_ == t.VOTE_FINISHED:
            self.deadlines.cancel(Kind.VOTE, (event.party_id, event.payload["vote_id"]))
            if self._open_votes.get(event.party_id) == event.payload["vote_id"]:
                del self._open_votes[event.party_id]
        elif type_ == t.PARTY_LEAVE or type_ == t.PARTY_JOIN:
            if type_ == t.PARTY_LEAVE and event.payload.get("reason") == t.LEAVE_LEFT:
                for conn in self._of(event.party_id, event.payload["character_id"]):
                    out.extend(self._close(conn, CloseCode.NORMAL, "left the party"))
            # an open vote's eligible count is told again (``votes.recount``): after a leave,
            # those still online may all have voted (finished then); after a join, one more
            # member may vote (the others saw "1/2 voted" with three online: UX probe)
            vote_id = self._open_votes.get(event.party_id)
            if vote_id is not None:
                out.append(FinishVote(event.party_id, vote_id, now))
        return to, out

    def direct_received(self, party_id: str, character_id: str, data: bytes) -> Commands:
        """A message for one character's connections; if it answers an action and reaches a
        connection of its sender here, that sender has its final answer (nothing left to watch)."""
        party = self.parties.get(party_id)
        if party is None:
            return []
        to = [c for c in party if c.character_id == character_id and not c.closed]
        seq = codec.seq_of(data)
        if seq is not None:
            # a stored action.result: a connection whose stream already passed it has it (its
            # sender resumed, or got it again by resending): only the others get the repeat
            to = [c for c in to if c.buffer is not None or c.tracker.last < seq]
        if b'"action_id"' in data:
            try:
                action_id = codec.decode(data)["payload"]["in_reply_to"]["action_id"]
            except (ValueError, KeyError, TypeError):
                action_id = None
            pending = self.pending.get((party_id, action_id)) if action_id else None
            sender = pending.conn if pending is not None else None
            # nothing left to watch once a connection of its sender here has it; a sender with
            # none (away when it came) is told at the deadline instead (``timed_out``: FINAL)
            if (
                pending is not None
                and pending.character_id == character_id
                and (to or (sender is not None and not sender.closed))
            ):
                del self.pending[(party_id, pending.action_id)]
                self.deadlines.cancel(Kind.ACTION, (party_id, pending.action_id))
            if action_id and seq is None and b'"system.error"' in data:
                # a final refusal: once per connection (the same again from another node's
                # deadline is not news to a connection it reached already)
                to = [c for c in to if c.tell_once(str(action_id))]
        if to and seq is None and b'"system.error"' in data:
            # a refusal made on whichever node (the engine's, a timeout, a failed link): counted
            # where it reaches its player (its maker counts only what it sends itself)
            try:
                code = str(codec.decode(data)["payload"]["code"])
            except (ValueError, KeyError, TypeError):
                code = None
            if code is not None:
                self.meter.count("errors", code)
        return self._counted_repeats(data, to)

    def transient_received(self, party_id: str, items: Sequence[Transient], now: float) -> Commands:
        """Messages for every member outside the stream (``core.transient``): sent at once to
        the live connections here, buffered for the syncing ones; an open narration stream is
        watched, to be closed if it goes idle (``narration_idle``)."""
        party = self.parties.get(party_id)
        if party is None:
            return []
        live: list[Connection] = []
        for conn in party:
            if conn.closed:
                continue
            buffer = conn.buffer
            if buffer is None:
                live.append(conn)
            else:
                buffer.extend(items)  # delivered (or dropped as told) by ``go_live``
        out: Commands = []
        meter = self.meter
        for item in items:
            if item.type == _DELTA:
                if item.done:
                    self._narrating.pop((party_id, item.key), None)
                    self._narration_index.pop((party_id, item.key), None)
                    self._unwatch_action(party_id, item.key)
                    self.deadlines.cancel(Kind.NARRATION, (party_id, item.key))
                else:
                    self._watch_narration(party_id, item.key, now)
                    self._narration_index[(party_id, item.key)] = item.position
                    if item.action is not None:
                        self._narration_action.setdefault(party_id, {})[item.key] = item.action
            if live:
                out.append(Send(item.data, live))
            meter.sent(item.type, len(live))
        return out

    def _watch_narration(self, party_id: str, stream_id: str, now: float) -> None:
        key = (party_id, stream_id)
        if key not in self._narrating:
            self._arm(Kind.NARRATION, key, now + self.rules.narration_idle)
        self._narrating[key] = now

    def _forget_narration(self, party_id: str) -> None:
        """No connection of the party is left here: its streams are not watched from here."""
        for key in [k for k in self._narrating if k[0] == party_id]:
            del self._narrating[key]
            self._narration_index.pop(key, None)
            self._unwatch_action(*key)
            self.deadlines.cancel(Kind.NARRATION, key)

    def _unwatch_action(self, party_id: str, stream_id: str) -> None:
        actions = self._narration_action.get(party_id)
        if actions is not None:
            actions.pop(stream_id, None)
            if not actions:
                del self._narration_action[party_id]
        self._narration_over.discard((party_id, stream_id))

    def _narration_answered(
        self, party_id: str, action_id: str, trace_id: str, now: float
    ) -> Commands:
        """The action's result is out: a stream narrating it that is still open here is over
        with it (the engine did not end it: its last pieces failed, say during a Redis stall),
        so it is closed now rather than when idle, and the hello stops listing it. Its closing
        piece carries the result's ``trace_id`` (the action's: engine probe, it had a new one)."""
        actions = self._narration_action.get(party_id)
        if not actions:
            return []
        out: Commands = []
        for stream_id, narrated in actions.items():
            key = (party_id, stream_id)
            if narrated == action_id and key in self._narrating:
                self._narration_over.add(key)
                out.append(CloseNarration(party_id, stream_id, now, trace_id, action_id))
        return out

    def narration_looked(self, cmd: CloseNarration, due: float | str | None) -> Commands:
        """The backend closed the stream (its closing piece is on its way), or it had ended, or
        it had a piece this node has not seen yet: look again at ``due``. ``GONE``: the backend
        forgot the stream (its keep time passed during a long stall) before anyone closed it:
        this node closes it for its own members, who would show it open until their next hello."""
        key = (cmd.party_id, cmd.stream_id)
        if due == transient.GONE and key in self._narrating and cmd.party_id in self.parties:
            index = self._narration_index.get(key, -1) + 1
            closing = transient.closing_piece(cmd.stream_id, index, None, cmd.trace_id, cmd.now)
            return self.transient_received(cmd.party_id, [closing.transient()], cmd.now)
        if due is None or isinstance(due, str) or cmd.party_id not in self.parties:
            self._narrating.pop(key, None)
            self._narration_index.pop(key, None)
            self._unwatch_action(*key)
        else:
            self._narrating[key] = due - self.rules.narration_idle
            self._arm(Kind.NARRATION, key, due)
        return []

    def narration_failed(self, cmd: CloseNarration) -> Commands:
        """The backend could not be reached: look again soon."""
        self.meter.count("background_errors", "narration")
        key = (cmd.party_id, cmd.stream_id)
        if key in self._narrating:
            self._arm(Kind.NARRATION, key, cmd.now + min(1.0, self.rules.narration_idle))
        return []

    def resync(self, party_id: str, epoch: str | None = None) -> Commands:
        """The party's stream lost continuity and could not be repaired: every client resyncs.
        When it goes on in another ``epoch`` (Redis lost the party's history), a connection
        whose hello was of that epoch already stays (the stream gives the epoch's events from
        its first, and the connection takes those after its snapshot), and one still opening
        stays with what it had buffered dropped (events of the lost epoch): its hello must be of
        ``epoch``, else it resyncs then (``opened``). Engine probe: a player's first connection
        after a flush, whose own join began the new epoch, was closed 4003 before or right after
        its hello in 3 runs of 4."""
        out: Commands = []
        for conn in list(self.parties.get(party_id, ())):
            if epoch is not None:
                if conn.buffer is not None:  # still opening
                    conn.buffer.clear()
                    conn.epoch = epoch
                    continue
                if conn.epoch == epoch:
                    continue
            out.extend(self._close(conn, CloseCode.RESYNC, "party stream lost continuity: resync"))
        return out

    # -- client messages ------------------------------------------------------------------------
    def receive(self, conn: Connection, data: bytes | str, now: float) -> Commands:
        """One client message; every refusal becomes a ``system.error`` (and maybe a strike)."""
        message = self.parse(conn, data, now)
        if isinstance(message, list):
            return message
        return self.handle(conn, message, now)

    def parse(
        self, conn: Connection, data: bytes | str, now: float, binary: bool = False
    ) -> inbound.Inbound | Commands:
        """The first half of ``receive``: the rate limit and the checks of ``protocol.inbound``;
        the message, or the commands refusing it. ``binary``: it came in a binary frame, which
        is refused as ``bad_json`` whatever it holds (messages are JSON in text frames)."""
        if not conn.limits.admit(now):
            refusal = ProtocolError(ErrorCode.RATE_LIMITED, "slow down", **_about_raw(data))
            return self.refuse(conn, refusal, now)
        if binary:
            refusal = ProtocolError(
                ErrorCode.BAD_JSON, "a binary frame: send each message as JSON in a text frame"
            )
            return self.refuse(conn, refusal, now)
        try:
            message = inbound.parse(data, self.contracts, self.rules.max_message_bytes)
        except ProtocolError as exc:
            return self.refuse(conn, exc, now)
        self.meter.received(message.type)
        return message

    def control_frame(self, conn: Connection, now: float) -> Commands | None:
        """A WebSocket ping or pong frame from the client (RFC 6455 §5.5.2-3): counted against
        the message rate like a message, so that a flood of them is a flood (``rate_limited``,
        then 1008). Uncounted, one connection's 125k empty pings a second (0.7 MB/s) slowed every
        other party's answers from 1 ms to over a second (security probe). ``None``: within the
        rate (a ping is answered with its pong); else the commands refusing it."""
        if conn.limits.admit(now):
            return None
        excess = ProtocolError(
            ErrorCode.RATE_LIMITED, "slow down: ping and pong frames count as messages"
        )
        return self.refuse(conn, excess, now)

    def received_bytes(self, conn: Connection, size: int, now: float) -> Commands | None:
        """``size`` bytes read from the client's socket, before they are parsed. ``None``:
        within its byte rate (``LimitPolicy.of``); else the policy close (1008) of a client that
        sends more than its messages can be (a flood of empty continuation or control frames)."""
        if conn.limits.admit_bytes(size, now):
            return None
        return self.flooded(conn)

    def flooded(self, conn: Connection) -> Commands:
        """The policy close (1008) of a client past its byte rate."""
        return self._close(
            conn, CloseCode.POLICY_VIOLATION, "too much data: more bytes than messages can hold"
        )

    def handle(self, conn: Connection, message: inbound.Inbound, now: float) -> Commands:
        """The second half of ``receive``: a valid message from ``conn``."""
        if message.type == t.ACTION_REQUEST:
            return self._receive_action(conn, message, now)
        if message.type == t.PING:  # to this connection only; nothing else changes
            self.meter.sent(t.PONG)
            return [Send(codec.encode(replies.pong(now=now, trace_id=message.trace_id)), [conn])]
        if message.type == t.PARTY_LEAVE:
            if message.payload["character_id"] != conn.character_id:
                forbidden = ProtocolError(
                    ErrorCode.FORBIDDEN,
                    "a connection can only leave for its own character",
                    trace_id=message.client_trace_id,
                    type=t.PARTY_LEAVE,
                )
                return self.refuse(conn, forbidden, now)
            return [Leave(conn, message, now)]
        if not self._admit_ballot(conn, now):
            too_fast = ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"at most {BALLOT_BURST:g} ballots at once, then one every {1 / BALLOT_RATE:g} s",
                vote_id=message.payload["vote_id"],
                trace_id=message.client_trace_id,
                type=t.VOTE_CAST,
            )
            return self.refuse(conn, too_fast, now)
        return [CastVote(conn, message, now)]

    def _admit_ballot(self, conn: Connection, now: float) -> bool:
        """Every accepted ballot is a sequenced ``vote.update`` to the whole party, kept in its
        history: a character's ballots, over all its connections, are limited so that one
        member cannot flood the history past what the others can resume from."""
        key = (conn.party_id, conn.character_id)
        bucket = self._ballots.get(key)
        if bucket is None:
            if len(self._ballots) >= BALLOT_TABLE:  # a full bucket is as good as none: forget
                idle = now - BALLOT_BURST / BALLOT_RATE
                self._ballots = {k: b for k, b in self._ballots.items() if b.updated > idle}
            bucket = self._ballots[key] = TokenBucket(BALLOT_RATE, BALLOT_BURST)
        return bucket.take(now)

    def refuse(
        self, conn: Connection, exc: ProtocolError, now: float, *, strike: bool = False
    ) -> Commands:
        """Answer a refused message with its ``system.error``; bad or excess input (or what
        the caller says counts as such: ``strike``) is a strike, and too many strikes close the
        connection (1008)."""
        self.meter.count("errors", exc.code.value)
        self.meter.sent(t.ERROR)
        reply = replies.from_protocol_error(exc, now=now)
        # the reply's trace id: the client's, or the one made for it (which the player sees)
        about = {
            "trace_id": reply["trace_id"],
            "party_id": conn.party_id,
            "character_id": conn.character_id,
            "code": exc.code.value,
        }
        if exc.action_id is not None:
            about["action_id"] = exc.action_id
        if exc.vote_id is not None:
            about["vote_id"] = exc.vote_id
        log.info("message refused", extra=about)
        out: Commands = [Send(codec.encode(reply), [conn]), Refused(exc.code)]
        strike = strike or exc.code in BAD_INPUT or exc.code is ErrorCode.RATE_LIMITED
        if strike and conn.limits.strike(now):
            out.extend(
                self._close(conn, CloseCode.POLICY_VIOLATION, "too many bad or excess messages")
            )
        return out

    def failed(
        self, conn: Connection, message: inbound.Inbound | None, code: ErrorCode, now: float
    ) -> Commands:
        """Handling ``message`` failed: the backend could not be reached, or something
        unexpected (``internal_error``; the gateway logged it)."""
        text = "backend unavailable: retry" if code is ErrorCode.BACKEND_UNAVAILABLE else None
        error = ProtocolError(code, text or "internal error", **_about(message))
        return self.refuse(conn, error, now)

    def _receive_action(self, conn: Connection, message: inbound.Inbound, now: float) -> Commands:
        p = message.payload
        action_id: str = p["action_id"]
        if p["character_id"] != conn.character_id:
            text = "this connection cannot act for that character"
        elif p["campaign_run_id"] != conn.binding.campaign_run_id:
            text = "this connection is bound to another campaign run"
        elif action_id.startswith(t.RESERVED_ACTION_PREFIX):
            # server-made ids (a finished vote is applied as "vote:<vote_id>") are unforgeable
            text = "action_ids starting with 'vote:' are reserved"
        else:
            return [BeginAction(conn, message, now, self._lost_deadline(conn, action_id, now))]
        return self.refuse(conn, _action_refusal(message, ErrorCode.FORBIDDEN, text), now)

    def _lost_deadline(self, conn: Connection, action_id: str, now: float) -> float | None:
        """The longer deadline of an action that may have been started before the backend lost
        its record (the party's state was lost: Redis restarted empty), or None. An engine may
        still be applying its first delivery (a stream worker frozen mid-action), and nothing
        the ledger holds says so: an ``action_timeout`` at the usual deadline could be false.
        So its deadline is ``action_record_ttl / 4`` away (at least ``action_timeout``; the
        engine deduplicates by ``action_id`` and answers); only an engine frozen longer than
        that, or none at all, ends it with ``action_timeout`` then. The character's lock lapses
        as usual. Such an action is one this node accepted before (still watched, or found
        GONE within ``action_record_ttl``), or one its member sends within ``action_timeout``
        of resuming here from an epoch the backend no longer has: the resends of a client
        whose first acceptance may have been on another node, which no node here knows of."""
        key = (conn.party_id, action_id)
        earlier = self.pending.get(key)
        if earlier is not None:
            lost = earlier.character_id == conn.character_id
        else:
            lost = False
            if self.lost_actions:
                _forget_expired(self.lost_actions, now)
                lost = key in self.lost_actions
            if not lost and self.lost_members:
                _forget_expired(self.lost_members, now)
                lost = (conn.party_id, conn.character_id) in self.lost_members
        if not lost:
            return None
        return max(self.rules.action_timeout, self.rules.action_record_ttl / 4)

    def action_verdict(self, cmd: BeginAction, verdict: Verdict | None) -> Commands:
        """The ledger's verdict on an ``action.request`` (None: the backend was unreachable)."""
        conn, message, now = cmd.conn, cmd.message, cmd.now
        if verdict is None:
            # Not a final answer: Redis refuses a begin_action it runs too late (begin_action.lua),
            # so the action was not accepted, or it was and its answer comes as for any action.
            text = "backend unavailable: retry"
            return self._refuse_action(cmd, ErrorCode.BACKEND_UNAVAILABLE, text)
        decision = verdict.decision
        if decision is _DONE:
            assert verdict.result is not None
            # The final answer, sender only. A watch left by a connection of its sender that is
            # gone, or by this one, is done with: not told again at the deadline.
            key = (conn.party_id, message.payload["action_id"])
            watched = self.pending.get(key)
            if (
                watched is not None
                and watched.character_id == conn.character_id
                and (watched.conn is None or watched.conn is conn or watched.conn.closed)
            ):
                del self.pending[key]
                self.deadlines.cancel(Kind.ACTION, key)
            if codec.seq_of(verdict.result) is None:  # a refusal: asked for, and now told
                conn.tell_once(message.payload["action_id"])
            return self._counted_repeats(verdict.result, [conn])
        if decision is _IN_FLIGHT:
            key = (conn.party_id, message.payload["action_id"])
            earlier = self.pending.get(key)
            if earlier is not None and earlier.character_id == conn.character_id:
                # Already watched here (an earlier send or resend): its answer goes to this
                # connection now, and the watch keeps its time. A resend used to move the look
                # to a full timeout after it: a client resending more often than that pushed
                # the timeout away for ever (engine probe: an action whose node restarted, no
                # worker running, resent every 3 s with a 4 s timeout, never answered).
                earlier.conn = conn
                text = "this action is already being processed"
                return self._refuse_action(cmd, ErrorCode.ACTION_IN_FLIGHT, text)
        if decision is _ACCEPT or decision is _IN_FLIGHT:
            # (a longer deadline only for an acceptance: one IN_FLIGHT is the record's)
            longer = cmd.deadline_in if decision is _ACCEPT else None
            deadline = now + (longer or self.rules.action_timeout)
            if decision is _IN_FLIGHT and verdict.began is not None:
                # Accepted elsewhere (a node that may be gone, with nobody left to look at it):
                # looked at by its record's age, at once if that says its deadline is past (docs
                # probe: a dead node's action, never started, was answered action_timeout one
                # whole timeout after the resend). A record with a longer deadline is NOT_DUE
                # then, and looked at again later; the ledger decides, so an early look is true.
                deadline = min(deadline, verdict.began + self.rules.action_timeout)
            pending = PendingAction(
                conn,
                conn.party_id,
                conn.character_id,
                message.payload["action_id"],
                message.payload,
                message.trace_id,
                # an action accepted elsewhere is as old as its record (its end is not a loss)
                now if decision is _ACCEPT or verdict.began is None else min(now, verdict.began),
                deadline,
            )
            self._watch(pending, deadline)
            if decision is _ACCEPT:
                if log.isEnabledFor(_DEBUG):  # not even the ``extra`` dict otherwise
                    log.debug(
                        "action accepted",
                        extra={
                            "trace_id": message.trace_id,
                            "party_id": conn.party_id,
                            "action_id": pending.action_id,
                        },
                    )
                return [Submit(conn, message, pending)]
            # The sender may have missed the first answer (a reconnect): it is owed one here.
            text = "this action is already being processed"
            return self._refuse_action(cmd, ErrorCode.ACTION_IN_FLIGHT, text)
        if decision is Decision.BUSY:
            text = "wait for the result of your previous action"
            return self._refuse_action(cmd, ErrorCode.CHARACTER_BUSY, text)
        text = "this action_id is used by another actor: choose another"
        return self._refuse_action(cmd, ErrorCode.FORBIDDEN, text)

    def submit_failed(self, cmd: Submit, unavailable: bool) -> Commands:
        """The engine link did not take an accepted action. ``unavailable``: the actions stream
        could not be reached; the append may still run when Redis is back, so this is not final
        (it is started by an engine or timed out at its deadline). Else the link refused it: its
        refusal is its final answer."""
        if unavailable:
            text = "backend unavailable: retry"
            return self._refuse_action(cmd, ErrorCode.BACKEND_UNAVAILABLE, text)
        text = "engine unavailable: retry"
        return self.fail_action(cmd.action, ErrorCode.ENGINE_UNAVAILABLE, text)

    def fail_action(self, action: PendingAction, code: ErrorCode, text: str) -> Commands:
        """An action will never be applied: its refusal is its final answer (on whichever node);
        if it cannot be recorded (Redis down), the deadline answers it. Counted in ``errors``
        where it reaches its sender (``direct_received``)."""
        return [FailAction(action, code, text)]

    def _refuse_action(self, cmd: BeginAction | Submit, code: ErrorCode, text: str) -> Commands:
        return self.refuse(cmd.conn, _action_refusal(cmd.message, code, text), _now_of(cmd))

    def _watch(self, pending: PendingAction, due: float) -> None:
        """Look at ``pending`` again at ``due`` unless its final answer reaches its sender first."""
        key = (pending.party_id, pending.action_id)
        self.pending[key] = pending
        self._arm(_ACTION, key, due)

    def answers_may_be_lost(self, now: float) -> None:
        """The backend's messages to this node may have been lost (its pub/sub connection was
        replaced): every pending action of this node's connections is looked at now, not at
        its deadline, so that a final answer published meanwhile (an engine's refusal, sent to
        its sender only, in no history) reaches its sender at once (partition probe: actions
        sent as Redis came back, refused by the engine in milliseconds, were answered at their
        deadline, 10 s later). A look before the deadline changes nothing else (``timed_out``)."""
        for key in self.pending:
            self._arm(_ACTION, key, now)

    def timed_out(self, cmd: TimeOut, outcome: Sweep, answer: bytes | None) -> Commands:
        """What the ledger found at the action's deadline (``Sweep``)."""
        action, now = cmd.action, cmd.now
        if outcome is Sweep.TIMED_OUT:
            self.meter.count("action_answers", "timeout")
            out = self._answer(action, cmd.refusal, ErrorCode.ACTION_TIMEOUT)
            conn = action.conn
            if conn is not None and not conn.closed and action.character_id != t.PARTY_ACTOR:
                # the character's other tabs, on every node, as an engine's refusal reaches
                # them (docs/protocol.md, system.error); the sender has it already
                conn.tell_once(action.action_id)
                out.append(SendDirect(action.party_id, action.character_id, cmd.refusal))
            return out
        if outcome is Sweep.TOLD and (action.conn is None or action.conn.closed):
            # a refusal that reached a live connection of its character as it was made (on
            # any node: a resend through another one, resume probe): a connection opened since
            # is owed nothing; only this node's own sender, still here, is looked at below
            return []
        if outcome is Sweep.FINAL or outcome is Sweep.TOLD:
            assert answer is not None
            conn = action.conn
            seq = codec.seq_of(answer)
            if (
                conn is not None
                and not conn.closed
                and conn.buffer is None
                and seq is not None
                and seq <= conn.tracker.last
            ):
                # an action.result this very connection's stream already gave it (after a
                # stall the result can reach the node before the ledger's verdict does, and
                # the action is watched anyway): not sent twice
                return []
            if (
                seq is None
                and conn is not None
                and not conn.closed
                and not conn.tell_once(action.action_id)
            ):
                # a final refusal that reached this connection already (from the character's
                # channel, as this look was under way, or as the answer to a resend): a failover
                # makes the node look at once while the refusal is on its way (outside Cluster
                # probe: one action_rejected twice, 2 ms apart)
                return []
            self.meter.count("action_answers", "resent")
            return self._answer(action, answer)
        if (
            outcome is Sweep.GONE or outcome is Sweep.STARTED
        ) and now >= action.accepted + self.rules.action_record_ttl:
            # Its record expired with its age (or, in the embedded ledger, is about to be
            # collected), unanswered: an engine started it (or it would have timed out) and
            # never published its answer in ``action_record_ttl``. Nothing true can be said to
            # its sender (it may have been applied; the state was not lost): the operator is
            # told, the player nothing (as the HTTP link at that age).
            self.meter.forgotten(action.party_id, action.action_id, action.trace_id)
            return []
        if outcome is Sweep.GONE:
            key = (action.party_id, action.action_id)
            _remember(self.lost_actions, key, now + self.rules.action_record_ttl, now)
            text = "the party's state was lost: send the same action again to learn its outcome"
            gone = self._action_error(action, ErrorCode.BACKEND_UNAVAILABLE, text, now)
            return self._answer(action, gone, ErrorCode.BACKEND_UNAVAILABLE)
        # STARTED (its answer comes from the engine) / NOT_DUE: look again one timeout later,
        # or, looked at before its deadline (``answers_may_be_lost``), at its deadline
        early = action.deadline is not None and now < action.deadline
        if outcome is Sweep.STARTED and not early and action.deadline is not None:
            grace = self._overdue_grace()
            if now < action.deadline + grace:
                # an answer made at the deadline may be on its way (the HTTP link's
                # action_timeout for an engine it never reached, an engine's last-moment
                # result): looked at again just after, before it is called overdue (it was
                # counted overdue, "its player waits", as the link's timeout went out: outside
                # engine probe). Its sender gone or not: the operator's count does not depend
                # on the player staying (recheck probe: an engine that answered 202 and never
                # published was not counted once its player had left)
                self._watch(action, action.deadline + grace)
                return []
            if now < action.deadline + grace + self.rules.action_timeout:
                # the first look past its deadline: told once, however long the engine takes
                self.meter.overdue(action.party_id, action.action_id, action.trace_id)
        # watched on until its answer, its timeout or its record's end (``forgotten``), with or
        # without its sender: an answer owed to a closed connection goes to the character's
        # other connections (``_answer``), and the operator's counts need the looks
        due = action.deadline if early and action.deadline is not None else None
        self._watch(action, now + self.rules.action_timeout if due is None else due)
        return []

    def _overdue_grace(self) -> float:
        """How long past its deadline a started action's answer may still be on its way before
        it is called overdue: a second, or half the timeout if that is shorter."""
        return min(OVERDUE_GRACE, self.rules.action_timeout / 2)

    def time_out_failed(self, cmd: TimeOut) -> Commands:
        """Redis was unreachable at the deadline: look again soon; this never gives up."""
        self.meter.count("background_errors", "action_timeouts")
        conn = cmd.action.conn
        if conn is not None and not conn.closed:
            self._watch(cmd.action, cmd.now + min(1.0, self.rules.action_timeout))
        return []

    def _answer(
        self, action: PendingAction, data: bytes, code: ErrorCode | None = None
    ) -> Commands:
        """An action's answer to its sender: on its connection, or (closed: the player may have
        reconnected elsewhere) to every connection of the character. A refusal (``code``) is
        counted here when sent here, else where it arrives (``direct_received``)."""
        conn = action.conn
        if conn is not None and not conn.closed:
            if code is not None:
                self.meter.count("errors", code.value)
            return self._counted_repeats(data, [conn])
        if action.character_id == t.PARTY_ACTOR:
            return []
        return [SendDirect(action.party_id, action.character_id, data)]

    def left(self, cmd: Leave, event: Event | None) -> Commands:
        """``party.leave`` went through; not a member (left already): just close."""
        if event is None:
            return self._close(cmd.conn, CloseCode.NORMAL, "left the party")
        return []

    def vote_cast(
        self, cmd: CastVote, refusal: votes.CastRefusal | None, events: Sequence[Event]
    ) -> Commands:
        if refusal is not None:
            # a refused ballot is no vote.update in the history: it spends none of the
            # character's ballots; it is a strike instead (each cost a backend call: refused
            # ones sent as fast as the connection may, for ever, must end in a 1008)
            bucket = self._ballots.get((cmd.conn.party_id, cmd.conn.character_id))
            if bucket is not None:
                bucket.give_back()
            error = ProtocolError(
                ErrorCode(refusal.value),
                _VOTE_REFUSALS[refusal],
                vote_id=cmd.message.payload["vote_id"],
                trace_id=cmd.message.client_trace_id,
                type=t.VOTE_CAST,
            )
            return self.refuse(cmd.conn, error, cmd.now, strike=True)
        out: Commands = []
        for event in events:
            if event.type == t.VOTE_FINISHED:
                out.extend(self._apply_soon(event, cmd.now))
        return out

    # -- votes ----------------------------------------------------------------------------------
    def vote_finished(self, cmd: FinishVote, event: Event | None) -> Commands:
        """The vote's deadline closed it; ``event``: this node won the finish and applies it."""
        return [] if event is None else self._apply_soon(event, cmd.now)

    def _apply_soon(self, finished: Event, now: float) -> Commands:
        """Hand a finished vote's decision to the engine, trying again through backend errors for
        one action timeout; after that (or if this node dies first) the votes sweep of any node
        does it (``unapplied_votes``). A decision announced is never lost."""
        key = (finished.party_id, finished.payload["vote_id"])
        self._applying[key] = _Applying(finished, now + self.rules.action_timeout, FIRST_PAUSE)
        return [ApplyVote(finished, now, retry=True)]

    def vote_verdict(self, cmd: ApplyVote, run: str | None, verdict: Verdict) -> Commands:
        """The decision's run and the ledger's verdict on its ``choice`` action (untimed: nobody
        waits for it, and it must not be refused as late). It is handed over at least once: a
        resubmission of one already in flight is deduplicated by the engine host and engine."""
        finished, now = cmd.finished, cmd.now
        vote_id = finished.payload["vote_id"]
        if run is None:
            log.error("finished vote without a run", extra={"trace_id": finished.trace_id})
            return [SubmitVote(finished, None, cmd.retry)]
        if verdict.decision is Decision.BUSY:
            # the party's previous action still holds its lock: later
            return self._retry(finished, now) if cmd.retry else []
        if verdict.decision in (Decision.DONE, Decision.TAKEN):
            return [SubmitVote(finished, None, cmd.retry)]
        applied = finished.payload["applied"]
        payload = {
            "action_id": applied["action_id"],
            "character_id": t.PARTY_ACTOR,
            "campaign_run_id": run,
            "action_type": "choice",
            "payload": {"option": applied["option"], "vote_id": vote_id},
        }
        log.info(
            "vote applied",
            extra={
                "trace_id": finished.trace_id,
                "party_id": finished.party_id,
                "vote_id": vote_id,
                "again": verdict.decision is Decision.IN_FLIGHT,
            },
        )
        action = PendingAction(
            None,
            finished.party_id,
            t.PARTY_ACTOR,
            applied["action_id"],
            payload,
            finished.trace_id,
            now,
            None,
        )
        again = verdict.decision is Decision.IN_FLIGHT
        return [SubmitVote(finished, action, cmd.retry, again)]

    def vote_applied(self, finished: Event) -> Commands:
        key = (finished.party_id, finished.payload["vote_id"])
        if self._applying.pop(key, None) is not None:
            self.deadlines.cancel(Kind.APPLY, key)
        return []

    def vote_failed(self, cmd: FinishVote | ApplyVote | SubmitVote, now: float) -> Commands:
        """The backend failed the vote step: a retrying hand-over tries again later; a finish the
        due-votes sweep does once Redis is back."""
        self.meter.count("background_errors", "votes")
        if isinstance(cmd, FinishVote) or not cmd.retry:
            return []
        return self._retry(cmd.finished, now)

    def _retry(self, finished: Event, now: float) -> Commands:
        key = (finished.party_id, finished.payload["vote_id"])
        applying = self._applying.get(key)
        if applying is None or self.stopping:
            return []
        if now + applying.pause > applying.give_up_at:
            del self._applying[key]  # the votes sweep takes it from here
            return []
        self._arm(Kind.APPLY, key, now + applying.pause)
        applying.pause = min(MAX_PAUSE, applying.pause * 2)
        return []

    # -- presence -------------------------------------------------------------------------------
    def _presence_tick(self, now: float) -> Commands:
        """Refresh this node's presence (a slice of the parties per tick, see
        ``RefreshSchedule``) and sweep expired presence (a dead node's players)."""
        tick = self._schedule.tick(now)
        self._schedule.failed()  # undone in ``refreshed`` once this tick gets through
        # ``tick_done`` arms the next tick when this one is over (ticks never overlap); should
        # its chain end some other way, this one comes anyway (presence must never stop)
        self._arm(Kind.PRESENCE, None, now + max(self.rules.presence_ttl, self._schedule.interval))
        # Live connections only: one still syncing has its ``Connect`` in flight, which
        # registers it (or, run too late by a stalled Redis, registers nothing: connect.lua).
        # A refresh naming it could run after Redis wakes and announce a player whose handshake
        # was refused meanwhile.
        connections = [
            (c.binding, c.id)
            for c in self.connections.values()
            if c.buffer is None
            and not c.closed
            and (tick.slice is None or hash(c.party_id) % PRESENCE_SLICES == tick.slice)
        ]
        return [Refresh(connections, tick.sweep, now)]

    def refreshed(self, cmd: Refresh, rejoined: Sequence[Event] | None, *, ok: bool) -> Commands:
        """The refresh (and expiry sweep) went through, or not (``ok``). ``rejoined``: the joins
        the refresh published again (a leave was published while the connection lived, or Redis
        lost the party): the engine is told as for any join. Then the votes sweep."""
        out: Commands = []
        if ok:
            self._schedule.succeeded()
        if rejoined is not None:
            by_member = {(b.party_id, b.character_id): b for b, _ in cmd.connections}
            for event in rejoined:
                binding = by_member.get((event.party_id, event.payload["character_id"]))
                if binding is not None:  # seq 1: a new epoch, read from the snapshot
                    opens = opens_epoch(event)
                    out.append(Announce(binding, event, None if opens else "", restate=opens))
        out.append(SweepVotes(cmd.now, self.rules.action_timeout))
        return out

    def votes_swept(
        self, cmd: SweepVotes, due: Sequence[tuple[str, str]], unapplied: Sequence[Event]
    ) -> Commands:
        """Votes whose timers all died (finished now) and decisions no node handed over."""
        out: Commands = [FinishVote(party_id, vote_id, cmd.now) for party_id, vote_id in due]
        out.extend(ApplyVote(finished, cmd.now, retry=False) for finished in unapplied)
        return out

    def tick_done(self, now: float) -> None:
        """The presence tick (refresh and votes sweep) is over: arm the next one."""
        if not self.stopping:
            self._arm(Kind.PRESENCE, None, now + self._schedule.interval)

    # -- helpers --------------------------------------------------------------------------------
    def _of(self, party_id: str, character_id: str) -> list[Connection]:
        party = self.parties.get(party_id, ())
        return [c for c in party if c.character_id == character_id and not c.closed]

    def _close(self, conn: Connection, code: int, reason: str) -> Commands:
        """Close ``conn`` with ``code`` (once), counted in ``party_sync_closes_total``."""
        if conn.closed:
            return []
        conn.closed = True
        self.meter.count("closes", str(code))
        return [Close(conn, code, reason)]

    def _counted_repeats(self, data: bytes, conns: list[Connection]) -> Commands:
        """``_repeats``, counted in ``party_sync_messages_out_total`` by what it sends: a final
        refusal (``system.error``) or a stored ``action.result``."""
        out = _repeats(data, conns)
        recipients = sum(len(cmd.to) for cmd in out if isinstance(cmd, Send))
        if recipients:
            self.meter.sent(t.ERROR if codec.seq_of(data) is None else t.ACTION_RESULT, recipients)
        return out

    def _error_bytes(self, code: ErrorCode, message: str, now: float) -> bytes:
        return codec.encode(replies.error(code, message, now=now))

    def _action_error(self, action: PendingAction, code: ErrorCode, text: str, now: float) -> bytes:
        return codec.encode(
            replies.error(
                code,
                text,
                now=now,
                trace_id=action.trace_id,
                in_reply_type=t.ACTION_REQUEST,
                action_id=action.action_id,
            )
        )


def _now_of(cmd: BeginAction | Submit) -> float:
    return cmd.now if isinstance(cmd, BeginAction) else cmd.action.accepted


def _repeats(data: bytes, conns: list[Connection]) -> Commands:
    """A stored final answer sent to ``conns`` outside the stream (a resend's answer, one sent
    again at the deadline, one from another node).

    A refusal (no ``seq``) goes as it is. A sequenced ``action.result`` goes as the *repeat*
    docs/protocol.md promises, which a client settles by ``action_id`` and never applies: with
    a ``seq`` at or below the connection's last one. Where the stream already passed its ``seq``
    that is the original; where it has not (the node is a moment behind, and the event itself
    follows in order; or the answer is of another epoch than the connection's, after Redis lost
    the party's state, and no stream will ever bring it) it goes with the connection's last
    ``seq`` instead. So the sender always gets its answer, and no connection is ever given a
    ``seq`` out of turn. A connection still syncing gets no result (no event comes before its
    hello; its client resends its pending actions after the hello); a refusal it gets as it is
    (a client handles a ``system.error`` before its hello).
    """
    seq = codec.seq_of(data)
    if seq is None:
        return [Send(data, conns)] if conns else []
    passed: list[Connection] = []
    behind: dict[int, list[Connection]] = {}
    for conn in conns:
        if conn.buffer is not None:
            continue
        last = conn.tracker.last
        if seq <= last:
            passed.append(conn)
        else:
            behind.setdefault(last, []).append(conn)
    out: Commands = [Send(data, passed)] if passed else []
    out.extend(Send(codec.with_seq_replaced(data, last), to) for last, to in behind.items())
    return out


def _action_refusal(message: inbound.Inbound, code: ErrorCode, text: str) -> ProtocolError:
    return ProtocolError(
        code,
        text,
        action_id=message.payload["action_id"],
        trace_id=message.client_trace_id,
        type=t.ACTION_REQUEST,
    )


def _about(message: inbound.Inbound | None) -> dict[str, Any]:
    """What a refusal of ``message`` replies to (its type, client trace, action or vote id)."""
    if message is None:
        return {}
    about: dict[str, Any] = {"type": message.type, "trace_id": message.client_trace_id}
    if message.type == t.ACTION_REQUEST:
        about["action_id"] = message.payload["action_id"]
    elif message.type == t.VOTE_CAST:
        about["vote_id"] = message.payload["vote_id"]
    return about


def _about_raw(data: bytes | str) -> dict[str, Any]:
    """``_about`` for a message refused before parsing (rate limited): best effort, so that a
    refused action still names its action_id; nothing for anything malformed."""
    try:
        return inbound.about(orjson.loads(data))
    except ValueError:
        return {}


_VOTE_REFUSALS = {
    votes.CastRefusal.UNKNOWN: "there is no open vote with this id in your party",
    votes.CastRefusal.CLOSED: "this vote is closed",
    votes.CastRefusal.BAD_OPTION: "that option is not one of this vote's options",
}


def _remember(
    until: dict[tuple[str, str], float], key: tuple[str, str], due: float, now: float
) -> None:
    """Keep ``key`` in ``until`` until ``due`` (as its newest entry), forgetting what expired."""
    until.pop(key, None)
    until[key] = due
    _forget_expired(until, now)


def _forget_expired(until: dict[tuple[str, str], float], now: float) -> None:
    """Drop the oldest entries of ``until`` (inserted in time order) that have expired, and any
    past ``_MAX_LOST``."""
    while until:
        key = next(iter(until))
        if until[key] > now and len(until) <= _MAX_LOST:
            break
        del until[key]
