"""Live narration and actions seen as they happen, over real WebSockets, on both backends.

The engine streams through the same publisher every transport uses (``EventPublisher.narrate``);
every member gets every piece once and in order, a member who connects mid-stream gets the text
so far in ``system.hello`` and then the live pieces, a stream the engine leaves open is closed
after ``narration_idle``; every member sees each accepted action until its result or failure.
Every message a client receives is checked against its schema (``ps_testkit.client``).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from party_sync.engine import Narration, NarrationConflict
from ps_testkit.client import wait_until
from ps_testkit.cluster import wait_async
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import make_settings, serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis


async def test_every_member_gets_every_piece_once_in_order_and_a_late_joiner_the_text_so_far() -> (
    None
):
    engine = ScriptedEngine()
    async with serve_in_process(make_settings(), engine=engine) as srv:
        aria, _ = await srv.join("aria")
        borin, _ = await srv.join("borin")
        publisher = engine.started
        story = Narration(publisher, "p1", "n1", action_id="a-1")
        await story.write("The gate ")
        await story.write("gives way")
        await publisher.narrate("p1", "n1", 1, "gives way")  # a retry: taken, sent again to nobody
        cyra, hello = await srv.join("cyra")
        assert hello["payload"]["narration"] == [
            {"stream_id": "n1", "index": 1, "text": "The gate gives way", "action_id": "a-1"}
        ]
        await story.write(" with a shriek")
        await story.end(".")
        for client in (aria, borin):
            pieces = await client.pieces("n1")
            assert [p["index"] for p in pieces] == [0, 1, 2, 3]
            assert "".join(p["text"] for p in pieces) == "The gate gives way with a shriek."
        late = await cyra.pieces("n1")
        assert [(p["index"], p["text"], p["done"]) for p in late] == [
            (2, " with a shriek", False),
            (3, ".", True),
        ]
        _, after = await srv.join("dara")
        assert after["payload"]["narration"] == []  # an ended stream is not restated


async def test_a_piece_that_cannot_follow_is_refused_and_nothing_is_sent() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(make_settings(), engine=engine) as srv:
        aria, _ = await srv.join("aria")
        publisher = engine.started
        with pytest.raises(NarrationConflict):
            await publisher.narrate("p1", "n1", 1, "no first piece")
        await publisher.narrate("p1", "n1", 0, "first", done=True)
        with pytest.raises(NarrationConflict):
            await publisher.narrate("p1", "n1", 1, "after the last")
        pieces = await aria.pieces("n1")
        assert [(p["index"], p["text"]) for p in pieces] == [(0, "first")]


async def test_a_stream_left_open_is_closed_for_every_member_after_the_idle_time() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(make_settings(narration_idle=0.3), engine=engine) as srv:
        aria, hello = await srv.join("aria")
        assert hello["payload"]["limits"]["narration_idle_ms"] == 300
        await engine.started.narrate("p1", "n1", 0, "The engine died here")
        pieces = await aria.pieces("n1")
        assert [(p["index"], p["text"], p["done"]) for p in pieces] == [
            (0, "The engine died here", False),
            (1, "", True),
        ]
        _, later = await srv.join("borin")
        assert later["payload"]["narration"] == []
        with pytest.raises(NarrationConflict):
            await engine.started.narrate("p1", "n1", 1, "too late")


async def test_every_member_sees_an_action_in_flight_until_its_result() -> None:
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    async with serve_in_process(make_settings(), engine=engine) as srv:
        aria, _ = await srv.join("aria")
        borin, _ = await srv.join("borin")
        await aria.act("a1", "aria", "r1")
        accepted = {"action_id": "a1", "character_id": "aria", "action_type": "skill_check"}
        assert (await borin.until("action.accepted"))["payload"] == accepted
        assert (await aria.until("action.accepted"))["payload"] == accepted
        _, hello = await srv.join("cyra")
        assert hello["payload"]["actions_in_flight"] == [accepted]
        engine.gate.set()
        assert (await borin.until("action.result"))["payload"]["action_id"] == "a1"
        _, after = await srv.join("dara")
        assert after["payload"]["actions_in_flight"] == []


async def test_an_action_the_engine_rejects_is_told_failed_to_every_member() -> None:
    engine = ScriptedEngine()
    engine.mode = "reject"
    async with serve_in_process(make_settings(), engine=engine) as srv:
        aria, _ = await srv.join("aria")
        borin, _ = await srv.join("borin")
        await aria.act("a1", "aria", "r1")
        await borin.until("action.accepted")
        failed = await borin.until("action.failed")
        assert failed["payload"] == {
            "action_id": "a1",
            "character_id": "aria",
            "code": "action_rejected",
        }
        error = await aria.until("system.error")
        assert error["payload"]["code"] == "action_rejected"
        _, hello = await srv.join("cyra")
        assert hello["payload"]["actions_in_flight"] == []


async def test_an_action_an_engine_works_on_past_its_deadline_is_still_listed_in_flight() -> None:
    """A slow game master (an AI writing for longer than action_timeout): the action was started,
    so it is never timed out; a member who connects meanwhile still sees it in flight, until its
    result."""
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    async with serve_in_process(make_settings(action_timeout=0.3), engine=engine) as srv:
        aria, _ = await srv.join("aria")
        await aria.act("a1", "aria", "r1")
        await aria.until("action.accepted")
        await wait_until(lambda: engine.count("a1") == 1)  # started (claimed) by the engine
        assert srv.server is not None
        backend, deadline = srv.server.gateway.backend, engine.calls[0].deadline
        assert deadline is not None

        async def swept_and_listed() -> bool:
            # past the deadline, the node's look at the action found it started: listed again
            snapshot = await backend.snapshot("p1")
            listed = [a["action_id"] for a in snapshot.actions_in_flight]
            return time.time() > deadline and listed == ["a1"]

        await wait_async(swept_and_listed)
        _, hello = await srv.join("borin")
        assert [a["action_id"] for a in hello["payload"]["actions_in_flight"]] == ["a1"]
        engine.gate.set()
        await aria.until("action.result")
        _, after = await srv.join("cyra")
        assert after["payload"]["actions_in_flight"] == []
        assert not [m for m in aria.received if m["type"] == "action.failed"]


async def test_a_stream_its_engine_left_open_is_over_with_its_actions_result() -> None:
    """The engine's last pieces failed (a Redis stall: ``narrate`` raised) and it published the
    result, as engines.md tells it to: the stream narrating that action is closed right after
    the result (its empty last piece), not ``narration_idle`` later, and a hello after it lists
    no stream (stall probe: the hello listed it for 14 s after the result, then it closed)."""
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    async with serve_in_process(make_settings(narration_idle=30.0), engine=engine) as srv:
        aria, _ = await srv.join("aria")
        borin, _ = await srv.join("borin")
        await aria.act("a-1", "aria", "r1")
        await wait_until(lambda: engine.count("a-1") == 1)
        story = Narration(engine.started, "p1", "n1", action_id="a-1")
        await story.write("The gate ")
        engine.gate.set()  # the result, with the stream still open
        await borin.until("action.result", timeout=5.0)
        before = [m["payload"] for m in borin.received if m["type"] == "narration.delta"]
        assert [(p["index"], p["text"], p["done"]) for p in before] == [(0, "The gate ", False)]
        pieces = await borin.pieces("n1", timeout=5.0)  # (30 s before: narration_idle)
        assert [(p["index"], p["text"], p["done"]) for p in pieces] == [(1, "", True)]
        # the closing piece is the action's, as its trace id says (engine probe: a new one)
        result = next(m for m in borin.received if m["type"] == "action.result")
        (closing,) = [
            m for m in borin.received if m["type"] == "narration.delta" and m["payload"]["done"]
        ]
        assert closing["trace_id"] == result["trace_id"]
        _, later = await srv.join("cyra")
        assert later["payload"]["narration"] == []
        with pytest.raises(NarrationConflict):
            await story.write("too late")


async def test_a_stream_over_with_its_action_is_closed_for_the_next_member_to_connect() -> None:
    """No node watched the stream when its action's result came out (its members had all gone):
    the next member to connect gets its empty last piece at once after the hello, not
    ``narration_idle`` later (the backend, asked with the action the hello names, finds it
    answered)."""
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    async with serve_in_process(make_settings(narration_idle=30.0), engine=engine) as srv:
        aria, _ = await srv.join("aria")
        await aria.act("a-2", "aria", "r1")
        await wait_until(lambda: engine.count("a-2") == 1)
        story = Narration(engine.started, "p1", "n2", action_id="a-2")
        await story.write("The bridge ")
        await aria.close()
        engine.gate.set()
        await wait_until(lambda: "a-2" in engine.answered)
        cyra, _ = await srv.join("cyra")
        pieces = await cyra.pieces("n2", timeout=5.0)
        assert [(p["index"], p["text"], p["done"]) for p in pieces] == [(1, "", True)]
        _, later = await srv.join("dara")
        assert later["payload"]["narration"] == []
