"""Stopping background tasks without letting one of them hang a shutdown.

Every close path of the gateway, the backends, the engine links and the workers cancels the
tasks it started and waits for them. An unbounded wait there (``gather`` after ``cancel``) hangs
the whole shutdown, for ever, if one task does not end: a cancellation swallowed inside a
library call (redis-py does, now and then), or a ``finally`` that awaits I/O on a dead peer.
``cancel_and_wait`` bounds that wait, cancels a straggler once more, and names whatever is still
running in a warning instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Final, TypeVar

T = TypeVar("T")

log = logging.getLogger("party_sync.tasks")

#: Seconds a stop waits for its cancelled tasks before it leaves them behind.
STOP_TIMEOUT = 5.0
#: The signals every party_sync process drains and stops on: SIGTERM (an orchestrator), SIGINT
#: (Ctrl-C), SIGHUP (its terminal gone: it ended the process at once, no drain, its clients got
#: 1006 instead of 1001; operator probe).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def spawn_kept(
    tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, Any], what: str
) -> asyncio.Task[Any]:
    """``coro`` as a task kept in ``tasks`` until it ends; if it ends with an exception, that
    is logged (ERROR, with its traceback, naming ``what``) rather than left to asyncio's "Task
    exception was never retrieved", which says it only when the task is collected, if at all
    (HTTP probe: a delivery that died on a stalled Redis left only that line)."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)

    def ended(done: asyncio.Task[Any]) -> None:
        tasks.discard(done)
        if not done.cancelled() and done.exception() is not None:
            log.error("%s failed", what, exc_info=done.exception())

    task.add_done_callback(ended)
    return task


async def cancel_and_wait(
    tasks: Iterable[asyncio.Future[Any]],
    *,
    within: float = STOP_TIMEOUT,
    what: str = "background task",
) -> set[asyncio.Future[Any]]:
    """Cancel ``tasks`` and wait up to ``within`` s for them to end (a task still running then
    is cancelled again and given a tenth of it more). Returns the tasks left running, each named
    in a warning. Errors the tasks ended with are not reported here (``cancel`` on a finished task
    also silences asyncio's "exception was never retrieved"): a caller that cares logs them, in a
    done-callback or after this returns."""
    wanted = set(tasks)
    for task in wanted:
        task.cancel()
    late: set[asyncio.Future[Any]] = {task for task in wanted if not task.done()}
    for wait in (within, within / 10):
        if not late:
            break
        _, late = await asyncio.wait(late, timeout=wait)
        for task in late:
            task.cancel()  # a swallowed cancellation: the task may be awaiting again since
    for task in late:
        name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
        log.warning("%s did not stop in time: left running", what, extra={"task": name})
    return late


#: Seconds ``bounded`` gives a call past its bound, once cancelled, before it leaves it behind.
LEFT_BEHIND_AFTER = 0.1


async def bounded(call: Coroutine[Any, Any, T], seconds: float, *, what: str) -> T:
    """``call``'s result, or ``TimeoutError`` once ``seconds`` have passed, even when ``call``
    does not end at its cancellation. ``asyncio.timeout`` cancels the task and then waits for
    the awaited code to end, and code can swallow a cancellation: Python 3.11's
    ``asyncio.wait_for`` does when it comes as its inner future completes (gh-86296), and
    redis-py writes every command through one. So a bound of 0 (nothing left of a shutdown's
    budget) around a command to a stalled Redis waited out the whole command timeout, 5 s
    (workers probe: a stopping node's last heartbeat held its exit past ``shutdown_timeout``,
    and a worker of ``--workers`` was killed for it). Here ``call`` runs as a task of its own,
    not started at all when ``seconds`` is 0; past the bound it is cancelled and given
    ``LEFT_BEHIND_AFTER`` (``cancel_and_wait``: cancelled once more, then left running, named in
    a warning)."""
    if seconds <= 0:
        call.close()
        raise TimeoutError(f"{what}: no time left")
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task in done:
        return task.result()
    await cancel_and_wait([task], within=LEFT_BEHIND_AFTER, what=what)
    raise TimeoutError(f"{what}: not done within {seconds:.2f}s")


__all__ = ["STOP_TIMEOUT", "bounded", "cancel_and_wait"]


async def retried(
    attempt: Callable[[], Awaitable[Any]],
    retryable: type[BaseException] | tuple[type[BaseException], ...],
    *,
    patience: float,
    first: float = 0.05,
    cap: float = 1.0,
) -> int | None:
    """After an attempt that failed: ``attempt()`` again, after a pause (``first``, doubling up
    to ``cap``) each time it raises ``retryable``, until it works (the number of attempts, the
    failed one before this call included) or the next pause would end more than ``patience``
    seconds from now (None). Any other exception is raised. (A restate notice to any engine
    link, a refusal to its sender: what must get through an outage of a few seconds.)"""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + patience
    pause, attempts = first, 1
    while loop.time() + pause <= give_up_at:
        await asyncio.sleep(pause)
        pause = min(cap, pause * 2)
        attempts += 1
        try:
            await attempt()
        except retryable:
            continue
        return attempts
    return None


class LatestPerKey:
    """At most one task per key: a newer one cancels the one before (a restate notice for a
    party replaces one still being retried). A task leaves the table when it ends."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    def put(self, key: str, task: asyncio.Task[Any]) -> None:
        before = self._tasks.pop(key, None)
        if before is not None:
            before.cancel()
        self._tasks[key] = task
        task.add_done_callback(lambda done: self._forget(key, done))

    def _forget(self, key: str, done: asyncio.Task[Any]) -> None:
        if self._tasks.get(key) is done:
            del self._tasks[key]

    def cancel(self, key: str) -> None:
        """The task of ``key``, if any, cancelled (a newer one took its place elsewhere)."""
        before = self._tasks.pop(key, None)
        if before is not None:
            before.cancel()

    def cancel_all(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()

    def __len__(self) -> int:
        return len(self._tasks)


#: redis-py's repr of a client (a Sentinel's "No master found" names each sentinel so, with every
#: connection setting: a kilobyte each, its host and port deep inside): shortened to
#: ``<Redis host:port>`` (linear: its parts never overlap, and a ')' ends the settings).
_REDIS_CLIENT: Final = re.compile(
    r"<redis\.[\w.]*Redis\(<redis\.[\w.]*ConnectionPool\(<redis\.[\w.]*Connection\("
    r"(?P<args>(?:[^<>()]|\([^<>()]*+\)|<[^<>]*+>)*+)\)>\)>\)>"
)
_HOST, _PORT = re.compile(r"(?:^|,)host=([^,]+)"), re.compile(r"(?:^|,)port=(\d+)")


def _short_client(match: re.Match[str]) -> str:
    settings = match.group("args")
    host, port = _HOST.search(settings), _PORT.search(settings)
    return f"<Redis {host.group(1)}:{port.group(1)}>" if host and port else "<Redis>"


def short_clients(text: str) -> str:
    """``text`` with each redis-py client repr in it shortened to ``<Redis host:port>`` (done by
    every log record's redactor too, ``logs.Redactor``; ``described`` does it before it cuts a
    message to its length, or the cut repr, no longer whole, would be left as it is: sentinel
    probe)."""
    return _REDIS_CLIENT.sub(_short_client, text) if "<redis." in text else text


def described(exc: BaseException, limit: int = 300) -> str:
    """An exception for a log line: its class and its text, on one line, at most ``limit``
    characters ("ConnectionError: Error 1 connecting to 10.0.0.5:6380. [SSL:
    CERTIFICATE_VERIFY_FAILED] ..."). Not its ``repr``: redis-py 8's says only
    ``network:ConnectionError``, which cannot tell a certificate, a password or a stall apart.
    (The log handler's redactor still scrubs every record.)

    A wrapper that hides what it wraps gets its innermost cause's words after it (unless they
    are in its own text already): redis-py's Cluster
    client says "Cluster mode is not enabled on this node" for any error reply to ``CLUSTER
    SLOTS``, a ``NOPERM`` too (cluster probe: a user without ``cluster|slots`` read as a
    misconfigured cluster)."""
    text = short_clients(" ".join(str(exc).split()))
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    root = _root_cause(exc)
    said = short_clients(" ".join(str(root).split()))
    if root is not exc and said and said not in text:
        line = f"{line} (from {type(root).__name__}: {said})"
    return line[:limit]


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception ``exc`` was raised from, or while handling (a few levels)."""
    for _ in range(8):
        inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if inner is None:
            break
        exc = inner
    return exc


class Episode:
    """One kind of trouble, logged when it begins (WARNING) and when it ends (INFO), not per tick.

    ``kind`` says which trouble it is: a WARNING again only when the kind changes (a detail with
    figures in it changes every tick and must not log again).
    """

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        self.kind: str | None = None

    @property
    def active(self) -> bool:
        return self.kind is not None

    def trouble(self, kind: str, detail: str, **extra: Any) -> bool:
        """Trouble of ``kind`` seen now; True (and one WARNING) if it begins or changes kind."""
        if self.kind == kind:
            return False
        self.kind = kind
        self.logger.warning("%s: %s", self.what, detail, extra={"condition": kind, **extra})
        return True

    def fine(self, detail: str, **extra: Any) -> bool:
        """No trouble now; True (and one INFO) if that ends an episode."""
        if self.kind is None:
            return False
        self.kind = None
        self.logger.info("%s: over: %s", self.what, detail, extra={"condition": "ok", **extra})
        return True
