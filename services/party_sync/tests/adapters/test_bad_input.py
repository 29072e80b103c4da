"""Bad input gets its own error code, loses nothing, and never hurts anyone else."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time
from typing import Any

import aiohttp
import orjson
import pytest
from ps_testkit.client import Closed, wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.security_raw import client_frame, close_code, ws_handshake, ws_open
from ps_testkit.servers import make_settings, serve_in_process, token

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis

VALID: dict[str, Any] = {
    "type": "action.request",
    "payload": {
        "action_id": "ok-1",
        "character_id": "aria",
        "campaign_run_id": "r1",
        "action_type": "skill_check",
        "payload": {},
    },
}


async def test_each_kind_of_bad_input_gets_its_code_and_the_connection_stays_usable() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        oversized = orjson.dumps({**VALID, "pad": "x" * 70_000}).decode()
        cases: list[tuple[str | bytes, str]] = [
            ("{not json", "bad_json"),
            (b"\xff\xfe garbage", "bad_json"),
            (  # a valid action, but in a binary frame: refused, never run (engine.calls below)
                orjson.dumps({**VALID, "payload": {**VALID["payload"], "action_id": "bin-1"}}),
                "bad_json",
            ),
            ("[1, 2, 3]", "bad_message"),
            ('{"type": 5, "payload": {}}', "bad_message"),
            ('{"type": "action.request"}', "bad_message"),
            ('{"type": "chat.say", "payload": {}}', "unknown_type"),
            ('{"type": "action.result", "payload": {}}', "server_only_type"),
            ('{"type": "system.hello", "payload": {}}', "server_only_type"),
            (
                orjson.dumps(
                    {**VALID, "payload": {**VALID["payload"], "action_type": "teleport"}}
                ).decode(),
                "schema_violation",
            ),
            (orjson.dumps({**VALID, "extra": 1}).decode(), "schema_violation"),
            (oversized, "message_too_large"),
            ('{"type": "vote.cast", "payload": {"vote_id": "v1", "option": "A"}}', "vote_unknown"),
        ]
        for raw, code in cases:
            await a.send(raw)
            err = await a.expect("system.error")
            assert err["payload"]["code"] == code, (raw[:60], err)
            assert err["payload"]["message"]
        await a.send(VALID)
        assert (await a.expect("action.result"))["payload"]["action_id"] == "ok-1"
        assert len(engine.calls) == 1
        await a.close()


async def test_schema_violation_names_the_field() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        bad = {
            **VALID,
            "trace_id": "tv-1",
            "payload": {**VALID["payload"], "action_id": "has space"},
        }
        await a.send(bad)
        err = await a.expect("system.error")
        assert err["payload"]["code"] == "schema_violation"
        assert "action_id" in err["payload"]["message"]
        assert err["payload"]["in_reply_to"]["trace_id"] == "tv-1"
        await a.close()


@pytest.mark.parametrize("mode", ["reject", "crash"])
async def test_the_refusal_of_an_accepted_action_carries_the_trace_of_its_acceptance(
    mode: str,
) -> None:
    """docs/protocol.md (trace_id): a refusal that is an accepted action's final answer says in
    ``in_reply_to.trace_id`` the action's trace id, its ``action.accepted``'s (the server's when
    the client sent none; the client's own when it sent one)."""
    engine = ScriptedEngine()
    engine.mode = mode  # type: ignore[assignment]
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        for n, sent in enumerate((None, "tv-own")):
            payload = {**VALID["payload"], "action_id": f"refused-{n}"}
            await a.send({**VALID, "payload": payload, **({"trace_id": sent} if sent else {})})
            accepted = await a.expect("action.accepted")
            err = await a.expect("system.error")
            assert err["payload"]["code"] in {"action_rejected", "engine_error"}
            assert err["payload"]["in_reply_to"]["action_id"] == f"refused-{n}"
            assert err["payload"]["in_reply_to"]["trace_id"] == accepted["trace_id"]
            assert err["trace_id"] == accepted["trace_id"]
            if sent is not None:
                assert accepted["trace_id"] == sent
        await a.close()


async def test_a_flooding_client_is_closed_with_1008_and_others_are_unaffected() -> None:
    engine = ScriptedEngine()
    settings = make_settings(rate_limit=5.0, rate_burst=10.0)
    async with serve_in_process(settings, engine=engine) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await a.flood("{nope")
        codes: set[str] = set()
        close_code = None
        try:
            while True:
                message = await a.recv()
                if message["type"] == "system.error":
                    codes.add(message["payload"]["code"])
        except Closed as exc:
            close_code = exc.code
        assert close_code == 1008
        assert codes <= {"bad_json", "rate_limited"} and "bad_json" in codes
        await b.act("still-fine", "borin", "r1")
        assert (await b.until("action.result"))["payload"]["action_id"] == "still-fine"
        await b.close()


async def test_a_frame_far_beyond_the_limit_closes_only_that_connection() -> None:
    async with serve_in_process(
        make_settings(max_message_bytes=4096), engine=ScriptedEngine()
    ) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await a.send("x" * 100_000)
        try:
            code = await a.closed()
        except Closed as exc:
            code = exc.code
        assert code == 1009
        await b.act("b-ok", "borin", "r1")
        assert (await b.until("action.result"))["payload"]["action_id"] == "b-ok"
        await b.close()
        assert srv.server is not None  # the transport's close is counted like the server's own
        registry = srv.server.gateway.metrics.registry
        sample = ("party_sync_closes_total", {"code": "1009"})
        await wait_until(lambda: registry.get_sample_value(*sample) == 1)


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of every whole server frame in ``data`` (after the HTTP 101 head)."""
    data = data[data.index(b"\r\n\r\n") + 4 :] if b"\r\n\r\n" in data else b""
    frames = []
    while len(data) >= 2:
        size, at = data[1] & 0x7F, 2
        if size == 126:
            size, at = int.from_bytes(data[2:4], "big"), 4
        elif size == 127:
            size, at = int.from_bytes(data[2:10], "big"), 10
        if len(data) < at + size:
            break
        frames.append((data[0] & 0x0F, data[at : at + size]))
        data = data[at + size :]
    return frames


def _closed(data: bytes) -> bool:
    return any(opcode == 0x8 for opcode, _ in _server_frames(data))


def _flood_then_keep_sending(base: str, path: str) -> tuple[bytes, bool]:
    """A client that sends bad input, one frame per answer, until the server's close frame,
    then, as a flooding client does, sends more: what it read up to the close frame, and
    whether the server ended the connection before the client's own close frame."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(ws_handshake(path))
        received = b""
        while not any(opcode == 0x1 for opcode, _ in _server_frames(received)):
            received += sock.recv(1 << 20)  # the hello
        while not _closed(received):
            assert len(received) < 1 << 20, "never closed"
            answers = len(_server_frames(received))
            sock.sendall(client_frame(b"{bad"))  # then wait for its answer: the server waits
            while len(_server_frames(received)) == answers:  # for the next frame meanwhile
                chunk = sock.recv(1 << 20)
                assert chunk, "the connection ended before the close frame"
                received += chunk
        for _ in range(20):  # still flooding after the server's close frame
            sock.sendall(client_frame(b"{bad"))
        # The server reads on (and drops) what still comes until the client's close frame: a
        # socket closed with data still arriving is reset, and a reset can take with it what
        # the client had not read yet (a flood's errors and its 1008 arrived as 1006).
        ready, _, _ = select.select([sock], [], [], 0.5)
        ended_early = bool(ready) and sock.recv(1 << 20, socket.MSG_PEEK) == b""
        sock.sendall(client_frame(b"\x03\xe8", opcode=0x8))  # the client's close
        return received, ended_early


async def test_a_flooding_client_still_reads_its_errors_and_the_1008() -> None:
    """Protocol probe: a client closed for bad input that was still sending when the close came
    sometimes got neither its errors nor the close frame (1006): aiohttp, woken from receive()
    by a close from another task, shut the socket at once, without waiting for the client's
    close frame, and the frames still arriving made the kernel answer with a reset, which can
    drop what the client had not read. A close decided while a message is handled is now made
    by the handler, which reads on until the client's close frame (RFC 6455 7.1.1)."""
    async with serve_in_process(make_settings(), engine=ScriptedEngine()) as srv:
        for attempt in range(3):
            path = "/ws?token=" + token(f"flood{attempt}")
            received, ended_early = await asyncio.to_thread(
                _flood_then_keep_sending, srv.base, path
            )
            assert not ended_early, "closed before the client's close frame"
            frames = _server_frames(received)
            closes = [payload for opcode, payload in frames if opcode == 0x8]
            assert closes, (attempt, received[-300:])
            assert int.from_bytes(closes[0][:2], "big") == 1008
            errors = [p for opcode, p in frames if opcode == 0x1 and b'"system.error"' in p]
            assert errors and all(b"bad_json" in e or b"rate_limited" in e for e in errors)


def _keep_sending_past_a_close(base: str, path: str, hello: threading.Event) -> tuple[bytes, bool]:
    """A client that, once it has its hello (``hello`` set), waits for the server's close frame
    and sends on after it: what it read up to the close frame, and whether the server ended the
    connection before the client's own close frame."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(ws_handshake(path))
        received = b""
        while not any(opcode == 0x1 for opcode, _ in _server_frames(received)):
            received += sock.recv(1 << 20)
        hello.set()
        while not _closed(received):
            chunk = sock.recv(1 << 20)
            assert chunk, "the connection ended before the close frame"
            received += chunk
        ping = b'{"type":"system.ping","payload":{}}'
        for _ in range(20):  # a client that was sending when the close came
            sock.sendall(client_frame(ping))
        ready, _, _ = select.select([sock], [], [], 0.5)
        ended_early = bool(ready) and sock.recv(1 << 20, socket.MSG_PEEK) == b""
        sock.sendall(client_frame(b"\x03\xe8", opcode=0x8))
        return received, ended_early


@pytest.mark.parametrize("why", ["operator", "token", "drain"])
async def test_a_close_decided_while_the_server_waits_reads_on_until_the_clients_close(
    why: str,
) -> None:
    """Earlier notes (left alone until now): a close decided while the server waited for the
    client's next message (an operator's 4004, a token's 4001, a 4002 or a drain's 1001) was
    made by aiohttp woken in receive(), which shut the socket right after the close frame; a
    client still sending then got a reset, and could lose the close frame (1006). The handler
    now starts every close when it stops reading, and reads on until the client's close frame,
    as for a close decided while it handles a message."""
    code = {"operator": 4004, "token": 4001, "drain": 1001}[why]
    async with serve_in_process(make_settings(), engine=ScriptedEngine()) as srv:
        ttl = 2.0 if why == "token" else 3600.0
        path = "/ws?token=" + token("aria", ttl=ttl)
        hello = threading.Event()
        sending = asyncio.create_task(
            asyncio.to_thread(_keep_sending_past_a_close, srv.base, path, hello)
        )
        await wait_until(hello.is_set)
        assert srv.server is not None
        gateway = srv.server.gateway
        draining = None
        if why == "operator":
            assert gateway.close_character("p1", "aria", code, "by an operator") == 1
        elif why == "drain":  # SIGTERM's first step: every client told to reconnect elsewhere
            draining = asyncio.create_task(gateway.drain())
        received, ended_early = await sending
        if draining is not None:
            await draining
        assert not ended_early, "closed before the client's close frame"
        closes = [payload for opcode, payload in _server_frames(received) if opcode == 0x8]
        assert closes and int.from_bytes(closes[0][:2], "big") == code


async def test_a_close_decided_while_handling_goes_out_before_the_cleanup_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Code review: the close left to the handler waited for its cleanup (``connection_lost``:
    backend round trips, seconds through a Redis stall), and a cleanup that raised or was
    cancelled lost it. The frame now goes as soon as the handler stops reading."""
    from party_sync.gateway.gateway import Gateway

    released = asyncio.Event()
    original = Gateway.connection_lost

    async def slow_cleanup(self: Gateway, session: Any) -> None:
        await released.wait()
        await original(self, session)

    monkeypatch.setattr(Gateway, "connection_lost", slow_cleanup)
    async with serve_in_process(make_settings(), engine=ScriptedEngine()) as srv:
        client, _ = await srv.join("aria")
        await client.flood("{bad", times=100)

        async def until_closed() -> None:
            while True:
                await client.recv(5)

        try:
            async with asyncio.timeout(5):
                with pytest.raises(Closed) as closed:
                    await until_closed()
            assert closed.value.code == 1008
        finally:
            released.set()


async def _read_until_closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[str], int, int]:
    """(the system.error codes, the pongs, the close code) a client read until its close."""
    codes: list[str] = []
    pongs = 0
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.PONG:
            pongs += 1
        elif msg.type is aiohttp.WSMsgType.TEXT:
            message = orjson.loads(msg.data)
            if message["type"] == "system.error":
                codes.append(message["payload"]["code"])
    return codes, pongs, ws.close_code or 0


async def test_pings_within_the_rate_are_answered_and_the_connection_stays_usable() -> None:
    """WebSocket ping frames within the message rate get their pongs, a pong frame (a
    unidirectional heartbeat, RFC 6455 §5.5.3) is taken, and the connection goes on."""
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        params = {"token": token("aria")}
        ws = await srv.http.ws_connect(srv.ws_url, params=params, autoping=False)
        first = await ws.receive()
        assert orjson.loads(first.data)["type"] == "system.hello"
        for n in range(5):
            await ws.ping(b"p%d" % n)
            answer = await asyncio.wait_for(ws.receive(), 5)
            assert (answer.type, answer.data) == (aiohttp.WSMsgType.PONG, b"p%d" % n)
        await ws.pong(b"unasked")
        await ws.send_str(orjson.dumps({"type": "system.ping", "payload": {}}).decode())
        answer = await asyncio.wait_for(ws.receive(), 5)
        assert orjson.loads(answer.data)["type"] == "system.pong"  # (no error for the pong)
        await ws.close()


@pytest.mark.parametrize("opcode", ["ping", "pong"])
async def test_a_flood_of_ping_or_pong_frames_is_refused_and_closed_like_any_flood(
    opcode: str,
) -> None:
    """Control frames count against the message rate: a flood of empty pings (security probe:
    125k a second from one connection, 0.7 MB/s, slowed every other party's answers from 1 ms to
    over a second; it was never refused) gets ``rate_limited``, then 1008, and no more pongs than
    the burst allows; a player of another party is served throughout."""
    settings = make_settings(rate_limit=5.0, rate_burst=10.0)
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        other, _ = await srv.join("cyra", party="p2", run="r2")
        params = {"token": token("aria")}
        ws = await srv.http.ws_connect(srv.ws_url, params=params, autoping=False)
        assert orjson.loads((await ws.receive()).data)["type"] == "system.hello"
        send = ws.ping if opcode == "ping" else ws.pong
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            for _ in range(2000):
                await send(b"")
        codes, pongs, close_code = await asyncio.wait_for(_read_until_closed(ws), 10)
        took = time.monotonic() - started
        assert close_code == 1008
        assert codes and set(codes) == {"rate_limited"}
        # the burst, and what the rate refilled while the flood lasted (a loaded machine sends
        # it slower: the full suite once took long enough for a twelfth pong)
        assert pongs <= 10 + 5.0 * took + 1 if opcode == "ping" else pongs == 0
        await other.act("c-1", "cyra", "r2")
        assert (await other.until("action.result"))["payload"]["action_id"] == "c-1"
        await other.close()


async def test_a_flood_of_empty_continuation_frames_is_closed_with_1008() -> None:
    """One fragmented message that never ends: empty continuation frames, 6 bytes each, parsed
    by aiohttp and never seen as messages (security probe: 27 million in 10 s, taken without
    limit, slowed every other party's answers to up to 1.9 s). The bytes a client sends count
    against a byte rate its messages never reach: past it, 1008, and a player of another party
    is served."""
    settings = make_settings(max_message_bytes=4096, rate_limit=5.0, rate_burst=10.0)
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        other, _ = await srv.join("cyra", party="p2", run="r2")
        raw = await ws_open(srv.base, "/ws?token=" + token("aria"))
        try:
            await raw.write(client_frame(b'{"type"', fin=False))
            empty = client_frame(b"", opcode=0x0, fin=False)
            with contextlib.suppress(ConnectionError):
                for _ in range(40):  # 2.4 MiB: over the 1 MiB burst, whatever the pace
                    await raw.write(empty * 10_000)
            assert await close_code(raw) == 1008
        finally:
            await raw.close()
        await other.act("c-1", "cyra", "r2")
        assert (await other.until("action.result"))["payload"]["action_id"] == "c-1"
        await other.close()


async def test_a_client_sending_its_largest_messages_at_its_full_rate_is_not_cut_off() -> None:
    """The byte rate is the message rate times the largest message: a client that sends
    actions of the largest size as fast as its rate allows (its burst, then the rate, for two
    seconds) is neither rate limited nor closed."""
    settings = make_settings(max_message_bytes=4096, rate_limit=20.0, rate_burst=20.0)
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")

        def big(n: int) -> str:
            action = {**VALID, "payload": {**VALID["payload"], "action_id": f"big-{n}"}}
            bare = len(orjson.dumps({**action, "payload": {**action["payload"], "payload": {}}}))
            pad = {"pad": "x" * (4096 - bare - 8)}
            text = orjson.dumps({**action, "payload": {**action["payload"], "payload": pad}})
            assert len(text) == 4096
            return text.decode()

        loop = asyncio.get_running_loop()
        start, sent = loop.time(), 0
        while loop.time() < start + 2.0:
            allowed = 20 + int((loop.time() - start) * 20.0) - 1  # (a token of slack)
            while sent < allowed:
                await a.send(big(sent))
                sent += 1
            await asyncio.sleep(0.01)
        await a.send(orjson.dumps({"type": "system.ping", "payload": {}}).decode())
        await a.until("system.pong", timeout=10)  # (raises Closed if it was closed)
        codes = {m["payload"]["code"] for m in a.received if m["type"] == "system.error"}
        assert "rate_limited" not in codes and sent > 40
        await a.close()


async def test_a_message_too_large_after_a_full_burst_of_the_largest_is_refused_not_closed() -> (
    None
):
    """A client sends its whole burst of messages of the largest size, then one refused as too
    large (under four times the size): it gets ``message_too_large`` and the connection stays
    open. The byte burst was the message burst alone, which the burst had spent: 1008 "too much
    data" (re-check probe)."""
    async with serve_in_process(engine=ScriptedEngine()) as srv:  # (64 KiB, burst 60)
        a, _ = await srv.join("aria")
        for n in range(59):  # (the sixtieth message is the large one)
            action = {**VALID, "payload": {**VALID["payload"], "action_id": f"full-{n}"}}
            bare = len(orjson.dumps({**action, "payload": {**action["payload"], "payload": {}}}))
            pad = {"pad": "x" * (65536 - bare - 8)}
            await a.send(
                orjson.dumps({**action, "payload": {**action["payload"], "payload": pad}}).decode()
            )
        await a.send("x" * (4 * 65536 - 1))
        error = await a.until("system.error", timeout=10)
        while error["payload"]["code"] != "message_too_large":
            assert error["payload"]["code"] == "character_busy", error
            error = await a.until("system.error", timeout=10)
        await a.close()
