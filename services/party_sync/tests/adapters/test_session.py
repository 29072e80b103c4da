"""The session's delivery rules, with a fake sink (no sockets)."""

from __future__ import annotations

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
