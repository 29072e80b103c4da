"""An engine that reads the actions stream in another language claims and refuses over HTTP
(``POST /api/v1/parties/{party_id}/actions/{action_id}/claim`` and ``.../refusal``: docs/
engines.md, "An engine in another language"), as ``party-sync engine-worker`` does through the
ledger: a foreign worker written from the docs could neither (outside engine probe: its result,
published 2 s after the deadline, reached the party after the player was told
``action_timeout``, and it could only refuse by saying nothing)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from party_sync.engine import wire
from party_sync.engine.interface import ActionRequest, JoinNotice, LinkHost, RestateNotice
from party_sync.protocol import codec
from ps_testkit.client import Client
from ps_testkit.servers import Running, make_settings, serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis

KEY = "api-key-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


class HeldLink:
    """A link to a queue that a foreign worker reads (as the actions stream is): it hands over
    nothing by itself and claims nothing; the test plays the worker."""

    claims_on_accept = False

    def __init__(self) -> None:
        self.actions: asyncio.Queue[ActionRequest] = asyncio.Queue()

    async def start(self, host: LinkHost) -> None:
        pass

    async def submit(self, action: ActionRequest) -> None:
        self.actions.put_nowait(action)

    async def notify_join(self, notice: JoinNotice) -> None:
        pass

    async def notify_restate(self, notice: RestateNotice) -> None:
        pass

    async def close(self) -> None:
        pass


def entry(action: ActionRequest) -> dict[str, Any]:
    """The body fields a worker copies from the stream entry (the envelope as its JSON text)."""
    assert action.deadline is not None
    return {
        "envelope": codec.encode(dict(action.envelope)).decode(),
        "deadline": wire.format_deadline(action.deadline),
    }


async def post(
    srv: Running, path: str, body: Any, headers: dict[str, str] = AUTH
) -> tuple[int, Any]:
    async with srv.http.post(srv.base + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


def claim_path(action_id: str) -> str:
    return f"/api/v1/parties/p1/actions/{action_id}/claim"


def refusal_path(action_id: str) -> str:
    return f"/api/v1/parties/p1/actions/{action_id}/refusal"


#: An event to publish beside a result (an engine's answer is often both).
SCENE: dict[str, Any] = {
    "type": "scene.update",
    "payload": {
        "scene_number": 2,
        "scene_id": "s-2",
        "title": "The Reef Gate",
        "narration": "Waves.",
        "options": [],
        "kind": "story",
    },
}


def result(action: ActionRequest) -> dict[str, Any]:
    return {
        "type": "action.result",
        "trace_id": action.trace_id,
        "payload": {
            "action_id": action.action_id,
            "character_id": action.character_id,
            "action_type": action.action_type,
            "outcome": "success",
            "state": {"hp": 10, "effects": [], "scene_flags": {}},
        },
    }


@contextlib.asynccontextmanager
async def aria_in_a_party(**settings: Any) -> AsyncIterator[tuple[Running, HeldLink, Client]]:
    """A server whose actions wait for a foreign worker (the test), and aria joined to p1."""
    link = HeldLink()
    async with serve_in_process(make_settings(api_key=KEY, **settings), link=link) as srv:
        a, _ = await srv.join("aria")
        try:
            yield srv, link, a
        finally:
            await a.close()


async def acted(a: Client, link: HeldLink, action_id: str) -> ActionRequest:
    await a.act(action_id, "aria", "r1")
    await a.expect("action.accepted")
    async with asyncio.timeout(5):
        return await link.actions.get()


async def test_a_claimed_action_is_answered_by_its_published_result() -> None:
    async with aria_in_a_party() as (srv, link, a):
        action = await acted(a, link, "x1")
        assert await post(srv, claim_path("x1"), entry(action)) == (200, {"claim": "start"})
        # a second claim (the worker died and another took the entry over) starts it again
        assert await post(srv, claim_path("x1"), entry(action)) == (200, {"claim": "start"})
        status, _ = await post(srv, "/api/v1/parties/p1/events/batch", {"events": [result(action)]})
        assert status == 202
        assert (await a.expect("action.result"))["payload"]["action_id"] == "x1"
        assert await post(srv, claim_path("x1"), entry(action)) == (200, {"claim": "final"})


async def test_a_refusal_is_the_final_answer_told_once() -> None:
    async with aria_in_a_party() as (srv, link, a):
        b, _ = await srv.join("borin")
        await a.until("party.join")  # borin's
        action = await acted(a, link, "x2")
        assert (await post(srv, claim_path("x2"), entry(action)))[1] == {"claim": "start"}
        body = {**entry(action), "code": "action_rejected", "detail": "the door is too far"}
        assert await post(srv, refusal_path("x2"), body) == (200, {"recorded": True})
        error = await a.expect("system.error")
        assert error["payload"]["code"] == "action_rejected"
        assert "the door is too far" in error["payload"]["message"]
        failed = await b.until("action.failed")
        assert failed["payload"]["action_id"] == "x2"
        # the same refusal again (the worker retried): nothing is sent twice
        assert await post(srv, refusal_path("x2"), body) == (200, {"recorded": False})
        assert await post(srv, claim_path("x2"), entry(action)) == (200, {"claim": "final"})
        await a.act("x3", "aria", "r1")  # the character is free again; nothing else came first
        assert (await a.expect("action.accepted"))["payload"]["action_id"] == "x3"
        await b.close()


async def test_an_engine_error_is_final_without_a_claim() -> None:
    async with aria_in_a_party() as (srv, link, a):
        action = await acted(a, link, "x4")
        body = {"envelope": dict(action.envelope), "code": "engine_error"}  # an object, too
        assert await post(srv, refusal_path("x4"), body) == (200, {"recorded": True})
        error = await a.expect("system.error")
        assert error["payload"]["code"] == "engine_error"


async def test_an_action_nobody_claimed_in_time_is_final_for_a_late_worker() -> None:
    async with aria_in_a_party(action_timeout=0.3) as (srv, link, a):
        action = await acted(a, link, "x5")
        assert (await a.expect("system.error"))["payload"]["code"] == "action_timeout"
        assert await post(srv, claim_path("x5"), entry(action)) == (200, {"claim": "final"})
        body = {**entry(action), "code": "engine_error"}
        assert await post(srv, refusal_path("x5"), body) == (200, {"recorded": False})


@pytest.mark.parametrize("deadline", ["absent", None, ""])
async def test_a_finished_votes_party_action_is_claimed_without_a_deadline(
    deadline: str | None,
) -> None:
    """A finished vote's party action (``vote:<vote_id>``) has no deadline, so its stream entry
    has no ``deadline`` field: the claim refused it (422 "deadline is required"), and a worker
    in another language could never apply the party's decision (engine developer probe)."""
    async with aria_in_a_party() as (srv, link, a):
        spec = {
            "question": "Which way?",
            "options": [{"id": "A", "label": "Left"}, {"id": "B", "label": "Right"}],
            "timeout_s": 30,
            "vote_id": "v1",
        }
        status, _ = await post(srv, "/api/v1/parties/p1/votes", spec)
        assert status == 201
        await a.send({"type": "vote.cast", "payload": {"vote_id": "v1", "option": "B"}})
        async with asyncio.timeout(5):
            action = await link.actions.get()
        assert action.action_id == "vote:v1" and action.deadline is None
        body: dict[str, Any] = {"envelope": codec.encode(dict(action.envelope)).decode()}
        if deadline != "absent":
            body["deadline"] = deadline
        path = claim_path("vote:v1")
        assert await post(srv, path, body) == (200, {"claim": "start"})
        decided = result(action)
        decided["payload"]["state"] = {"effects": [], "scene_flags": {}}  # a party's: no HP
        status, _ = await post(srv, "/api/v1/parties/p1/events/batch", {"events": [decided]})
        assert status == 202
        answer = await a.until("action.result")
        assert answer["payload"]["action_id"] == "vote:v1"
        assert await post(srv, path, body) == (200, {"claim": "final"})


async def test_what_is_not_the_handed_action_is_refused_422() -> None:
    async with aria_in_a_party() as (srv, link, a):
        action = await acted(a, link, "x6")
        good = entry(action)
        envelope = dict(action.envelope)
        for path, body in (
            (claim_path("other"), good),  # not the path's action_id
            (claim_path("x6"), {"deadline": good["deadline"]}),  # no envelope
            # a claim needs the deadline (only a party action has none)
            (claim_path("x6"), {"envelope": good["envelope"]}),
            (claim_path("x6"), {**good, "deadline": None}),
            (claim_path("x6"), {**good, "extra": 1}),
            (claim_path("x6"), {**good, "node": "a b"}),  # the delivering node: an id
            (claim_path("x6"), {**good, "node": 7}),
            (claim_path("x6"), {**good, "deadline": "soon"}),
            (claim_path("x6"), {**good, "envelope": "{not json"}),
            (claim_path("x6"), {**good, "envelope": {**envelope, "type": "scene.update"}}),
            (claim_path("x6"), {**good, "envelope": {**envelope, "payload": {}}}),
            (claim_path("x6"), [good]),
            (refusal_path("x6"), {**good, "code": "action_timeout"}),  # not an engine's
            (refusal_path("x6"), {**good}),  # no code
            (refusal_path("x6"), {**good, "code": "engine_error", "detail": 7}),
            # API probe: a code that is a list or an object was a 500 with a traceback
            (refusal_path("x6"), {**good, "code": ["action_rejected"]}),
            (refusal_path("x6"), {**good, "code": {}}),
        ):
            status, answer = await post(srv, path, body)
            assert (status, answer["error"]) == (422, "invalid_request"), (path, body, answer)
        no_trace = {k: v for k, v in envelope.items() if k != "trace_id"}
        status, answer = await post(srv, claim_path("x6"), {**good, "envelope": no_trace})
        assert (status, answer["detail"]) == (
            422,
            "envelope: no 'trace_id' field (copy the entry's, or the delivery's)",
        )
        async with srv.http.post(srv.base + claim_path("x6"), json=good) as resp:
            assert resp.status == 401  # the API key, as every route of the server API
        # nothing of that changed the action: it is still to be claimed (an HTTP engine host's
        # claim names the node that delivered it)
        claimed = await post(srv, claim_path("x6"), {**good, "node": "n-1"})
        assert claimed == (200, {"claim": "start"})


async def test_a_refusal_goes_to_the_actions_sender_whatever_the_envelope_names() -> None:
    """API probe: a refusal whose envelope named another character than the sender's (an
    engine's slip) sent that character the ``system.error`` for an action it never sent, and
    left the sender to hear of it only at the deadline. The sender is the action's record's;
    the envelope only names the action (an expired claim the same: tests/redis/
    test_ledger_parity.py)."""
    async with aria_in_a_party() as (srv, link, a):
        b, _ = await srv.join("borin")
        await a.until("party.join")  # borin's
        action = await acted(a, link, "x7")
        envelope = dict(action.envelope)
        body = {
            **entry(action),
            "envelope": {**envelope, "payload": {**envelope["payload"], "character_id": "borin"}},
            "code": "action_rejected",
            "detail": "not now",
        }
        assert await post(srv, refusal_path("x7"), body) == (200, {"recorded": True})
        error = await a.expect("system.error")
        assert error["payload"]["code"] == "action_rejected"
        assert error["payload"]["in_reply_to"]["action_id"] == "x7"
        failed = await b.until("action.failed")
        assert failed["payload"]["character_id"] == "aria"
        await b.act("y1", "borin", "r1")  # and borin was told nothing: next comes his own
        async with asyncio.timeout(5):
            while (frame := await b.recv())["type"] != "action.accepted":
                assert frame["type"] != "system.error", frame
        assert frame["payload"]["action_id"] == "y1"
        await b.close()


@pytest.mark.parametrize("route", ["events", "events/batch"])
async def test_a_result_naming_another_character_is_refused_and_records_nothing(
    route: str,
) -> None:
    """Engine developer probe: an ``action.result`` naming borin for aria's action was taken
    (202): it reached every member under the wrong name and settled aria's action. It is
    refused (422 ``invalid_event``, saying whose action it is), nothing of the call is
    recorded, and the right result is taken after it."""

    def call(*events: dict[str, Any]) -> Any:
        return events[0] if route == "events" else {"events": list(events)}

    async with aria_in_a_party() as (srv, link, a):
        action = await acted(a, link, "x9")
        wrong = result(action)
        wrong["payload"]["character_id"] = "borin"
        scene = SCENE
        events = (wrong,) if route == "events" else (scene, wrong)
        status, answer = await post(srv, f"/api/v1/parties/p1/{route}", call(*events))
        assert (status, answer["error"]) == (422, "invalid_event"), answer
        assert "'aria'" in answer["detail"] and "'borin'" in answer["detail"], answer
        await a.act("x10", "aria", "r1")  # aria's action is still in flight: she is busy
        assert (await a.expect("system.error"))["payload"]["code"] == "character_busy"
        status, _ = await post(srv, f"/api/v1/parties/p1/{route}", call(result(action)))
        assert status == 202
        got = await a.until("action.result")
        assert got["payload"]["character_id"] == "aria"
        assert got["seq"] == 2  # (1: aria's join) nothing of the refused call was sequenced
        # a late copy naming borin is no copy of that answer: refused as well (backlog probe:
        # it was answered 202 with the first result's seq, the engine told nothing of its slip)
        status, answer = await post(srv, f"/api/v1/parties/p1/{route}", call(*events))
        assert (status, answer["error"]) == (422, "invalid_event"), answer
        assert "'aria'" in answer["detail"] and "'borin'" in answer["detail"], answer
        status, _ = await post(srv, f"/api/v1/parties/p1/{route}", call(result(action)))
        assert status == 202  # the faithful copy: the first result stands, nothing sent again


async def test_a_keyed_retry_is_answered_by_its_key_before_any_check_of_its_result() -> None:
    """Review: the key names the publish, not its body (docs/engines.md): a retry under a key
    whose call was published gets that call's seqs, on both backends (Redis refused it first
    when it held a result naming another character; the embedded backend answered the key)."""
    async with aria_in_a_party() as (srv, link, a):
        action = await acted(a, link, "k1")
        scene = SCENE
        keyed = {**AUTH, "Idempotency-Key": "call-1"}
        path = srv.base + "/api/v1/parties/p1/events/batch"
        async with srv.http.post(path, json={"events": [scene, scene]}, headers=keyed) as r:
            assert r.status == 202
            first = await r.json()
        wrong = result(action)
        wrong["payload"]["character_id"] = "borin"
        async with srv.http.post(path, json={"events": [scene, wrong]}, headers=keyed) as r:
            assert (r.status, await r.json()) == (202, first)


async def test_a_keyed_retry_of_an_answer_gets_its_seqs_and_a_reshaped_call_is_refused() -> None:
    """Engine developer probe: a batch ``[action.result, scene.update]`` resent under its
    Idempotency-Key was answered as a late copy, ``[seq, 0]`` (an engine checking that its
    answer went out saw its scene unpublished), and ``[action.result]`` alone under that key
    was taken (202) instead of refused as another call's reuse of the key. The key comes first
    (docs/engines.md), on both backends; without a key a late copy is still answered as one."""
    async with aria_in_a_party() as (srv, link, a):
        action = await acted(a, link, "k2")
        keyed = {**AUTH, "Idempotency-Key": "answer-1"}
        path = srv.base + "/api/v1/parties/p1/events/batch"
        body = {"events": [result(action), SCENE]}
        async with srv.http.post(path, json=body, headers=keyed) as r:
            assert r.status == 202
            first = await r.json()
        assert all(seq > 0 for seq in first["seqs"]), first
        async with srv.http.post(path, json=body, headers=keyed) as r:
            assert (r.status, await r.json()) == (202, first)
        for route, alone in (("events/batch", {"events": [result(action)]}), ("events", None)):
            call = alone if alone is not None else result(action)
            status, answer = await post(srv, f"/api/v1/parties/p1/{route}", call, keyed)
            assert (status, answer["error"]) == (422, "idempotency_key_reused"), answer
        async with srv.http.post(path, json=body, headers=AUTH) as r:  # no key: a late copy
            assert (r.status, (await r.json())["seqs"]) == (202, [first["seqs"][0], 0])
