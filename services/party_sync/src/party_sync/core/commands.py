"""What the party core asks the gateway to do: its outputs, as data.

Local commands (``Send``, ``Close``, ``Refused``) are carried out at once. Backend and
engine commands are awaited by the gateway's executor, which feeds the outcome back to the core
through the method each command names in its docstring (``PartySessions.<method>``); a command
that fails with ``BackendUnavailable`` is fed back as a failure the same way. Deadlines are not
commands: the core arms them in its own table (``core.deadlines``) and the gateway only reads
``next_due``.

Commands are plain slotted dataclasses, not frozen ones: a frozen dataclass's ``__init__`` sets
each field through ``object.__setattr__``, three times the cost, and an action makes several
commands (measured with bench/hotpath.py). Nothing changes a command once made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from party_sync.core.binding import Binding
from party_sync.core.connection import Connection
from party_sync.core.events import Event
from party_sync.core.history import ResumePoint
from party_sync.protocol.errors import ErrorCode
from party_sync.protocol.inbound import Inbound


@dataclass(slots=True, eq=False)
class PendingAction:
    """An action whose sender has no final answer yet, as this node watches it.

    The gateway makes the engine's ``ActionRequest`` from it (``payload``: the client's, checked;
    ``trace_id``: the action's; ``accepted``: the envelope's timestamp; ``deadline``: None for a
    vote's decision, which nobody waits for). ``conn``: the connection that sent it.
    """

    conn: Connection | None
    party_id: str
    character_id: str
    action_id: str
    payload: dict[str, Any]
    trace_id: str
    accepted: float
    deadline: float | None


# -- local ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class Send:
    """Send ``data`` to each of ``to`` (still open) connections, in order."""

    data: bytes
    to: Sequence[Connection]


@dataclass(slots=True)
class Close:
    """Close ``conn`` with this WebSocket close code (the core has marked it closed already)."""

    conn: Connection
    code: int
    reason: str


@dataclass(slots=True)
class Refused:
    """A client message was refused with ``code`` (its ``system.error`` is the ``Send`` before
    this): the action's tracing span, if any, ends with the code."""

    code: ErrorCode


@dataclass(slots=True)
class Unsubscribe:
    """The party has no connection on this node any more: drop its backend subscription."""

    party_id: str


# -- backend and engine --------------------------------------------------------------------------
@dataclass(slots=True)
class Connect:
    """Announce ``conn`` (``backend.connect``), read the snapshot and any replay; then
    ``opened`` (or ``open_failed``)."""

    conn: Connection
    resume: ResumePoint | None
    now: float
    trace_id: str


@dataclass(slots=True)
class Disconnect:
    """``backend.disconnect``; then ``disconnected(conn, last)`` (nothing if it fails).
    ``handover``: this node is stopping and will not settle the grace (the backend's other
    nodes do, at its end)."""

    conn: Connection
    now: float
    handover: bool = False


@dataclass(slots=True)
class HandOverGrace:
    """``backend.hand_over_grace``: this node drains while a grace it began runs."""

    binding: Binding
    since: float


@dataclass(slots=True)
class Settle:
    """The grace period of a character's last connection is over: ``backend.settle``; then
    ``settled`` / ``settle_failed``."""

    binding: Binding
    now: float
    trace_id: str
    since: float | None = None  # when its grace began (the disconnect's now)


@dataclass(slots=True)
class Announce:
    """Tell the engine of a ``party.join`` (and, at seq 1, ask it to re-state the party of
    ``epoch``; None: read the epoch from the snapshot first). A hint: failures are logged."""

    binding: Binding
    join: Event
    epoch: str | None
    restate: bool = False  # the join opened a new epoch (seq 1): ask the engine to re-state


@dataclass(slots=True)
class BeginAction:
    """``backend.begin_action`` for a client's ``action.request``; then ``action_verdict``.
    ``deadline_in``: for an action this node accepted before whose record may be lost
    (``PartySessions._lost_deadline``), its longer deadline; None: ``action_timeout``."""

    conn: Connection
    message: Inbound
    now: float
    deadline_in: float | None = None


@dataclass(slots=True)
class Submit:
    """Hand an accepted action to the engine link; ``submit_failed`` if it cannot."""

    conn: Connection
    message: Inbound
    action: PendingAction


@dataclass(slots=True)
class FailAction:
    """Record ``code`` as the action's final answer and tell its sender (``publisher.fail``)."""

    action: PendingAction
    code: ErrorCode
    text: str


@dataclass(slots=True)
class TimeOut:
    """An action's deadline passed without a final answer here: ``backend.time_out_action``;
    then ``timed_out`` (or ``time_out_failed``)."""

    action: PendingAction
    now: float
    refusal: bytes


@dataclass(slots=True)
class SendDirect:
    """An answer for a character whose connection here is gone (it may be on another node)."""

    party_id: str
    character_id: str
    data: bytes


@dataclass(slots=True)
class Leave:
    """``backend.leave`` for a client's ``party.leave``; then ``left``."""

    conn: Connection
    message: Inbound
    now: float


@dataclass(slots=True)
class CastVote:
    """``backend.cast_vote`` for a client's ``vote.cast``; then ``vote_cast``."""

    conn: Connection
    message: Inbound
    now: float


@dataclass(slots=True)
class FinishVote:
    """A vote's deadline passed, or a member left or came online while it was open:
    ``backend.finish_vote`` (finished if it is due: the deadline, or every member still online
    voted; else its eligible count told again if it changed); then
    ``vote_finished`` (or ``vote_failed``)."""

    party_id: str
    vote_id: str
    now: float


@dataclass(slots=True)
class ApplyVote:
    """Hand a finished vote's decision over: read its run and ``begin_action`` (untimed); then
    ``vote_verdict`` (or ``vote_failed``). ``retry``: this node closed the vote and tries again
    through backend errors; else (the sweep) one attempt."""

    finished: Event
    now: float
    retry: bool


@dataclass(slots=True)
class SubmitVote:
    """Submit the vote's ``choice`` action (if any) and mark the vote applied; ``vote_failed``
    if either fails."""

    finished: Event
    action: PendingAction | None
    retry: bool
    #: the action was in flight already (handed over before, maybe by a node that died): an
    #: earlier delivery may have reached the engine (``ActionRequest.redelivery``)
    again: bool = False


@dataclass(slots=True)
class Refresh:
    """The presence tick: ``backend.refresh`` these connections, then ``backend.expire`` if
    ``sweep``; then ``refreshed`` (the rejoins, or None if it failed)."""

    connections: list[tuple[Binding, str]]
    sweep: bool
    now: float


@dataclass(slots=True)
class SweepVotes:
    """The votes sweep: ``backend.due_votes`` and ``backend.unapplied_votes``; then
    ``votes_swept`` (a failure is counted and logged once per episode; ``tick_done`` either way)."""

    now: float
    unapplied_after: float


@dataclass(slots=True)
class CloseNarration:
    """A narration stream seen here had no piece for ``narration_idle``: ``backend.
    close_narration`` (its closing piece reaches every member like any piece); then
    ``narration_looked`` with when to look again, or ``narration_failed``."""

    party_id: str
    stream_id: str
    now: float
    trace_id: str
    #: the action it narrates as this node knows it: the backend closes the stream at once if
    #: that action has its result out (over with its action), idle or not
    action_id: str | None = None


Command = (
    Send
    | Close
    | Refused
    | Unsubscribe
    | Connect
    | Disconnect
    | HandOverGrace
    | Settle
    | Announce
    | BeginAction
    | Submit
    | FailAction
    | TimeOut
    | SendDirect
    | Leave
    | CastVote
    | FinishVote
    | ApplyVote
    | SubmitVote
    | Refresh
    | SweepVotes
    | CloseNarration
)

Commands = list[Command]
