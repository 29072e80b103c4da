"""``ApiPublisher``: the ``EventPublisher`` of an engine behind HTTP (``party-sync engine-http``),
over party_sync's server API, against a scripted stand-in of that API on a loopback port.

``narrate`` posts each piece to ``POST /api/v1/parties/{party_id}/narration`` and retries what a
retry cannot make worse (a 5xx, a lost connection, a timeout: party_sync takes a piece it already
has again, with no effect); 409 is ``NarrationConflict``, another 4xx ``InvalidEvent``, retries
spent ``BackendUnavailable``. ``publish`` retries the same, each event under an
``Idempotency-Key`` of its own, the same on every attempt (the server publishes an event once per
key, so a retry of one whose answer was lost publishes nothing). The same calls against the real
server are in ``test_http_api.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web
from party_sync.engine.http_host import ApiPublisher
from party_sync.engine.interface import EventPublisher, Narration, NarrationPiece
from party_sync.problems import problem_body
from party_sync.protocol.errors import BackendUnavailable, InvalidEvent, NarrationConflict
from ps_testkit import hosts

KEY = "api-key-0123456789abcdef0123456789"
HANG = 0  # a scripted "status": never answer (the client times out)


@dataclass
class FakeApi:
    """party_sync's server API, scripted: each request takes the next status of ``script``
    (the last one repeats); 202s answer what the real routes answer."""

    script: list[int] = field(default_factory=lambda: [202])
    requests: list[tuple[str, dict[str, str], Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.requests.append((request.path, dict(request.headers), body))
        status = self.script[min(len(self.requests), len(self.script)) - 1]
        if status == HANG:
            await self.release.wait()
            status = 503
        if status == 202 and request.path.endswith("/narration"):
            return web.json_response(
                {"stream_id": body["stream_id"], "index": body["index"]}, status=202
            )
        if status == 202:
            return web.json_response({"seq": len(self.requests)}, status=202)
        code = {409: "narration_conflict", 422: "invalid_event"}.get(status, "backend_unavailable")
        detail = f"scripted {status}"
        return web.json_response(
            problem_body(status, code, detail),
            status=status,
            content_type="application/problem+json",
        )

    def bodies(self) -> list[Any]:
        return [body for _, _, body in self.requests]


@contextlib.asynccontextmanager
async def serving(fake: FakeApi) -> AsyncIterator[str]:
    """``fake`` on a loopback port: its base URL."""
    app = web.Application()
    app.router.add_post("/api/v1/parties/{party_id}/{what}", fake.handle)
    async with hosts.serving(app) as base:
        try:
            yield base
        finally:
            fake.release.set()


@contextlib.asynccontextmanager
async def opened(publisher: ApiPublisher) -> AsyncIterator[ApiPublisher]:
    await publisher.open()
    try:
        yield publisher
    finally:
        await publisher.close()


@contextlib.asynccontextmanager
async def publisher_for(fake: FakeApi, **options: Any) -> AsyncIterator[ApiPublisher]:
    async with serving(fake) as url, opened(ApiPublisher(f"{url}/", KEY, **options)) as publisher:
        yield publisher


def test_the_api_publisher_is_an_event_publisher_with_narrate() -> None:
    publisher = ApiPublisher("http://127.0.0.1:9", KEY)
    assert isinstance(publisher, EventPublisher)
    assert "send_piece" in vars(ApiPublisher)  # its own transport under the one narrate


async def test_a_piece_is_posted_with_the_key_to_the_narration_route() -> None:
    fake = FakeApi()
    async with publisher_for(fake) as publisher:
        await publisher.narrate(
            "p1", "n-1", 0, "The gate ", action_id="a-1", trace_id="0af7651916cd43dd"
        )
        await publisher.narrate("p1", "n-1", 1, "", done=True)
    assert [path for path, _, _ in fake.requests] == ["/api/v1/parties/p1/narration"] * 2
    _, headers, _ = fake.requests[0]
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["Content-Type"] == "application/json"
    assert fake.bodies() == [
        {
            "stream_id": "n-1",
            "index": 0,
            "text": "The gate ",
            "done": False,
            "action_id": "a-1",
            "trace_id": "0af7651916cd43dd",
        },
        {"stream_id": "n-1", "index": 1, "text": "", "done": True},
    ]
    # the body is the one NarrationPiece.from_json reads back
    assert NarrationPiece.from_json("p1", fake.bodies()[0]) == NarrationPiece(
        "p1", "n-1", 0, "The gate ", False, "a-1", "0af7651916cd43dd"
    )


async def test_a_narration_writer_streams_through_it() -> None:
    fake = FakeApi()
    async with (
        publisher_for(fake) as publisher,
        Narration(publisher, "p1", "n-w", action_id="a-2") as story,
    ):
        for token in ("Rain ", "on ", "iron."):
            await story.write(token)
    assert [(b["index"], b["text"], b["done"]) for b in fake.bodies()] == [
        (0, "Rain ", False),
        (1, "on ", False),
        (2, "iron.", False),
        (3, "", True),
    ]
    assert {b["stream_id"] for b in fake.bodies()} == {"n-w"}
    assert {b["action_id"] for b in fake.bodies()} == {"a-2"}


async def test_a_5xx_and_a_timeout_are_retried_with_the_same_piece() -> None:
    fake = FakeApi(script=[503, HANG, 502, 202])
    async with publisher_for(fake, retries=3, timeout=0.3) as publisher:
        await publisher.narrate("p1", "n-2", 0, "Once")
    assert len(fake.requests) == 4
    assert fake.bodies() == [{"stream_id": "n-2", "index": 0, "text": "Once", "done": False}] * 4


async def test_retries_spent_is_backend_unavailable() -> None:
    fake = FakeApi(script=[503])
    async with publisher_for(fake, retries=2) as publisher:
        with pytest.raises(BackendUnavailable, match="n-3"):
            await publisher.narrate("p1", "n-3", 0, "lost")
    assert len(fake.requests) == 3  # the first try and 2 retries


async def test_an_unreachable_server_is_backend_unavailable() -> None:
    fake = FakeApi()
    async with publisher_for(fake) as reachable:
        base = reachable.base_url
    publisher = ApiPublisher(base, KEY, retries=1)  # the stand-in has stopped: refused
    await publisher.open()
    try:
        with pytest.raises(BackendUnavailable):
            await publisher.narrate("p1", "n-4", 0, "nobody")
    finally:
        await publisher.close()
    assert fake.requests == []


async def test_409_is_a_narration_conflict_with_the_servers_detail_and_is_not_retried() -> None:
    fake = FakeApi(script=[409])
    async with publisher_for(fake) as publisher:
        with pytest.raises(NarrationConflict, match="scripted 409"):
            await publisher.narrate("p1", "n-5", 7, "a gap")
    assert len(fake.requests) == 1


async def test_another_4xx_is_invalid_event_not_a_conflict_and_is_not_retried() -> None:
    fake = FakeApi(script=[422])
    async with publisher_for(fake) as publisher:
        with pytest.raises(InvalidEvent, match=r"\(422\): scripted 422") as raised:
            await publisher.narrate("p1", "n-6", 0, "odd")
    assert not isinstance(raised.value, NarrationConflict)
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({"stream_id": "n 7"}, "stream_id"),
        ({"index": -1}, "index"),
        ({"index": True}, "index"),
        ({"text": "x" * 20_001}, "text"),
        ({"action_id": "a/1"}, "action_id"),
        ({"trace_id": ""}, "trace_id"),
    ],
)
async def test_a_malformed_piece_is_refused_before_anything_is_sent(
    arguments: dict[str, Any], reason: str
) -> None:
    fake = FakeApi()
    piece: dict[str, Any] = {"stream_id": "n-7", "index": 0, "text": "ok", **arguments}
    async with publisher_for(fake) as publisher:
        with pytest.raises(InvalidEvent, match=reason):
            await publisher.narrate(
                "p1",
                piece.pop("stream_id"),
                piece.pop("index"),
                piece.pop("text"),
                **piece,
            )
    assert fake.requests == []


# -- publish keeps its rules through the shared request loop -----------------------------------


async def test_publish_retries_a_5xx_and_returns_the_seq() -> None:
    fake = FakeApi(script=[503, 202])
    async with publisher_for(fake) as publisher:
        seq = await publisher.publish("p1", "party.state", {"status": "active"}, trace_id="t-1")
    assert seq == 2
    assert [path for path, _, _ in fake.requests] == ["/api/v1/parties/p1/events"] * 2
    assert fake.bodies()[0] == {
        "type": "party.state",
        "payload": {"status": "active"},
        "trace_id": "t-1",
    }


async def test_publish_refused_is_invalid_event_and_is_not_retried() -> None:
    fake = FakeApi(script=[422])
    async with publisher_for(fake) as publisher:
        with pytest.raises(InvalidEvent, match="422"):
            await publisher.publish("p1", "party.state", {})
    assert len(fake.requests) == 1


def keys_of(fake: FakeApi) -> list[str]:
    return [headers["Idempotency-Key"] for _, headers, _ in fake.requests]


async def test_a_publish_that_timed_out_or_was_cut_is_sent_again_under_its_own_key() -> None:
    fake = FakeApi(script=[HANG, 503, 202, 202])
    async with publisher_for(fake, retries=3, timeout=0.3) as publisher:
        assert await publisher.publish("p1", "party.state", {}) == 3
        assert await publisher.publish("p1", "party.state", {}) == 4
    keys = keys_of(fake)
    assert len(keys) == 4 and keys[0] == keys[1] == keys[2] != keys[3]  # one per event
    assert all(re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", key) for key in keys)
    fake = FakeApi(script=[HANG])
    async with publisher_for(fake, retries=1, timeout=0.3) as publisher:
        with pytest.raises(BackendUnavailable):
            await publisher.publish("p1", "party.state", {})
    assert len(set(keys_of(fake))) == 1 and len(fake.requests) == 2


async def test_a_publish_whose_connection_dropped_after_it_was_sent_is_published_once() -> None:
    """The node took the request and the connection dropped before its answer (a node killed
    mid-request): the retry goes to the next node under the same key, and the party's stream
    (one, shared by both, as on one Redis) holds the event once."""
    published: dict[str, int] = {}  # key → seq: what the server side keeps

    async def drop_after_publishing(request: web.Request) -> web.StreamResponse:
        key = request.headers["Idempotency-Key"]
        published.setdefault(key, len(published) + 1)
        assert request.transport is not None
        request.transport.close()  # published, then gone without an answer
        return web.Response(status=202)

    async def answer(request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        return web.json_response({"seq": published.setdefault(key, len(published) + 1)}, status=202)

    async with contextlib.AsyncExitStack() as stack:
        urls = []
        for handler in (drop_after_publishing, answer):
            app = web.Application()
            app.router.add_post("/api/v1/parties/{party_id}/events", handler)
            urls.append(await stack.enter_async_context(hosts.serving(app)))
        publisher = await stack.enter_async_context(opened(ApiPublisher(urls, KEY, retries=1)))
        assert await publisher.publish("p1", "party.state", {}) == 1
        assert await publisher.publish("p1", "party.state", {}) == 2
    assert list(published.values()) == [1, 2]  # two events, each once


# -- several party_sync nodes: what a retry would send again goes to the next -----------------


async def dead_url() -> str:
    """A loopback URL nothing listens on (a node that died): connections are refused."""
    async with serving(FakeApi()) as url:
        pass
    return url


async def test_a_dead_node_is_passed_over_at_once_and_the_live_one_kept() -> None:
    live = FakeApi(script=[202, 202, 201, 201])  # a vote is answered 201
    dead = await dead_url()
    async with serving(live) as url:
        publisher = ApiPublisher(f"{dead}, {url}/", KEY, retries=0)  # PARTY_SYNC_URL's form
        assert publisher.base_urls == [dead, url]
        async with opened(publisher):
            assert await publisher.publish("p1", "party.state", {}) == 1  # retries=0: no backoff
            await publisher.narrate("p1", "n-1", 0, "on")
            await publisher.start_vote("p1", "Which way?", [{"id": "A", "label": "Left"}], 30.0)
            assert publisher.base_url == url  # the node that answered is kept
        # a vote first: moved on to the next node, not retried
        async with opened(ApiPublisher([dead, url], KEY)) as voter:
            await voter.start_vote("p1", "Which way?", [{"id": "A", "label": "Left"}], 30.0)
    assert [path.rsplit("/", 1)[1] for path, _, _ in live.requests] == [
        "events",
        "narration",
        "votes",
        "votes",
    ]


async def test_a_5xx_is_sent_again_to_the_next_node_and_all_failing_is_unavailable() -> None:
    sick, well = FakeApi(script=[503]), FakeApi()
    async with (
        serving(sick) as first,
        serving(well) as second,
        opened(ApiPublisher([first, second], KEY, retries=1)) as publisher,
    ):
        await publisher.publish("p1", "party.state", {})
        assert (len(sick.requests), len(well.requests)) == (1, 1)
    both = FakeApi(script=[503]), FakeApi(script=[503])
    async with (
        serving(both[0]) as first,
        serving(both[1]) as second,
        opened(ApiPublisher([first, second], KEY, retries=2)) as publisher,
    ):
        with pytest.raises(BackendUnavailable):
            await publisher.publish("p1", "party.state", {})
    # each node once, then the two retries around them
    assert (len(both[0].requests), len(both[1].requests)) == (2, 2)


async def test_a_publish_that_timed_out_is_sent_to_the_next_node_under_its_key() -> None:
    slow, other = FakeApi(script=[HANG]), FakeApi()
    async with (
        serving(slow) as first,
        serving(other) as second,
        opened(ApiPublisher([first, second], KEY, timeout=0.3)) as publisher,
    ):
        assert await publisher.publish("p1", "party.state", {}) == 1
        assert publisher.base_url == second
    assert (len(slow.requests), len(other.requests)) == (1, 1)
    assert keys_of(slow) == keys_of(other)  # the same publish: a node that had it publishes none


@contextlib.contextmanager
def hanging_listener() -> Iterator[str]:
    """A loopback URL whose connects hang (a host gone without refusing: SYNs dropped): a
    listener whose accept queue is full and never served."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):  # fill the queue; the rest of the connects wait
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        yield f"http://127.0.0.1:{port}"
    finally:
        for filler in fillers:
            filler.close()
        server.close()


async def test_a_node_whose_connects_hang_is_passed_over_after_the_connect_timeout() -> None:
    live = FakeApi(script=[202, 201])  # a vote is answered 201
    with hanging_listener() as hanging:
        async with (
            serving(live) as url,
            opened(ApiPublisher([hanging, url], KEY, retries=0, timeout=1.0)) as publisher,
        ):
            assert await publisher.publish("p1", "party.state", {}) == 1
            assert publisher.base_url == url
            publisher._current = 0  # as if the hanging one had answered last
            await publisher.start_vote("p1", "Which way?", [{"id": "A", "label": "L"}], 30.0)
            assert publisher.base_url == url
    assert len(live.requests) == 2


async def test_requests_at_the_same_time_each_go_round_the_nodes_on_their_own() -> None:
    """Ten publishes at once, the first node dead: each fails over to the live one by itself
    (a shared pointer flipped by one request's failure does not send another back)."""
    live = FakeApi()
    dead = await dead_url()
    async with (
        serving(live) as url,
        opened(ApiPublisher([dead, url], KEY, retries=0)) as publisher,
    ):
        seqs = await asyncio.gather(
            *(publisher.publish("p1", "party.state", {}) for _ in range(10))
        )
    assert sorted(seqs) == list(range(1, 11)) and publisher.base_url == url
