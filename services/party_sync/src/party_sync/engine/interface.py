"""The public engine interface: what a Campaign Engine needs, nothing of the gateway.

docs/engines.md shows it in use on each transport.

An engine *receives* accepted player actions (``Engine.handle_action``) and *publishes* events to a
party (``EventPublisher.publish``). It never sees connections, presence or the backend. The same
engine object runs unchanged whatever carries actions to it: in the server's process (the embedded
default), or through the Redis Streams and HTTP transports, which implement ``EngineLink`` and
``EventPublisher`` on their side of the wire.

party_sync makes no game decision: it delivers each accepted ``action.request`` once per
``action_id`` and broadcasts what the engine publishes, in order, with a per-party ``seq``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

from party_sync.core import votes
from party_sync.core.actions import Claim
from party_sync.protocol import codec
from party_sync.protocol.errors import (  # EngineRejected, NarrationConflict: re-exported
    ConfigError,
    EngineRejected,
    EngineStartError,
    ErrorCode,
    InvalidEvent,
    NarrationConflict,
)
from party_sync.protocol.ids import ID_RULE, TRACE_ID_RULE, is_id, is_trace_id

_log = logging.getLogger(__name__)

#: The words of an ``engine_error`` refusal, the same on every transport (the engine raised).
ENGINE_FAILED: Final = "the engine failed: try again as a new action"
#: The engine failures of one action after which its player gets ``engine_error`` over HTTP: the
#: answers the link counts (``HttpEngineLink``), or the calls the engine host counts itself
#: (``party-sync engine-http``: answers cut short by the link's timeout never reach its count).
#: The stream worker's ``max_deliveries`` is the same five: an engine that fails five times
#: running is failing, not hiccuping.
ENGINE_FAILURES: Final = 5

#: Event types an engine may publish to a party (party.join/leave and vote.* belong to party_sync).
__all__ = [
    "ENGINE_EVENT_TYPES",
    "ActionRequest",
    "BatchPublisher",
    "Claim",
    "Engine",
    "EngineLink",
    "EngineRejected",
    "EventPublisher",
    "JoinNotice",
    "LinkHost",
    "Narration",
    "NarrationConflict",
    "NarrationPiece",
    "NarrationSender",
    "RestateNotice",
    "VoteRequest",
    "VoteStarter",
    "action_envelope",
    "new_vote_id",
    "publish_all",
    "restate_engine",
]

#: Several events of one party, in order: ``(type, payload)`` each (``publish_all``).
Events = Sequence[tuple[str, Mapping[str, Any]]]

ENGINE_EVENT_TYPES = frozenset({"action.result", "scene.update", "combat.update", "party.state"})


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """One accepted ``action.request``, as the engine receives it.

    ``envelope`` is the whole message as validated (with the server's ``timestamp`` and the
    ``trace_id`` that the engine must carry to its events); the other fields are copied from it and
    from the connection's binding, so an engine never has to trust the client for ``party_id``.
    """

    party_id: str
    campaign_run_id: str
    character_id: str
    action_id: str
    action_type: str
    payload: Mapping[str, Any]
    trace_id: str
    envelope: Mapping[str, Any]
    #: Unix seconds. An engine host must not *start* the action after it: party_sync answers an
    #: action nobody started by then with ``action_timeout``, a promise that it is never applied
    #: (docs/engines.md, "Deadlines"). None: no deadline (tests, hand-made requests).
    deadline: float | None = None
    #: An earlier delivery of this acceptance may have reached the engine: an action taken over
    #: from a node that died with it (the HTTP link's ``X-Delivery-Attempt`` is then 2 or more,
    #: never the "never seen" 1, and its outcome is unknown from the start), a stream entry
    #: delivered again, a later attempt on an ``engine-http`` host, an action handed back after
    #: the engine raised ``OSError``/``TimeoutError``. Its ``deadline`` is then None: an engine
    #: deduplicates it by ``action_id`` and never refuses it as late.
    redelivery: bool = False

    @classmethod
    def from_envelope(
        cls, party_id: str, envelope: Mapping[str, Any], deadline: float | None = None
    ) -> ActionRequest:
        """The one way to make an ``ActionRequest``: from its whole ``action.request`` envelope
        (checked against its schema by the caller) and the party the sender is bound to.

        Raises ``KeyError``/``TypeError`` for an envelope without the schema's fields.
        """
        p = envelope["payload"]
        return cls(  # positional: one of these is made per action
            party_id,
            p["campaign_run_id"],
            p["character_id"],
            p["action_id"],
            p["action_type"],
            p["payload"],
            envelope["trace_id"],
            envelope,
            deadline,
        )


def action_envelope(payload: Mapping[str, Any], trace_id: str, now: float) -> dict[str, Any]:
    """The ``action.request`` envelope an engine receives: the client's (or a vote's) payload with
    the server's ``timestamp`` and the action's ``trace_id``."""
    return {
        "type": "action.request",
        "timestamp": codec.rfc3339(now),
        "trace_id": trace_id,
        "payload": payload,
    }


@dataclass(frozen=True, slots=True)
class RestateNotice:
    """A party's stream started a new epoch: its short-lived state (history, projection) is gone.

    Sent when party_sync's party state was lost (an embedded server restarted, Redis restarted
    empty or was flushed, the party expired) and a member came back. An engine that has state for
    ``campaign_run_id`` publishes the party's current state again through the normal sequenced
    path (``scene.update`` with its options, ``combat.update`` if a fight is open, ``party.state``,
    and a vote if it wants one), so ``system.hello`` shows a playable game. An engine with no
    state for the run does nothing. Delivered at least once: re-stating must be idempotent.
    """

    party_id: str
    campaign_run_id: str
    epoch: str
    trace_id: str
    #: Unix seconds when party_sync announced it (the ``timestamp`` of its envelope on the wire).
    #: party_sync passes its own clock's ``now``; the default serves notices made by hand (tests).
    #: Not part of a notice's identity: two notices of one epoch compare equal.
    at: float = field(default_factory=time.time, compare=False)


@dataclass(frozen=True, slots=True)
class JoinNotice:
    """A character came online in a party (published ``party.join``); the engine may react.

    Delivered at most once per join; an engine must treat it as a hint (e.g. "start the run if it
    has not started"), never as the only trigger of something that has to happen.
    """

    party_id: str
    campaign_run_id: str
    character_id: str
    display_name: str
    trace_id: str
    #: Unix seconds when party_sync announced the join (the ``timestamp`` of its envelope on the
    #: wire). party_sync passes its own clock's ``now``; the default serves notices made by hand.
    #: Not part of a notice's identity: two notices of one join compare equal.
    at: float = field(default_factory=time.time, compare=False)


def new_vote_id() -> str:
    """A vote id for a request without one (docs/protocol.md, *Votes*: "one is made if missing")."""
    return "v-" + uuid.uuid4().hex[:12]


@dataclass(frozen=True, slots=True)
class VoteRequest:
    """One request to open a party vote: the arguments of ``EventPublisher.start_vote``.

    Over HTTP it is the body of ``POST /api/v1/parties/{party_id}/votes`` (``to_json`` /
    ``from_json``; the party is in the path). Constructing one checks nothing: ``spec`` and
    ``from_json`` apply the rules of ``core.votes`` (docs/protocol.md, *Votes*), so a publisher
    that records requests (a test double) can record a malformed one too.
    """

    party_id: str
    question: str
    options: tuple[Mapping[str, str], ...]  # each {"id", "label"}, in display order
    timeout_s: float
    vote_id: str | None = None
    tie_rule: str = "first_listed"
    default_option: str | None = None
    campaign_run_id: str | None = None
    trace_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The HTTP body: every field but ``party_id``; the optional ones only when set."""
        body: dict[str, Any] = {
            "question": self.question,
            "options": [dict(o) for o in self.options],
            "timeout_s": self.timeout_s,
            "tie_rule": self.tie_rule,
        }
        for key, value in (
            ("vote_id", self.vote_id),
            ("default_option", self.default_option),
            ("campaign_run_id", self.campaign_run_id),
            ("trace_id", self.trace_id),
        ):
            if value is not None:
                body[key] = value
        return body

    @classmethod
    def from_json(cls, party_id: str, body: object) -> VoteRequest:
        """A checked request from an HTTP body; a body without ``vote_id`` gets a new one.

        Raises ``votes.SpecError`` (the API answers 422 ``invalid_vote``) with the reason.
        """
        if not isinstance(body, Mapping):
            raise votes.SpecError("body must be an object")
        run, trace = body.get("campaign_run_id"), body.get("trace_id")
        if run is not None and not is_id(run):
            raise votes.SpecError(f"campaign_run_id: {ID_RULE}")
        if trace is not None and not is_trace_id(trace):
            raise votes.SpecError(TRACE_ID_RULE)
        given = body.get("vote_id")
        spec = votes.spec_from_json(body, new_vote_id() if given in (None, "") else given)
        return cls.from_spec(party_id, spec, campaign_run_id=run, trace_id=trace)

    @classmethod
    def from_spec(
        cls,
        party_id: str,
        spec: votes.VoteSpec,
        *,
        campaign_run_id: str | None = None,
        trace_id: str | None = None,
    ) -> VoteRequest:
        """The request that asks for ``spec`` (its ``vote_id`` included)."""
        return cls(
            party_id,
            spec.question,
            tuple({"id": i, "label": label} for i, label in spec.options),
            spec.timeout_s,
            spec.vote_id,
            spec.tie_rule,
            spec.default_option,
            campaign_run_id,
            trace_id,
        )

    def spec(self, default_id: str | None = None) -> votes.VoteSpec:
        """The checked ``VoteSpec``; without a ``vote_id``, ``default_id`` or a new one is used.

        Raises ``votes.SpecError`` with the reason.
        """
        try:
            body = self.to_json()
        except (TypeError, ValueError) as exc:  # an option that is not a mapping
            raise votes.SpecError(f"bad vote request: {exc!r}") from None
        return votes.spec_from_json(body, self.vote_id or default_id or new_vote_id())


#: The most characters a narration stream holds (its pieces together); docs/protocol.md.
MAX_NARRATION_CHARS = 20_000

#: The most events one ``POST /api/v1/parties/{party_id}/events/batch`` holds (an engine's
#: answer is a handful; ``ApiPublisher.publish_many`` sends a longer one in several).
MAX_BATCH_EVENTS = 32


def new_stream_id() -> str:
    """A narration stream id for a ``Narration`` made without one."""
    return "n-" + uuid.uuid4().hex[:12]


@dataclass(frozen=True, slots=True)
class NarrationPiece:
    """One piece of a live narration stream: the arguments of ``EventPublisher.narrate``.

    Over HTTP it is the body of ``POST /api/v1/parties/{party_id}/narration`` (``to_json`` /
    ``from_json``; the party is in the path). ``check`` applies the rules of the
    ``narration.delta`` schema (docs/protocol.md, *Live narration*).
    """

    party_id: str
    stream_id: str
    index: int
    text: str
    done: bool = False
    action_id: str | None = None
    trace_id: str | None = None

    def check(self) -> NarrationPiece:
        """Itself if well-formed; raises ``InvalidEvent`` with the reason otherwise."""
        if not is_id(self.party_id):
            raise InvalidEvent(f"party_id: {ID_RULE}")
        if not is_id(self.stream_id):
            raise InvalidEvent(f"stream_id: {ID_RULE}")
        if not isinstance(self.index, int) or isinstance(self.index, bool) or self.index < 0:
            raise InvalidEvent("index must be an integer >= 0")
        if not isinstance(self.text, str) or len(self.text) > MAX_NARRATION_CHARS:
            raise InvalidEvent(f"text must be a string of at most {MAX_NARRATION_CHARS} characters")
        if not isinstance(self.done, bool):
            raise InvalidEvent("done must be a boolean")
        if self.action_id is not None and not is_id(self.action_id):
            raise InvalidEvent(f"action_id: {ID_RULE}")
        if self.trace_id is not None and not is_trace_id(self.trace_id):
            raise InvalidEvent(TRACE_ID_RULE)
        return self

    def to_json(self) -> dict[str, Any]:
        """The HTTP body: every field but ``party_id``; the optional ones only when set."""
        body: dict[str, Any] = {
            "stream_id": self.stream_id,
            "index": self.index,
            "text": self.text,
            "done": self.done,
        }
        if self.action_id is not None:
            body["action_id"] = self.action_id
        if self.trace_id is not None:
            body["trace_id"] = self.trace_id
        return body

    @classmethod
    def from_json(cls, party_id: str, body: object) -> NarrationPiece:
        """A checked piece from an HTTP body; raises ``InvalidEvent`` (422) with the reason."""
        if not isinstance(body, Mapping):
            raise InvalidEvent("body must be an object")
        extra = set(body) - {"stream_id", "index", "text", "done", "action_id", "trace_id"}
        if extra:
            raise InvalidEvent(f"unknown fields: {sorted(extra)}")
        missing = [k for k in ("stream_id", "index", "text") if k not in body]
        if missing:
            raise InvalidEvent(f"missing fields: {missing}")
        index = body["index"]
        if isinstance(index, float) and index.is_integer() and index >= 0:
            index = int(index)  # JSON Schema's integer, as in the events (1.0 is 1)
        return cls(
            party_id,
            body["stream_id"],
            index,
            body["text"],
            body.get("done", False),
            body.get("action_id"),
            body.get("trace_id"),
        ).check()


@runtime_checkable
class EventPublisher(Protocol):
    """How an engine publishes. Every call goes through the same sequenced, validated path.

    The publishers party_sync gives ``Engine.start`` also have ``clock() -> float``: now on
    party_sync's clock (Unix seconds; Redis's in Redis mode), for an engine that compares times
    across its processes (docs/engines.md, *One clock*). Not part of this protocol: a publisher
    of one's own (a test's) need not have it."""

    async def publish(
        self,
        party_id: str,
        type: str,
        payload: Mapping[str, Any],
        *,
        trace_id: str | None = None,
    ) -> int:
        """Publish one event (one of ``ENGINE_EVENT_TYPES``) to a party; returns its ``seq``.

        Raises ``party_sync.protocol.errors.InvalidEvent`` if the event breaks its schema.
        Several events of one party at once (an action's result and scene): ``publish_all``.
        """
        ...

    async def reject(self, action: ActionRequest, message: str) -> None:
        """Refuse ``action``: its sender gets ``system.error`` ``action_rejected``."""
        ...

    async def start_vote(
        self,
        party_id: str,
        question: str,
        options: Sequence[Mapping[str, str]],
        timeout_s: float,
        *,
        vote_id: str | None = None,
        tie_rule: str = "first_listed",
        default_option: str | None = None,
        campaign_run_id: str | None = None,
        trace_id: str | None = None,
    ) -> Mapping[str, Any]:
        """Start a party vote; returns its ``vote.started`` payload (``vote_id``, ``deadline``).

        party_sync runs it (ballots, tallies, deadline) and, when it finishes, submits the winner
        to the engine as a ``choice`` action of character ``party`` with action_id
        ``vote:<vote_id>``. Raises ``VoteConflict`` if the party already has an open vote, and
        ``InvalidEvent`` for a malformed request. Implemented once, by ``VoteStarter``.
        """
        ...

    async def narrate(
        self,
        party_id: str,
        stream_id: str,
        index: int,
        text: str,
        *,
        done: bool = False,
        action_id: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        """Send the next piece of a live narration stream to every member (``narration.delta``).

        Pieces of a stream are numbered 0, 1, 2, …; ``done=True`` marks the last. They are not
        part of the sequenced history: the final text still goes out in ``scene.update`` or
        ``action.result``. Returns once party_sync took the piece. A piece it already has (same
        ``stream_id`` and ``index``) is taken again and changes nothing, so a retry is safe.
        Raises ``NarrationConflict`` for a piece that cannot follow (a gap in the indexes, after
        the last piece, a stream over ``MAX_NARRATION_CHARS``, too many open streams) and
        ``InvalidEvent`` for a malformed one. ``Narration`` numbers the pieces for you.
        """
        ...


@runtime_checkable
class BatchPublisher(Protocol):
    """An ``EventPublisher`` that can also publish several events of one party at once.

    Engines call ``publish_all``, which uses ``publish_many`` where the publisher has it and
    falls back to one ``publish`` per event for a publisher without a batch path (one written
    before it). ``ApiPublisher`` (the HTTP engine host's) sends them in one request to the events
    API's batch route.
    """

    async def publish_many(
        self,
        party_id: str,
        events: Events,
        *,
        trace_id: str | None = None,
        key: str | None = None,
    ) -> list[int]:
        """Publish ``events`` (``(type, payload)`` each, of ``ENGINE_EVENT_TYPES``) to a party,
        in order, as consecutive ``publish`` calls would; returns their ``seq``s.

        It is one atomic step (``BackendPublisher``: in the server, and in ``party-sync
        engine-worker``): every event is checked first (``InvalidEvent``: none is
        published), they get consecutive ``seq``s with nothing of another caller between them,
        and members receive them together (in Redis mode: one script call, one pub/sub message,
        one write per member, instead of a round trip per event). An ``action.result`` already
        published for its action is not published again (its first ``seq`` is returned) and the
        other events still are, as with ``publish``; but when every ``action.result`` of the call
        was published already, the call is a late copy of an answer that went out whole (a
        worker that was frozen while another took its action over), and none of its events is
        published (the others' ``seq`` is 0).

        ``key`` (the id alphabet, up to 128 characters) names the answer, for one without an
        ``action.result`` to know it by (a join's, a re-statement's): the first call under a key
        in a party is kept for ``action_record_ttl``, and another call under it in that time
        publishes nothing and returns the seqs the first one's events got. Give the same key to
        every copy of one answer (another process's, a retry's) and a different one to each
        answer.
        """
        ...


async def publish_all(
    publisher: EventPublisher,
    party_id: str,
    events: Events,
    *,
    trace_id: str | None = None,
    key: str | None = None,
) -> list[int]:
    """Publish several events of one party (an action's ``action.result`` and ``scene.update``,
    say): one ``publish_many`` where the publisher has a batch path (``BatchPublisher``), else one
    ``publish`` per event, in order (``key`` is then not used). Returns their ``seq``s."""
    many = getattr(publisher, "publish_many", None)  # (isinstance of a Protocol is slow)
    if many is not None:
        if key is None or not _takes_key(many):  # (a batch path written before keys)
            seqs: list[int] = await many(party_id, events, trace_id=trace_id)
        else:
            seqs = await many(party_id, events, trace_id=trace_id, key=key)
        return seqs
    return [
        await publisher.publish(party_id, type_, payload, trace_id=trace_id)
        for type_, payload in events
    ]


_TAKES_KEY: dict[Any, bool] = {}


def _takes_key(method: Any) -> bool:
    """Whether a ``publish_many`` takes ``key`` (one written before keys does not); asked once
    per implementation."""
    function = getattr(method, "__func__", method)
    known = _TAKES_KEY.get(function)
    if known is None:
        try:
            parameters = inspect.signature(method).parameters.values()
        except (TypeError, ValueError):
            known = False
        else:
            known = any(
                p.name == "key" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
            )
        _TAKES_KEY[function] = known
    return known


class VoteStarter(ABC):
    """The one implementation of ``EventPublisher.start_vote``, inherited by every publisher.

    It keeps the engine-facing call (positional question, options and timeout; keyword-only
    rest) in one place and turns it into a ``VoteRequest``; each transport only says how a
    request is carried (``request_vote``): into the backend, over HTTP, into a test's record.
    """

    async def start_vote(
        self,
        party_id: str,
        question: str,
        options: Sequence[Mapping[str, str]],
        timeout_s: float,
        *,
        vote_id: str | None = None,
        tie_rule: str = "first_listed",
        default_option: str | None = None,
        campaign_run_id: str | None = None,
        trace_id: str | None = None,
    ) -> Mapping[str, Any]:
        """See ``EventPublisher.start_vote``."""
        request = VoteRequest(
            party_id,
            question,
            tuple(options),
            timeout_s,
            vote_id,
            tie_rule,
            default_option,
            campaign_run_id,
            trace_id,
        )
        return await self.request_vote(request)

    @abstractmethod
    async def request_vote(self, request: VoteRequest) -> Mapping[str, Any]:
        """Open the vote ``request`` asks for; its ``vote.started`` payload (as ``start_vote``).

        Raises ``VoteConflict`` if the party already has an open vote, ``InvalidEvent`` for a
        malformed request.
        """


class NarrationSender(ABC):
    """The one implementation of ``EventPublisher.narrate``, inherited by every publisher.

    It keeps the engine-facing call in one place and turns it into a checked ``NarrationPiece``
    (``InvalidEvent`` for a malformed one, before anything is sent); each transport only says how
    a piece is carried (``send_piece``): into the backend, over HTTP, into a test's record.
    """

    async def narrate(
        self,
        party_id: str,
        stream_id: str,
        index: int,
        text: str,
        *,
        done: bool = False,
        action_id: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        """See ``EventPublisher.narrate``."""
        piece = NarrationPiece(party_id, stream_id, index, text, done, action_id, trace_id)
        await self.send_piece(piece.check())

    @abstractmethod
    async def send_piece(self, piece: NarrationPiece) -> None:
        """Carry one checked piece; raises as ``EventPublisher.narrate`` says."""


class Narration:
    """A narration stream being written: numbers its pieces and ends it.

    ::

        async with Narration(publisher, action.party_id, action_id=action.action_id) as story:
            async for token in model.generate(prompt):
                await story.write(token)
        # leaving the block sends the last piece (done); then publish the final scene.update

    A stream left open (the engine died) is closed by party_sync after ``narration_idle``.
    """

    def __init__(
        self,
        publisher: EventPublisher,
        party_id: str,
        stream_id: str | None = None,
        *,
        action_id: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        self.publisher = publisher
        self.party_id = party_id
        self.stream_id = stream_id or new_stream_id()
        self.action_id = action_id
        self.trace_id = trace_id
        self.index = 0  # the index of the next piece
        self.done = False

    async def write(self, text: str) -> None:
        """Send the next piece (an empty one is skipped)."""
        if self.done:
            raise NarrationConflict(f"narration {self.stream_id} has ended")
        if not text:
            return
        await self._send(text, done=False)

    async def end(self, text: str = "") -> None:
        """Send the last piece (``done``); nothing if the stream has ended already."""
        if not self.done:
            await self._send(text, done=True)

    async def _send(self, text: str, *, done: bool) -> None:
        await self.publisher.narrate(
            self.party_id,
            self.stream_id,
            self.index,
            text,
            done=done,
            action_id=self.action_id,
            trace_id=self.trace_id,
        )
        self.index += 1
        self.done = done

    async def __aenter__(self) -> Narration:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        """End the stream; when the block raised, try to end it too, but let the block's error
        be the one that propagates."""
        if exc_type is None:
            await self.end()
            return
        with contextlib.suppress(Exception):
            await self.end()


@runtime_checkable
class Engine(Protocol):
    """A Campaign Engine. Implementations must be idempotent by ``action_id``."""

    async def start(self, publisher: EventPublisher) -> None:
        """Called once before any action; keep ``publisher`` for later use."""
        ...

    async def handle_action(self, action: ActionRequest) -> None:
        """Apply one action, then publish its ``action.result`` (and e.g. ``scene.update``).

        May raise ``EngineRejected`` to refuse an invalid action. Any other exception is reported
        to the player as a retryable ``engine_error`` and logged with the action's ``trace_id``.
        """
        ...

    async def handle_join(self, notice: JoinNotice) -> None:
        """A character came online (a hint; see ``JoinNotice``)."""
        ...

    # Optional (engines written before it keep working): ``async def handle_restate(self,
    # notice: RestateNotice) -> None`` re-publishes the party's current state after party_sync
    # lost it (see ``RestateNotice``). Hosts call it through ``restate_engine``.

    async def close(self) -> None:
        """Release resources; no call follows."""
        ...


async def start_engine(engine: Engine, publisher: EventPublisher) -> None:
    """``engine.start(publisher)``; what it raises is ``EngineStartError``, one line naming it
    (the traceback is logged at DEBUG): a bad database URL is a setting, not a crash."""
    try:
        await engine.start(publisher)
    except ConfigError:
        raise  # a setting the engine refused: exit 2, as every setting
    except Exception as exc:
        _log.debug("the engine failed to start", exc_info=True)
        raise EngineStartError(
            f"the engine could not start: {type(exc).__name__}: {str(exc)[:500]}"
        ) from None


async def restate_engine(engine: Engine, notice: RestateNotice) -> bool:
    """Call the engine's optional ``handle_restate``; False if the engine has none."""
    handler = getattr(engine, "handle_restate", None)
    if handler is None:
        return False
    await handler(notice)
    return True


class LinkHost(EventPublisher, Protocol):
    """What party_sync gives an engine link: the publisher, a way to fail an action, a claim."""

    async def fail(self, action: ActionRequest, code: ErrorCode, message: str) -> None:
        """The action will produce no result (the engine failed or is unreachable).

        The refusal becomes the action's final answer (kept for ``action_record_ttl``: a resend
        of the same ``action_id`` gets it again); if the action already has a final answer
        (its result), nothing is sent.
        """
        ...

    async def claim(self, action: ActionRequest) -> Claim:
        """Right before the engine starts ``action``: may it run? (see ``Claim``)

        Atomic with party_sync's own timeout: an action is either started before its deadline
        (and then answered by the engine) or refused with ``action_timeout``, never both.
        """
        ...

    async def answered(self, action: ActionRequest) -> bool:
        """Whether ``action`` has its final answer already (its result, or a refusal such as
        the deadline's ``action_timeout``). A look that changes nothing, for a link whose engine
        host claims for itself (a claim here would start the action)."""
        ...


class EngineLink(Protocol):
    """party_sync's side of an engine transport: where accepted actions go.

    An optional attribute ``claims_on_accept`` (read with a default of False, so a link written
    before it existed keeps working): True for a link that starts every action it is given at
    once, in this process (the in-process link): the gateway then claims an action in the same
    atomic step that accepts it (``begin_action(claimed=True)``), and the link does not claim it
    again. Links to other processes (HTTP, Redis Streams) say False: their engine host claims
    right before the engine starts, since an action may wait in between (a queue, a retry, an
    outage).

    An optional attribute ``node_bound`` (default False): True for a link whose deliveries live
    in this process (in-process, HTTP: an action handed to it is lost with the node, where a
    stream entry outlives it). Its claims then name this node, so that if the node dies another
    one takes the action over on the player's resend (``take_over``), and a vote's decision is
    counted as applied only once the engine answered it.
    """

    async def start(self, host: LinkHost) -> None: ...

    async def submit(self, action: ActionRequest) -> None:
        """Hand one accepted action to the engine. Must not wait for the engine to finish it."""
        ...

    async def notify_join(self, notice: JoinNotice) -> None: ...

    async def notify_restate(self, notice: RestateNotice) -> None:
        """Tell the engine that a party's state was lost (see ``RestateNotice``); at least once."""
        ...

    async def close(self) -> None: ...
