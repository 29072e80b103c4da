"""Whatever event opens a party's new epoch, the engine is asked to re-state the party once, on the
in-process and the HTTP engine transports, on both backends (docs/engines.md, "The engine
re-states what party_sync lost"; the stream transport: tests/redis/test_restate_stream.py).

The party's short-lived state is lost as it is in production: on Redis its ``meta`` is deleted
(what the rollback fence does after a failover: docs/redis.md), on the embedded backend the party
is forgotten after ``idle_party_ttl`` with nobody connected. Then something other than a member's
join comes first: an engine's event (a late result, a timer), a leave, a ballot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from party_sync.backends.base import Backend
from party_sync.backends.memory import MemoryBackend
from party_sync.backends.redis_backend import RedisBackend
from ps_testkit.client import Client, wait_until
from ps_testkit.engines import RestatingEngine
from ps_testkit.hosts import result_for, serving
from ps_testkit.servers import Running, make_settings, serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis

#: the tests whose lost state only Redis can produce (its ``meta`` deleted while members stay)
redis_only = pytest.mark.parametrize(
    "backend_kind", [pytest.param("redis", marks=pytest.mark.redis)], indirect=True
)

KEY = "api-key-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
STATE = {
    "status": "active",
    "run_status": "in_progress",
    "scene_number": 1,
    "characters": {},
    "flags": {"timer": True},
}
OPTIONS = [{"id": "A", "label": "Storm the gate"}, {"id": "B", "label": "Sneak round"}]


def backend_of(srv: Running) -> Backend:
    assert srv.server is not None
    return srv.server.gateway.backend


async def lose_state(srv: Running, party: str = "p1") -> None:
    """The party's short-lived state is gone: Redis, the fence's work (``meta`` deleted); the
    embedded backend, an idle party forgotten (nobody connected for ``idle_party_ttl``)."""
    backend = backend_of(srv)
    if isinstance(backend, RedisBackend):
        await backend.client.delete(backend.keys.party_keys(party).meta)
        return
    assert isinstance(backend, MemoryBackend)
    held = backend._parties[party]  # the node's hub lets go of it once nobody is connected
    await wait_until(lambda: not held.listeners)
    ttl = backend.settings.idle_party_ttl
    later = time.time() + ttl + backend.settings.presence_ttl + 1
    await backend.expire(later)  # its members' presence expired (their leaves, if still online)
    await backend.expire(later + ttl + 1)  # and then idle for idle_party_ttl: forgotten
    assert await backend.admin.party(party, later) is None


async def scene_of(client: Client) -> int:
    """The scene number a new connection's ``system.hello`` shows (0: none)."""
    hello = await client.expect("system.hello")
    scene = hello["payload"].get("scene")
    return int(scene["scene_number"]) if scene else 0


async def play_one_scene(srv: Running, engine: RestatingEngine) -> None:
    """Aria joins (the party's first epoch: one re-statement, nothing to re-state yet), plays
    scene 1, and goes; the engine keeps its state."""
    a, _ = await srv.join("aria")
    await a.act("act-1", "aria", "r1")
    update = await a.until("scene.update")
    assert update["payload"]["scene_number"] == 1
    await leave(a)
    await wait_until(lambda: engine.restated == 1)


def leaving(character: str) -> dict[str, Any]:
    return {"type": "party.leave", "payload": {"character_id": character}}


async def leave(client: Client, character: str = "aria") -> None:
    """Leave on purpose and go: the leave is published now (no disconnect leave after the grace
    period can come after the state is lost and open the new epoch itself)."""
    await client.send(leaving(character))
    assert await client.closed() == 1000  # after its own party.leave
    assert any(m["type"] == "party.leave" for m in client.received)


# -- in-process ------------------------------------------------------------------------------------
async def test_an_engine_event_opening_the_epoch_gets_the_party_restated_once() -> None:
    engine = RestatingEngine()
    async with serve_in_process(engine=engine) as srv:
        await play_one_scene(srv, engine)
        await _idle(srv)
        await lose_state(srv)
        # the engine's event comes first (a timer, a late answer): seq 1 of the new epoch
        seq = await engine.started.publish("p1", "party.state", STATE, trace_id="timer-1")
        assert seq == 1
        await wait_until(lambda: engine.restated == 2)  # and its events published
        notice = engine.restates[1]
        assert (notice.party_id, notice.campaign_run_id, notice.trace_id) == ("p1", "r1", "timer-1")
        b = await srv.connect("borin")
        assert await scene_of(b) == 1  # the re-stated scene: a playable game
        # the re-stated events are in the same epoch (seq > 1): no second request, no loop
        await engine.started.publish("p1", "party.state", STATE, trace_id="timer-2")
        await b.until("party.state")
        assert len(engine.restates) == 2
        await b.close()


@redis_only  # the embedded backend forgets only a party nobody is connected to
async def test_a_connected_member_converges_on_the_restated_scene() -> None:
    engine = RestatingEngine()
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        await a.act("act-1", "aria", "r1")
        await a.until("scene.update")
        await wait_until(lambda: engine.restated == 1)
        await lose_state(srv)
        await engine.started.publish("p1", "party.state", STATE, trace_id="late-1")
        assert await a.closed() == 4003  # a new epoch: resync
        await wait_until(lambda: engine.restated == 2)  # and its events published
        a2 = await srv.connect("aria")
        assert await scene_of(a2) == 1
        assert len(engine.restates) == 2
        await a2.close()


@redis_only  # the embedded backend loses the membership with the party: no leave then
async def test_a_leave_opening_the_epoch_gets_the_party_restated_once() -> None:
    engine = RestatingEngine()
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await a.act("act-1", "aria", "r1")
        await a.until("scene.update")
        await wait_until(lambda: engine.restated == 1)
        await lose_state(srv)
        await b.send(leaving("borin"))  # seq 1 of the new epoch
        await wait_until(lambda: engine.restated == 2)  # and its events published
        assert engine.restates[1].campaign_run_id == "r1"
        assert await a.closed() == 4003
        a2 = await srv.connect("aria")
        assert await scene_of(a2) == 1
        assert len(engine.restates) == 2
        await a2.close()


@redis_only  # the embedded backend loses the vote with the party: no ballot then
async def test_a_ballot_opening_the_epoch_gets_the_party_restated_once() -> None:
    engine = RestatingEngine()
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await a.act("act-1", "aria", "r1")
        await a.until("scene.update")
        vote = await engine.started.start_vote("p1", "Left or right?", OPTIONS, 30)
        await b.until("vote.started")
        await wait_until(lambda: engine.restated == 1)
        await lose_state(srv)
        cast = {"type": "vote.cast", "payload": {"vote_id": vote["vote_id"], "option": "A"}}
        await a.send(cast)  # its vote.update is seq 1 of the new epoch
        await wait_until(lambda: engine.restated == 2)  # and its events published
        assert await b.closed() == 4003
        b2 = await srv.connect("borin")
        assert await scene_of(b2) == 1
        assert len(engine.restates) == 2
        await b2.close()


async def _idle(srv: Running) -> None:
    """Nobody is connected to the party on this node any more (its hub let go of it)."""
    assert srv.server is not None
    gateway = srv.server.gateway
    await wait_until(lambda: not gateway.core.parties.get("p1"))


# -- HTTP ------------------------------------------------------------------------------------------
@dataclass
class HttpEngine:
    """An engine behind its own HTTP service: answers actions (result, then scene 1) and
    re-states its current scene on a restate notice, both through party_sync's events API."""

    party_sync: str = ""
    scene_number: int = 0
    notices: list[dict[str, Any]] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def restates(self) -> list[dict[str, Any]]:
        return [n for n in self.notices if n["kind"] == "restate"]

    def _soon(self, *events: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self.post(*events))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def scene(self) -> dict[str, Any]:
        return {
            "type": "scene.update",
            "payload": {
                "scene_number": self.scene_number,
                "scene_id": f"scene-{self.scene_number}",
                "title": f"Scene {self.scene_number}",
                "narration": "The story goes on.",
                "options": [{"id": "A", "label": "Go on"}],
                "kind": "story",
            },
        }

    async def action(self, request: web.Request) -> web.Response:
        envelope = (await request.json())["envelope"]
        self.scene_number += 1
        self._soon(result_for(envelope), self.scene())
        return web.json_response({"status": "accepted"}, status=202)

    async def notice(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.notices.append(body)
        if body["kind"] == "restate" and self.scene_number:
            self._soon(self.scene())
        return web.json_response({}, status=202)

    async def post(self, *events: dict[str, Any]) -> None:
        async with aiohttp.ClientSession() as http:
            for event in events:
                url = f"{self.party_sync}/api/v1/parties/p1/events"
                async with http.post(url, json=event, headers=AUTH) as resp:
                    assert resp.status == 202, await resp.text()


@contextlib.asynccontextmanager
async def http_engine(engine: HttpEngine) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/actions", engine.action)
    app.router.add_post("/notices", engine.notice)
    async with serving(app, shutdown_timeout=60.0) as base:
        try:
            yield base
        finally:
            await asyncio.gather(*engine.tasks, return_exceptions=True)


async def test_over_http_an_engine_event_opening_the_epoch_sends_one_restate_notice() -> None:
    engine = HttpEngine()
    async with http_engine(engine) as base:
        settings = make_settings(
            api_key=KEY, engine_url=f"{base}/actions", engine_notice_url=f"{base}/notices"
        )
        async with serve_in_process(settings) as srv:
            engine.party_sync = srv.base
            a, _ = await srv.join("aria")
            await a.act("act-1", "aria", "r1")
            await a.until("scene.update")
            await wait_until(lambda: len(engine.restates()) == 1)
            await leave(a)
            await _idle(srv)
            await lose_state(srv)
            await engine.post({"type": "party.state", "trace_id": "timer-1", "payload": STATE})
            await wait_until(lambda: len(engine.restates()) == 2)
            notice = engine.restates()[1]
            assert (notice["party_id"], notice["campaign_run_id"]) == ("p1", "r1")
            assert notice["envelope"]["type"] == "party.restate"
            assert notice["envelope"]["trace_id"] == "timer-1"
            await wait_until(lambda: not engine.tasks)  # the re-stated scene is published
            b = await srv.connect("borin")
            assert await scene_of(b) == 1
            assert len(engine.restates()) == 2
            await b.close()
