"""An aiohttp WebSocket as a gateway ``Sink``: frames coalesced per loop tick, written straight
to the transport.

A broadcast event is already encoded once (``Event.data``); here each recipient costs one header
of 2–10 bytes and a list append. The frames a connection is sent during one event-loop tick (an
action's ``action.result`` and ``scene.update``, say) leave in one ``transport.write``, so one
``send()`` system call, at the end of that tick: a ``FrameBatcher`` shared by all the sinks of a
server schedules a single flush per tick for every sink that has frames waiting. That adds no
delay beyond the current tick and halves the system calls of the benchmark's action (measured in
docs/benchmarks.md). No per-connection queue, no writer task, no copy of the payload before the
join.

This is the one piece of the WebSocket protocol written by hand (RFC 6455 §5.2: a server frame
is FIN + opcode, the payload length, the payload; never masked, never compressed here), because
going through aiohttp's per-message coroutine costs a task switch per recipient.

The bound on a slow client is the transport's write buffer plus what waits for this tick's flush
(at most ``EARLY_FLUSH_BYTES``: a larger burst is written at once): when more than
``max_buffer`` bytes are waiting for a client that does not read, it is closed with 4002 (it
will reconnect and resume) instead of growing the server's memory. Control frames (ping, pong,
close) stay with aiohttp, which writes them whole to the same transport; a close first flushes
what is waiting, so the close frame is always the last frame, and frames never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios
from collections.abc import Callable, Hashable
from typing import Any, Protocol

from aiohttp import WSMessage, WSMsgType, web

#: RFC 6455's policy violation: the close that earns a handshake cooldown (transport/guard.py).
POLICY_VIOLATION = 1008
#: The code aiohttp's ``close`` sets when no close frame came back from the peer.
ABNORMAL = 1006


class Penalizer(Protocol):
    def penalize(self, key: Hashable) -> None: ...


log = logging.getLogger(__name__)

_TEXT = 0x81  # FIN + opcode 1 (text)
#: Seconds a close handshake may go without progress (nothing of what waits for the peer, its
#: close frame included, taken by it; or, all taken, no answer) before the socket is aborted: a
#: peer that does not read would otherwise hold it open for ever.
CLOSE_TIMEOUT = 3.0
#: Seconds a close handshake may take in all while the peer keeps reading, slowly: a slow
#: consumer closed with 4002 that reads on gets its close frame (it got 1006 when the frames
#: before it took more than ``CLOSE_TIMEOUT`` to drain: narration probe).
CLOSE_PATIENCE = 30.0
#: Seconds between two looks at a closing connection's unsent bytes (``WebSocketSink._close``).
CLOSE_POLL = 0.25
#: ``ioctl`` asking a socket's bytes not yet taken by the peer (Linux ``SIOCOUTQ``); None where
#: unknown (then only the process's own buffer is looked at).
_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None)
#: Seconds a close decided while the handler handles one of the client's messages waits for that
#: handling to end before its frame goes out anyway (``WebSocketSink._handled_too_long``).
HANDLING_PATIENCE = 0.5
#: Frames waiting for the end of the tick are written at once when they reach this many bytes.
EARLY_FLUSH_BYTES = 64 * 1024


#: What the handler's ``receive()`` returns when this side closes the connection while the handler
#: waits for the client's next message (``WebSocketSink._stop_reading``).
STOP_READING = WSMessage(WSMsgType.ERROR, ConnectionAbortedError("closing"), None)


#: ``SO_LINGER`` on, with a zero timeout: ``close`` resets the connection and frees what the
#: kernel still held unsent for the peer.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


def reset_on_close(transport: asyncio.BaseTransport | None) -> None:
    """Make the socket's close a reset (RST) that discards what it still holds unsent. For a peer
    that does not read (a stuck client, a slow consumer let go, a heartbeat without pong): a
    plain close left the socket orphaned in the kernel, FIN-WAIT-1 with up to its whole send
    buffer (0.6–2.8 MB measured) for as long as the peer kept its end open, beyond any limit
    of the process (slow-clients probe: 200 such clients held about 135 MB of kernel memory)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        # (closed already, or not a TCP socket; uvloop's socket of a closed transport raises
        # ValueError, "negative file descriptor": memory probe, an ERROR per close)
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)


def drop(transport: asyncio.Transport) -> None:
    """Drop the socket now, discarding what it holds unsent, in the process and in the kernel."""
    reset_on_close(transport)
    transport.abort()


class DroppingWebSocketResponse(web.WebSocketResponse):
    """aiohttp's ``WebSocketResponse`` whose heartbeat, when no pong comes, drops the socket with
    a reset (``reset_on_close``) instead of closing it with its unsent frames still queued in the
    kernel for a peer that does not read. Leans on aiohttp's ``_handle_ping_pong_exception``
    (3.10+), the one place its heartbeat closes the transport; tests/security/
    test_slow_clients.py fails if it stops being called."""

    def _handle_ping_pong_exception(self, exc: BaseException) -> None:
        if isinstance(exc, TimeoutError) and self._req is not None:
            reset_on_close(self._req.transport)
        super()._handle_ping_pong_exception(exc)


class _MeteredReader:
    """aiohttp's WebSocket reader with every chunk the socket gives counted before it is parsed:
    ``admit(size)`` False, and that chunk is not parsed (``admit`` refuses every later one too:
    the connection is closing). aiohttp parses control and continuation frames itself, unseen by
    ``receive()``: only the bytes tell a flood of them."""

    __slots__ = ("_admit", "_reader")

    def __init__(self, reader: Any, admit: Callable[[int], bool]) -> None:
        self._reader = reader
        self._admit = admit

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if not self._admit(len(data)):
            return False, b""
        result: tuple[bool, bytes] = self._reader.feed_data(data)
        return result

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


def meter_reading(request: web.Request, admit: Callable[[int], bool]) -> bool:
    """Count what a prepared WebSocket's client sends from now on (``_MeteredReader``; ``admit``
    False once, False for good). Leans on
    aiohttp's ``RequestHandler._payload_parser`` (3.9+: the reader ``WebSocketResponse.prepare``
    gives ``set_parser``, fed by ``data_received``); False, and nothing counted, if that is not
    there. tests/adapters/test_bad_input.py's continuation-frame flood fails if it stops being
    counted."""
    protocol = request.protocol
    reader = getattr(protocol, "_payload_parser", None)
    if reader is None or not callable(getattr(reader, "feed_data", None)):
        return False
    protocol._payload_parser = _MeteredReader(reader, admit)
    return True


def frame_header(length: int) -> bytes:
    """The header of an unmasked, final text frame carrying ``length`` bytes (RFC 6455 §5.2)."""
    if length < 126:
        return bytes((_TEXT, length))
    if length < 65536:
        return struct.pack("!BBH", _TEXT, 126, length)
    return struct.pack("!BBQ", _TEXT, 127, length)


class FrameBatcher:
    """One flush per event-loop tick for every sink that was given frames during the tick.

    ``delay`` (``client_write_delay``, seconds; 0 = the end of the tick): the flush waits that
    long after the first frame of a batch, so that what follows in the next moments (the frames
    of the party's other actions) leaves in the same write. Fewer system calls per message under
    load, for up to ``delay`` more latency (measured: bench/analysis.md §21).
    """

    __slots__ = ("_delay", "_dirty")

    def __init__(self, delay: float = 0.0) -> None:
        self._delay = delay
        self._dirty: list[WebSocketSink] = []

    def mark(self, sink: WebSocketSink) -> None:
        if not self._dirty:
            if self._delay > 0:
                asyncio.get_running_loop().call_later(self._delay, self.flush)
            else:
                asyncio.get_running_loop().call_soon(self.flush)
        self._dirty.append(sink)

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for sink in dirty:
            try:
                sink.flush()
            except Exception:  # one broken connection must not keep the others' frames back
                log.exception("websocket write failed")


class WebSocketSink:
    __slots__ = (
        "_batcher",
        "_close_by",
        "_close_task",
        "_closing",
        "_deferred",
        "_guard",
        "_max_buffer",
        "_pending",
        "_pending_bytes",
        "_stuck_since",
        "_transport",
        "_user",
        "_ws",
        "close_code",
        "handling",
        "reading",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        max_buffer: int,
        batcher: FrameBatcher | None = None,
        guard: Penalizer | None = None,
        user: Hashable = None,
        close_by: Callable[[], float | None] = lambda: None,
    ) -> None:
        """``guard``/``user``: a close with 1008 calls ``guard.penalize(user)`` before the close
        frame leaves, so that the client's next handshake, however quick, meets the cooldown.
        ``close_by``: the loop time a drain must end by, once one began (else None)."""
        self._close_by = close_by
        self._guard = guard
        self._user = user
        self._ws = ws
        self._transport = transport
        self._max_buffer = max_buffer
        self._batcher = batcher or FrameBatcher()
        self._pending: list[bytes] | None = None  # frames of this tick, header and payload
        self._pending_bytes = 0
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        #: The close frame's reason, when the close was left to the handler (``reading``)
        self._deferred: bytes | None = None
        #: True while the connection's handler handles a message of the client (not waiting in
        #: ``receive``): a close decided meanwhile starts when it stops reading
        #: (``reading_stopped``)
        self.handling = False
        #: True while the connection's handler runs its read loop (``websocket`` in http.py):
        #: a close decided meanwhile is started by the handler once it stops reading, so that
        #: it reads on until the client's close frame
        self.reading = False
        self.close_code: int | None = None  # the code this side closed with, if it did
        self._stuck_since: float | None = None  # when the buffer was first seen over its mark

    def not_reading(self, now: float, patience: float) -> bool:
        """True when the peer has not taken what this side writes for ``patience`` seconds:
        the transport's buffer over its high-water mark at every look since (``ReaderWatch``).

        ``send`` sees a client that does not read only when the server writes frames of its
        own; a peer that floods pings and never reads is written only aiohttp's pongs, whose
        drain then blocks aiohttp's reading as well: nothing else would ever end it. (aiohttp's
        heartbeat, when its period is short, does close the transport, but a close waits for the
        buffer to drain, which such a peer never lets happen: a closing transport counts too.)"""
        transport = self._transport
        if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]:
            self._stuck_since = None
            return False
        if self._stuck_since is None:
            self._stuck_since = now
        return now - self._stuck_since >= patience

    @property
    def lost(self) -> bool:
        return self._transport.is_closing() and not self._closing

    def send(self, data: bytes) -> bool:
        transport = self._transport
        if self._closing or transport.is_closing():
            return False
        if transport.get_write_buffer_size() + self._pending_bytes > self._max_buffer:
            return False  # the client has not read that much: the session closes it (4002)
        size = len(data)
        pending = self._pending
        if pending is None:
            pending = self._pending = []
            self._batcher.mark(self)
        pending.append(frame_header(size))
        pending.append(data)
        self._pending_bytes += size
        if self._pending_bytes >= EARLY_FLUSH_BYTES:  # a burst (a resume replay): let the socket
            self.flush()  # take it now, as without coalescing, instead of holding it all
        return True

    def flush(self) -> None:
        """Write the frames waiting since the tick began, in one ``transport.write``."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        self._pending_bytes = 0
        if not self._transport.is_closing():
            self._transport.write(b"".join(pending))

    def close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self.flush()  # what was sent before the close goes out before the close frame
        self._closing = True
        self.close_code = code
        if code == POLICY_VIOLATION and self._guard is not None:
            self._guard.penalize(self._user)
        if self.reading:
            # The handler's read loop is running (``handling`` is only ever set within it): it
            # starts the close once it stops reading (``reading_stopped``), and aiohttp's close
            # then reads what the client still sends until its close frame. A close() from
            # another task while receive() waits wakes it, and aiohttp then closes the socket at
            # once: with the client's frames still arriving, the kernel answers them with a
            # reset, and the client loses what it had not read yet, this side's close frame
            # included (a flood's 1008, an operator's 4004 arrived as 1006).
            self._deferred = reason.encode()[:120]
            if not self.handling:  # it waits in receive() (or is about to): wake it
                self._stop_reading()
            else:  # it handles a message: a moment, not the whole of a slow call
                asyncio.get_running_loop().call_later(HANDLING_PATIENCE, self._handled_too_long)
            return
        self._start_close(code, reason.encode()[:120])

    def _handled_too_long(self) -> None:
        """The handler still handles the message it had when the close was decided (a call on a
        stalled Redis waits up to its command timeout, 5 s): the close frame goes out now, and
        aiohttp's close reads on until the client's (what the client sends meanwhile is dropped,
        as after any close frame). A drain's 1001 waited for that call: with a
        ``shutdown_timeout`` below the command timeout, players got no close frame at all
        (1006), and a worker of ``--workers`` overran its budget (workers probe)."""
        if self.handling:
            self._start_close_deferred()

    def _stop_reading(self) -> None:
        """Make the handler's pending (or next) ``receive()`` return ``STOP_READING``, after
        the messages aiohttp has already parsed.

        This is the one place that leans on aiohttp's internals: the response's message queue
        (``_reader``, a ``WebSocketDataQueue``, whose ``feed_data(message, size)`` is how
        aiohttp's own ``close()`` wakes a waiting ``receive()``). An ``ERROR`` message is
        returned to the caller as it is. Guarded by
        tests/adapters/test_bad_input.py (closes decided while the handler waits)."""
        reader = getattr(self._ws, "_reader", None)
        if reader is None:  # not prepared (cannot happen once the handler reads): close now
            self._start_close_deferred()
            return
        reader.feed_data(STOP_READING, 0)
        # A handler that never gets back to receive() (stuck in aiohttp's pong drain under a
        # peer that does not read) would never start the close: the socket is aborted then.
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._still_reading)

    def _still_reading(self) -> None:
        if self.reading:
            drop(self._transport)

    def _start_close_deferred(self) -> None:
        if self._deferred is not None and self.close_code is not None:
            reason, self._deferred = self._deferred, None
            self.flush()
            self._start_close(self.close_code, reason)

    def _start_close(self, code: int, reason: bytes) -> None:
        self._close_task = asyncio.get_running_loop().create_task(self._close(code, reason))

    @property
    def closing(self) -> bool:
        """This side began to close the connection, or its transport is closing."""
        return self._closing or self._transport.is_closing()

    def abort(self) -> None:
        """Drop the socket now (what it holds unsent is discarded): the read loop ends."""
        drop(self._transport)

    def _unsent(self) -> int:
        """Bytes written for the peer that it has not taken yet: the transport's buffer, plus
        the kernel's send queue where the system says (Linux)."""
        size = self._transport.get_write_buffer_size()
        sock = self._transport.get_extra_info("socket")
        if _OUTQ is None or sock is None:
            return size
        try:
            queued = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
        except (OSError, ValueError):  # (closed already, or not a socket that says)
            return size
        return size + int(struct.unpack("i", queued)[0])

    async def _close(self, code: int, reason: bytes) -> None:
        """The close handshake, bounded: aiohttp's ``close`` waits for the close frame to drain
        without a limit, and a client that does not read (the reason for a 4002) never takes
        it; the handler's read loop would then never end, and the connection, its user's slot
        and its descriptor would stay. The socket is aborted, which ends the read loop and so
        the session, once ``CLOSE_TIMEOUT`` passes without the peer taking any of what waits
        for it (a peer whose kernel took everything, close frame included, has that long to
        answer), ``CLOSE_PATIENCE`` in all, and never past the end of a drain (``close_by``)."""
        loop = asyncio.get_running_loop()
        closing = loop.create_task(self._ws.close(code=code, message=reason))
        started = loop.time()
        give_up = started + CLOSE_PATIENCE
        left = self._unsent()
        # when the peer last took something (or the close began): once it has taken everything,
        # close frame included, its answer has CLOSE_TIMEOUT from then. Looked at every
        # CLOSE_POLL: measured in whole windows of CLOSE_TIMEOUT, a peer that took its close
        # frame in the first one waited a second window, 6 s, not the 3 s docs/protocol.md says,
        # while a flooder's bytes were read and dropped (security probe)
        moved = started
        try:
            while True:
                wait = CLOSE_POLL
                drained_by = self._close_by()
                if drained_by is not None:  # (a close never outlasts the drain's budget)
                    wait = max(0.0, min(wait, drained_by - loop.time()))
                await asyncio.wait({closing}, timeout=wait)
                if closing.done():
                    closing.result()
                    if self._ws.close_code == ABNORMAL:
                        # aiohttp gave up on the peer (its writer failed) and closed the
                        # transport: nothing it held may stay queued in the kernel
                        drop(self._transport)
                    return
                now, now_left = loop.time(), self._unsent()
                if now_left < left:
                    moved = now
                left = now_left
                drained_by = self._close_by()  # a drain's end, if one began
                if (
                    now - moved >= CLOSE_TIMEOUT  # took nothing more (a frozen peer), or no answer
                    or now >= give_up  # it takes what waits, far too slowly
                    or (drained_by is not None and now >= drained_by)
                ):
                    break
            self._let_go()
        except asyncio.CancelledError:  # stop() gave up waiting for it: the same end
            drop(self._transport)
            raise
        except (ConnectionError, RuntimeError):
            pass  # the peer is gone already
        except Exception:
            log.exception("websocket close failed")
            drop(self._transport)
        finally:
            if not closing.done():
                closing.cancel()
                await asyncio.wait({closing})
            if not closing.cancelled():
                closing.exception()  # (retrieved: its end was this one's)

    def _let_go(self) -> None:
        """End a close handshake that got no answer in time. With nothing left unsent (the
        peer's system took it all, close frame included), a plain close: the peer reads on to
        its close frame, then the end (a FIN; or a reset if it sent bytes this side never read).
        A reset would have made an asyncio client, reading the tail from its own buffer
        slower than ``CLOSE_TIMEOUT``, drop that tail with the close code in it (1006 instead:
        a probe's slow reader; asyncio's ``StreamReader`` raises a reset before what it holds).
        With bytes still unsent, a reset (``drop``): nothing waits in the kernel for a peer that
        stopped taking them."""
        if _OUTQ is not None and self._unsent() == 0:  # (where the kernel can say so)
            self._transport.close()
        else:
            drop(self._transport)

    def reading_stopped(self) -> None:
        """The handler reads no more (its loop ended): a close it left for this (``reading``)
        starts now, in a task of its own, so its frame does not wait for the rest
        of the handler's cleanup (a backend round trip, or several through a stall)."""
        self.reading = False
        self._start_close_deferred()

    async def stop(self) -> None:
        """The connection is over: flush, let a pending close frame go out (bounded), stop."""
        self.reading_stopped()  # (the handler says so first; this is for any other caller)
        self.flush()
        task = self._close_task
        if task is not None and not task.done():
            with contextlib.suppress(asyncio.TimeoutError):  # _close is bounded: CLOSE_PATIENCE
                await asyncio.wait_for(asyncio.shield(task), timeout=CLOSE_PATIENCE + 1.0)
            if not task.done():
                task.cancel()  # _close aborts the socket on its way out
                await asyncio.wait({task}, timeout=1.0)  # (a cancel of stop() itself propagates)
