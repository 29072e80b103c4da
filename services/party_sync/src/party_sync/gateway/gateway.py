"""The gateway: connections in, backend and engine out; a thin loop around the party core.

It authenticates nothing itself (the transport passes verified claims in), keeps no party state
of its own (the backend does), decides nothing about the game (the engine does), and decides
nothing about connections either: ``core.session.PartySessions`` does, without I/O or a clock.
What is left here is I/O: it feeds the core what happens (a connection opened or lost, a client
message, a party event, the time), sends the frames and closes it asks for, has the
``Executor`` carry out its backend and engine commands, holds one backend subscription per party
(``PartyHub``), and runs ONE timer over the core's deadline table (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, cast

from party_sync import tracing
from party_sync.auth import Claims
from party_sync.backends.base import Backend
from party_sync.config import Settings
from party_sync.core.binding import Binding
from party_sync.core.commands import BeginAction, Command, Commands
from party_sync.core.history import ResumePoint
from party_sync.core.limits import ConnectionLimits, LimitPolicy
from party_sync.core.session import PartySessions, Rules
from party_sync.engine.interface import EngineLink
from party_sync.engine.restating import EpochWatch
from party_sync.gateway.executor import Executor, MetricsMeter
from party_sync.gateway.hub import PartyHub
from party_sync.gateway.session import REFUSALS, Session, Sink, carry_local
from party_sync.metrics import Metrics
from party_sync.protocol import types as t
from party_sync.protocol.errors import BackendUnavailable, ErrorCode, PartySyncError
from party_sync.protocol.inbound import Inbound
from party_sync.protocol.schemas import Contracts
from party_sync.publishing import BackendPublisher
from party_sync.tasks import bounded, cancel_and_wait

log = logging.getLogger(__name__)

#: A deadline is handed to the core this long after it (wall clock and the loop's monotonic
#: clock drift apart; a deadline is never reported early).
TIMER_SLACK = 0.001
#: The least the engine link and the backend get to close, past the shutdown budget.
SHUTDOWN_MOMENT = 0.1


class Gateway:
    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        link: EngineLink,
        contracts: Contracts,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        node_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.link = link
        self.contracts = contracts
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self.metrics = metrics or Metrics(self.node_id)
        self.clock = clock
        # every epoch this node opens gets the engine asked to re-state the party, through the
        # link (a task of its own: never inside the publish, or the engine's handle_action)
        self.watch = EpochWatch(backend, link.notify_restate, clock, spawn=self._spawn)
        self.publisher = BackendPublisher(
            backend, contracts, clock, self.watch, record_ttl=settings.action_record_ttl
        )
        rules = Rules(
            action_timeout=settings.action_timeout,
            presence_grace=settings.presence_grace,
            presence_ttl=settings.presence_ttl,
            max_message_bytes=settings.max_message_bytes,
            heartbeat=settings.heartbeat,
            narration_idle=settings.narration_idle,
            action_record_ttl=settings.action_record_ttl,
        )
        self._wake = asyncio.Event()  # an earlier deadline was armed: the timer looks again
        self.core = PartySessions(rules, contracts, MetricsMeter(self.metrics), self._wake.set)
        self.executor = Executor(
            self.core,
            backend,
            link,
            self.publisher,
            self.metrics,
            clock,
            self._spawn,
            self._drop_hub,
            settings.max_replay,
        )
        self._hubs: dict[str, PartyHub] = {}
        self._hub_ready: dict[str, asyncio.Future[PartyHub]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Parties this node served since its last heartbeat (a member that came and went, an
        #: event published through its API): listed by the next one (``transport/admin.py``).
        self.touched: set[str] = set()
        self._policy = LimitPolicy.of(
            settings.rate_limit, settings.rate_burst, settings.max_message_bytes
        )
        self._idle = asyncio.Event()  # set whenever this node has no session
        self.timer: asyncio.Task[Any] | None = None  # the one timer, once started
        self.shutdown_deadline: float | None = None  # loop time: the drain's + shutdown_timeout

    @property
    def sessions(self) -> list[Session]:
        """This node's open connections."""
        return cast("list[Session]", list(self.core.connections.values()))

    @property
    def stopping(self) -> bool:
        """True once draining or stopping: no new timers, ``/readyz`` answers 503."""
        return self.core.stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self.core.stopping = value

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.backend.start()
        # (Redis mode: told when its pub/sub connection was replaced, messages perhaps lost)
        when_lost = getattr(self.backend, "when_messages_lost", None)
        if when_lost is not None:
            when_lost(self._messages_lost)
        # (and of events it published on its own, which may open an epoch: re-stated as any)
        self.watch.follow(self.backend)
        if self.executor.node_bound:  # its claims name this node (EngineLink.node_bound)
            self.publisher.claimer = self.executor.node_id
        await self.link.start(self.publisher)
        self.core.start(self.clock())
        self.timer = self._spawn(self._timer())

    def _messages_lost(self) -> None:
        if not self.core.stopping:
            self.core.answers_may_be_lost(self.clock())

    async def drain(self) -> None:
        """Stop taking part: tell every client to reconnect (1001) and wait for them to go."""
        self.shutdown_deadline = asyncio.get_running_loop().time() + self.settings.shutdown_timeout
        rest = carry_local(self.core.drain())  # the closes; then the graces handed over
        if rest:
            self._spawn(self.executor.run(rest))
        if self.core.connections:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.shutdown_timeout):
                    await self._idle.wait()

    def shutdown_left(self) -> float:
        """Seconds left of ``shutdown_timeout`` since the drain began (all of it before)."""
        if self.shutdown_deadline is None:
            return self.settings.shutdown_timeout
        return max(0.0, self.shutdown_deadline - asyncio.get_running_loop().time())

    async def stop(self) -> None:
        """Release the timer, background tasks, the engine link and the backend; what waits on
        the backend gets what is left of ``shutdown_timeout`` (a stalled Redis must not hold
        the exit for a command timeout), and at least a moment to close cleanly."""
        self.core.stop()
        # bounded: a task that swallowed its cancellation is left behind, never waited for
        await cancel_and_wait(list(self._tasks), what="a gateway background task")
        # each its own bound: the backend is closed even when the link was not in time
        for closing, what in ((self.link, "the engine link"), (self.backend, "the backend")):
            try:  # (tasks.bounded: a close that swallows its cancellation is left behind)
                await bounded(
                    closing.close(), max(self.shutdown_left(), SHUTDOWN_MOMENT), what=what
                )
            except TimeoutError:
                log.warning("%s did not close in time: left behind", what)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    def _later(self, commands: list[Command]) -> None:
        self._spawn(self.executor.run(commands))

    async def _timer(self) -> None:
        """The one timer: sleep until the earliest deadline (or an earlier one is armed), then
        hand every deadline due to the core; each one's commands run as a task of their own."""
        core = self.core
        while not core.stopping:
            due = core.deadlines.next_due()
            self._wake.clear()
            delay = None if due is None else due - self.clock()
            if delay is None or delay > 0:
                timeout = None if delay is None else delay + TIMER_SLACK
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                continue
            for commands in core.deadlines_reached(self.clock()):
                try:
                    rest = carry_local(commands)
                except Exception:  # a frame or close that failed must not stop the timer
                    log.exception("a deadline's commands failed")
                    continue
                if rest:
                    self._later(rest)

    async def publish_to_run(
        self, campaign_run_id: str, message: dict[str, Any], *, key: str | None = None
    ) -> dict[str, int]:
        """Publish a checked event into the stream of every party of a run; ``{party: seq}``.

        It is also sent on the run's channel (``run:<campaign_run_id>``) for other services.
        ``key`` (an ``Idempotency-Key``) is each party's (``Backend.publish``): a retry publishes
        only into the parties that did not have it yet, and answers every party's seq; the run's
        channel is sent it again (at least once there).
        """
        seqs: dict[str, int] = {}
        now = self.clock()
        for party_id in await self.backend.run_parties(campaign_run_id):
            event = await self.backend.publish(party_id, message, now, key=key)
            self.watch.published((event,), campaign_run_id)  # (its state may just have gone)
            seqs[party_id] = event.seq
        await self.backend.publish_run(campaign_run_id, message)
        return seqs

    # -- connections ----------------------------------------------------------------------------
    async def open(
        self,
        claims: Claims,
        sink: Sink,
        resume: ResumePoint | None = None,
        *,
        available: bool = True,
        limits: ConnectionLimits | None = None,
    ) -> Session:
        """Bind a new connection, announce it, and send its ``system.hello`` (and any replay).
        ``available=False``: the backend failed the handshake's checks; the connection gets
        ``backend_unavailable`` and close 1011 (retry) without touching it. ``limits``: the
        connection's (``connection_limits``), if they counted its bytes before it opened."""
        binding = Binding(
            claims.party_id, claims.campaign_run_id, claims.character_id, claims.display_name
        )
        self.touched.add(claims.party_id)
        session = Session(  # "<node_id>.<random>": the admin API tells which node holds it
            f"{self.node_id}.{uuid.uuid4().hex}",
            binding,
            sink,
            self.connection_limits() if limits is None else limits,
            claims.ends_at,
        )
        # from here on, live events are buffered for it
        commands = self.core.open(session, resume, self.clock())
        try:
            try:
                if not available:
                    raise BackendUnavailable("the handshake's checks could not be made")
                await self._hub(binding.party_id)
            except BackendUnavailable:
                await self.executor.run(self.core.open_failed(session, self.clock()))
                return session
            await self.executor.run(commands)
        except BaseException as exc:
            # Anything else (a bug, a cancelled handshake): the core forgets the session at once,
            # or it would stay there syncing, its buffer growing with every event of the party.
            leftover = self.core.connection_lost(session, self.clock())
            if not self.core.connections:
                self._idle.set()
            if not isinstance(exc, asyncio.CancelledError):
                with contextlib.suppress(Exception):
                    await self.executor.run(leftover)
            raise
        return session

    async def connection_lost(self, session: Session) -> None:
        """The socket is gone: forget it and, if it was the character's last, start grace."""
        commands = self.core.connection_lost(session, self.clock())
        if not self.core.connections:
            self._idle.set()
        await self.executor.run(commands)

    def close_character(self, party_id: str, character_id: str, code: int, reason: str) -> int:
        """Close this node's connections of one character (an operator's request, on every node
        through ``AdminView.request_close``); returns how many were open."""
        count, commands = self.core.close_character(party_id, character_id, code, reason)
        carry_local(commands)
        return count

    async def _hub(self, party_id: str) -> PartyHub:
        hub = self._hubs.get(party_id)
        if hub is not None:
            return hub
        pending = self._hub_ready.get(party_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[PartyHub] = asyncio.get_running_loop().create_future()
        self._hub_ready[party_id] = future
        hub = PartyHub(party_id, self.core, self.clock, self._later)
        try:
            hub.subscription = await self.backend.subscribe(party_id, hub)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it
            raise
        finally:
            del self._hub_ready[party_id]
        self._hubs[party_id] = hub
        self.metrics.parties.set(len(self._hubs))
        future.set_result(hub)
        return hub

    async def _drop_hub(self, party_id: str) -> None:
        hub = self._hubs.pop(party_id, None)
        if hub is None:
            return
        self.metrics.parties.set(len(self._hubs))
        if hub.subscription is not None:
            await hub.subscription.close()

    # -- inbound --------------------------------------------------------------------------------
    async def receive(self, session: Session, data: bytes | str, binary: bool = False) -> None:
        """Handle one client message (``binary``: it came in a binary frame, refused as
        ``bad_json``). Never raises: every refusal becomes a ``system.error``."""
        now = self.clock()
        message: Inbound | None = None
        try:
            parsed = self.core.parse(session, data, now, binary)
            if isinstance(parsed, list):
                carry_local(parsed)
                return
            message = parsed
            if message.type != t.ACTION_REQUEST or not tracing.is_on():
                commands = self.core.handle(session, message, now)
                if len(commands) == 1 and type(commands[0]) is BeginAction:  # the hot path
                    await self.executor.begin_action(commands[0])
                else:
                    await self.executor.run(commands)
            else:
                await self._traced(session, message, now)
        except Exception:  # a bug answers this message with internal_error, nothing more
            log.exception("unexpected failure handling a message")
            carry_local(self.core.failed(session, message, ErrorCode.INTERNAL_ERROR, now))

    def connection_limits(self) -> ConnectionLimits:
        """A new connection's rate limits (``settings.rate_limit``, ``rate_burst``, and the byte
        rate they make with ``max_message_bytes``)."""
        return ConnectionLimits(self._policy)

    def flooded(self, session: Session) -> None:
        """The client sent more bytes than its byte rate before its session opened: closed."""
        carry_local(self.core.flooded(session))

    def received_bytes(self, session: Session, size: int) -> bool:
        """``size`` bytes read from the client's socket: whether to parse them. Past its byte
        rate the connection is closed (1008) and nothing more it sends is parsed. Never raises."""
        return self._within(
            lambda: self.core.received_bytes(session, size, self.clock()),
            "unexpected failure counting a client's bytes",
            failed=True,
        )

    def control_frame(self, session: Session) -> bool:
        """A ping or pong frame from the client: whether it is within the connection's message
        rate (a ping is then answered). Past it, refused like an excess message (``rate_limited``,
        then a policy close). Never raises."""
        return self._within(
            lambda: self.core.control_frame(session, self.clock()),
            "unexpected failure handling a control frame",
            failed=False,
        )

    @staticmethod
    def _within(decide: Callable[[], Commands | None], failure: str, *, failed: bool) -> bool:
        """Whether a connection's limit admits what ``decide`` looked at; its refusal, if any,
        carried out. A failure of ``decide`` is logged with ``failure`` and answered ``failed``."""
        try:
            refusal = decide()
        except Exception:
            log.exception(failure)
            return failed
        if refusal is None:
            return True
        carry_local(refusal)
        return False

    async def _traced(self, session: Session, message: Inbound, now: float) -> None:
        """An ``action.request`` as the root span of the action's trace (tracing.py), ending
        with the refusal's code if it is refused."""
        attributes = {
            "party_sync.party_id": session.party_id,
            "party_sync.character_id": session.character_id,
            "party_sync.action_id": str(message.payload["action_id"]),
        }
        refusals: list[ErrorCode] = []
        token = REFUSALS.set(refusals)
        try:
            with (
                contextlib.suppress(_Refused),
                tracing.action_span(message.trace_id, attributes=attributes),
            ):
                await self.executor.run(self.core.handle(session, message, now))
                if refusals:
                    raise _Refused(refusals[-1])
        finally:
            REFUSALS.reset(token)


class _Refused(PartySyncError):
    """Ends an action's span with its refusal's code (``tracing`` records ``code``)."""

    def __init__(self, code: ErrorCode) -> None:
        super().__init__(code.value)
        self.code = code
