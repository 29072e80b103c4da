"""What every member of a party is told outside its sequenced stream, and a party's narration.

Three server → client types carry no ``seq`` and are never replayed (docs/protocol.md,
*Transient messages*): ``action.accepted`` and ``action.failed`` (an action being resolved, and
one that ended without a result) and ``narration.delta`` (a piece of live narration). What they
tell is kept short-lived by the backend and restated by ``system.hello`` (``actions_in_flight``,
``narration``), so a client that connects later, or reconnects, misses nothing it needs.

This module builds their frames (once per message, sent as the same bytes to every member) and
holds ``NarrationBook``, the rules of a party's narration streams: the embedded backend applies it
directly, the Redis backend's ``narrate.lua`` and ``close_narration.lua`` apply the same rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, NamedTuple

import orjson

from party_sync.protocol import codec
from party_sync.protocol import types as t

#: At most this many open narration streams per party; a new one past it is refused.
MAX_OPEN_STREAMS: Final = 8
#: The most characters a narration stream holds (its pieces together).
MAX_STREAM_CHARS: Final = 20_000
#: The most streams a party's book keeps, open and ended (``NarrationBook``).
MAX_KEPT_STREAMS: Final = 32


#: ``close_narration``'s answer when the backend no longer knows the stream at all (not ended
#: by a closing piece it published: forgotten, e.g. kept_for passed during a long Redis stall).
GONE: Final = "gone"


def kept_for(idle: float) -> float:
    """How long a party's narration is kept after its last change (the Redis hash's expiry)."""
    return max(1.0, 2 * idle)


class Transient(NamedTuple):
    """One transient message as a node delivers it: its type, its encoded envelope, and what the
    party core needs to know without decoding it again."""

    type: str
    data: bytes
    key: str  # narration.delta: the stream_id; action.*: the action_id
    position: int = 0  # narration.delta: the piece's index
    done: bool = False  # narration.delta: the last piece
    action: str | None = None  # narration.delta: the action_id it narrates, if any


def _frame(type_: str, payload: dict[str, Any], trace_id: str | None, now: float) -> bytes:
    return codec.encode(codec.envelope(type_, payload, ts=now, trace_id=trace_id))


def accepted(
    action_id: str, character_id: str, action_type: str, trace_id: str, now: float
) -> Transient:
    """``action.accepted``: the action was accepted and handed to the engine.

    One per accepted action, so it is put together from its quoted parts (as ``codec.encode``
    would give it, key for key) rather than through an envelope dict: about a third cheaper.
    """
    dumps = orjson.dumps
    data = b"".join(
        (
            b'{"type":"action.accepted","timestamp":"',
            codec.rfc3339(now).encode(),
            b'","trace_id":',
            dumps(trace_id or codec.new_trace_id()),
            b',"payload":{"action_id":',
            dumps(action_id),
            b',"character_id":',
            dumps(character_id),
            b',"action_type":',
            dumps(action_type),
            b"}}",
        )
    )
    return Transient(t.ACTION_ACCEPTED, data, action_id)


def failed(action_id: str, character_id: str, refusal: bytes, now: float) -> Transient | None:
    """``action.failed`` for an action whose final answer became ``refusal`` (a ``system.error``
    envelope: its code and trace_id are told); None if ``refusal`` is not one."""
    try:
        message = orjson.loads(refusal)
        code = message["payload"]["code"]
        trace_id = message.get("trace_id")
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(code, str) or not isinstance(trace_id, str | None):
        return None
    payload = {"action_id": action_id, "character_id": character_id, "code": code}
    return Transient(t.ACTION_FAILED, _frame(t.ACTION_FAILED, payload, trace_id, now), action_id)


@dataclass(frozen=True, slots=True)
class Piece:
    """One narration piece as a backend takes it, with its ``narration.delta`` frame."""

    stream_id: str
    index: int
    text: str
    done: bool
    action_id: str | None
    frame: bytes

    def transient(self) -> Transient:
        return Transient(
            t.NARRATION_DELTA, self.frame, self.stream_id, self.index, self.done, self.action_id
        )


def piece(
    stream_id: str,
    index: int,
    text: str,
    *,
    done: bool,
    action_id: str | None,
    trace_id: str | None,
    now: float,
) -> Piece:
    """A checked piece (the caller checked its fields) and its frame."""
    payload: dict[str, Any] = {"stream_id": stream_id, "index": index, "text": text, "done": done}
    if action_id is not None:
        payload["action_id"] = action_id
    frame = _frame(t.NARRATION_DELTA, payload, trace_id, now)
    return Piece(stream_id, index, text, done, action_id, frame)


def closing_piece(
    stream_id: str, index: int, action_id: str | None, trace_id: str, now: float
) -> Piece:
    """The empty last piece that closes an idle stream."""
    return piece(stream_id, index, "", done=True, action_id=action_id, trace_id=trace_id, now=now)


def parse(data: bytes) -> Transient | None:
    """A transient message from its encoded envelope; None for anything else."""
    try:
        message = orjson.loads(data)
    except ValueError:
        return None
    return from_message(message, data)


def from_message(message: Any, data: bytes | None = None) -> Transient | None:
    """A transient message from its decoded envelope (``data``: its encoding, made here if not
    given); None for anything else."""
    action = None
    try:
        type_, p = message["type"], message["payload"]
        if type_ == t.NARRATION_DELTA:
            key, index, done = p["stream_id"], int(p["index"]), p["done"] is True
            narrated = p.get("action_id")
            action = narrated if isinstance(narrated, str) else None
        elif type_ in (t.ACTION_ACCEPTED, t.ACTION_FAILED):
            key, index, done = p["action_id"], 0, False
        else:
            return None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if not isinstance(key, str):
        return None
    encoded = orjson.dumps(message) if data is None else data
    return Transient(type_, encoded, key, index, done, action)


# -- a party's narration streams -------------------------------------------------------------
class Outcome(Enum):
    """What became of a piece (``NarrationBook.take``)."""

    TAKEN = "taken"  # the next piece: kept and sent to every member
    REPEAT = "repeat"  # the stream has it already (a retry): nothing changes, nothing is sent
    GAP = "gap"  # its index is past the next one (or a new stream not starting at 0)
    ENDED = "ended"  # the stream had its last piece (or was closed as idle)
    TOO_LONG = "too_long"  # the stream would hold more than MAX_STREAM_CHARS
    TOO_MANY = "too_many"  # a new stream that stays open while MAX_OPEN_STREAMS are open
    ANSWERED = "answered"  # a new piece narrating an action whose result was published

    @property
    def accepted(self) -> bool:
        return self is Outcome.TAKEN or self is Outcome.REPEAT


#: Why a refused piece was refused (``NarrationConflict``'s message).
REASONS: Final[Mapping[Outcome, str]] = {
    Outcome.GAP: "index is past the next piece of the stream (a piece is missing)",
    Outcome.ENDED: "the stream has ended (its last piece was sent, or it was closed as idle)",
    Outcome.TOO_LONG: f"the stream would hold more than {MAX_STREAM_CHARS} characters",
    Outcome.TOO_MANY: f"the party has {MAX_OPEN_STREAMS} open narration streams",
    Outcome.ANSWERED: "its action's result was published: the narration of it is over",
}


@dataclass(slots=True)
class _Stream:
    parts: list[str]
    chars: int
    last: int  # the last index taken
    done: bool
    action_id: str | None
    created: float
    updated: float


class NarrationBook:
    """A party's narration streams: the open ones with their text, the ended ones remembered
    (a retried piece of an ended stream is a repeat, not a new stream).

    Bounded: at most ``MAX_OPEN_STREAMS`` open and ``MAX_KEPT_STREAMS`` in all (past that, a new
    stream makes room by forgetting the ended ones that ended ``idle`` ago, then the ended one
    that ended first); and the whole book is forgotten when nothing was written to it for
    ``kept_for(idle)`` (in Redis: the hash's expiry) — an open stream nobody closed (no member was
    connected to any node) is forgotten then, not restated.
    """

    __slots__ = ("_open", "_streams", "idle", "written")

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self._streams: dict[str, _Stream] = {}
        self._open = 0
        self.written = 0.0  # when a piece or a close last changed the book

    def _expire(self, now: float) -> None:
        if self._streams and self.written + kept_for(self.idle) <= now:
            self._streams.clear()
            self._open = 0

    def take(self, p: Piece, now: float, answered: bool = False) -> Outcome:
        """Apply one piece; the outcome says whether to send it. ``answered``: the piece's action
        has its result published, so a piece the stream does not have yet is refused (the final
        text went out; an engine woken after another answered the action narrates on)."""
        self._expire(now)
        stream = self._streams.get(p.stream_id)
        if answered and (stream is None or p.index > stream.last):
            return Outcome.ANSWERED
        if stream is None:
            if p.index != 0:
                return Outcome.GAP
            if not p.done and self._open >= MAX_OPEN_STREAMS:
                return Outcome.TOO_MANY
            if len(p.text) > MAX_STREAM_CHARS:
                return Outcome.TOO_LONG
            if len(self._streams) >= MAX_KEPT_STREAMS:
                self._make_room(now)
            self._streams[p.stream_id] = _Stream(
                [] if p.done else [p.text], len(p.text), 0, p.done, p.action_id, now, now
            )
            self._open += not p.done
            self.written = now
            return Outcome.TAKEN
        if p.index <= stream.last:
            return Outcome.REPEAT
        if stream.done:
            return Outcome.ENDED
        if p.index != stream.last + 1:
            return Outcome.GAP
        if stream.chars + len(p.text) > MAX_STREAM_CHARS:
            return Outcome.TOO_LONG
        stream.last, stream.updated, stream.done = p.index, now, p.done
        stream.chars += len(p.text)
        if p.done:
            stream.parts = []  # an ended stream is not restated: its text is not kept
            self._open -= 1
        else:
            stream.parts.append(p.text)
        self.written = now
        return Outcome.TAKEN

    def close_idle(
        self, stream_id: str, now: float, answered: str | None = None
    ) -> tuple[int, str | None] | float | str | None:
        """An open stream without a piece for ``idle`` seconds ends: ``(index, action_id)`` of
        its closing piece. A stream written to since: when to look again. Ended: None. Not
        known (never, or forgotten after ``kept_for``): ``GONE``. ``answered``: an action whose
        result was published: a stream narrating it ends now, idle or not (over with it)."""
        self._expire(now)
        stream = self._streams.get(stream_id)
        if stream is None:
            return GONE
        if stream.done:
            return None
        over = answered is not None and stream.action_id == answered
        if stream.updated + self.idle > now and not over:
            return stream.updated + self.idle
        # its last index stays the engine's: a late piece after it is ENDED, not a repeat
        stream.done, stream.parts, stream.updated = True, [], now
        self._open -= 1
        self.written = now
        return stream.last + 1, stream.action_id

    def open_streams(self, now: float) -> list[dict[str, Any]]:
        """The open streams as ``system.hello`` restates them, oldest first."""
        self._expire(now)
        streams = sorted(
            ((s.created, sid, s) for sid, s in self._streams.items() if not s.done),
            key=lambda x: (x[0], x[1]),
        )
        out: list[dict[str, Any]] = []
        for _, sid, s in streams:
            entry: dict[str, Any] = {"stream_id": sid, "index": s.last, "text": "".join(s.parts)}
            if s.action_id is not None:
                entry["action_id"] = s.action_id
            out.append(entry)
        return out

    def _make_room(self, now: float) -> None:
        """Forget the ended streams that ended ``idle`` ago; if none did, the one that ended
        first (open streams are never forgotten: there are at most ``MAX_OPEN_STREAMS``)."""
        ended = sorted((s.updated, sid) for sid, s in self._streams.items() if s.done)
        stale = [sid for updated, sid in ended if updated + self.idle <= now]
        for sid in stale or [sid for _, sid in ended[:1]]:
            del self._streams[sid]

    def __len__(self) -> int:
        return len(self._streams)
