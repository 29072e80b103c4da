"""The in-process engine link (the embedded default): the engine runs in the server's event loop.

Each accepted action runs as its own task. Right before the engine gets it, the link claims it
(``LinkHost.claim``): only ``Claim.START`` runs; ``EXPIRED`` (past its ``deadline``, already
refused with ``action_timeout``) and ``FINAL`` (already answered) are dropped, so an action that
waited behind a slow event loop past its deadline is never applied after its sender was told it
timed out. If the claim itself fails (the backend is unavailable), it is asked again with a capped
backoff (``claim_until_answered``): a claim lost in a stall may still have been recorded, and then
only the engine's answer is truthful. After ``claim_patience`` seconds without an answer (the
server gives it ``action_record_ttl``: after that the action's record, which takes its answer, is
gone, and a resend is a new action) the action is not started (logged at ERROR).

Notices are calls: ``notify_join`` → ``Engine.handle_join`` (a hint: once), ``notify_restate`` →
``restate_engine`` (the engine's optional ``handle_restate``), which brings a party's scene back
after party_sync lost it: if party_sync's own backend fails under it (the engine's publish
raises), it is tried again with backoff, as a task, for up to ``claim_patience``, and a newer one
for the party replaces it. An engine's exception there is logged, never raised into the gateway.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import replace
from typing import Any

from party_sync import tracing
from party_sync.engine.interface import (
    ENGINE_FAILED,
    ActionRequest,
    Claim,
    Engine,
    EngineRejected,
    JoinNotice,
    LinkHost,
    RestateNotice,
    restate_engine,
    start_engine,
)
from party_sync.protocol.errors import BackendUnavailable, ErrorCode
from party_sync.tasks import LatestPerKey, cancel_and_wait, retried, spawn_kept

log = logging.getLogger(__name__)


async def claim_until_answered(
    host: LinkHost, action: ActionRequest, *, patience: float, pause_max: float = 1.0
) -> Claim | None:
    """``host.claim(action)``, asked again while the backend fails; None after ``patience`` s.

    Logs the first failure at WARNING, the recovery at INFO.
    """
    try:  # the common case first: no clock, no loop state
        return await host.claim(action)
    except Exception as exc:
        first = exc
    extra = {"trace_id": action.trace_id, "action_id": action.action_id}
    log.warning("cannot claim an action (%s); asking again", first, extra=extra)
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + patience
    pause, failures = 0.05, 1
    while True:
        if loop.time() + pause > give_up_at:
            log.error("action not started: no claim answered in %.0fs", patience, extra=extra)
            return None
        await asyncio.sleep(pause)
        pause = min(pause_max, pause * 2)
        try:
            claim = await host.claim(action)
        except Exception:
            failures += 1
            continue
        log.info("action claimed after %d failed attempts", failures, extra=extra)
        return claim


async def refuse_until_recorded(
    host: LinkHost,
    action: ActionRequest,
    code: ErrorCode,
    text: str,
    *,
    patience: float,
    pause_max: float = 1.0,
) -> None:
    """``host.fail(action, code, text)`` (``host.reject`` for ``action_rejected``), asked again
    while the backend fails, for up to
    ``patience`` s: a refusal is the final answer of an action an engine host started, which no
    timeout will ever answer instead (HTTP probe: a 422 that came back during a Redis stall was
    lost, and the action stayed in flight for good). Never raises."""
    extra = {"trace_id": action.trace_id, "action_id": action.action_id}
    loop = asyncio.get_running_loop()
    give_up_at: float | None = None
    pause, failures = 0.05, 0
    while True:
        try:
            if code is ErrorCode.ACTION_REJECTED:
                await host.reject(action, text)
            else:
                await host.fail(action, code, text)
        except Exception as exc:
            failures += 1
            if give_up_at is None:  # (the common case, recorded at once, needs no clock)
                give_up_at = loop.time() + patience
                log.warning("cannot record a refusal (%s); again", exc, extra=extra)
            if loop.time() + pause > give_up_at:
                log.error("could not record the refusal: %s", exc, extra=extra)
                return
            await asyncio.sleep(pause)
            pause = min(pause_max, pause * 2)
            continue
        if failures:
            log.info("refusal recorded after %d failed attempts", failures, extra=extra)
        return


#: Failures of party_sync's own infrastructure (not of the engine) seen through the engine.
INFRA_ERRORS = (BackendUnavailable, OSError, TimeoutError)
#: Seconds the engine's ``close`` gets on the way out, after its calls were cancelled.
ENGINE_CLOSE_TIMEOUT = 1.0


async def _answered(host: LinkHost, action: ActionRequest) -> bool:
    """True once the action has its final answer (asked as a claim: a started action stays
    START; FINAL only once the engine's result, or a refusal, is recorded)."""
    try:
        return await host.claim(action) is Claim.FINAL
    except Exception:
        return False


class InProcessLink:
    """Runs each accepted action as its own task, so a slow engine never blocks a connection.

    The task starts the engine at once, so by default (``claim_on_accept``) the gateway claims
    each action in the step that accepts it (``EngineLink.claims_on_accept``: one Redis script
    call per action fewer) and the link does not claim it again. With ``claim_on_accept=False``
    the link claims right before the engine starts, as the other links' hosts do (asked again
    through a backend outage for up to ``claim_patience`` s).
    """

    #: Its engine runs in this node (``EngineLink``): its claims name the node.
    node_bound = True

    def __init__(
        self,
        engine: Engine,
        *,
        close_timeout: float = 5.0,
        claim_patience: float = 600.0,
        claim_on_accept: bool = True,
    ) -> None:
        self.engine = engine
        self.claim_patience = claim_patience
        self.claims_on_accept = claim_on_accept
        self._host: LinkHost | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._restates = LatestPerKey()  # per party, being tried again
        self._close_timeout = close_timeout

    async def start(self, host: LinkHost) -> None:
        self._host = host
        await start_engine(self.engine, host)

    async def submit(self, action: ActionRequest) -> None:
        # The task copies the current context: with tracing on, the action's span is its parent.
        spawn_kept(self._tasks, self._traced_run(action), "an in-process engine call")

    async def notify_join(self, notice: JoinNotice) -> None:
        try:
            await self.engine.handle_join(notice)
        except INFRA_ERRORS as exc:  # party_sync's backend, not the engine: a hint, dropped
            log.warning("join notice dropped: %s", exc, extra={"trace_id": notice.trace_id})
        except Exception:
            log.exception("engine failed on a join", extra={"trace_id": notice.trace_id})

    async def notify_restate(self, notice: RestateNotice) -> None:
        extra = {"trace_id": notice.trace_id, "party_id": notice.party_id}
        try:
            await restate_engine(self.engine, notice)
            return
        except INFRA_ERRORS as exc:
            log.warning("re-stating a party failed (%s): trying again", exc, extra=extra)
        except Exception:
            log.exception("engine failed to re-state a party", extra=extra)
            return
        task = spawn_kept(self._tasks, self._restate_again(notice, extra), "a re-statement")
        self._restates.put(notice.party_id, task)

    async def _restate_again(self, notice: RestateNotice, extra: dict[str, str]) -> None:
        """``restate_engine`` again while party_sync's backend fails under it (bounded)."""
        try:
            attempts = await retried(
                functools.partial(restate_engine, self.engine, notice),
                INFRA_ERRORS,
                patience=self.claim_patience,
            )
        except Exception:
            log.exception("engine failed to re-state a party", extra=extra)
            return
        if attempts is None:
            log.error("party not re-stated: the backend kept failing", extra=extra)
        else:
            log.info("party re-stated after %d attempts", attempts, extra=extra)

    async def _traced_run(self, action: ActionRequest) -> None:
        if not tracing.is_on():
            await self._run(action)
            return
        attributes = {"party_sync.action_id": action.action_id, "party_sync.transport": "inprocess"}
        with tracing.span("engine handle_action", attributes=attributes):
            await self._run(action)

    async def _run(self, action: ActionRequest) -> None:
        assert self._host is not None, "submit() before start()"
        extra = {"trace_id": action.trace_id, "action_id": action.action_id}
        if not self.claims_on_accept:
            claim = await claim_until_answered(self._host, action, patience=self.claim_patience)
            if claim is not Claim.START:
                if claim is not None:
                    log.info("action not started: %s", claim.value, extra=extra)
                return
        refusal = await self._hand_over(action, extra)
        if refusal is not None:
            # (the action is started: no timeout would ever answer it instead)
            await refuse_until_recorded(self._host, action, *refusal, patience=self.claim_patience)

    async def _hand_over(
        self, action: ActionRequest, extra: dict[str, str]
    ) -> tuple[ErrorCode, str] | None:
        """Run the engine on the action; the refusal to record, or None (answered, or given up).

        If party_sync's own backend fails under the engine (its publish raises), the engine may
        have applied the action and not published it yet, so nothing final can be said: it is
        handed to the engine again (engines deduplicate by action_id and publish what they had
        left) until it is answered, as a stream worker redelivers a pending entry: through an
        outage of any length within ``claim_patience`` (the action record's TTL).
        """
        assert self._host is not None
        give_up_at: float | None = None
        pause = 0.05
        told = False  # the WARNING of an engine that cannot tell: once per action
        while True:
            try:
                await self.engine.handle_action(action)
                return None
            except EngineRejected as exc:
                return ErrorCode.ACTION_REJECTED, exc.message
            except INFRA_ERRORS as exc:
                loop = asyncio.get_running_loop()
                if give_up_at is None:  # (only on this rare path: no clock in the common case)
                    give_up_at = loop.time() + self.claim_patience
                if await _answered(self._host, action):
                    return None
                if loop.time() + pause > give_up_at:
                    log.error(
                        "action left unanswered: the backend kept failing (%s)", exc, extra=extra
                    )
                    return None
                # (party_sync's backend under it, or the engine's own database); once per action
                # at WARNING, then DEBUG: a second a retry, for up to claim_patience (engine probe)
                log.log(
                    logging.DEBUG if told else logging.WARNING,
                    "the engine could not tell whether it applied the action (%s: %s): handed "
                    "to it again until it can (said once per action)",
                    type(exc).__name__,
                    exc,
                    extra=extra,
                )
                told = True
                # handed to it again as what it is: a redelivery (it may have applied it),
                # which no deadline bounds (engines probe: each retry looked like a first start
                # past its deadline)
                action = replace(action, deadline=None, redelivery=True)
                await asyncio.sleep(pause)
                pause = min(1.0, pause * 2)
            except Exception:  # an engine that raises did not apply the action (the contract)
                log.exception("engine failed on an action", extra=extra)
                return ErrorCode.ENGINE_ERROR, ENGINE_FAILED

    async def close(self) -> None:
        self._restates.cancel_all()  # nothing new to say on the way out
        try:
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=self._close_timeout)
        finally:
            # Also when the caller's budget ran out during that wait (this is cancelled): what
            # is still running is cancelled, and waited for (bounded), and the engine is closed
            # (bounded): an engine left open can hold a thread of its own (a database's) that
            # would keep the process from exiting.
            await cancel_and_wait(
                list(self._tasks), within=ENGINE_CLOSE_TIMEOUT, what="an in-process engine call"
            )
            try:
                async with asyncio.timeout(ENGINE_CLOSE_TIMEOUT):
                    await self.engine.close()
            except TimeoutError:
                log.warning("the in-process engine did not close in time: left behind")
