"""The in-process link: claim before start, restate notices, failures kept out of the gateway."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import pytest
from party_sync.engine.inprocess import InProcessLink
from party_sync.engine.interface import (
    ENGINE_FAILED,
    ActionRequest,
    Claim,
    EventPublisher,
    JoinNotice,
    NarrationPiece,
    NarrationSender,
    RestateNotice,
    VoteRequest,
    VoteStarter,
)
from party_sync.protocol.errors import BackendUnavailable, ErrorCode
from party_sync.server import build_server
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.hosts import RecordingHost, make_action
from ps_testkit.servers import make_settings


async def started(
    engine: ScriptedEngine, host: RecordingHost, *, claim_on_accept: bool = False
) -> InProcessLink:
    """The link as these tests drive it: by default claiming each action itself, right before
    the engine starts (the gateway's claim on accept is tested on the backends and end to end)."""
    link = InProcessLink(engine, claim_on_accept=claim_on_accept)
    await link.start(host)
    return link


class LinkOfBefore:
    """An ``EngineLink`` written before ``claims_on_accept`` existed (an embedder's own)."""

    async def start(self, host: Any) -> None: ...
    async def submit(self, action: ActionRequest) -> None: ...
    async def notify_join(self, notice: Any) -> None: ...
    async def notify_restate(self, notice: Any) -> None: ...
    async def close(self) -> None: ...


def test_the_gateway_claims_on_acceptance_only_for_a_link_that_says_so() -> None:
    """The attribute is optional: a link without it is served as before (its host claims)."""
    settings = make_settings()

    def claims_on_accept(link: Any) -> bool:
        return bool(build_server(settings, link=link).gateway.executor.claim_on_accept)

    assert claims_on_accept(InProcessLink(ScriptedEngine())) is True
    assert claims_on_accept(InProcessLink(ScriptedEngine(), claim_on_accept=False)) is False
    assert claims_on_accept(LinkOfBefore()) is False


async def test_by_default_the_claim_rides_on_the_acceptance() -> None:
    """The default link says so (the gateway then claims in ``begin_action``) and never asks
    the host for a claim of its own: the engine starts at once."""
    engine, host = ScriptedEngine(), RecordingHost(claims={"a1": Claim.EXPIRED})
    link = InProcessLink(engine)
    assert link.claims_on_accept
    await link.start(host)
    await link.submit(make_action("a1", deadline=4_000_000_000.0))
    await wait_until(lambda: host.results() == ["a1"])
    await link.close()
    assert host.claimed == []
    assert [a.action_id for a in engine.calls] == ["a1"]


@pytest.mark.parametrize("claim", [Claim.EXPIRED, Claim.FINAL])
async def test_an_action_is_not_run_unless_its_claim_says_start(claim: Claim) -> None:
    engine, host = ScriptedEngine(), RecordingHost(claims={"late": claim})
    link = await started(engine, host)
    await link.submit(make_action("late", deadline=1.0))
    await link.submit(make_action("ok", deadline=4_000_000_000.0))
    await wait_until(lambda: host.results() == ["ok"])
    await link.close()
    assert [a.action_id for a in host.claimed] == ["late", "ok"]
    assert [a.action_id for a in engine.calls] == ["ok"]  # "late" never reached the engine
    assert engine.calls[0].deadline == 4_000_000_000.0  # the deadline travels in the call
    assert host.failed == []  # party_sync's claim answered it, not the link


async def test_a_claim_that_fails_on_the_backend_is_asked_again() -> None:
    engine, host = ScriptedEngine(), RecordingHost(claim_errors=2)
    link = await started(engine, host)
    await link.submit(make_action("stall"))
    await wait_until(lambda: host.results() == ["stall"])
    await link.close()
    assert engine.count("stall") == 1


async def test_a_claim_that_never_answers_leaves_the_action_unstarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine, host = ScriptedEngine(), RecordingHost(claim_errors=1_000)
    link = InProcessLink(engine, claim_patience=0.0, claim_on_accept=False)
    await link.start(host)
    await link.submit(make_action("stuck"))
    await link.close()
    assert engine.calls == []
    assert host.failed == []  # not started, and nothing false said: the timeout answers it
    assert any(r.levelno == logging.ERROR for r in caplog.records)


async def test_restate_notices_reach_the_engine() -> None:
    engine, host = ScriptedEngine(), RecordingHost()
    link = await started(engine, host)
    notice = RestateNotice("p1", "r1", "e-2", "trace-re")
    await link.notify_restate(notice)
    assert engine.restates == [notice]
    await link.close()


async def test_an_engine_failing_to_restate_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine, host = ScriptedEngine(), RecordingHost()
    engine.restate_failures = 1
    link = await started(engine, host)
    await link.notify_restate(RestateNotice("p1", "r1", "e-2", "trace-re"))
    assert any("re-state" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    await link.close()


class OldEngine:
    """An engine written before restate notices: no ``handle_restate``."""

    async def start(self, publisher: EventPublisher) -> None:
        return None

    async def handle_action(self, action: ActionRequest) -> None:
        return None

    async def handle_join(self, notice: JoinNotice) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_an_engine_without_handle_restate_is_left_alone() -> None:
    link = InProcessLink(OldEngine())
    await link.start(RecordingHost())
    await link.notify_restate(RestateNotice("p1", "r1", "e-2", "trace-re"))
    await link.close()


async def test_an_engine_crash_still_fails_the_action_with_engine_error() -> None:
    engine, host = ScriptedEngine(), RecordingHost()
    engine.mode = "crash"
    link = await started(engine, host)
    await link.submit(make_action("boom"))
    await wait_until(lambda: host.failed == [("boom", ErrorCode.ENGINE_ERROR)])
    assert host.failed_words == [ENGINE_FAILED]  # the same words on every transport
    await link.close()


class _FlakyPublishHost(VoteStarter, NarrationSender):
    """A LinkHost whose backend fails the next publish (a Redis blip under the engine)."""

    def __init__(self) -> None:
        self.fail_next = False
        self.events: list[str] = []
        self.answers: list[tuple[str, str]] = []
        self.narrated: list[NarrationPiece] = []

    async def publish(
        self, party_id: str, type: str, payload: Mapping[str, Any], *, trace_id: str | None = None
    ) -> int:
        if self.fail_next:
            self.fail_next = False
            raise BackendUnavailable("redis: connection refused")
        self.events.append(type)
        return len(self.events)

    async def send_piece(self, piece: NarrationPiece) -> None:
        self.narrated.append(piece)

    async def reject(self, action: ActionRequest, message: str) -> None:
        self.answers.append(("action_rejected", message))

    async def request_vote(self, request: VoteRequest) -> Mapping[str, Any]:
        raise RuntimeError("no votes here")

    async def fail(self, action: ActionRequest, code: ErrorCode, message: str) -> None:
        self.answers.append((code.value, message))

    async def claim(self, action: ActionRequest) -> Claim:
        return Claim.FINAL if "action.result" in self.events else Claim.START

    async def answered(self, action: ActionRequest) -> bool:
        return "action.result" in self.events


async def test_a_publish_failing_after_the_engine_applied_an_action_is_never_told_as_failure() -> (
    None
):
    """A refusal never lies (docs/protocol.md, "Actions and idempotency"): the reference engine
    commits, then publishes; a publish that fails must not become ``engine_error`` ("not
    applied"). The link hands the action to the engine again, which publishes what it had left:
    one result."""
    from campaign_engine.engine import ReferenceEngine

    engine = ReferenceEngine(seed=1)
    host = _FlakyPublishHost()
    link = InProcessLink(engine)
    await link.start(host)
    try:
        await link.notify_join(JoinNotice("p1", "r1", "c1", "Ann", "t" * 32))
        host.events.clear()
        host.fail_next = True
        action = make_action("a1", deadline=time.time() + 10, character_id="c1", trace_id="a" * 32)
        await link.submit(action)
        await wait_until(lambda: "action.result" in host.events, timeout=5)
        state = await engine.run_state("r1")
        assert state is not None and "a1" in state.applied
        assert host.answers == []  # nobody was told it failed
        assert host.events.count("action.result") == 1
        assert len(await engine.chronicle("r1")) == 1  # applied once
    finally:
        await link.close()


async def test_an_engine_that_cannot_tell_is_handed_the_action_again_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An engine that raises TimeoutError (it cannot tell whether it applied) gets the action
    again, a second apart at most, until it answers: one WARNING per action, not one per retry
    (engine probe: a line a second for up to ten minutes)."""

    class Unsure:
        def __init__(self) -> None:
            self.calls = 0
            self.seen: list[tuple[bool, bool]] = []  # (redelivery, no deadline) of each call
            self.publisher: Any = None

        async def start(self, publisher: Any) -> None:
            self.publisher = publisher

        async def handle_action(self, action: ActionRequest) -> None:
            self.calls += 1
            self.seen.append((action.redelivery, action.deadline is None))
            if self.calls < 5:
                raise TimeoutError("the engine's database did not answer")
            await self.publisher.publish(
                action.party_id, "action.result", {"action_id": action.action_id}
            )

        async def handle_join(self, notice: JoinNotice) -> None:
            return None

        async def close(self) -> None:
            return None

    caplog.set_level(logging.DEBUG, logger="party_sync.engine.inprocess")
    engine, host = Unsure(), _FlakyPublishHost()
    link = InProcessLink(engine)
    await link.start(host)
    try:
        await link.submit(make_action("u1", deadline=time.time() + 30))
        await wait_until(lambda: "action.result" in host.events, timeout=10)
    finally:
        await link.close()
    said = [r for r in caplog.records if "could not tell whether it applied" in r.getMessage()]
    assert engine.calls == 5 and len(said) == 4
    assert [r.levelno for r in said] == [logging.WARNING] + [logging.DEBUG] * 3
    assert host.answers == []
    # the first call is the start, each one after it a redelivery (it may have applied it)
    assert engine.seen == [(False, False)] + [(True, True)] * 4


def test_the_server_hands_over_and_claims_for_as_long_as_an_answer_can_be_recorded() -> None:
    """A Redis stall longer than a minute must not leave an applied action unanswered until its
    record expires: the in-process and HTTP links keep asking (claims, hand-overs, refusals)
    for the record's whole TTL, not a fixed minute."""
    from party_sync.engine.http_link import HttpEngineLink
    from party_sync.server import make_link

    settings = make_settings(action_record_ttl=900.0)
    link = make_link(settings)
    assert isinstance(link, InProcessLink) and link.claim_patience == 900.0
    http = make_link(
        make_settings(action_record_ttl=900.0, engine_url="http://engine.test/a", api_key="k" * 24)
    )
    assert isinstance(http, HttpEngineLink)
    assert (http.claim_patience, http.give_up_after) == (900.0, 900.0)


class _RestateOverStall(OldEngine):
    """An engine whose re-statement meets party_sync's backend down ``failures`` times (its
    publish raises BackendUnavailable), and one whose joins always do."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.restated: list[str] = []

    async def handle_restate(self, notice: RestateNotice) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise BackendUnavailable("redis unavailable during publish")
        self.restated.append(notice.epoch)

    async def handle_join(self, notice: JoinNotice) -> None:
        raise BackendUnavailable("redis unavailable during publish")


async def test_a_restate_that_meets_a_backend_outage_is_tried_again_and_a_newer_one_wins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis restarted empty and is still flapping: the notice that brings a party's scene back
    is not lost with the first failed publish (a join, a hint, is dropped with a WARNING)."""
    engine = _RestateOverStall(failures=4)
    link = InProcessLink(engine, claim_patience=30.0)
    await link.start(RecordingHost())
    await link.notify_restate(RestateNotice("p1", "r1", "e-2", "trace-a"))
    await link.notify_restate(RestateNotice("p1", "r1", "e-3", "trace-b"))  # replaces e-2
    await link.notify_restate(RestateNotice("p2", "r2", "e-1", "trace-c"))
    await wait_until(lambda: sorted(engine.restated) == ["e-1", "e-3"], timeout=10)
    await link.notify_join(JoinNotice("p1", "r1", "aria", "Aria", "trace-j"))
    await link.close()
    assert "e-2" not in engine.restated
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
