"""``EpochWatch`` over the embedded backend and a ``BackendPublisher``: which re-statement requests
an opening makes, when, and for which run (no server, no socket)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from party_sync.backends.memory import MemoryBackend
from party_sync.core.binding import Binding
from party_sync.engine.interface import RestateNotice
from party_sync.engine.restating import EpochWatch
from party_sync.protocol.schemas import Contracts
from party_sync.publishing import BackendPublisher
from ps_testkit.client import wait_until

STATE = {"status": "active", "run_status": "in_progress", "characters": {}, "flags": {}}

CONTRACTS = Contracts()


class Requests:
    """The watch's ``request``: records each notice; the first ``failures`` raise."""

    def __init__(self, failures: int = 0) -> None:
        self.notices: list[RestateNotice] = []
        self.failures = failures
        self.attempts = 0

    async def __call__(self, notice: RestateNotice) -> None:
        self.attempts += 1
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("engine unreachable")
        self.notices.append(notice)


def gateway_watch(
    backend: MemoryBackend, requests: Requests
) -> tuple[EpochWatch, BackendPublisher, set[asyncio.Task[Any]]]:
    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    watch = EpochWatch(backend, requests, time.time, spawn=spawn)
    return watch, BackendPublisher(backend, CONTRACTS, time.time, watch), tasks


async def test_an_opening_is_asked_for_after_the_publish_not_inside_it() -> None:
    backend, requests = MemoryBackend(), Requests()
    watch, publisher, tasks = gateway_watch(backend, requests)
    watch.knows("p1", "r1")
    assert await publisher.publish("p1", "party.state", STATE, trace_id="t1") == 1
    assert requests.attempts == 0  # not inside the publish (an engine may hold its lock)
    await wait_until(lambda: len(requests.notices) == 1)
    notice = requests.notices[0]
    assert (notice.party_id, notice.campaign_run_id, notice.trace_id) == ("p1", "r1", "t1")
    assert notice.epoch == (await backend.snapshot("p1")).epoch
    await publisher.publish("p1", "party.state", STATE, trace_id="t2")  # seq 2
    await wait_until(lambda: not tasks)
    assert len(requests.notices) == 1


async def test_the_run_comes_from_the_backends_record_when_the_node_never_saw_it() -> None:
    backend, requests = MemoryBackend(), Requests()
    _, publisher, _ = gateway_watch(backend, requests)
    assert await publisher.publish("p1", "party.state", STATE, trace_id="t1") == 1
    # before the request is made, a member connects (on any node): the party's run is recorded
    binding = Binding("p1", "r7", "aria", "Aria")
    join = await backend.connect(binding, "c1", time.time(), "t0")
    assert join is not None and join.seq == 2
    await wait_until(lambda: len(requests.notices) == 1)
    assert requests.notices[0].campaign_run_id == "r7"


async def test_an_opening_with_no_known_run_waits_until_the_node_learns_it() -> None:
    backend, requests = MemoryBackend(), Requests()
    watch, publisher, tasks = gateway_watch(backend, requests)
    await publisher.publish("p2", "party.state", STATE, trace_id="t-p2")
    await wait_until(lambda: watch.openings.parked == ["p2"])
    await wait_until(lambda: not tasks)
    assert requests.notices == []
    watch.knows("p2", "r2")  # e.g. a member of the party connects to this node
    await wait_until(lambda: len(requests.notices) == 1)
    assert (requests.notices[0].campaign_run_id, requests.notices[0].trace_id) == ("r2", "t-p2")


async def test_a_failed_request_is_tried_again() -> None:
    backend, requests = MemoryBackend(), Requests(failures=1)
    watch, publisher, tasks = gateway_watch(backend, requests)
    watch.knows("p1", "r1")
    await publisher.publish("p1", "party.state", STATE, trace_id="t1")
    await wait_until(lambda: len(requests.notices) == 1)
    assert requests.attempts == 2
    await wait_until(lambda: not tasks)


async def test_a_result_returned_again_asks_for_nothing_more() -> None:
    backend, requests = MemoryBackend(), Requests()
    watch, publisher, tasks = gateway_watch(backend, requests)
    watch.knows("p1", "r1")
    await backend.begin_action("p1", "aria", "a1", time.time())
    result = {
        "action_id": "a1",
        "character_id": "aria",
        "action_type": "skill_check",
        "outcome": "success",
        "state": {"hp": 10, "max_hp": 10, "effects": [], "scene_flags": {}},
    }
    assert await publisher.publish("p1", "action.result", result, trace_id="t1") == 1
    assert await publisher.publish("p1", "action.result", result, trace_id="t1") == 1  # stands
    await wait_until(lambda: len(requests.notices) == 1)
    await wait_until(lambda: not tasks)
    assert len(requests.notices) == 1


async def test_a_failed_request_leaves_the_other_openings_due_too() -> None:
    backend, requests = MemoryBackend(), Requests(failures=1)
    watch = EpochWatch(backend, requests, time.time)  # no spawn: asked by restate_opened only
    publisher = BackendPublisher(backend, CONTRACTS, time.time, watch)
    for party in ("p1", "p2", "p3"):
        watch.knows(party, "r1")
        await publisher.publish(party, "party.state", STATE, trace_id="t-" + party)
    assert not await watch.restate_opened()  # the first request fails
    assert requests.notices == []
    assert await watch.restate_opened()
    assert sorted(n.party_id for n in requests.notices) == ["p1", "p2", "p3"]
    assert not watch.openings.pending
