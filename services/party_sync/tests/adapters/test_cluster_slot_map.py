"""Redis Cluster: the slot map that cannot be read (a master down) is logged once per episode."""

from __future__ import annotations

import pytest


async def test_an_unreadable_slot_map_is_one_warning_per_episode(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Cluster master down: every retry (several a second) failed to read the slot map and
    logged a WARNING each time; now one when it begins and one INFO when it is over."""
    import logging
    from types import SimpleNamespace

    from party_sync.backends.redis_batch import ShardedBatcher

    failing = [True]

    async def initialize() -> None:
        if failing[0]:
            raise ConnectionError("no node answers")

    client = SimpleNamespace(
        nodes_manager=SimpleNamespace(initialize=initialize, startup_nodes={}), get_primaries=list
    )
    batcher = ShardedBatcher(client)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="party_sync"):
        for _ in range(5):
            await batcher._reread()
        failing[0] = False
        await batcher._reread()
        await batcher._reread()
    said = [(r.levelname, r.getMessage()[:60]) for r in caplog.records]
    assert [level for level, _ in said] == ["WARNING", "INFO"], said
