"""Live narration: the engine writes each action's scene text as a ``narration.delta`` stream
before it publishes the action's events (a simulated model writing), off unless asked for.

Virtual time: the engine's ``sleep`` records the pauses instead of waiting, so nothing here is
slow and nothing asserts on the clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest
from campaign_engine import engine as engine_module
from campaign_engine import narration
from campaign_engine.campaign import Campaign, builtin_campaign
from campaign_engine.engine import ENV_NARRATION_SPEED, ReferenceEngine, create_engine
from campaign_engine.state import RunState
from campaign_engine.store import open_store
from campaign_engine.testing import (
    MAX_OPEN_STREAMS,
    NarrationPiece,
    Published,
    PublishFailed,
    RecordingPublisher,
    ScriptedRandom,
    action_request,
    join_notice,
)
from hypothesis import given
from hypothesis import strategies as st
from party_sync import devmode
from party_sync.engine import EngineRejected, NarrationConflict

SPEED = 80.0


class Clock:
    """The engine's ``sleep``: records each pause, waits for nothing."""

    def __init__(self) -> None:
        self.pauses: list[float] = []

    async def sleep(self, delay: float) -> None:
        self.pauses.append(delay)
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def narrating_publisher(schema_book: Any, publisher: RecordingPublisher) -> RecordingPublisher:
    """The recording publisher; every piece it takes is checked against narration.delta.json."""
    if schema_book is not None:
        original = publisher.narrate

        async def checked(party_id: str, stream_id: str, index: int, text: str, **kw: Any) -> None:
            schema_book.check_piece(NarrationPiece(party_id, stream_id, index, text, **kw))
            await original(party_id, stream_id, index, text, **kw)

        publisher.narrate = checked  # type: ignore[method-assign]
    return publisher


@pytest.fixture
async def narrator(narrating_publisher: RecordingPublisher, clock: Clock) -> ReferenceEngine:
    """The built-in campaign, seeded, narrating at SPEED characters per second."""
    engine = ReferenceEngine(builtin_campaign(), seed=7, narration_speed=SPEED, sleep=clock.sleep)
    await engine.start(narrating_publisher)
    return engine


def stream_text(pieces: list[NarrationPiece]) -> str:
    return "".join(p.text for p in pieces)


async def test_an_action_is_narrated_live_then_published_as_always(
    narrator: ReferenceEngine, narrating_publisher: RecordingPublisher, clock: Clock
) -> None:
    publisher = narrating_publisher
    await narrator.handle_join(join_notice("aria"))
    assert publisher.narrated == []  # a join is not narrated: only the actions
    publisher.clear()

    action = action_request("choice", {"option": "row"}, trace_id="trace-row")
    await narrator.handle_action(action)

    assert publisher.types() == ["action.result", "scene.update"]
    text = publisher.last("scene.update")["narration"]
    pieces = publisher.narrated
    assert len(pieces) > 3 and stream_text(pieces) == text  # the final text, as it was written
    assert [p.index for p in pieces] == list(range(len(pieces)))
    assert [p.done for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert {(p.party_id, p.action_id, p.trace_id) for p in pieces} == {
        ("party-1", action.action_id, "trace-row")
    }
    assert len({p.stream_id for p in pieces}) == 1
    assert publisher.open_streams() == []
    # every piece went out before the action's first event
    kinds = [type(x) for x in publisher.timeline]
    assert kinds == [NarrationPiece] * len(pieces) + [Published, Published]
    # paced like a writer: a pause before each piece, as long as the piece at SPEED
    assert len(clock.pauses) == len(pieces)
    assert clock.pauses == [pytest.approx(len(p.text) / SPEED) for p in pieces]


async def test_a_long_text_is_written_faster_never_longer_than_the_cap(
    narrating_publisher: RecordingPublisher, clock: Clock
) -> None:
    text = "word " * 400  # 2000 characters: 25 s at 80 characters per second
    done = await narration.narrate(
        narrating_publisher, "party-1", text, speed=SPEED, action_id="a-1", sleep=clock.sleep
    )
    assert done and narrating_publisher.narration(narrating_publisher.stream_ids()[0]) == text
    assert sum(clock.pauses) == pytest.approx(narration.MAX_NARRATION_SECONDS)


async def test_narration_is_off_by_default(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    assert engine.narration_speed is None
    await engine.handle_join(join_notice("aria"))
    await engine.handle_action(action_request("choice", {"option": "row"}))
    assert publisher.narrated == [] and publisher.types()[-2:] == ["action.result", "scene.update"]
    assert create_engine({ENV_NARRATION_SPEED: ""}).narration_speed is None
    assert create_engine({}).narration_speed is None


async def test_a_redelivered_action_is_not_narrated_again(
    narrator: ReferenceEngine, narrating_publisher: RecordingPublisher
) -> None:
    publisher = narrating_publisher
    await narrator.handle_join(join_notice("aria"))
    action = action_request("choice", {"option": "row"})
    await narrator.handle_action(action)
    narrated, published = len(publisher.narrated), len(publisher.published)
    assert narrated > 0

    await narrator.handle_action(action)  # party_sync redelivers it: applied already
    assert (len(publisher.narrated), len(publisher.published)) == (narrated, published + 1)
    assert publisher.types()[-1] == "action.result"  # its answer again, not narrated


async def test_a_redelivery_after_a_failed_publish_sends_the_events_without_narrating(
    narrator: ReferenceEngine, narrating_publisher: RecordingPublisher
) -> None:
    publisher = narrating_publisher
    await narrator.handle_join(join_notice("aria"))
    publisher.clear()
    action = action_request("choice", {"option": "row"})
    publisher.fail_next = 1
    with pytest.raises(PublishFailed):
        await narrator.handle_action(action)  # narrated, committed, then publishing failed
    narrated = len(publisher.narrated)
    assert narrated > 0 and publisher.published == []

    await narrator.handle_action(action)
    assert publisher.types() == ["action.result", "scene.update"]
    assert len(publisher.narrated) == narrated  # the leftovers only: no second stream
    assert len(publisher.stream_ids(action.action_id)) == 1


@pytest.mark.parametrize("fault", ["unreachable", "refused", "broken"])
async def test_a_failing_narration_never_stops_the_events(
    fault: str,
    narrating_publisher: RecordingPublisher,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """party_sync unreachable (every piece fails), refusing (a ninth open stream of the party), or
    a broken ``narrate``: a warning, and the same events as without narration."""
    publisher = narrating_publisher
    quiet = RecordingPublisher()
    engines = [
        ReferenceEngine(builtin_campaign(), seed=3, narration_speed=SPEED, sleep=clock.sleep),
        ReferenceEngine(builtin_campaign(), seed=3),
    ]
    await engines[0].start(publisher)
    await engines[1].start(quiet)
    for engine in engines:
        await engine.handle_join(join_notice("aria"))
    if fault == "unreachable":
        publisher.fail_next_narration = 1000
    elif fault == "refused":
        for n in range(MAX_OPEN_STREAMS):
            await publisher.narrate("party-1", f"n-other-{n}", 0, "…")
    else:
        publisher.narrate = None  # type: ignore[assignment,method-assign]
    with caplog.at_level(logging.WARNING, logger="campaign_engine"):
        for engine in engines:
            await engine.handle_action(action_request("skill_check", {}, action_id="a-1"))
            await engine.handle_action(action_request("choice", {"option": "row"}, action_id="a-2"))
    warnings = [r for r in caplog.records if "stopped at piece 0" in r.getMessage()]
    assert len(warnings) == 2  # one per action
    expected = [(e.type, dict(e.payload)) for e in quiet.published]
    assert [(e.type, dict(e.payload)) for e in publisher.published] == expected
    assert publisher.stream_ids("a-1") == []
    if fault == "refused":
        with pytest.raises(NarrationConflict):
            await publisher.narrate("party-1", "n-one-more", 0, "x")


async def test_a_piece_party_sync_never_answers_ends_the_narration(
    narrating_publisher: RecordingPublisher,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher = narrating_publisher
    monkeypatch.setattr(narration, "PIECE_TIMEOUT", 0.01)
    taken = publisher.narrate
    stuck = asyncio.Event()

    async def hanging(party_id: str, stream_id: str, index: int, text: str, **kw: Any) -> None:
        if index == 2:
            await stuck.wait()  # never set: a request that never gets its answer
        await taken(party_id, stream_id, index, text, **kw)

    publisher.narrate = hanging  # type: ignore[method-assign]
    engine = ReferenceEngine(builtin_campaign(), seed=7, narration_speed=SPEED, sleep=clock.sleep)
    await engine.start(publisher)
    await engine.handle_join(join_notice("aria"))
    with caplog.at_level(logging.WARNING, logger="campaign_engine"):
        await engine.handle_action(action_request("choice", {"option": "row"}))
    assert [p.index for p in publisher.narrated] == [0, 1]
    assert "stopped at piece 2: TimeoutError" in caplog.text
    assert publisher.types()[-2:] == ["action.result", "scene.update"]


async def test_every_turn_of_a_fight_is_narrated(
    narrating_publisher: RecordingPublisher, clock: Clock, arena_campaign: Campaign
) -> None:
    publisher = narrating_publisher
    dice = ScriptedRandom()
    engine = ReferenceEngine(arena_campaign, rng=dice, narration_speed=SPEED, sleep=clock.sleep)
    await engine.start(publisher)
    await engine.handle_join(join_notice("aria"))
    await engine.handle_action(action_request("choice", {"option": "enter"}, action_id="a-in"))
    dice.push(15, 5, 1)  # aria hits the rat; its d4 bite misses
    await engine.handle_action(action_request("combat", {"move": "attack"}, action_id="a-hit"))
    # a turn in the same scene: what happened is written live, not the scene's text again
    result = publisher.last("action.result")["narration"]
    assert publisher.narration(publisher.stream_ids("a-hit")[0]) == result
    assert publisher.last("scene.update")["narration"].startswith(result)
    # entering the arena (a new scene) wrote the whole new scene.update text
    entered = [e.payload["narration"] for e in publisher.published if e.type == "scene.update"]
    assert publisher.narration(publisher.stream_ids("a-in")[0]) in entered
    assert len(publisher.stream_ids()) == 2 and publisher.open_streams() == []


async def test_the_vote_choice_of_the_party_is_narrated(
    narrating_publisher: RecordingPublisher, narrator: ReferenceEngine
) -> None:
    publisher = narrating_publisher
    await narrator.handle_join(join_notice("aria"))
    await narrator.handle_join(join_notice("bram"))
    await narrator.handle_action(action_request("choice", {"option": "row"}))
    choice = publisher.finish_vote("party-1", "wade")
    await narrator.handle_action(choice)
    (stream,) = publisher.stream_ids(choice.action_id)
    assert publisher.narration(stream) == publisher.last("scene.update")["narration"]
    assert choice.action_id.startswith("vote:")


@given(st.text(max_size=300))
def test_pieces_join_back_into_the_text(text: str) -> None:
    parts = narration.pieces(text)
    assert "".join(parts) == text
    assert all(parts) and all(p.strip() or p == text for p in parts)  # a blank piece: all blank


def test_the_speed_setting() -> None:
    assert narration.parse_speed("", ENV_NARRATION_SPEED) is None
    assert narration.parse_speed(" 0 ", ENV_NARRATION_SPEED) is None  # 0: off
    assert narration.parse_speed("80", ENV_NARRATION_SPEED) == 80.0
    assert narration.parse_speed("12.5", ENV_NARRATION_SPEED) == 12.5
    for bad in ("-1", "fast", "inf", "nan", "1e9"):
        with pytest.raises(ValueError, match=ENV_NARRATION_SPEED):
            narration.parse_speed(bad, ENV_NARRATION_SPEED)
    engine = create_engine(
        {ENV_NARRATION_SPEED: "120", "CAMPAIGN_ENGINE_DATABASE_URL": "memory://"}
    )
    assert engine.narration_speed == 120.0
    with pytest.raises(ValueError, match=ENV_NARRATION_SPEED):
        create_engine({ENV_NARRATION_SPEED: "-5"})
    with pytest.raises(ValueError, match="narration_speed"):
        ReferenceEngine(narration_speed=-1)


def test_make_run_narrates_at_a_pleasant_speed_and_only_the_in_process_reference_engine() -> None:
    """``party-sync serve`` in development mode (``make run``) turns narration on for the
    reference engine in its process, unless the variable says otherwise."""
    assert devmode.ENGINE_NARRATION_ENV == ENV_NARRATION_SPEED
    speed = narration.parse_speed(devmode.DEV_NARRATION_SPEED, ENV_NARRATION_SPEED)
    assert speed is not None and 30 <= speed <= 200
    env: dict[str, str] = {}
    spec = "campaign_engine:create_engine"
    assert devmode.narrate_by_default(env, engine_in_process=True, engine_spec=spec)
    assert create_engine({**env, "CAMPAIGN_ENGINE_DATABASE_URL": "memory://"}).narration_speed
    chosen: Mapping[str, str] = {ENV_NARRATION_SPEED: "0"}
    kept = dict(chosen)
    assert not devmode.narrate_by_default(kept, engine_in_process=True, engine_spec=spec)
    assert kept == chosen  # the user's choice (off) stands
    for in_process, other in ((False, spec), (True, "mymodule:create_engine")):
        untouched: dict[str, str] = {}
        assert not devmode.narrate_by_default(
            untouched, engine_in_process=in_process, engine_spec=other
        )
        assert untouched == {}


class Workers:
    """Two engine processes (stream workers) on one database, on one virtual wall clock
    (``now``): ``first`` narrates with ``sleep`` (the test's hook into its narration), ``second``
    at once (or not at all: ``second_speed`` None). Joins ``characters`` through the first."""

    def __init__(
        self,
        store_url: str,
        sleep: Callable[[float], Awaitable[None]],
        *,
        second_speed: float | None = SPEED,
        own_clocks: bool = True,
    ) -> None:
        """``own_clocks`` False: the engines are given no clock (they take their publisher's)."""
        shared = open_store(store_url)
        other = shared if store_url == "memory://" else open_store(store_url)
        self.now = [1_000_000.0]
        clock = self.clock if own_clocks else None
        self.first = ReferenceEngine(
            builtin_campaign(),
            seed=1,
            store=shared,
            narration_speed=SPEED,
            sleep=sleep,
            clock=clock,
        )
        self.second = ReferenceEngine(
            builtin_campaign(),
            seed=2,
            store=other,
            narration_speed=second_speed,
            sleep=Clock().sleep,
            clock=clock,
        )

    def clock(self) -> float:
        return self.now[0]

    async def start(
        self, first: RecordingPublisher, second: RecordingPublisher, *characters: str
    ) -> None:
        await self.first.start(first)
        await self.second.start(second)
        for name in characters:
            await self.first.handle_join(join_notice(name))
        first.clear()

    async def in_line(self) -> None:
        """Until the second worker has found the first's events and taken its place in the
        run's line (a bounded poll of the store: no event to await across two engines)."""
        async with asyncio.timeout(10):
            while (await self.run_state()).waiter is None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    async def run_state(self) -> RunState:
        state = await self.first.run_state("run-1")
        assert state is not None
        return state

    async def close(self) -> None:
        await self.first.close()
        await self.second.close()


async def test_a_second_worker_waits_for_the_first_ones_narration_and_its_events(
    store_url: str,
) -> None:
    """Two stream workers share one database; the party's two players act at once. The first
    worker narrates its action; the second, given the other action, found the first's events
    unpublished and published them itself: the narration stopped at its first piece (party_sync
    refuses a piece of an answered action), and the first then published the result again,
    which party_sync took as new after a Redis restarted empty (a fault probe saw a result
    twice). Now the second waits for the first's events, as a second message waits in one
    process, and the narration, then the events, go out whole and in order."""
    party_sync = RecordingPublisher()  # the one party_sync both workers publish to
    row = action_request("choice", {"option": "row"}, character_id="aria", trace_id="t-row")
    look = action_request("skill_check", {}, character_id="bram", trace_id="t-look")
    behind: list[asyncio.Task[None]] = []

    async def writing(delay: float) -> None:  # the first worker's narration, in virtual time
        if not behind:  # the other player's action reaches the second worker meanwhile
            behind.append(asyncio.create_task(workers.second.handle_action(look)))
            await workers.in_line()  # it loads the run and finds the events
        workers.now[0] += delay
        await asyncio.sleep(0)

    workers = Workers(store_url, writing)
    await workers.start(party_sync, party_sync, "aria", "bram")
    await workers.first.handle_action(row)
    await asyncio.wait_for(behind[0], 10)

    pieces = [p for p in party_sync.narrated if p.action_id == row.action_id]
    assert len(pieces) > 3 and pieces[-1].done  # written to its end
    timeline = party_sync.timeline
    first_event = next(i for i, x in enumerate(timeline) if isinstance(x, Published))
    assert timeline[:first_event] == pieces  # the row's whole narration, before any event
    assert timeline[first_event].payload["action_id"] == row.action_id  # type: ignore[union-attr]
    results = [p.payload["action_id"] for p in party_sync.published if p.type == "action.result"]
    assert results == [row.action_id, look.action_id]  # each once, the row's first
    state = await workers.run_state()
    assert state.outbox == [] and state.narrating_until is None
    await workers.close()


@pytest.mark.parametrize("refused", [False, True])
async def test_a_waiting_worker_is_not_overtaken_by_the_narrators_next_message(
    store_url: str, refused: bool
) -> None:
    """A fault probe: the narrating worker's next message, queued in its own process, committed
    the moment the first one's events were out, while the other worker polled; the other
    worker's action waited through narration after narration (12 to 26 s). The waiting worker
    takes a place in the run's line, and the narrator's next message waits behind it."""
    party_sync = RecordingPublisher()
    checks = {
        name: action_request("skill_check", {}, character_id=name, trace_id=f"t-{name}")
        for name in ("aria", "bram", "cora")
    }
    if refused:  # the waiting worker's action is refused: its place in line goes with it
        checks["bram"] = action_request(
            "choice", {"option": "nowhere"}, character_id="bram", trace_id="t-bram"
        )
    behind: list[asyncio.Task[None]] = []

    async def writing(delay: float) -> None:  # the first worker narrates aria's check
        if not behind:
            behind.append(asyncio.create_task(workers.second.handle_action(checks["bram"])))
            await workers.in_line()  # bram's worker finds the lease, takes its place
            behind.append(asyncio.create_task(workers.first.handle_action(checks["cora"])))
        workers.now[0] += delay
        await asyncio.sleep(0)

    workers = Workers(store_url, writing)
    await workers.start(party_sync, party_sync, *checks)
    await workers.first.handle_action(checks["aria"])
    ended = await asyncio.wait_for(asyncio.gather(*behind, return_exceptions=True), 20)
    assert isinstance(ended[0], EngineRejected) if refused else ended[0] is None
    assert ended[1] is None

    results = [p.payload["character_id"] for p in party_sync.published if p.type == "action.result"]
    # in the order they reached the workers
    assert results == (["aria", "cora"] if refused else ["aria", "bram", "cora"])
    state = await workers.run_state()
    assert state.waiter is None and state.outbox == []
    await workers.close()


@pytest.mark.parametrize("clock", ["the engines'", "the publishers'"])
async def test_a_narrator_that_never_returns_holds_the_run_only_until_its_lease_ends(
    store_url: str, clock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first worker dies while it narrates (never publishes): the second waits until the
    lease the first took on its events runs out, then publishes them before its own.

    By the clock the engines are given, or else by their publishers' (party_sync's: Redis's),
    whatever the machine's reads (here: 1970): workers on machines whose clocks disagree took a
    live narration's lease for ended, or waited past its end (a code reading)."""
    row = action_request("choice", {"option": "row"}, character_id="aria", trace_id="t-row")
    look = action_request("skill_check", {}, character_id="bram", trace_id="t-look")
    died = asyncio.Event()

    async def dying(delay: float) -> None:
        died.set()
        await asyncio.Event().wait()  # never returns: cancelled below, as a killed worker

    own = clock == "the engines'"
    if not own:
        machine = types.SimpleNamespace(time=lambda: 0.0, monotonic=time.monotonic)
        monkeypatch.setattr(engine_module, "time", machine)
    workers = Workers(store_url, dying, own_clocks=own)
    publishers = RecordingPublisher(clock=workers.clock), RecordingPublisher(clock=workers.clock)
    await workers.start(*publishers, "aria", "bram")
    dead = asyncio.create_task(workers.first.handle_action(row))
    await asyncio.wait_for(died.wait(), 10)
    dead.cancel()
    state = await workers.run_state()
    assert state.outbox and state.narrating_until is not None
    waiting = asyncio.create_task(workers.second.handle_action(look))
    await workers.in_line()
    assert not waiting.done()  # the lease holds
    workers.now[0] = state.narrating_until + 0.01  # it runs out
    await asyncio.wait_for(waiting, 10)
    state = await workers.run_state()
    assert state.outbox == [] and row.action_id in state.applied
    await workers.close()


async def test_a_narrator_whose_events_another_worker_dropped_answers_its_player(
    store_url: str,
) -> None:
    """The first worker is frozen mid-narration past its lease; the second settles the first's
    events but cannot publish them (party_sync unreachable) and drops them. The first wakes: its
    action's result alone goes out, so that its player is answered (the scene of then is not)."""
    row = action_request("choice", {"option": "row"}, character_id="aria", trace_id="t-row")
    look = action_request("skill_check", {}, character_id="bram", trace_id="t-look")
    unreachable = RecordingPublisher()
    unreachable.fail_next = 1_000
    frozen = False

    async def freezing(delay: float) -> None:
        nonlocal frozen
        if not frozen:
            frozen = True
            workers.now[0] += 60  # frozen past its lease
            with pytest.raises(PublishFailed):  # settles (drops) the row's events, then fails
                await workers.second.handle_action(look)
        await asyncio.sleep(0)

    workers = Workers(store_url, freezing, second_speed=None)
    party_sync = RecordingPublisher()
    await workers.start(party_sync, unreachable, "aria", "bram")
    await workers.first.handle_action(row)
    assert frozen
    assert party_sync.types() == ["action.result"]
    assert party_sync.published[0].payload["action_id"] == row.action_id
    assert row.action_id in (await workers.run_state()).dropped
    await workers.close()


async def test_a_worker_woken_after_another_took_its_action_over_publishes_nothing_stale(
    store_url: str,
) -> None:
    """Two stream workers share one database. The first commits the party's row to the reef and
    is stopped while it narrates (frozen past the stream's claim-idle time); the second is given
    the action again, finds it applied and publishes its events, and the party acts on at the
    reef. The first wakes: it must not publish its copy of the events (its ``scene.update`` is
    the harbor's answer, the party's scene of before): a fault probe saw such a copy take a
    party back to an old scene while it voted in the next one."""
    shared = open_store(store_url)
    other = shared if store_url == "memory://" else open_store(store_url)
    row = action_request("choice", {"option": "row"}, character_id="aria", trace_id="t-row")
    look = action_request("skill_check", {}, character_id="bram", trace_id="t-look")
    second = ReferenceEngine(builtin_campaign(), seed=2, store=other)
    pub_two = RecordingPublisher()
    taken_over = False

    async def frozen(delay: float) -> None:  # the first worker's narration pauses
        nonlocal taken_over
        if not taken_over:
            taken_over = True
            await second.handle_action(row)  # redelivered: applied already, its events go out
            await second.handle_action(look)  # the party acts on, at the reef
        await asyncio.sleep(0)

    first = ReferenceEngine(
        builtin_campaign(), seed=1, store=shared, narration_speed=SPEED, sleep=frozen
    )
    pub_one = RecordingPublisher()
    await first.start(pub_one)
    await second.start(pub_two)
    await first.handle_join(join_notice("aria"))
    await first.handle_join(join_notice("bram"))
    pub_one.clear()

    await first.handle_action(row)

    assert taken_over and pub_one.narrated  # it narrated, and was overtaken meanwhile
    # after it woke: nothing, not even the action's result again (the second published it:
    # after a Redis restarted empty party_sync would not know it, and the party got it twice)
    assert pub_one.types() == []
    assert pub_two.types()[:2] == ["action.result", "scene.update"]  # the row's, by the second
    assert pub_two.published[0].payload["action_id"] == row.action_id
    assert pub_two.last("scene.update")["scene_number"] == 2
    assert [d.action_id for d in await second.chronicle("run-1")] == [
        row.action_id,
        look.action_id,
    ]
    state = await second.run_state("run-1")
    assert state is not None and state.outbox == []
    await first.close()
    await second.close()
