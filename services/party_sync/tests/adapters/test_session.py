"""The session's delivery rules, with a fake sink (no sockets)."""

from __future__ import annotations

import pytest
from party_sync.backends.base import Binding
from party_sync.core.events import Event
from party_sync.core.limits import ConnectionLimits, LimitPolicy
from party_sync.gateway.session import Session
from party_sync.protocol.errors import CloseCode


class FakeSink:
    def __init__(self, capacity: int = 100) -> None:
        self.sent: list[bytes] = []
        self.capacity = capacity
        self.closed: tuple[int, str] | None = None

    def send(self, data: bytes) -> bool:
        if len(self.sent) >= self.capacity:
            return False
        self.sent.append(data)
        return True

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def event(seq: int) -> Event:
    return Event("p", seq, "scene.update", {}, "t", b"e%d" % seq)


def session(sink: FakeSink) -> Session:
    binding = Binding("p", "r", "c", "C")
    return Session("s", binding, sink, ConnectionLimits(LimitPolicy()), 1e12)


def test_events_buffered_while_syncing_are_delivered_after_the_hello_position() -> None:
    sink = FakeSink()
    s = session(sink)
    for seq in (3, 4, 5, 6):
        s.deliver(event(seq))
    assert sink.sent == []
    s.go_live(4)
    assert sink.sent == [b"e5", b"e6"]
    s.deliver(event(6))  # duplicate
    s.deliver(event(7))
    assert sink.sent == [b"e5", b"e6", b"e7"]


def test_a_gap_closes_with_resync_instead_of_delivering_out_of_order() -> None:
    sink = FakeSink()
    s = session(sink)
    s.go_live(1)
    s.deliver(event(3))
    assert sink.sent == []
    assert sink.closed is not None and sink.closed[0] == CloseCode.RESYNC


def test_a_full_send_queue_disconnects_the_slow_client() -> None:
    sink = FakeSink(capacity=2)
    s = session(sink)
    s.go_live(0)
    for seq in range(1, 5):
        s.deliver(event(seq))
    assert sink.sent == [b"e1", b"e2"]
    assert sink.closed is not None and sink.closed[0] == CloseCode.SLOW_CONSUMER
    assert s.closed


def test_frame_headers_follow_rfc6455_at_every_length_boundary() -> None:
    from party_sync.transport.sink import frame_header

    assert frame_header(0) == b"\x81\x00"
    assert frame_header(125) == b"\x81\x7d"
    assert frame_header(126) == b"\x81\x7e\x00\x7e"
    assert frame_header(65535) == b"\x81\x7e\xff\xff"
    assert frame_header(65536) == b"\x81\x7f" + (65536).to_bytes(8, "big")


@pytest.mark.raw_frames
async def test_a_large_frame_reaches_a_real_client_intact() -> None:
    import aiohttp
    from aiohttp import web
    from party_sync.transport.sink import WebSocketSink

    payload = b'{"x":"' + b"y" * 70_000 + b'"}'  # past the 16-bit length form

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        assert request.transport is not None
        sink = WebSocketSink(ws, request.transport, 1 << 20)
        assert sink.send(payload)
        assert sink.send(b"{}")
        await ws.receive()  # until the client closes
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{runner.addresses[0][1]}/")
            assert (await ws.receive_str()).encode() == payload
            assert await ws.receive_str() == "{}"
            await ws.close()
    finally:
        await runner.cleanup()
