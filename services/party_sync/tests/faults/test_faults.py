"""The fault tier (docs/redis.md, "Faults, measured").

Real ``party-sync serve`` nodes, real ``engine-worker``s hosting the reference engine and a
private ``redis-server`` (or the embedded server alone), four ``PartyClient`` players acting in a
loop with retries and resuming, and one fault per test. After each, the history check of
``ps_testkit.fault_history`` over everything every client saw and the engine's chronicle: every
action answered exactly once and applied at most once, no player told "failed" about an applied
action, seqs without gaps (or a resync), and every client converged to a fresh ``system.hello``
with a scene and its options.

Each run appends its figures (actions, answers, applied once, lost, time to recover) to
``artifacts/faults/results.jsonl`` and leaves its evidence (report, client frames, process logs)
in ``artifacts/faults/<scenario>/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from ps_testkit.fault_history import answers, check_history, sent_actions
from ps_testkit.fault_players import Player
from ps_testkit.fault_runner import (
    FaultWindow,
    Inject,
    Report,
    run_scenario,
    scenario_directory,
)
from ps_testkit.faults import (
    ACTION_TIMEOUT,
    PARTY,
    RUN,
    EmbeddedSystem,
    HttpSystem,
    RedisSystem,
    poll,
)

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(120)]

#: Redis paused longer than the node's Redis command timeout (5 s, not configurable) and than
#: presence_ttl (2 s here).
PAUSE = 6.0
#: Redis down between its kill and its restart.
REDIS_DOWN = 1.0
#: CLIENT KILL TYPE pubsub: this many times, this far apart.
PUBSUB_KILLS = 10
PUBSUB_KILL_EVERY = 0.5
#: A node frozen (SIGSTOP) this long, with an action out, before its SIGKILL.
NODE_FROZEN = 0.5


def _open_actions(player: Player) -> list[str]:
    """The player's actions sent and not answered yet."""
    got = answers(player.history)
    return [a for a in sent_actions(player.history) if a not in got]


def _verdict(report: Report) -> None:
    print(report.summary())
    assert report.passed, report.summary()


async def test_a_node_killed_its_players_move_to_the_other_node() -> None:
    system = RedisSystem(scenario_directory("node_sigkill"))

    async def inject(players: Sequence[Player]) -> FaultWindow:
        # Frozen first, until one of its players has an action out (accepted by the node or still
        # in its socket), then a moment more so the engine can answer what the node accepted:
        # the node dies holding answers it never delivered.
        node1 = system.nodes[0]
        on_node1 = [p for i, p in enumerate(players) if i % 2 == 0]
        start = time.monotonic()
        node1.signal(signal.SIGSTOP)

        async def action_out() -> bool:
            return any(_open_actions(p) for p in on_node1)

        await poll(action_out, 5.0, "an action out on node 1")
        await asyncio.sleep(NODE_FROZEN)  # holding the fault: node 1 frozen, the engine answers
        out = sorted(a for p in on_node1 for a in _open_actions(p))
        await node1.kill()
        return FaultWindow(start, time.monotonic(), {"killed": "node1 (SIGKILL)", "out": out})

    _verdict(await run_scenario("node_sigkill", "a node killed with SIGKILL", system, inject))


async def test_a_node_killed_with_its_http_deliveries_another_node_takes_them_over() -> None:
    """Engine behind HTTP: node 1 accepted actions and claimed them for its own HTTP link, and
    dies (with the engine host, frozen meanwhile: one machine lost) before the engine answered.
    Another node meets the players' resends, waits out node 1's heartbeat and takes the actions
    over (they were stuck in flight until their records expired before), so every accepted
    action still gets its one answer, applied once."""
    system = HttpSystem(scenario_directory("http_node_sigkill"))

    async def inject(players: Sequence[Player]) -> FaultWindow:
        node1, engine = system.nodes[0], system.engine
        assert engine is not None
        on_node1 = [p for i, p in enumerate(players) if i % 2 == 0]
        start = time.monotonic()
        engine.signal(signal.SIGSTOP)  # node 1's deliveries wait in the engine's socket

        async def action_out() -> bool:
            return any(_open_actions(p) for p in on_node1)

        await poll(action_out, 5.0, "an action out on node 1")
        await asyncio.sleep(NODE_FROZEN)  # holding the fault: node 1 claims and delivers
        out = sorted(a for p in on_node1 for a in _open_actions(p))
        await node1.kill()
        await engine.kill()
        await system.start_engine()
        return FaultWindow(
            start, time.monotonic(), {"killed": "node1 and engine-http (SIGKILL)", "out": out}
        )

    _verdict(
        await run_scenario(
            "http_node_sigkill", "a node killed with its HTTP deliveries", system, inject
        )
    )


def _restart_redis(system: RedisSystem) -> Inject:
    async def inject(players: Sequence[Player]) -> FaultWindow:
        start = time.monotonic()
        await asyncio.to_thread(system.redis.stop)
        await asyncio.sleep(REDIS_DOWN)  # holding the fault: Redis down for REDIS_DOWN seconds
        await asyncio.to_thread(system.redis.start)
        return FaultWindow(start, time.monotonic(), {"down_s": REDIS_DOWN, "persistence": "none"})

    return inject


async def test_redis_restarted_empty_under_load_the_game_goes_on_by_itself() -> None:
    system = RedisSystem(scenario_directory("redis_restart_empty"))
    report = await run_scenario(
        "redis_restart_empty", "Redis restarted empty, under load", system, _restart_redis(system)
    )
    _verdict(report)


async def test_redis_restarted_empty_while_idle_the_engine_restates_the_scene() -> None:
    system = RedisSystem(scenario_directory("redis_restart_empty_idle"))
    report = await run_scenario(
        "redis_restart_empty_idle",
        "Redis restarted empty, players idle",
        system,
        _restart_redis(system),
        quiet=True,
    )
    _verdict(report)


async def test_redis_restarted_empty_while_the_engine_is_frozen_mid_action() -> None:
    """Two faults at once (docs/redis.md, "Lost on purpose, and detected"): both engine workers
    frozen while one applies an action (narrating it, after its commit), node 1 that accepted it
    killed, Redis restarted empty. The player's client moves to node 2, resumes from the lost
    epoch and resends the action; node 2 never saw it and Redis holds no record that an engine
    started it. Held past ``action_timeout``, then the workers go on: the player gets one final
    answer, the action's result (not ``action_timeout`` and then the result), applied once."""
    system = RedisSystem(scenario_directory("redis_empty_engine_frozen"))
    system.env["CAMPAIGN_ENGINE_NARRATION_SPEED"] = "20"  # a second or two per action
    player: Player | None = None
    try:
        await system.start()
        player = Player("aria", system.urls, party=PARTY, run=RUN)  # node 1 first
        await player.connect()
        client, history = player.client, player.history

        async def offered() -> bool:
            return bool((client.state.scene or {}).get("options"))

        await poll(offered, 15.0, "a scene with options")
        action_id = "aria-frozen"
        sending = asyncio.ensure_future(
            client.send_action("choice", {"option": "onward"}, action_id=action_id)
        )

        async def narrating() -> bool:
            return any(
                f.kind == "recv"
                and f.message is not None
                and f.message.get("type") == "narration.delta"
                and f.message["payload"].get("action_id") == action_id
                for f in history.frames
            )

        await poll(narrating, 15.0, "the engine narrating the action")
        for worker in system.workers:
            worker.signal(signal.SIGSTOP)
        await system.nodes[0].kill()
        await asyncio.to_thread(system.redis.stop)
        await asyncio.to_thread(system.redis.start)
        node2 = system.urls[0]

        async def resent_on_node2() -> bool:
            opened = [f.conn for f in history.frames if f.kind == "open" and f.url == node2]
            return any(
                f.kind == "sent"
                and f.conn in opened
                and f.message is not None
                and f.message["payload"].get("action_id") == action_id
                for f in history.frames
            )

        await poll(resent_on_node2, 20.0, "the resend on node 2")
        await asyncio.sleep(3 * ACTION_TIMEOUT)  # holding the fault: the engine stays frozen
        assert not sending.done(), "answered while the engine was frozen"
        for worker in system.workers:
            worker.signal(signal.SIGCONT)
        async with asyncio.timeout(30.0):
            await sending
        told = [a.kind + a.code for a in answers(history)[action_id]]
        assert set(told) == {"result"}, told
        verdict = check_history([history], await system.chronicle())
        assert not verdict.problems, verdict.problems
        assert verdict.applied_once == 1, verdict.figures()
    finally:
        if player is not None:
            await player.close()
        await system.close()


async def test_redis_paused_longer_than_the_command_timeout_and_presence_ttl() -> None:
    system = RedisSystem(scenario_directory("redis_pause"))

    async def inject(players: Sequence[Player]) -> FaultWindow:
        pid = await system.redis_pid()
        start = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(PAUSE)  # holding the fault: Redis stopped for PAUSE seconds
        finally:
            os.kill(pid, signal.SIGCONT)
        return FaultWindow(start, time.monotonic(), {"paused_s": PAUSE, "signal": "SIGSTOP"})

    _verdict(
        await run_scenario("redis_pause", f"Redis paused {PAUSE:.0f} s (SIGSTOP)", system, inject)
    )


async def test_pubsub_connections_killed_repeatedly() -> None:
    system = RedisSystem(scenario_directory("pubsub_kill"))

    async def inject(players: Sequence[Player]) -> FaultWindow:
        start = time.monotonic()
        killed = []
        for i in range(PUBSUB_KILLS):
            if i:
                await asyncio.sleep(PUBSUB_KILL_EVERY)  # holding the fault: kills spaced out
            killed.append(await system.kill_pubsub())
        return FaultWindow(start, time.monotonic(), {"kills": PUBSUB_KILLS, "closed": killed})

    _verdict(
        await run_scenario(
            "pubsub_kill", f"CLIENT KILL TYPE pubsub x{PUBSUB_KILLS}", system, inject
        )
    )


async def test_an_engine_worker_killed_while_another_runs() -> None:
    system = RedisSystem(scenario_directory("worker_sigkill"))
    _verdict(
        await run_scenario(
            "worker_sigkill", "an engine worker killed with SIGKILL", system, _kill_worker(system)
        )
    )


async def test_an_engine_worker_killed_while_another_runs_on_a_partitioned_stream() -> None:
    """The same with ``actions_stream_partitions`` = 3: each worker runs three read loops; the
    dead one's entries are reclaimed from its partition by the other (docs/engines.md)."""
    system = RedisSystem(scenario_directory("worker_sigkill_partitioned"), partitions=3)
    _verdict(
        await run_scenario(
            "worker_sigkill_partitioned",
            "an engine worker killed with SIGKILL, actions stream in 3 partitions",
            system,
            _kill_worker(system),
        )
    )


def _kill_worker(system: RedisSystem) -> Inject:
    async def inject(players: Sequence[Player]) -> FaultWindow:
        # Frozen first, until it holds entries (a read it had blocked on is still served by
        # Redis), then killed: it dies with actions delivered to it and never acknowledged.
        # Frozen between two reads it has no read for Redis to serve: let it run, freeze again
        # (a loaded machine keeps it out of its read longer: the full suite once saw five
        # freezes in a row miss, so each try lets it run a little longer first).
        worker1 = system.workers[0]
        start = time.monotonic()

        async def holding() -> bool:
            return await system.pending("worker1") > 0

        tries = 15
        for attempt in range(1, tries + 1):
            worker1.signal(signal.SIGSTOP)
            try:
                await poll(holding, 2.0, "worker1 to hold entries of the actions stream")
                break
            except AssertionError:
                if attempt == tries:
                    raise
                worker1.signal(signal.SIGCONT)
                await asyncio.sleep(0.05 * attempt)  # let it run into its next blocked read
        held = await system.pending("worker1")
        await worker1.kill()
        return FaultWindow(
            start, time.monotonic(), {"killed": "worker1 (SIGKILL)", "pending_on_it": held}
        )

    return inject


def _restart_embedded(system: EmbeddedSystem) -> Inject:
    async def inject(players: Sequence[Player]) -> FaultWindow:
        start = time.monotonic()
        ready = await system.restart()
        detail = {"restart": "SIGTERM, then serve again", "kept": "engine.sqlite3"}
        return FaultWindow(start, ready, detail)

    return inject


async def test_the_embedded_server_restarted_under_load_with_the_engine_database_kept() -> None:
    system = EmbeddedSystem(scenario_directory("embedded_restart"))
    report = await run_scenario(
        "embedded_restart",
        "embedded server restarted (engine DB kept), under load",
        system,
        _restart_embedded(system),
    )
    _verdict(report)


async def test_the_embedded_server_restarted_while_idle_shows_the_scene_again() -> None:
    """A second ``make run`` with the engine's database kept: the party's scene comes back."""
    system = EmbeddedSystem(scenario_directory("embedded_restart_idle"))
    report = await run_scenario(
        "embedded_restart_idle",
        "embedded server restarted (engine DB kept), players idle",
        system,
        _restart_embedded(system),
        quiet=True,
    )
    _verdict(report)


async def test_a_vote_decision_whose_node_died_with_its_http_delivery_is_applied_once() -> None:
    """Engine behind HTTP, frozen: the node that closed a vote claims its decision's action for
    its own HTTP link, then dies with the engine host before the engine answered. The decision
    was counted as applied when it was handed to the link, and was lost; now it stays unapplied
    until the engine answers, and another node's votes sweep takes the action over from the dead
    node: every member gets the decision's result once, and the engine applied it once."""
    from ps_testkit.fault_history import events_with_epochs
    from ps_testkit.fault_players import Player
    from ps_testkit.fault_runner import CHARACTERS
    from ps_testkit.faults import PARTY, RUN

    system = HttpSystem(scenario_directory("http_vote_handover"))
    players: list[Player] = []
    try:
        await system.start()
        urls = system.urls
        for i, character in enumerate(CHARACTERS):
            mine = urls[i % 2 :] + urls[: i % 2]  # aria and cora on node 1
            players.append(Player(character, mine, party=PARTY, run=RUN))
        for player in players:
            await player.connect()

        async def scenes() -> bool:
            return all(p.client.state.scene for p in players)

        await poll(scenes, 20.0, "every player's scene")
        body = {
            "vote_id": "v-http",
            "question": "Which way?",
            "options": [{"id": "onward", "label": "On"}, {"id": "wander", "label": "Wander"}],
            "timeout_s": 60,
        }
        url = f"http://127.0.0.1:{system.ports[1]}/api/v1/parties/{PARTY}/votes"
        auth = {"Authorization": f"Bearer {HttpSystem.API_KEY}"}
        async with system.http.post(url, json=body, headers=auth) as resp:
            assert resp.status == 201, await resp.text()
        engine = system.engine
        assert engine is not None
        for player in players:  # the vote must be open everywhere before the ballots
            await poll(lambda p=player: _async(p.client.state.vote is not None), 10.0, "vote")
        engine.signal(signal.SIGSTOP)
        for player in (players[1], players[3], players[2], players[0]):  # node 1 closes it
            await player.client.cast_vote("v-http", "onward")

        async def finished() -> bool:
            return all(p.client.state.vote is None for p in players)

        await poll(finished, 10.0, "vote.finished everywhere")
        await asyncio.sleep(NODE_FROZEN)  # holding the fault: node 1 hands the decision over
        await system.nodes[0].kill()
        await engine.kill()
        await system.start_engine()

        def results(player: Player) -> set[tuple[Any, Any]]:
            """The decision's action.result as this player saw it: (epoch, seq), each once."""
            return {
                (item.epoch, item.message["seq"])
                for item in events_with_epochs(player.history)
                if item.message.get("type") == "action.result"
                and item.message["payload"].get("action_id") == "vote:v-http"
            }

        async def answered() -> bool:
            return all(results(p) for p in players)

        await poll(answered, 30.0, "the decision's result for every player")
        assert len({frozenset(results(p)) for p in players}) == 1  # the same one, everywhere
        assert all(len(results(p)) == 1 for p in players)
        assert (await system.chronicle()).count("vote:v-http") == 1
    finally:
        for player in players:
            with contextlib.suppress(Exception):
                await player.close()
        await system.close()


async def _async(value: bool) -> bool:
    return value


#: An engine that refuses every action, 1.5 s after it started it (writing its action_id to
#: ``PS_MARK`` as it starts).
SLOW_REFUSING_ENGINE = """
import asyncio, os
from party_sync.engine import EngineRejected

class Engine:
    async def start(self, publisher):
        self.publisher = publisher

    async def handle_join(self, notice): ...

    async def handle_action(self, action):
        with open(os.environ["PS_MARK"], "a") as mark:
            mark.write(action.action_id + "\\n")
        await asyncio.sleep(1.5)
        raise EngineRejected("not now")

    async def close(self): ...

def create_engine():
    return Engine()
"""


def _slow_refusing_system(name: str) -> tuple[HttpSystem, Path]:
    """``HttpSystem`` with ``SLOW_REFUSING_ENGINE`` behind ``engine-http`` and the engine host
    claiming (``PARTY_SYNC_ENGINE_HTTP_CLAIM=engine``); the file its engine marks."""
    system = HttpSystem(scenario_directory(name))
    directory = system.directory
    (directory / "ps_slow_refusing.py").write_text(SLOW_REFUSING_ENGINE)
    mark = directory / "started"
    system.engine_spec = "ps_slow_refusing:create_engine"
    system.env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(directory), system.env.get("PYTHONPATH")])
    )
    system.env["PS_MARK"] = str(mark)
    system.env["PARTY_SYNC_ENGINE_HTTP_CLAIM"] = "engine"
    return system, mark


async def _final_answer(client: Any) -> dict[str, Any]:
    """The next ``system.error`` that is not ``action_in_flight`` (the resend's first answer)."""
    async with asyncio.timeout(30):
        while True:
            message: dict[str, Any] = await client.until("system.error", 30)
            if message["payload"]["code"] != "action_in_flight":
                return message


async def test_an_engine_claimed_http_action_whose_node_dies_is_answered_through_another() -> None:
    """``PARTY_SYNC_ENGINE_HTTP_CLAIM=engine``, two nodes: the engine host claims an action that
    node 1 delivered (naming node 1, whichever node it claims through), and node 1 dies before
    the engine's refusal (the answer to node 1's POST) could be recorded. The player's resend on
    node 2 takes the action over from the dead node, its redelivery runs again (unclaimed: it was
    started), and the refusal reaches the player: one final answer. (It was none: the claim
    named the node it went through, which then never took it over; or the redelivery, without
    a deadline, could not be claimed and was retried for ten minutes: HTTP claim probe.)"""
    from ps_testkit.client import Client
    from ps_testkit.servers import token

    system, mark = _slow_refusing_system("http_claim_node_dies")
    clients: list[Client] = []
    try:
        await system.start()
        ws_urls = system.urls  # (both alive: node 1's first)
        params = {"token": token("aria", party=PARTY, run=RUN)}
        first = Client(await system.http.ws_connect(ws_urls[0], params=params))
        clients.append(first)
        await first.expect("system.hello")
        await first.act("nd-1", "aria", RUN)
        await first.until("action.accepted")
        await poll(lambda: _async(mark.exists()), 10.0, "the engine to start the action")
        await system.nodes[0].kill()

        second = Client(await system.http.ws_connect(ws_urls[1], params=params))
        clients.append(second)
        await second.expect("system.hello")
        await second.act("nd-1", "aria", RUN)  # the player's resend, on the node left
        message = await _final_answer(second)
        assert message["payload"]["code"] == "action_rejected", message
        assert message["payload"]["message"] == "not now"
        assert message["payload"]["in_reply_to"]["action_id"] == "nd-1"
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        await system.close()


async def test_a_late_engine_claim_for_a_node_that_died_is_taken_over_at_the_deadline() -> None:
    """The same, with the host frozen: node 1's POST waits in its socket, node 1 dies, the
    player's resend on node 2 finds the action unclaimed (nothing to take over), then the host
    wakes and claims it for node 1, before its deadline, and refuses it (an answer that goes to
    the dead node). At the deadline node 2 finds it started by a node that is gone and takes it
    over: its refusal reaches the player (the player waited until the record expired: HTTP
    claim probe, the window the earlier fix left)."""
    from ps_testkit.client import Client
    from ps_testkit.servers import token

    system, mark = _slow_refusing_system("http_claim_late_for_dead_node")
    system.env["PARTY_SYNC_ACTION_TIMEOUT"] = "6"  # the host wakes before it
    system.env["PARTY_SYNC_ENGINE_HTTP_TIMEOUT"] = "0.3"
    clients: list[Client] = []
    try:
        await system.start()
        engine = system.engine
        assert engine is not None
        ws_urls = system.urls
        params = {"token": token("aria", party=PARTY, run=RUN)}
        first = Client(await system.http.ws_connect(ws_urls[0], params=params))
        clients.append(first)
        await first.expect("system.hello")
        engine.signal(signal.SIGSTOP)
        await first.act("lc-1", "aria", RUN)
        await first.until("action.accepted")
        metrics = f"http://127.0.0.1:{system.ports[0]}/metrics"

        async def posted() -> bool:  # its first POST went out, and got no answer in time
            async with system.http.get(metrics) as resp:
                text = await resp.text()
            return any(
                line.startswith("party_sync_engine_link_failures_total{")
                and float(line.rsplit(" ", 1)[1]) >= 1
                for line in text.splitlines()
            )

        await poll(posted, 10.0, "node 1's delivery to time out")
        await system.nodes[0].kill()
        second = Client(await system.http.ws_connect(ws_urls[1], params=params))
        clients.append(second)
        await second.expect("system.hello")
        await second.act("lc-1", "aria", RUN)
        assert (await second.until("system.error"))["payload"]["code"] == "action_in_flight"
        engine.signal(signal.SIGCONT)
        await poll(lambda: _async(mark.exists()), 10.0, "the engine to start the action")
        message = await _final_answer(second)
        assert message["payload"]["code"] == "action_rejected", message
        assert message["payload"]["in_reply_to"]["action_id"] == "lc-1"
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        with contextlib.suppress(Exception):
            if system.engine is not None:
                system.engine.signal(signal.SIGCONT)
        await system.close()
