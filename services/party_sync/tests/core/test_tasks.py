"""``cancel_and_wait`` and ``bounded``: every close path's bounded stop (a task that swallows its
cancellation must not hang a shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest
from party_sync.tasks import bounded, cancel_and_wait, described


async def test_tasks_that_end_on_cancellation_are_all_waited_for() -> None:
    ended: list[str] = []

    async def polite(name: str) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            ended.append(name)

    tasks = [asyncio.create_task(polite(n), name=n) for n in ("a", "b")]
    await asyncio.sleep(0)  # both started
    assert await cancel_and_wait(tasks) == set()
    assert sorted(ended) == ["a", "b"] and all(t.cancelled() for t in tasks)


async def test_a_cancellation_swallowed_once_is_repeated() -> None:
    """redis-py can swallow a CancelledError mid-call; the task then awaits again."""
    started = asyncio.Event()

    async def swallows_once() -> None:
        started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)
        await asyncio.sleep(30)  # the second cancel ends this one

    task = asyncio.create_task(swallows_once())
    await started.wait()
    async with asyncio.timeout(5):
        assert await cancel_and_wait([task], within=0.2) == set()
    assert task.cancelled()


async def test_a_task_that_never_ends_is_left_behind_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def stubborn() -> None:
        started.set()
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    task = asyncio.create_task(stubborn(), name="stubborn-one")
    await started.wait()
    with caplog.at_level(logging.WARNING, logger="party_sync.tasks"):
        async with asyncio.timeout(5):  # bounded: 0.2 s, then a tenth of it more
            late = await cancel_and_wait([task], within=0.2, what="a test task")
    assert late == {task} and not task.done()
    [record] = caplog.records
    assert record.getMessage() == "a test task did not stop in time: left running"
    assert record.__dict__["task"] == "stubborn-one"
    release.set()
    await task


async def test_finished_and_failed_tasks_and_no_tasks_at_all() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fails())
    done = asyncio.create_task(asyncio.sleep(0))
    await asyncio.wait({failed, done})
    assert await cancel_and_wait([failed, done]) == set()
    assert await cancel_and_wait([]) == set()
    assert isinstance(failed.exception(), RuntimeError)  # still there for a caller that cares


async def test_a_kept_task_that_fails_is_logged_and_forgotten() -> None:
    from party_sync.tasks import spawn_kept

    async def fails() -> None:
        raise RuntimeError("the backend is stalled")

    async def ends() -> None:
        return None

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign,assignment]
    logger = logging.getLogger("party_sync.tasks")  # (its own handler: a server of an earlier
    logger.addHandler(handler)  # test may have configured logging, and caplog then sees nothing)
    try:
        tasks: set[asyncio.Task[Any]] = set()
        failing = spawn_kept(tasks, fails(), "a delivery")
        spawn_kept(tasks, ends(), "a delivery")
        await asyncio.wait(set(tasks))
        await asyncio.sleep(0)  # (done callbacks run on the next loop turn)
    finally:
        logger.removeHandler(handler)
    assert tasks == set() and failing.done()
    [record] = records
    assert record.getMessage() == "a delivery failed"
    # (the traceback as text once a server of an earlier test installed the redacting filter)
    said = str(record.exc_info[1]) if record.exc_info else record.exc_text or ""
    assert "stalled" in said


async def test_bounded_gives_up_at_its_bound_on_a_call_that_swallows_its_cancellation() -> None:
    """As Python 3.11's ``asyncio.wait_for`` swallows a cancellation that comes as its inner
    future completes (redis-py sends every command through one): ``asyncio.timeout(0)`` around
    such a call waited for all of it (a stopping node's last heartbeat on a stalled Redis: the
    whole command timeout)."""
    loop = asyncio.get_running_loop()
    calls: list[str] = []

    async def swallows_then_waits() -> str:
        calls.append("started")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)  # the cancellation lands here and is lost
        await asyncio.sleep(30)  # then the call waits on: a command timeout
        return "late"

    started = loop.time()
    with pytest.raises(TimeoutError):
        await bounded(swallows_then_waits(), 0.05, what="a swallowing call")
    assert loop.time() - started < 1.0  # not the 30 s it waits on (a bound, not a speed)
    assert calls == ["started"]
    # nothing left of a budget: the call is not even started
    calls.clear()
    with pytest.raises(TimeoutError):
        await bounded(swallows_then_waits(), 0.0, what="a call with no budget")
    assert calls == []


async def test_bounded_returns_the_result_or_raises_the_error_of_a_call_in_time() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("no")

    assert await bounded(answer(), 1.0, what="a quick call") == 42
    with pytest.raises(ValueError, match="no"):
        await bounded(fails(), 1.0, what="a failing call")


async def test_bounded_cancelled_from_outside_cancels_its_call() -> None:
    started, ended = asyncio.Event(), asyncio.Event()

    async def slow() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        finally:
            ended.set()

    outer = asyncio.ensure_future(bounded(slow(), 30.0, what="a slow call"))
    await started.wait()
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    await asyncio.wait_for(ended.wait(), 1.0)


def test_a_wrapper_is_described_with_the_reply_it_hides() -> None:
    """redis-py's Cluster client raises "Cluster mode is not enabled on this node" for any error
    reply to CLUSTER SLOTS, a NOPERM too, inside "cannot be connected": the log names the
    reply (cluster probe: the ACL's refusal read as a misconfigured cluster)."""
    from redis.exceptions import NoPermissionError, RedisClusterException

    def hidden() -> None:
        try:
            raise NoPermissionError("User x has no permissions to run the 'cluster|slots' command")
        except NoPermissionError:
            raise RedisClusterException("Cluster mode is not enabled on this node")  # noqa: B904

    try:
        try:
            hidden()
        except RedisClusterException as exc:
            raise RedisClusterException(f"Redis Cluster cannot be connected: {exc}") from exc
    except RedisClusterException as outer:
        line = described(outer)
    assert line.startswith("RedisClusterException: Redis Cluster cannot be connected: Cluster mode")
    assert line.endswith("(from NoPermissionError: User x has no permissions to run the "
                         "'cluster|slots' command)")  # fmt: skip
    # a cause whose words the wrapper already says, or none, adds nothing
    refused = ConnectionError("Error 111: Connection refused")
    refused.__cause__ = OSError("Connection refused")
    assert described(refused) == "ConnectionError: Error 111: Connection refused"
    timed_out = TimeoutError()
    timed_out.__cause__ = asyncio.CancelledError()
    assert described(timed_out) == "TimeoutError"


def test_redis_clients_in_an_error_are_shortened_before_it_is_cut() -> None:
    """redis-py's "No master found" names each sentinel by its client's repr (a kilobyte of
    settings each): cut to 300 characters first, the repr was no longer whole, so the log's
    redactor could not shorten it and the line said nothing of where (sentinel probe)."""
    from redis.asyncio import Redis
    from redis.asyncio.sentinel import MasterNotFoundError

    sentinels = [Redis(host="127.0.0.1", port=port, password="pw") for port in (21901, 21902)]
    exc = MasterNotFoundError(
        "No master found for 'mymaster' : "
        + ", ".join(f"{client} - ConnectionError('refused')" for client in sentinels)
    )
    assert len(str(exc)) > 300
    assert described(exc) == (
        "MasterNotFoundError: No master found for 'mymaster' : <Redis 127.0.0.1:21901> - "
        "ConnectionError('refused'), <Redis 127.0.0.1:21902> - ConnectionError('refused')"
    )
