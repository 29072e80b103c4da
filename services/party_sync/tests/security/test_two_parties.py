"""Two parties side by side on two real nodes sharing a private redis-server: hostile input in
party A (generated frames, and hand-made attempts to reach B) never reaches party B's clients,
and B is still served on both nodes after every case.

"Nothing of A reached B" is checked structurally on every message B's clients received: only
B's hello, B's members joining or leaving, and the answers (``action.result``, ``scene.update``)
to B's own ping actions; nothing may carry A's marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ps_testkit.client import Client, wait_until
from ps_testkit.cluster import Cluster
from ps_testkit.security_fuzz import EXAMPLES, MAX_BYTES, Frame, cases, play
from ps_testkit.servers import SECRET, Running

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

KEY = "api-key-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MARK = "zqx"  # in everything party A is sent by hand
B_PARTY, B_RUN = "party-b", "run-b"
B_CHARACTERS = ("bard", "bolt")
_pings = itertools.count(1)


@dataclass
class Reader:
    client: Client
    seen: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                self.seen.append(await self.client.recv(timeout=120))


@dataclass
class World:
    nodes: tuple[Running, Running]
    b: tuple[Reader, Reader]
    pings: set[str] = field(default_factory=set)

    async def check_b(self) -> None:
        """Nothing of A reached B, and B is served across both nodes."""
        action_id = f"b-ping-{next(_pings)}"
        self.pings.add(action_id)
        await self.b[0].client.act(action_id, "bard", B_RUN)
        for reader in self.b:
            await wait_until(lambda r=reader: _result(r.seen, action_id), timeout=10)  # type: ignore[misc]
        for reader in self.b:
            for message in reader.seen:
                assert_of_b(message, self.pings)
            assert MARK.encode() not in b"".join(reader.client.raw)


def _result(seen: list[dict[str, Any]], action_id: str) -> bool:
    return any(
        m["type"] == "action.result" and m["payload"]["action_id"] == action_id for m in seen
    )


def assert_of_b(message: dict[str, Any], pings: set[str]) -> None:
    type_, p = message["type"], message["payload"]
    if type_ == "system.hello":
        assert p["party_id"] == B_PARTY and p["campaign_run_id"] == B_RUN, message
    elif type_ in ("party.join", "party.leave"):
        assert p["character_id"] in B_CHARACTERS, message
    elif type_ in ("action.result", "action.accepted", "action.failed"):
        assert p["action_id"] in pings and p["character_id"] in B_CHARACTERS, message
    elif type_ == "narration.delta":
        raise AssertionError(f"party B received narration nobody in B asked for: {message}")
    elif type_ == "scene.update":
        pass  # the node engine's answer to a B ping (its content is the engine's)
    else:
        raise AssertionError(f"party B received {message}")


@pytest.fixture
async def world(cluster: Cluster) -> AsyncIterator[World]:
    args = (
        "--api-key",
        KEY,
        "--max-message-bytes",
        str(MAX_BYTES),
        "--rate-limit",
        "1000",
        "--rate-burst",
        "1000",
    )
    async with cluster.node(*args) as n1, cluster.node(*args) as n2:
        b1 = Reader((await n1.join("bard", party=B_PARTY, run=B_RUN))[0])
        b2 = Reader((await n2.join("bolt", party=B_PARTY, run=B_RUN))[0])
        b1.start()
        b2.start()
        w = World((n1, n2), (b1, b2))
        await w.check_b()
        yield w
        for reader in (b1, b2):
            assert reader.task is not None
            reader.task.cancel()
            await reader.client.close()


FUZZ = settings(
    max_examples=max(10, EXAMPLES // 2),
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@FUZZ
@given(case=cases, on_second=st.booleans())
async def test_generated_frames_in_other_parties_never_reach_b(
    world: World, case: list[Frame], on_second: bool
) -> None:
    await play(world.nodes[1 if on_second else 0], case)
    await world.check_b()


async def _hostile_a(node: Running) -> Client:
    client, _ = await node.join("aria", party=f"pa-{MARK}", run=f"ra-{MARK}")
    return client


HAND_MADE: list[dict[str, Any]] = [
    # act for B's character, in B's run
    {
        "type": "action.request",
        "trace_id": f"t-{MARK}",
        "payload": {
            "action_id": f"x-{MARK}",
            "character_id": "bard",
            "campaign_run_id": B_RUN,
            "action_type": "skill_check",
            "payload": {},
        },
    },
    {
        "type": "action.request",
        "trace_id": f"t-{MARK}",
        "payload": {
            "action_id": f"x-{MARK}-2",
            "character_id": "aria",
            "campaign_run_id": B_RUN,
            "action_type": "skill_check",
            "payload": {},
        },
    },
    # reuse B's action ids (the namespaces are per party)
    {
        "type": "action.request",
        "trace_id": f"t-{MARK}",
        "payload": {
            "action_id": "b-ping-1",
            "character_id": "aria",
            "campaign_run_id": f"ra-{MARK}",
            "action_type": "skill_check",
            "payload": {"m": MARK},
        },
    },
    # leave for B's character; vote in a vote of B's
    {"type": "party.leave", "trace_id": f"t-{MARK}", "payload": {"character_id": "bard"}},
    {"type": "vote.cast", "trace_id": f"t-{MARK}", "payload": {"vote_id": "v-b", "option": "L"}},
    # a server type naming B
    {
        "type": "party.join",
        "trace_id": f"t-{MARK}",
        "payload": {"character_id": "bard", "display_name": MARK},
    },
]


async def test_hand_made_attempts_from_a_never_reach_b(world: World) -> None:
    for node in world.nodes:
        a = await _hostile_a(node)
        try:
            for message in HAND_MADE:
                await a.send(message)
                answer = await a.recv()
                while answer["type"] not in ("system.error", "action.result"):
                    answer = await a.recv()
                if answer["type"] == "system.error":
                    assert answer["payload"]["code"] in (
                        "forbidden",
                        "vote_unknown",
                        "server_only_type",
                    ), answer
                await world.check_b()
        finally:
            await a.close()


BAD_PARTY_PATHS = [
    f"{B_PARTY}%20",
    f"{B_PARTY}%0A",
    f"{B_PARTY}*",
    f"{B_PARTY}%00",
    f"{B_PARTY}%2A",
    "*",
    "party-%3F",
]


async def test_api_calls_with_ids_that_look_like_b_never_reach_b(world: World) -> None:
    node = world.nodes[0]
    event = {
        "type": "party.state",
        "trace_id": f"t-{MARK}",
        "payload": {"status": MARK, "run_status": "in_progress"},
    }
    for bad in BAD_PARTY_PATHS:
        for path in (f"/api/v1/parties/{bad}/events", f"/api/v1/runs/{bad}/events"):
            async with node.http.post(
                node.base + path,
                data=orjson.dumps(event),
                headers={**AUTH, "Content-Type": "application/json"},
            ) as resp:
                assert resp.status in (400, 404, 422), (path, resp.status)
            await world.check_b()
    # A's own events (and its run's) go to A only.
    a = await _hostile_a(node)
    try:
        async with node.http.post(
            node.base + f"/api/v1/parties/pa-{MARK}/events", json=event, headers=AUTH
        ) as resp:
            assert resp.status == 202
        async with node.http.post(
            node.base + f"/api/v1/runs/ra-{MARK}/events", json=event, headers=AUTH
        ) as resp:
            assert resp.status == 202
        assert (await a.until("party.state"))["payload"]["status"] == MARK
        await world.check_b()
    finally:
        await a.close()


async def test_a_token_with_a_bad_party_id_is_refused_on_both_nodes(world: World) -> None:
    for node in world.nodes:
        for bad in (f"{B_PARTY} ", f"{B_PARTY}\n", f"{B_PARTY}*", B_PARTY + "x" * 64):
            assert await node.handshake_status({"token": bad_party_token(bad)}) == 401
        await world.check_b()


def bad_party_token(party_id: str) -> str:
    """A correctly signed token whose party id breaks the id rule (``issue_token`` refuses)."""
    now = int(time.time())
    claims = {
        "sub": "x",
        "party_id": party_id,
        "campaign_run_id": B_RUN,
        "character_id": "aria",
        "aud": "party_sync",
        "iat": now,
        "exp": now + 600,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")
