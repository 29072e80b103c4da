"""``PartyClient``'s actions in flight and live narration over a fake transport: the test plays
the server message by message, so a reconnect in the middle of a stream is exact (no sockets, no
real waiting)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from party_sync.client import (
    ActionAccepted,
    ActionFailedNotice,
    ActionResult,
    Backoff,
    ClientEvent,
    Connected,
    NarrationDelta,
    PartyClient,
    Subscription,
)
from party_sync.client.transport import TransportError

URL = "ws://party.test/ws"
TEXT = "Borin sets his shoulder to the bars. The iron groans, bends, gives."
PIECES = ["Borin sets ", "his shoulder ", "to the bars. ", "The iron groans, ", "bends, gives."]


class FakeConnection:
    def __init__(self, params: Mapping[str, str]) -> None:
        self.params = dict(params)
        self._inbox: asyncio.Queue[dict[str, Any] | int] = asyncio.Queue()
        self._code: int | None = None

    @property
    def close_code(self) -> int | None:
        return self._code

    @property
    def close_reason(self) -> str:
        return "test"

    def push(self, *messages: dict[str, Any]) -> None:
        for message in messages:
            self._inbox.put_nowait(message)

    def server_close(self, code: int) -> None:
        self._inbox.put_nowait(code)

    async def receive(self) -> str | None:
        item = await self._inbox.get()
        if isinstance(item, int):
            self._code = item
            return None
        return orjson.dumps(item).decode()

    async def send(self, text: str) -> None:
        if self._code is not None:
            raise TransportError("closed")

    async def close(self, code: int = 1000) -> None:
        self.server_close(1000)


class FakeTransport:
    def __init__(self) -> None:
        self.connections: asyncio.Queue[FakeConnection] = asyncio.Queue()

    async def connect(self, url: str, *, token: str, params: Mapping[str, str]) -> FakeConnection:
        conn = FakeConnection(params)
        self.connections.put_nowait(conn)
        return conn

    async def next(self) -> FakeConnection:
        async with asyncio.timeout(5):
            return await self.connections.get()

    async def close(self) -> None:
        return None


def hello(
    seq: int,
    *,
    resumed_from: int | None = None,
    in_flight: list[dict[str, Any]] | None = None,
    narration: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "party_id": "p1",
        "campaign_run_id": "r1",
        "you": "aria",
        "members": [{"character_id": "aria", "display_name": "Aria", "online": True}],
        "seq": seq,
        "epoch": "ep",
        "resumed": resumed_from is not None,
        "scene": None,
        "combat": None,
        "party_state": None,
        "vote": None,
        "actions_in_flight": in_flight or [],
        "narration": narration or [],
        "limits": {"narration_idle_ms": 30000},
    }
    if resumed_from is not None:
        payload["resumed_from"] = resumed_from
    return {"type": "system.hello", "trace_id": "t", "payload": payload}


def accepted(action_id: str, character_id: str = "borin") -> dict[str, Any]:
    payload = {"action_id": action_id, "character_id": character_id, "action_type": "choice"}
    return {"type": "action.accepted", "trace_id": "t", "payload": payload}


def delta(index: int, *, done: bool = False, stream_id: str = "n-a1") -> dict[str, Any]:
    payload = {
        "stream_id": stream_id,
        "index": index,
        "text": PIECES[index],
        "done": done,
        "action_id": "a1",
    }
    return {"type": "narration.delta", "trace_id": "t", "payload": payload}


def result(seq: int, action_id: str) -> dict[str, Any]:
    payload = {"action_id": action_id, "character_id": "borin", "outcome": "success"}
    return {"type": "action.result", "seq": seq, "trace_id": "t", "payload": payload}


class Screen:
    """What a player's screen shows, built only from what the client reports: on every hello
    the streams the state restates, then each piece as its event comes."""

    def __init__(self, client: PartyClient) -> None:
        self.client = client
        self.text: dict[str, str] = {}
        self.deciding: list[str] = []
        self.pieces: list[int] = []

    def on_connected(self, event: Connected) -> None:
        self.text = {sid: s.text for sid, s in self.client.state.narration.items()}
        self.deciding = list(self.client.state.actions_in_flight)

    def on_piece(self, event: NarrationDelta) -> None:
        self.text[event.stream_id] = self.text.get(event.stream_id, "") + event.text
        self.pieces.append(event.index)

    async def on_accepted(self, event: ActionAccepted) -> None:  # async callbacks work too
        self.deciding.append(event.action_id)

    def on_ended(self, event: ActionResult | ActionFailedNotice) -> None:
        if event.action_id in self.deciding:
            self.deciding.remove(event.action_id)


def harness() -> tuple[FakeTransport, PartyClient, Screen]:
    transport = FakeTransport()

    async def sleep(delay: float) -> None:
        return None

    client = PartyClient(
        URL,
        token="tok",
        transport=transport,
        backoff=Backoff(random=lambda: 0.0),
        sleep=sleep,
    )
    screen = Screen(client)
    client.on(Connected, screen.on_connected)
    client.on(NarrationDelta, screen.on_piece)
    client.on(ActionAccepted, screen.on_accepted)
    client.on(ActionResult, screen.on_ended)
    client.on(ActionFailedNotice, screen.on_ended)
    return transport, client, screen


async def until(events: Subscription, predicate: Callable[[ClientEvent], bool]) -> ClientEvent:
    async with asyncio.timeout(5):
        async for event in events:
            if predicate(event):
                return event
    raise AssertionError("the client stopped")


async def test_a_reconnect_mid_stream_shows_the_text_once_and_the_action_until_its_result() -> None:
    transport, client, screen = harness()
    events = client.events()
    client.start()
    first = await transport.next()
    first.push(hello(3), accepted("a1"), delta(0), delta(1))
    await until(events, lambda e: isinstance(e, NarrationDelta) and e.index == 1)
    assert screen.deciding == ["a1"] and screen.text == {"n-a1": "Borin sets his shoulder "}
    assert list(client.state.actions_in_flight) == ["a1"]

    first.server_close(1006)  # the connection drops; pieces 2 and 3 go out meanwhile
    second = await transport.next()
    assert second.params == {"epoch": "ep", "last_seq": "3"}  # transient messages: no seq moved
    so_far = "".join(PIECES[:4])
    second.push(
        hello(
            3,
            resumed_from=3,
            in_flight=[{"action_id": "a1", "character_id": "borin", "action_type": "choice"}],
            narration=[{"stream_id": "n-a1", "index": 3, "text": so_far, "action_id": "a1"}],
        ),
        delta(3),  # a piece the hello included: never shown twice
        delta(4, done=True),
    )
    last = await until(events, lambda e: isinstance(e, NarrationDelta) and e.done)
    assert isinstance(last, NarrationDelta) and last.so_far == TEXT and not last.incomplete
    assert screen.text == {"n-a1": TEXT}
    assert screen.pieces == [0, 1, 4]
    assert client.state.narration["n-a1"].text == TEXT and client.state.narration["n-a1"].done
    assert screen.deciding == ["a1"]

    second.push(result(4, "a1"))
    await until(events, lambda e: isinstance(e, ActionResult))
    assert screen.deciding == [] and client.state.actions_in_flight == {}
    assert client.state.narration == {}  # its final text came: the stream is done with
    await client.close()


async def test_a_snapshot_after_the_stream_ended_restates_nothing_of_it() -> None:
    transport, client, screen = harness()
    events = client.events()
    client.start()
    first = await transport.next()
    first.push(hello(3), accepted("a1"), accepted("a2"), delta(0))
    await until(events, lambda e: isinstance(e, NarrationDelta))
    first.server_close(4003)  # resync: a fresh snapshot
    second = await transport.next()
    assert second.params == {}
    second.push(hello(9), accepted("a3"))  # a1 and a2 finished, the stream ended, while away
    await until(events, lambda e: isinstance(e, ActionAccepted) and e.action_id == "a3")
    assert client.state.narration == {} and screen.text == {}
    assert list(client.state.actions_in_flight) == ["a3"] and screen.deciding == ["a3"]
    second.push(
        {
            "type": "action.failed",
            "trace_id": "t",
            "payload": {"action_id": "a3", "character_id": "borin", "code": "engine_unavailable"},
        }
    )
    notice = await until(events, lambda e: isinstance(e, ActionFailedNotice))
    assert isinstance(notice, ActionFailedNotice) and notice.code == "engine_unavailable"
    assert client.state.actions_in_flight == {} and screen.deciding == []
    await client.close()
