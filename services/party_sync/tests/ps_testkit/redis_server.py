"""A private ``redis-server`` for tests: its own free port and temp dir, never the shared one.

No persistence (``--save "" --appendonly no``), so a restart is a real loss of every key: exactly
what the epoch must detect. ``start`` polls PING until it answers (bounded), never sleeps blindly.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from ps_testkit.servers import free_port


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is not installed: `make test` installs it (apt-get install redis-server)"
        )
    return binary


def ping(port: int, timeout: float = 0.5) -> bool:
    """True if a Redis answers PING on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class _ExitedError(RuntimeError):
    """The redis-server process exited before it answered PING."""


class RedisServer:
    """One redis-server process on a free loopback port; restartable on the same port."""

    def __init__(self, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        """``extra``: more ``redis-server`` arguments (``("--cluster-enabled", "yes")``).

        In cluster mode the bus port is a free port of its own (``--cluster-port``): Redis's
        default, the client port plus 10000, may be taken (a failed start, exit 1, seen in CI).
        """
        self.port = port or free_port()
        if "--cluster-enabled" in extra and "--cluster-port" not in extra:
            extra = (*extra, "--cluster-port", str(free_port()))
        self.extra = extra
        self._dir = Path(tempfile.mkdtemp(prefix="ps-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait for PING. In cluster mode a start that fails at once (its bus port
        taken since it was chosen) is tried again on a new bus port, twice; the client port,
        which a test may have read already, is kept."""
        for attempt in range(3):
            try:
                self._start_once(timeout)
                return
            except _ExitedError:
                if "--cluster-port" not in self.extra or attempt == 2:
                    raise
                extra = list(self.extra)
                extra[extra.index("--cluster-port") + 1] = str(free_port())
                self.extra = tuple(extra)

    def _log_tail(self) -> str:
        try:
            return (self._dir / "redis.log").read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"

    def _start_once(self, timeout: float) -> None:
        if self.running:
            return
        self._proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._dir),
                "--logfile",
                str(self._dir / "redis.log"),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise _ExitedError(
                    f"redis-server on port {self.port} exited with {self._proc.returncode}; "
                    f"its log ends: {self._log_tail()}"
                )
            if ping(self.port):
                return
            time.sleep(0.01)  # polling a condition (the server answering PING), bounded
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING in time")

    def stop(self) -> None:
        """Kill the server (SIGKILL: as abrupt as a crash; nothing is saved anyway)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def command(self, *args: str) -> bytes:
        """Send one command (inline form) and return the raw reply; for FLUSHALL, CLIENT KILL."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(" ".join(args).encode() + b"\r\n")
            return sock.recv(65536)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
