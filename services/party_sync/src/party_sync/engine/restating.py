"""``EpochWatch``: every new epoch this process opens gets one re-statement request to the engine.

The decision is ``core.epochs.Openings`` (pure); this is its adapter. Every caller that gets
events back from a backend call reports them (``published``): ``BackendPublisher`` (an in-process
engine's events, the HTTP events API, an engine's vote, an ``engine-worker``'s engine) and the
gateway's executor (leaves, votes' events). An opening other than a join (joins are the party
core's: ``Announce``) becomes a ``RestateNotice`` handed to ``request``:

- on a gateway node, the engine link's ``notify_restate``, run as a task of its own (never inside
  the publish that opened the epoch: an in-process engine is inside its own ``handle_action``
  then, and may hold the lock its ``handle_restate`` takes), so every transport gets it as it
  gets a join's: a plain call in-process, a ``restate`` entry on the actions stream, a POST to the
  HTTP engine's notice URL;
- in ``party-sync engine-worker``, its own engine's ``handle_restate``, after the entry at hand
  (``StreamWorker`` calls ``restate_opened``): the worker's engine opened it, so no gateway knows.

The notice names the party's campaign run: the one the reporting caller knew, else one this
process learnt (a member's binding, an action it handed over), else the backend's record. With no
run known anywhere (the fence deletes the record with ``meta``) the opening waits until this
process learns the run (``knows``), and is logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol

from party_sync import tracing
from party_sync.core.epochs import Opening, Openings
from party_sync.core.events import Event
from party_sync.core.snapshot import Snapshot
from party_sync.engine.interface import RestateNotice
from party_sync.protocol import codec
from party_sync.protocol.errors import BackendUnavailable

log = logging.getLogger(__name__)

#: Seconds before this process met a new Redis server in which what it wrote may have gone to the
#: old master and been lost (``writes_may_be_lost``): a process moves its connections within
#: about a second of the sentinels naming a new master (``redis_connect``), and a node whose
#: engine posts to another node may lag it by as much again.
LOST_WRITES_WINDOW = 5.0
#: Attempts of a gateway's request before the opening waits for the next one (a backend error
#: appending to the actions stream; the in-process and HTTP links do not raise).
ATTEMPTS = 5
#: The pause after the first failed attempt; doubled after each.
FIRST_PAUSE = 0.1


class PartyRecords(Protocol):
    """What the watch reads from a backend (both have it): a party's epoch and recorded run."""

    async def party_run(self, party_id: str) -> str | None: ...

    async def snapshot(self, party_id: str, now: float | None = None) -> Snapshot: ...


async def restate_notice(
    backend: PartyRecords,
    party_id: str,
    run: str,
    trace_id: str,
    clock: Callable[[], float],
    epoch: str | None = None,
) -> RestateNotice:
    """The request asking the engine to re-state ``party_id`` (of ``run``), logged: the party's
    epoch as given, or read (``""`` when Redis does not answer: informative only, the engine
    re-states the run's current state). Both places that ask make it here: a gateway's join
    that opened the epoch (``Executor._announce``) and ``EpochWatch``."""
    if epoch is None:
        try:
            epoch = (await backend.snapshot(party_id)).epoch
        except BackendUnavailable:
            epoch = ""
    log.info(
        "new epoch: asking the engine to re-state the party",
        extra={"party_id": party_id, "trace_id": trace_id, "epoch": epoch or None},
    )
    return RestateNotice(party_id, run, epoch, trace_id, at=clock())


class EpochWatch:
    """The epoch openings of one process and their re-statement requests (module docstring).

    ``spawn``: how a gateway runs the requests as tasks; None (the worker): only
    ``restate_opened`` sends them.
    """

    def __init__(
        self,
        backend: PartyRecords,
        request: Callable[[RestateNotice], Awaitable[object]],
        clock: Callable[[], float],
        *,
        spawn: Callable[[Coroutine[Any, Any, Any]], object] | None = None,
    ) -> None:
        self.backend = backend
        self.request = request
        self.clock = clock
        self.spawn = spawn
        self.openings = Openings()
        self.requested = 0  # re-statement requests sent (tests, logs)
        self._draining = False

    def follow(self, backend: object) -> None:
        """Also report the events ``backend`` publishes on its own, for no caller (Redis: an
        answer lost in a failover written again, often the first event of a new epoch;
        ``RedisBackend.when_published``). A backend without such events is left alone."""
        when_published = getattr(backend, "when_published", None)
        if when_published is not None:
            when_published(self.published)
        when_new_server = getattr(backend, "when_new_server", None)
        if when_new_server is not None:
            when_new_server(self.writes_may_be_lost)

    def wrote(self, party_id: str) -> None:
        """This process wrote an event of ``party_id`` (every publish: ``writes_may_be_lost``)."""
        self.openings.wrote(party_id, self.clock())

    def writes_may_be_lost(self) -> None:
        """This process met a Redis server it never met: ask the engine to re-state every party
        it wrote to in the last ``LOST_WRITES_WINDOW`` seconds (``Openings.writes_lost``; before,
        an engine's re-statement that reached a node still on the old master was lost with it,
        and the party stayed without a scene until the next failover: HTTP link probe)."""
        due = self.openings.writes_lost(self.clock(), LOST_WRITES_WINDOW, codec.new_trace_id())
        if due:
            log.warning(
                "a new redis server: asking the engine to re-state the %d part(ies) this "
                "process wrote to in the last %.0f s (the old master may have lost those writes)",
                due,
                LOST_WRITES_WINDOW,
            )
            self._soon()

    @property
    def settled(self) -> bool:
        """No re-statement is due and none is being asked for (tests wait for it)."""
        return not self._draining and not self.openings.pending

    def knows(self, party_id: str, campaign_run_id: str) -> None:
        """The party plays ``campaign_run_id`` (a member's binding, an action's run)."""
        if self.openings.knows(party_id, campaign_run_id):
            self._soon()

    def published(self, events: Iterable[Event], campaign_run_id: str | None = None) -> None:
        """Events one backend call of this process returned (sequenced by it, or returned as
        standing); an opening among them gets its request."""
        now = self.clock()
        for event in events:
            self.openings.wrote(event.party_id, now)
        if self.openings.seen(events, campaign_run_id):
            self._soon()

    def _soon(self) -> None:
        if self.spawn is not None and not self._draining:
            self._draining = True
            self.spawn(self._drain())

    async def _drain(self) -> None:
        pause = FIRST_PAUSE
        try:
            for attempt in range(ATTEMPTS):
                if await self.restate_opened():
                    if not self.openings.pending:
                        return
                    continue  # opened meanwhile
                if attempt + 1 < ATTEMPTS:
                    await asyncio.sleep(pause)  # a backoff, not a synchronisation
                    pause *= 2
            log.warning("re-statement requests not sent; they are sent with the next opening")
        finally:
            self._draining = False

    async def restate_opened(self) -> bool:
        """Ask for every due re-statement; False if one could not be asked (it and the ones
        after it are due again)."""
        due = self.openings.take()
        for i, opening in enumerate(due):
            run = opening.campaign_run_id or await self._recorded_run(opening.party_id)
            if run is None:
                self.openings.park(opening)
                log.warning(
                    "a new epoch was opened but its campaign run is not known here: the "
                    "party is re-stated once this node learns it (a member connects)",
                    extra={"party_id": opening.party_id, "trace_id": opening.trace_id},
                )
                continue
            self.openings.knows(opening.party_id, run)
            if not await self._ask(opening, run):
                for later in due[i:]:
                    self.openings.again(later)
                return False
        return True

    async def _recorded_run(self, party_id: str) -> str | None:
        try:
            run = await self.backend.party_run(party_id)
        except BackendUnavailable:
            return None
        return run or None

    async def _ask(self, opening: Opening, run: str) -> bool:
        notice = await restate_notice(
            self.backend, opening.party_id, run, opening.trace_id, self.clock
        )
        try:
            # (traced under the opening's trace id, as the join's own request is: executor)
            with tracing.incoming(
                "restate",
                None,
                trace_id=opening.trace_id,
                attributes={"party_sync.party_id": opening.party_id},
            ):
                await self.request(notice)
        except Exception as exc:
            log.warning(
                "re-statement request failed: %r",
                exc,
                extra={"party_id": opening.party_id, "trace_id": opening.trace_id},
            )
            return False
        self.requested += 1
        return True
