"""``PartyClient``'s reconnect logic over a fake transport: the test plays the server, message by
message, so gaps, duplicates, refusals and backoff are exact (no sockets, no real waiting)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import orjson
import pytest
from party_sync.client import (
    ActionFailed,
    Backoff,
    ClientClosed,
    Connected,
    ConnectRefused,
    Disconnected,
    PartyClient,
    PartyEvent,
    Subscription,
)
from party_sync.client.transport import HandshakeRejected, TransportError

URL = "ws://party.test/ws"


class FakeConnection:
    def __init__(self, token: str, params: Mapping[str, str]) -> None:
        self.token = token
        self.params = dict(params)
        self.sent: list[dict[str, Any]] = []
        self.sent_event = asyncio.Event()
        self.client_close: int | None = None
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
        if self._code is not None or self.client_close is not None:
            raise TransportError("closed")
        self.sent.append(orjson.loads(text))
        self.sent_event.set()

    async def next_sent(self) -> dict[str, Any]:
        async with asyncio.timeout(5):
            while not self.sent:
                self.sent_event.clear()
                await self.sent_event.wait()
        return self.sent.pop(0)

    async def close(self, code: int = 1000) -> None:
        self.client_close = code
        self.server_close(1000)


class FakeTransport:
    """Each ``connect`` pops the next planned answer: an HTTP status or a network failure."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[FakeConnection] = asyncio.Queue()
        self.plan: list[int | str] = []  # 401, 403, "down", ...
        self.attempts = 0

    async def connect(self, url: str, *, token: str, params: Mapping[str, str]) -> FakeConnection:
        self.attempts += 1
        if self.plan:
            answer = self.plan.pop(0)
            if answer == "down":
                raise TransportError("connection refused")
            if isinstance(answer, str) and answer.startswith("403 retry after "):
                raise HandshakeRejected(403, "blocked", float(answer.rsplit(" ", 1)[1]))
            raise HandshakeRejected(int(answer))
        conn = FakeConnection(token, params)
        self.connections.put_nowait(conn)
        return conn

    async def next(self) -> FakeConnection:
        async with asyncio.timeout(5):
            return await self.connections.get()

    async def close(self) -> None:
        return None


def hello(seq: int, *, resumed_from: int | None = None) -> dict[str, Any]:
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
        "limits": {},
    }
    if resumed_from is not None:
        payload["resumed_from"] = resumed_from
    return {"type": "system.hello", "trace_id": "t", "payload": payload}


def scene(seq: int) -> dict[str, Any]:
    payload = {"scene_number": seq, "scene_id": f"s{seq}", "title": "T", "options": []}
    return {"type": "scene.update", "seq": seq, "trace_id": "t", "payload": payload}


def result(seq: int, action_id: str) -> dict[str, Any]:
    payload = {"action_id": action_id, "character_id": "aria", "outcome": "success"}
    return {"type": "action.result", "seq": seq, "trace_id": "t", "payload": payload}


def error(code: str, action_id: str) -> dict[str, Any]:
    in_reply_to = {"trace_id": None, "type": "action.request", "action_id": action_id}
    payload = {"code": code, "message": "m", "retryable": False, "in_reply_to": in_reply_to}
    return {"type": "system.error", "trace_id": "t", "payload": payload}


class Harness:
    def __init__(self, **kwargs: Any) -> None:
        self.transport = FakeTransport()
        self.delays: list[float] = []

        async def sleep(delay: float) -> None:
            self.delays.append(delay)

        kwargs.setdefault("token", "tok-1")
        self.client = PartyClient(
            URL,
            transport=self.transport,
            backoff=Backoff(base=0.5, cap=30.0, random=lambda: 0.5),
            sleep=sleep,
            **kwargs,
        )
        self.seen: Subscription = self.client.events()

    async def party_seqs(self, count: int) -> list[int]:
        seqs: list[int] = []
        async with asyncio.timeout(5):
            async for event in self.seen:
                if isinstance(event, PartyEvent):
                    seqs.append(event.seq)
                    if len(seqs) == count:
                        return seqs
        return seqs


async def test_a_gap_closes_and_reconnects_without_a_resume_point() -> None:
    h = Harness()
    h.client.start()
    first = await h.transport.next()
    assert first.params == {} and first.token == "tok-1"
    first.push(hello(3), scene(4), scene(4), scene(6))  # a duplicate, then a gap
    second = await h.transport.next()
    assert first.client_close == 1000
    assert second.params == {}  # resync: a fresh snapshot, not a resume
    second.push(hello(6), scene(7))
    assert await h.party_seqs(2) == [4, 7]  # 4 once; 6 was never applied
    assert h.client.state.scene_number == 7
    await h.client.close()


async def test_a_drop_resumes_from_the_last_applied_seq() -> None:
    h = Harness()
    h.client.start()
    first = await h.transport.next()
    first.push(hello(3), scene(4))
    assert await h.party_seqs(1) == [4]
    first.server_close(1011)
    second = await h.transport.next()
    assert second.params == {"epoch": "ep", "last_seq": "4"}
    second.push(hello(6, resumed_from=4), scene(5), scene(6))
    assert await h.party_seqs(2) == [5, 6]
    await h.client.close()


async def test_pending_actions_are_resent_with_their_id_and_in_flight_keeps_waiting() -> None:
    h = Harness()
    h.client.start()
    first = await h.transport.next()
    first.push(hello(0))
    acting = asyncio.create_task(h.client.send_action("combat", {"move": "parry"}))
    sent = await first.next_sent()
    action_id = sent["payload"]["action_id"]
    assert sent["payload"]["character_id"] == "aria" and sent["payload"]["campaign_run_id"] == "r1"
    first.server_close(1001)
    second = await h.transport.next()
    second.push(hello(0, resumed_from=0))
    resent = await second.next_sent()
    assert resent == sent  # the same action_id (and the same message)
    second.push(error("action_in_flight", action_id))
    second.push(result(1, action_id))
    done = await asyncio.wait_for(acting, 5)
    assert done.action_id == action_id and done.seq == 1
    await h.client.close()


async def test_an_error_for_a_pending_action_rejects_it() -> None:
    h = Harness()
    h.client.start()
    conn = await h.transport.next()
    conn.push(hello(0))
    acting = asyncio.create_task(h.client.send_action("choice", {"option": "x"}, action_id="a9"))
    await conn.next_sent()
    conn.push(error("action_rejected", "a9"))
    with pytest.raises(ActionFailed) as failed:
        await asyncio.wait_for(acting, 5)
    assert failed.value.code == "action_rejected" and failed.value.action_id == "a9"
    await h.client.close()


@pytest.mark.parametrize("code", [1000, 1008])
async def test_no_reconnect_after_left_or_policy(code: int) -> None:
    h = Harness()
    h.client.start()
    conn = await h.transport.next()
    conn.push(hello(0))
    await h.client.connect()
    pending = asyncio.create_task(h.client.send_action("combat"))
    await conn.next_sent()
    conn.server_close(code)
    await asyncio.wait_for(h.client.wait_closed(), 5)
    assert h.transport.attempts == 1
    with pytest.raises(ClientClosed):
        await pending
    await h.client.close()


async def test_backoff_grows_on_failures_and_resets_after_a_hello() -> None:
    h = Harness()
    h.transport.plan = ["down", "down", 503]
    h.client.start()
    conn = await h.transport.next()
    assert h.delays == [0.25, 0.5, 1.0]  # 0.5 × min(30, 0.5 × 2**n): full jitter, random = 0.5
    conn.push(hello(0))
    await h.client.connect()
    conn.server_close(1001)
    await h.transport.next()
    assert h.delays[-1] == 0.25  # a session that reached its hello resets the backoff
    await h.client.close()


async def test_max_attempts_gives_up() -> None:
    h = Harness(max_attempts=3)
    h.transport.plan = ["down"] * 10
    with pytest.raises(ClientClosed, match="3 failed attempts"):
        await h.client.connect()
    assert h.transport.attempts == 3


async def test_failing_connects_are_said_as_a_warning_from_the_third(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong URL or a server that is down (new user's probe: the client retried in silence)."""
    h = Harness(max_attempts=4)
    h.transport.plan = ["down"] * 10
    with caplog.at_level("INFO", logger="party_sync.client.client"), pytest.raises(ClientClosed):
        await h.client.connect()
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "cannot connect" in r.message]
    assert [level for level, _ in said] == ["INFO", "INFO", "WARNING", "WARNING"]
    assert "3 attempts in a row, retrying" in said[2][1]
    assert "4 attempts in a row, giving up (max_attempts)" in said[3][1]  # (said "retrying")


async def test_a_401_without_a_provider_is_final_and_403_always_is() -> None:
    h = Harness()
    h.transport.plan = [401]
    with pytest.raises(ConnectRefused) as refused:
        await h.client.connect()
    assert refused.value.status == 401
    tokens = iter(["t1", "t2"])

    async def provider() -> str:
        return next(tokens)

    h = Harness(token_provider=provider, token=None)
    h.transport.plan = [403]
    with pytest.raises(ConnectRefused):
        await h.client.connect()


async def test_a_401_fetches_a_new_token_from_the_provider() -> None:
    tokens = iter(["t1", "t2"])

    async def provider() -> str:
        return next(tokens)

    h = Harness(token_provider=provider, token=None)
    h.transport.plan = [401]
    h.client.start()
    conn = await h.transport.next()
    assert conn.token == "t2"
    conn.push(hello(0))
    connected = await h.seen.next_of(Connected)
    assert connected.resumed is False
    await h.client.close()


async def test_a_plain_token_provider_is_called_like_an_async_one() -> None:
    """Outside probe: ``token_provider=lambda: token`` (the JS client takes a plain function)
    failed every attempt with "object str can't be used in 'await' expression", logged as a
    passing failure, for ever."""
    tokens = iter(["t1", "t2"])
    h = Harness(token_provider=lambda: next(tokens), token=None)
    h.transport.plan = [401]
    h.client.start()
    conn = await h.transport.next()
    assert conn.token == "t2"
    conn.push(hello(0))
    await h.seen.next_of(Connected)
    await h.client.close()


@pytest.mark.parametrize("given", [None, b"bytes", ""])
async def test_a_token_provider_that_gives_no_token_stops_the_client_and_says_so(
    given: object,
) -> None:
    """A provider that returns no token is a programming error no retry mends: the client
    stops with ``ClientClosed`` naming it, instead of dialling for ever."""
    h = Harness(token_provider=lambda: given, token=None)
    with pytest.raises(ClientClosed, match="token_provider returned"):
        await h.client.connect()
    assert h.transport.attempts == 0


async def test_a_fresh_token_refused_too_stops_the_client() -> None:
    """The provider's tokens are not the server's (another secret): one refresh, then stop,
    instead of dialling for ever."""
    calls: list[int] = []

    async def provider() -> str:
        calls.append(1)
        return f"bad-{len(calls)}"

    h = Harness(token_provider=provider)
    h.transport.plan = [401, 401, 401]
    with pytest.raises(ConnectRefused) as refused:
        await h.client.connect()
    assert refused.value.status == 401 and calls == [1] and h.transport.attempts == 2


async def connected(h: Harness, seq: int) -> FakeConnection:
    """Start ``h``'s client and answer its first connection with a hello at ``seq``."""
    h.client.start()
    conn = await h.transport.next()
    conn.push(hello(seq))
    await h.client.connect()
    return conn


@pytest.mark.parametrize("refusal", [401, 403])
async def test_a_client_that_stops_while_reconnecting_says_so_with_a_last_disconnected(
    refusal: int,
) -> None:
    """Clients probe: cut off, then its handshake refused (its token expired meanwhile, no
    ``token_provider``): the client stopped, but the last ``Disconnected`` the app had said
    ``reconnecting`` (the JS client says "closed"): an app showed "reconnecting" for ever."""
    h = Harness()
    conn = await connected(h, 0)
    h.transport.plan = [refusal]
    conn.server_close(1006)
    cut = await h.seen.next_of(Disconnected)
    assert cut.reconnecting is True
    await asyncio.wait_for(h.client.wait_closed(), 5)
    stopped = await h.seen.next_of(Disconnected)
    assert stopped.reconnecting is False and str(refusal) in stopped.reason
    assert stopped.code is None  # no close ended it (not the 1006 told before)
    assert isinstance(h.client.error, ConnectRefused)


async def test_an_expired_token_without_a_provider_says_so_and_does_not_reconnect() -> None:
    h = Harness()
    conn = await connected(h, 0)
    conn.server_close(4001)
    gone = await h.seen.next_of(Disconnected)
    assert (gone.code, gone.reconnecting) == (4001, False)
    await asyncio.wait_for(h.client.wait_closed(), 5)
    assert isinstance(h.client.error, ClientClosed) and "token_provider" in str(h.client.error)
    assert h.transport.attempts == 1 and h.delays == []


async def test_an_operators_block_is_waited_out_and_a_longer_one_stops_the_client() -> None:
    """Clients probe: a handshake refused 403 with ``Retry-After`` (an operator's block until a
    time) stopped the Python client for good, where the JavaScript client tries again then.
    It waits the block out (and a moment), not counted as a failure; a block longer than
    ``MAX_BLOCK_WAIT`` (a day) stops it, as any other 403."""
    h = Harness(max_attempts=1)
    h.transport.plan = ["403 retry after 60", "403 retry after 5"]
    h.client.start()
    conn = await h.transport.next()
    assert h.delays == [60.5, 5.5]  # its end, and random() of a second (0.5)
    conn.push(hello(0))
    await h.seen.next_of(Connected)
    await h.client.close()
    assert await h.client.leave() is False  # stopped first: it did not leave (README)

    h = Harness()
    h.transport.plan = ["403 retry after 86401"]
    with pytest.raises(ConnectRefused):
        await h.client.connect()


def test_retry_after_reads_seconds_and_http_dates() -> None:
    from party_sync.client.policy import retry_after_seconds

    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412420.0) == 60.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412500.0) == 0.0
    for unreadable in (None, "", "soon", "-5", "1.5e3"):
        assert retry_after_seconds(unreadable) is None


async def test_an_operators_disconnect_waits_long_before_resuming() -> None:
    h = Harness()
    conn = await connected(h, 2)
    conn.server_close(4004)
    assert (await h.seen.next_of(Disconnected)).reconnecting is True
    again = await h.transport.next()
    assert h.delays == [22.5]  # half to all of the cap (30 s), random = 0.5; not 0.25
    assert again.params == {"epoch": "ep", "last_seq": "2"}
    again.push(hello(2, resumed_from=2))
    await h.seen.next_of(Connected)
    await h.client.close()
