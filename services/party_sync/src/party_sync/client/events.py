"""What a ``PartyClient`` reports: typed party events, connection changes, server errors.

Party events (everything with a ``seq``) keep the raw ``payload`` and add typed accessors, one
class per message type (docs/protocol.md, "Message types"), so callers can ``match`` on them::

    match event:
        case ActionResult(): print(event.action_id, event.outcome)
        case SceneChanged(): print(event.title)
        case NarrationDelta(): print(event.text, end="")  # live, piece by piece
        case Disconnected(reconnecting=False): ...

The transient messages (no ``seq``: ``action.accepted``, ``action.failed``, ``narration.delta``)
have their own classes: ``ActionAccepted``, ``ActionFailedNotice`` and ``NarrationDelta``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from party_sync.protocol import types as t
from party_sync.protocol.errors import PartySyncError


@dataclass(frozen=True, slots=True)
class PartyEvent:
    """A party event (server → client, with ``seq``), in seq order. Subclasses per type."""

    type: str
    seq: int
    trace_id: str
    payload: Mapping[str, Any]


class MemberJoined(PartyEvent):
    """``party.join``: a character came online."""

    __slots__ = ()

    @property
    def character_id(self) -> str:
        return str(self.payload["character_id"])

    @property
    def display_name(self) -> str:
        return str(self.payload["display_name"])


class MemberLeft(PartyEvent):
    """``party.leave``: ``reason`` is ``left`` (removed), ``disconnected`` or ``expired``."""

    __slots__ = ()

    @property
    def character_id(self) -> str:
        return str(self.payload["character_id"])

    @property
    def reason(self) -> str:
        return str(self.payload["reason"])


class PartyStateChanged(PartyEvent):
    """``party.state``: statuses, hit points and effects, run flags."""

    __slots__ = ()


class ActionResult(PartyEvent):
    """``action.result``: the engine's outcome of an action (``character_id`` may be ``party``)."""

    __slots__ = ()

    @property
    def action_id(self) -> str:
        return str(self.payload["action_id"])

    @property
    def character_id(self) -> str:
        return str(self.payload["character_id"])

    @property
    def outcome(self) -> str:
        return str(self.payload["outcome"])

    @property
    def narration(self) -> str | None:
        value = self.payload.get("narration")
        return value if isinstance(value, str) else None


class SceneChanged(PartyEvent):
    """``scene.update``: the current scene."""

    __slots__ = ()

    @property
    def scene_number(self) -> int:
        return int(self.payload["scene_number"])

    @property
    def title(self) -> str:
        return str(self.payload["title"])

    @property
    def options(self) -> Sequence[Mapping[str, Any]]:
        return list(self.payload.get("options", ()))


class CombatChanged(PartyEvent):
    """``combat.update``: combatants and their hit points."""

    __slots__ = ()

    @property
    def active(self) -> bool:
        return bool(self.payload["active"])


class VoteStarted(PartyEvent):
    """``vote.started``: a party vote opened (answer with ``PartyClient.cast_vote``)."""

    __slots__ = ()

    @property
    def vote_id(self) -> str:
        return str(self.payload["vote_id"])


class VoteUpdated(PartyEvent):
    """``vote.update``: tallies after an accepted ballot."""

    __slots__ = ()

    @property
    def vote_id(self) -> str:
        return str(self.payload["vote_id"])


class VoteFinished(PartyEvent):
    """``vote.finished``: the winner (applied by the engine as a party action)."""

    __slots__ = ()

    @property
    def vote_id(self) -> str:
        return str(self.payload["vote_id"])

    @property
    def winner(self) -> str:
        return str(self.payload["winner"])


_CLASSES: dict[str, type[PartyEvent]] = {
    t.PARTY_JOIN: MemberJoined,
    t.PARTY_LEAVE: MemberLeft,
    t.PARTY_STATE: PartyStateChanged,
    t.ACTION_RESULT: ActionResult,
    t.SCENE_UPDATE: SceneChanged,
    t.COMBAT_UPDATE: CombatChanged,
    t.VOTE_STARTED: VoteStarted,
    t.VOTE_UPDATE: VoteUpdated,
    t.VOTE_FINISHED: VoteFinished,
}


def party_event(message: Mapping[str, Any]) -> PartyEvent:
    """The typed event of a decoded server message that carries ``seq``."""
    cls = _CLASSES.get(message["type"], PartyEvent)
    return cls(
        type=message["type"],
        seq=message["seq"],
        trace_id=str(message.get("trace_id", "")),
        payload=message.get("payload") or {},
    )


@dataclass(frozen=True, slots=True)
class ActionAccepted:
    """``action.accepted`` (no seq): an action of the party (anyone's, ours too) is being
    resolved; it is in ``PartyState.actions_in_flight`` until its ``ActionResult`` or
    ``ActionFailedNotice``. Sent once: a repeat is not reported again."""

    action_id: str
    character_id: str  # "party" for the choice of a finished vote
    action_type: str
    trace_id: str


@dataclass(frozen=True, slots=True)
class ActionFailedNotice:
    """``action.failed`` (no seq): an accepted action was refused for good and will never be
    applied (``code``: ``action_rejected``, ``action_timeout``, ``engine_error``,
    ``engine_unavailable``). The actor's own ``send_action`` raises ``ActionFailed`` as before."""

    action_id: str
    character_id: str
    code: str
    trace_id: str


@dataclass(frozen=True, slots=True)
class NarrationDelta:
    """``narration.delta`` (no seq): a live narration stream changed; reported once per piece.

    ``text`` is what was added to the end of the stream's text (the piece; "" if nothing was),
    ``so_far`` the stream's whole text now (as in ``PartyState.narration[stream_id]``), ``done``
    True on its last piece. ``incomplete`` is True once a piece of the stream went missing
    (never in normal operation): its text then stays as it is, and the final ``scene.update`` /
    ``action.result`` has the whole, authoritative text.
    """

    stream_id: str
    index: int
    text: str
    done: bool
    action_id: str | None
    so_far: str
    incomplete: bool
    trace_id: str


@dataclass(frozen=True, slots=True)
class Connected:
    """A ``system.hello`` arrived: ``resumed`` = the missed events follow, else a new snapshot.

    ``hello`` is the hello's ``payload`` (docs/protocol.md, system.hello), not the whole message.
    Either way the state's ``actions_in_flight`` and ``narration`` are the hello's now (open
    streams with their text so far; their next pieces follow as ``NarrationDelta``)."""

    hello: Mapping[str, Any]
    resumed: bool


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection ended. ``reconnecting`` False means the client stopped for good.
    ``code``: the WebSocket close code, None when no close ended it (a handshake refused,
    ``max_attempts``, ``close()`` while reconnecting)."""

    code: int | None
    reason: str
    reconnecting: bool


@dataclass(frozen=True, slots=True)
class ServerError:
    """A ``system.error`` (to this connection only); ``code`` is stable, ``message`` is not."""

    code: str
    message: str
    retryable: bool
    in_reply_to: Mapping[str, Any]
    trace_id: str

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> ServerError:
        payload = message.get("payload") or {}
        return cls(
            code=str(payload.get("code", "")),
            message=str(payload.get("message", "")),
            retryable=bool(payload.get("retryable", False)),
            in_reply_to=payload.get("in_reply_to") or {},
            trace_id=str(message.get("trace_id", "")),
        )


ClientEvent = (
    PartyEvent
    | ActionAccepted
    | ActionFailedNotice
    | NarrationDelta
    | Connected
    | Disconnected
    | ServerError
)


class ClientError(PartySyncError):
    """Root of the client's exceptions."""


class ActionFailed(ClientError):
    """The server refused an action or it failed (``code``: see the protocol's error codes).

    With ``retryable`` True, trying again later may work: as a new action (a new ``action_id``)
    after ``action_timeout``, ``engine_error`` or ``engine_unavailable``, whose ``action_id``
    only gets the same refusal back; with the same ``action_id`` after the others.
    """

    def __init__(self, action_id: str, error: ServerError) -> None:
        super().__init__(f"action {action_id}: {error.code}: {error.message}")
        self.action_id = action_id
        self.code = error.code
        self.retryable = error.retryable
        self.error = error


class VoteRefused(ClientError):
    """A ballot was refused: ``vote_unknown``, ``vote_closed`` or ``vote_bad_option``."""

    def __init__(self, vote_id: str, error: ServerError) -> None:
        super().__init__(f"vote {vote_id}: {error.code}: {error.message}")
        self.vote_id = vote_id
        self.code = error.code
        self.error = error


class ClientClosed(ClientError):
    """The client stopped (closed, left, refused, or out of attempts) before an answer came."""


class ConnectRefused(ClientError):
    """The server refused the handshake for good (HTTP ``status``; 401 with no token provider)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"handshake refused: {status} {reason}")
        self.status = status
        self.reason = reason
