"""When a test is about to hit its pytest-timeout, print where every asyncio task is waiting.

pytest-timeout shows the main thread's stack only, and for an asyncio test that is always the
event loop's ``select``: it says *that* the test hung, never *on what*. A few seconds before the
timeout this plugin asks the loop (thread-safely) to print every task's stack to stderr, which
pytest shows with the failure ("Captured stderr call"). A loop stuck in CPU never runs the dump;
then the main thread's stack that pytest-timeout prints is the useful one.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Generator, Iterator
from typing import Any

import pytest

#: How long before the timeout the stacks are printed.
LEAD = 3.0


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    try:
        return float(item.config.getini("timeout") or 0)
    except ValueError:
        return 0.0


def _loops() -> set[asyncio.AbstractEventLoop]:
    """The loops of the tasks alive now (read from another thread: retried if it changes)."""
    for _ in range(5):
        try:
            tasks: list[asyncio.Task[object]] = list(asyncio.tasks._all_tasks)  # type: ignore[attr-defined]
            return {task.get_loop() for task in tasks}
        except RuntimeError:  # the set changed while it was copied
            continue
    return set()


def _first(obj: object, names: tuple[str, ...]) -> Any:
    return next((getattr(obj, n) for n in names if getattr(obj, n, None) is not None), None)


def _awaiting(task: asyncio.Task[Any]) -> Iterator[str]:
    """Where ``task`` waits: every frame down its chain of awaits (``Task.print_stack`` shows
    only the outermost one), then what the innermost one waits on."""
    obj: object = task.get_coro()
    for _ in range(64):
        frame = _first(obj, ("cr_frame", "gi_frame", "ag_frame"))
        if frame is None:
            if obj is not None:
                yield f"    waiting on {obj!r}"[:300]
            return
        yield f"    {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        obj = _first(obj, ("cr_await", "gi_yieldfrom", "ag_await"))


def _print_tasks(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    print(f"--- ps_testkit.hangs: {len(tasks)} asyncio tasks ---", file=sys.stderr)
    for task in tasks:
        print(f"* {task.get_name()}", file=sys.stderr)
        for line in _awaiting(task):
            print(line, file=sys.stderr)
    sys.stderr.flush()


def _dump(name: str) -> None:
    print(f"\n--- ps_testkit.hangs: {name} is about to time out ---", file=sys.stderr)
    for loop in _loops():
        if not loop.is_closed():
            loop.call_soon_threadsafe(_print_tasks, loop)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    timeout = _timeout_of(item)
    timer = None
    if timeout > LEAD * 2:
        timer = threading.Timer(timeout - LEAD, _dump, args=(item.nodeid,))
        timer.daemon = True
        timer.start()
    try:
        return (yield)
    finally:
        if timer is not None:
            timer.cancel()
