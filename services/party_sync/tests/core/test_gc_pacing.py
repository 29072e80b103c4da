"""Full collections paced by closed connections (``server.full_collection_due``)."""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace
from typing import Any

import pytest
from party_sync import server
from party_sync.server import FullCollections, full_collection_due


def test_a_full_collection_waits_for_enough_closures_and_time() -> None:
    assert not full_collection_due(499, 0, 1_000.0)  # too few closed
    assert full_collection_due(500, 0, 30.0)
    assert not full_collection_due(500, 0, 29.9)  # too soon after the last
    assert not full_collection_due(999, 2_000, 60.0)  # half the open ones: 1,000
    assert full_collection_due(1_000, 2_000, 60.0)
    assert not full_collection_due(1_999, 10_000, 60.0)  # at most 2,000 wait
    assert full_collection_due(2_000, 10_000, 60.0)


async def test_the_pacer_collects_after_churn_and_not_when_nothing_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "GC_FULL_AFTER_CLOSED", 3)
    monkeypatch.setattr(server, "GC_FULL_MIN_INTERVAL", 0.0)
    collections: list[int] = []

    def collect(*args: Any) -> int:
        collections.append(1)
        return 0

    monkeypatch.setattr(gc, "collect", collect)
    core = SimpleNamespace(lost=0, connections={})
    gateway: Any = SimpleNamespace(core=core)
    pacer = FullCollections(gateway, every=0.01)
    pacer.periodic.start()
    try:
        for _ in range(5):  # nothing closed: never
            await asyncio.sleep(0.01)
        assert collections == []
        core.lost = 3  # three connections closed
        while not collections:  # noqa: ASYNC110 (the pacer's own period)
            await asyncio.sleep(0.01)
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert collections == [1]  # once: nothing closed since
    finally:
        await pacer.periodic.stop()
