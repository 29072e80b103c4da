"""Actions: idempotency by action_id, one in flight per character, timeouts, engine refusals."""

from __future__ import annotations

import asyncio
import logging

import pytest
from party_sync.core.actions import Claim
from party_sync.engine.inprocess import InProcessLink
from party_sync.engine.interface import ActionRequest
from party_sync.protocol.errors import BackendUnavailable
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import make_settings, serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis


async def test_same_action_id_twice_in_flight_is_one_engine_call_and_one_broadcast() -> None:
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await a.expect("party.join")
        await a.act("dup-1", "aria", "r1", trace_id="t-first")
        await a.act("dup-1", "aria", "r1", trace_id="t-second")
        err = await a.expect("system.error")
        assert err["payload"]["code"] == "action_in_flight"
        assert err["payload"]["in_reply_to"] == {
            "trace_id": "t-second",
            "type": "action.request",
            "action_id": "dup-1",
        }
        assert err["payload"]["retryable"] is False
        engine.gate.set()
        first = await b.expect("action.result")
        await b.expect("scene.update")
        assert engine.count("dup-1") == 1
        await a.expect("action.result")
        await a.expect("scene.update")

        # a repeat after completion: the original result, same seq and bytes, to the sender only
        await a.act("dup-1", "aria", "r1")
        again = await a.expect("action.result")
        assert again == first
        assert a.raw[-1] == b.raw[-2]
        assert engine.count("dup-1") == 1
        # borin got nothing more: the next thing he sees is the next real event
        await a.act("next-1", "aria", "r1")
        assert (await b.expect("action.result"))["payload"]["action_id"] == "next-1"
        assert (await b.expect("scene.update"))["seq"] == first["seq"] + 3
        await a.close()
        await b.close()


async def test_a_character_with_an_action_in_flight_cannot_send_another() -> None:
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        await a.act("one", "aria", "r1")
        await a.act("two", "aria", "r1")
        err = await a.expect("system.error")
        assert err["payload"]["code"] == "character_busy"
        assert err["payload"]["retryable"] is True
        assert [c.action_id for c in engine.calls] == ["one"]
        engine.gate.set()
        await a.expect("action.result")
        await a.expect("scene.update")
        await a.act("two", "aria", "r1")  # free again
        assert (await a.expect("action.result"))["payload"]["action_id"] == "two"
        await a.close()


async def test_other_characters_are_not_blocked_by_one_in_flight() -> None:
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await a.act("a1", "aria", "r1")
        await b.act("b1", "borin", "r1")
        await wait_until(lambda: len(engine.calls) == 2)  # both reached the engine
        engine.gate.set()
        ids = {(await b.until("action.result"))["payload"]["action_id"] for _ in range(2)}
        assert ids == {"a1", "b1"}
        await a.close()
        await b.close()


async def test_an_action_no_engine_started_by_its_deadline_is_refused_and_never_applied() -> None:
    """The timeout is a promise (docs/protocol.md, "Actions and idempotency"). Nobody started the
    action by its deadline (stream mode with no worker, say): the sender gets action_timeout, a
    resend gets the same answer, and an engine host that comes later is told not to start it."""
    engine = ScriptedEngine()
    async with serve_in_process(make_settings(action_timeout=0.3), engine=engine) as srv:
        assert srv.server is not None
        gateway = srv.server.gateway
        held: list[ActionRequest] = []

        async def hold(action: ActionRequest) -> None:  # an engine link nobody consumes
            held.append(action)

        gateway.link.submit = hold  # type: ignore[method-assign]
        # a link that does not start actions at once: its host claims, so acceptance does not
        gateway.executor.claim_on_accept = False
        a, _ = await srv.join("aria")
        await a.act("late", "aria", "r1")
        err = await a.expect("system.error")
        assert err["payload"]["code"] == "action_timeout"
        assert err["payload"]["in_reply_to"]["action_id"] == "late"
        assert held and held[0].deadline is not None
        # the engine host that comes now must not start it
        assert await gateway.publisher.claim(held[0]) is Claim.FINAL
        assert engine.count("late") == 0
        # a resend gets the same final answer; the character is free
        await a.act("late", "aria", "r1")
        again = await a.expect("system.error")
        assert again["payload"]["code"] == "action_timeout"
        assert again["payload"]["in_reply_to"]["action_id"] == "late"
        await a.close()


async def test_an_action_an_engine_started_is_never_timed_out_but_frees_the_character() -> None:
    """An engine started the action and is slow: no action_timeout (it may still be applied);
    the character may act again after action_timeout; the answer comes from the engine."""
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    async with serve_in_process(make_settings(action_timeout=0.2), engine=engine) as srv:
        a, _ = await srv.join("aria")
        await a.act("slow", "aria", "r1")
        await wait_until(lambda: engine.count("slow") == 1)
        await asyncio.sleep(0.5)  # hold the engine past the deadline (the fault under test)
        await a.act("slow", "aria", "r1")  # a resend while it runs: in flight, never run twice
        assert (await a.expect("system.error"))["payload"]["code"] == "action_in_flight"
        engine.gate.set()
        result = await a.expect("action.result")
        assert result["payload"]["action_id"] == "slow"
        assert engine.count("slow") == 1
        await a.close()


async def test_an_engine_that_ends_without_publishing_is_told_to_the_operator_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Outside probe: an engine whose handler returned without publishing the result left its
    player waiting, and neither the log nor /metrics said so. At the deadline the action is
    counted (party_sync_actions_overdue_total) and one WARNING names it; later looks at the same
    action count nothing more."""
    engine = ScriptedEngine()
    engine.mode = "silent"
    async with serve_in_process(make_settings(action_timeout=0.2), engine=engine) as srv:

        def overdue() -> float | None:
            return srv.metric("party_sync_actions_overdue_total")

        a, _ = await srv.join("aria")
        await a.act("mute", "aria", "r1")
        await wait_until(lambda: overdue() == 1.0)
        await wait_until(
            lambda: any(
                r.levelno == logging.WARNING and "no answer at their deadline" in r.getMessage()
                for r in caplog.records
            )
        )
        (record,) = [r for r in caplog.records if "no answer at their deadline" in r.getMessage()]
        assert "mute" in record.getMessage() and "PARTY_SYNC_ACTION_TIMEOUT" in record.getMessage()
        await a.act("mute2", "aria", "r1")  # the character is free again; another one
        await wait_until(lambda: overdue() == 2.0)
        # (the second within a minute of the first: counted, not logged again)
        assert (
            len([r for r in caplog.records if "no answer at their deadline" in r.getMessage()]) == 1
        )
        await a.close()


async def test_an_action_its_engine_never_answers_is_forgotten_without_a_false_word() -> None:
    """Outside probe (Redis, stream workers, an engine that returns without publishing): when
    the action's record expired (action_record_ttl after acceptance) its sender was told
    backend_unavailable "the party's state was lost: send the same action again", untrue, and
    the resend it invited was forwarded to the engine again. Now the node stops waiting for it,
    counts it (party_sync_actions_forgotten_total), and says nothing to the player."""
    engine = ScriptedEngine()
    engine.mode = "silent"
    settings = make_settings(action_timeout=0.2, action_record_ttl=1.0)
    async with serve_in_process(settings, engine=engine) as srv:
        a, _ = await srv.join("aria")
        await a.act("mute", "aria", "r1")
        await wait_until(lambda: srv.metric("party_sync_actions_forgotten_total") == 1.0)
        await a.send({"type": "system.ping", "payload": {}})
        assert (await a.expect("system.pong"))["type"] == "system.pong"  # and nothing before
        assert not [m for m in a.received if m["type"] == "system.error"]
        assert engine.count("mute") == 1
        await a.close()


async def test_engine_rejection_reaches_the_actor_and_is_the_final_answer() -> None:
    engine = ScriptedEngine()
    engine.mode = "reject"
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        await a.act("bad", "aria", "r1", action_type="choice", payload={"option": "Z"})
        err = await a.expect("system.error")
        assert err["payload"]["code"] == "action_rejected"
        assert err["payload"]["message"] == "that option is not open"
        assert err["payload"]["in_reply_to"]["action_id"] == "bad"
        engine.mode = "answer"
        # a resend of the refused action_id gets its refusal again (it may have been lost) ...
        await a.act("bad", "aria", "r1", action_type="choice", payload={"option": "A"})
        again = await a.expect("system.error")
        assert again["payload"]["code"] == "action_rejected"
        assert engine.count("bad") == 1
        # ... and the character is free for a new action
        await a.act("good", "aria", "r1", action_type="choice", payload={"option": "A"})
        assert (await a.expect("action.result"))["payload"]["action_id"] == "good"
        await a.close()


async def test_engine_crash_is_a_retryable_engine_error_and_the_server_lives_on() -> None:
    engine = ScriptedEngine()
    engine.mode = "crash"
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        await a.act("boom", "aria", "r1")
        err = await a.expect("system.error")
        assert err["payload"]["code"] == "engine_error"
        assert err["payload"]["retryable"] is True
        assert "RuntimeError" not in err["payload"]["message"]  # no internals
        engine.mode = "answer"
        await a.act("boom", "aria", "r1")  # a resend gets the final answer: it was not applied
        assert (await a.expect("system.error"))["payload"]["code"] == "engine_error"
        await a.act("boom-2", "aria", "r1")  # trying again is a new action
        assert (await a.expect("action.result"))["payload"]["action_id"] == "boom-2"
        assert engine.count("boom") == 1
        await a.close()


async def test_action_for_another_character_or_run_is_refused_and_never_forwarded() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        await a.act("x", "borin", "r1")
        assert (await a.expect("system.error"))["payload"]["code"] == "forbidden"
        await a.act("y", "aria", "other-run")
        assert (await a.expect("system.error"))["payload"]["code"] == "forbidden"
        assert engine.calls == []
        await a.act("z", "aria", "r1")
        assert (await a.expect("action.result"))["payload"]["action_id"] == "z"
        await a.close()


async def test_server_makes_a_trace_id_when_the_client_gives_none() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        await a.act("no-trace", "aria", "r1")
        result = await a.expect("action.result")
        assert len(result["trace_id"]) == 32
        assert engine.calls[0].trace_id == result["trace_id"]
        assert engine.calls[0].envelope["trace_id"] == result["trace_id"]
        await a.close()


async def test_a_second_result_for_one_action_is_not_broadcast_again() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(engine=engine) as srv:
        a, _ = await srv.join("aria")
        await a.act("once", "aria", "r1")
        first = await a.expect("action.result")
        await a.expect("scene.update")
        assert engine.publisher is not None
        again = dict(first["payload"], narration="a redelivered action re-sends its result")
        seq = await engine.publisher.publish("p1", "action.result", again)
        assert seq == first["seq"]  # the original one stands
        await a.act("next", "aria", "r1")
        nxt = await a.expect("action.result")  # nothing was broadcast in between
        assert nxt["payload"]["action_id"] == "next"
        assert nxt["seq"] == first["seq"] + 2
        await a.close()


@pytest.mark.parametrize("where", ["backend", "core"])
async def test_an_unexpected_failure_answers_internal_error_and_the_connection_goes_on(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A bug on the path of one message (the backend raising what it never should, or the party
    core itself) is that message's ``internal_error``, and the connection stays usable."""
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        assert srv.server is not None
        owner: object = (
            srv.server.gateway.backend if where == "backend" else srv.server.gateway.core
        )
        name = "begin_action" if where == "backend" else "handle"
        real = getattr(owner, name)
        calls = 0

        def broken_once(*args: object, **kwargs: object) -> object:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, broken_once)
        await a.act("oops-1", "aria", "r1")
        err = await a.expect("system.error")
        assert err["payload"]["code"] == "internal_error"
        assert err["payload"]["in_reply_to"]["action_id"] == "oops-1"
        await a.act("fine-1", "aria", "r1")
        assert (await a.expect("action.result"))["payload"]["action_id"] == "fine-1"


class FlakyLink(InProcessLink):
    """The in-process link whose first ``failures`` appends fail as an unreachable actions stream
    would (a stream link whose partition's master is down for a moment)."""

    def __init__(self, engine: ScriptedEngine, failures: int, then_refuse: bool = False) -> None:
        super().__init__(engine)
        self.failures = failures
        self.then_refuse = then_refuse
        self.calls = 0

    async def submit(self, action: ActionRequest) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise BackendUnavailable("the actions stream is not answering")
        if self.then_refuse:
            raise RuntimeError("the link refuses it")
        await super().submit(action)


async def test_an_action_the_link_could_not_append_is_appended_again_before_its_deadline() -> None:
    """The append of an accepted action failed (its stream's master failed over): the player is
    told ``backend_unavailable`` (not final), the node appends it again with backoff, and the
    action is answered, once, instead of timing out at its deadline (cluster probe: 29 actions
    of parties on healthy masters timed out after their partition's master failed over)."""
    engine = ScriptedEngine()
    link = FlakyLink(engine, failures=2)
    async with serve_in_process(make_settings(action_timeout=10.0), link=link) as srv:
        a, _ = await srv.join("aria")
        await a.act("again-1", "aria", "r1")
        err = await a.expect("system.error")
        assert err["payload"]["code"] == "backend_unavailable"
        result = await a.expect("action.result", timeout=8.0)
        assert result["payload"]["action_id"] == "again-1"
        assert engine.count("again-1") == 1
        assert link.calls == 3
        await a.close()


async def test_an_action_the_link_refuses_when_appended_again_gets_its_final_answer() -> None:
    """The append failed, then the link refused the action when it was appended again: that
    refusal is its final answer (``engine_unavailable``, as on a first attempt), not a wait for
    its deadline."""
    engine = ScriptedEngine()
    link = FlakyLink(engine, failures=1, then_refuse=True)
    async with serve_in_process(make_settings(action_timeout=30.0), link=link) as srv:
        a, _ = await srv.join("aria")
        await a.act("refused-1", "aria", "r1")
        first = await a.expect("system.error")
        assert first["payload"]["code"] == "backend_unavailable"
        final = await a.expect("system.error", timeout=5.0)
        assert final["payload"]["code"] == "engine_unavailable"
        assert engine.count("refused-1") == 0
        await a.close()
