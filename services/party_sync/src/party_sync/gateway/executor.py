"""Carries out the party core's backend and engine commands and feeds their answers back.

Each command is awaited in order, and what the core answers to its outcome runs right after it
(depth first), so one client message's whole chain (begin the action, submit it) runs inside
its caller, e.g. inside the action's tracing span. ``BackendUnavailable`` is fed back to the core
as the command's failure; anything else unexpected is logged and, for a client message, answered
with ``internal_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeGuard

from party_sync import tracing
from party_sync.backends.base import Backend
from party_sync.core.actions import Decision, Sweep
from party_sync.core.commands import (
    Announce,
    ApplyVote,
    BeginAction,
    CastVote,
    CloseNarration,
    Command,
    Connect,
    Disconnect,
    FailAction,
    FinishVote,
    HandOverGrace,
    Leave,
    PendingAction,
    Refresh,
    SendDirect,
    Settle,
    Submit,
    SubmitVote,
    SweepVotes,
    TimeOut,
    Unsubscribe,
)
from party_sync.core.events import Event
from party_sync.core.limits import RateGate
from party_sync.core.session import PartySessions
from party_sync.engine.interface import (
    ActionRequest,
    EngineLink,
    JoinNotice,
    action_envelope,
)
from party_sync.engine.restating import restate_notice
from party_sync.gateway.session import carry_local
from party_sync.metrics import Metrics
from party_sync.protocol import types as t
from party_sync.protocol.errors import BackendUnavailable, ErrorCode
from party_sync.publishing import BackendPublisher

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger("party_sync.gateway.gateway")
#: Seconds between two looks at a gone node's in-process action (``Executor._take_over``).
TAKE_OVER_PAUSE = 1.0
#: The vote actions a node remembers handing to its own link (one per finished vote).
MAX_HANDED = 10_000
#: Seconds between two WARNINGs about actions an engine left unanswered past their deadline.
OVERDUE_LOG_EVERY = 60.0


class _EngineLapse:
    """An action an engine left unanswered at some point: counted on ``counter``, and told to
    the operator at most once a minute (``what``: the line, with the count, the latest action
    and its party; the player is told nothing false, so only the log and /metrics show it)."""

    __slots__ = ("_counter", "_gate", "_what")

    def __init__(self, counter: Counter, what: str) -> None:
        self._counter = counter
        self._gate = RateGate(OVERDUE_LOG_EVERY)
        self._what = what

    def __call__(self, party_id: str, action_id: str, trace_id: str) -> None:
        self._counter.inc()
        since = self._gate.admit(time.monotonic())
        if since is not None:
            extra = {"trace_id": trace_id, "action_id": action_id, "party_id": party_id}
            log.warning(self._what, since + 1, action_id, party_id, extra=extra)


class MetricsMeter:
    """``core.session.Meter`` over the node's Prometheus families (same names and labels); the
    per-message methods are the families' own bound methods (no call layer on the hot path)."""

    __slots__ = (
        "_families",
        "connections",
        "engine_latency",
        "forgotten",
        "overdue",
        "received",
        "sent",
    )

    def __init__(self, metrics: Metrics) -> None:
        #: an engine that returned without publishing the result is a bug only the log shows
        self.overdue = _EngineLapse(
            metrics.actions_overdue,
            "%d action(s) an engine started had no answer at their deadline (the latest: %s "
            "in party %s): the engine is slower than PARTY_SYNC_ACTION_TIMEOUT, or ended "
            "without publishing the action's result, or the node whose engine started it is gone "
            "(taken over at the player's resend, or at the deadline of one); its player waits "
            "for it (at most one line a minute; party_sync_actions_overdue_total counts them)",
        )
        #: the engine broke its contract, and nothing true can be said to the player
        self.forgotten = _EngineLapse(
            metrics.actions_forgotten,
            "%d action(s) an engine started still had no answer when their record expired "
            "(PARTY_SYNC_ACTION_RECORD_TTL; the latest: %s in party %s): the engine ended "
            "without publishing the action's result; party_sync stops waiting for it and its "
            "player is told nothing (at most one line a minute; "
            "party_sync_actions_forgotten_total counts them)",
        )
        self.received = metrics.received
        self.sent = metrics.sent
        self.engine_latency = metrics.engine_latency.observe
        self.connections = metrics.connections.set
        self._families = {
            "errors": metrics.errors,
            "closes": metrics.closes,
            "resumes": metrics.resumes,
            "settles": metrics.settles,
            "action_answers": metrics.action_answers,
            "background_errors": metrics.background_errors,
        }

    def count(self, family: str, label: str) -> None:
        self._families[family].labels(label).inc()


def engine_action(action: PendingAction) -> ActionRequest:
    """The engine's ``ActionRequest`` of an action the core accepted."""
    envelope = action_envelope(action.payload, action.trace_id, action.accepted)
    return ActionRequest.from_envelope(action.party_id, envelope, action.deadline)


#: Seconds before an action the link could not append is appended again (then doubling, at most
#: ``APPEND_RETRY_MAX``), until its deadline (``Executor._append_again``).
APPEND_RETRY_FIRST = 0.25
APPEND_RETRY_MAX = 2.0


class Executor:
    """Runs commands against the backend, the engine link and the publisher (module docstring)."""

    def __init__(
        self,
        core: PartySessions,
        backend: Backend,
        link: EngineLink,
        publisher: BackendPublisher,
        metrics: Metrics,
        clock: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, Any]], object],
        unsubscribe: Callable[[str], Coroutine[Any, Any, None]],
        max_replay: int,
    ) -> None:
        self.core = core
        self.backend = backend
        self.link = link
        # the claim rides on begin_action (EngineLink: optional, False for links without it)
        self.claim_on_accept = bool(getattr(link, "claims_on_accept", False))
        #: The id this node's claims carry in the backend (Redis: its node id), if it has one.
        self.node_id: str | None = getattr(backend, "node_id", None)
        #: The link's deliveries live in this node (``EngineLink.node_bound``): lost with it.
        self.node_bound = bool(getattr(link, "node_bound", False))
        #: The vote actions this node handed to its link, newest last (``_apply_vote``).
        self._handed: dict[str, None] = {}
        self._taking_over: set[tuple[str, str]] = set()  # (party, action) watched for a take-over
        self.publisher = publisher
        self.metrics = metrics
        self.clock = clock
        self.spawn = spawn
        self.unsubscribe = unsubscribe
        self.max_replay = max_replay
        self.failing: set[str] = set()  # periodic tasks whose last tick failed (log once)

    async def run(self, commands: list[Command]) -> None:
        """Carry out ``commands`` and everything the core answers to them, in order; a vote's
        hand-over runs as a task of its own (the ballot that closed the vote, or a sweep, does
        not wait for the engine)."""
        for command in carry_local(commands):
            if type(command) is ApplyVote:
                self.spawn(self._run_one(command))
            else:
                await self._run_one(command)

    async def begin_action(self, command: BeginAction) -> None:
        """An ``action.request`` the core let through: the ledger's verdict, then (accepted) the
        hand-over to the engine. The hot path: as few awaits deep as before the core existed."""
        core, conn = self.core, command.conn
        try:
            message = command.message
            payload = message.payload
            verdict = await self.backend.begin_action(
                conn.party_id,
                conn.character_id,
                payload["action_id"],
                command.now,
                True,
                payload["action_type"],
                message.trace_id,
                self.claim_on_accept,
                command.deadline_in,
            )
        except BackendUnavailable:
            verdict = None
        except Exception:
            log.exception("unexpected failure handling a message")
            failed = core.failed(conn, command.message, ErrorCode.INTERNAL_ERROR, self.clock())
            await self.run(failed)
            return
        answer = core.action_verdict(command, verdict)
        if len(answer) == 1 and type(answer[0]) is Submit:  # accepted: the common case
            await self._submit(answer[0])
        else:
            # the watch the verdict set up, taken now: its deadline may have passed already (a
            # resend long after its node died), and the look at it can take it out of
            # ``pending`` before the take-over below starts (votes probe: never taken over)
            watched = core.pending.get((conn.party_id, payload["action_id"]))
            await self.run(answer)
            claimer = verdict.claimer if verdict is not None else None
            if self._another_node(claimer) and watched is not None:
                self.spawn(self._take_over(watched, claimer))

    def _another_node(self, claimer: str | None) -> TypeGuard[str]:
        """``claimer`` (of an action in flight) is another serving node, whose own link has the
        action: it must be taken over if that node is gone. Not '1' (an engine host elsewhere,
        e.g. a stream worker, whose entry outlives it) nor '' (accepted, not claimed yet)."""
        return bool(claimer) and claimer != "1" and claimer != self.node_id

    async def _watch_started(self, party_id: str, action_id: str) -> None:
        """An action this node waits on was started, unanswered at its deadline: if another
        node's link holds it, that node is watched and the action taken over if it is gone. A
        resend watches the claimer it finds, but a claim made after it (an HTTP engine host
        that claims for itself, ``engine_http_claim = engine``, and claimed late for a node
        that died meanwhile) was found by nobody, and the engine's refusal, the answer to that
        node's POST, was lost with it: the player waited until the record expired (HTTP claim
        probe)."""
        watched = self.core.pending.get((party_id, action_id))
        if watched is None:
            return
        try:
            claimer = await self.backend.action_claimer(party_id, action_id)
        except BackendUnavailable:
            return  # (looked at again one timeout later, if still unanswered)
        if self._another_node(claimer):
            self.spawn(self._take_over(watched, claimer))

    async def _take_over(self, pending: PendingAction, claimer: str) -> None:
        """A resent action that another node claimed for its own link (its in-process engine,
        its HTTP link) and has not answered:
        if that node is gone (its heartbeat expired; looked at again until then, for as long as
        this node waits on the action), this node claims it (``take_over``, atomic: one node
        does) and gives it to its own engine, which deduplicates by ``action_id`` (the gone node
        may have applied it). Its answer then comes as any action's does."""
        key = (pending.party_id, pending.action_id)
        if key in self._taking_over:  # a resend while another resend's watch runs
            return
        self._taking_over.add(key)
        try:
            await self._watch_claimer(pending, claimer)
        finally:
            self._taking_over.discard(key)

    async def _watch_claimer(self, pending: PendingAction, claimer: str) -> None:
        """Look at ``claimer`` every ``TAKE_OVER_PAUSE`` while this node waits on the action, and
        at least as long as a node's heartbeat takes to expire (``2 × presence_ttl``; it expires
        ``4 × presence_ttl / 3`` after the last): a node killed just now still looks alive, and
        the player's resend that started this watch may be its last (the sender's own wait ends
        at the deadline). A claimer alive past that heartbeat is there: its link delivers."""
        party_id, action_id = key = pending.party_id, pending.action_id
        watch_until = self.clock() + 2 * self.core.rules.presence_ttl
        while key in self.core.pending or self.clock() < watch_until:
            try:
                if not await self.backend.node_alive(claimer):
                    if await self.backend.take_over(party_id, action_id, claimer, self.clock()):
                        log.warning(
                            "took over an action whose node is gone",
                            extra={
                                "party_id": party_id,
                                "action_id": action_id,
                                "gone_node": claimer,
                                "trace_id": pending.trace_id,
                            },
                        )
                        # without its deadline: the gone node may have started (and the engine
                        # applied) it, so it is a redelivery, never refused as late (the engine
                        # deduplicates by action_id)
                        again = replace(engine_action(pending), deadline=None, redelivery=True)
                        await self.link.submit(again)
                    return
            except BackendUnavailable:
                pass  # look again
            await asyncio.sleep(TAKE_OVER_PAUSE)

    async def _submit(self, command: Submit) -> None:
        if await self._appended(command) is False:
            await self.run(self.core.submit_failed(command, unavailable=True))
            self.spawn(self._append_again(command))

    async def _appended(self, command: Submit) -> bool | None:
        """Give the accepted action to the link: True once taken; False if its actions stream
        could not be reached (not final); None if the link refused it, which is its final
        answer (``engine_unavailable``), sent here."""
        action = command.action
        try:
            await self.link.submit(engine_action(action))
        except BackendUnavailable:
            return False
        except Exception:
            log.exception("engine link refused an action", extra={"trace_id": action.trace_id})
            await self.run(self.core.submit_failed(command, unavailable=False))
            return None
        return True

    async def _append_again(self, command: Submit) -> None:
        """An accepted action the link could not append (its actions stream's Redis, or that
        partition's master, not answering): appended again, with backoff, until it is or its
        deadline passes. Its player was told ``backend_unavailable`` (not final): a resend meets
        it in flight, and it is answered once an engine takes it, instead of timing out after a
        failover of a few seconds. An append that did run before it failed leaves a second
        entry, which the engine host's claim drops (delivery is at least once)."""
        action = command.action
        deadline = action.deadline
        if deadline is None:
            return
        delay = APPEND_RETRY_FIRST
        while self.clock() + delay < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, APPEND_RETRY_MAX)
            appended = await self._appended(command)
            if appended is not False:
                if appended:
                    log.info(
                        "action appended again after Redis came back",
                        extra={"trace_id": action.trace_id, "action_id": action.action_id},
                    )
                return

    async def _run_one(self, command: Command) -> None:
        core = self.core
        if type(command) is BeginAction:
            await self.begin_action(command)
        elif type(command) is Submit:
            await self._submit(command)
        elif type(command) is Leave or type(command) is CastVote:
            await self._client_step(command)
        elif type(command) is Connect:
            await self._connect(command)
        elif type(command) is Disconnect:
            try:
                last = await self.backend.disconnect(
                    command.conn.binding, command.conn.id, command.now, handover=command.handover
                )
            except BackendUnavailable:
                return  # presence expires by itself (presence_ttl)
            await self.run(core.disconnected(command.conn, last, command.now, command.handover))
        elif type(command) is Unsubscribe:
            await self.unsubscribe(command.party_id)
        elif type(command) is Announce:
            self.spawn(self._announce(command))
        elif type(command) is HandOverGrace:
            with contextlib.suppress(BackendUnavailable):  # (then as a dead node's: the sweep)
                await self.backend.hand_over_grace(command.binding, command.since)
        elif type(command) is Settle:
            try:
                left = await self.backend.settle(
                    command.binding, command.now, command.trace_id, command.since
                )
            except BackendUnavailable:
                core.settle_failed()
                return
            if left is not None:
                self._published((left,), command.binding.campaign_run_id)
            core.settled(left is not None)
        elif type(command) is FailAction:
            with contextlib.suppress(BackendUnavailable):
                await self.publisher.fail(engine_action(command.action), command.code, command.text)
        elif type(command) is TimeOut:
            action = command.action
            try:
                outcome, answer = await self.backend.time_out_action(
                    action.party_id, action.action_id, command.now, command.refusal
                )
            except BackendUnavailable as exc:
                self.failed("action_timeouts", exc)  # counted by the core
                await self.run(core.time_out_failed(command))
                return
            self.worked("action_timeouts")
            await self.run(core.timed_out(command, outcome, answer))
            if outcome is Sweep.STARTED and self.node_bound:  # (watched on by the core now)
                await self._watch_started(action.party_id, action.action_id)
        elif type(command) is SendDirect:
            with contextlib.suppress(BackendUnavailable):
                await self.backend.send_direct(command.party_id, command.character_id, command.data)
        else:
            await self._background(command)

    def _published(self, events: Sequence[Event], run: str | None = None) -> None:
        """Events a backend call here sequenced: an epoch one opens (not a join: the core's
        ``Announce``) gets the engine asked to re-state the party (``EpochWatch``)."""
        watch = self.publisher.watch
        if watch is not None and events:
            watch.published(events, run)

    def _known(self, party_id: str, run: str) -> None:
        if self.publisher.watch is not None:
            self.publisher.watch.knows(party_id, run)

    async def _client_step(self, command: Leave | CastVote) -> None:
        conn, message, core = command.conn, command.message, self.core
        try:
            if isinstance(command, Leave):
                event = await self.backend.leave(conn.binding, command.now, message.trace_id)
                if event is not None:
                    self._published((event,), conn.binding.campaign_run_id)
                commands = core.left(command, event)
            else:
                refusal, events = await self.backend.cast_vote(
                    conn.party_id,
                    conn.character_id,
                    message.payload["vote_id"],
                    message.payload["option"],
                    self.clock(),
                    message.trace_id,
                )
                self._published(events, conn.binding.campaign_run_id)
                commands = core.vote_cast(command, refusal, events)
        except BackendUnavailable:
            commands = core.failed(conn, message, ErrorCode.BACKEND_UNAVAILABLE, self.clock())
        except Exception:
            log.exception("unexpected failure handling a message")
            commands = core.failed(conn, message, ErrorCode.INTERNAL_ERROR, self.clock())
        await self.run(commands)

    async def _connect(self, command: Connect) -> None:
        conn, resume = command.conn, command.resume
        try:
            join = await self.backend.connect(conn.binding, conn.id, command.now, command.trace_id)
            snapshot = await self.backend.snapshot(conn.party_id, command.now)
            replay = None
            if resume is not None:
                replay = await self.backend.replay(conn.party_id, resume, self.max_replay)
        except BackendUnavailable:
            await self.run(self.core.open_failed(conn, self.clock()))
            return
        # the run of the party (a re-statement names it) and a join opening its epoch (the
        # core's Announce asks for that one)
        if join is not None:
            self._published((join,))
        self._known(conn.party_id, conn.binding.campaign_run_id)
        commands = self.core.opened(
            conn, join=join, snapshot=snapshot, replay=replay, resume=resume, now=self.clock()
        )
        await self.run(commands)

    async def _background(self, command: Command) -> None:
        """The presence tick, the votes sweep, and a vote's close and hand-over."""
        core = self.core
        if type(command) is Refresh:
            rejoined = None
            # A tick with no connection to refresh and no sweep asks nothing of the backend: it
            # proves nothing, so it ends no failing episode ("recovered" while Redis was down).
            asks = bool(command.connections) or command.sweep
            with self.tick("presence") as ok:
                rejoined = await self.backend.refresh(command.connections, command.now)
                self._published(rejoined)
                if command.sweep:
                    self._published(await self.backend.expire(command.now))
                if asks:
                    ok.append(True)
            await self.run(core.refreshed(command, rejoined, ok=bool(ok) or not asks))
        elif type(command) is SweepVotes:
            try:
                with self.tick("votes") as ok:
                    due = await self.backend.due_votes(command.now)
                    # decisions whose node could not hand them to the engine (it failed or died)
                    unapplied = await self.backend.unapplied_votes(
                        command.now, command.unapplied_after
                    )
                    ok.append(True)
                    await self.run(core.votes_swept(command, due, unapplied))
            finally:
                core.tick_done(self.clock())
        elif type(command) is CloseNarration:
            try:
                again = await self.backend.close_narration(
                    command.party_id,
                    command.stream_id,
                    self.clock(),
                    command.trace_id,
                    action_id=command.action_id,
                )
            except Exception as exc:  # a bug too is logged; the stream is looked at again
                self.failed("narration", exc)  # counted by the core
                await self.run(core.narration_failed(command))
                return
            self.worked("narration")
            await self.run(core.narration_looked(command, again))
        elif type(command) is FinishVote:
            try:
                party_id, vote_id = command.party_id, command.vote_id
                event = await self.backend.finish_vote(party_id, vote_id, self.clock())
            except BackendUnavailable:  # the due-votes sweep finishes it once Redis is back
                await self.run(core.vote_failed(command, self.clock()))
                return
            if event is not None:
                self._published((event,))
            await self.run(core.vote_finished(command, event))
        elif type(command) is ApplyVote:
            await self._apply_vote(command)
        elif type(command) is SubmitVote:
            finished = command.finished
            try:
                if command.action is not None:
                    request = engine_action(command.action)
                    if command.again:  # an earlier delivery may have reached the engine
                        request = replace(request, redelivery=True)
                    await self.link.submit(request)
                    self._handed[command.action.action_id] = None
                    while len(self._handed) > MAX_HANDED:
                        del self._handed[next(iter(self._handed))]
                if command.action is None or not self._volatile_votes():
                    await self.backend.mark_vote_applied(
                        finished.party_id, finished.payload["vote_id"]
                    )
                # else: handed to this node's own link, lost if the node dies: the decision
                # stays unapplied until its action has its final answer (a later sweep's
                # begin_action says DONE), or another node takes it over (_apply_vote)
            except BackendUnavailable:  # not handed over: tried again
                await self.run(core.vote_failed(command, self.clock()))
                return
            core.vote_applied(finished)

    def _volatile_votes(self) -> bool:
        """A decision handed to this node's link is lost with the node, and other nodes would
        not know (a shared backend names claimers: Redis)."""
        return self.node_bound and self.node_id is not None

    async def _apply_vote(self, command: ApplyVote) -> None:
        """A finished vote's decision: its action begun in the ledger, then handed over
        (``core.vote_verdict``). An action already in flight with this node's link, or with
        another serving node that is alive, is left to it; with a node that is gone, this node
        takes it over first."""
        core, finished = self.core, command.finished
        vote_id = finished.payload["vote_id"]
        try:
            run = await self.backend.vote_run(finished.party_id, vote_id)
            if run is not None:
                self._known(finished.party_id, run)
            elif self.publisher.watch is not None:  # what this process learnt of the party
                run = self.publisher.watch.openings.run_of(finished.party_id)
            action_id = finished.payload["applied"]["action_id"]
            verdict = await self.backend.begin_action(
                finished.party_id,
                t.PARTY_ACTOR,
                action_id,
                command.now,
                timed=False,
                action_type=finished.payload["applied"].get("action_type", "choice"),
                trace_id=finished.trace_id,
                claimed=self.claim_on_accept,
            )
            claimer = verdict.claimer if verdict.decision is Decision.IN_FLIGHT else None
            if claimer is not None and claimer == self.node_id and action_id in self._handed:
                core.vote_applied(finished)  # this node's link has it: its answer will come
                return
            if self._another_node(claimer):
                if await self.backend.node_alive(claimer) or not await self.backend.take_over(
                    finished.party_id, action_id, claimer, self.clock()
                ):
                    core.vote_applied(finished)  # its node (or one that took it over) has it
                    return
                log.warning(
                    "took over a vote's decision whose node is gone",
                    extra={
                        "party_id": finished.party_id,
                        "vote_id": vote_id,
                        "gone_node": claimer,
                        "trace_id": finished.trace_id,
                    },
                )
        except BackendUnavailable:
            await self.run(core.vote_failed(command, self.clock()))
            return
        await self.run(core.vote_verdict(command, run, verdict))

    async def _announce(self, command: Announce) -> None:
        """``_tell_engine``, with tracing on in a trace of its own whose id is the join's
        ``trace_id``: what the engine publishes for it (a party's opening scene, a re-statement)
        is traced where its events say (docs probe: their spans were in a trace of random id,
        which no event or log line named)."""
        if not tracing.is_on():
            await self._tell_engine(command)
            return
        binding = command.binding
        attributes = {
            "party_sync.party_id": binding.party_id,
            "party_sync.character_id": binding.character_id,
            "party_sync.trace_id": command.join.trace_id,
        }
        with tracing.incoming(
            "party.join", None, trace_id=command.join.trace_id, attributes=attributes
        ):
            await self._tell_engine(command)

    async def _tell_engine(self, command: Announce) -> None:
        """Tell the engine of a ``party.join`` this node published; and, if that join opened a
        new epoch (seq 1: the party's short-lived state was lost, or it is new), ask the engine
        to re-state the party (``RestateNotice``; an engine without state for the run does
        nothing)."""
        binding, join = command.binding, command.join
        if command.restate:  # first: an engine that had the run re-states it, and then the join
            # of a known character changes nothing; a new run has nothing to re-state and is
            # started by the join
            restate = await restate_notice(
                self.backend,
                binding.party_id,
                binding.campaign_run_id,
                join.trace_id,
                self.clock,
                command.epoch,
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
            at=self.clock(),
        )
        try:
            await self.link.notify_join(notice)
        except Exception as exc:  # a hint only: the engine must not depend on it
            log.warning("join notice not delivered: %s", exc, extra={"trace_id": join.trace_id})

    @contextlib.contextmanager
    def tick(self, task: str) -> Iterator[list[bool]]:
        """One tick of a periodic task: any failure is counted, logged once per episode (not per
        tick), and the task goes on; the tick that works again logs the recovery."""
        ok: list[bool] = []
        try:
            yield ok
        except Exception as exc:
            self.metrics.background_errors.labels(task).inc()
            self.failed(task, exc)
            return
        if ok:
            self.worked(task)

    def failed(self, task: str, exc: BaseException) -> None:
        """``task`` failed (counted by the caller): logged once per episode."""
        if task not in self.failing:
            self.failing.add(task)
            if isinstance(exc, BackendUnavailable):
                log.warning("%s: backend unavailable; retrying every tick", task)
            else:
                log.error("%s failed; retrying every tick", task, exc_info=exc)

    def worked(self, task: str) -> None:
        """``task`` worked: the end of its failing episode, if it was in one, is logged."""
        if task in self.failing:
            self.failing.discard(task)
            log.info("%s: recovered", task)
