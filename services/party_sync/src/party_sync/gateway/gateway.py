"""The gateway: connections in, backend and engine out.

It authenticates nothing itself (the transport passes verified claims in), keeps no party state
of its own (the backend does), and decides nothing about the game (the engine does). What it does:
bind a connection to its claims, check each client message (``protocol.inbound``), apply the
idempotency verdicts, arm the timers the core asks for (presence grace, token expiry, vote
deadlines; action timeouts by one periodic sweep), and fan events out through one ``PartyHub``
per party.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from datetime import datetime
from typing import Any

import orjson

from party_sync import tracing
from party_sync.auth import Claims
from party_sync.backends.base import Backend
from party_sync.config import Settings
from party_sync.core import votes
from party_sync.core.actions import Decision, Sweep
from party_sync.core.binding import Binding
from party_sync.core.events import Event
from party_sync.core.history import ResumePoint
from party_sync.core.limits import ConnectionLimits, LimitPolicy
from party_sync.core.presence import RefreshSchedule
from party_sync.engine.interface import (
    ActionRequest,
    EngineLink,
    JoinNotice,
    RestateNotice,
    action_envelope,
)
from party_sync.gateway import messages
from party_sync.gateway.hub import PartyHub
from party_sync.gateway.session import Session, Sink
from party_sync.metrics import Metrics
from party_sync.protocol import codec, inbound, replies
from party_sync.protocol import types as t
from party_sync.protocol.errors import (
    BAD_INPUT,
    BackendUnavailable,
    CloseCode,
    ErrorCode,
    ProtocolError,
)
from party_sync.protocol.schemas import Contracts
from party_sync.publishing import BackendPublisher

log = logging.getLogger(__name__)

#: Seconds ``stop()`` waits for the background tasks it cancelled.
STOP_TIMEOUT = 5.0

#: The presence refresh period is cut in this many slices, each refreshing its share of parties.
PRESENCE_SLICES = 8


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
        self.publisher = BackendPublisher(backend, contracts, clock)
        self.sessions: set[Session] = set()
        self._hubs: dict[str, PartyHub] = {}
        self._hub_ready: dict[str, asyncio.Future[PartyHub]] = {}
        # (party_id, action_id) → (session, due at, action) of the actions whose sender has no
        # final answer yet, in due order: the timeout sweep stops at the first one not yet due.
        self._pending: dict[tuple[str, str], tuple[Session, float, ActionRequest]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}  # session id → token expiry
        self._vote_timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._policy = LimitPolicy(settings.rate_limit, settings.rate_burst)
        self._limits = {
            "max_message_bytes": settings.max_message_bytes,
            "action_timeout_ms": int(settings.action_timeout * 1000),
            "heartbeat_ms": int(settings.heartbeat * 1000),
        }
        self.stopping = False
        self._idle = asyncio.Event()  # set whenever this node has no session
        self._failing: set[str] = set()  # periodic tasks whose last tick failed (log once)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.backend.start()
        await self.link.start(self.publisher)
        self._spawn(self._presence_loop())
        self._spawn(self._timeout_loop())

    async def drain(self) -> None:
        """Stop taking part: tell every client to reconnect (1001) and wait for them to go."""
        self.stopping = True
        for session in list(self.sessions):
            session.close(CloseCode.GOING_AWAY, "server shutting down: reconnect")
            self.metrics.closes.labels(str(CloseCode.GOING_AWAY)).inc()
        if self.sessions:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.shutdown_timeout):
                    await self._idle.wait()

    async def stop(self) -> None:
        """Release timers, background tasks, the engine link and the backend."""
        self.stopping = True
        self._pending.clear()
        for handle in [*self._timers.values(), *self._vote_timers.values()]:
            handle.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            # A cancellation can be swallowed inside a library call (redis-py does, now and
            # then): the loops also stop on ``stopping`` at their next tick, and a task that
            # still does not end in time is left behind rather than hanging the shutdown.
            _, late = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            for task in late:
                log.warning("a background task did not stop in time: %s", task.get_name())
        await self.link.close()
        await self.backend.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _later(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Timer callback: run ``fn(*args)`` (the coroutine is made only when the timer fires)."""
        if not self.stopping:
            self._spawn(fn(*args))

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def publish_to_run(self, campaign_run_id: str, message: dict[str, Any]) -> dict[str, int]:
        """Publish a checked event into the stream of every party of a run; ``{party: seq}``.

        It is also sent on the run's channel (``run:<campaign_run_id>``) for other services.
        """
        seqs: dict[str, int] = {}
        now = self.clock()
        for party_id in await self.backend.run_parties(campaign_run_id):
            seqs[party_id] = (await self.backend.publish(party_id, message, now)).seq
        await self.backend.publish_run(campaign_run_id, message)
        return seqs

    # -- connections ----------------------------------------------------------------------------
    async def open(self, claims: Claims, sink: Sink, resume: ResumePoint | None = None) -> Session:
        """Bind a new connection, announce it, and send its ``system.hello`` (and any replay)."""
        binding = Binding(
            claims.party_id, claims.campaign_run_id, claims.character_id, claims.display_name
        )
        session = Session(  # "<node_id>.<random>": the admin API tells which node holds it
            f"{self.node_id}.{uuid.uuid4().hex}",
            binding,
            sink,
            ConnectionLimits(self._policy),
            claims.exp,
        )
        self.sessions.add(session)
        self.metrics.connections.set(len(self.sessions))
        try:
            hub = await self._hub(binding.party_id)
            hub.sessions.add(session)  # from here on, live events are buffered for it
            now = self.clock()
            join = await self.backend.connect(binding, session.id, now, codec.new_trace_id())
            snapshot = await self.backend.snapshot(binding.party_id)
            if join is not None:
                self._spawn(self._announce(binding, join, snapshot.epoch))
            replay = None
            if resume is not None:
                replay = await self.backend.replay(
                    binding.party_id, resume, self.settings.max_replay
                )
                self.metrics.resumes.labels("resumed" if replay is not None else "snapshot").inc()
        except BackendUnavailable:
            session.send(self._error_bytes(ErrorCode.BACKEND_UNAVAILABLE, "backend unavailable"))
            session.close(CloseCode.INTERNAL_ERROR, "backend unavailable: retry")
            return session
        resumed_from = resume.last_seq if replay is not None and resume is not None else None
        hello = messages.hello(
            binding,
            snapshot,
            resumed_from=resumed_from,
            limits=self._limits,
            your_vote=snapshot.ballots.get(binding.character_id),
            now=self.clock(),
        )
        session.send(codec.encode(hello))
        self.metrics.sent(t.HELLO)
        last = snapshot.seq
        if replay is not None and resume is not None:
            for data in replay:
                session.send(data)
            last = max(last, resume.last_seq + len(replay))
        session.go_live(last)
        self._arm_expiry(session)
        return session

    async def close(self, session: Session) -> None:
        """The connection is gone: forget it and, if it was the character's last, start grace."""
        self.sessions.discard(session)
        self.metrics.connections.set(len(self.sessions))
        if not self.sessions:
            self._idle.set()
        timer = self._timers.pop(session.id, None)
        if timer is not None:
            timer.cancel()
        hub = self._hubs.get(session.party_id)
        if hub is not None:
            hub.sessions.discard(session)
            if not hub.sessions:
                await self._drop_hub(hub)
        try:
            last = await self.backend.disconnect(session.binding, session.id, self.clock())
        except BackendUnavailable:
            return  # presence expires by itself (presence_ttl)
        if last and not self.stopping:
            loop = asyncio.get_running_loop()
            loop.call_later(
                self.settings.presence_grace, self._later, self._settle, session.binding
            )

    def close_character(self, party_id: str, character_id: str, code: int, reason: str) -> int:
        """Close this node's connections of one character (an operator's request, on every node
        through ``AdminView.request_close``); returns how many were open."""
        hub = self._hubs.get(party_id)
        closing = [s for s in hub.sessions_of(character_id) if not s.closed] if hub else []
        for session in closing:
            session.close(code, reason)
            self.metrics.closes.labels(str(code)).inc()
        return len(closing)

    async def _settle(self, binding: Binding) -> None:
        try:
            left = await self.backend.settle(binding, self.clock(), codec.new_trace_id())
        except BackendUnavailable:
            # the presence sweep announces the leave once Redis is back (presence_ttl)
            self.metrics.background_errors.labels("settle").inc()
            return
        self.metrics.settles.labels("left" if left is not None else "stayed").inc()

    async def _announce(self, binding: Binding, join: Event, epoch: str) -> None:
        """Tell the engine of a ``party.join`` this node published; and, if that join opened a
        new epoch (seq 1: the party's short-lived state was lost, or it is new), ask the engine
        to re-state the party (``RestateNotice``; an engine without state for the run does
        nothing)."""
        if join.seq == 1:  # first: an engine that had the run re-states it, and then the join
            # of a known character changes nothing; a new run has nothing to re-state and is
            # started by the join
            restate = RestateNotice(binding.party_id, binding.campaign_run_id, epoch, join.trace_id)
            log.info(
                "new epoch: asking the engine to re-state the party",
                extra={"trace_id": join.trace_id, "party_id": binding.party_id, "epoch": epoch},
            )
            try:
                await self.link.notify_restate(restate)
            except Exception as exc:
                log.warning(
                    "re-state notice not delivered: %s", exc, extra={"trace_id": join.trace_id}
                )
        notice = JoinNotice(
            binding.party_id,
            binding.campaign_run_id,
            binding.character_id,
            binding.display_name,
            join.trace_id,
        )
        try:
            await self.link.notify_join(notice)
        except Exception as exc:  # a hint only: the engine must not depend on it
            log.warning("join notice not delivered: %s", exc, extra={"trace_id": join.trace_id})

    async def _hub(self, party_id: str) -> PartyHub:
        hub = self._hubs.get(party_id)
        if hub is not None:
            return hub
        pending = self._hub_ready.get(party_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[PartyHub] = asyncio.get_running_loop().create_future()
        self._hub_ready[party_id] = future
        hub = PartyHub(party_id, self._on_party_event, self._on_direct)
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

    async def _drop_hub(self, hub: PartyHub) -> None:
        if self._hubs.get(hub.party_id) is hub:
            del self._hubs[hub.party_id]
            self.metrics.parties.set(len(self._hubs))
        if hub.subscription is not None:
            await hub.subscription.close()

    def _arm_expiry(self, session: Session) -> None:
        delay = max(0.0, session.expires_at - self.clock())
        loop = asyncio.get_running_loop()
        self._timers[session.id] = loop.call_later(delay, self._expire_token, session)

    def _expire_token(self, session: Session) -> None:
        self._timers.pop(session.id, None)
        session.send(self._error_bytes(ErrorCode.TOKEN_EXPIRED, "token expired: reconnect"))
        session.close(CloseCode.TOKEN_EXPIRED, "token expired")
        self.metrics.closes.labels(str(CloseCode.TOKEN_EXPIRED)).inc()

    async def _presence_loop(self) -> None:
        """Refresh this node's presence and sweep expired presence (a dead node's players).

        Every connection is refreshed once per ``presence_ttl / 3``, a slice of the parties at a
        time (``PRESENCE_SLICES`` a period, each party always in the same slice): refreshing
        thousands of connections in one go is one long Redis pipeline, a latency spike for
        everything queued behind it (measured: p99 of 30 ms at a light load, docs/benchmarks.md).
        """
        schedule = RefreshSchedule(max(0.15, self.settings.presence_ttl), PRESENCE_SLICES)
        while not self.stopping:
            await asyncio.sleep(schedule.interval)
            now = self.clock()
            tick = schedule.tick(now)
            schedule.failed()  # undone below once this tick gets through
            with self._tick("presence") as ok:
                connections = [
                    (s.binding, s.id)
                    for s in self.sessions
                    if not s.closed
                    and (tick.slice is None or hash(s.party_id) % PRESENCE_SLICES == tick.slice)
                ]
                rejoined = await self.backend.refresh(connections, now)
                await self._announce_rejoins(rejoined, [b for b, _ in connections])
                if tick.sweep:
                    await self.backend.expire(now)
                schedule.succeeded()
                ok.set()
            with self._tick("votes") as ok:
                for party_id, vote_id in await self.backend.due_votes(now):
                    await self._finish_vote(party_id, vote_id)  # a vote whose timers all died
                # decisions whose node could not hand them to the engine (it failed or died)
                unapplied = await self.backend.unapplied_votes(now, self.settings.action_timeout)
                for finished in unapplied:
                    await self._apply_vote(finished)
                ok.set()

    async def _announce_rejoins(self, events: Sequence[Event], bindings: list[Binding]) -> None:
        """``party.join``s that ``refresh`` re-announced (a leave was published while this node's
        connection lived, e.g. during a Redis stall; or Redis lost the party): tell the engine as
        for any join. ``bindings``: the refreshed connections' (their sessions may be gone by now:
        a new epoch makes the node resync them)."""
        by_member = {(b.party_id, b.character_id): b for b in bindings}
        for event in events:
            binding = by_member.get((event.party_id, event.payload["character_id"]))
            if binding is None:
                continue
            epoch = (await self.backend.snapshot(event.party_id)).epoch if event.seq == 1 else ""
            self._spawn(self._announce(binding, event, epoch))

    @contextlib.contextmanager
    def _tick(self, task: str) -> Iterator[asyncio.Event]:
        """One tick of a periodic task: any failure is counted, logged once per episode (not per
        tick), and the task goes on; the tick that works again logs the recovery."""
        ok = asyncio.Event()
        try:
            yield ok
        except Exception as exc:
            self.metrics.background_errors.labels(task).inc()
            if task not in self._failing:
                self._failing.add(task)
                if isinstance(exc, BackendUnavailable):
                    log.warning("%s: backend unavailable; retrying every tick", task)
                else:
                    log.exception("%s failed; retrying every tick", task)
            return
        if ok.is_set() and task in self._failing:
            self._failing.discard(task)
            log.info("%s: recovered", task)

    async def _timeout_loop(self) -> None:
        """Time out the actions in flight for longer than ``action_timeout``.

        One sweep every ``action_timeout / 4`` (at most 0.5 s) instead of a timer per action: an
        accepted action costs a dict entry, not a heap entry plus a cancel, and a timeout is
        reported at most that much late.
        """
        interval = min(0.5, max(0.01, self.settings.action_timeout / 4))
        while not self.stopping:
            await asyncio.sleep(interval)
            with self._tick("action_timeouts") as ok:
                self._sweep_timeouts(self.clock())
                ok.set()

    def _sweep_timeouts(self, now: float) -> None:
        """Hand every pending action whose deadline passed to ``_time_out`` (in due order)."""
        due: list[tuple[str, str]] = []
        for key, (_, deadline, _) in self._pending.items():
            if deadline > now:
                break
            due.append(key)
        for key in due:
            session, _, action = self._pending.pop(key)
            self._spawn(self._time_out(action, session))

    def _watch(self, session: Session, action: ActionRequest, due: float) -> None:
        """Check ``action`` again at ``due`` unless its final answer reaches ``session`` first."""
        key = (action.party_id, action.action_id)
        self._pending.pop(key, None)  # re-inserted at the end: the dict stays in due order
        self._pending[key] = (session, due, action)

    # -- inbound --------------------------------------------------------------------------------
    async def receive(self, session: Session, data: bytes | str) -> None:
        """Handle one client message. Never raises: every refusal becomes a ``system.error``."""
        now = self.clock()
        if not session.limits.admit(now):
            refusal = ProtocolError(ErrorCode.RATE_LIMITED, "slow down", **_about_raw(data))
            self._refuse(session, refusal, now)
            return
        message: inbound.Inbound | None = None
        try:
            message = inbound.parse(data, self.contracts, self.settings.max_message_bytes)
            self.metrics.received(message.type)
            if message.type == t.ACTION_REQUEST:
                await self._receive_action(session, message, now)
            elif message.type == t.PARTY_LEAVE:
                await self._receive_leave(session, message, now)
            else:  # vote.cast
                await self._receive_vote(session, message)
        except ProtocolError as exc:
            self._refuse(session, exc, now)
        except BackendUnavailable:
            text = "backend unavailable: retry"
            error = ProtocolError(ErrorCode.BACKEND_UNAVAILABLE, text, **_about(message))
            self._refuse(session, error, now)
        except Exception:
            log.exception("unexpected failure handling a message")
            error = ProtocolError(ErrorCode.INTERNAL_ERROR, "internal error", **_about(message))
            self._refuse(session, error, now)

    def _refuse(self, session: Session, exc: ProtocolError, now: float) -> None:
        self.metrics.errors.labels(exc.code.value).inc()
        log.info(
            "message refused",
            extra={
                "trace_id": exc.trace_id,
                "party_id": session.party_id,
                "character_id": session.character_id,
                "code": exc.code.value,
            },
        )
        session.send(codec.encode(replies.from_protocol_error(exc, now=now)))
        strike = exc.code in BAD_INPUT or exc.code is ErrorCode.RATE_LIMITED
        if strike and session.limits.strike(now):
            session.close(CloseCode.POLICY_VIOLATION, "too many bad or excess messages")
            self.metrics.closes.labels(str(CloseCode.POLICY_VIOLATION)).inc()

    def _error_bytes(self, code: ErrorCode, message: str) -> bytes:
        return codec.encode(replies.error(code, message, now=self.clock()))

    async def _receive_action(self, session: Session, message: inbound.Inbound, now: float) -> None:
        """An ``action.request``: the root span of the action's trace (tracing.py) when on."""
        if not tracing.is_on():
            await self._accept_action(session, message, now)
            return
        attributes = {
            "party_sync.party_id": session.party_id,
            "party_sync.character_id": session.character_id,
            "party_sync.action_id": str(message.payload["action_id"]),
        }
        with tracing.action_span(message.trace_id, attributes=attributes):
            await self._accept_action(session, message, now)

    async def _accept_action(self, session: Session, message: inbound.Inbound, now: float) -> None:
        p = message.payload
        action_id: str = p["action_id"]

        def refuse(code: ErrorCode, text: str) -> ProtocolError:
            return ProtocolError(
                code,
                text,
                action_id=action_id,
                trace_id=message.client_trace_id,
                type=t.ACTION_REQUEST,
            )

        if p["character_id"] != session.character_id:
            raise refuse(ErrorCode.FORBIDDEN, "this connection cannot act for that character")
        if p["campaign_run_id"] != session.binding.campaign_run_id:
            raise refuse(ErrorCode.FORBIDDEN, "this connection is bound to another campaign run")
        if action_id.startswith(t.RESERVED_ACTION_PREFIX):
            # server-made ids (a finished vote is applied as "vote:<vote_id>") are unforgeable
            raise refuse(ErrorCode.FORBIDDEN, "action_ids starting with 'vote:' are reserved")
        try:
            verdict = await self.backend.begin_action(
                session.party_id, session.character_id, action_id, now
            )
        except BackendUnavailable:
            # Not a final answer: Redis refuses a begin_action it runs too late (begin_action.lua),
            # so the action was not accepted, or it was and its answer comes as for any action.
            raise refuse(ErrorCode.BACKEND_UNAVAILABLE, "backend unavailable: retry") from None
        if verdict.decision is Decision.DONE:
            assert verdict.result is not None
            session.send(verdict.result)  # the final answer (same bytes), to the sender only
            return
        deadline = now + self.settings.action_timeout
        if verdict.decision is Decision.IN_FLIGHT:
            # The sender may have missed the first answer (a reconnect): it is owed one here.
            self._watch(session, self._action(session, message, now, deadline), deadline)
            raise refuse(ErrorCode.ACTION_IN_FLIGHT, "this action is already being processed")
        if verdict.decision is Decision.BUSY:
            raise refuse(ErrorCode.CHARACTER_BUSY, "wait for the result of your previous action")
        if verdict.decision is Decision.TAKEN:
            raise refuse(
                ErrorCode.FORBIDDEN, "this action_id is used by another actor: choose another"
            )
        action = self._action(session, message, now, deadline)
        self._watch(session, action, deadline)
        log.debug(
            "action accepted",
            extra={
                "trace_id": message.trace_id,
                "party_id": session.party_id,
                "action_id": action_id,
            },
        )
        try:
            await self.link.submit(action)
        except BackendUnavailable:
            # The actions stream could not be reached; the append may still run when Redis is
            # back. Not final: the action is started by an engine or timed out at its deadline.
            raise refuse(ErrorCode.BACKEND_UNAVAILABLE, "backend unavailable: retry") from None
        except Exception:
            log.exception("engine link refused an action", extra={"trace_id": message.trace_id})
            await self.fail_action(
                action, ErrorCode.ENGINE_UNAVAILABLE, "engine unavailable: retry"
            )

    def _action(
        self, session: Session, message: inbound.Inbound, now: float, deadline: float
    ) -> ActionRequest:
        envelope = action_envelope(message.payload, message.trace_id, now)
        return ActionRequest.from_envelope(session.party_id, envelope, deadline)

    async def _time_out(self, action: ActionRequest, session: Session) -> None:
        """The action's deadline passed and its sender has no final answer yet: find out why.

        Nobody started it: it is refused now with ``action_timeout`` (a promise: never applied).
        An engine started it: its answer will come from the engine; look again one timeout later
        (a refusal lost on the way is then found and sent). Its answer exists (lost on the way):
        send it again. Its record is gone (Redis lost it): the outcome is unknown, so the sender
        gets a non-final ``backend_unavailable``: resending the same action_id is safe.
        Redis unreachable: look again later; this never raises.
        """
        now = self.clock()
        refusal = self._action_error(
            action, ErrorCode.ACTION_TIMEOUT, "no engine started it in time"
        )
        try:
            outcome, answer = await self.backend.time_out_action(
                action.party_id, action.action_id, now, refusal
            )
        except BackendUnavailable:
            self.metrics.background_errors.labels("action_timeouts").inc()
            if not session.closed:
                self._watch(session, action, now + min(1.0, self.settings.action_timeout))
            return
        if outcome is Sweep.TIMED_OUT:
            self.metrics.errors.labels(ErrorCode.ACTION_TIMEOUT.value).inc()
            self.metrics.action_answers.labels("timeout").inc()
            await self._answer(session, action, refusal)
        elif outcome is Sweep.FINAL:
            assert answer is not None
            self.metrics.action_answers.labels("resent").inc()
            await self._answer(session, action, answer)
        elif outcome is Sweep.GONE:
            self.metrics.errors.labels(ErrorCode.BACKEND_UNAVAILABLE.value).inc()
            gone = self._action_error(
                action,
                ErrorCode.BACKEND_UNAVAILABLE,
                "the party's state was lost: send the same action again to learn its outcome",
            )
            await self._answer(session, action, gone)
        elif not session.closed:  # STARTED / NOT_DUE
            self._watch(session, action, now + self.settings.action_timeout)

    async def _answer(self, session: Session, action: ActionRequest, data: bytes) -> None:
        """Send an action's answer to its sender: on ``session``, or (closed: the player may have
        reconnected elsewhere) to every connection of the character."""
        if not session.closed:
            session.send(data)
            return
        if action.character_id == t.PARTY_ACTOR:
            return
        with contextlib.suppress(BackendUnavailable):
            await self.backend.send_direct(action.party_id, action.character_id, data)

    def _action_error(self, action: ActionRequest, code: ErrorCode, text: str) -> bytes:
        client_trace = action.envelope.get("trace_id")
        return codec.encode(
            replies.error(
                code,
                text,
                now=self.clock(),
                trace_id=client_trace if isinstance(client_trace, str) else None,
                in_reply_type=t.ACTION_REQUEST,
                action_id=action.action_id,
            )
        )

    async def fail_action(self, action: ActionRequest, code: ErrorCode, text: str) -> None:
        """An action will never be applied: its refusal is its final answer (on whichever node).

        If the refusal cannot be recorded (Redis down), the sweep answers at the deadline.
        """
        self.metrics.errors.labels(code.value).inc()
        with contextlib.suppress(BackendUnavailable):
            await self.publisher.fail(action, code, text)

    def _on_direct(self, party_id: str, character_id: str, data: bytes) -> None:
        """A direct message reached this node's sessions of a character: if it answers an
        action, that action's sender has its final answer (the sweep need not look again)."""
        if b'"action_id"' not in data:
            return
        try:
            action_id = codec.decode(data)["payload"]["in_reply_to"]["action_id"]
        except (ValueError, KeyError, TypeError):
            return
        pending = self._pending.get((party_id, action_id))
        if pending is not None and pending[0].character_id == character_id:
            del self._pending[(party_id, action_id)]

    def _on_party_event(self, event: Event) -> None:
        """Node-level reactions to a party event (after it was fanned out to the sessions)."""
        hub = self._hubs.get(event.party_id)
        if hub is not None:
            self.metrics.sent(event.type, len(hub.sessions))
        if event.type == t.ACTION_RESULT:
            pending = self._pending.pop((event.party_id, event.payload["action_id"]), None)
            if pending is not None:
                accepted = (pending[2].deadline or 0.0) - self.settings.action_timeout
                self.metrics.engine_latency.observe(max(0.0, self.clock() - accepted))
        elif event.type == t.VOTE_STARTED:
            self._arm_vote_deadline(event)
        elif event.type == t.VOTE_FINISHED:
            timer = self._vote_timers.pop(
                (event.party_id, "vote:" + event.payload["vote_id"]), None
            )
            if timer is not None:
                timer.cancel()
        elif event.type == t.PARTY_LEAVE and event.payload.get("reason") == t.LEAVE_LEFT:
            for session in hub.sessions_of(event.payload["character_id"]) if hub else ():
                session.close(CloseCode.NORMAL, "left the party")

    async def _receive_leave(self, session: Session, message: inbound.Inbound, now: float) -> None:
        if message.payload["character_id"] != session.character_id:
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                "a connection can only leave for its own character",
                trace_id=message.client_trace_id,
                type=t.PARTY_LEAVE,
            )
        event = await self.backend.leave(session.binding, now, message.trace_id)
        if event is None:  # not a member (already left): just close this connection
            session.close(CloseCode.NORMAL, "left the party")

    async def _receive_vote(self, session: Session, message: inbound.Inbound) -> None:
        vote_id, option = message.payload["vote_id"], message.payload["option"]
        refusal, events = await self.backend.cast_vote(
            session.party_id, session.character_id, vote_id, option, self.clock(), message.trace_id
        )
        if refusal is not None:
            raise ProtocolError(
                ErrorCode(refusal.value),
                _VOTE_REFUSALS[refusal],
                vote_id=vote_id,
                trace_id=message.client_trace_id,
                type=t.VOTE_CAST,
            )
        for event in events:
            if event.type == t.VOTE_FINISHED:
                self._spawn(self._apply_vote_soon(event))

    # -- votes ----------------------------------------------------------------------------------
    def _arm_vote_deadline(self, event: Event) -> None:
        key = (event.party_id, "vote:" + event.payload["vote_id"])
        if key in self._vote_timers:
            return
        deadline = datetime.fromisoformat(event.payload["deadline"]).timestamp()
        delay = max(0.0, deadline - self.clock()) + 0.002  # just past it: the deadline is inclusive
        self._vote_timers[key] = asyncio.get_running_loop().call_later(
            delay, self._later, self._finish_vote, event.party_id, event.payload["vote_id"]
        )

    async def _finish_vote(self, party_id: str, vote_id: str) -> None:
        self._vote_timers.pop((party_id, "vote:" + vote_id), None)
        try:
            event = await self.backend.finish_vote(party_id, vote_id, self.clock())
        except BackendUnavailable:  # the due-votes sweep finishes it once Redis is back
            self.metrics.background_errors.labels("votes").inc()
            return
        if event is not None:  # this node won the finish: it applies the result
            self._spawn(self._apply_vote_soon(event))

    async def _apply_vote_soon(self, finished: Event) -> None:
        """Hand a finished vote's decision to the engine, trying again through backend errors
        for one action timeout; after that (or if this node dies first) the votes sweep of any
        node does it (``backend.unapplied_votes``). A decision announced is never lost."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.settings.action_timeout
        pause = 0.05
        while not self.stopping:
            try:
                if await self._apply_vote(finished):
                    return
            except BackendUnavailable:
                self.metrics.background_errors.labels("votes").inc()
            if loop.time() + pause > give_up_at:
                return
            await asyncio.sleep(pause)
            pause = min(1.0, pause * 2)

    async def _apply_vote(self, finished: Event) -> bool:
        """Submit the winning option to the engine as the party's ``choice``; True once done.

        The action has no deadline (nobody waits for it; it must not be refused as late). It is
        handed over at least once: a resubmission of one already in flight (its node died, or a
        sweep overlaps a slow submit) is deduplicated by the engine host's claim and the engine.
        """
        applied = finished.payload["applied"]
        vote_id = finished.payload["vote_id"]
        run = await self.backend.vote_run(finished.party_id, vote_id)
        if run is None:
            log.error("finished vote without a run", extra={"trace_id": finished.trace_id})
            await self.backend.mark_vote_applied(finished.party_id, vote_id)
            return True
        payload = {
            "action_id": applied["action_id"],
            "character_id": t.PARTY_ACTOR,
            "campaign_run_id": run,
            "action_type": "choice",
            "payload": {"option": applied["option"], "vote_id": vote_id},
        }
        now = self.clock()
        verdict = await self.backend.begin_action(
            finished.party_id, t.PARTY_ACTOR, applied["action_id"], now, timed=False
        )
        if verdict.decision is Decision.BUSY:
            return False  # the party's previous action still holds its lock: later
        if verdict.decision in (Decision.DONE, Decision.TAKEN):
            await self.backend.mark_vote_applied(finished.party_id, vote_id)
            return True
        action = ActionRequest.from_envelope(
            finished.party_id, action_envelope(payload, finished.trace_id, now)
        )
        log.info(
            "vote applied",
            extra={
                "trace_id": finished.trace_id,
                "party_id": finished.party_id,
                "vote_id": vote_id,
                "again": verdict.decision is Decision.IN_FLIGHT,
            },
        )
        await self.link.submit(action)  # BackendUnavailable: not handed over; tried again
        await self.backend.mark_vote_applied(finished.party_id, vote_id)
        return True


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
