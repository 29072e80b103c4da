"""Slow and never-finishing clients: each is bounded, and a neighbour is still served.

- a WebSocket client that never reads is closed with 4002 once ``send_buffer_bytes`` wait for it;
- a client that sends half a frame, or completes the handshake and then never answers a ping,
  is closed by the heartbeat;
- sockets that send nothing, half a request line, half the headers, or one header now and then
  are closed by ``request_head_timeout``; an idle keep-alive connection by ``keepalive_timeout``;
- over ``max_connections_per_ip`` a new socket is closed at once, and served again once others
  closed.

Every wait is bounded and waits for a condition (bytes, EOF, a metric), never for time to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ps_testkit.client import Client, wait_until
from ps_testkit.cluster import wait_async
from ps_testkit.engines import ScriptedEngine
from ps_testkit.security_raw import (
    Raw,
    client_frame,
    close_code,
    read_frame,
    request_head,
    ws_open,
)
from ps_testkit.servers import Running, make_settings, serve_in_process, token

KEY = "api-key-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEAD_TIMEOUT = 1.0
HEARTBEAT = 0.5


@pytest.fixture
async def srv() -> AsyncIterator[Running]:
    settings = make_settings(
        api_key=KEY,
        send_buffer_bytes=65536,
        heartbeat=HEARTBEAT,
        request_head_timeout=HEAD_TIMEOUT,
        keepalive_timeout=HEAD_TIMEOUT,
        rate_limit=1000.0,
        rate_burst=1000.0,
    )
    async with serve_in_process(settings, engine=ScriptedEngine()) as running:
        yield running


class Neighbour:
    """A well-behaved member that reads everything, in a task."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.seen: list[dict[str, Any]] = []
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                self.seen.append(await self.client.recv(timeout=60))

    async def served(self, srv: Running, marker: str) -> None:
        """An event published now reaches this neighbour (bounded)."""
        await publish(srv, marker, 16)
        await wait_until(lambda: _has(self.seen, marker), timeout=10)

    async def close(self) -> None:
        self.task.cancel()
        await self.client.close()


def _has(seen: list[dict[str, Any]], marker: str) -> bool:
    return any(m["type"] == "party.state" and m["payload"]["status"] == marker for m in seen)


async def publish(srv: Running, marker: str, size: int) -> None:
    event = {
        "type": "party.state",
        "payload": {"status": marker, "run_status": "in_progress", "flags": {"pad": "x" * size}},
    }
    url = srv.base + "/api/v1/parties/p1/events"
    async with srv.http.post(url, json=event, headers=AUTH) as resp:
        assert resp.status == 202, await resp.text()


async def flooded(srv: Running, character: str) -> Any:
    """Big events for ``character``'s party until the server closed its session (slow)."""
    assert srv.server is not None
    gateway = srv.server.gateway
    await wait_until(lambda: any(x.character_id == character for x in gateway.sessions))
    session = next(x for x in gateway.sessions if x.character_id == character)
    for i in range(400):  # at most ~24 MB: far past any socket buffer on loopback
        await publish(srv, f"flood-{i}", 60_000)
        if session.closed:
            break
    # the last frames leave at the end of a loop tick: the close may follow the last publish
    await wait_until(lambda: session.closed, timeout=10)
    return session


async def test_a_client_that_never_reads_is_closed_with_4002_and_the_neighbour_is_served(
    srv: Running,
) -> None:
    neighbour = Neighbour((await srv.join("borin"))[0])
    slow = await ws_open(srv.base, "/ws?token=" + token("aria"), rcvbuf=4096)
    try:
        assert srv.server is not None
        gateway = srv.server.gateway
        await flooded(srv, "aria")
        await neighbour.served(srv, "after-flood")
        assert await close_code(slow, timeout=20) == 4002
        await slow.write(client_frame(b"\x0f\xa2", opcode=0x8))  # its answer, as a client's
        closes = gateway.metrics.registry.get_sample_value  # counted once the session ended
        await wait_until(lambda: closes("party_sync_closes_total", {"code": "4002"}) == 1.0)
    finally:
        await slow.close()
        await neighbour.close()


async def test_a_slow_client_that_reads_on_gets_its_4002_however_long_the_backlog_takes(
    srv: Running,
) -> None:
    """Narration probe: a client that reads all the time, only too slowly, was cut without its
    close frame (1006) in most runs: the whole close handshake had ``sink.CLOSE_TIMEOUT``, and
    the frames queued before the close frame (the send buffer, the kernel's) took longer than
    that to drain at its pace. The close now waits while the client takes what waits for it,
    so it gets the 4002 that docs/protocol.md promises (and resumes)."""
    # (a reader that buffers little: what it has not read stays queued in the server's socket)
    slow = await ws_open(srv.base, "/ws?token=" + token("aria"), rcvbuf=4096, limit=1 << 16)
    try:
        assert srv.server is not None
        gateway = srv.server.gateway
        await flooded(srv, "aria")
        code = None
        async with asyncio.timeout(60):
            while code is None:
                frame = await read_frame(slow.reader)
                if frame.opcode == 0x8:
                    code = frame.close_code
                await asyncio.sleep(0.1)  # a slow link: about 0.6 MB/s (pacing, not a wait)
        assert code == 4002
        await slow.write(client_frame(b"\x0f\xa2", opcode=0x8))
        closes = gateway.metrics.registry.get_sample_value  # counted once the session ended
        await wait_until(lambda: closes("party_sync_closes_total", {"code": "4002"}) == 1.0)
    finally:
        await slow.close()


async def test_a_slow_client_whose_own_buffer_holds_the_close_for_long_still_reads_its_4002(
    srv: Running,
) -> None:
    """Re-check probe: a client whose system had taken everything, close frame included, but
    which read its own buffer slower than ``sink.CLOSE_TIMEOUT`` got a reset 3 s later, and an
    asyncio client drops what it holds unread at a reset (its ``StreamReader`` raises the reset
    first): 1006, the frames before the close lost. With nothing left unsent, the server's end
    is a plain close now (FIN): the client reads on, to its 4002."""
    # an asyncio reader buffering megabytes (``limit``), read one frame per 0.05 s: the last
    # frames wait in the client's own buffer for seconds after the server's socket sent them
    slow = await ws_open(srv.base, "/ws?token=" + token("aria"), rcvbuf=4096, limit=1 << 22)
    try:
        assert srv.server is not None
        await flooded(srv, "aria")
        code, frames = None, 0
        async with asyncio.timeout(90):
            while code is None:
                frame = await read_frame(slow.reader)  # (a reset: ConnectionResetError)
                frames += 1
                if frame.opcode == 0x8:
                    code = frame.close_code
                await asyncio.sleep(0.05)  # a slow reader (pacing, not a wait)
        assert code == 4002, frames
    finally:
        await slow.close()


async def test_a_client_that_never_reads_is_let_go_without_reading_and_its_slot_is_free(
    srv: Running,
) -> None:
    """The close frame of a 4002 cannot drain to a client that does not read: the close is
    bounded (``sink.CLOSE_TIMEOUT``), then the socket is aborted, so the session ends, its
    connection and its user's slot are given back, while the client still has not read a
    byte (the test above reads before it checks, which would let a stuck close drain)."""
    from party_sync.transport.http import GUARD

    slow = await ws_open(srv.base, "/ws?token=" + token("aria"), rcvbuf=4096)
    slow.writer.transport.pause_reading()  # type: ignore[attr-defined]  # not even buffered
    try:
        assert srv.server is not None
        gateway, guard = srv.server.gateway, srv.server.app[GUARD]
        session = await flooded(srv, "aria")
        # nothing read from ``slow`` since: the server lets it go by itself
        await wait_until(lambda: session not in gateway.sessions, timeout=20)
        closes = gateway.metrics.registry.get_sample_value
        await wait_until(lambda: closes("party_sync_closes_total", {"code": "4002"}) == 1.0, 10)
        await wait_until(lambda: guard.users.total == 0, timeout=10)  # aria's slot is free
        # dropped with a reset: nothing queued for it stays behind in the kernel either
        await wait_until(lambda: not unsent_orphans(srv.base), timeout=5)
    finally:
        await slow.close()


def unsent_orphans(base: str) -> list[str]:
    """The server's sockets on ``base``'s port in FIN-WAIT-1 that still hold unsent bytes
    (``/proc/net/tcp``): a socket closed with data queued for a peer that does not read."""
    port = int(base.rsplit(":", 1)[1].split("/")[0])
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        fin_wait_1 = state == "04"
        if int(local.split(":")[1], 16) == port and fin_wait_1 and int(queues.split(":")[0], 16):
            found.append(line)
    return found


async def test_a_client_that_reads_nothing_is_dropped_by_the_heartbeat_with_nothing_left(
    srv: Running,
) -> None:
    """No pong and no reads, with events queued for it (less than the send buffer, so no 4002):
    the heartbeat drops it, counted as 1006, and the socket leaves nothing behind in the kernel
    (it stayed orphaned in FIN-WAIT-1 with its unsent events for as long as the peer kept its
    end open: slow-clients probe, about 676 KB each, the process's limits not counting it)."""
    stuck = await ws_open(srv.base, "/ws?token=" + token("aria"), rcvbuf=4096)
    stuck.writer.transport.pause_reading()  # type: ignore[attr-defined]  # not even buffered
    try:
        assert srv.server is not None
        gateway = srv.server.gateway
        await wait_until(lambda: any(x.character_id == "aria" for x in gateway.sessions))
        for i in range(10):  # ~100 KB: queued in the kernel, far under the send buffer
            await publish(srv, f"queued-{i}", 10_000)
        await wait_until(lambda: not gateway.sessions, timeout=10 * HEARTBEAT)
        closes = gateway.metrics.registry.get_sample_value
        await wait_until(lambda: closes("party_sync_closes_total", {"code": "1006"}) == 1.0)
        await wait_until(lambda: not unsent_orphans(srv.base), timeout=5)
    finally:
        await stuck.close()


async def test_a_ping_flood_then_a_reset_is_no_error_and_others_are_served(srv: Running) -> None:
    """Pings sent without reading the pongs until the socket blocks, then a reset (RST): the
    pong owed (or the close a flood earns: pings count as messages) finds the connection lost;
    that is the peer leaving, not an ERROR. (Two players: a flood's 1008 refuses its user's
    next handshakes for a while.)"""
    import socket
    import struct

    from ps_testkit.security_raw import capture_logs

    neighbour = Neighbour((await srv.join("borin"))[0])
    ping = client_frame(b"P" * 125, opcode=0x9)
    with capture_logs(logging.WARNING) as logs:
        for character in ("aria", "dara"):
            flood = await ws_open(srv.base, "/ws?token=" + token(character), rcvbuf=4096)
            sock = flood.writer.get_extra_info("socket")
            flood.writer.transport.pause_reading()  # type: ignore[attr-defined]  # no pong read
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(3):  # until the server stops reading us
                    while True:
                        await flood.write(ping * 200)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            flood.writer.transport.abort()  # RST
        await neighbour.served(srv, "after-ping-flood")
        assert srv.server is not None
        gateway = srv.server.gateway
        await wait_until(
            lambda: not any(x.character_id in ("aria", "dara") for x in gateway.sessions)
        )
    assert logs.errors() == []
    await neighbour.close()


async def test_half_a_frame_is_closed_by_the_heartbeat_and_the_neighbour_is_served(
    srv: Running,
) -> None:
    neighbour = Neighbour((await srv.join("borin"))[0])
    half = await ws_open(srv.base, "/ws?token=" + token("aria"))
    silent = await ws_open(srv.base, "/ws?token=" + token("cato"))  # never answers a ping
    try:
        frame = client_frame(b'{"type": "action.request", "payload": {}}', length=1000)
        await half.write(frame[:30])
        await neighbour.served(srv, "during-half-frame")
        assert await half.eof(timeout=10 * HEARTBEAT), "a half frame held the connection open"
        assert await silent.eof(timeout=10 * HEARTBEAT), "a client without pongs stayed open"
        await neighbour.served(srv, "after-half-frame")
    finally:
        await half.close()
        await silent.close()
        await neighbour.close()


INCOMPLETE_HEADS = {
    "nothing": b"",
    "half a request line": b"GET /heal",
    "half the headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Partial: ab",
    "a request line without its headers' end": b"POST /api/v1/parties/p1/events HTTP/1.1\r\n",
}


@pytest.mark.parametrize("name", list(INCOMPLETE_HEADS))
async def test_an_unfinished_request_head_is_closed_after_the_head_timeout(
    srv: Running, name: str
) -> None:
    raw = await Raw.open(srv.base)
    try:
        if INCOMPLETE_HEADS[name]:
            await raw.write(INCOMPLETE_HEADS[name])
        assert await raw.eof(timeout=5 * HEAD_TIMEOUT), f"{name}: still open"
        async with srv.http.get(srv.base + "/healthz") as resp:
            assert resp.status == 200
    finally:
        await raw.close()


async def test_one_header_now_and_then_does_not_extend_the_head_deadline(srv: Running) -> None:
    """Slowloris: a header line every HEAD_TIMEOUT/4 seconds; the deadline is for the whole head."""
    raw = await Raw.open(srv.base)
    try:
        await raw.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for i in range(40):  # 10 head timeouts at most
            if await raw.eof(timeout=HEAD_TIMEOUT / 4):
                closed = True
                break
            with contextlib.suppress(ConnectionError):
                await raw.write(f"X-Slow-{i}: y\r\n".encode())
        assert closed, "a trickle of headers kept the connection open"
    finally:
        await raw.close()


async def test_an_idle_keep_alive_connection_is_closed(srv: Running) -> None:
    raw = await Raw.open(srv.base)
    try:
        await raw.write(request_head("GET", "/healthz"))
        status, _, _ = await raw.response()
        assert status == 200
        assert await raw.eof(timeout=5 * HEAD_TIMEOUT), "an idle keep-alive connection stayed"
    finally:
        await raw.close()


async def test_a_websocket_is_not_cut_by_the_head_or_keep_alive_deadlines(srv: Running) -> None:
    """The deadlines are for unfinished requests; an upgraded, live WebSocket answers pings."""
    player = Neighbour((await srv.join("aria"))[0])  # reads (and so answers pings) all along
    neighbour = Neighbour((await srv.join("borin"))[0])
    try:
        for i in range(2):  # let two head deadlines pass: an idle socket is closed each time
            idle = await Raw.open(srv.base)
            assert await idle.eof(timeout=5 * HEAD_TIMEOUT)
            await idle.close()
            await neighbour.served(srv, f"still-{i}")
        await player.client.act("alive-1", "aria", "r1")
        await wait_until(
            lambda: any(
                m["type"] == "action.result" and m["payload"]["action_id"] == "alive-1"
                for m in player.seen
            ),
            timeout=10,
        )
    finally:
        await player.close()
        await neighbour.close()


async def test_over_the_per_address_cap_a_new_socket_is_closed_at_once() -> None:
    settings = make_settings(max_connections_per_ip=4, request_head_timeout=30.0)
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        held = [await Raw.open(srv.base) for _ in range(4)]
        extra = await Raw.open(srv.base)
        try:
            assert await extra.eof(timeout=5), "a fifth socket from one address was kept"
            await held.pop().close()

            async def served() -> bool:
                raw = await Raw.open(srv.base)
                try:
                    await raw.write(request_head("GET", "/healthz"))
                    try:
                        status, _, _ = await raw.response(timeout=2)
                    except (ConnectionError, asyncio.IncompleteReadError):
                        return False
                    return status == 200
                finally:
                    await raw.close()

            await wait_async(served, timeout=5)
        finally:
            for raw in [*held, extra]:
                await raw.close()
