"""Live narration end to end: the reference engine narrating through a real server (both
backends) to ``PartyClient``s, with a reconnect in the middle of the stream.

The engine's pacing (``sleep``) is held by the test: each piece waits for a permit, so "in the
middle of the stream" is a condition the test sets, never a timing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from campaign_engine.engine import ReferenceEngine
from party_sync.client import (
    ActionAccepted,
    ActionResult,
    AiohttpTransport,
    Backoff,
    Connected,
    Disconnected,
    NarrationDelta,
    PartyClient,
    SceneChanged,
    Subscription,
)
from ps_testkit.client import wait_until
from ps_testkit.servers import Running, serve_in_process, token

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis


class Pacer:
    """The engine's ``sleep``: a piece goes out once the test allowed it."""

    def __init__(self) -> None:
        self.permits = asyncio.Semaphore(0)

    async def sleep(self, delay: float) -> None:
        await self.permits.acquire()

    def allow(self, pieces: int) -> None:
        for _ in range(pieces):
            self.permits.release()


class Screen:
    """What a player sees: each hello's restated streams, then every reported piece."""

    def __init__(self, client: PartyClient) -> None:
        self.client = client
        self.text: dict[str, str] = {}
        self.deciding: set[str] = set()
        client.on(Connected, self.connected)
        client.on(NarrationDelta, self.piece)
        client.on(ActionAccepted, lambda e: self.deciding.add(e.action_id))
        client.on(ActionResult, lambda e: self.deciding.discard(e.action_id))

    def connected(self, event: Connected) -> None:
        self.text = {sid: s.text for sid, s in self.client.state.narration.items()}
        self.deciding = set(self.client.state.actions_in_flight)

    def piece(self, event: NarrationDelta) -> None:
        self.text[event.stream_id] = self.text.get(event.stream_id, "") + event.text


def make_client(srv: Running, character: str, **kwargs: Any) -> PartyClient:
    async def no_wait(delay: float) -> None:
        await asyncio.sleep(0)

    kwargs.setdefault("sleep", no_wait)
    return PartyClient(
        srv.ws_url,
        token=token(character),
        transport=AiohttpTransport(srv.http),
        backoff=Backoff(random=lambda: 0.0),
        **kwargs,
    )


async def next_of(sub: Subscription, kind: type[Any]) -> Any:
    async with asyncio.timeout(10):
        return await sub.next_of(kind)


async def test_every_member_sees_the_narration_once_across_a_reconnect_mid_stream() -> None:
    pacer = Pacer()
    engine = ReferenceEngine(seed=5, narration_speed=80, sleep=pacer.sleep)
    reconnect = asyncio.Event()

    async def gated(delay: float) -> None:
        await reconnect.wait()  # borin comes back when the test says so

    async with serve_in_process(engine=engine) as srv:
        aria = make_client(srv, "aria")
        borin = make_client(srv, "borin", sleep=gated)
        try:
            await aria.connect()
            await borin.connect()
            await wait_until(lambda: borin.state.scene is not None)  # the run has begun
            screen = Screen(borin)
            seen = borin.events()
            option = borin.state.scene["options"][0]["id"]  # type: ignore[index]
            acting = asyncio.create_task(aria.send_action("choice", {"option": option}))

            accepted = await next_of(seen, ActionAccepted)
            assert accepted.character_id == "aria" and accepted.action_type == "choice"
            assert screen.deciding == {accepted.action_id}  # "the game master is deciding…"
            pacer.allow(3)
            await wait_until(lambda: any(s.index == 2 for s in borin.state.narration.values()))
            (stream_id,) = borin.state.narration
            assert borin.state.narration[stream_id].action_id == accepted.action_id

            assert srv.server is not None
            for session in [s for s in srv.server.gateway.sessions if s.character_id == "borin"]:
                session.close(4002, "dropped by the test")
            await next_of(seen, Disconnected)
            pacer.allow(2)  # pieces 3 and 4 go out while borin is away
            await wait_until(lambda: any(s.index == 4 for s in aria.state.narration.values()))
            reconnect.set()
            hello = await next_of(seen, Connected)
            restated = hello.hello["narration"]
            assert [s["stream_id"] for s in restated] == [stream_id] and restated[0]["index"] == 4
            assert [a["action_id"] for a in hello.hello["actions_in_flight"]] == [
                accepted.action_id
            ]
            assert screen.deciding == {accepted.action_id}

            pacer.allow(10_000)  # the rest
            result = await asyncio.wait_for(acting, 10)
            scene = await next_of(seen, SceneChanged)
            final = scene.payload["narration"]
            assert screen.text[stream_id] == final  # the whole text, each piece once
            await wait_until(lambda: aria.state.scene == scene.payload)
            assert aria.state.narration == borin.state.narration == {}  # final text: done with
            assert borin.state.actions_in_flight == {} and screen.deciding == set()
            assert result.action_id == accepted.action_id
        finally:
            pacer.allow(10_000)
            await aria.close()
            await borin.close()
