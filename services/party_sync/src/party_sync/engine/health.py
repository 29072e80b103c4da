"""How healthy the engine link looks from this node, so the operator sees a missing or stuck
engine (docs/engines.md).

``/readyz`` reports an :class:`EngineHealth` next to the backend's state; a degraded engine link
keeps the node ready (it can still serve connections, presence and votes) but names what is wrong.
Each transport has its own source:

- in-process: :class:`StaticHealth`, always ok (the engine runs in this process);
- Redis Streams: :class:`party_sync.engine.stream_monitor.StreamMonitor` (consumers, backlog);
- HTTP: :class:`HttpProbe`, a TCP connect to the engine URL's host and port every few seconds
  (cheap, and it tells "nothing listens there" from "slow").

Trouble is logged once per episode (:class:`~party_sync.tasks.Episode`): a WARNING when it
begins, an INFO when it ends, never once per tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

from party_sync.metrics import Metrics
from party_sync.tasks import Episode, cancel_and_wait

log = logging.getLogger(__name__)


#: The most characters of an ``EngineHealth`` detail ``/readyz`` shows.
MAX_DETAIL = 300


@dataclass(frozen=True, slots=True)
class EngineHealth:
    """``transport``: inprocess / stream / http; ``ok``: the link looks able to answer actions;
    ``detail``: what it is (ok) or what is wrong (not ok), for an operator."""

    transport: str
    ok: bool
    detail: str

    def as_json(self) -> dict[str, Any]:
        """For ``/readyz``: the detail is cut at ``MAX_DETAIL`` characters (an exception's text
        can be kilobytes of a library's internals)."""
        detail = self.detail if len(self.detail) <= MAX_DETAIL else self.detail[:MAX_DETAIL] + "…"
        return {"transport": self.transport, "ok": self.ok, "detail": detail}


class HealthSource(Protocol):
    """What the server starts, stops and asks (``/readyz``)."""

    def health(self) -> EngineHealth: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class StaticHealth:
    """A link with nothing to watch (the in-process engine): always the same answer."""

    def __init__(self, health: EngineHealth) -> None:
        self._health = health

    def health(self) -> EngineHealth:
        return self._health

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def public_url(url: str) -> str:
    """``url`` fit for a log line: no user, password, query or fragment (they may hold secrets)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


Connect = Callable[[str, int], Awaitable[None]]


async def tcp_connect(host: str, port: int) -> None:
    """Open and close one TCP connection (raises ``OSError``)."""
    _, writer = await asyncio.open_connection(host, port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class Periodic:
    """Run ``tick`` every ``interval`` seconds until ``stop``.

    ``stop`` does not rely on cancellation alone: a client library may swallow a
    ``CancelledError`` it receives mid-command (redis-py can, during a connect), which would
    leave a cancelled task sleeping into its next period forever. The loop also watches an event,
    and ``stop`` waits a bounded time.
    """

    def __init__(
        self, tick: Callable[[], Awaitable[None]], interval: float, stop_within: float = 5.0
    ) -> None:
        self._tick = tick
        self.interval = interval
        self.stop_within = stop_within
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self._tick()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):  # the period, or stop
                    await self._stopping.wait()

    def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopping.set()
        task, self._task = self._task, None
        if task is None:
            return
        # bounded, cancelled twice: the first cancellation may be swallowed mid-tick
        await cancel_and_wait([task], within=self.stop_within, what="a periodic task")
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("periodic task ended with an error", exc_info=task.exception())


#: Seconds between two probes of an engine URL that is down (``HttpProbe``).
DOWN_INTERVAL: Final = 1.0


class HttpProbe:
    """HTTP transport: is anything listening at the engine URL? (a TCP connect every ``interval``)

    It does not POST (that would be an action); a listening socket that answers 5xx is seen by
    the link's own retries. Unreachable since the last probe → degraded, one WARNING per episode.
    ``refused`` (the link's ``key_refused``): what the engine host said when it last refused
    party_sync's API key, else None; degraded too while it says so (the URL accepts connections,
    but no action gets through). ``back`` is called when the URL accepts connections again after
    it did not: the host restarted, perhaps with the right key (the link forgets the refusal).
    """

    def __init__(
        self,
        url: str,
        *,
        interval: float = 5.0,
        timeout: float = 2.0,
        metrics: Metrics | None = None,
        connect: Connect = tcp_connect,
        clock: Callable[[], float] = time.monotonic,
        refused: Callable[[], str | None] = lambda: None,
        silent_since: Callable[[], float | None] = lambda: None,
        failing: Callable[[], tuple[float, str] | None] = lambda: None,
        stuck_after: float = 10.0,
        back: Callable[[], None] = lambda: None,
    ) -> None:
        parts = urlsplit(url)
        self._refused = refused
        self._back = back  # the URL accepts connections again after it did not (a restart)
        self._silent_since = silent_since  # (time.monotonic(), like clock's default)
        self._failing = failing  # (since, what): every answer a 5xx since then (the link's)
        self.stuck_after = stuck_after
        self._stuck = Episode(log, "engine URL not answering")
        self.url = public_url(url)
        self.host = parts.hostname or "127.0.0.1"
        default_port = 443 if parts.scheme == "https" else 80
        try:
            self.port = parts.port or default_port
        except ValueError:
            self.port = default_port
        self.interval = interval
        self.timeout = timeout
        self.metrics = metrics
        self._connect = connect
        self._clock = clock
        self._down_since: float | None = None
        self._failure = ""
        self._episode = Episode(log, "engine URL unreachable")
        self._periodic = Periodic(self._tick, interval)
        self._broken = False

    def _stuck_for(self) -> tuple[str, str] | None:
        """What is wrong with an engine host that accepts connections, for ``stuck_after`` or
        longer, as (kind, detail): it has answered no delivery (sent, not answered in time), or
        has answered every one with a 5xx (the engine failing every action; the link retries
        them); else None."""
        since = self._silent_since()
        if since is not None and self._clock() - since >= self.stuck_after:
            return "stuck", (
                f"{self.url} accepts connections but has answered no delivery for "
                f"{self._clock() - since:.0f}s (the engine host is stuck or frozen)"
            )
        failing = self._failing()
        if failing is not None and self._clock() - failing[0] >= self.stuck_after:
            return "failing", (
                f"{self.url} has answered every delivery for {self._clock() - failing[0]:.0f}s "
                f"with an error ({failing[1]}): the engine fails; its actions wait, retried"
            )
        return None

    def health(self) -> EngineHealth:
        """What /readyz says of the link, now; ``engine_link_ok`` is set to agree (/metrics asks
        this before it renders: the gauge lagged /readyz by up to a probe interval after a
        refused key, recheck probe)."""
        health = self._health()
        self._set_ok(health.ok)
        return health

    def _health(self) -> EngineHealth:
        if self._down_since is None:
            refused = self._refused()
            if refused is not None:
                return EngineHealth(
                    "http", False, f"{self.url}: {refused} (PARTY_SYNC_API_KEY differs)"
                )
            stuck = self._stuck_for()
            if stuck is not None:
                return EngineHealth("http", False, stuck[1])
            return EngineHealth("http", True, self.url)
        down_for = self._clock() - self._down_since
        detail = f"{self.url} unreachable for {down_for:.0f}s ({self._failure})"
        return EngineHealth("http", False, detail)

    async def probe_once(self) -> bool:
        """One probe; True if the engine URL accepted a connection."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._connect(self.host, self.port)
        except (OSError, TimeoutError) as exc:
            self._failure = type(exc).__name__
            if self._down_since is None:
                self._down_since = self._clock()
            # while it is down, looked at every second: /readyz tells its return (or what the
            # host says then: a refused key) within a second, not a whole interval later
            self._periodic.interval = min(self.interval, DOWN_INTERVAL)
            self._episode.trouble(
                "unreachable", f"{self.url} ({self._failure})", engine_url=self.url
            )
            self._set_ok(False)
            return False
        if self._down_since is not None:
            self._back()  # what the host said before it went down is not what it says now
        self._down_since = None
        self._episode.fine(f"{self.url} accepts connections again", engine_url=self.url)
        stuck = self._stuck_for()
        if stuck is not None:
            self._stuck.trouble(*stuck, engine_url=self.url)
        else:
            self._stuck.fine(f"{self.url} answers deliveries again", engine_url=self.url)
        ok = self._refused() is None and stuck is None
        # Degraded (its key refused, stuck, failing): looked at every second too, so that a
        # restart that closed the port for a second or two is seen (outage promises probe: a
        # host restarted with the right key between two 5-s probes was still "refusing the
        # key" until a delivery came), and the metric follows /readyz within a second.
        self._periodic.interval = self.interval if ok else min(self.interval, DOWN_INTERVAL)
        self._set_ok(ok)
        return True

    def _set_ok(self, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.engine_link_ok.set(1 if ok else 0)

    async def _tick(self) -> None:
        try:
            await self.probe_once()
        except Exception:  # never die: a probe is a hint (logged once until a probe works)
            if self.metrics is not None:
                self.metrics.background_errors.labels("engine_probe").inc()
            if not self._broken:
                log.exception("engine URL probe failed; it carries on")
            self._broken = True
        else:
            self._broken = False

    async def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()
