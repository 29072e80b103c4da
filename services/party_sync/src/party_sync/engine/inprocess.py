"""The in-process engine link (the embedded default): the engine runs in the server's event loop."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from party_sync.engine.interface import (
    ActionRequest,
    Engine,
    EngineRejected,
    JoinNotice,
    LinkHost,
)
from party_sync.protocol.errors import ErrorCode

log = logging.getLogger(__name__)


class InProcessLink:
    """Runs each accepted action as its own task, so a slow engine never blocks a connection."""

    def __init__(self, engine: Engine, *, close_timeout: float = 5.0) -> None:
        self.engine = engine
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

    async def _run(self, action: ActionRequest) -> None:
        assert self._host is not None, "submit() before start()"
        try:
            await self.engine.handle_action(action)
        except EngineRejected as exc:
            await self._host.reject(action, exc.message)
        except Exception:
            log.exception(
                "engine failed on an action",
                extra={"trace_id": action.trace_id, "action_id": action.action_id},
            )
            await self._host.fail(action, ErrorCode.ENGINE_ERROR, "the engine failed: retry")

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._close_timeout)
        for task in self._tasks:
            task.cancel()
        await self.engine.close()
