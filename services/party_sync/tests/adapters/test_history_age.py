"""The history's age bound over real connections, on both backends: a client away longer than
``history_max_age`` (the events it missed aged out at a later event) resyncs with a snapshot; one
away for less resumes with every event it missed (core/history.py, docs/redis.md "History")."""

from __future__ import annotations

import time

import pytest
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import make_settings, serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis

MAX_AGE = 2.0  # long enough for the fresh part of the test on a loaded machine


async def test_away_longer_than_max_age_gets_a_snapshot_away_less_resumes() -> None:
    settings = make_settings(history_max_age=MAX_AGE)
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        aria, _ = await srv.join("aria")  # connected throughout: she acts
        borin, hello = await srv.join("borin")
        epoch, borin_seq = hello["payload"]["epoch"], hello["payload"]["seq"]
        await borin.close()
        await aria.act("a1", "aria", "r1")  # borin misses these ...
        await aria.until("scene.update")
        await aria.until("party.leave")  # ... and his own leave (after the grace)
        published = time.time()
        # every event so far is older than MAX_AGE now; the next event drops them
        await wait_until(lambda: time.time() > published + MAX_AGE + 0.05, timeout=MAX_AGE + 5)

        cora, hello = await srv.join("cora")  # her join is that next event
        cora_seq = hello["payload"]["seq"]
        await cora.close()
        await aria.until("party.leave")
        await aria.act("a2", "aria", "r1")
        scene = await aria.until("scene.update")

        borin, hello = await srv.join("borin", epoch=epoch, last_seq=borin_seq)
        assert hello["payload"]["resumed"] is False  # his next event aged out: a snapshot
        assert hello["payload"]["seq"] >= scene["seq"]
        assert hello["payload"]["scene_number"] == 2

        cora, hello = await srv.join("cora", epoch=epoch, last_seq=cora_seq)
        p = hello["payload"]
        assert p["resumed"] is True and p["resumed_from"] == cora_seq
        replay = [await cora.recv() for _ in range(p["seq"] - cora_seq)]
        assert [m["seq"] for m in replay] == list(range(cora_seq + 1, p["seq"] + 1))
        assert "a2" in [m["payload"].get("action_id") for m in replay]
        for client in (aria, borin, cora):
            await client.close()
