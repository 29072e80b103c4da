"""A gateway on a private redis-server that stalls (SIGSTOP longer than the command timeout).

Every background task keeps running through the stall; an action sent during it is answered
``backend_unavailable`` *with its action_id*, and is not wedged afterwards (a resend is accepted
and answered, not ``action_in_flight`` for the record's TTL); a refused action is never "timed
out" later by the sweep."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator

import pytest
from party_sync.gateway import Gateway
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.faults import poll
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import make_settings, serve_in_process

pytestmark = [pytest.mark.redis]

COMMAND_TIMEOUT = 0.6


@contextlib.contextmanager
def stalled(redis: RedisServer) -> Iterator[None]:
    pid = redis._proc.pid if redis._proc is not None else None
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def loops_alive(gateway: Gateway) -> int:
    """1 while the gateway's one timer (presence, votes, every deadline) runs."""
    return int(gateway.timer is not None and not gateway.timer.done())


def errors(gateway: Gateway, task: str) -> float:
    value = gateway.metrics.registry.get_sample_value(
        "party_sync_background_errors_total", {"task": task}
    )
    return value or 0.0


async def test_a_stall_wedges_nothing_and_every_background_task_survives(
    redis: RedisServer,
) -> None:
    settings = make_settings(
        redis_url=redis.url,
        engine_transport="inprocess",
        redis_command_timeout=COMMAND_TIMEOUT,
        presence_ttl=1.5,
        action_timeout=1.0,
    )
    engine = ScriptedEngine()
    async with serve_in_process(settings, engine=engine) as srv:
        assert srv.server is not None
        gateway = srv.server.gateway
        a, _ = await srv.join("aria")
        before = loops_alive(gateway)
        assert before == 1
        with stalled(redis):
            await a.act("during", "aria", "r1")
            err = await a.expect("system.error", timeout=5)
            assert err["payload"]["code"] == "backend_unavailable"
            assert err["payload"]["in_reply_to"]["action_id"] == "during"
            # the periodic tasks meet the stall, count it, and go on
            await wait_until(lambda: errors(gateway, "presence") > 0, timeout=5)
            await asyncio.sleep(3 * COMMAND_TIMEOUT)  # hold the stall past the command timeout
        assert loops_alive(gateway) == before
        # Redis ran the begin_action it had in its socket buffer late: it refused it, so the
        # same action_id is accepted now and answered (not action_in_flight for 600 s). The
        # client resends it as documented: backend_unavailable (Redis not answered the node's
        # probe yet) says "later"
        async with asyncio.timeout(10):
            while True:
                await a.act("during", "aria", "r1")
                answer = await a.recv(5)
                while answer["type"] not in ("action.accepted", "system.error"):
                    answer = await a.recv(5)
                if answer["type"] == "action.accepted":
                    break
                assert answer["payload"]["code"] == "backend_unavailable"
                await asyncio.sleep(0.1)  # the client's backoff
        result = await a.until("action.result", timeout=10)
        assert result["payload"]["action_id"] == "during"
        assert engine.count("during") == 1
        # the presence loop works again (its failures stop growing, the character is online)
        failed = errors(gateway, "presence")
        await wait_until(lambda: gateway.executor.failing == set(), timeout=10)
        assert errors(gateway, "presence") == failed
        snapshot = await gateway.backend.snapshot("p1")
        assert [m["online"] for m in snapshot.members if m["character_id"] == "aria"] == [True]
        await a.close()


async def test_a_refused_action_is_not_timed_out_later(redis: RedisServer) -> None:
    """A refusal is final: the sweep never looks at a refused action again after the timeout."""
    settings = make_settings(redis_url=redis.url, engine_transport="inprocess", action_timeout=0.3)
    engine = ScriptedEngine()
    engine.mode = "reject"
    async with serve_in_process(settings, engine=engine) as srv:
        assert srv.server is not None
        gateway = srv.server.gateway
        calls: list[str] = []
        original = gateway.backend.time_out_action

        async def counting(party_id: str, action_id: str, now: float, refusal: bytes):  # type: ignore[no-untyped-def]
            calls.append(action_id)
            return await original(party_id, action_id, now, refusal)

        gateway.backend.time_out_action = counting  # type: ignore[method-assign]
        a, _ = await srv.join("aria")
        await a.act("bad", "aria", "r1")
        assert (await a.expect("system.error"))["payload"]["code"] == "action_rejected"
        assert gateway.core.pending == {}  # the refusal reached its sender: nothing left to watch
        engine.mode = "answer"
        await a.act("next", "aria", "r1")
        await a.expect("action.result")
        await asyncio.sleep(0.6)  # two timeouts: a sweep would have run by now
        assert calls == []
        await a.close()


async def test_a_redis_that_lost_everything_makes_the_engine_restate_the_party(
    redis: RedisServer,
) -> None:
    """Lost state on Redis: a FLUSHALL (as a restart without persistence) loses the party's
    history and projection; the members' way back opens a new epoch and the engine is asked to
    re-state it."""
    settings = make_settings(redis_url=redis.url, engine_transport="inprocess", presence_ttl=1.5)
    engine = ScriptedEngine()
    async with serve_in_process(settings, engine=engine) as srv:
        a, hello = await srv.join("aria")
        await wait_until(lambda: len(engine.restates) == 1)
        redis.command("FLUSHALL")
        # nobody acts: the node's presence refresh finds aria (still connected) offline in the
        # empty party and announces her again, which opens the new epoch
        await wait_until(lambda: len(engine.restates) == 2, timeout=10)
        new_epoch = engine.restates[1].epoch
        assert new_epoch != hello["payload"]["epoch"]
        assert await a.closed() == 4003  # her stream lost continuity: she resyncs
        a, hello2 = await srv.join("aria")
        assert hello2["payload"]["epoch"] == new_epoch
        assert len(engine.restates) == 2
        await a.close()


@pytest.mark.parametrize(
    ("presence_ttl", "command_timeout"),
    [(30.0, COMMAND_TIMEOUT), (1.5, 2.0)],
    ids=["no-refresh-in-the-stall", "refreshes-while-it-syncs"],
)
async def test_a_handshake_refused_during_a_stall_puts_no_one_online_afterwards(
    redis: RedisServer, presence_ttl: float, command_timeout: float
) -> None:
    """A handshake during a stall is refused (1011), and whatever of it Redis runs when it wakes
    up leaves no member behind: no party.join, no phantom online until presence expires. (Which
    of the handshake's commands reach Redis depends on timing; the late connect itself is refused
    by the script: test_backend.py, test_a_connect_redis_runs_too_late_registers_nothing.) With
    a short presence_ttl the node's presence ticks come while the handshake waits for Redis: a
    connection still syncing is not in a refresh (the refresh, run late, would announce it)."""
    settings = make_settings(
        redis_url=redis.url,
        engine_transport="inprocess",
        redis_command_timeout=command_timeout,
        presence_ttl=presence_ttl,
    )
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        assert srv.server is not None
        gateway = srv.server.gateway
        a, _ = await srv.join("aria")
        with stalled(redis):
            b = await srv.connect("borin")
            assert await b.closed(timeout=10) == 1011  # refused: backend_unavailable
            await asyncio.sleep(3 * command_timeout)  # hold the stall past the command timeout
        await a.act("after", "aria", "r1")  # Redis is back, and ran what it had buffered
        await a.until("action.result", timeout=10)
        snapshot = await gateway.backend.snapshot("p1")
        online = {m["character_id"]: m["online"] for m in snapshot.members}
        assert online == {"aria": True}, online
        assert not [
            m
            for m in a.received
            if m["type"] == "party.join" and m["payload"]["character_id"] == "borin"
        ]
        await a.close()


async def test_a_handshake_refused_during_a_stall_closes_with_the_full_handshake(
    redis: RedisServer,
) -> None:
    """The 1011 of a handshake the backend could not open is the full close handshake
    (docs/protocol.md): a client that reads the ``system.error`` and then closes, without
    reading on, gets 1011. The server read the socket while that close was under way, and
    aiohttp then closed the socket at once: the client's close frame met a reset, 1006 (churn
    probe: every such connection in a Redis outage)."""
    settings = make_settings(
        redis_url=redis.url, engine_transport="inprocess", redis_command_timeout=COMMAND_TIMEOUT
    )
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        with stalled(redis):
            b = await srv.connect("borin")
            error = await b.until("system.error", timeout=10)
            assert error["payload"]["code"] == "backend_unavailable"
            await asyncio.sleep(0.3)  # (not reading: the close frame waits in the socket)
            await b.ws.close()
            assert b.ws.close_code == 1011, b.ws.exception()


async def test_the_timeout_sweep_logs_a_stall_once_and_its_end(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An action in flight whose deadline falls in a stall: its check fails at every retry,
    counted each time but logged once, and the check that works again logs the recovery."""
    settings = make_settings(
        redis_url=redis.url,
        engine_transport="inprocess",
        redis_command_timeout=COMMAND_TIMEOUT,
        action_timeout=0.5,
    )
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()  # the action stays in flight
    async with serve_in_process(settings, engine=engine) as srv:
        assert srv.server is not None
        gateway = srv.server.gateway
        a, _ = await srv.join("aria")
        await a.act("held", "aria", "r1")
        await wait_until(lambda: engine.count("held") == 1)
        with caplog.at_level("INFO", logger="party_sync"):
            with stalled(redis):
                await wait_until(lambda: errors(gateway, "action_timeouts") >= 2, timeout=10)
            await wait_until(lambda: "action_timeouts" not in gateway.executor.failing, timeout=10)
        messages = [r.getMessage() for r in caplog.records]
        assert sum(m.startswith("action_timeouts: backend unavailable") for m in messages) == 1
        assert "action_timeouts: recovered" in messages
        engine.gate.set()
        assert (await a.until("action.result", timeout=10))["payload"]["action_id"] == "held"
        await a.close()


async def test_a_stream_whose_hash_expired_in_a_stall_is_still_closed_for_the_members(
    redis: RedisServer,
) -> None:
    """Redis stalled for longer than the narration's keep time (2 x narration_idle): when it is
    back the narration hash has expired, and the members connected all along must still get
    the stream's closing piece (docs/protocol.md: closed "to the members connected then")."""
    import time

    from party_sync.core import transient

    settings = make_settings(
        redis_url=redis.url,
        engine_transport="inprocess",
        redis_command_timeout=COMMAND_TIMEOUT,
        narration_idle=1.0,  # kept_for: 2 s
    )
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        assert srv.server is not None
        backend = srv.server.gateway.backend
        a, _ = await srv.join("aria")
        piece = transient.piece(
            "s1", 0, "The tide", done=False, action_id=None, trace_id=None, now=time.time()
        )
        await backend.narrate("p1", [piece], time.time())
        first = await a.until("narration.delta")
        assert first["payload"]["index"] == 0
        with stalled(redis):
            await asyncio.sleep(3.5)  # past the idle time and the keep time
        pieces = await a.pieces("s1", timeout=10)
        assert pieces[-1]["done"] is True and pieces[-1]["index"] == 1
        assert [p["index"] for p in pieces] == [1]  # once, after the last one


async def test_presence_says_recovered_only_once_redis_answers_again(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A probe's log: "presence: recovered" 1.2 s after "presence: backend unavailable", with
    Redis still down: a tick with no connection to refresh asks Redis nothing, and counted as
    one that worked. Now only a tick that reached Redis ends the episode."""
    settings = make_settings(
        redis_url=redis.url,
        engine_transport="inprocess",
        redis_command_timeout=COMMAND_TIMEOUT,
        presence_ttl=1.5,
    )
    caplog.set_level(logging.INFO, logger="party_sync.gateway")
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        assert srv.server is not None
        gateway = srv.server.gateway
        ticks = 0
        tick_done = gateway.core.tick_done

        def counted(now: float) -> None:
            nonlocal ticks
            ticks += 1
            tick_done(now)

        gateway.core.tick_done = counted  # type: ignore[method-assign]
        with stalled(redis):
            await wait_until(lambda: errors(gateway, "presence") >= 1, timeout=15)
            after = ticks
            await wait_until(lambda: ticks >= after + 10, timeout=15)  # ticks with nothing to ask
            assert "presence: backend unavailable; retrying every tick" in caplog.messages
            assert "presence: recovered" not in caplog.messages
        a, _ = await srv.join("aria")  # a tick that asks Redis again
        await wait_until(lambda: "presence: recovered" in caplog.messages, timeout=15)
        await a.close()


async def test_in_a_stall_the_node_knows_of_a_new_connection_is_refused_without_a_timeout(
    redis: RedisServer,
) -> None:
    """Once a call timed out, the node knows Redis is not answering: each message is refused at
    once (no timeout apiece: a player's pings no longer wait behind them), and so is a new
    connection (its operator-block check waited a whole timeout before the 1011)."""
    timeout = 3.0
    settings = make_settings(
        redis_url=redis.url, engine_transport="inprocess", redis_command_timeout=timeout
    )
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        with stalled(redis):
            await a.act("first", "aria", "r1")
            assert (await a.expect("system.error", timeout=3 * timeout))["payload"][
                "code"
            ] == "backend_unavailable"  # after one timeout
            async with asyncio.timeout(timeout / 2):  # not one more timeout each
                await a.act("second", "aria", "r1")
                error = await a.expect("system.error")
                assert error["payload"]["code"] == "backend_unavailable"
                await a.send({"type": "system.ping", "trace_id": "still-here", "payload": {}})
                assert (await a.expect("system.pong"))["trace_id"] == "still-here"
                b = await srv.connect("borin")
                refused = await b.expect("system.error")
                assert refused["payload"]["code"] == "backend_unavailable"
                assert await b.closed() == 1011
        await a.close()


async def test_in_a_stall_readyz_says_503_within_a_probes_usual_timeout(
    redis: RedisServer,
) -> None:
    """Operator and HTTP probes: before any call timed out, each /readyz waited its PING's whole
    connect_timeout (2 s) and a readiness probe with the usual 1-s timeout saw a timeout instead
    of the 503. Several checks at once share one PING; once Redis answers, ready again."""
    settings = make_settings(redis_url=redis.url, engine_transport="inprocess")
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:

        async def readyz() -> int:
            async with srv.http.get(srv.base + "/readyz") as resp:
                return resp.status

        assert await readyz() == 200
        with stalled(redis):
            async with asyncio.timeout(1.5):  # the probe's 1 s, and the machine's noise
                statuses = await asyncio.gather(*(readyz() for _ in range(5)))
            assert statuses == [503] * 5

        async def ready_again() -> bool:
            return await readyz() == 200

        await poll(ready_again, 10.0, "/readyz 200 once Redis answers")
