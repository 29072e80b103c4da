"""``ReferenceEngine``: the reference Campaign Engine behind ``party_sync.engine.Engine``.

It glues the pure game (``game.py``) to the outside world: a ``store.RunStore`` for run states and
the chronicles (L1 decisions, L2 scene summaries), and party_sync's ``EventPublisher`` for events.
Per action:

1. under the run's lock (actions of one run are applied one at a time, in arrival order), load
   the run; an ``action_id`` already applied changes nothing: it publishes what a failure left
   unsent, or else its ``action.result`` again (``_answer_again``: the answer for a party_sync
   that lost its record of the action and took a client's resend as new), nothing more;
2. parse the payload and apply the action to a *copy* of the state — a refusal
   (``EngineRejected``) therefore changes nothing in the game; it is remembered (the run's
   latest ``REFUSED_KEPT``, committed) and an ``action_id`` refused before is refused the same
   way, not worked out again on a newer state: party_sync's record of the refusal may be lost
   (an empty Redis) and the player was told it failed;
3. commit the new state (with the ``action_id`` among the applied ones), the L1 decision, the L2
   summary of the scene it ended (if it moved the party on) and the action's events (the
   *outbox*, inside the state) in one store transaction, *then* publish the events in order, and
   commit the emptied outbox.

Committing before publishing means a crash or a publish error can lose no decision and never
applies one twice (party_sync redelivers with the same ``action_id``). If publishing failed, the
unpublished rest is kept — durably, with the state: a redelivery of that same action, even to a
restarted engine, publishes it (and only it); the next *other* action first tries once more and
otherwise drops it (logged), because its own ``scene.update`` and ``party.state`` bring every
client back to the current state anyway, and a stale event must never block the game — except
while party_sync is unavailable (``BackendUnavailable``: its Redis stalled or restarting): then
the leftovers wait and the next action fails with them (its transport gives it again), since a
refused next action publishes no scene and the screens would stay behind the game for good.

Party votes (``votes.py``): an action that brings the party into a ``party_vote`` scene also
commits a ``vote.start`` entry at the end of its outbox; publishing reaches it after the action's
events and asks party_sync for the vote (``EventPublisher.start_vote``). A vote that cannot be
started is logged and the characters choose instead: a vote never blocks the game.

Re-statement (``handle_restate``; docs/engines.md): party_sync's party state is short-lived, the
run's is here. When party_sync lost it (an embedded server restarted, Redis restarted empty or
flushed, the party expired), its new epoch shows no scene and it sends a ``RestateNotice``. For a
run it has started (of that party), the engine then publishes, through the same outbox and publisher
as any event, the party's current state: ``scene.update`` (the scene as it stands, open options),
``combat.update`` during a fight, ``party.state`` (always: party_sync lost the last one too), and
the party's vote again if it is in a vote scene whose vote was pending (``votes.replan``). It rolls
no die and records no decision or chronicle entry; the same state gives the same events, so a
repeated notice (delivery is at least once) is harmless. An unknown or still pending run publishes
nothing.

Live narration (``narration.py``; off unless ``narration_speed`` is given, or
``CAMPAIGN_ENGINE_NARRATION_SPEED`` set as ``make run`` does): after the commit and before
publishing, the text of the action's ``scene.update`` is written progressively as a
``narration.delta`` stream tied to its ``action_id``, like a model writing it; then the events go
out as always. It happens once per
action: a redelivered action is found applied and only publishes what is left, and a failed
narration is logged and never stops the events.

Several engine processes may share one database (workers of a stream): commits are optimistic
(``store.CommitConflict``), so if another process committed to the run since it was loaded, the
action is simply worked out again on the newer state — or found applied already.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from party_sync.engine import (
    ActionRequest,
    EngineRejected,
    EventPublisher,
    JoinNotice,
    RestateNotice,
    publish_all,
)
from party_sync.logs import RateGate
from party_sync.protocol.errors import BackendUnavailable, InvalidEvent

from campaign_engine import narration, votes
from campaign_engine.actions import PARTY_ACTOR, Choice, parse_action
from campaign_engine.campaign import (
    MAX_VOTE_TIMEOUT_S,
    Campaign,
    builtin_campaign,
    load_campaign,
)
from campaign_engine.chronicle import SceneSummary, scene_summaries
from campaign_engine.events import (
    MAX_ACTION_NARRATION,
    Event,
    action_events,
    clip,
    opening_events,
    party_state_if_changed,
    restate_events,
    result_payload,
    scene_events,
)
from campaign_engine.game import Game
from campaign_engine.state import OutboxEvent, RunState, changes
from campaign_engine.store import (
    CommitConflict,
    CommitOutcomeUnknown,
    Decision,
    InMemoryRunStore,
    RunStore,
    open_store,
)

log = logging.getLogger("campaign_engine")
#: Seconds between two WARNING lines about joins to another party's run (each with the count).
FOREIGN_JOIN_LOG_INTERVAL = 60.0
_T = TypeVar("_T")

ENV_SEED = "CAMPAIGN_ENGINE_SEED"
ENV_CAMPAIGN = "CAMPAIGN_ENGINE_CAMPAIGN"
ENV_DATABASE_URL = "CAMPAIGN_ENGINE_DATABASE_URL"
ENV_VOTE_TIMEOUT = "CAMPAIGN_ENGINE_VOTE_TIMEOUT"
ENV_NARRATION_SPEED = "CAMPAIGN_ENGINE_NARRATION_SPEED"
#: How often an action (or join) is worked out again when another process committed to its run
#: first; each attempt starts from the newer state, so this only runs out under a storm of writers.
COMMIT_ATTEMPTS = 8
#: Seconds: the first pause between attempts is up to twice this, doubling (full jitter).
COMMIT_BACKOFF = 0.005
#: Seconds a narrating process may take beyond its narration's own pauses (publishing the pieces,
#: then the events) before another process publishes the outbox it left (``narrating_until``).
NARRATION_LEASE_SLACK = 3.0
#: Actions remembered as having had a commit of unknown outcome (``handle_action``).
UNSURE_KEPT = 10_000
#: Seconds between two looks at a run whose outbox another process is narrating.
NARRATION_POLL = 0.05
#: Seconds a process gives the store to take back its place in a run's line.
LEAVE_LINE_WITHIN = 2.0
#: How many dropped actions a run remembers (``RunState.dropped``).
MAX_DROPPED = 32


class ReferenceEngine:
    """A small, real text-RPG engine: one campaign, any number of runs (one per party)."""

    def __init__(
        self,
        campaign: Campaign | None = None,
        *,
        seed: int | None = None,
        rng: random.Random | None = None,
        store: RunStore | None = None,
        vote_timeout_s: float | None = None,
        narration_speed: float | None = None,
        sleep: narration.Sleep = asyncio.sleep,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``rng`` wins over ``seed``; with neither, dice come from a system-seeded generator.
        ``store`` (default: a new ``InMemoryRunStore``) belongs to the engine: ``start`` opens it,
        ``close`` closes it. ``vote_timeout_s`` overrides the campaign's party vote timeouts.
        ``narration_speed`` (characters per second; None or 0: off, the default) narrates each
        action's scene text live before its events; ``sleep`` paces it (tests: virtual time);
        ``clock`` (wall-clock seconds) dates the lease a narrating process holds on its outbox;
        None (the default): the publisher's ``clock`` when it has one, party_sync's (Redis's in
        Redis mode, the same for every node, worker and engine host), else ``time.time``. A
        lease is compared by other processes, on other machines: by each machine's own clock,
        workers a few seconds apart took one another's live narration for abandoned."""
        self.campaign = campaign or builtin_campaign()
        self.rng = rng if rng is not None else random.Random(seed)
        self.store: RunStore = store if store is not None else InMemoryRunStore()
        self.game = Game(self.campaign, self.rng)
        self.vote_timeout_s = vote_timeout_s
        if narration_speed is not None and not 0 <= narration_speed <= narration.MAX_SPEED:
            raise ValueError(f"narration_speed must be in [0, {narration.MAX_SPEED}]")
        self.narration_speed = narration_speed or None
        self._sleep = sleep
        self._chosen_clock = clock
        self._clock: Callable[[], float] = clock or time.time
        self._id = uuid.uuid4().hex  # this process's name in a run's line (RunState.waiter)
        self._in_line: set[str] = set()  # the runs where it took a place in line
        self._publisher: EventPublisher | None = None
        #: One lock per run while anything holds or waits for it: a run's lock goes once its
        #: last user lets go (a plain dict kept one for every run the process ever served).
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        #: one WARNING a minute about joins to another party's run, not one per join
        self._foreign_joins = RateGate(FOREIGN_JOIN_LOG_INTERVAL)
        #: Actions whose commit had an unknown outcome, until an attempt settles them (bounded:
        #: the oldest go first; one beyond it is answered by its next attempt's reload anyway)
        self._unsure: dict[str, None] = {}

    # --- Engine protocol -------------------------------------------------------------------

    async def start(self, publisher: EventPublisher) -> None:
        """Open the store (so a database that cannot be reached fails the start, not an action)."""
        await self.store.open()
        log.info("campaign engine storage: %s", self.store.url)
        self._publisher = publisher
        if self._chosen_clock is None:
            self._clock = publisher_clock(publisher)

    async def close(self) -> None:
        self._publisher = None
        await self.store.close()

    async def handle_action(self, action: ActionRequest) -> None:
        """Apply and publish ``action``. A commit whose outcome is unknown (the database lost
        mid-``COMMIT``) raises ``CommitOutcomeUnknown``, and so does every later failure of the
        same action until one attempt settles it: raising anything else means *not applied*,
        which could then be false (engine DB probe)."""
        self._started()
        action_id = action.action_id
        async with self._lock(action.campaign_run_id):
            try:
                await self._retrying(self._handle_action, action, action.campaign_run_id)
            except CommitOutcomeUnknown:
                self._unsure[action_id] = None
                if len(self._unsure) > UNSURE_KEPT:
                    del self._unsure[next(iter(self._unsure))]  # the oldest
                raise
            except EngineRejected:  # refused on the reloaded run: an earlier commit did not land
                self._unsure.pop(action_id, None)
                raise
            except Exception as exc:
                if action_id in self._unsure:
                    raise CommitOutcomeUnknown(
                        f"an earlier commit of action {action_id} may have landed, and this "
                        f"attempt could not tell: {type(exc).__name__}"
                    ) from exc
                raise
            self._unsure.pop(action_id, None)

    async def handle_join(self, notice: JoinNotice) -> None:
        """Start the run if needed and register the character; never restarts a run.

        The first join publishes the opening scene; a new character's join re-states the scene
        (and the fight) with their arrival, then ``party.state``; a repeated join publishes nothing.
        """
        self._started()
        async with self._lock(notice.campaign_run_id):
            await self._retrying(self._handle_join, notice, notice.campaign_run_id)

    async def handle_restate(self, notice: RestateNotice) -> None:
        """party_sync lost the party's state: publish the run's current state again.

        ``scene.update`` (its open options), ``combat.update`` if a fight is on, ``party.state``
        and, in a vote scene whose vote was pending, the vote again (see the module docstring).
        Nothing for a run this engine never started or one of another party. Idempotent: no die,
        no decision, no chronicle entry; the same state publishes the same events.
        """
        self._started()
        async with self._lock(notice.campaign_run_id):
            await self._retrying(self._handle_restate, notice, notice.campaign_run_id)

    async def _handle_action(self, action: ActionRequest) -> None:
        state = await self._load(action.campaign_run_id, action.party_id)
        if action.action_id in state.applied:
            if any(e.action_id == action.action_id for e in state.outbox):
                log.info(
                    "republishing unsent events of %s",
                    action.action_id,
                    extra={"trace_id": action.trace_id},
                )
                await self._publish_outbox(state, action.party_id)
            else:
                await self._answer_again(state, action)
            return
        refusal = state.refused.get(action.action_id)
        if refusal is not None:  # refused before: the same answer, not a new decision
            log.info(
                "refusing %s again, as before: %s",
                action.action_id,
                refusal,
                extra={"trace_id": action.trace_id},
            )
            raise EngineRejected(refusal)
        state = await self._settle_outbox(state, action.party_id)
        if action.action_id in state.applied:  # applied by another process while we waited
            await self._answer_again(state, action)
            return
        work = self._take_turn(state.copy())
        try:
            events, decision = self._apply(work, action)
        except EngineRejected as refused:
            await self._remember_refusal(state, action, str(refused))
            raise
        summaries = await self._summaries(work, decision)
        work.outbox = [OutboxEvent(action.action_id, t, p, action.trace_id) for t, p in events]
        text = self._narration_text(work, action, state.scene_number)
        work.narrating_until = (
            self._clock() + narration.duration(text, self.narration_speed) + NARRATION_LEASE_SLACK
            if text and self.narration_speed is not None and self._publisher is not None
            else None
        )
        await self.store.commit(work, [decision], summaries)  # may raise CommitConflict
        log.info(
            "applied %s %s by %s: %s (decision %d%s)",
            action.action_type,
            action.action_id,
            action.character_id,
            decision.outcome,
            decision.seq,
            f", scene {decision.scene_number} ended" if summaries else "",
            extra={"trace_id": action.trace_id},
        )
        # Committed first: a crash while narrating loses nothing, and a redelivery of the
        # action (applied now) publishes its events without narrating again. Another process
        # with a message of this run waits for these events until ``narrating_until`` (then it
        # publishes them itself: this one is gone or stuck), so they are not sent mid-narration.
        if text and self.narration_speed is not None and self._publisher is not None:
            await narration.narrate(
                self._publisher,
                action.party_id,
                text,
                speed=self.narration_speed,
                action_id=action.action_id,
                trace_id=action.trace_id,
                sleep=self._sleep,
            )
        await self._publish_committed(work, action.party_id)

    async def _publish_committed(self, work: RunState, party_id: str) -> None:
        """Publish the outbox ``work`` committed (an action's, a join's, a re-statement's), after
        it was committed (and, for an action, narrated).

        If another process committed the run meanwhile, ``work``'s copy of the outbox is out of
        date: a worker that took this message over while this one was stopped (frozen past the
        stream's claim-idle time) published its events, then the party moved on; publishing the
        copy would send the scene of then after a newer one. Then only what the stored outbox
        still holds *of this message's own events* is published (nothing, when the one that took
        it over, or the next message's settling, published them); another message's events
        there are that message's to publish (its process may be narrating it right now)."""
        stored = await self.store.load(work.run_id)
        if stored is None or stored.version == work.version:
            await self._publish_outbox(work, party_id)
            return
        if stored.outbox == work.outbox:  # only another process's place in line was written
            await self._publish_outbox(stored, party_id)
            return
        mine = {(event.action_id, event.trace_id) for event in work.outbox}
        left = [e for e in stored.outbox if (e.action_id, e.trace_id) in mine]
        log.info(
            "run %s moved on in another process since this message was committed: publishing "
            "%d of its %d event(s), the rest were published meanwhile",
            work.run_id,
            len(left),
            len(work.outbox),
        )
        if left:
            others = [e for e in stored.outbox if (e.action_id, e.trace_id) not in mine]
            stored.outbox = left
            await self._publish_outbox(stored, party_id, keep=others)
            return
        # Published meanwhile (by a process that took this message over, or settled it after
        # this one's lease ran out): nothing. Dropped (a process that settled them before its
        # own message could not publish them): the action's result again, alone, so that its
        # player is answered; party_sync publishes it only if it is not out yet (a scene of then
        # is not sent: the party may have moved on). Never a result that went out: after a
        # Redis restarted empty party_sync no longer knows it, and the party would get it twice.
        publisher = self._publisher
        for event in work.outbox:
            if (
                event.type == "action.result"
                and publisher is not None
                and event.action_id in stored.dropped
            ):
                try:
                    await publisher.publish(
                        party_id, event.type, event.payload, trace_id=event.trace_id
                    )
                except Exception:
                    log.warning("could not publish %s's result again", event.action_id)

    async def _answer_again(self, state: RunState, action: ActionRequest) -> None:
        """A delivery of an action applied earlier, all of whose events were published: publish
        its ``action.result`` again, and nothing else (no die, no decision, no scene).

        party_sync ignores it while it still holds the action's answer (the first result
        stands). It is the answer when party_sync lost its own record (an embedded server
        restarted, Redis restarted empty) and accepted a client's resend of the ``action_id``
        as new: without it that resend would wait for ever. From the L1 decision (outcome,
        roll, narration) and the actor's state as it is now (``action.result.state``)."""
        publisher = self._publisher
        if publisher is None:
            raise RuntimeError("ReferenceEngine.start(publisher) must be called first")
        decision = await self.store.decision(state.run_id, action.action_id)
        if decision is None:  # not in the chronicle (cannot happen: committed together)
            log.warning("no decision of applied action %s to answer again", action.action_id)
            return
        payload = result_payload(
            state,
            decision.action_id,
            decision.character_id,
            decision.action_type,
            decision.outcome,
            decision.narration,
            decision.roll,
        )
        log.info(
            "answering %s again (applied earlier)",
            action.action_id,
            extra={"trace_id": action.trace_id},
        )
        try:
            await publisher.publish(
                action.party_id, "action.result", payload, trace_id=action.trace_id
            )
        except InvalidEvent as exc:  # a bug of ours: the action stays applied; say so loudly
            log.error("dropping an invalid repeated action.result: %s", exc)

    def _narration_text(self, work: RunState, action: ActionRequest, scene_before: int) -> str:
        """What is new, to be written live (if narration is on; else ``""``).

        A new scene: its whole ``scene.update`` text (what happened, then the scene), which the
        final event then states exactly. The same scene: only what happened (the
        ``action.result``'s text, which leads the ``scene.update``'s), not the scene's
        description again, which every member has read already.
        """
        if self.narration_speed is None:
            return ""
        texts = {
            e.type: e.payload.get("narration")
            for e in work.outbox
            if e.action_id == action.action_id and e.type in ("scene.update", "action.result")
        }
        same_scene = work.scene_number == scene_before
        text = (
            texts.get("action.result") or texts.get("scene.update")
            if same_scene
            else texts.get("scene.update") or texts.get("action.result")
        )
        return text if isinstance(text, str) else ""

    async def _handle_join(self, notice: JoinNotice) -> None:
        try:
            state = await self._load(notice.campaign_run_id, notice.party_id)
        except EngineRejected:
            suppressed = self._foreign_joins.admit(time.monotonic())
            if suppressed is not None:
                log.warning(
                    "ignoring a join to run %s from another party (%d more since the last "
                    "such line)",
                    notice.campaign_run_id,
                    suppressed,
                )
            return
        state = await self._settle_outbox(state, notice.party_id)
        work = self._take_turn(state.copy())
        started = self.game.start(work)
        new = notice.character_id != PARTY_ACTOR and notice.character_id not in work.characters
        changed = self.game.register(work, notice.character_id, notice.display_name)
        events: list[Event] = []
        if started:
            events += opening_events(self.game, work)
        elif new:  # everyone sees the newcomer arrive (and, in a fight, join the combatants)
            name = work.character(notice.character_id).name
            events += scene_events(self.game, work, f"{name} joins the party.")
        events += party_state_if_changed(work)
        if started and (vote := self._plan_vote(work, None)):
            events.append(vote)
        if not events and not changed:
            return
        work.outbox = [OutboxEvent("", t, p, notice.trace_id) for t, p in events]
        await self.store.commit(work)
        await self._publish_committed(work, notice.party_id)

    async def _handle_restate(self, notice: RestateNotice) -> None:
        extra = {"trace_id": notice.trace_id}
        state = await self.store.load(notice.campaign_run_id)
        if state is None or state.status == "pending":
            log.info("nothing to re-state for run %s", notice.campaign_run_id, extra=extra)
            return
        if state.party_id != notice.party_id:  # party_sync binds runs to parties; never mix two
            log.warning(
                "ignoring a re-statement of run %s for another party", state.run_id, extra=extra
            )
            return
        state = await self._settle_outbox(state, notice.party_id)
        work = self._take_turn(state.copy())
        events = restate_events(self.game, work)
        if vote := votes.replan(self.game, work, timeout_s=self.vote_timeout_s):
            events.append(vote)  # last, after the scene it is about
        # The outbox, as for an action: a crash while publishing leaves the rest (and a vote
        # request) durable, to be published by the next message of the run.
        work.outbox = [OutboxEvent("", t, p, notice.trace_id) for t, p in events]
        await self.store.commit(work)
        log.info(
            "re-stating run %s (scene %d %s, %s) for party %s, epoch %s",
            work.run_id,
            work.scene_number,
            work.scene_id,
            work.status,
            notice.party_id,
            notice.epoch,
            extra=extra,
        )
        await self._publish_committed(work, notice.party_id)

    # --- for the CLI, tests and the chronicles ---------------------------------------------

    async def run_state(self, run_id: str) -> RunState | None:
        return await self.store.load(run_id)

    async def chronicle(self, run_id: str) -> list[Decision]:
        """The run's L1 chronicle (one entry per applied action)."""
        return await self.store.decisions(run_id)

    async def scene_summaries(self, run_id: str) -> list[SceneSummary]:
        """The run's L2 chronicle (one entry per scene visit that ended, and the ending)."""
        return await self.store.summaries(run_id)

    # --- internals -------------------------------------------------------------------------

    async def _retrying(
        self, handle: Callable[[_T], Awaitable[None]], message: _T, run_id: str
    ) -> None:
        """``handle(message)``, again on the newer state if another process committed first."""
        try:
            for attempt in range(1, COMMIT_ATTEMPTS + 1):
                try:
                    await handle(message)
                    return
                except CommitConflict:
                    if attempt == COMMIT_ATTEMPTS:
                        raise
                    log.info("run %s changed in another process; working it out again", run_id)
                    # Two workers that keep colliding on one run must not retry in lockstep: a
                    # short random pause (full jitter, doubling) lets one of them commit first.
                    await asyncio.sleep(random.uniform(0, COMMIT_BACKOFF * 2**attempt))
        finally:
            if run_id in self._in_line:  # it waited: its place must not outlive the message
                self._in_line.discard(run_id)
                await self._leave_line(run_id)

    async def _leave_line(self, run_id: str) -> None:
        """Give up this process's place in the run's line if a message ended without committing
        (refused, nothing to publish, failed); never raises (the place expires anyway)."""
        try:
            async with asyncio.timeout(LEAVE_LINE_WITHIN):
                await self._clear_place(run_id)
        except Exception:
            log.warning("could not give up a place in run %s's line", run_id, exc_info=True)

    async def _clear_place(self, run_id: str) -> None:
        for _ in range(COMMIT_ATTEMPTS):
            state = await self.store.load(run_id)
            if state is None or state.waiter != self._id:
                return
            state.waiter = state.waiter_until = None
            with contextlib.suppress(CommitConflict):
                await self.store.commit(state)
                return

    async def _summaries(self, after: RunState, decision: Decision) -> list[SceneSummary]:
        """The L2 entries ``decision`` writes: none unless it moved the party to another scene."""
        if "scene" not in decision.changes:
            return []
        earlier = await self.store.decisions(after.run_id, scene_number=decision.scene_number)
        return scene_summaries(self.campaign, [*earlier, decision], after)

    def _plan_vote(self, work: RunState, at: str | None) -> Event | None:
        """The ``vote.start`` outbox entry if the party has just come to decide together."""
        return votes.plan(self.game, work, requested_at=at, timeout_s=self.vote_timeout_s)

    def _started(self) -> None:
        if self._publisher is None:
            raise RuntimeError("ReferenceEngine.start(publisher) must be called first")

    def _lock(self, run_id: str) -> asyncio.Lock:
        lock = self._locks.get(run_id)
        if lock is None:
            lock = self._locks[run_id] = asyncio.Lock()
        return lock

    async def _load(self, run_id: str, party_id: str) -> RunState:
        state = await self.store.load(run_id)
        if state is None:
            return RunState(run_id=run_id, party_id=party_id)
        if state.party_id != party_id:  # party_sync binds runs to parties; never mix two
            raise EngineRejected("This campaign run belongs to another party.")
        return state

    def _apply(self, work: RunState, action: ActionRequest) -> tuple[list[Event], Decision]:
        """Apply ``action`` to ``work`` (a copy of the stored state): its events, in order, and
        its L1 entry. Raises ``EngineRejected`` for an invalid action (``work`` is then dropped)."""
        parsed = parse_action(action.action_type, action.payload)
        started = self.game.start(work)  # the join hint was lost: the first action starts it
        if action.character_id != PARTY_ACTOR:
            self.game.register(work, action.character_id)
        events = opening_events(self.game, work) if started else []
        before = work.copy()  # after the implicit start: the decision's changes are its own
        stamp = action.envelope.get("timestamp")  # the server time of the action
        at = stamp if isinstance(stamp, str) else None
        if isinstance(parsed, Choice):  # the party's vote may settle it
            votes.check_choice(work, action.character_id, parsed, at)
        applied = self.game.apply(work, action.character_id, parsed)
        if isinstance(parsed, Choice):
            votes.settle(work, parsed)
        work.applied.add(action.action_id)
        work.decisions += 1
        events += action_events(
            self.game,
            work,
            action_id=action.action_id,
            actor_id=action.character_id,
            action_type=action.action_type,
            applied=applied,
            was_in_combat=before.in_combat,
        )
        if vote := self._plan_vote(work, at):  # after the action's own events
            events.append(vote)
        decision = Decision(
            run_id=work.run_id,
            seq=work.decisions,
            action_id=action.action_id,
            character_id=action.character_id,
            action_type=action.action_type,
            payload=dict(action.payload),
            scene_id=before.scene_id,
            scene_number=before.scene_number,
            outcome=applied.outcome,
            roll=applied.roll.to_payload() if applied.roll else None,
            narration=clip(applied.narration, MAX_ACTION_NARRATION),
            changes=changes(before, work),
            trace_id=action.trace_id,
            at=at,
            extra={"rolled_by": applied.rolled_by} if applied.rolled_by else {},
        )
        return events, decision

    async def _publish_outbox(
        self, state: RunState, party_id: str, *, keep: list[OutboxEvent] | None = None
    ) -> None:
        """Publish the outbox in order; commit what is left (nothing, unless publishing failed),
        followed by ``keep`` (other messages' events, not published here)."""
        publisher = self._publisher
        if publisher is None:
            raise RuntimeError("ReferenceEngine.start(publisher) must be called first")
        try:
            while state.outbox:
                if await self._publish_together(publisher, state, party_id):
                    continue
                event = state.outbox[0]
                if event.type == votes.VOTE_START:  # never raises: a vote must not block the game
                    await votes.start(publisher, state, party_id, event)
                else:
                    try:
                        await publisher.publish(
                            party_id, event.type, event.payload, trace_id=event.trace_id
                        )
                    except InvalidEvent as exc:
                        # A bug of ours, after the commit: raising now would tell the player
                        # the action failed although it was applied. Drop the event, loudly.
                        log.error(
                            "dropping an invalid %s event: %s",
                            event.type,
                            exc,
                            extra={"trace_id": event.trace_id},
                        )
                state.outbox.pop(0)
                if event.type == "party.state":
                    state.published_party_state = event.payload
        finally:
            if not state.outbox and not keep:
                state.narrating_until = None  # nothing left to narrate (keep: another's lease)
            if keep:
                state.outbox.extend(keep)
            try:
                await self.store.commit(state)
            except CommitConflict:  # another process moved the run on: its state stands
                log.info("run %s moved on while its events were published", state.run_id)

    @staticmethod
    async def _publish_together(publisher: EventPublisher, state: RunState, party_id: str) -> bool:
        """The outbox's leading events of one message (up to a vote request) in one atomic step,
        where the publisher has one (``BatchPublisher``: in Redis mode one script call and one
        message to the members instead of a round trip each), under the message's key
        (``outbox_key``): a copy of them published again (by a process that was frozen while
        another published them) publishes nothing. False when there is nothing to batch or one
        of them is invalid: the caller then goes one by one (and drops the invalid one only). A
        publishing error leaves all of them in the outbox (none was published)."""
        many = getattr(publisher, "publish_many", None)  # BatchPublisher (isinstance is slow)
        if many is None:
            return False
        run: list[OutboxEvent] = []
        for event in state.outbox:
            if event.type == votes.VOTE_START or (
                run and (event.trace_id, event.action_id) != (run[0].trace_id, run[0].action_id)
            ):
                break
            run.append(event)
        if not run:
            return False
        try:
            await publish_all(
                publisher,
                party_id,
                [(e.type, e.payload) for e in run],
                trace_id=run[0].trace_id,
                key=outbox_key(run),
            )
        except InvalidEvent:
            return False
        del state.outbox[: len(run)]
        for event in run:
            if event.type == "party.state":
                state.published_party_state = event.payload
        return True

    async def _remember_refusal(self, state: RunState, action: ActionRequest, text: str) -> None:
        """Commit that the game refused ``action``, so that it is refused the same way when it
        is handed again: party_sync's own record of the refusal can be lost (an empty Redis, a
        restarted embedded server), and a resend was then worked out on the newer state and
        applied, after the player and the party had been told it failed (chaos probe). A
        conflict works the action out again on the newer state (``_retrying``)."""
        record = self._take_turn(state.copy())
        record.remember_refusal(action.action_id, text)
        await self.store.commit(record)  # may raise CommitConflict

    def _take_turn(self, work: RunState) -> RunState:
        """``work`` with this process's place in the run's line given up (it commits now)."""
        if work.waiter == self._id:
            work.waiter = work.waiter_until = None
        return work

    async def _settle_outbox(self, state: RunState, party_id: str) -> RunState:
        """Before a new message of the run: publish an earlier message's leftovers once, else
        drop them; the run's state as it is then (newer than ``state`` if it waited).

        Leftovers another process is narrating (``narrating_until`` not past) are that
        process's to publish once its narration ends: this one waits for them (the run's next
        message would wait as long in one process, behind its lock), and publishes them itself
        only if they are still there when the lease runs out (that process died or is stuck).
        Published here, they would end the narration mid-sentence (party_sync refuses a piece of
        an answered action)."""
        waited = False
        while True:
            now = self._clock()
            leased = bool(state.outbox) and (state.narrating_until or 0.0) > now
            behind = state.waiter not in (None, self._id) and (state.waiter_until or 0.0) > now
            if not leased and not behind:
                break
            if leased and not behind and state.waiter != self._id:
                # First in line: said in the run, so that the narrating process's next message
                # waits behind this one instead of overtaking it again and again.
                turn = state.copy()
                turn.waiter = self._id
                turn.waiter_until = (state.narrating_until or now) + NARRATION_LEASE_SLACK
                with contextlib.suppress(CommitConflict):  # another was first: looked at again
                    await self.store.commit(turn)
                    state = turn
                    self._in_line.add(state.run_id)
            if not waited:
                log.info(
                    "run %s: waiting for the events another process narrates (its lease: %.1f s)",
                    state.run_id,
                    max(0.0, (state.narrating_until or now) - now),
                )
                waited = True
            await asyncio.sleep(NARRATION_POLL)
            fresh = await self.store.load(state.run_id)
            if fresh is None:
                break
            state = fresh
        if not state.outbox:
            return state
        try:
            await self._publish_outbox(state, party_id)
        except BackendUnavailable:
            # party_sync is unreachable (its Redis stalled or restarting): the leftovers wait,
            # and so does this message (its transport gives it again: the stream's worker and
            # the HTTP host without counting a delivery, the in-process link after a pause).
            # Dropped, they were lost for good when this message published no scene of its own
            # (a refused action): the party's screens stayed a scene behind the game.
            log.info(
                "party_sync unavailable: %d unpublished event(s) of an earlier action of run %s "
                "wait",
                len(state.outbox),
                state.run_id,
                extra={"run_id": state.run_id, "outbox": len(state.outbox)},
            )
            raise
        except Exception:
            log.warning(
                "dropping %d unpublished event(s) of an earlier action",
                len(state.outbox),
                exc_info=True,
            )
            votes.abandon(state)
            dropped = {e.action_id for e in state.outbox if e.type == "action.result"}
            state.dropped = [*state.dropped, *sorted(dropped)][-MAX_DROPPED:]
            state.outbox.clear()
            state.narrating_until = None
            await self.store.commit(state)
        return state


def outbox_key(run: Sequence[OutboxEvent]) -> str:
    """The key a run of one message's events (an action's, a join's, a re-statement's) is
    published under (``BatchPublisher.publish_many``'s ``key``): the same for every copy of those
    events (another process's, a retry's), another for anything else. From the message's
    ``action_id`` and ``trace_id`` and the events themselves, hashed to fit the key rule (the id
    alphabet, up to 128 characters)."""
    first = run[0]
    identity = [first.action_id, first.trace_id, [[e.type, e.payload] for e in run]]
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    digest = hashlib.blake2b(text.encode(), digest_size=16)
    return "ce-" + digest.hexdigest()


def publisher_clock(publisher: EventPublisher) -> Callable[[], float]:
    """The publisher's ``clock()`` (Unix seconds on party_sync's clock) if it has one, else
    this machine's."""
    clock = getattr(publisher, "clock", None)
    return clock if callable(clock) else time.time


def create_engine(environ: Mapping[str, str] | None = None) -> ReferenceEngine:
    """The factory party_sync loads (``--engine campaign_engine:create_engine``, the default).

    ``CAMPAIGN_ENGINE_SEED`` (an integer) makes the dice reproducible; ``CAMPAIGN_ENGINE_CAMPAIGN``
    is the path of a campaign JSON file to play instead of the built-in "The Sunken Lantern";
    ``CAMPAIGN_ENGINE_DATABASE_URL`` says where runs and chronicles live (``store.open_store``:
    ``sqlite:///PATH``, ``postgresql://…`` or ``memory://``; default
    ``sqlite:///campaign_engine.sqlite3``). The store connects when the engine starts.
    ``CAMPAIGN_ENGINE_VOTE_TIMEOUT`` (seconds) overrides how long every party vote lasts.
    ``CAMPAIGN_ENGINE_NARRATION_SPEED`` (characters per second; unset or 0: off) narrates each
    action's scene text live, like a model writing it (``make run`` sets it).
    """
    env = os.environ if environ is None else environ
    seed_text = env.get(ENV_SEED, "").strip()
    try:
        seed = int(seed_text) if seed_text else None
    except ValueError:
        raise ValueError(f"{ENV_SEED} must be an integer, got {seed_text!r}") from None
    timeout_text = env.get(ENV_VOTE_TIMEOUT, "").strip()
    try:
        vote_timeout = float(timeout_text) if timeout_text else None
    except ValueError:
        vote_timeout = -1.0
    if vote_timeout is not None and not 0 < vote_timeout <= MAX_VOTE_TIMEOUT_S:
        raise ValueError(
            f"{ENV_VOTE_TIMEOUT} must be a number of seconds in (0, {MAX_VOTE_TIMEOUT_S}], "
            f"got {timeout_text!r}"
        )
    speed = narration.parse_speed(env.get(ENV_NARRATION_SPEED, ""), ENV_NARRATION_SPEED)
    path = env.get(ENV_CAMPAIGN, "").strip()
    campaign = load_campaign(path) if path else builtin_campaign()
    store = open_store(env.get(ENV_DATABASE_URL))
    log.info(
        "campaign %r (%d scenes), seed %s, storage %s, live narration %s",
        campaign.title,
        len(campaign.scenes),
        seed,
        store.url,
        f"at {speed:g} characters/s" if speed else "off",
    )
    return ReferenceEngine(
        campaign, seed=seed, store=store, vote_timeout_s=vote_timeout, narration_speed=speed
    )


__all__ = [
    "ENV_CAMPAIGN",
    "ENV_DATABASE_URL",
    "ENV_NARRATION_SPEED",
    "ENV_SEED",
    "ENV_VOTE_TIMEOUT",
    "ReferenceEngine",
    "create_engine",
]
