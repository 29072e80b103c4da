"""Helpers to test an engine without party_sync running: a recording publisher, scripted dice.

Shipped in the package (not hidden in ``tests/``) because anyone writing an engine against
``party_sync.engine`` needs the same three things: an ``EventPublisher`` that records what was
published and the votes it was asked to start (and can fail on demand), ``ActionRequest``/
``JoinNotice``/``RestateNotice`` built the way party_sync builds them, and dice whose every roll
the test decides. It also takes live narration (``narrate``) by party_sync's rules.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from party_sync.core import votes
from party_sync.engine import (
    ENGINE_EVENT_TYPES,
    ActionRequest,
    JoinNotice,
    NarrationConflict,
    NarrationPiece,
    NarrationSender,
    RestateNotice,
)
from party_sync.engine.interface import (
    MAX_NARRATION_CHARS,
    VoteRequest,
    VoteStarter,
    action_envelope,
)
from party_sync.protocol import codec
from party_sync.protocol.errors import InvalidEvent, VoteConflict

# ``VoteRequest`` is party_sync's (one ``start_vote`` call as the engine made it), re-exported
# because ``RecordingPublisher.vote_requests`` holds them.
__all__ = [
    "MAX_OPEN_STREAMS",
    "NarrationPiece",
    "OpenVote",
    "PublishFailed",
    "Published",
    "RecordingPublisher",
    "ScriptedRandom",
    "VoteRequest",
    "action_request",
    "join_notice",
    "restate_notice",
]

_counter = itertools.count(1)

#: As party_sync: at most this many open narration streams per party.
MAX_OPEN_STREAMS = 8


@dataclass(frozen=True, slots=True)
class Published:
    """One event as an engine published it, with the ``seq`` the publisher gave it."""

    party_id: str
    type: str
    payload: Mapping[str, Any]
    trace_id: str | None
    seq: int


class PublishFailed(ConnectionError):
    """Raised by :class:`RecordingPublisher` when told to fail (a backend outage)."""


@dataclass(frozen=True, slots=True)
class OpenVote:
    """A vote the publisher started and no test has finished yet."""

    party_id: str
    campaign_run_id: str | None
    trace_id: str
    started: Mapping[str, Any]  # the vote.started payload that start_vote returned


class RecordingPublisher(VoteStarter, NarrationSender):
    """An in-memory ``EventPublisher`` that records every event (and every rejection).

    ``check`` is called with each event before it is recorded (e.g. a JSON Schema validation that
    raises); ``fail_next`` makes the next *n* publishes raise :class:`PublishFailed` instead (or
    ``fail_as``, e.g. party_sync's ``BackendUnavailable``, what its publishers raise in an outage).
    Like party_sync's, ``seq`` counts per party from 1.

    Votes: every ``start_vote`` call is recorded in ``vote_requests``. As party_sync does, it
    raises ``InvalidEvent`` for a malformed request and ``VoteConflict`` while the party has an
    open vote (or if the vote id was used before); otherwise the vote is open (``open_votes``,
    by party) and its ``vote.started`` payload is returned, with a ``deadline`` ``timeout_s`` after
    ``clock()`` (Unix seconds). A test ends it with :meth:`finish_vote`, which returns the action
    party_sync would submit on the party's behalf. ``fail_next_vote`` (an exception) is raised by
    the next ``start_vote`` instead of starting anything. :meth:`lose_party` forgets a party as
    party_sync does when it loses the party's short-lived state (a new epoch).

    Narration: ``narrate`` takes a piece by party_sync's rules (docs/protocol.md, *Live
    narration*): ``InvalidEvent`` for a malformed one, ``NarrationConflict`` for a gap, a piece
    after the last, a stream over 20000 characters or a ninth open stream of a party; a piece it
    has already is taken again and changes nothing. Every piece taken is recorded in ``narrated``
    (in order, with ``published``'s events in between in ``timeline``); ``narration(stream_id)``
    is a stream's text so far. ``fail_next_narration`` makes the next *n* pieces raise
    :class:`PublishFailed` (party_sync unreachable).
    """

    def __init__(
        self,
        check: Callable[[Published], None] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.check = check
        self.clock = clock
        self.published: list[Published] = []
        self.rejected: list[tuple[ActionRequest, str]] = []
        self.fail_next = 0
        self.fail_as: Callable[[str], Exception] = PublishFailed
        self.vote_requests: list[VoteRequest] = []
        self.open_votes: dict[str, OpenVote] = {}
        self.fail_next_vote: Exception | None = None
        self._seq: dict[str, int] = {}
        self._vote_ids: set[tuple[str, str]] = set()
        self.narrated: list[NarrationPiece] = []
        self.timeline: list[Published | NarrationPiece] = []  # events and pieces, in order
        self.fail_next_narration = 0
        self._streams: dict[tuple[str, str], _Stream] = {}

    async def publish(
        self,
        party_id: str,
        type: str,
        payload: Mapping[str, Any],
        *,
        trace_id: str | None = None,
    ) -> int:
        if type not in ENGINE_EVENT_TYPES:
            raise ValueError(f"an engine may not publish {type!r}")
        if self.fail_next > 0:
            self.fail_next -= 1
            raise self.fail_as(f"publish of {type} failed (scripted)")
        seq = self._seq.get(party_id, 0) + 1
        event = Published(party_id, type, payload, trace_id, seq)
        if self.check is not None:
            self.check(event)
        self._seq[party_id] = seq
        self.published.append(event)
        self.timeline.append(event)
        return seq

    async def send_piece(self, piece: NarrationPiece) -> None:
        party_id, stream_id, index = piece.party_id, piece.stream_id, piece.index
        text, done = piece.text, piece.done
        if self.fail_next_narration > 0:
            self.fail_next_narration -= 1
            raise PublishFailed(f"narration piece {stream_id}/{index} failed (scripted)")
        stream = self._streams.get((party_id, stream_id))
        if stream is not None and index <= stream.last:
            return  # a piece it has: taken again, nothing changes
        if stream is None:
            if index != 0:
                raise NarrationConflict(f"stream {stream_id} must start at index 0")
            opened = sum(1 for (p, _), s in self._streams.items() if p == party_id and not s.done)
            if opened >= MAX_OPEN_STREAMS:
                raise NarrationConflict(f"party {party_id} has {opened} open narration streams")
            stream = _Stream()
        elif stream.done:
            raise NarrationConflict(f"stream {stream_id} has ended")
        elif index != stream.last + 1:
            raise NarrationConflict(f"stream {stream_id}: index {index} after {stream.last}")
        if len(stream.text) + len(text) > MAX_NARRATION_CHARS:
            raise NarrationConflict(f"stream {stream_id} would exceed {MAX_NARRATION_CHARS}")
        stream.text += text
        stream.last = index
        stream.done = done
        self._streams[(party_id, stream_id)] = stream
        self.narrated.append(piece)
        self.timeline.append(piece)

    def narration(self, stream_id: str, party_id: str = "party-1") -> str:
        """The text so far of a stream (KeyError if it never had a piece)."""
        return self._streams[(party_id, stream_id)].text

    def stream_ids(self, action_id: str | None = None) -> list[str]:
        """The streams narrated (of ``action_id``, if given), in the order they began."""
        seen: dict[str, None] = {}
        for piece in self.narrated:
            if action_id is None or piece.action_id == action_id:
                seen.setdefault(piece.stream_id)
        return list(seen)

    def open_streams(self, party_id: str = "party-1") -> list[str]:
        """The party's streams without their last piece yet."""
        return [s for (p, s), stream in self._streams.items() if p == party_id and not stream.done]

    async def reject(self, action: ActionRequest, message: str) -> None:
        self.rejected.append((action, message))

    async def request_vote(self, request: VoteRequest) -> Mapping[str, Any]:
        self.vote_requests.append(request)
        if self.fail_next_vote is not None:
            failure, self.fail_next_vote = self.fail_next_vote, None
            raise failure
        party_id = request.party_id
        try:  # party_sync's own checks (docs/protocol.md, Votes)
            spec = request.spec(default_id=f"v-{next(_counter)}")
        except votes.SpecError as exc:
            raise InvalidEvent(str(exc)) from None
        if party_id in self.open_votes:
            raise VoteConflict(f"party {party_id} already has an open vote")
        if (party_id, spec.vote_id) in self._vote_ids:
            raise VoteConflict(f"vote {spec.vote_id} already ran")
        vote = votes.open_vote(
            spec, self.clock(), request.trace_id or f"vote-trace-{next(_counter)}"
        )
        started = votes.started_payload(vote, codec.rfc3339(vote.deadline))
        self._vote_ids.add((party_id, spec.vote_id))
        self.open_votes[party_id] = OpenVote(
            party_id, request.campaign_run_id, vote.trace_id, started
        )
        return started

    def open_vote(self, party_id: str = "party-1") -> Mapping[str, Any] | None:
        """The ``vote.started`` payload of the party's open vote, or None."""
        vote = self.open_votes.get(party_id)
        return vote.started if vote is not None else None

    def finish_vote(self, party_id: str = "party-1", option: str | None = None) -> ActionRequest:
        """Close the party's open vote with ``option`` winning (default: what the tie rule picks
        when nobody voted) and return what party_sync then submits: a ``choice`` by character
        ``party`` with action_id ``vote:<vote_id>``, payload ``{option, vote_id}`` and the vote's
        trace id."""
        vote = self.open_votes.pop(party_id, None)
        assert vote is not None, f"party {party_id} has no open vote"
        ids = [o["id"] for o in vote.started["options"]]
        winner = option or vote.started.get("default_option") or ids[0]
        assert winner in ids, f"{winner!r} is not on the ballot {ids}"
        vote_id = vote.started["vote_id"]
        return action_request(
            "choice",
            {"option": winner, "vote_id": vote_id},
            character_id="party",
            party_id=party_id,
            run_id=vote.campaign_run_id or "run-1",
            action_id=f"vote:{vote_id}"[:64],
            trace_id=vote.trace_id,
            timestamp=vote.started["deadline"],
        )

    def lose_party(self, party_id: str = "party-1") -> None:
        """Forget the party as party_sync does when its state is lost (a new epoch, then a
        ``RestateNotice``): its open vote dies, its vote ids may be used again, ``seq`` starts
        over at 1. What was recorded stays (``clear`` forgets that)."""
        self.open_votes.pop(party_id, None)
        self._vote_ids = {(p, v) for p, v in self._vote_ids if p != party_id}
        self._seq.pop(party_id, None)
        self._streams = {k: v for k, v in self._streams.items() if k[0] != party_id}

    def types(self) -> list[str]:
        return [e.type for e in self.published]

    def last(self, type: str) -> Mapping[str, Any]:
        """The payload of the latest event of ``type`` (AssertionError if there is none)."""
        for event in reversed(self.published):
            if event.type == type:
                return event.payload
        raise AssertionError(f"no {type} was published")

    def clear(self) -> None:
        """Forget what was recorded (open votes stay open: they are party_sync's state)."""
        self.published.clear()
        self.rejected.clear()
        self.vote_requests.clear()
        self.narrated.clear()
        self.timeline.clear()


@dataclass(slots=True)
class _Stream:
    text: str = ""
    last: int = -1
    done: bool = False


class ScriptedRandom(random.Random):
    """A ``random.Random`` whose ``randint`` returns the scripted values, in order.

    Every value must lie in the requested range, and running out is an error: a test then knows
    exactly which dice the engine rolled.
    """

    def __init__(self, values: Iterable[int] = ()) -> None:
        super().__init__(0)
        self.values: deque[int] = deque(values)

    def push(self, *values: int) -> None:
        self.values.extend(values)

    def randint(self, a: int, b: int) -> int:
        if not self.values:
            raise AssertionError(f"ScriptedRandom ran out of values (wanted {a}..{b})")
        value = self.values.popleft()
        if not a <= value <= b:
            raise AssertionError(f"scripted value {value} is outside {a}..{b}")
        return value


def action_request(
    action_type: str,
    payload: Mapping[str, Any] | None = None,
    *,
    character_id: str = "aria",
    party_id: str = "party-1",
    run_id: str = "run-1",
    action_id: str | None = None,
    trace_id: str | None = None,
    timestamp: str = "2026-11-25T21:04:05.123Z",
) -> ActionRequest:
    """An ``ActionRequest`` as party_sync hands it to an engine (ids are made up if omitted)."""
    n = next(_counter)
    action_id = action_id or f"act-{n}"
    trace_id = trace_id or f"trace-{n}"
    inner = {
        "action_id": action_id,
        "character_id": character_id,
        "campaign_run_id": run_id,
        "action_type": action_type,
        "payload": dict(payload or {}),
    }
    envelope = action_envelope(inner, trace_id, 0.0)
    envelope["timestamp"] = timestamp  # the test's own text, kept as given
    return ActionRequest.from_envelope(party_id, envelope)


def join_notice(
    character_id: str = "aria",
    display_name: str | None = None,
    *,
    party_id: str = "party-1",
    run_id: str = "run-1",
    trace_id: str | None = None,
) -> JoinNotice:
    return JoinNotice(
        party_id=party_id,
        campaign_run_id=run_id,
        character_id=character_id,
        display_name=display_name or character_id.capitalize(),
        trace_id=trace_id or f"join-{next(_counter)}",
    )


def restate_notice(
    *,
    party_id: str = "party-1",
    run_id: str = "run-1",
    epoch: str = "epoch-2",
    trace_id: str | None = None,
) -> RestateNotice:
    """A ``RestateNotice``: party_sync lost the party's state and started epoch ``epoch``."""
    return RestateNotice(
        party_id=party_id,
        campaign_run_id=run_id,
        epoch=epoch,
        trace_id=trace_id or f"restate-{next(_counter)}",
    )
