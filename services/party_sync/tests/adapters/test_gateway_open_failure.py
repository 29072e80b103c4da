"""A handshake whose opening fails with something other than Redis's unavailability (a bug, an
unexpected error of a backend call): the connection ends and the gateway's core forgets the
session at once. It must not stay there syncing, its buffer growing with every party event."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from party_sync.backends.base import BackendSettings
from party_sync.backends.memory import MemoryBackend
from party_sync.core.snapshot import Snapshot
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import serve_in_process


class SnapshotFailsOnce(MemoryBackend):
    def __init__(self) -> None:
        super().__init__(BackendSettings())
        self.failures = 1

    async def snapshot(self, party_id: str, now: float | None = None) -> Snapshot:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("an unexpected error in the backend")
        return await super().snapshot(party_id, now)


async def test_an_unexpected_error_while_opening_leaves_no_session_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = SnapshotFailsOnce()
    async with serve_in_process(engine=ScriptedEngine(), backend=backend) as srv:
        assert srv.server is not None
        core = srv.server.gateway.core
        with caplog.at_level(logging.CRITICAL):  # the error itself is logged by aiohttp
            broken = await srv.connect("aria")
            assert await broken.closed(timeout=10) is not None
        await wait_until(lambda: not core.connections, timeout=5)
        assert "p1" not in core.parties
        aria, _ = await srv.join("aria")  # the next attempt opens normally
        assert len(core.connections) == 1
        await aria.act("a1", "aria", "r1")
        result: dict[str, Any] = await aria.until("action.result", timeout=10)
        assert result["payload"]["action_id"] == "a1"
        await aria.close()
