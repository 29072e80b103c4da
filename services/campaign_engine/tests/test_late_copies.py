"""A message's events published late, by an engine process that was stopped (frozen past the
stream's claim-idle time) while another one took the message over and the party moved on: with
party_sync's real publisher, the copy changes nothing the players see. A fault probe saw a join's
copy take a party back to the first scene while it voted in the second."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
from campaign_engine.campaign import builtin_campaign
from campaign_engine.engine import ReferenceEngine
from campaign_engine.store import InMemoryRunStore
from campaign_engine.testing import action_request, join_notice
from party_sync.backends.memory import MemoryBackend
from party_sync.core.binding import Binding
from party_sync.protocol.schemas import Contracts
from party_sync.publishing import BackendPublisher


class FrozenAtPublish(BackendPublisher):
    """party_sync's publisher, whose first batch waits for ``meanwhile`` (the process stopped
    right before its publish reached party_sync) once it is armed."""

    meanwhile: Callable[[], Awaitable[None]] | None = None

    async def publish_many(
        self,
        party_id: str,
        events: Sequence[tuple[str, Mapping[str, Any]]],
        *,
        trace_id: str | None = None,
        key: str | None = None,
    ) -> list[int]:
        if self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            await meanwhile()
        return await super().publish_many(party_id, events, trace_id=trace_id, key=key)


async def test_a_joins_late_copy_does_not_take_the_party_back() -> None:
    backend, store, contracts = MemoryBackend(), InMemoryRunStore(), Contracts()
    first_pub = FrozenAtPublish(backend, contracts, time.time)
    first = ReferenceEngine(builtin_campaign(), seed=1, store=store)
    second = ReferenceEngine(builtin_campaign(), seed=2, store=store)
    await first.start(first_pub)
    await second.start(BackendPublisher(backend, contracts, time.time))
    for name in ("aria", "bram"):
        await backend.connect(
            Binding("party-1", "run-1", name, name), f"c-{name}", time.time(), "t"
        )
        await first.handle_join(join_notice(name))
    cyril = join_notice("cyril", "Cyril")
    stopped: list[bool] = []

    async def taken_over() -> None:  # the other worker: the join again, then the party acts on
        stopped.append(True)
        await second.handle_join(cyril)
        await second.handle_action(action_request("choice", {"option": "row"}))

    first_pub.meanwhile = taken_over
    await first.handle_join(cyril)  # committed, then stopped at its publish, then on

    assert stopped == [True]  # it did stop there
    snapshot = await backend.snapshot("party-1")
    assert snapshot.scene is not None and snapshot.scene["scene_id"] == "reef"
    history = await backend.replay("party-1", _from_start(snapshot.epoch), 1000)
    assert history is not None
    scenes = [orjson.loads(e)["payload"]["scene_id"] for e in history if b'"scene.update"' in e]
    assert scenes[-1] == "reef"  # nothing of the harbor's after the reef's
    joins = [e for e in history if b"Cyril joins the party" in e]
    assert len(joins) == 1  # shown once, by the worker that took it over


def _from_start(epoch: str) -> Any:
    from party_sync.core.history import ResumePoint

    return ResumePoint(epoch, 0)
