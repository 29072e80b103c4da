"""The server API: engines publish into parties over HTTP (the events API: docs/engines.md)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from openapi_spec_validator import validate
from party_sync.engine.http_host import ApiPublisher
from party_sync.engine.interface import Narration, publish_all
from party_sync.protocol.errors import NarrationConflict
from ps_testkit import api_events
from ps_testkit.client import Client, wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.raw_http import raw_request
from ps_testkit.servers import Running, make_settings, serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis

KEY = "api-key-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}

SCENE: dict[str, Any] = {**api_events.SCENE, "trace_id": "eng-trace-1"}


async def post(
    srv: Running, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with srv.http.post(srv.base + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_a_published_event_is_sequenced_and_broadcast() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, hello = await srv.join("aria")
        status, body = await post(srv, "/api/v1/parties/p1/events", SCENE, AUTH)
        assert status == 202
        assert body == {"seq": hello["payload"]["seq"] + 1}
        event = await a.expect("scene.update")
        assert event["seq"] == body["seq"]
        assert event["trace_id"] == "eng-trace-1"
        assert event["payload"] == SCENE["payload"]
        await a.close()


async def test_the_key_is_checked_before_anything_else() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            status, body = await post(srv, "/api/v1/parties/p1/events", {"junk": True}, headers)
            assert status == 401, headers
            assert body["error"] == "unauthorized"


async def test_no_configured_key_refuses_every_call() -> None:
    """...and says why (new user's probe: "missing or wrong API key" sent them looking for the
    right key, while the server had none); the start says so once."""
    async with serve_in_process(make_settings(api_key=None), engine=ScriptedEngine()) as srv:
        for given in ("Bearer ", f"Bearer {KEY}"):
            status, body = await post(
                srv, "/api/v1/parties/p1/events", SCENE, {"Authorization": given}
            )
            assert status == 401
            assert body["error"] == "unauthorized"
            assert body["detail"] == (
                "the server API is off: this server has no API key configured (PARTY_SYNC_API_KEY)"
            )
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        status, body = await post(srv, "/api/v1/parties/p1/events", SCENE, {"Authorization": "x"})
        assert (status, body["detail"]) == (401, "missing or wrong API key")


def test_the_start_says_when_the_server_api_is_off() -> None:
    import logging

    from party_sync.server import api_off

    assert api_off(make_settings(api_key=KEY)) is None
    level, line = api_off(make_settings(api_key=None)) or (0, "")
    assert level == logging.INFO and "PARTY_SYNC_API_KEY is unset" in line
    telegram = make_settings(api_key=None, telegram_bot_token="123456:" + "a" * 35)
    level, line = api_off(telegram) or (0, "")
    assert level == logging.WARNING and "Telegram sign-in" in line


async def test_invalid_events_get_422_with_the_reason_and_publish_nothing() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, hello = await srv.join("aria")
        bad_payload = {**SCENE, "payload": {**SCENE["payload"], "kind": "musical"}}
        cases: list[tuple[Any, str]] = [
            (bad_payload, "kind"),
            ({**SCENE, "seq": 5}, "seq"),
            ({**SCENE, "type": "party.join"}, "party.join"),
            ({**SCENE, "type": "system.hello"}, "system.hello"),
            ({**SCENE, "extra": 1}, "extra"),
            ([1, 2], "envelope"),
            # contract probe: an empty trace_id was taken for a missing one (the narration and
            # vote bodies refuse it), a number was dropped
            ({**SCENE, "trace_id": ""}, "trace_id"),
            ({**SCENE, "trace_id": 7}, "trace_id"),
            ({**SCENE, "trace_id": "has spaces"}, "trace_id"),
            ({**SCENE, "timestamp": 7}, "timestamp"),
            ({**SCENE, "timestamp": "yesterday"}, "timestamp"),
        ]
        for body, word in cases:
            status, problem = await post(srv, "/api/v1/parties/p1/events", body, AUTH)
            assert status == 422, body
            assert word in problem["detail"], problem
        for path in ("/api/v1/parties/p1/events/batch", "/api/v1/runs/r1/events"):
            empty = {**SCENE, "trace_id": ""}
            body = {"events": [empty]} if path.endswith("batch") else empty
            status, problem = await post(srv, path, body, AUTH)
            assert status == 422 and "trace_id" in problem["detail"], (path, problem)
        async with srv.http.post(
            srv.base + "/api/v1/parties/p1/events", data=b"{nope", headers=AUTH
        ) as resp:
            assert resp.status == 400
        # nothing was published: the next event continues right after the hello (a null
        # trace_id is a missing one, as in the narration and vote bodies: party_sync makes one)
        status, body = await post(
            srv, "/api/v1/parties/p1/events", {**SCENE, "trace_id": None}, AUTH
        )
        assert body["seq"] == hello["payload"]["seq"] + 1
        event = await a.expect("scene.update")
        assert event["seq"] == body["seq"] and len(event["trace_id"]) == 32
        await a.close()


async def test_an_action_result_is_never_published_run_wide() -> None:
    """Re-check probe: run-wide, an action.result became a pre-published answer in every other
    party of the run, and a refusal in one party (another character's action) left the parties
    before it published under a 422. An action is one party's: 422, nothing published."""
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria", party="p1", run="r9")
        b, _ = await srv.join("borin", party="p2", run="r9")
        result = {
            "type": "action.result",
            "payload": {
                "action_id": "w1",
                "character_id": "aria",
                "action_type": "choice",
                "outcome": "success",
                "state": {"hp": 10, "effects": [], "scene_flags": {}},
            },
        }
        status, body = await post(srv, "/api/v1/runs/r9/events", result, AUTH)
        assert (status, body["error"]) == (422, "invalid_event"), body
        assert "/api/v1/parties/{party_id}/events" in body["detail"]
        await b.act("w1", "borin", "r9")  # w1 is nobody's yet in p2: borin's action goes on
        assert (await b.expect("action.accepted"))["payload"]["action_id"] == "w1"
        assert (await b.expect("action.result"))["payload"]["character_id"] == "borin"
        for client in (a, b):
            await client.close()


async def test_run_events_reach_every_party_of_the_run() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria", party="p1", run="r9")
        b, _ = await srv.join("borin", party="p2", run="r9")
        c, _ = await srv.join("cora", party="p3", run="other")
        status, body = await post(srv, "/api/v1/runs/r9/events", SCENE, AUTH)
        assert status == 202
        assert set(body["parties"]) == {"p1", "p2"}
        assert (await a.expect("scene.update"))["seq"] == body["parties"]["p1"]
        assert (await b.expect("scene.update"))["seq"] == body["parties"]["p2"]
        await c.act("c1", "cora", "other")  # cora's party got nothing: her next messages are
        assert (await c.expect("action.accepted"))["payload"]["action_id"] == "c1"  # her action's
        assert (await c.expect("action.result"))["payload"]["action_id"] == "c1"
        for client in (a, b, c):
            await client.close()


async def test_a_publish_sent_again_with_its_idempotency_key_is_answered_its_seq_once() -> None:
    """An engine whose answer was lost (a dropped connection, a timeout) sends the request again
    with the same ``Idempotency-Key``: the party gets the event once, both answers say its seq."""
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, hello = await srv.join("aria")
        keyed = {**AUTH, "Idempotency-Key": "pub-1"}
        path = "/api/v1/parties/p1/events"
        first = await post(srv, path, SCENE, keyed)
        assert first == (202, {"seq": hello["payload"]["seq"] + 1})
        assert await post(srv, path, SCENE, keyed) == first  # the retry: nothing published
        other = {**SCENE, "payload": {**SCENE["payload"], "title": "Elsewhere"}}
        # the key names the publish, not the body: a different body under it is the first one's
        assert await post(srv, path, other, keyed) == first
        # another key, and no key at all, publish as usual
        second = await post(srv, path, other, {**AUTH, "Idempotency-Key": "pub-2"})
        assert second == (202, {"seq": first[1]["seq"] + 1})
        assert (await post(srv, path, SCENE, AUTH))[1] == {"seq": first[1]["seq"] + 2}
        assert (await post(srv, path, SCENE, AUTH))[1] == {"seq": first[1]["seq"] + 3}
        # a key is per party: p2 publishes under pub-1 on its own
        status, _ = await post(srv, "/api/v1/parties/p2/events", SCENE, keyed)
        assert status == 202
        seqs = [(await a.expect("scene.update"))["seq"] for _ in range(4)]
        assert seqs == [first[1]["seq"] + i for i in range(4)]  # p1's four, each once
        await a.close()


async def test_an_epoch_opening_publish_sent_again_under_its_key_asks_no_second_re_statement() -> (
    None
):
    """The first event of a party's epoch, published through the API, gets the engine asked to
    re-state the party once. Sent again under its key it is answered as the event that stands
    (seq 1 again, in the new request's bytes): before, that was a new opening, and an engine
    re-stating under its own keys asked for the next re-statement itself, without end (HTTP
    link probe after failovers: hundreds a minute per party)."""
    engine = ScriptedEngine()
    async with serve_in_process(make_settings(api_key=KEY), engine=engine) as srv:
        keyed = {**AUTH, "Idempotency-Key": "open-1"}
        path = "/api/v1/parties/p9/events"
        assert srv.server is not None
        srv.server.gateway.watch.knows("p9", "r9")  # (a member's binding says so on a node)
        assert await post(srv, path, SCENE, keyed) == (202, {"seq": 1})
        await wait_until(lambda: len(engine.restates) == 1)
        later = {**SCENE, "payload": {**SCENE["payload"], "title": "Later"}}
        for body in (SCENE, later):  # the same words or others: the event that stands
            assert await post(srv, path, body, keyed) == (202, {"seq": 1})
        watch = srv.server.gateway.watch
        # an opening seen is due, and its drain flagged, before the answer: wait for it to end
        await wait_until(lambda: watch.settled)
        assert watch.requested == 1
        assert len(engine.restates) == 1


async def test_an_idempotency_key_that_breaks_the_rule_is_400_and_publishes_nothing() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, hello = await srv.join("aria")
        for key in ("", "a b", "k" * 129, "key*", "ключ"):
            async with srv.http.post(
                srv.base + "/api/v1/parties/p1/events",
                json=SCENE,
                headers={**AUTH, "Idempotency-Key": key.encode().decode("latin-1")},
            ) as resp:
                assert resp.status == 400, key
                assert (await resp.json())["error"] == "invalid_id"
        _, body = await post(srv, "/api/v1/parties/p1/events", SCENE, AUTH)
        assert body == {"seq": hello["payload"]["seq"] + 1}  # nothing before it
        await a.close()


async def test_a_run_event_sent_again_with_its_key_reaches_each_party_once() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria", party="p1", run="r9")
        keyed = {**AUTH, "Idempotency-Key": "run-pub-1"}
        first = await post(srv, "/api/v1/runs/r9/events", SCENE, keyed)
        b, hello_b = await srv.join("borin", party="p2", run="r9")  # joins between the tries
        status, body = await post(srv, "/api/v1/runs/r9/events", SCENE, keyed)
        assert status == 202
        # p1 had it: its first seq; p2 had not: published there now
        assert body["parties"] == {**first[1]["parties"], "p2": hello_b["payload"]["seq"] + 1}
        assert (await a.expect("scene.update"))["seq"] == body["parties"]["p1"]
        assert (await b.expect("scene.update"))["seq"] == body["parties"]["p2"]
        await a.act("a1", "aria", "r9")  # aria's next messages are her action's: no repeat
        assert (await a.expect("action.accepted"))["payload"]["action_id"] == "a1"
        for client in (a, b):
            await client.close()


async def test_openapi_document_is_valid_and_lists_the_api() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        async with srv.http.get(srv.base + "/openapi.json") as resp:
            assert resp.status == 200
            spec = await resp.json()
        validate(spec)
        assert {
            "/api/v1/parties/{party_id}/events",
            "/api/v1/runs/{campaign_run_id}/events",
        } <= set(spec["paths"])
        # What the server refuses or takes, the document says (contract probe: schemathesis
        # found a name with a control character valid by it, an empty cursor invalid by it).
        name = spec["components"]["schemas"]["MembershipBody"]["properties"]["display_name"]
        for good in ("Aria", "Ár ✨ 👩‍🚀", "<b>"):
            jsonschema.validate(good, name)
        for bad in ("A\u0002B", "a\u202eb", "line\nbreak", "\u200b"):
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(bad, name)
        # as ECMA-262 reads it without the u flag (JavaScript's RegExp): in UTF-16 code units,
        # an emoji is two surrogates, and the name is still taken (code review)
        units = "Aria 😀".encode("utf-16-le")
        as_units = "".join(
            chr(int.from_bytes(units[i : i + 2], "little")) for i in range(0, len(units), 2)
        )
        assert re.fullmatch(name["pattern"], as_units)
        parameters = spec["paths"]["/api/v1/parties"]["get"]["parameters"]
        cursor = next(p for p in parameters if p["name"] == "cursor")["schema"]
        jsonschema.validate("", cursor)
        jsonschema.validate("party-9", cursor)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate("a b", cursor)


# -- live narration: POST /api/v1/parties/{party_id}/narration ---------------------------------

NARRATION = "/api/v1/parties/p1/narration"


def piece(index: int, text: str, *, done: bool = False, **more: Any) -> dict[str, Any]:
    return {"stream_id": "n-1", "index": index, "text": text, "done": done, **more}


async def narrate(
    srv: Running, body: Any, headers: dict[str, str] | None = AUTH
) -> tuple[int, str, Any]:
    """POST a piece: the status, the content type and the JSON answer."""
    async with srv.http.post(srv.base + NARRATION, json=body, headers=headers) as resp:
        return resp.status, resp.content_type, await resp.json(content_type=None)


async def deltas(client: Client, count: int) -> list[dict[str, Any]]:
    """The payloads of the next ``count`` narration.delta messages ``client`` gets."""
    out = []
    for _ in range(count):
        message = await client.until("narration.delta")
        assert "seq" not in message, message  # not part of the sequenced history
        out.append(message["payload"])
    return out


async def test_a_narration_piece_is_answered_202_and_reaches_every_member() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        first = piece(0, "The gate gives way ", action_id="a-9")
        assert await narrate(srv, first) == (
            202,
            "application/json",
            {"stream_id": "n-1", "index": 0},
        )
        status, _, answer = await narrate(srv, piece(1, "with a shriek", action_id="a-9"))
        assert (status, answer) == (202, {"stream_id": "n-1", "index": 1})
        expected = [
            {"stream_id": "n-1", "index": 0, "text": "The gate gives way ", "done": False},
            {"stream_id": "n-1", "index": 1, "text": "with a shriek", "done": False},
        ]
        expected = [{**p, "action_id": "a-9"} for p in expected]
        assert await deltas(a, 2) == expected
        assert await deltas(b, 2) == expected
        # a member who joins mid-stream gets the text so far in its hello
        c, hello = await srv.join("cora")
        assert hello["payload"]["narration"] == [
            {
                "stream_id": "n-1",
                "index": 1,
                "text": "The gate gives way with a shriek",
                "action_id": "a-9",
            }
        ]
        status, _, answer = await narrate(srv, piece(2, ".", done=True, action_id="a-9"))
        assert (status, answer) == (202, {"stream_id": "n-1", "index": 2})
        last = {"stream_id": "n-1", "index": 2, "text": ".", "done": True, "action_id": "a-9"}
        for client in (a, b, c):
            assert await deltas(client, 1) == [last]
        # the stream has ended: no longer in a hello
        d, hello = await srv.join("dain")
        assert hello["payload"]["narration"] == []
        for client in (a, b, c, d):
            await client.close()


async def test_a_piece_sent_again_is_202_and_reaches_nobody_twice() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        for body in (piece(0, "Rain "), piece(0, "Rain "), piece(1, "on "), piece(0, "Rain ")):
            status, _, answer = await narrate(srv, body)
            assert (status, answer) == (202, {"stream_id": "n-1", "index": body["index"]})
        status, _, _ = await narrate(srv, piece(1, "on ", done=True))  # the retry of a piece
        assert status == 202
        assert await narrate(srv, piece(2, "iron.", done=True)) == (
            202,
            "application/json",
            {"stream_id": "n-1", "index": 2},
        )
        got = await deltas(a, 3)
        assert [(p["index"], p["text"], p["done"]) for p in got] == [
            (0, "Rain ", False),
            (1, "on ", False),
            (2, "iron.", True),
        ]
        await a.close()


async def test_a_piece_that_cannot_follow_is_409_narration_conflict() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        assert (await narrate(srv, piece(0, "One ")))[0] == 202
        conflicts = [
            piece(2, "a gap "),  # index 1 is missing
            {"stream_id": "n-2", "index": 1, "text": "no piece 0", "done": False},
        ]
        for body in conflicts:
            status, media, problem = await narrate(srv, body)
            assert (status, media) == (409, "application/problem+json"), body
            assert problem["error"] == problem["code"] == "narration_conflict", problem
            assert problem["status"] == 409 and problem["detail"]
        assert (await narrate(srv, piece(1, "two.", done=True)))[0] == 202
        status, _, problem = await narrate(srv, piece(2, "after the end"))
        assert (status, problem["error"]) == (409, "narration_conflict")
        # only the pieces taken reached the member, in order
        got = await deltas(a, 2)
        assert [(p["stream_id"], p["index"], p["text"]) for p in got] == [
            ("n-1", 0, "One "),
            ("n-1", 1, "two."),
        ]
        status, _, _ = await narrate(srv, {"stream_id": "n-2", "index": 0, "text": "Then"})
        assert status == 202
        assert [p["stream_id"] for p in await deltas(a, 1)] == ["n-2"]  # n-2 starts at 0
        # an index of 1.0 is JSON Schema's integer 1, as in the events (contract probe: 422)
        status, _, _ = await narrate(srv, {"stream_id": "n-2", "index": 1.0, "text": " on"})
        assert status == 202
        assert [p["index"] for p in await deltas(a, 1)] == [1]
        await a.close()


MALFORMED_PIECES: list[tuple[Any, str]] = [
    ([piece(0, "x")], "object"),
    ("n-1", "object"),
    ({}, "missing"),
    ({"stream_id": "n-1", "index": 0}, "text"),
    ({**piece(0, "x"), "extra": 1}, "extra"),
    ({"type": "narration.delta", "payload": piece(0, "x")}, "unknown"),
    (piece(0, "x", stream_id="n 1"), "stream_id"),
    (piece(0, "x", stream_id=""), "stream_id"),
    (piece(-1, "x"), "index"),
    ({**piece(0, "x"), "index": "0"}, "index"),
    ({**piece(0, "x"), "index": 1.5}, "index"),
    ({**piece(0, "x"), "index": -1.0}, "index"),
    ({**piece(0, "x"), "index": True}, "index"),
    ({**piece(0, "x"), "text": 5}, "text"),
    (piece(0, "x" * 20_001), "text"),
    ({**piece(0, "x"), "done": "yes"}, "done"),
    (piece(0, "x", action_id="a/1"), "action_id"),
    (piece(0, "x", trace_id=""), "trace_id"),
]


async def test_a_malformed_piece_is_422_invalid_event_and_reaches_nobody() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        for body, word in MALFORMED_PIECES:
            status, media, problem = await narrate(srv, body)
            assert (status, media) == (422, "application/problem+json"), body
            assert problem["error"] == "invalid_event", problem
            assert word in problem["detail"], (body, problem)
        async with srv.http.post(srv.base + NARRATION, data=b"{nope", headers=AUTH) as resp:
            assert (resp.status, (await resp.json(content_type=None))["error"]) == (400, "bad_json")
        # none of it was taken: the stream starts with the next valid piece 0
        assert (await narrate(srv, piece(0, "valid")))[0] == 202
        assert await deltas(a, 1) == [
            {"stream_id": "n-1", "index": 0, "text": "valid", "done": False}
        ]
        await a.close()


async def test_narration_needs_the_api_key() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            status, media, problem = await narrate(srv, piece(0, "unauthorized"), headers)
            assert (status, media) == (401, "application/problem+json"), headers
            assert problem["error"] == "unauthorized"
        assert (await narrate(srv, piece(0, "authorized")))[0] == 202
        assert [p["text"] for p in await deltas(a, 1)] == ["authorized"]
        await a.close()


async def test_an_http_engine_streams_through_the_api_publisher() -> None:
    """``ApiPublisher`` (``party-sync engine-http``'s publisher) against the real route."""
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        publisher = ApiPublisher(srv.base, KEY)
        await publisher.open()
        try:
            async with Narration(publisher, "p1", "n-http", action_id="a-7") as story:
                for token in ("Borin ", "sets his shoulder ", "to the bars."):
                    await story.write(token)
            await publisher.narrate("p1", "n-http", 3, "", done=True)  # a retry: taken again
            with pytest.raises(NarrationConflict):
                await publisher.narrate("p1", "n-http", 4, "after the end")
            with pytest.raises(NarrationConflict):
                await publisher.narrate("p1", "n-gap", 1, "no piece 0")
        finally:
            await publisher.close()
        got = await deltas(a, 4)
        assert [(p["index"], p["text"], p["done"]) for p in got] == [
            (0, "Borin ", False),
            (1, "sets his shoulder ", False),
            (2, "to the bars.", False),
            (3, "", True),
        ]
        assert {(p["stream_id"], p.get("action_id")) for p in got} == {("n-http", "a-7")}
        await a.close()


def result_event(action_id: str) -> dict[str, Any]:
    payload = {
        "action_id": action_id,
        "character_id": "aria",
        "action_type": "skill_check",
        "outcome": "success",
        "state": {"hp": 9, "max_hp": 10, "effects": [], "scene_flags": {}},
    }
    return {"type": "action.result", "trace_id": "eng-batch", "payload": payload}


def scene_event(number: int) -> dict[str, Any]:
    payload = {**api_events.SCENE["payload"], "scene_number": number}
    return {"type": "scene.update", "trace_id": "eng-batch", "payload": payload}


async def test_a_batch_is_published_in_one_step_and_a_late_copy_publishes_nothing() -> None:
    """``POST .../events/batch``: an HTTP engine's whole answer in one atomic step (the route
    ``ApiPublisher.publish_many`` uses), so a late copy of it (an engine host frozen while its
    action was taken over, woken after the party moved on) cannot take the party back."""
    batch = "/api/v1/parties/p1/events/batch"
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, hello = await srv.join("aria")
        top = hello["payload"]["seq"]
        answer = {"events": [result_event("b-1"), scene_event(2)]}
        status, body = await post(srv, batch, answer, AUTH)
        assert (status, body) == (202, {"seqs": [top + 1, top + 2]})
        got = [await a.expect("action.result"), await a.expect("scene.update")]
        assert [e["seq"] for e in got] == [top + 1, top + 2]
        status, body = await post(srv, batch, {"events": [scene_event(3)]}, AUTH)  # moves on
        assert (status, body) == (202, {"seqs": [top + 3]})
        assert (await a.expect("scene.update"))["payload"]["scene_number"] == 3
        status, body = await post(srv, batch, answer, AUTH)  # the late copy
        assert (status, body) == (202, {"seqs": [top + 1, 0]})
        assert srv.server is not None
        backend = srv.server.gateway.backend
        snapshot = await backend.snapshot("p1")
        assert snapshot.seq == top + 3 and snapshot.scene is not None
        assert snapshot.scene["scene_number"] == 3
        # refused whole, nothing published: one invalid event, a key, too many, not a list
        bad_scene = {"type": "scene.update", "payload": {"scene_number": "x"}}
        for body_, headers in (
            ({"events": [result_event("b-2"), bad_scene]}, AUTH),
            ({"events": [scene_event(4)] * 33}, AUTH),
            ({"events": []}, AUTH),
            ([scene_event(4)], AUTH),
            ({"events": [scene_event(4)], "extra": 1}, AUTH),
        ):
            status, problem = await post(srv, batch, body_, headers)
            assert status == 422 and problem["error"] == "invalid_event", problem
        assert (await backend.snapshot("p1")).seq == top + 3
        status, _ = await post(srv, batch, answer)  # the key first, as on every route
        assert status == 401
        keyed = {**AUTH, "Idempotency-Key": "join-7"}
        joined = {"events": [scene_event(5), scene_event(6)]}
        assert await post(srv, batch, joined, keyed) == (202, {"seqs": [top + 4, top + 5]})
        assert await post(srv, batch, joined, keyed) == (202, {"seqs": [top + 4, top + 5]})
        assert (await backend.snapshot("p1")).seq == top + 5  # the second sent nothing
        # the key's request had another number of events (a hostile probe: a single event,
        # then three under its key, was answered three seqs of which two were never published)
        single = {**AUTH, "Idempotency-Key": "single-1"}
        assert await post(srv, "/api/v1/parties/p1/events", scene_event(7), single) == (
            202,
            {"seq": top + 6},
        )
        longer = {"events": [scene_event(7), scene_event(8), scene_event(9)]}
        for path, body_, headers in (
            (batch, longer, single),
            (batch, {"events": [scene_event(5)]}, keyed),
            (batch, {"events": [scene_event(5)] * 3}, keyed),
        ):
            status, problem = await post(srv, path, body_, headers)
            assert status == 422 and problem["code"] == "idempotency_key_reused", problem
        assert (await backend.snapshot("p1")).seq == top + 6  # nothing of them published
        await a.close()


async def test_an_http_engines_answer_goes_in_one_batch_through_the_api_publisher() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, hello = await srv.join("aria")
        top = hello["payload"]["seq"]
        publisher = ApiPublisher(srv.base, KEY)
        await publisher.open()
        try:
            events = [(e["type"], e["payload"]) for e in (result_event("c-1"), scene_event(2))]
            assert await publish_all(publisher, "p1", events, trace_id="t-c") == [top + 1, top + 2]
            # sent again (a retry whose answer was lost, a woken copy): nothing new
            assert await publish_all(publisher, "p1", events, trace_id="t-c") == [top + 1, 0]
            # without a result: under the answer's key (a fresh one if none), in one request
            assert await publish_all(publisher, "p1", events[1:], key="j-1") == [top + 3]
            assert await publish_all(publisher, "p1", events[1:], key="j-1") == [top + 3]
        finally:
            await publisher.close()
        assert [(await a.until("scene.update"))["seq"] for _ in range(2)] == [top + 2, top + 3]
        await a.close()


# -- hostile bodies: read whole, path ids, depth -----------------------------------------------


def big_state(size: int) -> dict[str, Any]:
    """A valid party.state event of about ``size`` bytes (run flags carry the bulk)."""
    flags = {f"flag-{i:05d}": "x" * 90 for i in range(size // 110)}
    payload = {"status": "active", "run_status": "in_progress", "scene_number": 3, "flags": flags}
    return {"type": "party.state", "trace_id": "big-1", "payload": payload}


async def test_an_event_sent_in_several_tcp_segments_is_accepted() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, hello = await srv.join("aria")
        body = json.dumps(SCENE).encode()
        status, answer = await raw_request(
            srv, "POST", "/api/v1/parties/p1/events", body, headers=AUTH, pieces=3
        )
        assert (status, answer) == (202, {"seq": hello["payload"]["seq"] + 1})
        status, answer = await raw_request(
            srv, "POST", "/api/v1/runs/r1/events", body, headers=AUTH, pieces=4, chunked=True
        )
        assert (status, answer) == (202, {"parties": {"p1": hello["payload"]["seq"] + 2}})
        vote = {
            "question": "Which way?",
            "options": [{"id": "A", "label": "Left"}, {"id": "B", "label": "Right"}],
            "timeout_s": 30,
        }
        status, answer = await raw_request(
            srv,
            "POST",
            "/api/v1/parties/p1/votes",
            json.dumps(vote).encode(),
            headers=AUTH,
            pieces=3,
        )
        assert status == 201, answer
        member = {"telegram_user_id": 7, "display_name": "Aria", "campaign_run_id": "r1"}
        status, answer = await raw_request(
            srv,
            "PUT",
            "/api/v1/parties/p1/members/aria",
            json.dumps(member).encode(),
            headers=AUTH,
            pieces=3,
        )
        assert (status, answer) == (204, None)
        await a.close()


async def test_a_150_kb_party_state_is_accepted_and_delivered_whole() -> None:
    settings = make_settings(api_key=KEY)
    assert settings.api_max_body_bytes >= 200_000
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        a, hello = await srv.join("aria")
        event = big_state(150_000)
        body = json.dumps(event).encode()
        assert 140_000 < len(body) <= settings.api_max_body_bytes
        status, answer = await raw_request(
            srv, "POST", "/api/v1/parties/p1/events", body, headers=AUTH, pieces=5
        )
        assert (status, answer) == (202, {"seq": hello["payload"]["seq"] + 1})
        delivered = await a.expect("party.state")
        assert delivered["payload"] == event["payload"]
        # and through aiohttp's client, as one write (loopback may still segment it)
        status, answer = await post(srv, "/api/v1/parties/p1/events", event, AUTH)
        assert status == 202
        await a.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_the_limit_gets_413_and_publishes_nothing(chunked: bool) -> None:
    settings = make_settings(api_key=KEY, api_max_body_bytes=100_000)
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        a, hello = await srv.join("aria")
        body = json.dumps(big_state(120_000)).encode()
        status, answer = await raw_request(
            srv, "POST", "/api/v1/parties/p1/events", body, headers=AUTH, pieces=3, chunked=chunked
        )
        assert status == 413
        assert (answer["error"], answer["detail"]) == ("too_large", "body exceeds 100000 bytes")
        exact = json.dumps(SCENE).encode()
        padded = exact[:-1] + b" " * (100_000 - len(exact)) + b"}"
        status, answer = await raw_request(
            srv, "POST", "/api/v1/parties/p1/events", padded, headers=AUTH, pieces=2
        )
        assert (status, answer) == (202, {"seq": hello["payload"]["seq"] + 1})  # limit inclusive
        await a.close()


def deep_json(depth: int) -> bytes:
    return b'{"k":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


async def test_a_too_deep_body_gets_400_too_deep_and_publishes_nothing() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, hello = await srv.join("aria")
        deep_scene = (
            json.dumps({**SCENE, "payload": "@@"}).encode().replace(b'"@@"', deep_json(300))
        )
        member = (
            b'{"telegram_user_id": 7, "display_name": "A", "campaign_run_id": '
            + deep_json(300)
            + b"}"
        )
        for method, path, body in [
            ("POST", "/api/v1/parties/p1/events", deep_scene),
            ("POST", "/api/v1/runs/r1/events", deep_scene),
            ("POST", "/api/v1/parties/p1/votes", deep_json(70)),
            ("POST", "/api/v1/parties/p1/narration", deep_json(70)),
            ("PUT", "/api/v1/parties/p1/members/aria", member),
            ("POST", "/api/v1/parties/p1/events", b"[" * 2000 + b"]" * 2000),  # past orjson's own
        ]:
            status, answer = await raw_request(srv, method, path, body, headers=AUTH)
            assert (status, answer["error"]) == (400, "too_deep"), (path, answer)
        status, answer = await post(srv, "/api/v1/parties/p1/events", SCENE, AUTH)
        assert answer == {"seq": hello["payload"]["seq"] + 1}  # nothing was published before
        await a.close()


#: Bad ids as they appear in a URL path (percent-encoded where a URL needs it).
BAD_PATH_IDS = [
    "*",
    "%3F",  # ?
    "a%20b",
    "a%0Ab",
    "a%00b",
    "%C3%A1ria",  # ária
    "%E2%80%AE",  # U+202E
    "x" * 3000,
    "a%2Fb",
]


def _api_routes(srv: Running) -> list[tuple[str, str]]:
    """(method, path template) of every API route that takes ids in its path."""
    assert srv.server is not None
    routes = []
    for route in srv.server.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        template = info.get("formatter", "")
        if template.startswith("/api/") and "{" in template and route.method != "HEAD":
            routes.append((route.method, template))
    return routes


async def test_every_path_id_follows_the_id_rule_before_the_backend_is_touched() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        a, hello = await srv.join("aria")
        routes = _api_routes(srv)
        assert {t for _, t in routes} >= {
            "/api/v1/parties/{party_id}/events",
            "/api/v1/runs/{campaign_run_id}/events",
            "/api/v1/parties/{party_id}/votes",
            "/api/v1/parties/{party_id}/narration",
            "/api/v1/parties/{party_id}/members",
            "/api/v1/parties/{party_id}/members/{character_id}",
        }
        for method, template in routes:
            params = re.findall(r"{(\w+)}", template)
            for param in params:
                for bad in BAD_PATH_IDS:
                    path = template
                    for name in params:
                        path = path.replace("{" + name + "}", bad if name == param else "ok")
                    body = json.dumps(SCENE).encode()
                    status, answer = await raw_request(srv, method, path, body, headers=AUTH)
                    assert (status, answer["error"]) == (400, "invalid_id"), (
                        method,
                        path[:80],
                        answer,
                    )
                    assert param in answer["detail"]
                # the key still comes first
                status, answer = await raw_request(
                    srv, method, template.replace("{", "").replace("}", "*"), b"{}"
                )
                assert status == 401
        # nothing was published, registered or opened by any of it
        status, answer = await post(srv, "/api/v1/parties/p1/events", SCENE, AUTH)
        assert answer == {"seq": hello["payload"]["seq"] + 1}
        async with srv.http.get(srv.base + "/api/v1/parties/p1/members", headers=AUTH) as resp:
            assert await resp.json() == {"members": []}
        await a.close()


async def test_a_body_that_stops_arriving_gets_408_and_the_connection_is_closed() -> None:
    settings = make_settings(api_key=KEY, request_body_timeout=0.3)
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        a, hello = await srv.join("aria")
        host, port = srv.base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps(SCENE).encode()
        head = (
            f"POST /api/v1/parties/p1/events HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body[:10])  # and never the rest
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=10)  # read() ends: closed
        writer.close()
        status_line, _, rest = response.partition(b"\r\n")
        assert status_line.split(b" ")[1] == b"408"
        assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"] == "body_timeout"
        assert await post(srv, "/api/v1/parties/p1/events", SCENE, AUTH) == (
            202,
            {"seq": hello["payload"]["seq"] + 1},  # nothing was published
        )
        await a.close()
