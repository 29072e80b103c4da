"""Bad input gets its own error code, loses nothing, and never hurts anyone else."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from ps_testkit.client import Closed, wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import make_settings, serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis

VALID: dict[str, Any] = {
    "type": "action.request",
    "payload": {
        "action_id": "ok-1",
        "character_id": "aria",
        "campaign_run_id": "r1",
        "action_type": "skill_check",
        "payload": {},
    },
}


async def test_each_kind_of_bad_input_gets_its_code_and_the_connection_stays_usable() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        oversized = orjson.dumps({**VALID, "pad": "x" * 70_000}).decode()
        cases: list[tuple[str | bytes, str]] = [
            ("{not json", "bad_json"),
            (b"\xff\xfe garbage", "bad_json"),
            (  # a valid action, but in a binary frame: refused, never run (engine.calls below)
                orjson.dumps({**VALID, "payload": {**VALID["payload"], "action_id": "bin-1"}}),
                "bad_json",
            ),
            ("[1, 2, 3]", "bad_message"),
            ('{"type": 5, "payload": {}}', "bad_message"),
            ('{"type": "action.request"}', "bad_message"),
            ('{"type": "chat.say", "payload": {}}', "unknown_type"),
            ('{"type": "action.result", "payload": {}}', "server_only_type"),
            ('{"type": "system.hello", "payload": {}}', "server_only_type"),
            (
                orjson.dumps(
                    {**VALID, "payload": {**VALID["payload"], "action_type": "teleport"}}
                ).decode(),
                "schema_violation",
            ),
            (orjson.dumps({**VALID, "extra": 1}).decode(), "schema_violation"),
            (oversized, "message_too_large"),
            ('{"type": "vote.cast", "payload": {"vote_id": "v1", "option": "A"}}', "vote_unknown"),
        ]
        for raw, code in cases:
            await a.send(raw)
            err = await a.expect("system.error")
            assert err["payload"]["code"] == code, (raw[:60], err)
            assert err["payload"]["message"]
        await a.send(VALID)
        assert (await a.expect("action.result"))["payload"]["action_id"] == "ok-1"
        assert len(engine.calls) == 1
        await a.close()


async def test_schema_violation_names_the_field() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        bad = {
            **VALID,
            "trace_id": "tv-1",
            "payload": {**VALID["payload"], "action_id": "has space"},
        }
        await a.send(bad)
        err = await a.expect("system.error")
        assert err["payload"]["code"] == "schema_violation"
        assert "action_id" in err["payload"]["message"]
        assert err["payload"]["in_reply_to"]["trace_id"] == "tv-1"
        await a.close()


@pytest.mark.parametrize("mode", ["reject", "crash"])
async def test_the_refusal_of_an_accepted_action_carries_the_trace_of_its_acceptance(
    mode: str,
) -> None:
    """docs/protocol.md (trace_id): a refusal that is an accepted action's final answer says in
    ``in_reply_to.trace_id`` the action's trace id, its ``action.accepted``'s (the server's when
    the client sent none; the client's own when it sent one)."""
    engine = ScriptedEngine()
    engine.mode = mode  # type: ignore[assignment]
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        for n, sent in enumerate((None, "tv-own")):
            payload = {**VALID["payload"], "action_id": f"refused-{n}"}
            await a.send({**VALID, "payload": payload, **({"trace_id": sent} if sent else {})})
            accepted = await a.expect("action.accepted")
            err = await a.expect("system.error")
            assert err["payload"]["code"] in {"action_rejected", "engine_error"}
            assert err["payload"]["in_reply_to"]["action_id"] == f"refused-{n}"
            assert err["payload"]["in_reply_to"]["trace_id"] == accepted["trace_id"]
            assert err["trace_id"] == accepted["trace_id"]
            if sent is not None:
                assert accepted["trace_id"] == sent
        await a.close()


async def test_a_flooding_client_is_closed_with_1008_and_others_are_unaffected() -> None:
    engine = ScriptedEngine()
    settings = make_settings(rate_limit=5.0, rate_burst=10.0)
    async with serve_in_process(settings, engine=engine) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await a.flood("{nope")
        codes: set[str] = set()
        close_code = None
        try:
            while True:
                message = await a.recv()
                if message["type"] == "system.error":
                    codes.add(message["payload"]["code"])
        except Closed as exc:
            close_code = exc.code
        assert close_code == 1008
        assert codes <= {"bad_json", "rate_limited"} and "bad_json" in codes
        await b.act("still-fine", "borin", "r1")
        assert (await b.until("action.result"))["payload"]["action_id"] == "still-fine"
        await b.close()


async def test_a_frame_far_beyond_the_limit_closes_only_that_connection() -> None:
    async with serve_in_process(
        make_settings(max_message_bytes=4096), engine=ScriptedEngine()
    ) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await a.send("x" * 100_000)
        try:
            code = await a.closed()
        except Closed as exc:
            code = exc.code
        assert code == 1009
        await b.act("b-ok", "borin", "r1")
        assert (await b.until("action.result"))["payload"]["action_id"] == "b-ok"
        await b.close()
        assert srv.server is not None  # the transport's close is counted like the server's own
        registry = srv.server.gateway.metrics.registry
        sample = ("party_sync_closes_total", {"code": "1009"})
        await wait_until(lambda: registry.get_sample_value(*sample) == 1)
