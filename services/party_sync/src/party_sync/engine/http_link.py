"""The HTTP engine link: each accepted action is POSTed to ``PARTY_SYNC_ENGINE_URL``.

**Actions** go to ``engine_url`` (``url``), and only actions. Body::

    {"party_id": …, "campaign_run_id": …, "envelope": <the action.request envelope>,
     "deadline": <Unix seconds, absent if none>}

Headers: ``Authorization: Bearer <PARTY_SYNC_API_KEY>`` (the engine host checks it: ``party-sync
engine-http`` answers 401 without it), ``X-Trace-Id`` (the trace), ``Idempotency-Key`` (the
``action_id``),
``X-Action-Deadline`` (the deadline again, decimal Unix seconds; absent if none),
``X-Delivery-Attempt``: 1 + the number of earlier attempts that *may have reached* the engine (an
attempt refused at connect time did not), so ``1`` promises the engine has never seen the action,
and, while tracing is on, ``traceparent`` (W3C trace context: the engine's spans, and the events
it publishes back through the API, join the action's trace; ``party_sync.tracing``).

Before the first POST the link claims the action (``LinkHost.claim``): only ``START`` is delivered
(``EXPIRED``/``FINAL``: party_sync has already answered it). With ``engine_claims``
(``engine_http_claim = engine``) it does not: each delivery carries ``X-Party-Sync-Claim: engine``
and the engine host claims through the server API right before its engine starts it, answering
with ``X-Party-Sync-Claimed``; the action stays unstarted until then, so the deadline sweep
refuses one no host claimed in time, and between retries the link only looks at the ledger
(``LinkHost.answered``). A 2xx without that header: the host does not claim (``_not_claimed``).
Answers:

- 2xx: delivered; the engine publishes its events through ``POST /api/v1/parties/{id}/events``;
- 409 ``{"error": "expired"}``: the engine host did not start it, its deadline had passed (it only
  says so for attempt 1); the player gets ``action_timeout``, true because it was never started;
- 401 to a first delivery: the host refused party_sync's key, not the action (it never
  reached the engine): an ERROR log naming ``PARTY_SYNC_API_KEY``, and the player gets
  ``engine_unavailable``;
- other 4xx: final; the player gets ``action_rejected`` with the engine's ``detail`` (or the
  status);
- connection refused (``aiohttp.ClientConnectorError``; or ``aiohttp.InvalidURL``), or 503
  ``{"error": "shutting_down"}`` (the engine host read no whole body): the request never reached
  the engine; retried with exponential backoff and full jitter up to ``engine_http_retries``
  times. If *every* attempt was
  refused like this, the player gets ``engine_unavailable``: true, the engine never saw it (a
  party's decision, a finished vote's ``choice`` action with no deadline, is never refused so:
  it is retried with capped backoff until the engine answers, the decision the party saw in
  ``vote.finished`` kept); never retried past the action's deadline: at the deadline the
  player gets ``action_timeout`` (what the engine host answers a first delivery after it);
- 5xx ``{"error": "engine_error"}`` (what ``party-sync engine-http`` answers when the engine
  raised, which by the engine contract means *not applied*): retried like any 5xx, and after the
  fifth such answer (``ENGINE_FAILURES``, as the stream worker's fifth delivery) the player gets
  ``engine_error`` — unless an earlier attempt's outcome is unknown (a timeout, another 5xx, a
  dropped connection: the engine may still be applying it), after which nothing is reported;
  after such answers, a host that cannot be reached any more until the retries run out is
  ``engine_error`` too (nothing was applied);
- timeout after sending, another 5xx, a dropped connection: the engine *may* have applied it, so
  the link never reports a failure. It keeps retrying (the engine deduplicates by
  ``action_id``) with capped backoff after the normal retries, asking ``claim`` between attempts,
  until the action has its final answer (``FINAL``: the engine's result arrived) or
  ``give_up_after`` seconds (``action_record_ttl``) pass; then it stops with an ERROR log and
  tells the player nothing false.

party_sync never forwards an action twice on its own: a client's repeat is answered from the
ledger.

**Notices** (not actions) go to ``notice_url`` (``PARTY_SYNC_ENGINE_NOTICE_URL``), never to the
action URL. Body::

    {"kind": "join" | "restate", "party_id": …, "campaign_run_id": …, "envelope": …}

with a ``party.join`` envelope, or ``{"type": "party.restate", "timestamp", "trace_id",
"payload": {"epoch": …}}`` (``party_sync.engine.wire``); headers ``X-Trace-Id`` and
``Authorization``. 2xx: delivered;
4xx: refused (logged); connection errors and 5xx: retried like actions, and on with the capped
backoff for up to ``give_up_after`` (an engine that was down gets them once it is back), then
logged. With no
notice URL, notices are not sent over HTTP at all (one INFO line at start says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Final

import aiohttp
import orjson

from party_sync import tracing
from party_sync.engine import wire
from party_sync.engine.health import public_url
from party_sync.engine.inprocess import claim_until_answered, refuse_until_recorded
from party_sync.engine.interface import (
    ENGINE_FAILED,
    ENGINE_FAILURES,
    ActionRequest,
    Claim,
    JoinNotice,
    LinkHost,
    RestateNotice,
)
from party_sync.protocol import types as t
from party_sync.protocol.errors import ErrorCode, PartySyncError
from party_sync.tasks import Episode, LatestPerKey, cancel_and_wait, spawn_kept

log = logging.getLogger(__name__)

#: The error an engine host answers (409) for a first delivery past its deadline.
EXPIRED = "expired"
#: The error an engine host answers (500) when the engine raised (not applied).
ENGINE_ERROR = ErrorCode.ENGINE_ERROR.value
#: The error an engine host answers (503) to a body still arriving when it began to shut down
#: (``problems.answer_bodies_at_shutdown``): the engine never saw the action.
SHUTTING_DOWN: Final = "shutting_down"


class _Unreached(PartySyncError):
    """The request cannot have reached the engine (refused or unresolvable at connect time)."""


class _Retryable(PartySyncError):
    """The request may have reached the engine (timeout after sending, 5xx, dropped connection)."""


class _EngineFailed(_Retryable):
    """A 5xx whose body is ``{"error": "engine_error"}``: the engine host says the engine raised
    (``party-sync engine-http`` answers so), which by the engine contract means *not applied*."""


#: Seconds after the last delivery attempt that a refused API key still marks the link down
#: (``HttpEngineLink.key_refused``).
KEY_MEMORY: Final = 60.0


class HttpEngineLink:
    #: The engine host claims each action right before it starts (``EngineLink``).
    claims_on_accept = False
    #: Its deliveries live in this node (``EngineLink``): its claims name the node.
    node_bound = True

    def __init__(
        self,
        url: str,
        *,
        notice_url: str | None = None,
        timeout: float = 5.0,
        retries: int = 8,
        backoff_base: float = 0.1,
        backoff_max: float = 5.0,
        give_up_after: float = 600.0,
        claim_patience: float = 600.0,
        api_key: str | None = None,
        engine_claims: bool = False,
        node_id: str | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        #: The engine host claims each action itself (``engine_http_claim = engine``): the node
        #: does not claim before its first POST, and asks the host to (``wire.CLAIM_HEADER``).
        #: Set back to False, with an ERROR, when a host answers such a delivery 2xx without
        #: saying it claimed (``wire.CLAIMED_HEADER``): that host does not claim.
        self.engine_claims = engine_claims
        #: This node's id, which the engine host's claims name (``wire.NODE_HEADER``)
        self.node_id = node_id
        #: ``Authorization: Bearer <api_key>`` on every delivery (the engine host checks it)
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.notice_url = notice_url
        self.timeout = timeout
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.give_up_after = give_up_after
        self.claim_patience = claim_patience
        self._rng = rng or random.Random()
        #: Now, by the deployment's clock (the backend's: Redis's in Redis mode), as deadlines
        self.clock = clock
        self._host: LinkHost | None = None
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: The party decisions being delivered (``(party_id, action_id)``): one kept waiting for
        #: an engine that is down is not handed over again by a later sweep meanwhile.
        self._decisions: set[tuple[str, str]] = set()
        #: Per party whose decision could not reach the engine (it was down): set once that
        #: decision is delivered (or an attempt may have reached the engine). The party's other
        #: actions wait for it (within their deadlines), so that after an engine outage the
        #: decision the party saw in vote.finished reaches the engine before a member's choice
        #: made after it (chaos probe: an engine that lets members choose again once a vote's
        #: result is long overdue applied a member's choice instead of the party's). With the
        #: engine up, nothing waits.
        self._decision_gates: dict[str, asyncio.Event] = {}
        #: Set (and replaced) whenever an attempt gets the engine host's answer: a decision
        #: waiting out its backoff for an engine that was down goes at once.
        self._answering = asyncio.Event()
        #: The restate notice being delivered, per party: a newer one for the party replaces it.
        self._restates = LatestPerKey()
        #: The join notice being delivered, per party and character: a newer one replaces it.
        self._joins = LatestPerKey()
        #: Attempts that failed: refused, timed out, dropped, 5xx, the key refused (401)
        #: (engine_link_failures_total).
        self.failures = 0
        #: What the engine host said when it last refused party_sync's key (401), until it
        #: takes a delivery again: the link is then down for ``/readyz`` (``HttpProbe``) and
        #: ``engine_link_ok``, though the engine URL accepts connections.
        self._key_refused: str | None = None
        #: ``time.monotonic()`` when a delivery that got no answer in time was sent, until one
        #: gets an answer: an engine host that accepts connections and answers nothing (frozen,
        #: or stuck) shows in ``/readyz`` through it (``HttpProbe``).
        self._silent_since: float | None = None
        #: ``time.monotonic()`` of the first of the 5xx answers the host has given since its last
        #: other answer, and the latest one's status (``failing``)
        self._failing_since: float | None = None
        self._failing_status = 0
        self._failing_unanswered = False  # an attempt since that last 5xx had no answer
        #: ``time.monotonic()`` of the last delivery attempt: what the attempts met describes
        #: the engine host only while they go on (``key_refused``, ``silent_since``).
        self._last_attempt = float("-inf")
        #: Deliveries given up because the engine never answered (one WARNING when they begin,
        #: one INFO when a delivery is answered again; each one's details at DEBUG): an engine
        #: that is down must not write a line per action and per retry.
        self._unreachable = Episode(log, "engine deliveries")

    async def start(self, host: LinkHost) -> None:
        self._host = host
        # the host's clock, when it has one (the gateway's publisher: the backend's, Redis's in
        # Redis mode), so that deadlines are read on the clock they were made by
        host_clock = getattr(host, "clock", None)
        if callable(host_clock):
            self.clock = host_clock
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        if self.notice_url is None:
            log.info(
                "engine notices (join, restate) are not sent over HTTP: "
                "PARTY_SYNC_ENGINE_NOTICE_URL is unset"
            )

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        return spawn_kept(self._tasks, coro, "an HTTP engine delivery")

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
        return self._rng.uniform(
            0, min(self.backoff_max, self.backoff_base * 2 ** min(attempt, 30))
        )

    async def submit(self, action: ActionRequest) -> None:
        if _is_decision(action):
            key = (action.party_id, action.action_id)
            if key in self._decisions:
                return  # (its delivery goes on)
            self._decisions.add(key)
            task = self._spawn(self._traced_delivery(action))
            task.add_done_callback(lambda _: self._decision_ended(key))
            return
        self._spawn(self._traced_delivery(action))

    def _decision_ended(self, key: tuple[str, str]) -> None:
        self._decisions.discard(key)
        if not any(p == key[0] for p, _ in self._decisions):
            self._open_gate(key[0])

    def _open_gate(self, party_id: str) -> None:
        gate = self._decision_gates.pop(party_id, None)
        if gate is not None:
            gate.set()

    async def _after_decisions(self, action: ActionRequest) -> None:
        """Wait while a decision of the action's party is being delivered, at most until the
        action's deadline (then its claim says it expired: never started)."""
        gate = self._decision_gates.get(action.party_id)
        if gate is None or _is_decision(action):
            return
        left = None if action.deadline is None else max(0.0, action.deadline - self.clock())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gate.wait(), left)

    async def notify_join(self, notice: JoinNotice) -> None:
        envelope = wire.join_envelope(notice)
        self._notify("join", notice.party_id, notice.campaign_run_id, envelope, notice.trace_id)

    async def notify_restate(self, notice: RestateNotice) -> None:
        envelope = wire.restate_envelope(notice)
        self._notify("restate", notice.party_id, notice.campaign_run_id, envelope, notice.trace_id)

    def _notify(
        self, kind: str, party_id: str, run_id: str, envelope: Mapping[str, Any], trace_id: str
    ) -> None:
        if self.notice_url is None:
            return
        body = {"kind": kind, "party_id": party_id, "campaign_run_id": run_id, "envelope": envelope}
        # A restate is what brings the party's scene back after party_sync lost it, and a join
        # is what starts a new run in an engine that waits for its first member (the reference
        # engine does: a party formed while the engine was down never got its opening scene,
        # chaos probe): each is tried until the engine takes it (within ``give_up_after``),
        # through an engine outage too. A newer restate for the same party (a later epoch), or
        # join of the same character, replaces one still being tried.
        task = self._spawn(self._deliver_notice(self.notice_url, body, trace_id))
        if kind == "restate":
            self._restates.put(party_id, task)
        else:
            self._joins.put(f"{party_id}\n{envelope['payload']['character_id']}", task)

    async def _deliver_notice(self, url: str, body: Mapping[str, Any], trace_id: str) -> None:
        """POST a notice, ``retries`` times, then on with the capped backoff until
        ``give_up_after`` seconds have passed since the first attempt."""
        extra = {"trace_id": trace_id, "party_id": body["party_id"]}
        headers = {"X-Trace-Id": trace_id, "Content-Type": "application/json", **self._auth}
        loop = asyncio.get_running_loop()
        persist = self.give_up_after
        give_up_at = loop.time() + persist
        attempt = 0
        unreached_only = True  # every failed attempt met no engine host at all
        while True:
            headers[wire.CLOCK_HEADER] = f"{self.clock():.3f}"
            try:
                status, answer, _ = await self._post(url, body, headers)
            except (_Unreached, _Retryable) as exc:
                self.failures += 1
                unreached_only = unreached_only and isinstance(exc, _Unreached)
                if attempt >= self.retries and isinstance(exc, _Unreached):
                    self._engine_unreachable(exc)  # once per episode, for actions and notices
                if attempt >= self.retries and loop.time() >= give_up_at:
                    log.log(
                        logging.DEBUG if self._unreachable.active else logging.WARNING,
                        "%s notice not delivered: %s",
                        body["kind"],
                        exc,
                        extra=extra,
                    )
                    return
                if attempt == self.retries and not self._unreachable.active:
                    log.warning(
                        "%s notice not delivered yet (%s): trying on for up to %.0fs",
                        body["kind"],
                        exc,
                        persist,
                        extra=extra,
                    )
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1
                continue
            if status == 401:
                self.failures += 1
                self._refused_key(f"a {body['kind']} notice", status, extra)
                return
            self._key_taken()
            tries = f" after {attempt + 1} attempts" if attempt else ""
            if status >= 400:
                log.warning(
                    "the engine refused a %s notice (%d)%s: %s",
                    body["kind"],
                    status,
                    tries,
                    _detail(answer),
                    extra=extra,
                )
            elif attempt > self.retries:
                # (after an outage only: its WARNING and INFO lines say it for every notice)
                level = logging.DEBUG if unreached_only else logging.INFO
                log.log(level, "%s notice delivered%s", body["kind"], tries, extra=extra)
            return

    async def _traced_delivery(self, action: ActionRequest) -> None:
        """``_deliver_action`` in a CLIENT span whose context each attempt carries."""
        if not tracing.is_on():
            await self._deliver_action(action)
            return
        attributes = {"party_sync.action_id": action.action_id, "party_sync.transport": "http"}
        with tracing.span(
            "engine.http deliver", kind=tracing.SpanKind.CLIENT, attributes=attributes
        ):
            await self._deliver_action(action)

    async def _deliver_action(self, action: ActionRequest) -> None:
        host = self._host
        assert host is not None, "submit() before start()"
        extra = {"trace_id": action.trace_id, "action_id": action.action_id}
        await self._after_decisions(action)
        # With the engine host claiming (``engine_claims``), the action stays unstarted in the
        # ledger until the host claims it right before its engine starts it: one whose deliveries
        # wait in a frozen host past its deadline is refused then (``action_timeout``), and the
        # host's claim, when it wakes, says EXPIRED. Otherwise this node claims it now.
        # (A redelivery, an action taken over from a node that died, was started already, by a
        # claim that named that node: it is delivered as the node would deliver it, unclaimed.)
        by_engine = self.engine_claims and not action.redelivery
        if not by_engine:
            claim = await claim_until_answered(host, action, patience=self.claim_patience)
            if claim is not Claim.START:
                if claim is not None:
                    log.info("action not delivered: %s", claim.value, extra=extra)
                return
        body: dict[str, Any] = {
            "party_id": action.party_id,
            "campaign_run_id": action.campaign_run_id,
            "envelope": dict(action.envelope),
        }
        headers = {
            "X-Trace-Id": action.trace_id,
            "Idempotency-Key": action.action_id,
            "Content-Type": "application/json",
            **self._auth,
        }
        if action.deadline is not None:
            body["deadline"] = action.deadline
            headers["X-Action-Deadline"] = wire.format_deadline(action.deadline)
        if by_engine:
            headers[wire.CLAIM_HEADER] = wire.CLAIM_BY_ENGINE
            if self.node_id:
                headers[wire.NODE_HEADER] = self.node_id
        tracing.inject(headers)  # traceparent, while tracing is on
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.give_up_after
        # attempts that may have reached the engine: a taken-over action's dead node may have
        # delivered it (and the engine applied it), so it is never "attempt 1, never seen" and
        # never refused as unreachable
        reached = 1 if action.redelivery else 0
        attempt = 0
        engine_failures = 0  # attempts the engine host answered "the engine raised"
        unreached_run = 0  # attempts in a row that cannot have reached the engine
        unknown = action.redelivery  # an attempt may have reached the engine, outcome unknown
        # A party's decision (a finished vote's ``choice``: no deadline, nobody waits for it) is
        # never refused as unreachable: "engine_unavailable" would end it, and the decision the
        # party saw in vote.finished would never reach the engine (votes probe). It is delivered
        # once the engine answers (docs/protocol.md, Votes, "Applied").
        decision = _is_decision(action)
        kept = False  # said once: the decision waits for the engine
        while True:
            headers["X-Delivery-Attempt"] = str(reached + 1)
            headers[wire.CLOCK_HEADER] = f"{self.clock():.3f}"
            if action.deadline is not None:
                # the time left, by the deployment's clock: a host whose own clock is off
                # judges the deadline by it, not by comparing clocks (clock skew probe)
                left = max(0.0, action.deadline - self.clock())
                headers[wire.TIME_LEFT_HEADER] = f"{left:.3f}"
            try:
                status, answer, claimed = await self._post(self.url, body, headers)
            except _Unreached as exc:
                failure: Exception = exc
                self.failures += 1
                unreached_run += 1
                if decision and not reached:  # the party's next actions wait for it now
                    self._decision_gates.setdefault(action.party_id, asyncio.Event())
            except _Retryable as exc:
                unreached_run = 0
                reached += 1
                if decision:  # it may be with the engine: the party's actions go on
                    self._open_gate(action.party_id)
                failure = exc
                self.failures += 1
                if not isinstance(exc, _EngineFailed):
                    unknown = True
                elif not unknown:  # (after an unknown outcome, it may be applying it still)
                    engine_failures += 1
                    if engine_failures >= ENGINE_FAILURES:
                        if await self._answered_meanwhile(host, action, by_engine):
                            # an engine host that published, then answered engine_error: the
                            # player has its answer; nothing failed that anyone must look at
                            log.info("the action was answered meanwhile", extra=extra)
                            return
                        log.error("engine failed %d times; giving up", engine_failures, extra=extra)
                        await self._refuse(action, ErrorCode.ENGINE_ERROR, ENGINE_FAILED)
                        return
            else:
                if not _retry_answer(status, answer, reached):
                    if by_engine and claimed is None and 200 <= status < 300:
                        await self._not_claimed(host, action)
                    await self._answered(host, action, status, answer)
                    return
                # Not the engine's final word: a proxy's 408/425/429, or (after an attempt that
                # may have reached the engine) e.g. 409 "this Idempotency-Key is in progress".
                unreached_run = 0
                reached += 1
                unknown = True
                if decision:
                    self._open_gate(action.party_id)
                failure = _Retryable(f"HTTP {status}")
                self.failures += 1
            attempt += 1
            # An attempt may have reached the engine: before sending it again, ask whether its
            # answer came meanwhile (a slow engine that published after our timeout). Asked
            # before every retry, not only once the retries ran out: each delivery of an action
            # that has its answer is work, and money (a language model), for the engine.
            if reached and await self._answered_while_retried(host, action, by_engine):
                return
            if not reached and _past(action.deadline, self.clock()):
                # never delivered, and now too late to start: the engine host would answer a
                # first delivery 409 expired; the truth is the same without it, and at the
                # deadline, not when the retries run out
                if not self._engine_unreachable(failure):
                    log.debug("engine unreachable until the deadline: %s", failure, extra=extra)
                await self._refuse(
                    action,
                    ErrorCode.ACTION_TIMEOUT,
                    "the engine was unreachable until the action's deadline: retry",
                )
                return
            if attempt > self.retries:
                if not reached and decision:
                    self._engine_unreachable(failure)
                    if not kept:
                        kept = True
                        log.warning(
                            "engine unreachable (%s): the party's decision is kept and "
                            "delivered once the engine answers",
                            failure,
                            extra=extra,
                        )
                elif not reached:  # it never left party_sync: "unavailable" is the truth
                    if not self._engine_unreachable(failure):
                        log.debug("engine unreachable, giving up: %s", failure, extra=extra)
                    await self._refuse(
                        action, ErrorCode.ENGINE_UNAVAILABLE, "the engine is unreachable: retry"
                    )
                    return
                elif not unknown and unreached_run > self.retries:
                    # Every attempt that reached the host was answered "the engine raised" (not
                    # applied), and then as many attempts in a row as a host down gets could not
                    # reach it: nothing can have been applied, so the truth is told (it was
                    # silence until give_up_after, then an ERROR saying "it may have been
                    # applied": re-check probe)
                    log.error(
                        "engine failed %d time(s), then unreachable; giving up",
                        engine_failures,
                        extra=extra,
                    )
                    await self._refuse(action, ErrorCode.ENGINE_ERROR, ENGINE_FAILED)
                    return
                elif loop.time() >= give_up_at:
                    log.error(
                        "engine delivery abandoned after %.0fs (it may have been applied: the "
                        "player is told nothing)",
                        self.give_up_after,
                        extra=extra,
                    )
                    return
            delay = self._backoff(attempt - 1)
            if not reached and action.deadline is not None:  # not past it, asleep
                delay = min(delay, max(0.0, action.deadline - self.clock()))
            log.debug(
                "engine delivery failed (%s); retry %d in %.2fs",
                failure,
                attempt,
                delay,
                extra=extra,
            )
            if decision and not reached:  # the engine answering again ends the wait
                answering = self._answering
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(answering.wait(), delay)
            else:
                await asyncio.sleep(delay)
                # and asked again after the pause: the answer of a slow engine often comes
                # during it (re-check probe: a second delivery 120 ms after the engine's result)
                if (
                    reached
                    and delay > 0
                    and await self._answered_while_retried(host, action, by_engine)
                ):
                    return

    async def _answered_while_retried(
        self, host: LinkHost, action: ActionRequest, by_engine: bool
    ) -> bool:
        """Whether an action whose delivery may have reached the engine has its answer now
        (its engine answered it, or, with the engine host claiming, its deadline came before
        any host started it): the delivery ends."""
        if not await self._answered_meanwhile(host, action, by_engine):
            return False
        if not by_engine:  # (with the host claiming, the answer may be the deadline's: a host
            self._silent_since = None  # frozen meanwhile stays silent for /readyz)
        log.info(
            "the action was answered while its delivery was retried",
            extra={"trace_id": action.trace_id, "action_id": action.action_id},
        )
        return True

    async def _answered_meanwhile(
        self, host: LinkHost, action: ActionRequest, by_engine: bool
    ) -> bool:
        try:
            if by_engine:  # a look: a claim here would start it for a host that has not
                return await host.answered(action)
            # Without its deadline: this action was started (claimed START) and maybe applied;
            # if party_sync lost its record, a deadline would make the claim refuse it (a lie).
            return await host.claim(replace(action, deadline=None)) is Claim.FINAL
        except Exception:
            return False

    async def _not_claimed(self, host: LinkHost, action: ActionRequest) -> None:
        """The engine host took a delivery that asked it to claim (2xx) without saying it did
        (``wire.CLAIMED_HEADER``): it does not claim. The node claims from now on, and claims
        this action now, so that its deadline does not refuse what the engine handled."""
        if self.engine_claims:
            self.engine_claims = False
            log.error(
                "engine_http_claim is engine, but the engine host at %s does not claim (its 2xx "
                "answer has no %s header): this node claims for it from now on. Use "
                "party-sync engine-http, or claim through "
                "POST /api/v1/parties/{party_id}/actions/{action_id}/claim and answer with the "
                "header, or set PARTY_SYNC_ENGINE_HTTP_CLAIM=node",
                public_url(self.url),
                wire.CLAIMED_HEADER,
            )
        claim = await claim_until_answered(host, action, patience=self.claim_patience)
        if claim is Claim.EXPIRED:  # its deadline came first: the engine's result will stand
            log.warning(
                "an action the engine host took without claiming had passed its deadline: its "
                "player was told action_timeout, and the engine's result follows",
                extra={"trace_id": action.trace_id, "action_id": action.action_id},
            )

    async def _answered(
        self, host: LinkHost, action: ActionRequest, status: int, answer: Any
    ) -> None:
        if status == 401:
            # The door, not the game: the engine never saw the action (a first delivery; a
            # later one is retried by _retry_answer), so "unavailable" is the truth. (A 403
            # stays a refusal of the action: engines answer "not allowed" so.)
            self.failures += 1
            extra = {"trace_id": action.trace_id, "action_id": action.action_id}
            self._refused_key("an action", status, extra)
            await self._refuse(
                action, ErrorCode.ENGINE_UNAVAILABLE, "the engine is unavailable: retry later"
            )
            return
        self._key_taken()
        if status == 409 and isinstance(answer, dict) and answer.get("error") == EXPIRED:
            await self._refuse(
                action,
                ErrorCode.ACTION_TIMEOUT,
                "the engine did not start the action before its deadline: retry",
            )
        elif 400 <= status < 500:
            await self._refuse(
                action,
                ErrorCode.ACTION_REJECTED,
                _detail(answer) or f"the engine refused the action ({status})",
            )

    async def _refuse(self, action: ActionRequest, code: ErrorCode, text: str) -> None:
        """The action's final answer, a refusal, recorded through a backend outage too (it was
        claimed: no timeout would answer it instead)."""
        assert self._host is not None
        await refuse_until_recorded(self._host, action, code, text, patience=self.claim_patience)

    @property
    def key_refused(self) -> str | None:
        """What the engine host said when it refused party_sync's key (401), while deliveries
        go on: within ``KEY_MEMORY`` seconds of the last attempt (the operator may have fixed
        the key since; with no delivery, nothing says so)."""
        if time.monotonic() - self._last_attempt > KEY_MEMORY:
            return None
        return self._key_refused

    def host_restarted(self) -> None:
        """The engine URL accepts connections again after it did not (``HttpProbe``): a
        refusal of the key was the host of before's, and is forgotten (the operator restarted
        it, perhaps with the right key); the next delivery says what this one thinks."""
        if self._key_refused is not None:
            self._key_refused = None
            log.info("the engine host restarted: its earlier refusal of the key is forgotten")

    @property
    def silent_since(self) -> float | None:
        """``time.monotonic()`` when a delivery that got no answer in time was sent, while no
        delivery got one since and attempts go on (a stuck or frozen host); None once nothing
        has been tried for longer than an attempt and its backoff take."""
        return None if self._attempts_over() else self._silent_since

    @property
    def failing(self) -> tuple[float, str] | None:
        """(``time.monotonic()`` since when, what) while every delivery the host answered since
        then was answered 5xx (the engine, or a proxy before it, failing every action) and
        attempts go on; None after another answer, or once nothing has been tried for longer
        than an attempt and its backoff take."""
        if self._failing_since is None or self._attempts_over():
            return None
        what = f"HTTP {self._failing_status}"
        if self._failing_unanswered:  # (HTTP probe: a host only slow now was said to answer 500)
            what += f", then no answer within {self.timeout:g} s"
        return self._failing_since, what

    def _attempts_over(self) -> bool:
        """Nothing tried for longer than an attempt and its backoff take: what the last attempts
        met no longer describes the host (``silent_since``, ``failing``)."""
        return time.monotonic() - self._last_attempt > self.timeout + self.backoff_max + 1.0

    def _refused_key(self, what: str, status: int, extra: Mapping[str, str]) -> None:
        """The engine host answered 401: one ERROR when this begins (naming the setting), then
        DEBUG per delivery until a delivery is taken again."""
        began = self._key_refused is None
        self._key_refused = f"the engine host refused party_sync's API key (HTTP {status})"
        if began:
            log.error(
                "the engine refused party_sync's key (HTTP %d, on %s): give the engine host the "
                "same PARTY_SYNC_API_KEY as party_sync (logged once until it takes one again)",
                status,
                what,
                extra=dict(extra),
            )
        else:
            log.debug("the engine refused party_sync's key (HTTP %d)", status, extra=dict(extra))

    def _engine_unreachable(self, failure: Exception) -> bool:
        """Deliveries are given up because nothing answers at the engine's address: True (and
        one WARNING) when that begins."""
        return self._unreachable.trouble(
            "unreachable",
            f"the engine is unreachable ({failure}): each action is answered engine_unavailable "
            "(action_timeout if its deadline comes first; a party's vote decision is kept), and "
            "notices are held and tried on, until it is back",
            engine_url=public_url(self.url),
        )

    def _key_taken(self) -> None:
        """A delivery got an answer past the key check: the key is right (again), and the
        engine answers."""
        self._answering.set()  # (wakes the decisions waiting for it)
        self._answering = asyncio.Event()
        self._unreachable.fine(
            "the engine answers deliveries again", engine_url=public_url(self.url)
        )
        if self._key_refused is not None:
            self._key_refused = None
            log.info("the engine host takes party_sync's API key again")

    async def _post(
        self, url: str, body: Mapping[str, Any], headers: Mapping[str, str]
    ) -> tuple[int, Any, str | None]:
        """POST; (status, parsed JSON body or its text, the answer's ``wire.CLAIMED_HEADER``).
        Raises ``_Unreached``/``_Retryable``."""
        assert self._http is not None
        self._last_attempt = time.monotonic()
        try:
            async with self._http.post(url, data=orjson.dumps(body), headers=headers) as resp:
                answer = _parse(await _body_text(resp))
                self._silent_since = None  # it answers (whatever it says)
                if resp.status == 503 and _error_of(answer) == SHUTTING_DOWN:
                    # the host read no whole body: the engine never saw it, like a refused
                    # connection (it was counted as an unknown outcome: no engine_unavailable
                    # for ever, only silence until give_up_after); a host restarting, not one
                    # failing: not counted towards "answers every delivery with a 5xx"
                    raise _Unreached(f"HTTP 503 {SHUTTING_DOWN}")
                if resp.status < 500:
                    self._failing_since = None
                else:
                    if self._failing_since is None:
                        self._failing_since = self._last_attempt
                    self._failing_status, self._failing_unanswered = resp.status, False
                    if _error_of(answer) == ENGINE_ERROR:
                        raise _EngineFailed(f"HTTP {resp.status} {ENGINE_ERROR}")
                    raise _Retryable(f"HTTP {resp.status}")
                return resp.status, answer, resp.headers.get(wire.CLAIMED_HEADER)
        except (aiohttp.ClientConnectorError, aiohttp.InvalidURL) as exc:  # never sent
            raise _Unreached(type(exc).__name__) from None
        except TimeoutError:  # sent, and no answer in time: a stuck engine host, if it lasts
            if self._silent_since is None:
                self._silent_since = time.monotonic() - self.timeout
            self._failing_unanswered = True  # (said by ``failing`` while a streak lasts)
            raise _Retryable("TimeoutError") from None
        except aiohttp.ClientError as exc:
            raise _Retryable(type(exc).__name__) from None

    async def close(self) -> None:
        await cancel_and_wait(list(self._tasks), what="an HTTP engine call")
        if self._http is not None:
            await self._http.close()


async def _body_text(resp: aiohttp.ClientResponse) -> str:
    """The answer's body as text: bytes its charset (or UTF-8) cannot read as U+FFFD (recheck
    probe: a refusal in Latin-1 raised ``UnicodeDecodeError``, the delivery ended there and the
    player never had an answer). Below 500 the status is the engine's word and the body only
    its reason: a body that cannot be read (cut short, a broken gzip) is an empty one, not a
    failed attempt (fix-check probe: such a 400 was tried again until the record expired, as
    only a 422 is final once an attempt may have reached the engine)."""
    try:
        return await resp.text(errors="replace")
    except aiohttp.ClientPayloadError:
        if resp.status < 500:
            return ""
        raise  # a 5xx is tried again anyway (``_Retryable``)


def _parse(text: str) -> Any:
    try:
        return orjson.loads(text)
    except ValueError:
        return text


#: 4xx answers that say "later", whoever sends them (a proxy, a rate limiter).
RETRY_STATUSES = frozenset({408, 425, 429})


def _retry_answer(status: int, answer: Any, reached: int) -> bool:
    """True when a 4xx is not a final refusal: a "later" status, or, once an earlier attempt may
    have reached the engine (it may be applying the action), anything but the documented final
    answers (422: rejected or invalid; 409 ``expired``, which only a first attempt can get)."""
    if not 400 <= status < 500:
        return False
    if status in RETRY_STATUSES:
        return True
    expired = status == 409 and isinstance(answer, dict) and answer.get("error") == EXPIRED
    return reached > 0 and status != 422 and not expired


def _is_decision(action: ActionRequest) -> bool:
    """A party's decision: a finished vote's ``choice`` action (no deadline, nobody waits)."""
    return action.deadline is None and action.character_id == t.PARTY_ACTOR


def _past(deadline: float | None, now: float) -> bool:
    """An action's deadline (Unix seconds, the deployment's clock) has passed."""
    return deadline is not None and now >= deadline


def _detail(answer: Any) -> str | None:
    """The human reason in an engine's error body: its ``detail``, else its ``message`` (the
    sentence beside an ``error`` code: ``{"error": "invalid_action", "message": "target is out
    of range"}`` showed only the code: outside engine probe), else its ``error``; or a text
    body."""
    if isinstance(answer, str):
        return answer[:300] or None
    if isinstance(answer, dict):
        for key in ("detail", "message", "error"):
            if isinstance(answer.get(key), str):
                return str(answer[key])[:300]
    return None


def _error_of(answer: Any) -> Any:
    """The ``error`` of a JSON object answer (None for any other answer)."""
    return answer.get("error") if isinstance(answer, dict) else None
