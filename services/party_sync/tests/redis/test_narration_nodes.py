"""Live narration and actions in flight across two gateway nodes sharing one Redis: a member on
the other node gets every piece and every ``action.accepted``; a member who connects there
mid-stream gets the text so far in ``system.hello``."""

from __future__ import annotations

import asyncio

import pytest
from party_sync.engine import Narration, NarrationConflict
from ps_testkit.engines import ScriptedEngine
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import make_settings, serve_in_process


@pytest.mark.redis
async def test_narration_and_actions_reach_members_on_another_node(
    redis_server: RedisServer,
) -> None:
    redis_server.command("FLUSHALL")
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    settings = make_settings(redis_url=redis_server.url, engine_transport="inprocess")
    async with (
        serve_in_process(settings, engine=engine) as one,
        serve_in_process(settings, engine=ScriptedEngine()) as two,
    ):
        aria, _ = await one.join("aria")
        borin, _ = await two.join("borin")
        await aria.act("a1", "aria", "r1")
        assert (await borin.until("action.accepted"))["payload"]["action_id"] == "a1"
        story = Narration(engine.started, "p1", "n1", action_id="a1")
        await story.write("Across ")
        await story.write("nodes")
        cyra, hello = await two.join("cyra")
        assert hello["payload"]["narration"][0]["text"] == "Across nodes"
        assert [a["action_id"] for a in hello["payload"]["actions_in_flight"]] == ["a1"]
        await story.end("!")
        assert "".join(p["text"] for p in await borin.pieces("n1")) == "Across nodes!"
        assert [p["index"] for p in await cyra.pieces("n1")] == [2]
        engine.gate.set()
        assert (await borin.until("action.result"))["payload"]["action_id"] == "a1"


@pytest.mark.redis
async def test_a_stream_whose_state_redis_lost_is_refused_and_the_answer_still_comes(
    redis_server: RedisServer,
) -> None:
    """Redis restarted empty (here: flushed) in the middle of a stream: the stream's text is
    short-lived state and is gone with the rest; its next piece is refused (the engine ends its
    narration there), and the action's answer still reaches the party."""
    redis_server.command("FLUSHALL")
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    settings = make_settings(redis_url=redis_server.url, engine_transport="inprocess")
    async with serve_in_process(settings, engine=engine) as srv:
        aria, _ = await srv.join("aria")
        await aria.act("a1", "aria", "r1")
        await aria.until("action.accepted")
        story = Narration(engine.started, "p1", "n1", action_id="a1")
        await story.write("Before the ")
        assert (await aria.until("narration.delta"))["payload"]["index"] == 0
        redis_server.command("FLUSHALL")
        with pytest.raises(NarrationConflict):
            await story.write("loss")
        engine.gate.set()
        # the answer is published into a new epoch: the client is told to resync, and its
        # snapshot has the result's scene and no stream
        code = await aria.closed(timeout=10)
        assert code == 4003
        _, hello = await srv.join("aria")
        assert hello["payload"]["narration"] == []
        assert hello["payload"]["scene"] is not None
