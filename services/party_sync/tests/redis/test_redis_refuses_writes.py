"""A Redis that answers but refuses every write: out of memory under ``noeviction`` (memory probe).

Players are told ``backend_unavailable`` as in a stall and lose nothing; ``/readyz`` says 503
(it said "ready" while every action was refused); the refusals are logged as one WARNING per
``REFUSED_FOR`` naming the reason (it was one ERROR per player message, hundreds in seconds);
everything is back on its own once memory is."""

from __future__ import annotations

import logging

import pytest
from party_sync.backends import redis_scripts
from party_sync.backends.redis_scripts import REFUSED_FOR, Refusals
from ps_testkit.engines import ScriptedEngine
from ps_testkit.faults import poll
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import make_settings, serve_in_process
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

pytestmark = [pytest.mark.redis]


async def test_out_of_memory_is_an_outage_players_and_readyz_see_and_one_line_says(
    redis: RedisServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (refusals are counted per process: this test's own, not those of the tests before it)
    monkeypatch.setattr(redis_scripts, "REFUSALS", Refusals())
    caplog.set_level(logging.WARNING, "party_sync.backends.redis_scripts")
    settings = make_settings(redis_url=redis.url, engine_transport="inprocess")
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:

        async def readyz() -> int:
            async with srv.http.get(srv.base + "/readyz") as resp:
                return resp.status

        aria, _ = await srv.join("aria")
        assert await readyz() == 200
        redis.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        redis.command("CONFIG", "SET", "maxmemory", "1")  # every write refused: OOM
        try:
            for n in range(8):
                await aria.act(f"oom-{n}", "aria", "r1")
                error = await aria.until("system.error")
                assert error["payload"]["code"] == "backend_unavailable"
                assert error["payload"]["in_reply_to"]["action_id"] == f"oom-{n}"
            assert await readyz() == 503
        finally:
            redis.command("CONFIG", "SET", "maxmemory", "0")
        lines = [r for r in caplog.records if "redis refuse" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]  # 8 refusals, one line
        assert lines[0].levelno == logging.WARNING and "OOM" in lines[0].getMessage()

        async def ready_again() -> bool:
            return await readyz() == 200

        await poll(ready_again, REFUSED_FOR + 5.0, "/readyz 200 once Redis takes writes")
        for n in range(8):  # the same actions, sent again: each answered once
            await aria.act(f"oom-{n}", "aria", "r1")
            result = await aria.until("action.result")
            assert result["payload"]["action_id"] == f"oom-{n}"
        await aria.close()


def test_refusals_are_one_line_per_interval_and_each_count_is_told_where_it_belongs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Memory probe: the refusals after an episode's last line were told with the first line of
    the next episode, minutes later, as if they were its own."""
    caplog.set_level(logging.WARNING, "party_sync.backends.redis_scripts")
    refusals, oom = Refusals(), OutOfMemoryError("command not allowed", status_code="OOM")
    for tick in range(12):  # an episode: a refusal every second for 12 s
        refusals.refused("begin_action", oom, now=100.0 + tick)
    assert refusals.refusing(111.0) == "OOM command not allowed"
    assert refusals.refusing(111.0 + REFUSED_FOR) is None  # ready again 5 s after the last
    refusals.refused("publish", oom, now=400.0)  # the next episode, minutes later
    refusals.refused("range", ResponseError("ERR bad script"), now=900.0)  # a bug of ours
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("WARNING", "redis refuses writes: OOM command not allowed (refused begin_action)"),
        (
            "WARNING",
            "redis refuses writes: OOM command not allowed (refused begin_action; 4 more since "
            "the last such line)",
        ),
        (
            "WARNING",
            "redis refuses writes: OOM command not allowed (refused begin_action; 4 more since "
            "the last such line)",
        ),
        (
            "WARNING",
            "redis refuses writes: OOM command not allowed (refused publish; 1 more after the "
            "last line of the one before, 289 s ago)",
        ),
        ("ERROR", "redis refused range: ERR bad script"),
    ]


def test_a_read_only_refusal_is_logged_but_leaves_the_node_ready() -> None:
    """READONLY is an old master's answer in a failover's second; the connections follow the
    failover by themselves, so it does not make /readyz say 503 for 5 s on every node."""
    refusals = Refusals()
    refusals.refused("publish", ReadOnlyError("You can't write", status_code="READONLY"), now=10)
    assert refusals.refusing(10.5) is None
