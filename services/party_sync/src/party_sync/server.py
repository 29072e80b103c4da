"""Assembling and running a server: contracts, backend, engine link, gateway, aiohttp app."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from aiohttp import web

from party_sync import logs
from party_sync.auth import TokenVerifier, min_secret_bytes
from party_sync.backends import shared_settings
from party_sync.backends.base import EVENT_OVERHEAD, Backend, BackendSettings
from party_sync.backends.directory import make_directory
from party_sync.backends.keys import KeySpace
from party_sync.backends.memory import MemoryBackend
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.backends.redis_connect import RedisTarget
from party_sync.config import Settings
from party_sync.devmode import DevSecret
from party_sync.engine.health import (
    EngineHealth,
    HealthSource,
    HttpProbe,
    Periodic,
    StaticHealth,
    public_url,
)
from party_sync.engine.http_link import HttpEngineLink
from party_sync.engine.inprocess import InProcessLink
from party_sync.engine.interface import EngineLink
from party_sync.engine.loader import load_engine
from party_sync.engine.stream_link import StreamEngineLink
from party_sync.engine.stream_monitor import ENGINE_GROUP, StreamMonitor
from party_sync.gateway import Gateway
from party_sync.metrics import Metrics
from party_sync.problems import RAW_BODIES, listen, quiet
from party_sync.protocol.errors import ConfigError
from party_sync.protocol.schemas import Contracts
from party_sync.tasks import STOP_SIGNALS
from party_sync.transport.http import ENGINE_HEALTH, GUARD, RedactingAccessLogger, build_app

log = logging.getLogger("party_sync")

#: Objects allocated (net) before a young-generation collection (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000
#: A full collection once this many connections (or half the open ones, if more) closed since
#: the last, at most every GC_FULL_MIN_INTERVAL seconds (``full_collection_due``).
GC_FULL_AFTER_CLOSED = 500
GC_FULL_AFTER_CLOSED_MAX = 2_000  # the garbage held between two (~50 KB per closed connection)
GC_FULL_MIN_INTERVAL = 30.0


def full_collection_due(closed: int, open_now: int, since_last: float) -> bool:
    """Is a full collection due? A closed WebSocket leaves reference cycles (aiohttp's response,
    protocol and transport; the exception that ended it, with its frames) that only a full
    collection frees, and with the raised young threshold and everything frozen at start those
    ran about once in twenty minutes under churn, never when idle: a soak held ~1,200 closed
    connections' objects, RSS rising 60 MB with a steady number of players. Paced by closures
    (its cost grows with the open connections, so with more open ones it waits for more, up to
    GC_FULL_AFTER_CLOSED_MAX: the garbage waiting is bounded too)."""
    wanted = max(GC_FULL_AFTER_CLOSED, min(open_now // 2, GC_FULL_AFTER_CLOSED_MAX))
    return closed >= wanted and since_last >= GC_FULL_MIN_INTERVAL


class FullCollections:
    """A full collection when ``full_collection_due``, looked at every ``every`` s."""

    def __init__(self, gateway: Gateway, every: float = 10.0) -> None:
        self.gateway = gateway
        self.periodic = Periodic(self._tick, every)
        self._collected_at = time.monotonic()
        self._lost_then = gateway.core.lost

    async def _tick(self) -> None:
        now, lost = time.monotonic(), self.gateway.core.lost
        closed = lost - self._lost_then
        if not full_collection_due(
            closed, len(self.gateway.core.connections), now - self._collected_at
        ):
            return
        started = time.perf_counter()
        try:
            freed = gc.collect()
        except Exception:  # (a finalizer's error: never the end of the pacing)
            log.exception("full collection failed")
            freed = -1
        took = (time.perf_counter() - started) * 1000
        log.log(
            logging.INFO if took >= 100 else logging.DEBUG,
            "full collection after %d closed connections: %d objects in %.0f ms",
            closed,
            freed,
            took,
        )
        self._collected_at, self._lost_then = time.monotonic(), lost


#: Seconds between two looks at the engine link (stream backlog, HTTP engine URL).
ENGINE_WATCH_INTERVAL = 5.0


@dataclass
class Server:
    settings: Settings
    gateway: Gateway
    app: web.Application
    verifier: TokenVerifier
    engine_health: HealthSource | None = None


def backend_settings(settings: Settings) -> BackendSettings:
    return BackendSettings(
        history_size=settings.history_size,
        history_max_bytes=settings.history_max_bytes,
        history_max_age=settings.history_max_age,
        presence_ttl=settings.presence_ttl,
        action_timeout=settings.action_timeout,
        action_record_ttl=settings.action_record_ttl,
        idle_party_ttl=settings.party_ttl,
        narration_idle=settings.narration_idle,
        max_event_bytes=settings.api_max_body_bytes + EVENT_OVERHEAD,
    )


def make_backend(
    settings: Settings, *, node_id: str | None = None, metrics: Metrics | None = None
) -> Backend:
    """The Redis backend when ``redis_url`` is set (docs/redis.md), else the embedded one."""
    if settings.redis_url:
        target = RedisTarget.of(settings)
        options = RedisOptions(
            url=settings.redis_url,
            sentinels=target.sentinels,
            cluster=settings.redis_cluster,
            seeds=target.seeds,
            prefix=settings.redis_prefix,
            probe_interval=settings.redis_probe_interval,
            command_timeout=settings.redis_command_timeout,
            max_connections=settings.redis_max_connections,
            write_delay=settings.redis_write_delay,
            presence_grace=settings.presence_grace,
        )
        try:
            return RedisBackend(
                options, backend_settings(settings), node_id=node_id, metrics=metrics
            )
        except ValueError as exc:  # redis-py refuses a malformed URL
            raise ConfigError(f"redis_url: {exc}") from None
    return MemoryBackend(backend_settings(settings))


def new_node_id() -> str:
    """A node's id: in its Redis keys, its metrics and its connections' names."""
    return uuid.uuid4().hex[:12]


def make_link(settings: Settings, node_id: str | None = None) -> EngineLink:
    """The engine transport (``engine_transport``; ``auto``: http, else stream, else in-process)."""
    transport = settings.resolved_engine_transport
    if transport == "http":
        assert settings.engine_url is not None
        if not settings.api_key:
            raise ConfigError(
                "engine_transport http needs api_key (PARTY_SYNC_API_KEY): the engine publishes "
                "through the server API with it, and each delivery to engine_url carries it"
            )
        return HttpEngineLink(
            settings.engine_url,
            timeout=settings.engine_http_timeout,
            retries=settings.engine_http_retries,
            notice_url=settings.engine_notice_url,
            give_up_after=settings.action_record_ttl,
            claim_patience=settings.action_record_ttl,
            api_key=settings.api_key,
            engine_claims=settings.engine_http_claim == "engine",
            node_id=node_id,
        )
    if transport == "stream":
        assert settings.redis_url is not None
        return StreamEngineLink(
            RedisTarget.of(settings),
            settings.actions_stream,
            settings.actions_stream_maxlen,
            partitions=settings.actions_stream_partitions,
            timeout=settings.redis_command_timeout,
            prefix=settings.redis_prefix,
            max_connections=settings.redis_max_connections,
            client_name=None if node_id is None else f"party_sync:{node_id}:engine-link",
            give_up_after=settings.action_record_ttl,
            shared=(
                KeySpace(settings.redis_prefix).settings(),
                shared_settings.encode(shared_settings.values_of(settings)),
            ),
        )
    # Through a backend outage of any length an action is claimed and handed over again until
    # answered, for as long as its record can take an answer (``action_record_ttl``).
    return InProcessLink(load_engine(settings.engine), claim_patience=settings.action_record_ttl)


def with_dev_secret(settings: Settings, kept: DevSecret | None = None) -> Settings:
    """No secret configured: use the development secret ``kept`` (``devmode.load_or_create``,
    so links survive a restart), or a random one for this process (development only)."""
    if settings.jwt_secret:
        return settings
    return replace(
        settings,
        jwt_secret=kept.jwt_secret if kept else secrets.token_urlsafe(32),
        api_key=settings.api_key or (kept.api_key if kept else secrets.token_urlsafe(24)),
    )


def describe_backend(settings: Settings, backend: Backend) -> str:
    """The backend for the start-up log: its name, and where (no credentials) in Redis mode."""
    if settings.redis_url and backend.name != "memory":
        return f"{backend.name} {_redis_where(settings)}"
    return backend.name


def _redis_where(settings: Settings) -> str:
    """Where Redis is, without credentials: the URL's host (a Cluster's: "cluster via" it), or
    the Sentinel set."""
    assert settings.redis_url is not None
    if settings.redis_sentinels:
        return RedisTarget.of(settings).describe()
    if settings.redis_cluster:
        return f"cluster via {public_url(settings.redis_url)}"
    return public_url(settings.redis_url)


def describe_engine(settings: Settings, link: EngineLink) -> tuple[str, str]:
    """``(transport, what)`` of the engine link actually used (never a credential or query)."""
    if isinstance(link, StreamEngineLink):
        where = f" on {_redis_where(settings)}" if settings.redis_url else ""
        return "stream", f"Redis stream {link.stream}{where}"
    if isinstance(link, HttpEngineLink):
        claims = "the engine host claims" if link.engine_claims else "this node claims"
        return "http", f"{public_url(link.url)} ({claims})"
    if isinstance(link, InProcessLink):
        engine = type(link.engine)
        return "inprocess", f"{engine.__module__}.{engine.__qualname__} ({settings.engine})"
    return type(link).__name__, type(link).__module__


def unused_engine_setting(settings: Settings, transport: str) -> str | None:
    """A warning when ``engine`` (``--engine``, ``PARTY_SYNC_ENGINE``) was set but the node does
    not host an engine (its transport is the stream or HTTP, where the engine runs elsewhere), or
    ``engine_url`` / ``engine_notice_url`` were set but the transport is not HTTP."""
    if transport != "http" and settings.engine_http_claim != "node":
        return (
            f"engine_http_claim {settings.engine_http_claim} is not used: the engine transport "
            f"is {transport}; it applies to the HTTP transport (engine_url)"
        )
    if transport != "http" and (settings.engine_url or settings.engine_notice_url):
        name = "engine_url" if settings.engine_url else "engine_notice_url"
        return (
            f"{name} is set but not used: the engine transport is {transport}; set "
            "engine_transport to http (or auto) to deliver actions to the engine URL"
        )
    default = Settings.__dataclass_fields__["engine"].default
    if transport == "inprocess" or settings.engine == default:
        return None
    return (
        f"engine {settings.engine} is not used: the engine transport is {transport} (the engine"
        " runs elsewhere); set engine_transport to inprocess to host it in this node"
    )


def capped_replay(settings: Settings) -> str | None:
    """A warning when ``max_replay`` is above ``history_size``: a resume replays only what the
    history holds, so the setting promises more than it can give."""
    if settings.max_replay <= settings.history_size:
        return None
    return (
        f"max_replay ({settings.max_replay}) is above history_size ({settings.history_size}): a "
        f"resume replays at most the {settings.history_size} events a party's history holds; "
        "raise history_size, or lower max_replay to say what you get"
    )


#: Shortest secrets not warned about: an HS256 key of 32 bytes (RFC 7518 §3.2: at least the
#: hash's size), an API key of 24 characters (what ``with_dev_secret`` makes: 18 random bytes).
MIN_API_KEY_CHARS = 24


def weak_secrets(settings: Settings) -> list[str]:
    """Warnings for configured secrets short enough to guess offline (a signed token or a
    request is all it takes to test guesses): the JWT secrets and the API key."""
    found = []
    for name, secret in (
        ("PARTY_SYNC_JWT_SECRET", settings.jwt_secret),
        ("PARTY_SYNC_JWT_PREVIOUS_SECRET", settings.jwt_previous_secret),
    ):
        least = min_secret_bytes(settings.jwt_algorithms)  # the hash size (RFC 7518 §3.2)
        if secret and len(secret.encode()) < least:
            found.append(
                f"{name} is too short ({_count(len(secret.encode()), 'byte')}): use at least "
                f"{least} random bytes for {', '.join(settings.jwt_algorithms)} (e.g. openssl "
                f"rand -base64 {least}); a short one can be guessed offline from any token"
            )
    if settings.api_key and len(settings.api_key) < MIN_API_KEY_CHARS:
        found.append(
            f"PARTY_SYNC_API_KEY is too short ({_count(len(settings.api_key), 'character')}): "
            f"use at least "
            f"{MIN_API_KEY_CHARS} random ones (e.g. openssl rand -base64 24)"
        )
    return found


def api_off(settings: Settings) -> tuple[int, str] | None:
    """The log level and line that say the server API is off (no ``api_key``): a WARNING when
    Telegram sign-in is configured, which needs its memberships (``PUT .../members/...``), else
    INFO (an in-process engine may need no API); None with a key."""
    if settings.api_key:
        return None
    telegram = bool(settings.telegram_bot_token or settings.telegram_bot_id)
    line = (
        "PARTY_SYNC_API_KEY is unset: the server API (events, votes, narration, memberships, "
        "the admin API) answers every call 401"
        + (", so no membership can be registered for Telegram sign-in" if telegram else "")
    )
    return (logging.WARNING if telegram else logging.INFO), line


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def watch_engine(settings: Settings, link: EngineLink, metrics: Metrics) -> HealthSource:
    """What tells ``/readyz`` and the operator how the engine link is: the stream's backlog
    monitor, the HTTP engine URL's probe, or nothing to watch (in-process)."""
    if isinstance(link, StreamEngineLink) and settings.redis_url:
        return StreamMonitor.for_redis(
            RedisTarget.of(settings),
            link.stream,
            ENGINE_GROUP,
            interval=ENGINE_WATCH_INTERVAL,
            metrics=metrics,
            partitions=link.partitions,
            prefix=settings.redis_prefix,
        )
    if isinstance(link, HttpEngineLink):
        return HttpProbe(
            link.url,
            interval=ENGINE_WATCH_INTERVAL,
            metrics=metrics,
            refused=lambda: link.key_refused,
            silent_since=lambda: link.silent_since,
            failing=lambda: link.failing,
            stuck_after=max(10.0, 2 * link.timeout),
            back=link.host_restarted,
        )
    transport, what = describe_engine(settings, link)
    return StaticHealth(EngineHealth(transport, True, what))


def build_server(
    settings: Settings,
    *,
    link: EngineLink | None = None,
    backend: Backend | None = None,
    dev_mode: bool = False,
    node_id: str | None = None,
) -> Server:
    """``dev_mode``: no secret was configured (``with_dev_secret`` made one), so the
    development-only routes exist (``POST /api/v1/dev/token`` mints demo tokens). ``node_id``:
    this node's id (``new_node_id``), when a link made for it was given; else a new one."""
    if not settings.jwt_secret:
        raise ConfigError("build_server needs a JWT secret (see with_dev_secret)")
    contracts = Contracts()
    node_id = node_id or new_node_id()
    if link is None:
        link = make_link(settings, node_id)
    metrics = Metrics(node_id)
    if backend is None:
        backend = make_backend(settings, node_id=node_id, metrics=metrics)
    # Tokens are judged by the clock everything else keeps (Redis's, in Redis mode): the
    # handshake's exp/iat/nbf check and the open connection's expiry timer agree, and a node
    # whose own clock is off neither refuses fresh tokens nor opens expired ones (clock probe)
    verifier = TokenVerifier(
        [settings.jwt_secret, settings.jwt_previous_secret or ""],
        settings.jwt_algorithms,
        clock=backend.clock,
        clock_known=backend.clock_known,
    )
    gateway = Gateway(
        settings, backend, link, contracts, metrics=metrics, node_id=node_id, clock=backend.clock
    )
    directory = make_directory(
        RedisTarget.of(settings) if settings.redis_url else None,
        settings.redis_prefix,
        max_connections=settings.redis_max_connections,
        client_name=f"party_sync:{node_id}:directory",
    )
    app = build_app(gateway, verifier, directory, dev_mode=dev_mode)
    health = watch_engine(settings, link, metrics)
    metrics.watch_link(describe_engine(settings, link)[0], link)  # engine_link_failures_total
    app[ENGINE_HEALTH] = health.health

    async def watch_start(app: web.Application) -> None:
        await health.start()

    async def watch_stop(app: web.Application) -> None:
        await health.stop()

    app.on_startup.append(watch_start)  # after the gateway's start (build_app's hook)
    app.on_shutdown.insert(0, watch_stop)  # before the drain: nothing to watch any more
    return Server(settings, gateway, app, verifier, health)


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop ``event_loop`` names: uvloop (``auto``: when installed) or the stock loop."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("event_loop is uvloop but uvloop is not installed") from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


class WorkerRole(Protocol):
    """What a worker of ``serve --workers N`` adds to ``run`` (``party_sync.workers``): it
    listens with SO_REUSEPORT beside its siblings, and tells its supervisor when it serves."""

    index: int

    async def started(self, server: Server, stop: Callable[[], None]) -> None:
        """The worker listens: tell the supervisor; ``stop()`` drains it (its parent is gone)."""

    async def stopped(self) -> None:
        """The worker has drained: release what ``started`` took."""


def serve(
    server: Server, *, on_ready: list[str] | None = None, worker: WorkerRole | None = None
) -> None:
    """Run ``run(server)`` to its end on the configured event loop (``party-sync serve``); once
    it is told to stop, the process exits by ``shutdown_timeout + EXIT_GRACE`` whatever still
    runs (``arm_exit_watchdog``)."""
    factory = event_loop_factory(server.settings.event_loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run(server, on_ready=on_ready, worker=worker, on_stop=arm_exit_watchdog))


#: Seconds past ``shutdown_timeout`` that a stopping process may take before its watchdog ends it.
EXIT_GRACE = 2.0


def arm_exit_watchdog(budget: float) -> None:
    """End the process with exit code 1 if it is still alive ``budget + EXIT_GRACE`` s from now.

    The drain and every close are bounded, but what they leave behind may not let the process
    end: a thread that is not a daemon (an engine's database thread, a default-executor job)
    holds the interpreter's exit for as long as it runs. A daemon timer thread still runs then,
    and ends the process, once, loudly."""

    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None

    def force() -> None:
        alive = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        log.error(
            "party_sync did not exit within shutdown_timeout + %.0f s: exiting now (exit code 1)",
            EXIT_GRACE,
            extra={"threads": alive, "tasks": _tasks_left(loop)},
        )
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)

    timer = threading.Timer(budget + EXIT_GRACE, force)
    timer.daemon = True
    timer.name = "party_sync-exit-watchdog"
    timer.start()


def _tasks_left(loop: asyncio.AbstractEventLoop | None, most: int = 10) -> list[str]:
    """The coroutines still running on ``loop`` (read from the watchdog's thread: a diagnostic,
    so a set changing meanwhile gives an empty list): an engine's call that swallows its
    cancellation holds the runner's exit as a thread does (engine probe: the ERROR named only
    the main thread)."""
    if loop is None:
        return []
    try:
        tasks = list(asyncio.all_tasks(loop))
    except RuntimeError:
        return []
    names = sorted(_awaiting(t) for t in tasks)
    return names[:most] + ([f"... {len(names) - most} more"] if len(names) > most else [])


def _awaiting(task: asyncio.Task[Any]) -> str:
    """A task as the chain of coroutines it waits in, outermost first ("InProcessLink._traced_run
    → ... → Engine.handle_action → Event.wait"; at most eight)."""
    coro: Any = task.get_coro()
    chain = [getattr(coro, "__qualname__", task.get_name())]
    for _ in range(64):
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        if coro is None or not hasattr(coro, "__qualname__"):
            break
        chain.append(coro.__qualname__)
    if len(chain) > 8:
        chain = [*chain[:3], "...", *chain[-4:]]
    return " → ".join(chain)


@dataclass
class Listening:
    """A started server: aiohttp's runner and the listening socket(s) in front of it."""

    runner: web.AppRunner
    listener: asyncio.Server

    @property
    def port(self) -> int:
        return int(self.listener.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting, then drain and close every connection (``runner.cleanup``)."""
        self.listener.close()
        await self.runner.cleanup()


async def _in_budget(runner: web.AppRunner, gateway: Gateway, app: web.Application) -> None:
    """The last shutdown hook: the requests still running get what is left of
    ``shutdown_timeout`` (counted from the drain's start), not a whole one more, so that a
    handler stuck on a stalled Redis cannot hold the exit past the documented bound. aiohttp
    takes the wait from the runner's ``_shutdown_timeout`` (it sets it so itself, from a
    site's), read in ``cleanup`` right after these hooks: the one use of its internals here."""
    runner._shutdown_timeout = max(gateway.shutdown_left(), 0.01)  # 0 would mean no limit


async def start_serving(
    server: Server, host: str, port: int, *, shutdown_timeout: float, reuse_port: bool = False
) -> Listening:
    """Start the app on ``host:port`` with the connection limits of ``transport/guard.py``:
    aiohttp's protocol factory (``runner.server``) behind a ``GuardedConnection`` per socket,
    instead of a ``web.TCPSite`` (which would hand sockets to aiohttp unguarded).

    ``reuse_port``: SO_REUSEPORT, so the workers of ``serve --workers N`` each listen on the
    same port and the kernel spreads new connections over them."""
    settings = server.settings
    runner = web.AppRunner(
        server.app,
        access_log_class=RedactingAccessLogger,
        shutdown_timeout=shutdown_timeout,
        handle_signals=False,
        keepalive_timeout=settings.keepalive_timeout,
        **RAW_BODIES,  # bodies are inflated by problems.read_body, bounded, or not at all
    )
    server.app.on_shutdown.append(functools.partial(_in_budget, runner, server.gateway))
    await runner.setup()
    assert runner.server is not None
    loop = asyncio.get_running_loop()
    listener = await listen(
        runner,
        host,
        port,
        functools.partial(
            loop.create_server,
            server.app[GUARD].factory(quiet(runner.server)),
            host,
            port,
            reuse_address=True,
            reuse_port=True if reuse_port else None,
            backlog=128,  # web.TCPSite's
        ),
    )
    return Listening(runner, listener)


async def run(
    server: Server,
    *,
    on_ready: list[str] | None = None,
    worker: WorkerRole | None = None,
    on_stop: Callable[[float], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT/SIGHUP, then drain (1001 to every client) and exit.

    ``worker``: one worker of ``serve --workers N`` (SO_REUSEPORT; it also stops when its
    supervisor is gone). ``on_stop(shutdown_timeout)`` is called when the stop begins."""
    settings = server.settings
    listening = await start_serving(
        server,
        settings.host,
        settings.port,
        shutdown_timeout=settings.shutdown_timeout,
        reuse_port=worker is not None,
    )
    # Everything made so far (modules, compiled schemas, the app) lives as long as the process:
    # move it out of the collector's reach so full collections stay short under load.
    gc.freeze()
    # A young generation of 10,000 objects instead of 700: the short-lived objects of a message
    # (payload dicts, envelopes) die before it is collected instead of being promoted, so full
    # collections of every connection's objects (~30 ms at 1,000 connections here) become rare.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    collections = FullCollections(server.gateway)
    collections.periodic.start()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    backend = describe_backend(settings, server.gateway.backend)
    transport, engine = describe_engine(settings, server.gateway.link)
    where = {"worker": worker.index} if worker is not None else {}
    log.info(
        "party_sync serving on http://%s:%s: backend %s, engine %s: %s",
        settings.host,
        settings.port,
        backend,
        transport,
        engine,
        extra={
            "url": f"http://{settings.host}:{settings.port}",
            "backend": backend,
            "node": server.gateway.node_id,
            "engine_transport": transport,
            "engine": engine,
            "loop": type(loop).__module__.split(".")[0],
            **where,
        },
    )
    for unused in (unused_engine_setting(settings, transport), capped_replay(settings)):
        if unused is not None:
            log.warning(unused)
    for weak in weak_secrets(settings):
        log.warning(weak, extra=logs.VERBATIM)  # our words and lengths only: never a secret
    off = api_off(settings)
    if off is not None:
        log.log(off[0], off[1], extra=logs.VERBATIM)
    for line in on_ready or ():
        print(line, flush=True)
    if worker is not None:
        await worker.started(server, stop.set)
    await stop.wait()
    await collections.periodic.stop()
    log.info("party_sync shutting down")
    if on_stop is not None:
        on_stop(settings.shutdown_timeout)
    started = time.monotonic()
    await listening.stop()
    if worker is not None:
        await worker.stopped()
    log.info("party_sync stopped", extra={"seconds": round(time.monotonic() - started, 3)})
