"""``party-sync serve --workers N``: N serving processes on one port, supervised by the parent.

Every core of one machine (README, "Deploying"). Each worker is a full node of the Redis backend
(its own node id, its own Redis connections, its own in-process engine if that transport is chosen)
and listens on the same ``host:port`` with SO_REUSEPORT, so the kernel spreads new connections over
the workers. The parent (``Supervisor``) serves nothing itself:

- it loads and checks the settings once (the development secret too, so every worker signs with
  the same one), makes the group's private directory, and starts each worker as
  ``python -m party_sync.workers`` (a fresh interpreter: never a fork of a running loop), handing
  it the settings over a socket pair (no secret in argv or the environment);
- a worker says ``ready`` on that socket once it listens; the parent prints the start-up banner
  when every worker is ready;
- a worker that dies is started again, in the same slot, after a bounded backoff
  (``RESTART_DELAY_MIN`` doubling to ``RESTART_DELAY_MAX``, back to the minimum once a worker
  has served for ``STABLE_AFTER`` seconds), with one log line each; its players reconnect to the
  port and resume, on any worker (the protocol's resume);
- a worker that exits before the whole group ever served (a bad engine, a port in use) stops
  the group: the parent exits with that worker's code (2 for a configuration error);
- SIGTERM, SIGINT or SIGHUP to the parent drains every worker (SIGTERM: each closes its clients with
  1001 within ``shutdown_timeout``), then the parent removes the group's directory and exits 0;
- a worker whose parent is gone (even killed) sees its end of the socket pair close, and drains.

``/metrics`` on any worker reports the whole group (``metrics.merge_workers``): each worker
also serves its own registry on ``<group dir>/worker-<k>.sock``, and the worker that is scraped
reads its siblings' there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from party_sync import config, logs
from party_sync.config import Settings
from party_sync.problems import check_port_free
from party_sync.protocol.errors import ConfigError, EngineStartError, ListenError, one_line
from party_sync.tasks import STOP_SIGNALS, cancel_and_wait

if TYPE_CHECKING:
    from party_sync.server import Server

log = logging.getLogger("party_sync")

#: Seconds before the first restart of a worker that died; doubled for each quick death after.
RESTART_DELAY_MIN = 0.5
#: The longest wait before a restart.
RESTART_DELAY_MAX = 30.0
#: A worker that served this long before dying is restarted after ``RESTART_DELAY_MIN`` again.
STABLE_AFTER = 60.0
#: The signals the parent stops its workers with (SIGINT: Ctrl-C reaches the whole group).
_STOP_SIGNALS = frozenset(STOP_SIGNALS)
#: Seconds the parent waits, past ``shutdown_timeout``, for a draining worker before SIGKILL
#: (a worker ends itself by ``server.EXIT_GRACE`` past it; this is for one that cannot run:
#: stopped, or stuck outside Python). A worker killed so makes ``serve`` exit 1.
DRAIN_GRACE = 5.0
#: Seconds a worker waits for a sibling's metrics at scrape time.
SCRAPE_TIMEOUT = 2.0


def restarts_file(group_dir: Path) -> Path:
    """The supervisor's count of restarts per worker (JSON, a list by worker number), which any
    worker's ``/metrics`` reports for every worker, one that is down too."""
    return group_dir / "restarts.json"


def read_restarts(group_dir: Path, count: int) -> dict[int, int] | None:
    """``restarts_file``'s counts by worker (None: unreadable, e.g. the supervisor is gone)."""
    try:
        listed = orjson.loads(restarts_file(group_dir).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(listed, list) or len(listed) != count:
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in listed):
        return None
    return {index: int(n) for index, n in enumerate(listed, start=1)}


def worker_socket(group_dir: Path, index: int) -> Path:
    """Where worker ``index`` serves its own metrics to its siblings."""
    return group_dir / f"worker-{index}.sock"


def settings_to_json(settings: Settings) -> dict[str, Any]:
    return asdict(settings)


def settings_from_json(data: dict[str, Any]) -> Settings:
    values: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name in data:
            value = data[f.name]
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return Settings(**values)


# -- the parent ---------------------------------------------------------------------------------
@dataclass
class Slot:
    """One worker's place in the group: the process in it now, and how it has gone so far."""

    index: int
    process: asyncio.subprocess.Process | None = None
    node: str | None = None
    restarts: int = 0
    delay: float = RESTART_DELAY_MIN
    ready_once: bool = False


@dataclass
class Supervisor:
    settings: Settings  # with the secret (development mode: the one kept for this directory)
    dev_mode: bool = False
    on_ready: list[str] = field(default_factory=list)
    slots: list[Slot] = field(init=False)
    stopping: asyncio.Event = field(init=False)
    failure: int | None = field(init=False, default=None)
    group_dir: Path = field(init=False)
    ready_changed: asyncio.Event = field(init=False)  # a worker said it serves
    others_may_start: asyncio.Event = field(init=False)  # the first serves (or the group stops)

    def __post_init__(self) -> None:
        self.slots = [Slot(index) for index in range(1, self.settings.workers + 1)]

    def run(self) -> int:
        """Supervise the group until a signal drains it; the process's exit code."""
        return asyncio.run(self._run())

    async def _run(self) -> int:
        self.stopping = asyncio.Event()
        self.ready_changed = asyncio.Event()
        self.others_may_start = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._stop, sig)
        self.group_dir = Path(tempfile.mkdtemp(prefix="party-sync-workers-"))  # mode 0700
        try:
            self._write_restarts()
            keepers = [asyncio.create_task(self._keep(slot)) for slot in self.slots]
            announce = asyncio.create_task(self._announce())
            await self.stopping.wait()
            log.info("party_sync shutting down", extra={"workers": len(self.slots)})
            started = time.monotonic()
            announce.cancel()
            for slot in self.slots:
                self._signal(slot, signal.SIGTERM)
            deadline = self.settings.shutdown_timeout + DRAIN_GRACE
            _, late = await asyncio.wait(keepers, timeout=deadline)
            if late:
                for slot in self.slots:
                    if slot.process is not None and slot.process.returncode is None:
                        log.error(
                            "worker %d did not drain within %.0f s: killed",
                            slot.index,
                            deadline,
                            extra={"worker": slot.index, "pid": slot.process.pid},
                        )
                        self._signal(slot, signal.SIGKILL)
                        self.failure = self.failure or 1
                await asyncio.wait(late)
            for keeper in keepers:
                if not keeper.cancelled() and keeper.exception() is not None:
                    log.error("worker supervision failed", exc_info=keeper.exception())
            log.info("party_sync stopped", extra={"seconds": round(time.monotonic() - started, 3)})
        finally:
            shutil.rmtree(self.group_dir, ignore_errors=True)
        return self.failure or 0

    def _write_restarts(self) -> None:
        """Write the restart counts for the workers' ``/metrics`` (atomically: a scrape never
        reads half a file). A failure only leaves the previous counts."""
        target = restarts_file(self.group_dir)
        partial = target.with_suffix(".tmp")
        try:
            partial.write_bytes(orjson.dumps([slot.restarts for slot in self.slots]))
            partial.replace(target)
        except OSError as exc:
            log.warning("could not write the workers' restart counts: %s", exc)

    def _stop(self, sig: signal.Signals | None = None) -> None:
        self.stopping.set()
        self.others_may_start.set()  # the workers still waiting for the first: none to start

    def _signal(self, slot: Slot, sig: signal.Signals) -> None:
        if slot.process is not None and slot.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                slot.process.send_signal(sig)

    async def _announce(self) -> None:
        """Once every worker serves: one line for the group, and the ``--demo-tokens`` banner."""
        while not all(slot.ready_once for slot in self.slots):
            await self.ready_changed.wait()
            self.ready_changed.clear()
        settings = self.settings
        log.info(
            "party_sync serving on http://%s:%s with %d workers",
            settings.host,
            settings.port,
            len(self.slots),
            extra={
                "url": f"http://{settings.host}:{settings.port}",
                "workers": len(self.slots),
                "nodes": [slot.node for slot in self.slots],
                "pids": [slot.process.pid if slot.process else None for slot in self.slots],
                "group_dir": str(self.group_dir),
            },
        )
        for line in self.on_ready:
            print(line, flush=True)

    async def _keep(self, slot: Slot) -> None:
        """Run slot's worker, and start it again each time it dies, until the group stops.

        The first worker starts alone: the others start once it serves. A setting that can never
        work (Redis refusing the credentials, an engine that does not import) then stops the group
        with that worker's one error, instead of the same error from every worker."""
        first = self.slots[0]
        while slot is not first and not first.ready_once and not self.stopping.is_set():
            await self.others_may_start.wait()
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                returncode: int | None = await self._run_worker(slot)
            except Exception:  # could not even start it (no process left, no file descriptor)
                log.exception("worker %d could not be started", slot.index)
                returncode = None
            if self.stopping.is_set():
                # A worker still starting (it never said it serves: no clients) that the stop
                # signal ended before it could handle it stopped cleanly; any other non-zero
                # code is a drain that was not (its exit watchdog, or a kill).
                if returncode and not (slot.node is None and -returncode in _STOP_SIGNALS):
                    self.failure = self.failure or 1
                return
            if not all(s.ready_once for s in self.slots):
                # Before the group ever served: a worker that cannot start (a bad engine, a port
                # in use) would fail the same way again. Stop the group with its exit code.
                log.error(
                    "worker %d exited with %s before the group served: stopping",
                    slot.index,
                    returncode,
                    extra={"worker": slot.index, "returncode": returncode},
                )
                self.failure = returncode if returncode and returncode > 0 else 1
                self._stop()
                return
            if time.monotonic() - started >= STABLE_AFTER:
                slot.delay = RESTART_DELAY_MIN
            delay = slot.delay
            slot.delay = min(slot.delay * 2, RESTART_DELAY_MAX)
            # A worker that drained and exited 0 (a SIGTERM sent to it alone, an operator's
            # doing) is no failure: a WARNING; one that died, an ERROR (deploy probe)
            log.log(
                logging.WARNING if returncode == 0 else logging.ERROR,
                "worker %d (pid %s, node %s) exited with %s: restarting it in %.1f s",
                slot.index,
                slot.process.pid if slot.process else None,
                slot.node or "not reported yet",  # killed before it said it served
                returncode,
                delay,
                extra={
                    "worker": slot.index,
                    "pid": slot.process.pid if slot.process else None,
                    "node": slot.node,
                    "returncode": returncode,
                    "delay": delay,
                    "restarts": slot.restarts + 1,
                },
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            slot.restarts += 1
            self._write_restarts()

    async def _watch(self, slot: Slot, reader: asyncio.StreamReader) -> None:
        """Kill slot's worker once it has gone ``worker_timeout`` without a beat (it beats every
        ``WORKER_BEAT`` seconds from its event loop): stopped, or its loop stuck. The kernel goes
        on handing it new connections on the shared port, which would wait for it; killed, it is
        restarted as a worker that died, and its players resume on any worker. Not while the
        group drains (the drain has its own deadline, ``DRAIN_GRACE``), nor with
        ``worker_timeout`` 0.

        Silence is judged twice: past the timeout, the worker gets two beats' time more. The
        supervisor may itself not have run meanwhile (the whole group stopped and resumed
        together: Ctrl-Z then ``fg``, a paused container), and then every worker's timer has run
        out at once, while each beats again within ``WORKER_BEAT`` of running."""
        timeout = self.settings.worker_timeout or None

        async def beat(wait: float | None) -> bytes | None:
            """The next line (b"" at the end), or None if none came within ``wait``."""
            try:
                return await asyncio.wait_for(reader.readline(), wait)
            except TimeoutError:
                return None

        while True:
            try:
                line = await beat(timeout)
                if line is None and not self.stopping.is_set():
                    line = await beat(2 * config.WORKER_BEAT)  # the last chance
                    if line is None and not self.stopping.is_set():
                        process = slot.process
                        log.error(
                            "worker %d (pid %s) has not run for %.0f s (stopped, or its event "
                            "loop is stuck): killed",
                            slot.index,
                            process.pid if process else None,
                            (timeout or 0) + 2 * config.WORKER_BEAT,
                            extra={"worker": slot.index, "pid": process.pid if process else None},
                        )
                        self._signal(slot, signal.SIGKILL)
                        return
            except (OSError, ValueError):  # (ValueError: a line past the reader's limit)
                return
            if line == b"":  # the worker closed its end: it is exiting
                return

    async def _run_worker(self, slot: Slot) -> int:
        """Start slot's worker, hand it its settings, wait for it to end; its exit code."""
        parent_end, child_end = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "party_sync.workers",
                "--worker",
                str(slot.index),
                "--control-fd",
                str(child_end.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(child_end.fileno(),),
            )
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        slot.process, slot.node = process, None
        if self.stopping.is_set():  # the group was told to stop while this one was starting
            self._signal(slot, signal.SIGTERM)
        reader, writer = await asyncio.open_connection(sock=parent_end)
        try:
            handoff = {
                "settings": settings_to_json(self.settings),
                "dev_mode": self.dev_mode,
                "worker": slot.index,
                "workers": len(self.slots),
                "group_dir": str(self.group_dir),
                "restarts": slot.restarts,
            }
            writer.write(orjson.dumps(handoff) + b"\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            exited = asyncio.create_task(process.wait())
            said = asyncio.create_task(reader.readline())
            await asyncio.wait({exited, said}, return_when=asyncio.FIRST_COMPLETED)
            if said.done() and not said.exception() and said.result():
                ready = orjson.loads(said.result())
                watch = asyncio.create_task(self._watch(slot, reader))
                slot.node = ready.get("node")
                log.info(
                    "worker %d %s (pid %d, node %s)",
                    slot.index,
                    "restarted" if slot.restarts else "ready",
                    process.pid,
                    slot.node,
                    extra={
                        "worker": slot.index,
                        "pid": process.pid,
                        "node": slot.node,
                        "restarts": slot.restarts,
                    },
                )
                slot.ready_once = True
                self.ready_changed.set()
                if slot is self.slots[0]:
                    self.others_may_start.set()
                try:
                    return await exited
                finally:
                    await cancel_and_wait([watch], what="the worker's watch")
            said.cancel()
            return await exited
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


# -- a worker -----------------------------------------------------------------------------------
@dataclass
class Worker:
    """A worker's side of the group (``server.WorkerRole``): tells the supervisor it serves,
    drains when the supervisor is gone, and serves its own metrics to its siblings."""

    index: int
    count: int
    group_dir: Path
    control: socket.socket
    _metrics_server: asyncio.Server | None = None
    _beating: asyncio.Task[None] | None = None
    #: The supervisor is gone (killed): this worker drains without it.
    orphaned: bool = False

    @property
    def own_socket(self) -> Path:
        return worker_socket(self.group_dir, self.index)

    async def started(self, server: Server, stop: Callable[[], None]) -> None:
        async def serve_metrics(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(server.gateway.metrics.render())
                await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        path = self.own_socket
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead predecessor's
        try:
            self._metrics_server = await asyncio.start_unix_server(serve_metrics, path=str(path))
        except OSError as exc:  # the group's directory is gone (its supervisor died meanwhile)
            log.warning("cannot serve this worker's metrics to the group: %s", exc)
        loop = asyncio.get_running_loop()
        self.control.setblocking(False)

        def parent_said() -> None:
            try:
                data = self.control.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the supervisor is gone: drain, as on SIGTERM
                loop.remove_reader(self.control.fileno())
                log.warning("the supervisor is gone: draining")
                self.orphaned = True
                stop()

        loop.add_reader(self.control.fileno(), parent_said)
        message = {"ready": True, "node": server.gateway.node_id, "pid": os.getpid()}
        with contextlib.suppress(OSError):
            await loop.sock_sendall(self.control, orjson.dumps(message) + b"\n")
        self._beating = loop.create_task(self._beat())

    async def _beat(self) -> None:
        """Tell the supervisor every ``WORKER_BEAT`` seconds that this loop runs (``_watch``)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(config.WORKER_BEAT)
            try:
                await loop.sock_sendall(self.control, b"{}\n")
            except OSError:  # the supervisor is gone (parent_said drains)
                return

    async def stopped(self) -> None:
        if self._beating is not None:
            await cancel_and_wait([self._beating], what="the worker's beat")
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.own_socket.unlink()
        if self.orphaned:  # nobody else will remove the group's directory (nor a dead slot's
            # socket in it): the first orphan out does; siblings still draining need it no more
            shutil.rmtree(self.group_dir, ignore_errors=True)
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.control.fileno())

    async def sibling(self, index: int) -> bytes | None:
        """Worker ``index``'s own exposition, or None if it does not answer in time."""
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(
                    str(worker_socket(self.group_dir, index))
                )
                try:
                    return await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return None

    def middleware(self, render: Callable[[], bytes]) -> Middleware:
        """``GET /metrics`` answered for the whole group (innermost: counted like any route)."""
        from party_sync.metrics import EXPOSITION_TYPE, ScrapeGate, merge_workers

        @web.middleware
        def group_metrics(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
            resource = request.match_info.route.resource
            if resource is None or resource.canonical != "/metrics":
                return handler(request)  # no frame of ours around it (a WebSocket's whole life)
            return merged()

        gate = ScrapeGate()  # a flood of scrapes gets the last merged exposition again

        async def merged() -> web.StreamResponse:
            body = gate.last
            if body is None or gate.fresh(time.monotonic()):
                others = [i for i in range(1, self.count + 1) if i != self.index]
                texts = await asyncio.gather(*(self.sibling(i) for i in others))
                parts = sorted(
                    [(self.index, render()), *zip(others, texts, strict=True)], key=lambda p: p[0]
                )
                restarts = read_restarts(self.group_dir, self.count)
                body = gate.last = merge_workers(parts, self.count, restarts)
            return web.Response(body=body, headers={"Content-Type": EXPOSITION_TYPE})

        return group_metrics


class _WorkerTag(logging.Filter):
    """Every log record of a worker carries its number (``worker``)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


#: A worker's text line: the number after the logger's name, then the fields as any text line.
WORKER_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s [worker %(worker)s]: %(message)s"


def tag_logs(index: int, log_format: str) -> None:
    """Every record of worker ``index`` carries its number: a ``worker`` field in JSON, after
    the logger's name in text, whose lines keep their fields and escapes (``logs.TextFormatter``:
    a plain ``Formatter`` here dropped both, streams probe)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerTag(index))
        if log_format == "text":
            handler.setFormatter(logs.TextFormatter(WORKER_TEXT_FORMAT))


def _read_handoff(control: socket.socket) -> dict[str, Any]:
    buffer = b""
    while not buffer.endswith(b"\n"):
        chunk = control.recv(65536)
        if not chunk:
            raise ConfigError("the supervisor closed the control socket before the settings")
        buffer += chunk
    data: dict[str, Any] = orjson.loads(buffer)
    return data


def worker_main(argv: list[str] | None = None) -> int:
    """A worker process: ``python -m party_sync.workers --worker K --control-fd FD``."""
    from party_sync.metrics import WorkerRestarts
    from party_sync.server import build_server, serve

    parser = argparse.ArgumentParser(prog="party_sync.workers")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args(argv)
    control = socket.socket(fileno=args.control_fd)
    try:
        handoff = _read_handoff(control)
        settings = settings_from_json(handoff["settings"])
        config.validate(settings)
        logs.configure(settings.log_level, settings.log_format, secrets=logs.secrets_of(settings))
        tag_logs(args.worker, settings.log_format)
        from party_sync import tracing

        tracing.configure_from_env("party-sync")
        server = build_server(settings, dev_mode=bool(handoff["dev_mode"]))
        worker = Worker(args.worker, int(handoff["workers"]), Path(handoff["group_dir"]), control)
        metrics = server.gateway.metrics
        WorkerRestarts(int(handoff["restarts"]), metrics.registry)
        server.app.middlewares.append(worker.middleware(metrics.render))
        serve(server, worker=worker)
    except ConfigError as exc:
        print(f"party-sync: configuration error: {one_line(exc)}", file=sys.stderr)
        return 2
    except (ListenError, EngineStartError) as exc:
        print(f"party-sync: {one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        control.close()
    return 0


def start_group(settings: Settings, *, dev_mode: bool, on_ready: list[str]) -> int:
    """``party-sync serve`` with ``workers`` > 1: supervise the group; the exit code."""
    if settings.workers < 2:
        raise ConfigError("start_group needs workers > 1")
    check_port_free(settings.host, settings.port)
    return Supervisor(settings, dev_mode=dev_mode, on_ready=on_ready).run()


if __name__ == "__main__":
    # Run the real module (party_sync.workers), not this __main__ copy of it.
    from party_sync import workers as _module

    raise SystemExit(_module.worker_main())
