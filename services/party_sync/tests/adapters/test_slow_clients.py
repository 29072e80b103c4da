"""Slow and greedy clients: a request head that never completes, an idle keep-alive connection,
and too many connections from one address or one user are all bounded, while an upgraded
WebSocket stays open and a neighbour is served throughout.

Real sockets against the real server on loopback. A neighbour on 127.0.0.2 is another client
address (Linux routes all of 127/8 to the loopback interface). Waits are bounded waits on a
condition (the server closing a socket, a counter); the bounds are generous and never measure
speed: without the limits these sockets stay open for an hour (aiohttp's default keep-alive)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from party_sync.auth import Claims, issue_token
from party_sync.config import load
from party_sync.protocol.errors import ConfigError
from party_sync.transport.edge import edge_middleware
from party_sync.transport.guard import (
    POLICY_COOLDOWN,
    ConnectionGuard,
    GuardedConnection,
    Tally,
    address_key,
    guarded_connection,
    user_key,
)
from party_sync.transport.http import GUARD
from ps_testkit.client import Client, wait_until
from ps_testkit.servers import SECRET, Running, make_settings, serve_in_process, token

#: Generous bound on "the server closes this socket" (the limits under test are 0.5 s).
CLOSED_WITHIN = 10.0
NEIGHBOUR = "127.0.0.2"
GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: party\r\n\r\n"

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def guard_of(srv: Running) -> ConnectionGuard:
    assert srv.server is not None
    return srv.server.app[GUARD]


def refused(srv: Running, reason: str) -> float:
    assert srv.server is not None
    value = srv.server.gateway.metrics.registry.get_sample_value(
        "party_sync_connections_refused_total", {"reason": reason}
    )
    return value or 0.0


def port_of(srv: Running) -> int:
    return int(srv.base.rsplit(":", 1)[1])


async def open_raw(srv: Running, source: str = "127.0.0.1") -> Stream:
    return await asyncio.open_connection("127.0.0.1", port_of(srv), local_addr=(source, 0))


async def closed_by_server(reader: asyncio.StreamReader, within: float = CLOSED_WITHIN) -> bytes:
    """Everything the server sent until it closed the socket; fails if it is still open."""
    received = b""
    async with asyncio.timeout(within):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: its status and body."""
    async with asyncio.timeout(CLOSED_WITHIN):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next(
            int(line.split(":", 1)[1])
            for line in lines
            if line.lower().startswith("content-length")
        )
        return int(lines[0].split()[1]), await reader.readexactly(length)


async def served_on_a_new_socket(srv: Running) -> Stream:
    """A new raw socket whose first request (``GET_HEALTHZ``) was answered 200. Once in CI
    (one full run of many; not reproduced in about 170 runs of it under CPU load) the loopback
    socket of this exchange was reset before its answer could be read; a reset there says
    nothing about what these tests check (what the server does *after* an answer), so the
    exchange is tried once more on another socket. A server that resets it every time fails."""
    for attempt in (1, 2):
        reader, writer = await open_raw(srv)
        writer.write(GET_HEALTHZ)
        try:
            status, _ = await read_response(reader)
        except ConnectionResetError:
            await close_quietly(writer)
            if attempt == 2:
                raise
            continue
        assert status == 200
        return reader, writer
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def neighbour_session() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(local_addr=(NEIGHBOUR, 0))
    async with aiohttp.ClientSession(connector=connector) as http:
        yield http


async def neighbour_served(srv: Running, http: aiohttp.ClientSession) -> None:
    async with http.get(srv.base + "/healthz") as resp:
        assert resp.status == 200


async def upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, who: str) -> None:
    """A WebSocket handshake by hand on a raw socket, as ``who``: answered 101."""
    writer.write(
        f"GET /ws?token={token(who)} HTTP/1.1\r\nHost: party\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    async with asyncio.timeout(CLOSED_WITHIN):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def trickle(writer: asyncio.StreamWriter, every: float = 0.3) -> None:
    """Slowloris: a request line, then one more header every ``every`` seconds, never the end."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: party\r\n")
    n = 0
    with contextlib.suppress(ConnectionError):
        while not writer.is_closing():
            await writer.drain()
            await asyncio.sleep(every)  # the attack's pace, not a synchronisation
            n += 1
            writer.write(f"X-Slow-{n}: {n}\r\n".encode())


# -- the request head ------------------------------------------------------------------------


async def test_a_request_head_that_never_completes_is_closed_and_neighbours_are_served() -> None:
    settings = make_settings(request_head_timeout=0.5, keepalive_timeout=30.0)
    async with serve_in_process(settings) as srv, neighbour_session() as http:
        silent = await open_raw(srv)
        half_line = await open_raw(srv)
        half_line[1].write(b"GET /heal")
        half_headers = await open_raw(srv)
        half_headers[1].write(b"GET /healthz HTTP/1.1\r\nHost: party\r\nX-Half: ")
        slow = await open_raw(srv)
        pace = asyncio.create_task(trickle(slow[1]))
        await neighbour_served(srv, http)
        for reader, writer in (silent, half_line, half_headers, slow):
            assert await closed_by_server(reader) == b""  # closed, nothing answered
            await close_quietly(writer)
        await pace
        assert refused(srv, "head_timeout") == 4
        await neighbour_served(srv, http)
        await wait_until(lambda: guard_of(srv).addresses.count("127.0.0.1") == 0)


async def test_the_next_request_on_a_keep_alive_connection_has_its_own_head_deadline() -> None:
    # keep-alive 30 s: only the head deadline, armed by the second request's first byte, can
    # close this connection.
    settings = make_settings(request_head_timeout=0.5, keepalive_timeout=30.0)
    async with serve_in_process(settings) as srv:
        reader, writer = await served_on_a_new_socket(srv)
        writer.write(GET_HEALTHZ)  # a second complete request is served as usual
        assert (await read_response(reader))[0] == 200
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: ")
        assert await closed_by_server(reader) == b""
        assert refused(srv, "head_timeout") == 1
        await close_quietly(writer)


async def test_an_idle_keep_alive_connection_is_closed() -> None:
    settings = make_settings(request_head_timeout=30.0, keepalive_timeout=0.5)
    async with serve_in_process(settings) as srv:
        reader, writer = await served_on_a_new_socket(srv)
        assert await closed_by_server(reader) == b""
        assert refused(srv, "head_timeout") == 0  # the idle timeout, not the head deadline
        await close_quietly(writer)


async def test_an_idle_websocket_outlives_both_timeouts() -> None:
    settings = make_settings(request_head_timeout=0.5, keepalive_timeout=0.5, heartbeat=60.0)
    async with serve_in_process(settings) as srv:
        aria, _ = await srv.join("aria")
        # Both timeouts have passed for sockets opened after aria's: she has been idle longer.
        silent, silent_writer = await open_raw(srv)
        idle, idle_writer = await open_raw(srv)
        idle_writer.write(GET_HEALTHZ)
        assert (await read_response(idle))[0] == 200
        assert await closed_by_server(silent) == b""
        assert await closed_by_server(idle) == b""
        await aria.send("{not json")  # still open, still served
        assert (await aria.until("system.error"))["payload"]["code"] == "bad_json"
        await aria.close()
        for writer in (silent_writer, idle_writer):
            await close_quietly(writer)


# -- per address -----------------------------------------------------------------------------


async def test_the_connection_over_the_per_address_cap_is_closed_at_once() -> None:
    settings = make_settings(max_connections_per_ip=3, request_head_timeout=30.0)
    async with serve_in_process(settings) as srv, neighbour_session() as http:
        guard = guard_of(srv)
        held = [await open_raw(srv) for _ in range(3)]
        await wait_until(lambda: guard.addresses.count("127.0.0.1") == 3)
        reader, writer = await open_raw(srv)  # the kernel accepts; the server closes it
        writer.write(GET_HEALTHZ)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        assert await closed_by_server(reader) == b""  # no answer: nothing was parsed
        await close_quietly(writer)
        assert refused(srv, "per_address") == 1
        await neighbour_served(srv, http)  # another address is not affected
        # A WebSocket over the cap is refused the same way.
        with pytest.raises(aiohttp.ClientError):
            await srv.connect("aria")
        assert refused(srv, "per_address") >= 2  # (aiohttp's client may try twice)
        # One closes: the address may open one more.
        await close_quietly(held.pop()[1])
        await wait_until(lambda: guard.addresses.count("127.0.0.1") == 2)
        reader, writer = await open_raw(srv)
        writer.write(GET_HEALTHZ)
        assert (await read_response(reader))[0] == 200
        await close_quietly(writer)
        for _, w in held:
            await close_quietly(w)


async def test_an_upgraded_websocket_leaves_the_wrapper_but_stays_counted_until_it_ends() -> None:
    """After the upgrade the guard hands the socket straight to aiohttp (no wrapper for the
    socket's life), and the address still counts it: a closed session, a session the server
    ends, and a connection cut without a close frame each give the address back exactly once."""
    settings = make_settings(max_connections_per_ip=2, request_head_timeout=0.5, heartbeat=60.0)
    async with serve_in_process(settings) as srv:
        guard = guard_of(srv)
        aria, _ = await srv.join("aria")
        borin, borin_writer = await open_raw(srv)  # a WebSocket by hand, to cut it later
        await upgrade(borin, borin_writer, "borin")
        await wait_until(lambda: guard.addresses.count("127.0.0.1") == 2)
        # No wrapper left on an upgraded socket: the head deadline (0.5 s) cannot reach it, and
        # a third connection from the address is still over the cap.
        reader, writer = await open_raw(srv)
        assert await closed_by_server(reader) == b""
        await close_quietly(writer)
        assert refused(srv, "per_address") == 1
        await aria.send("{not json")
        assert (await aria.until("system.error"))["payload"]["code"] == "bad_json"
        # A clean close gives one back ...
        await aria.close()
        await wait_until(lambda: guard.addresses.count("127.0.0.1") == 1)
        # ... and so does a connection cut with no close frame.
        borin_writer.transport.abort()
        await wait_until(lambda: guard.addresses.total == 0)
        assert len(guard.addresses) == 0 and len(guard.users) == 0
        # The whole allowance is back.
        again, _ = await srv.join("aria")
        other, _ = await srv.join("borin")
        await wait_until(lambda: guard.addresses.count("127.0.0.1") == 2)
        for client in (again, other):
            await client.close()
        await wait_until(lambda: guard.addresses.total == 0)


@pytest.mark.parametrize("heartbeat", [1.0, 0.2])
async def test_a_client_that_floods_pings_and_never_reads_is_closed_and_its_socket_freed(
    monkeypatch: pytest.MonkeyPatch, heartbeat: float
) -> None:
    """A hostile probe: a client that sends pings and never reads is written only its pongs;
    once its buffers filled, the pongs' drain blocked aiohttp's reading and its heartbeat for
    ever, and the socket, its slot and megabytes of kernel buffers stayed for the client's whole
    life. The reader watch closes it (4002), or the flood's policy close does (pings count as
    messages: 1008), and the socket is aborted; a neighbour is served.
    With a heartbeat shorter than the watch's patience, aiohttp's heartbeat closes the transport
    first, and that close waits for a drain that never comes: the watch aborts it."""
    from party_sync.transport import http

    monkeypatch.setattr(http, "READER_WATCH_EVERY", 0.2)
    monkeypatch.setattr(http, "READER_PATIENCE_MIN", 0.5)
    settings = make_settings(heartbeat=heartbeat)
    async with serve_in_process(settings) as srv, neighbour_session() as neighbour:
        assert srv.server is not None
        gateway, guard = srv.server.gateway, guard_of(srv)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port_of(srv)))
        reader, writer = await asyncio.open_connection(sock=sock)
        await upgrade(reader, writer, "borin")
        await wait_until(lambda: len(gateway.sessions) == 1)
        ping = b"\x89" + bytes((0x80 | 125,)) + b"\x00" * 4 + b"x" * 125  # masked, key 0

        async def flood() -> None:
            with contextlib.suppress(ConnectionError):
                while not writer.is_closing():
                    writer.write(ping * 256)
                    await writer.drain()  # blocks once the server stops reading

        flooding = asyncio.create_task(flood())
        try:
            # never read: the server must end it by itself, socket and slot included
            await wait_until(lambda: not gateway.sessions, timeout=CLOSED_WITHIN * 2)
            await wait_until(lambda: guard.addresses.total == 0, timeout=CLOSED_WITHIN)
            if heartbeat >= 0.5:  # (else aiohttp's heartbeat began the close: none of ours)
                # one close: the flood's (its pings count as messages: 1008), or the reader
                # watch's (4002) if its buffers filled before the rate ran out
                closes = [
                    gateway.metrics.registry.get_sample_value(
                        "party_sync_closes_total", {"code": code}
                    )
                    or 0
                    for code in ("1008", "4002")
                ]
                assert sum(closes) == 1
            await neighbour_served(srv, neighbour)
        finally:
            flooding.cancel()
            await asyncio.gather(flooding, return_exceptions=True)
            writer.transport.abort()


# -- per user --------------------------------------------------------------------------------


def sub_token(character: str, sub: str) -> str:
    return issue_token(
        SECRET,
        party_id="p1",
        campaign_run_id="r1",
        character_id=character,
        display_name=character.capitalize(),
        now=time.time(),
        sub=sub,
    )


async def test_the_websocket_over_the_per_user_cap_gets_429() -> None:
    settings = make_settings(max_connections_per_user=2)
    async with serve_in_process(settings) as srv:
        first, _ = await srv.join("aria", token_value=sub_token("aria", "user-1"))
        second, _ = await srv.join("borin", token_value=sub_token("borin", "user-1"))
        over = {"token": sub_token("aria", "user-1")}
        async with srv.http.get(srv.ws_url, params=over) as resp:
            assert resp.status == 429
            assert resp.content_type == "application/json"
            assert await resp.json() == {"error": "too_many_connections"}
        assert await srv.handshake_status(over) == 429
        assert refused(srv, "per_user") == 2
        async with srv.http.get(srv.base + "/metrics") as resp:
            text = await resp.text()
        assert 'party_sync_handshakes_refused_total{status="429"} 2.0' in text
        # Another user is served meanwhile.
        cato, _ = await srv.join("cato", token_value=sub_token("cato", "user-2"))
        # One of user-1's sockets closes: user-1 may connect again.
        await first.close()
        guard = guard_of(srv)
        await wait_until(lambda: guard.users.count(("sub", "user-1")) == 1)
        again, _ = await srv.join("aria", token_value=sub_token("aria", "user-1"))
        for client in (second, cato, again):
            await client.close()
        await wait_until(lambda: len(guard.users) == 0)


# -- nothing leaks -------------------------------------------------------------------------


async def test_opening_and_closing_many_connections_leaves_no_count_behind() -> None:
    settings = make_settings(
        max_connections_per_ip=3, max_connections_per_user=1, request_head_timeout=5.0
    )
    async with serve_in_process(settings) as srv:
        guard = guard_of(srv)
        for _ in range(15):
            # force_close: one connection per HTTP request, closed after its answer.
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.get(srv.base + "/healthz") as resp:
                    assert resp.status == 200
                ws = await http.ws_connect(srv.ws_url, params={"token": token("aria")})
                aria = Client(ws)
                await aria.expect("system.hello")
                async with http.get(srv.ws_url, params={"token": token("aria")}) as resp:
                    assert resp.status == 429  # aria already has her one socket
                await wait_until(lambda: guard.addresses.count("127.0.0.1") == 1)  # aria's
                _, half_writer = await open_raw(srv)
                half_writer.write(b"GET / HT")
                _, idle_writer = await open_raw(srv)
                over, over_writer = await open_raw(srv)  # the 4th: over the cap
                assert await closed_by_server(over) == b""
                for writer in (over_writer, half_writer, idle_writer):
                    await close_quietly(writer)  # the clients give up first
                await aria.close()
            await wait_until(lambda: guard.addresses.total == 0 and len(guard.users) == 0)
        assert len(guard.addresses) == 0 and len(guard.users) == 0
        assert refused(srv, "per_address") == 15 and refused(srv, "per_user") == 15
        # The whole allowance is still there: three sockets, every one served.
        streams = [await open_raw(srv) for _ in range(3)]
        for reader, writer in streams:
            writer.write(GET_HEALTHZ)
            assert (await read_response(reader))[0] == 200
            await close_quietly(writer)


# -- the pieces --------------------------------------------------------------------------------


async def test_a_handler_that_outlasts_the_head_deadline_is_not_cut() -> None:
    """The guard on a bare aiohttp app: the head deadline is disarmed through
    ``request.transport.get_protocol()`` (the only way the middleware reaches the wrapper). If a
    future aiohttp handed handlers another transport, every request that outlasts the deadline
    would be cut: this fails loudly then."""
    release = asyncio.Event()
    seen: list[GuardedConnection | None] = []

    async def slow(request: web.Request) -> web.Response:
        seen.append(guarded_connection(request))
        await release.wait()
        return web.Response(text="done")

    app = web.Application(middlewares=[edge_middleware()])
    app.router.add_get("/slow", slow)
    guard = ConnectionGuard(head_timeout=0.3, max_per_address=0, max_per_user=0)
    runner = web.AppRunner(app)
    await runner.setup()
    assert runner.server is not None
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(guard.factory(runner.server), "127.0.0.1", 0)
    port = int(listener.sockets[0].getsockname()[1])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: len(seen) == 1)
        assert isinstance(seen[0], GuardedConnection)
        # A silent socket opened now is closed by its deadline: the slow request's has passed.
        silent, silent_writer = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_by_server(silent) == b""
        release.set()
        status, body = await read_response(reader)
        assert (status, body) == (200, b"done")
        for w in (writer, silent_writer):
            await close_quietly(w)
        await wait_until(lambda: len(guard.addresses) == 0)
    finally:
        listener.close()
        await runner.cleanup()


def test_tally_counts_up_to_its_cap_and_forgets_empty_keys() -> None:
    tally = Tally(2)
    assert tally.acquire("a") and tally.acquire("a") and not tally.acquire("a")
    assert tally.acquire("b") and tally.total == 3
    tally.release("a")
    assert tally.count("a") == 1 and tally.acquire("a")
    for key in ("a", "a", "b"):
        tally.release(key)
    assert len(tally) == 0 and tally.total == 0
    tally.release("never")  # a stray release never goes negative
    assert tally.count("never") == 0
    unlimited = Tally(0)
    assert all(unlimited.acquire("x") for _ in range(1000))


def test_address_key() -> None:
    assert address_key(("203.0.113.7", 50000)) == "203.0.113.7"
    assert address_key(("::ffff:203.0.113.7", 50000, 0, 0)) == "203.0.113.7"
    assert address_key(("2001:db8:1:2:3:4:5:6", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert address_key(("2001:db8:1:2:ffff::1", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert address_key("") == "unknown"


def test_user_key_is_the_subject_or_else_the_character() -> None:
    with_sub = Claims("p1", "r1", "aria", "Aria", 0.0, sub="u1")
    assert user_key(with_sub) == user_key(Claims("p2", "r9", "zed", "Zed", 0.0, sub="u1"))
    without = Claims("p1", "r1", "aria", "Aria", 0.0)
    assert user_key(without) != user_key(Claims("p2", "r1", "aria", "Aria", 0.0))


def test_settings_from_the_environment_and_their_checks() -> None:
    settings = load(
        env={
            "PARTY_SYNC_REQUEST_HEAD_TIMEOUT": "3",
            "PARTY_SYNC_KEEPALIVE_TIMEOUT": "7.5",
            "PARTY_SYNC_MAX_CONNECTIONS_PER_IP": "0",
            "PARTY_SYNC_MAX_CONNECTIONS_PER_USER": "5",
        }
    )
    assert (settings.request_head_timeout, settings.keepalive_timeout) == (3.0, 7.5)
    assert (settings.max_connections_per_ip, settings.max_connections_per_user) == (0, 5)
    defaults = load(env={})
    assert (defaults.request_head_timeout, defaults.keepalive_timeout) == (10.0, 15.0)
    assert (defaults.max_connections_per_ip, defaults.max_connections_per_user) == (200, 20)
    for name, value in (
        ("REQUEST_HEAD_TIMEOUT", "0"),
        ("KEEPALIVE_TIMEOUT", "inf"),
        ("MAX_CONNECTIONS_PER_IP", "-1"),
        ("MAX_CONNECTIONS_PER_USER", "-1"),
    ):
        with pytest.raises(ConfigError):
            load(env={f"PARTY_SYNC_{name}": value})


async def test_a_user_closed_for_flooding_is_refused_for_a_while_and_others_are_not() -> None:
    """Reconnecting at once after each 1008 would buy a fresh allowance of bad messages with
    every handshake: the user's handshakes get 429 policy_cooldown (Retry-After) for 10 s."""
    settings = make_settings(rate_limit=5.0, rate_burst=10.0)
    async with serve_in_process(settings) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await a.flood("{nope")
        assert await a.closed() == 1008
        # in force by the time the close frame arrives: a reconnect at once meets it
        assert len(guard_of(srv)._cooldowns) == 1
        params = {"token": token("aria")}
        async with srv.http.get(srv.ws_url, params=params) as resp:
            assert resp.status == 429
            assert await resp.json() == {"error": "policy_cooldown"}
            assert 1 <= int(resp.headers["Retry-After"]) <= 10
        assert refused(srv, "policy_cooldown") == 1
        await b.send({"type": "system.ping", "trace_id": "still-here", "payload": {}})
        assert (await b.until("system.pong"))["trace_id"] == "still-here"
        cato, _ = await srv.join("cato")  # another user connects as usual
        await cato.close()
        await b.close()


@pytest.mark.usefixtures("backend_kind")
async def test_a_player_joining_and_leaving_in_a_loop_is_slowed_to_the_handshake_rate() -> None:
    """One player connecting, leaving (``party.leave``: an event for every member) and
    connecting again as fast as it can: past the burst its handshakes get 429
    too_many_handshakes with Retry-After, so the party's stream, and its history (every other
    member's resume window), fill at most at the rate; another user is not touched."""
    # a slow refill (one session per 20 s): the five below never earn a sixth, however slow
    settings = make_settings(handshake_rate_per_user=0.05, handshake_burst_per_user=5.0)
    async with serve_in_process(settings) as srv:
        borin, _ = await srv.join("borin")
        opened = 0
        for _ in range(5):
            aria, _ = await srv.join("aria")
            opened += 1
            await aria.send({"type": "party.leave", "payload": {"character_id": "aria"}})
            assert await aria.closed() == 1000
        params = {"token": token("aria")}
        async with srv.http.get(srv.ws_url, params=params) as resp:
            assert resp.status == 429
            assert await resp.json() == {"error": "too_many_handshakes"}
            assert 1 <= int(resp.headers["Retry-After"]) <= 20
        assert refused(srv, "handshake_rate") == 1
        cato, _ = await srv.join("cato")  # another user: served as usual
        seen: list[tuple[str, Any]] = []
        while ("party.join", "cato") not in seen:  # everything up to cato's join
            message = await borin.recv()
            seen.append((message["type"], message["payload"].get("character_id")))
        assert seen.count(("party.join", "aria")) == opened == 5
        assert seen.count(("party.leave", "aria")) == 5
        await cato.close()
        await borin.close()


def test_a_cooldown_ends_and_expired_ones_are_forgotten() -> None:
    now = [100.0]
    guard = ConnectionGuard(
        head_timeout=10, max_per_address=0, max_per_user=0, clock=lambda: now[0]
    )
    guard.penalize("u1")
    assert guard.cooldown("u1") == POLICY_COOLDOWN and guard.cooldown("u2") == 0.0
    now[0] += POLICY_COOLDOWN - 0.5
    assert guard.cooldown("u1") == 0.5
    now[0] += 0.5
    assert guard.cooldown("u1") == 0.0
    for i in range(1024):  # a full table drops what has expired before it grows
        guard.penalize(f"old-{i}")
    now[0] += POLICY_COOLDOWN
    guard.penalize("new")
    assert guard.cooldown("new") == POLICY_COOLDOWN
    assert len(guard._cooldowns) == 1
