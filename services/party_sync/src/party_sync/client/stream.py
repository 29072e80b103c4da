"""The client's side of the protocol as a state machine: messages in, outputs out (no I/O).

``ClientStream`` keeps what survives reconnects: the party state, the resume point (``epoch``,
``last_seq``), the pending actions and ballots. For each decoded server message ``receive``
returns what the client must do: emit events, send messages, settle a pending request, or resync.

Rules (docs/protocol.md, "Resuming", "Gap detection", "Actions and idempotency"):

- after a hello, the next event must be ``last_seq + 1``; an event at or below ``last_seq`` is a
  duplicate and is dropped, except a repeated ``action.result`` that answers a pending action
  (the server answers a resent ``action_id`` with its result as a repeat: its seq at or below
  ``last_seq``, the original one or ``last_seq`` itself);
- an event beyond ``last_seq + 1`` is a gap: the client resyncs (reconnects **without** a resume
  point and takes a fresh snapshot);
- actions go out one at a time, in order, as the browser library sends them (the server allows
  one in flight per character: a second one sent meanwhile would only get ``character_busy``):
  the oldest pending action, and the next once it is answered;
- once the client has caught up with the hello (and any replay that follows it), it (re)sends
  the oldest pending action with its **same** ``action_id``, so an action happens once however
  many reconnects it lives through; a ``system.error`` for a pending action settles it, except
  ``action_in_flight``, which means the first attempt is still running: keep waiting.

Transient messages (``action.accepted``, ``action.failed``, ``narration.delta``: no ``seq``,
docs/protocol.md, "Transient messages") are folded into the state and reported, and never touch
the seq tracking: they are not part of the stream, so they can neither be a gap nor a duplicate.
One that comes before this connection's hello (never from a correct server) is dropped: the
hello restates what it told.

- actions in flight: ``action.accepted`` adds one (a repeat, or one already answered, changes
  nothing), ``action.result`` (live or a repeat) and ``action.failed`` end it;
- narration: a piece is appended if it is the next of its stream, dropped if already shown
  (index not above the last), so never shown twice; a missing piece freezes the stream's text
  (``incomplete``). An ended stream leaves ``state.narration`` when its final text arrives:
  ``scene.update`` (every ended stream), its action's ``action.result`` (and the ended streams
  that named no action), its action's ``action.failed``, or at once if its action was answered
  before its last piece. A late piece of a stream dropped this way does not bring it back;
- every ``system.hello`` (resumed too) replaces the actions in flight and the open streams.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from party_sync.client.events import (
    ActionAccepted,
    ActionFailedNotice,
    ActionResult,
    ClientEvent,
    Connected,
    NarrationDelta,
    ServerError,
    VoteUpdated,
    party_event,
)
from party_sync.client.state import NarrationStream, PartyState, RecentIds
from party_sync.core.sequence import SeqTracker, SeqVerdict
from party_sync.protocol import types as t
from party_sync.protocol.errors import ErrorCode

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Emit:
    event: ClientEvent


@dataclass(frozen=True, slots=True)
class Send:
    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ActionDone:
    action_id: str
    result: ActionResult


@dataclass(frozen=True, slots=True)
class ActionError:
    action_id: str
    error: ServerError


@dataclass(frozen=True, slots=True)
class VoteDone:
    trace_id: str
    update: VoteUpdated


@dataclass(frozen=True, slots=True)
class VoteError:
    trace_id: str
    vote_id: str
    error: ServerError


@dataclass(frozen=True, slots=True)
class Resync:
    """Close this connection and reconnect without a resume point."""

    reason: str


Output = Emit | Send | ActionDone | ActionError | VoteDone | VoteError | Resync


class ClientStream:
    def __init__(self) -> None:
        self.state = PartyState()
        self.epoch: str | None = None
        self.last_seq: int | None = None
        self.live = False  # caught up on this connection: requests go out as they are made
        self.actions: dict[str, dict[str, Any]] = {}  # pending action.request, by action_id
        self.votes: dict[str, dict[str, Any]] = {}  # pending vote.cast, by trace_id
        #: Ballots never sent because a later one for the same vote was pending too (cast
        #: offline): by the trace_id of the one that replaced them; they settle with its answer
        self.replaced: dict[str, list[str]] = {}
        self.leave: dict[str, Any] | None = None  # a party.leave to (re)send until closed
        self._tracker: SeqTracker | None = None  # None until this connection's hello
        self._hello_seq = 0
        self._finished_streams = RecentIds()  # dropped: a late piece must not bring one back
        self._settled_actions = RecentIds()  # answered: a late action.accepted changes nothing
        #: The pending action sent on this connection (one at a time: the oldest)
        self._sent_action: str | None = None

    # -- connections ----------------------------------------------------------------------------
    def resume_point(self) -> tuple[str, int] | None:
        """``(epoch, last_seq)`` to send when reconnecting, or None for a fresh snapshot."""
        if self.epoch is None or self.last_seq is None:
            return None
        return self.epoch, self.last_seq

    def connection_lost(self) -> None:
        self._tracker = None
        self.live = False
        self._sent_action = None

    def resync(self) -> None:
        """Forget the resume point: the next hello will be a full snapshot."""
        self.epoch = None
        self.last_seq = None

    # -- requests -------------------------------------------------------------------------------
    def add_action(self, message: dict[str, Any]) -> bool:
        """Track a pending ``action.request``; True if it should be sent now (else once the
        actions before it are answered, or at catch-up)."""
        action_id = message["payload"]["action_id"]
        self.actions[action_id] = message
        return self._may_send(action_id)

    def _may_send(self, action_id: str) -> bool:
        """``action_id`` is the oldest pending action and not sent on this connection yet: True,
        and it counts as sent."""
        if not self.live or self._sent_action == action_id or next(iter(self.actions)) != action_id:
            return False
        self._sent_action = action_id
        return True

    def _next_action(self) -> list[Output]:
        """The oldest pending action, if it is due on this connection."""
        if not self.actions:
            return []
        head = next(iter(self.actions))
        return [Send(self.actions[head])] if self._may_send(head) else []

    def drop_action(self, action_id: str) -> list[Output]:
        """Stop tracking a pending action (its caller gave up): the next one may go out."""
        if self._remove_action(action_id) is None:
            return []
        return self._next_action()

    def _remove_action(self, action_id: str) -> dict[str, Any] | None:
        """Stop tracking a pending action (answered, refused, given up). It no longer counts as
        sent on this connection: the same ``action_id`` sent again (after a refusal that is not
        final, as the README says, or to learn a result again) goes out (soak probe: a resend
        after ``backend_unavailable`` was never sent, and its caller waited until a reconnect)."""
        if self._sent_action == action_id:
            self._sent_action = None
        return self.actions.pop(action_id, None)

    def add_vote(self, message: dict[str, Any]) -> bool:
        self.votes[message["trace_id"]] = message
        return self.live

    def set_leave(self, message: dict[str, Any]) -> bool:
        self.leave = message
        return self.live

    # -- inbound --------------------------------------------------------------------------------
    def receive(self, message: Mapping[str, Any]) -> list[Output]:
        type_ = message.get("type")
        if type_ == t.HELLO:
            return self._hello(message["payload"])
        if type_ == t.ERROR:
            return self._error(ServerError.from_message(message))
        if type_ in t.TRANSIENT_TYPES:
            return self._transient(str(type_), message)
        seq = message.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or type_ not in t.EVENT_TYPES:
            log.warning("ignoring an unknown server message", extra={"type": str(type_)})
            return []
        if self._tracker is None:
            return [Resync("an event before the hello")]
        last = self._tracker.last
        verdict = self._tracker.observe(seq)
        if verdict is SeqVerdict.GAP:
            self.resync()
            self.connection_lost()
            return [Resync(f"stream gap: expected seq {last + 1}, got {seq}")]
        event = party_event(message)
        if verdict is SeqVerdict.STALE:
            # A repeat of an action we resent gets its original result (old seq): settle it.
            if isinstance(event, ActionResult):
                self._answered(event.action_id)  # not in flight either way
                if self._settled(event.action_id):
                    return [ActionDone(event.action_id, event), *self._next_action()]
            return []
        self.state.apply(event.type, seq, event.payload)
        self.last_seq = seq
        if isinstance(event, ActionResult):
            self._answered(event.action_id)
            self._forget(self.state.settle_narration(event.action_id))
        elif event.type == t.SCENE_UPDATE:
            self._forget(self.state.settle_narration())
        out: list[Output] = [Emit(event)]
        if isinstance(event, ActionResult) and self._settled(event.action_id):
            out.append(ActionDone(event.action_id, event))
            out.extend(self._next_action())
        elif isinstance(event, VoteUpdated) and event.trace_id in self.votes:
            ballot = self.votes.pop(event.trace_id)["payload"]
            self.state.voted(ballot["vote_id"], ballot["option"])
            out.append(VoteDone(event.trace_id, event))
            out.extend(VoteDone(old, event) for old in self.replaced.pop(event.trace_id, ()))
        out.extend(self._catch_up())
        return out

    def _settled(self, action_id: str) -> bool:
        """Forget a pending action that was just answered; False if it was not pending."""
        return self._remove_action(action_id) is not None

    def _answered(self, action_id: str) -> None:
        self._settled_actions.add(action_id)
        self.state.action_ended(action_id)

    def _forget(self, streams: list[NarrationStream]) -> None:
        for stream in streams:
            self._finished_streams.add(stream.stream_id)

    def _hello(self, payload: Mapping[str, Any]) -> list[Output]:
        before = list(self.state.narration.values())
        resumed = (
            bool(payload.get("resumed"))
            and self.last_seq is not None
            and payload.get("epoch") == self.epoch
            and payload.get("resumed_from") == self.last_seq
        )
        if resumed and self.last_seq is not None:
            # Keep the state: the missed events follow and are applied as usual. What the
            # transient messages told is not replayed: the hello restates it.
            self._tracker = SeqTracker(self.last_seq)
            self.state.limits = payload.get("limits") or self.state.limits
            self.state.restate_transient(payload)
        else:
            self.state = PartyState.from_hello(payload)
            self.epoch = self.state.epoch
            self.last_seq = self.state.seq
            self._tracker = SeqTracker(self.state.seq)
        self._forget([s for s in before if s.stream_id not in self.state.narration])
        self._hello_seq = int(payload["seq"])
        out: list[Output] = [Emit(Connected(payload, resumed))]
        out.extend(self._catch_up())
        return out

    def _transient(self, type_: str, message: Mapping[str, Any]) -> list[Output]:
        """``action.accepted``, ``action.failed`` or ``narration.delta``: fold and report."""
        if self._tracker is None:
            log.warning("ignoring a %s before the hello", type_)
            return []
        payload = message.get("payload")
        trace_id = str(message.get("trace_id") or "")
        try:
            if not isinstance(payload, Mapping):
                raise TypeError("no payload")
            if type_ == t.NARRATION_DELTA:
                return self._narration(payload, trace_id)
            action_id = _text(payload, "action_id")
            character_id = _text(payload, "character_id")
            if type_ == t.ACTION_ACCEPTED:
                action_type = _text(payload, "action_type")
                if action_id in self._settled_actions or not self.state.accepted(payload):
                    return []  # a repeat, or late (its answer came already): nothing changes
                return [Emit(ActionAccepted(action_id, character_id, action_type, trace_id))]
            code = _text(payload, "code")
            self._answered(action_id)
            self._forget(self.state.drop_action_narration(action_id))
            return [Emit(ActionFailedNotice(action_id, character_id, code, trace_id))]
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring a malformed %s: %s", type_, exc)
            return []

    def _narration(self, payload: Mapping[str, Any], trace_id: str) -> list[Output]:
        stream_id = _text(payload, "stream_id")
        index, text, done = payload["index"], _text(payload, "text"), payload.get("done", False)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"index {index!r}")
        if not isinstance(done, bool):
            raise ValueError(f"done {done!r}")
        action_id = payload.get("action_id")
        action_id = action_id if isinstance(action_id, str) else None
        folded = self.state.narrate(stream_id, index, text, done, action_id, self._finished_streams)
        if folded is None:
            return []  # shown already (never twice), after its end, or of a dropped stream
        added, stream = folded
        if stream.incomplete:
            log.warning("narration %s: a piece is missing before %d", stream_id, index)
        delta = NarrationDelta(
            stream_id,
            index,
            added,
            stream.done,
            stream.action_id,
            stream.text,
            stream.incomplete,
            trace_id,
        )
        if (
            stream.done
            and stream.action_id is not None
            and stream.action_id in self._settled_actions
            and stream.action_id not in self.state.actions_in_flight
        ):
            # Its action's final answer came before its last piece: nothing more to wait for.
            del self.state.narration[stream_id]
            self._forget([stream])
        return [Emit(delta)]

    def _catch_up(self) -> list[Output]:
        """Once the hello and its replay are applied, (re)send every pending request."""
        if self.live or self._tracker is None or self._tracker.last < self._hello_seq:
            return []
        self.live = True
        out: list[Output] = self._next_action()
        out.extend(Send(m) for m in self._last_ballots())
        if self.leave is not None:
            out.append(Send(self.leave))
        return out

    def _last_ballots(self) -> list[dict[str, Any]]:
        """The pending ballots to cast again: the last for each vote (the server counts the
        last only; all of them would only spend the character's ballots, or make refusals:
        vote_closed, say); the others are replaced by it, and settle with its answer."""
        last: dict[str, str] = {}
        for trace_id, message in self.votes.items():
            last[message["payload"]["vote_id"]] = trace_id
        behind_last = [
            trace_id
            for trace_id, message in self.votes.items()
            if last[message["payload"]["vote_id"]] != trace_id
        ]
        for trace_id in behind_last:
            latest = last[self.votes.pop(trace_id)["payload"]["vote_id"]]
            behind = self.replaced.setdefault(latest, [])
            behind += [trace_id, *self.replaced.pop(trace_id, ())]
        return [self.votes[trace_id] for trace_id in last.values()]

    def _error(self, error: ServerError) -> list[Output]:
        out: list[Output] = [Emit(error)]
        action_id = error.in_reply_to.get("action_id")
        trace_id = error.in_reply_to.get("trace_id")
        if (
            action_id is None
            and isinstance(trace_id, str)
            and error.in_reply_to.get("type") == t.ACTION_REQUEST
        ):
            # an action.request whose action_id the server could not read (it broke the schema)
            # is named by its trace_id only: it settles that action, which otherwise waited for
            # ever with every action behind it (clients probe)
            action_id = next(
                (a for a, sent in self.actions.items() if sent.get("trace_id") == trace_id), None
            )
        if (
            isinstance(action_id, str)
            and action_id in self.actions
            and error.code != ErrorCode.ACTION_IN_FLIGHT  # still running: its result will come
        ):
            self._remove_action(action_id)
            out.append(ActionError(action_id, error))
            out.extend(self._next_action())
        if error.in_reply_to.get("type") == t.VOTE_CAST and isinstance(trace_id, str):
            ballot = self.votes.pop(trace_id, None)
            if ballot is not None:
                vote_id = ballot["payload"]["vote_id"]
                out.append(VoteError(trace_id, vote_id, error))
                out.extend(
                    VoteError(old, vote_id, error) for old in self.replaced.pop(trace_id, ())
                )
        return out


def _text(payload: Mapping[str, Any], key: str) -> str:
    value = payload[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string")
    return value
