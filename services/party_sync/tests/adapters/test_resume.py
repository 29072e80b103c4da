"""Resume on the embedded backend: all of the missed events or a fresh snapshot, never part."""

from __future__ import annotations

from typing import Any

import pytest
from ps_testkit.client import Client
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import Running, make_settings, serve_in_process, token

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis


async def _act(srv: Running, n: int, who: str = "aria") -> list[dict[str, Any]]:
    """``n`` actions by ``who``, each followed to its scene.update; returns the events seen."""
    client, _ = await srv.join(who)
    seen: list[dict[str, Any]] = []
    for i in range(n):
        await client.act(f"{who}-{i}", who, "r1")
        seen.append(await client.until("action.result"))
        seen.append(await client.expect("scene.update"))
    await client.close()
    return seen


async def test_reconnect_with_last_seq_replays_exactly_the_missed_events_then_live() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        b, hello = await srv.join("borin")
        epoch = hello["payload"]["epoch"]
        last = hello["payload"]["seq"]
        await b.close()
        missed = await _act(srv, 3)  # aria joins, acts 3 times, leaves (after grace)
        b, resumed = await srv.join("borin", epoch=epoch, last_seq=last)
        p = resumed["payload"]
        assert p["resumed"] is True and p["resumed_from"] == last
        replay = [await b.recv() for _ in range(p["seq"] - last)]
        assert [m["seq"] for m in replay] == list(range(last + 1, p["seq"] + 1))
        replayed_results = [m for m in replay if m["type"] == "action.result"]
        assert replayed_results == [m for m in missed if m["type"] == "action.result"]
        # then live, continuing the sequence
        a, _ = await srv.join("aria")
        await a.act("live", "aria", "r1")
        live = await b.until("action.result")
        assert live["payload"]["action_id"] == "live"
        assert live["seq"] > p["seq"]
        await a.close()
        await b.close()


async def test_wrong_epoch_gets_a_snapshot_not_a_replay() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        await _act(srv, 1)
        b, hello = await srv.join("borin", epoch="not-the-epoch", last_seq=1)
        assert hello["payload"]["resumed"] is False
        assert "resumed_from" not in hello["payload"]
        assert hello["payload"]["scene_number"] == 1
        # the next message is live, after the snapshot's seq (nothing replayed)
        a, _ = await srv.join("cora")
        join = await b.expect("party.join")
        assert join["seq"] > hello["payload"]["seq"]
        await a.close()
        await b.close()


async def test_a_gap_larger_than_max_replay_gets_a_snapshot() -> None:
    async with serve_in_process(make_settings(max_replay=3), engine=ScriptedEngine()) as srv:
        b, hello = await srv.join("borin")
        epoch, last = hello["payload"]["epoch"], hello["payload"]["seq"]
        await b.close()
        await _act(srv, 3)  # ≥ 7 events
        b, again = await srv.join("borin", epoch=epoch, last_seq=last)
        assert again["payload"]["resumed"] is False
        assert again["payload"]["scene_number"] == 3
        await b.close()


async def test_last_seq_from_the_future_gets_a_snapshot() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        b, hello = await srv.join("borin")
        epoch = hello["payload"]["epoch"]
        await b.close()
        b, again = await srv.join("borin", epoch=epoch, last_seq=999)
        assert again["payload"]["resumed"] is False
        await b.close()


async def test_resume_at_the_head_replays_nothing() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        b, hello = await srv.join("borin")
        epoch, last = hello["payload"]["epoch"], hello["payload"]["seq"]
        await b.close()
        b, again = await srv.join("borin", epoch=epoch, last_seq=last)
        assert again["payload"]["resumed"] is True and again["payload"]["seq"] == last
        await a.act("after", "aria", "r1")
        assert (await b.expect("action.result"))["seq"] == last + 1
        await a.close()
        await b.close()


async def test_a_last_seq_that_is_not_plain_ascii_digits_gets_a_snapshot() -> None:
    """``last_seq`` is a decimal integer: other Unicode digits ("١" is 1 to Python's int) are
    not read as one; the join still works, from a snapshot."""
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        b, hello = await srv.join("borin")
        epoch = hello["payload"]["epoch"]
        await b.close()
        for odd in ("\u0661", "1\u0662", "+1", " 1", "1.0"):
            params = {"token": token("borin"), "epoch": epoch, "last_seq": odd}
            client = Client(await srv.http.ws_connect(srv.ws_url, params=params))
            again = await client.expect("system.hello")
            assert again["payload"]["resumed"] is False, odd
            await client.close()
