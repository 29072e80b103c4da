"""The party as a client sees it, folded from ``system.hello`` and the party events (pure).

A non-resumed hello replaces everything (it is a full snapshot); a resumed one keeps the state
and the missed events that follow it are applied as usual (docs/protocol.md, "Resuming").

The party rules (who is a member and online, the latest scene, combat and party state, the open
vote's tallies) are the server's own ``core.projection.Projection``: the client starts one from the
hello and folds each event into it, so it cannot drift from what the server's next hello says.
What is the client's alone is kept here: who it is (``you``, ``party_id``, ``campaign_run_id``),
the resume point's ``epoch``, the statuses as last told, its own ballot (``your_vote``), the last
finished vote and the connection's limits.

And what the transient messages tell (no ``seq``, never replayed; docs/protocol.md, *Transient
messages*): the party's **actions in flight** (``action.accepted`` adds one, ``action.result`` or
``action.failed`` ends it) and its **narration streams** (``narration.delta`` pieces, in index
order, each shown once). Every ``system.hello``, resumed or not, restates both
(``actions_in_flight``, ``narration``), so they replace what the client had.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from party_sync.core.projection import DEFAULT_RUN_STATUS, DEFAULT_STATUS, Member, Projection
from party_sync.protocol import types as t

__all__ = ["ActionInFlight", "Member", "NarrationStream", "PartyState", "RecentIds"]

#: At most this many ended streams wait for their final text in ``PartyState.narration`` (a
#: safety bound: the final ``scene.update`` / ``action.result`` normally removes them first); the
#: oldest is dropped past it. Open streams stay (the server allows 8 per party).
MAX_ENDED_STREAMS: Final = 16


@dataclass(frozen=True, slots=True)
class ActionInFlight:
    """An accepted action of the party with no final answer yet (``action.accepted``)."""

    action_id: str
    character_id: str  # "party" for the choice of a finished vote
    action_type: str


@dataclass(slots=True)
class NarrationStream:
    """A live narration stream as this client has it.

    ``text`` is the text so far (every piece up to ``index``, each once, in order), ``index`` the
    index of the last piece in it (-1: none yet), ``done`` True once its last piece came (no more
    text will). ``incomplete`` is True if a piece went missing (the server never skips one, so
    only after a fault): ``text`` then stops before it and is not extended any more, never shown
    with a hole; the final ``scene.update`` / ``action.result`` has the whole text.
    """

    stream_id: str
    text: str = ""
    index: int = -1
    done: bool = False
    action_id: str | None = None
    incomplete: bool = False


class RecentIds:
    """A bounded memory of ids that ended (streams dropped, actions answered), so a late or
    repeated transient message about one of them does not bring it back. Keeps the last
    ``size``."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._ids: dict[str, None] = {}

    def add(self, key: str) -> None:
        self._ids.pop(key, None)
        self._ids[key] = None
        if len(self._ids) > self.size:
            del self._ids[next(iter(self._ids))]

    def __contains__(self, key: object) -> bool:
        return key in self._ids


@dataclass(slots=True)
class PartyState:
    """Members, scene, combat, party state and the open vote, as of ``seq`` in ``epoch``.

    ``vote`` is the open vote in the shape of ``system.hello.vote`` (``vote_id``, ``question``,
    ``options``, ``deadline``, ``tallies``, ``voted``, ``eligible``, ``your_vote``), or None.
    ``last_vote`` is the payload of the latest ``vote.finished``. ``members``, ``scene``,
    ``combat``, ``party_state``, ``vote`` and ``seq`` are read from ``projection``.
    """

    party_id: str = ""
    campaign_run_id: str = ""
    you: str = ""
    epoch: str = ""
    status: str = DEFAULT_STATUS
    run_status: str = DEFAULT_RUN_STATUS
    last_vote: Mapping[str, Any] | None = None
    limits: Mapping[str, Any] = field(default_factory=dict)
    projection: Projection = field(default_factory=Projection)
    #: Actions in flight by ``action_id``, oldest first.
    actions_in_flight: dict[str, ActionInFlight] = field(default_factory=dict)
    #: Narration streams by ``stream_id``, in the order they began: the open ones, and the ended
    #: ones until their final text arrives (``settle_narration``) or the next ``system.hello``.
    narration: dict[str, NarrationStream] = field(default_factory=dict)

    @property
    def seq(self) -> int:
        return self.projection.seq

    @property
    def members(self) -> dict[str, Member]:
        """Every member by ``character_id``, in roster order (first join first)."""
        return self.projection.members

    @property
    def scene(self) -> Mapping[str, Any] | None:
        return self.projection.scene

    @property
    def combat(self) -> Mapping[str, Any] | None:
        return self.projection.combat

    @property
    def party_state(self) -> Mapping[str, Any] | None:
        return self.projection.party_state

    @property
    def vote(self) -> dict[str, Any] | None:
        return self.projection.vote

    @property
    def scene_number(self) -> int:
        return self.projection.scene_number

    @property
    def online(self) -> list[str]:
        """The character ids online now, in roster order."""
        return [m.character_id for m in self.projection.members.values() if m.online]

    @classmethod
    def from_hello(cls, payload: Mapping[str, Any]) -> PartyState:
        """The full snapshot of a ``system.hello``."""
        return cls(
            party_id=payload["party_id"],
            campaign_run_id=payload["campaign_run_id"],
            you=payload["you"],
            epoch=payload["epoch"],
            # as told: the hello's statuses are the server's projection's (docs/protocol.md)
            status=payload.get("status", DEFAULT_STATUS),
            run_status=payload.get("run_status", DEFAULT_RUN_STATUS),
            limits=payload.get("limits") or {},
            projection=Projection.from_hello(payload),
        ).restate_transient(payload)

    def restate_transient(self, payload: Mapping[str, Any]) -> PartyState:
        """Replace the actions in flight and the narration streams with a hello's (every hello
        restates them, a resumed one too: what was missed while away is not replayed)."""
        self.actions_in_flight = {}
        for item in payload.get("actions_in_flight") or ():
            self.accepted(item)
        self.narration = {}
        for item in payload.get("narration") or ():
            stream = NarrationStream(
                stream_id=str(item["stream_id"]),
                text=str(item["text"]),
                index=int(item["index"]),
                action_id=_optional_str(item.get("action_id")),
            )
            self.narration[stream.stream_id] = stream
        return self

    def apply(self, type_: str, seq: int, payload: Mapping[str, Any]) -> None:
        """Fold the next party event. ``seq`` must follow the last one applied (the stream's
        ``SeqTracker`` checked it); ``ValueError`` otherwise, and nothing changes."""
        self.projection.apply(type_, payload, seq)
        if type_ == t.PARTY_STATE:
            self.status = str(payload.get("status", self.status))
            self.run_status = str(payload.get("run_status", self.run_status))
        elif type_ == t.VOTE_STARTED and self.projection.vote is not None:
            self.projection.vote["your_vote"] = None  # the hello's shape: nobody here voted yet
        elif type_ == t.VOTE_FINISHED:
            self.last_vote = payload
        elif type_ == t.ACTION_RESULT:
            self.action_ended(str(payload.get("action_id", "")))
        # (the narration streams its final text ends: ``settle_narration``, by the caller)

    # -- transient messages (no seq) -------------------------------------------------------------
    def accepted(self, payload: Mapping[str, Any]) -> bool:
        """``action.accepted``: the action is in flight. False for a repeat (nothing changes)."""
        action_id = str(payload["action_id"])
        if action_id in self.actions_in_flight:
            return False
        self.actions_in_flight[action_id] = ActionInFlight(
            action_id, str(payload["character_id"]), str(payload["action_type"])
        )
        return True

    def action_ended(self, action_id: str) -> bool:
        """``action.result`` or ``action.failed``: no longer in flight. False if it was not."""
        return self.actions_in_flight.pop(action_id, None) is not None

    def narrate(
        self,
        stream_id: str,
        index: int,
        text: str,
        done: bool,
        action_id: str | None,
        finished: RecentIds | None = None,
    ) -> tuple[str, NarrationStream] | None:
        """Fold a ``narration.delta`` piece: ``(the text added, the stream)``, or None if nothing
        changed: a piece already shown (``index`` not above the last), one after the stream's
        last, or one of a stream in ``finished`` (seen to end and dropped already).

        A piece past the next one (one went missing) makes the stream ``incomplete``: its text
        stays as it is, nothing more is added, and only its last piece (``done``) still counts.
        A stream first seen past its beginning is ``incomplete`` from the start (or, if that
        piece is its last, not kept at all: nothing to show, its final text follows).
        """
        stream = self.narration.get(stream_id)
        if stream is None:
            if finished is not None and stream_id in finished:
                return None
            if index == 0:
                stream = NarrationStream(stream_id, text, 0, done, action_id)
            elif done:
                return None
            else:
                stream = NarrationStream(stream_id, action_id=action_id, incomplete=True)
                text = ""
            self.narration[stream_id] = stream
            return text, stream
        if stream.done or index <= stream.index:
            return None
        if stream.incomplete or index != stream.index + 1:
            if stream.incomplete and not done:
                return None
            stream.incomplete, stream.done = True, done
            return "", stream
        stream.text += text
        stream.index, stream.done = index, done
        return text, stream

    def settle_narration(self, action_id: str | None = None) -> list[NarrationStream]:
        """Remove the ended streams whose final text has arrived; the removed ones.

        ``scene.update`` (``action_id`` None) ends every ended stream; ``action.result`` ends the
        ended streams of its action and those that named no action. Open streams stay (their
        pieces keep coming), but past ``MAX_ENDED_STREAMS`` ended ones the oldest go too.
        """
        return self._drop(
            lambda s: action_id is None or s.action_id is None or s.action_id == action_id
        )

    def drop_action_narration(self, action_id: str) -> list[NarrationStream]:
        """``action.failed``: remove the ended streams of that action (never to be final)."""
        return self._drop(lambda s: s.action_id == action_id)

    def _drop(self, ends: Callable[[NarrationStream], bool]) -> list[NarrationStream]:
        ended = [s for s in self.narration.values() if s.done]
        gone = [s for s in ended if ends(s)]
        kept = [s for s in ended if not ends(s)]
        gone += kept[: max(0, len(kept) - MAX_ENDED_STREAMS)]
        for stream in gone:
            del self.narration[stream.stream_id]
        return gone

    def voted(self, vote_id: str, option: str) -> None:
        """Our ballot was accepted: remember it as ``your_vote``."""
        vote = self.projection.vote
        if vote is not None and vote.get("vote_id") == vote_id:
            vote["your_vote"] = option


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
