"""Several events of one party in one step (``Backend.publish_many``, ``publish_all``): one script
call and ONE pub/sub message in Redis mode, decoded once, the events delivered together in seq
order; every event checked before any is recorded; engines written against ``publish`` alone keep
working. (The differential test compares the operation with the embedded backend on generated
stories; here: what only Redis has, the wire, and the publishers.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import orjson
import pytest
from party_sync.backends.base import Backend, BackendSettings
from party_sync.backends.keys import PARTY_KEYS
from party_sync.backends.memory import MemoryBackend
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.backends.redis_scripts import (
    PARTY_SCRIPTS,
    _source,
    key_layout,
    prelude_for,
    script_text,
)
from party_sync.backends.redis_stream import decode
from party_sync.core.events import Event
from party_sync.core.transient import Transient
from party_sync.engine.http_host import ApiPublisher
from party_sync.engine.interface import BatchPublisher, publish_all
from party_sync.protocol.errors import IdempotencyKeyReused, InvalidEvent, NarrationConflict
from party_sync.protocol.schemas import Contracts
from party_sync.publishing import BackendPublisher
from ps_testkit.client import wait_until
from ps_testkit.redis_server import RedisServer

pytestmark = pytest.mark.redis

PARTY = "p-many"


class Listener:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.ticks: list[int] = []  # the loop iteration each event came in
        self.tick = 0

    def on_event(self, event: Event) -> None:
        self.events.append(event)
        self.ticks.append(self.tick)

    def on_direct(self, character_id: str, data: bytes) -> None:
        return None

    def on_resync(self, epoch: str | None = None) -> None:
        return None

    def on_transient(self, items: Sequence[Transient]) -> None:
        return None


def result(action_id: str, character: str = "aria") -> dict[str, Any]:
    return {
        "action_id": action_id,
        "character_id": character,
        "action_type": "skill_check",
        "outcome": "success",
        "state": {"hp": 9, "max_hp": 10, "effects": [], "scene_flags": {}},
    }


def scene(n: int) -> dict[str, Any]:
    return {
        "scene_number": n,
        "scene_id": f"s{n}",
        "title": f"Scene {n} — «the gate»",
        "narration": "Black water. \u2028 ✓",
        "options": [{"id": "A", "label": "Open"}],
        "kind": "story",
    }


@pytest.fixture
async def backend(redis_server: RedisServer) -> AsyncIterator[RedisBackend]:
    redis_server.command("FLUSHALL")
    be = RedisBackend(RedisOptions(redis_server.url), BackendSettings())
    await be.start()
    try:
        yield be
    finally:
        await be.close()


@pytest.fixture(params=["memory", "redis"])
async def be(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[Backend]:
    """A started backend of each kind (Redis: the shared private server, flushed)."""
    redis_server.command("FLUSHALL")
    started: Backend = (
        MemoryBackend()
        if request.param == "memory"
        else RedisBackend(RedisOptions(redis_server.url))
    )
    await started.start()
    try:
        yield started
    finally:
        await started.close()


async def counting_ticks(listener: Listener, stop: asyncio.Event) -> None:
    while not stop.is_set():
        listener.tick += 1
        await asyncio.sleep(0)


async def test_an_answer_is_one_message_on_the_channel_delivered_in_one_go(
    backend: RedisBackend, redis_server: RedisServer
) -> None:
    listener = Listener()
    subscription = await backend.subscribe(PARTY, listener)
    raw = backend.client.pubsub()
    await raw.subscribe(f"party:{PARTY}")
    await raw.get_message(timeout=1.0)  # the subscribe confirmation
    publisher = BackendPublisher(backend, Contracts(), lambda: 1000.0)
    assert await backend.begin_action(PARTY, "aria", "a1", 1000.0) is not None
    stop = asyncio.Event()
    ticker = asyncio.ensure_future(counting_ticks(listener, stop))
    try:
        seqs = await publish_all(
            publisher, PARTY, [("action.result", result("a1")), ("scene.update", scene(2))]
        )
        await wait_until(lambda: len(listener.events) == 2)
    finally:
        stop.set()
        await ticker
    assert seqs == [1, 2]
    assert [(e.seq, e.type) for e in listener.events] == [(1, "action.result"), (2, "scene.update")]
    assert listener.ticks[0] == listener.ticks[1]  # one message: one tick, one write per member
    accepted = await raw.get_message(timeout=1.0)  # begin_action's action.accepted
    assert accepted is not None and isinstance(decode(PARTY, accepted["data"]), list)
    message = await raw.get_message(timeout=1.0)
    assert message is not None
    decoded = decode(PARTY, message["data"])
    assert isinstance(decoded, tuple)
    assert [s.event.data for s in decoded] == [e.data for e in listener.events]
    assert orjson.loads(message["data"])["events"][1]["payload"]["title"] == "Scene 2 — «the gate»"
    assert await raw.get_message(timeout=0.2) is None  # and nothing else
    # the history has them as two events, the lock is released, the result is the final answer
    _, top, events = await backend.range(PARTY, decoded[0].epoch, 0)
    assert top == 2 and events == [e.data for e in listener.events]
    verdict = await backend.begin_action(PARTY, "aria", "a1", 1001.0)
    assert verdict.result == listener.events[0].data
    assert (await backend.begin_action(PARTY, "aria", "a2", 1001.0)).decision.value == "accept"
    await raw.aclose()  # type: ignore[no-untyped-call]
    await subscription.close()


async def test_an_invalid_event_publishes_none_of_them(be: Backend) -> None:
    publisher = BackendPublisher(be, Contracts(), lambda: 1000.0)
    with pytest.raises(InvalidEvent):
        await publisher.publish_many(
            PARTY, [("scene.update", scene(1)), ("scene.update", {"scene_number": "x"})]
        )
    with pytest.raises(InvalidEvent):  # valid, but not encodable: checked before, too
        await publisher.publish_many(
            PARTY, [("scene.update", scene(1)), ("action.result", result("a1") | {"x": 2**70})]
        )
    assert (await be.snapshot(PARTY, 1000.0)).seq == 0
    assert await publisher.publish_many(PARTY, []) == []
    assert await publisher.publish_many(PARTY, [("scene.update", scene(3))]) == [1]


async def test_an_event_larger_than_the_bound_is_refused_and_records_nothing(
    be: Backend,
) -> None:
    """An in-process engine's 5 MB ``party.state`` was taken: live members were closed 4002 and
    every snapshot after it carried it, past the bundled client's frame limit (engine probe).
    An event is bounded like an API body (``api_max_body_bytes`` and its envelope), on both
    backends, alone or in a batch, checked before anything is recorded."""
    publisher = BackendPublisher(be, Contracts(), lambda: 1000.0)
    limit = be.settings.max_event_bytes  # type: ignore[attr-defined]

    def state(flags: int) -> dict[str, Any]:  # each flag "f000001":true, 16 bytes
        return PARTY_STATE | {"flags": {f"f{i:06}": True for i in range(flags)}}

    huge = state(limit // 15)
    with pytest.raises(InvalidEvent, match=f"an event may be at most {limit}"):
        await publisher.publish(PARTY, "party.state", huge)
    with pytest.raises(InvalidEvent, match="an event may be at most"):
        await publisher.publish_many(PARTY, [("scene.update", scene(1)), ("party.state", huge)])
    assert (await be.snapshot(PARTY, 1000.0)).seq == 0
    assert await publisher.publish(PARTY, "party.state", state(limit // 17 - 100)) == 1


PARTY_STATE = {
    "status": "active",
    "run_status": "in_progress",
    "scene_number": 1,
    "characters": {"aria": {"hp": 9, "max_hp": 10, "effects": []}},
    "flags": {},
}


async def test_a_late_copy_of_a_whole_answer_publishes_nothing(be: Backend) -> None:
    """A stream worker frozen while another took its action over, then woken, publishes its
    answer again: its result is the one already out (ignored) and its ``scene.update`` is the
    scene as it was then, which a later action moved on from. Nothing of that copy may go out:
    the party would be taken back to the old scene (a fault probe saw it, seq 12 restating
    scene 1 while the party was voting in scene 2). An answer with one new result goes out."""
    listener = Listener()
    subscription = await be.subscribe(PARTY, listener)
    publisher = BackendPublisher(be, Contracts(), lambda: 1000.0)
    for action_id in ("a1", "a2"):
        assert await be.begin_action(PARTY, "aria", action_id, 1000.0) is not None
    answer = [("action.result", result("a1")), ("scene.update", scene(1))]
    assert await publisher.publish_many(PARTY, answer) == [1, 2]
    later = [("action.result", result("a2")), ("scene.update", scene(2))]
    assert await publisher.publish_many(PARTY, later) == [3, 4]
    await wait_until(lambda: len(listener.events) == 4)
    # the late copy (a scene it carries last): the first result's seq, the rest not published
    copy = [("scene.update", scene(1)), *answer, ("party.state", PARTY_STATE)]
    assert await publisher.publish_many(PARTY, copy) == [0, 1, 0, 0]
    snap = await be.snapshot(PARTY, 1000.0)
    assert snap.seq == 4 and snap.scene is not None and snap.scene["scene_number"] == 2
    # one new result among them: the answer is published (the old result is not)
    assert await be.begin_action(PARTY, "borin", "b1", 1000.0) is not None
    mixed = [*answer, ("action.result", result("b1", "borin"))]
    assert await publisher.publish_many(PARTY, mixed) == [1, 5, 6]
    await wait_until(lambda: len(listener.events) == 6)
    assert [(e.seq, e.type) for e in listener.events[4:]] == [
        (5, "scene.update"),
        (6, "action.result"),
    ]
    snap = await be.snapshot(PARTY, 1000.0)
    assert snap.scene is not None and snap.scene["scene_number"] == 1
    await subscription.close()


async def test_an_answer_under_a_key_is_published_once(be: Backend) -> None:
    """An answer without an action.result (to a join, a re-statement) has nothing to be known
    by but the key its engine gives it: a copy under the same key (a worker woken after another
    published it, a retry whose answer was lost) publishes nothing and gets the first seqs."""
    publisher = BackendPublisher(be, Contracts(), lambda: 1000.0)
    join = [("scene.update", scene(1)), ("party.state", PARTY_STATE)]
    assert await publisher.publish_many(PARTY, join, key="join-1") == [1, 2]
    assert await publisher.publish_many(PARTY, [("scene.update", scene(2))]) == [3]
    assert await publisher.publish_many(PARTY, join, key="join-1") == [1, 2]  # the copy
    one = [("scene.update", scene(1))]
    # the key's call was another (here: its first event alone): refused, nothing published
    with pytest.raises(IdempotencyKeyReused):
        await publisher.publish_many(PARTY, one, key="join-1")
    assert await publisher.publish_many(PARTY, one, key="solo") == [4]  # one event, keyed
    assert await publisher.publish_many(PARTY, one, key="solo") == [4]
    snap = await be.snapshot(PARTY, 1000.0)
    assert snap.seq == 4 and snap.scene is not None and snap.scene["scene_number"] == 1
    assert await publisher.publish_many(PARTY, join, key="join-2") == [5, 6]  # another key
    with pytest.raises(InvalidEvent):
        await publisher.publish_many(PARTY, join, key="not a key")
    # a single event, then a batch under its key (a hostile probe: answered [4, 5, 6], two
    # seqs never published, the next publish then got 5), and a batch then a longer one
    for n, (first, then) in enumerate(((one, join + one), (join, join + join))):
        sent = await publisher.publish_many(PARTY, first, key=f"reused-{n}")
        with pytest.raises(IdempotencyKeyReused):
            await publisher.publish_many(PARTY, then, key=f"reused-{n}")
        assert await publisher.publish_many(PARTY, first, key=f"reused-{n}") == sent
    # as many events, other bodies: the key names the publish (the documented retry answer)
    assert await publisher.publish_many(PARTY, list(reversed(join)), key="reused-1") == [8, 9]
    snap = await be.snapshot(PARTY, 1000.0)
    assert snap.seq == 6 + 1 + 2  # only the first request under each key was published


class OldPublisher:
    """A publisher written before ``publish_many`` (a test double, a third party's)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str]] = []

    async def publish(
        self, party_id: str, type: str, payload: Mapping[str, Any], *, trace_id: str | None = None
    ) -> int:
        self.published.append((party_id, type))
        return len(self.published)


async def test_publish_all_falls_back_to_one_publish_per_event() -> None:
    old = OldPublisher()
    assert not isinstance(old, BatchPublisher)
    seqs = await publish_all(old, PARTY, [("action.result", result("a1")), ("scene.update", {})])  # type: ignore[arg-type]
    assert seqs == [1, 2]
    assert old.published == [(PARTY, "action.result"), (PARTY, "scene.update")]


async def test_the_backend_publisher_and_the_http_hosts_have_the_batch_path() -> None:
    backend = MemoryBackend()
    assert isinstance(BackendPublisher(backend, Contracts(), lambda: 0.0), BatchPublisher)
    # over the events API's batch route (test_http_api.py)
    assert isinstance(ApiPublisher("http://127.0.0.1:9", "k" * 24), BatchPublisher)


def test_each_script_gets_the_prelude_it_uses_and_no_more() -> None:
    lib = _source("_lib")
    header = lib[: lib.index("\nlocal function")]
    for name in PARTY_SCRIPTS:
        prelude = prelude_for(lib, _source(name))
        assert prelude.startswith(header)
        assert len(prelude) < len(lib)
    claim = prelude_for(lib, _source("claim_action"))
    assert "local function release_lock" in claim and "local function parse_lock" in claim
    assert "local function append" not in claim and "local function fold" not in claim
    publish = prelude_for(lib, _source("publish"))
    for needed in ("append", "fold", "touch", "touch_written", "ensure_epoch", "written_by"):
        assert f"local function {needed}(" in publish
    assert "local NOTHING" in publish and "local TOUCH_SLACK_MS" in publish


def test_a_script_is_given_only_the_party_keys_it_names() -> None:
    lib = _source("_lib")

    def layout(name: str) -> list[str] | None:
        found = key_layout(prelude_for(lib, _source(name)) + "\n" + _source(name))
        return None if found is None else [PARTY_KEYS[i] for i in found]

    assert layout("begin_action") == ["locks"]  # then its action record
    assert layout("range") == ["meta", "history"]
    for name in ("publish", "publish_many", "snapshot", "narrate"):  # touch(), KEYS[12], ...
        assert layout(name) is None
    begin = script_text(lib, _source("begin_action"))
    assert "local K_LOCKS, K_ACTION = KEYS[1], KEYS[2]\n" in begin
    assert "local K_META" not in begin
    head = script_text(lib, _source("head"))  # more than four: the header's lines of four
    first = "local K_META, K_HISTORY, K_MEMBERS, K_NAMES = KEYS[1], KEYS[2], KEYS[3], KEYS[4]\n"
    second = "local K_ONLINE, K_STATE, K_VOTE, K_BALLOTS = KEYS[5], KEYS[6], KEYS[7], KEYS[8]\n"
    assert first + second in head
    publish = script_text(lib, _source("publish"))  # unchanged: all eleven, then KEYS[12]
    assert lib[: lib.index("\nlocal EPOCH")] in publish


def test_a_message_of_several_events_is_sliced_by_its_lengths() -> None:
    one = b'{"seq":1,"type":"scene.update","payload":{"t":"\xc3\xa9,]"},"trace_id":"t"}'
    two = b'{"seq":2,"type":"party.state","payload":{},"trace_id":"t"}'
    raw = b'{"epoch":"E","lengths":[%d,%d],"events":[%s,%s]}' % (len(one), len(two), one, two)
    decoded = decode(PARTY, raw)
    assert isinstance(decoded, tuple)
    assert [(s.epoch, s.event.seq, s.event.data) for s in decoded] == [("E", 1, one), ("E", 2, two)]
    assert decoded[0].event.payload == {"t": "é,]"}
    wrong = raw.replace(b"[%d," % len(one), b"[%d," % (len(one) - 1))
    assert decode(PARTY, wrong) is None  # ignored (logged): the node repairs from history


async def test_a_new_piece_of_an_answered_actions_narration_is_refused(be: Backend) -> None:
    """The final text went out with the action's result: an engine woken after another one
    answered the action, narrating on, sent pieces that reached every member after the party
    had moved on (a fault probe saw 29 of them, 4 s after the next scene). A new piece of that
    action's narration is refused (``NarrationConflict``); a retry of one taken still is not."""
    publisher = BackendPublisher(be, Contracts(), lambda: 1000.0)
    assert await be.begin_action(PARTY, "aria", "a1", 1000.0) is not None
    await publisher.narrate(PARTY, "n-1", 0, "Black ", action_id="a1")
    await publisher.narrate(PARTY, "n-1", 1, "water ", action_id="a1")
    await publisher.narrate(PARTY, "n-2", 0, "Elsewhere ", action_id="other")
    await publish_all(publisher, PARTY, [("action.result", result("a1"))])
    await publisher.narrate(PARTY, "n-1", 1, "water ", action_id="a1")  # a retry: taken
    with pytest.raises(NarrationConflict, match="result was published"):
        await publisher.narrate(PARTY, "n-1", 2, "rises.", action_id="a1")
    with pytest.raises(NarrationConflict, match="result was published"):
        await publisher.narrate(PARTY, "n-3", 0, "A new stream", action_id="a1")
    await publisher.narrate(PARTY, "n-2", 1, "goes on.", action_id="other")  # not answered
    await publisher.narrate(PARTY, "n-4", 0, "No action", done=True)
