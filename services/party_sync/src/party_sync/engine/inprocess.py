"""The in-process engine link (the embedded default): the engine runs in the server's event loop.

Each accepted action runs as its own task. Right before the engine gets it, the link claims it
(``LinkHost.claim``): only ``Claim.START`` runs; ``EXPIRED`` (past its ``deadline``, already
refused with ``action_timeout``) and ``FINAL`` (already answered) are dropped, so an action that
waited behind a slow event loop past its deadline is never applied after its sender was told it
timed out. If the claim itself fails (the backend is unavailable), it is asked again with a capped
backoff (``claim_until_answered``): a claim lost in a stall may still have been recorded, and then
only the engine's answer is truthful. After ``claim_patience`` seconds without an answer the
action is not started (logged at ERROR).

Notices are plain calls: ``notify_join`` → ``Engine.handle_join``, ``notify_restate`` →
``restate_engine`` (the engine's optional ``handle_restate``); an engine's exception there is
logged, never raised into the gateway.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from party_sync.engine.interface import (
    ActionRequest,
    Claim,
    Engine,
    EngineRejected,
    JoinNotice,
    LinkHost,
    RestateNotice,
    restate_engine,
)
from party_sync.protocol.errors import ErrorCode

log = logging.getLogger(__name__)


async def claim_until_answered(
    host: LinkHost, action: ActionRequest, *, patience: float, pause_max: float = 1.0
) -> Claim | None:
    """``host.claim(action)``, asked again while the backend fails; None after ``patience`` s.

    Logs the first failure at WARNING, the recovery at INFO.
    """
    extra = {"trace_id": action.trace_id, "action_id": action.action_id}
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + patience
    pause, failures = 0.05, 0
    while True:
        try:
            claim = await host.claim(action)
        except Exception as exc:
            failures += 1
            if failures == 1:
                log.warning("cannot claim an action (%s); asking again", exc, extra=extra)
            if loop.time() + pause > give_up_at:
                log.error("action not started: no claim answered in %.0fs", patience, extra=extra)
                return None
            await asyncio.sleep(pause)
            pause = min(pause_max, pause * 2)
            continue
        if failures:
            log.info("action claimed after %d failed attempts", failures, extra=extra)
        return claim


class InProcessLink:
    """Runs each accepted action as its own task, so a slow engine never blocks a connection."""

    def __init__(
        self, engine: Engine, *, close_timeout: float = 5.0, claim_patience: float = 60.0
    ) -> None:
        self.engine = engine
        self.claim_patience = claim_patience
        self._host: LinkHost | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._close_timeout = close_timeout

    async def start(self, host: LinkHost) -> None:
        self._host = host
        await self.engine.start(host)

    async def submit(self, action: ActionRequest) -> None:
        task = asyncio.get_running_loop().create_task(self._run(action))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def notify_join(self, notice: JoinNotice) -> None:
        try:
            await self.engine.handle_join(notice)
        except Exception:
            log.exception("engine failed on a join", extra={"trace_id": notice.trace_id})

    async def notify_restate(self, notice: RestateNotice) -> None:
        try:
            await restate_engine(self.engine, notice)
        except Exception:
            log.exception(
                "engine failed to re-state a party",
                extra={"trace_id": notice.trace_id, "party_id": notice.party_id},
            )

    async def _run(self, action: ActionRequest) -> None:
        assert self._host is not None, "submit() before start()"
        extra = {"trace_id": action.trace_id, "action_id": action.action_id}
        claim = await claim_until_answered(self._host, action, patience=self.claim_patience)
        if claim is not Claim.START:
            if claim is not None:
                log.info("action not started: %s", claim.value, extra=extra)
            return
        try:
            await self.engine.handle_action(action)
        except EngineRejected as exc:
            await self._host.reject(action, exc.message)
        except Exception:
            log.exception("engine failed on an action", extra=extra)
            await self._host.fail(action, ErrorCode.ENGINE_ERROR, "the engine failed: retry")

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._close_timeout)
        for task in self._tasks:
            task.cancel()
        await self.engine.close()
