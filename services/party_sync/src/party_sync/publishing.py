"""``BackendPublisher``: the one way engine events enter a party's sequenced stream.

It needs only a backend, the compiled contracts and a clock, so it serves the gateway (in-process
engines, the HTTP events API) and ``party-sync engine-worker`` (engines fed by Redis Streams)
alike. Every event is checked against its schema before the backend sequences it, and every
sequenced event is shown to its ``watch`` (``engine.restating.EpochWatch``): one that opens a
new epoch gets the engine asked to re-state the party, whichever transport the engine uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from party_sync import tracing
from party_sync.backends.base import EngineSide, NarrationStore
from party_sync.core import transient, votes
from party_sync.core.actions import Claim, outlived_record
from party_sync.core.epochs import opens_epoch
from party_sync.core.events import Event
from party_sync.engine.interface import (
    ENGINE_EVENT_TYPES,
    ActionRequest,
    NarrationPiece,
    NarrationSender,
    VoteRequest,
    VoteStarter,
)
from party_sync.engine.restating import EpochWatch
from party_sync.protocol import codec, replies
from party_sync.protocol import types as t
from party_sync.protocol.errors import (
    BackendUnavailable,
    ErrorCode,
    InvalidEvent,
    NarrationConflict,
)
from party_sync.protocol.ids import is_trace_id
from party_sync.protocol.schemas import Contracts, SchemaViolation
from party_sync.tasks import retried

log = logging.getLogger(__name__)


#: The refusal passed to a claim made before the action's deadline, which cannot record one.
NOT_LATE = b""

#: Seconds a refusal's delivery to its sender is tried again while Redis cannot take it, from
#: its first failure; past that the deadline sweep sends it (``_tell``).
TELL_PATIENCE = 3.0


class Narrator:
    """Narration pieces coalesced per party per event-loop tick: the pieces of one party that
    arrive in one tick (from any number of streams and callers) go to the backend in one
    ``narrate`` call, in the order they came (one script call, one round trip, in Redis mode),
    and each caller gets its own piece's outcome."""

    def __init__(self, backend: NarrationStore, clock: Callable[[], float]) -> None:
        self.backend = backend
        self.clock = clock
        self._pending: dict[str, list[tuple[transient.Piece, asyncio.Future[transient.Outcome]]]]
        self._pending = {}
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def take(self, party_id: str, piece: transient.Piece) -> transient.Outcome:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[transient.Outcome] = loop.create_future()
        self._pending.setdefault(party_id, []).append((piece, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for party_id, items in pending.items():
            task = asyncio.ensure_future(self._send(party_id, items))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(
        self,
        party_id: str,
        items: list[tuple[transient.Piece, asyncio.Future[transient.Outcome]]],
    ) -> None:
        """One backend call for the party's pieces of this tick; every caller gets an answer,
        whatever happens (an outcome, the backend's error, or an error saying why not)."""
        error: BaseException | None = None
        try:
            outcomes = await self.backend.narrate(party_id, [p for p, _ in items], self.clock())
            if len(outcomes) != len(items):
                raise RuntimeError(f"the backend answered {len(outcomes)} of {len(items)} pieces")
            for (_, future), outcome in zip(items, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)
        except BackendUnavailable as exc:
            error = exc
        except Exception:  # a bug: logged, and nobody is left waiting (the finally)
            log.exception("narration pieces could not be taken", extra={"party_id": party_id})
        finally:  # also when this task is cancelled (the node stops)
            for _, future in items:
                if not future.done():
                    if isinstance(error, BackendUnavailable):
                        future.set_exception(BackendUnavailable(str(error)))
                    else:
                        future.set_exception(BackendUnavailable("narration not taken: retry"))


class BackendPublisher(VoteStarter, NarrationSender):
    """Implements the engine's ``EventPublisher`` (and a link's ``fail``) over a ``Backend``.

    ``watch``: shown every event a publish sequenced (None: nobody asks for re-statements).
    """

    def __init__(
        self,
        backend: EngineSide,
        contracts: Contracts,
        clock: Callable[[], float],
        watch: EpochWatch | None = None,
        *,
        record_ttl: float | None = None,
    ) -> None:
        self.backend = backend
        self.contracts = contracts
        self.clock = clock
        self.watch = watch
        #: ``action_record_ttl``: an action claimed this long after its acceptance with no
        #: record left may have outlived it (``actions.outlived_record``); None: never judged so
        self.record_ttl = record_ttl
        self.narrator = Narrator(backend, clock)
        #: The serving node whose own link claims through this host (``EngineLink.node_bound``:
        #: recorded with each claim, so another node takes the action over if this one dies);
        #: None for an engine host in another process (a stream worker).
        self.claimer: str | None = None

    def _opened(self, events: Sequence[Event]) -> None:
        """Show ``events`` to the watch if one opens an epoch (checked here: every event passes),
        else tell it they were written (``EpochWatch.writes_may_be_lost``)."""
        watch = self.watch
        if watch is not None:
            for event in events:  # (a loop: cheaper than any() on an action's two events)
                if opens_epoch(event):
                    watch.published(events)  # (noted as written there)
                    return
            if events:
                watch.wrote(events[0].party_id)  # (one party per call)

    async def publish_built(
        self, party_id: str, message: dict[str, Any], *, key: str | None = None
    ) -> Event:
        """Sequence an envelope ``build`` made (the HTTP events API, run-wide events); ``key``,
        its ``Idempotency-Key`` (``Backend.publish``)."""
        event = await self.backend.publish(party_id, message, self.clock(), key=key)
        self._opened((event,))
        return event

    async def send_piece(self, piece: NarrationPiece) -> None:
        """``EventPublisher.narrate`` (``NarrationSender``): coalesced with the party's other
        pieces of this tick (``Narrator``), sent to every member if it is the stream's next."""
        try:
            taken = transient.piece(
                piece.stream_id,
                piece.index,
                piece.text,
                done=piece.done,
                action_id=piece.action_id,
                trace_id=piece.trace_id,
                now=self.clock(),
            )
        except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate in the text
            raise InvalidEvent(f"narration piece cannot be encoded: {exc}") from None
        outcome = await self.narrator.take(piece.party_id, taken)
        if not outcome.accepted:
            reason = transient.REASONS[outcome]
            raise NarrationConflict(f"narration {piece.stream_id} piece {piece.index}: {reason}")

    def build(
        self,
        type_: str,
        payload: Mapping[str, Any],
        trace_id: str | None,
        *,
        allowed: frozenset[str] = ENGINE_EVENT_TYPES,
        timestamp: str | None = None,
    ) -> dict[str, Any]:
        """The checked envelope (without seq) of an event; raises ``InvalidEvent``."""
        if type_ not in allowed:
            raise InvalidEvent(f"{type_!r} may not be published here (allowed: {sorted(allowed)})")
        message = codec.envelope(type_, dict(payload), ts=self.clock(), trace_id=trace_id)
        if timestamp is not None:
            message["timestamp"] = timestamp
        # seq is required by event schemas; the real one is allocated by the backend. It is put
        # in for the check and taken out again (cheaper than validating a copy of every event).
        message["seq"] = 1
        try:
            self.contracts.validate(type_, message)
        except SchemaViolation as exc:
            raise InvalidEvent(f"{type_} does not match its schema: {exc}") from None
        finally:
            del message["seq"]
        return message

    async def publish(
        self,
        party_id: str,
        type: str,
        payload: Mapping[str, Any],
        *,
        trace_id: str | None = None,
    ) -> int:
        message = self.build(type, payload, trace_id)
        if not tracing.is_on():  # (checked here: a span's arguments cost even while off)
            try:  # _publish inlined: this is every event's path
                event = await self.backend.publish(party_id, message, self.clock())
            except orjson.JSONEncodeError as exc:
                raise InvalidEvent(f"{type} cannot be encoded: {exc}") from None
            if event.seq == 1:  # opens_epoch, inlined (it checks the rest)
                self._opened((event,))
            elif self.watch is not None:
                self.watch.wrote(party_id)
            return event.seq
        # One span per published event (a child of the engine's action span).
        with tracing.span("publish " + type, attributes={"party_sync.party_id": party_id}) as span:
            seq = await self._publish(party_id, message)
            if span is not None:
                span.set_attribute("party_sync.seq", seq)
            return seq

    async def publish_many(
        self,
        party_id: str,
        events: Sequence[tuple[str, Mapping[str, Any]]],
        *,
        trace_id: str | None = None,
        key: str | None = None,
    ) -> list[int]:
        """``BatchPublisher.publish_many``: every event checked, then one backend call (one
        atomic step, one script call and one pub/sub message in Redis mode); ``key``, the
        call's ``Idempotency-Key`` (``Backend.publish_many``)."""
        if key is not None and not is_trace_id(key):
            raise InvalidEvent("key must match [A-Za-z0-9._:-]{1,128}")
        messages = [self.build(type_, payload, trace_id) for type_, payload in events]
        if not tracing.is_on():  # _publish_many inlined: every action's answer takes this path
            try:
                published = await self.backend.publish_many(
                    party_id, messages, self.clock(), key=key
                )
            except orjson.JSONEncodeError as exc:
                raise InvalidEvent(f"an event cannot be encoded: {exc}") from None
            self._opened(published)
            return [event.seq for event in published]
        # One span per published event, as for publish() ("publish <type>"); they cover the same
        # single backend call, each inside the one before (a span is current until it ends).
        with contextlib.ExitStack() as stack:
            attributes: dict[str, str | int] = {
                "party_sync.party_id": party_id,
                "party_sync.batch": len(messages),
            }
            spans = [
                stack.enter_context(tracing.span("publish " + m["type"], attributes=attributes))
                for m in messages
            ]
            seqs = await self._publish_many(party_id, messages, key)
            for span, seq in zip(spans, seqs, strict=True):
                if span is not None:
                    span.set_attribute("party_sync.seq", seq)
            return seqs

    async def publish_many_built(
        self, party_id: str, messages: list[dict[str, Any]], key: str | None = None
    ) -> list[int]:
        """``publish_many`` of envelopes ``build`` made (the events API's batch route)."""
        return await self._publish_many(party_id, messages, key)

    async def _publish_many(
        self, party_id: str, messages: list[dict[str, Any]], key: str | None = None
    ) -> list[int]:
        try:
            published = await self.backend.publish_many(party_id, messages, self.clock(), key=key)
        except orjson.JSONEncodeError as exc:  # e.g. nested deeper than JSON can be encoded
            raise InvalidEvent(f"an event cannot be encoded: {exc}") from None
        self._opened(published)
        return [event.seq for event in published]

    async def _publish(self, party_id: str, message: dict[str, Any]) -> int:
        try:
            event = await self.backend.publish(party_id, message, self.clock())
        except orjson.JSONEncodeError as exc:  # e.g. nested deeper than JSON can be encoded
            raise InvalidEvent(f"{message['type']} cannot be encoded: {exc}") from None
        self._opened((event,))
        return event.seq

    async def reject(self, action: ActionRequest, message: str) -> None:
        await self.fail(action, ErrorCode.ACTION_REJECTED, message)

    def refusal(self, action: ActionRequest, code: ErrorCode, message: str) -> bytes:
        """The encoded ``system.error`` that refuses ``action`` (in reply to its sender)."""
        client_trace = action.envelope.get("trace_id")
        error = replies.error(
            code,
            message,
            now=self.clock(),
            trace_id=client_trace if isinstance(client_trace, str) else None,
            in_reply_type=t.ACTION_REQUEST,
            action_id=action.action_id,
        )
        return codec.encode(error)

    async def fail(self, action: ActionRequest, code: ErrorCode, message: str) -> None:
        """The action will never be applied: make the refusal its final answer, tell its sender.

        The refusal is kept in the ledger (a resend of the ``action_id`` gets it again, so a
        refusal lost on the way is never a player left waiting); if the action already has its
        final answer (a result, or an earlier refusal), nothing is sent.
        """
        await self.refuse(action, code, message)

    async def refuse(self, action: ActionRequest, code: ErrorCode, message: str) -> bool:
        """``fail``, saying whether the refusal became the action's final answer (False: it
        had one already, and nothing was sent)."""
        log.info(
            "action refused",
            extra={"trace_id": action.trace_id, "party_id": action.party_id, "code": code.value},
        )
        data = self.refusal(action, code, message)
        with tracing.span("refuse", attributes={"party_sync.error_code": code.value}):
            sender = await self.backend.refuse_action(
                action.party_id, action.action_id, action.character_id, data, self.clock()
            )
        if sender is not None and sender != t.PARTY_ACTOR:
            # told to the character whose action it is, by its record: a refusal through the
            # server API names its action in an envelope from outside (API probe: a wrong
            # character_id there sent another player the error); a party-level action (a
            # vote's result) has no connection to tell
            await self._tell(action, sender, data)
        return sender is not None

    async def claim(
        self, action: ActionRequest, *, trusted: bool = True, claimer: str | None = None
    ) -> Claim:
        """Right before an engine starts ``action`` (``LinkHost.claim``): START, EXPIRED, FINAL.

        EXPIRED: its deadline passed before anyone started it; it is refused now with
        ``action_timeout`` (told to its sender here) and must not run. ``trusted`` False: the
        action's deadline came from outside (the server API's claim) and may not be the one
        its record holds. ``claimer``: the serving node whose link delivers it, when not this
        one (an HTTP engine host's claim names the node that sent the delivery).
        """
        now = self.clock()
        # The refusal is recorded only past the deadline; the record's deadline is the one the
        # action carries (both made at acceptance), so before it the claim can only START or be
        # FINAL: the refusal is not built on the way of every action. A deadline from outside
        # may be another (a worker's in milliseconds): the refusal is built whatever it says,
        # or an EXPIRED by the record's own deadline recorded an empty answer (reverify probe).
        late = not trusted or action.deadline is None or now > action.deadline
        data = (
            self.refusal(action, ErrorCode.ACTION_TIMEOUT, "no engine started it in time")
            if late
            else NOT_LATE
        )
        if tracing.is_on():
            with tracing.span("claim", attributes={"party_sync.action_id": action.action_id}) as s:
                claim, sender = await self._claim(action, now, data, claimer)
                if s is not None:
                    s.set_attribute("party_sync.claim", claim.value)
        else:
            claim, sender = await self._claim(action, now, data, claimer)
        if claim is Claim.EXPIRED:
            log.info(
                "action expired before an engine started it",
                extra={"trace_id": action.trace_id, "action_id": action.action_id},
            )
            if sender is None and self.record_ttl is not None:
                accepted = codec.parse_time(action.envelope.get("timestamp"))
                if outlived_record(accepted, now, self.record_ttl):
                    # no record, and old enough to have outlived it: its sender was answered
                    # at its deadline (or has had a snapshot without it since); a second
                    # action_timeout, to a connection opened long after, would be a second
                    # final answer (backlog probe: a worker back after action_record_ttl)
                    return claim
            # its record's character (as ``refuse``); with no record (lost), the action's own
            sender = sender or action.character_id
            if sender != t.PARTY_ACTOR:
                await self._tell(action, sender, data)
        return claim

    async def answered(self, action: ActionRequest) -> bool:
        """Whether ``action`` has its final answer (``LinkHost.answered``): a look, no claim."""
        return await self.backend.action_answered(action.party_id, action.action_id)

    async def _tell(self, action: ActionRequest, sender: str, data: bytes) -> None:
        """Send ``action``'s refusal, already its final answer in the ledger, to its sender
        (``send_direct``: not in history). If Redis cannot take it now (a resharding's moment, a
        failover), it is tried again for up to ``TELL_PATIENCE`` s after the first failure
        (which may have taken a whole command timeout), then left to the deadline sweep and
        any resend, which send it again: never raised, the action is answered. (It
        was raised: the engine host's retry then found the action FINAL and said nothing, so a
        refusal lost in a resharding reached its player only at the deadline; cluster probe.)"""
        send = functools.partial(self.backend.send_direct, action.party_id, sender, data)
        try:
            await send()
            return
        except BackendUnavailable as exc:
            failure = exc  # (the patience counts from here: this try may have taken a whole
            # command timeout; a resharding held one 5 s, cluster probe)
        if await retried(send, BackendUnavailable, patience=TELL_PATIENCE, cap=TELL_PATIENCE):
            return
        log.warning(
            "refusal not delivered (%s): its sender gets it at the action's deadline or on a "
            "resend",
            failure,
            extra={"trace_id": action.trace_id, "action_id": action.action_id},
        )

    async def _claim(
        self, action: ActionRequest, now: float, refusal: bytes, claimer: str | None = None
    ) -> tuple[Claim, str | None]:
        """The claim, and for an EXPIRED one refused now the character whose action it is."""
        claim, said = await self.backend.claim_action(
            action.party_id,
            action.action_id,
            now,
            refusal,
            action.deadline,
            claimer or self.claimer,
        )
        return claim, said if isinstance(said, str) else None

    async def open_vote(self, request: VoteRequest) -> Event:
        """Open the vote ``request`` asks for: its ``vote.started`` event (with its ``seq``).

        Raises ``InvalidEvent`` for a malformed request or a party with no known run, and
        ``VoteConflict`` if the party already has an open vote.
        """
        try:
            spec = request.spec()
        except votes.SpecError as exc:
            raise InvalidEvent(str(exc)) from None
        party_id = request.party_id
        known = await self.backend.party_run(party_id)
        run = request.campaign_run_id or known
        if run is None:
            raise InvalidEvent(f"party {party_id} has no known campaign run: pass campaign_run_id")
        if known is not None and run != known:  # (votes probe: it ran, and its decision was
            raise InvalidEvent(  # then refused by the engine, after vote.finished)
                f"campaign_run_id {run!r} is not the run party {party_id} plays ({known!r})"
            )
        event = await self.backend.start_vote(
            party_id, spec, run, self.clock(), request.trace_id or codec.new_trace_id()
        )
        if self.watch is not None:
            self.watch.published((event,), run)
        return event

    async def request_vote(self, request: VoteRequest) -> Mapping[str, Any]:
        return (await self.open_vote(request)).payload
