"""An action's events go out in one atomic step where the publisher has one (``BatchPublisher``:
party_sync's own, in the server and the stream worker): the same events, in the same order, as
one ``publish`` each; a failed step publishes none of them and a redelivery publishes them all."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from campaign_engine.campaign import builtin_campaign
from campaign_engine.engine import ReferenceEngine
from campaign_engine.testing import (
    PublishFailed,
    RecordingPublisher,
    action_request,
    join_notice,
)
from party_sync.engine.interface import BatchPublisher


class BatchingPublisher(RecordingPublisher):
    """The recording publisher with an atomic ``publish_many``: all checked, then all recorded;
    ``fail_next`` fails a whole step (nothing recorded)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps: list[list[str]] = []
        self.keys: list[str | None] = []  # each step's key

    async def publish_many(
        self,
        party_id: str,
        events: Sequence[tuple[str, Mapping[str, Any]]],
        *,
        trace_id: str | None = None,
        key: str | None = None,
    ) -> list[int]:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise PublishFailed("publish_many failed (scripted)")
        self.steps.append([type_ for type_, _ in events])
        self.keys.append(key)
        return [
            await self.publish(party_id, type_, payload, trace_id=trace_id)
            for type_, payload in events
        ]


async def play(publisher: RecordingPublisher) -> list[tuple[str, int]]:
    engine = ReferenceEngine(builtin_campaign(), seed=7)
    await engine.start(publisher)
    await engine.handle_join(join_notice("aria"))
    await engine.handle_action(action_request("skill_check", {}))
    return [(e.type, e.seq) for e in publisher.published]


async def test_the_same_events_in_one_step_per_action() -> None:
    batching = BatchingPublisher()
    assert isinstance(batching, BatchPublisher)
    assert not isinstance(RecordingPublisher(), BatchPublisher)
    assert await play(batching) == await play(RecordingPublisher())
    assert any(len(step) > 1 and step[0] == "action.result" for step in batching.steps)


async def test_a_failed_step_publishes_nothing_and_its_redelivery_everything() -> None:
    publisher = BatchingPublisher()
    engine = ReferenceEngine(builtin_campaign(), seed=7)
    await engine.start(publisher)
    await engine.handle_join(join_notice("aria"))
    before = len(publisher.published)
    action = action_request("skill_check", {})
    publisher.fail_next = 1
    with pytest.raises(PublishFailed):
        await engine.handle_action(action)
    assert len(publisher.published) == before  # none of the step
    await engine.handle_action(action)  # party_sync redelivers it: applied once, all published
    types = [e.type for e in publisher.published[before:]]
    assert types.count("action.result") == 1 and len(types) > 1
