"""The HTTP transport's two ends over loopback: ``HttpEngineLink`` and the engine host app.

The link talks to the real host app (``build_host_app`` with a ``ScriptedEngine``) or to a
scripted fake; party_sync's side is a ``RecordingHost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from party_sync import config
from party_sync.engine import wire
from party_sync.engine.health import HttpProbe
from party_sync.engine.http_host import ApiPublisher, build_host_app
from party_sync.engine.http_link import HttpEngineLink
from party_sync.engine.interface import (
    ENGINE_FAILED,
    ENGINE_FAILURES,
    ActionRequest,
    Claim,
    JoinNotice,
    RestateNotice,
)
from party_sync.engine.wire import join_envelope
from party_sync.metrics import Metrics
from party_sync.protocol.errors import BackendUnavailable, ErrorCode
from party_sync.server import make_link, watch_engine
from ps_testkit.client import wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.hosts import RecordingHost, make_action
from ps_testkit.servers import free_port

PAST = 1_000_000_000.0  # 2001: long gone
FUTURE = 4_000_000_000.0  # 2096


@contextlib.asynccontextmanager
async def serve(app: web.Application, port: int = 0) -> AsyncIterator[str]:
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


#: The server API key the engine host publishes with, which the link's deliveries carry.
HOST_KEY = "host-key-0123456789abcdef0123"


def host_app(engine: ScriptedEngine) -> web.Application:
    # The engine stays silent (publishes nothing), so the API publisher is never used.
    engine.mode = "silent"
    return build_host_app(engine, ApiPublisher("http://127.0.0.1:9", HOST_KEY))


@contextlib.asynccontextmanager
async def started_link(
    host: RecordingHost, url: str, **options: Any
) -> AsyncIterator[HttpEngineLink]:
    options = {
        "timeout": 2.0,
        "retries": 2,
        "backoff_base": 0.001,
        "backoff_max": 0.01,
        "api_key": HOST_KEY,
        **options,
    }
    link = HttpEngineLink(url, **options)
    await link.start(host)
    try:
        yield link
    finally:
        await link.close()


async def idle(link: HttpEngineLink) -> None:
    """Every delivery the link started has ended."""
    await wait_until(lambda: not link._tasks, timeout=10)


@dataclass
class ScriptedApi:
    """A fake engine endpoint: answers POSTs to /actions from ``answers`` (then 202);
    ``"hang"`` waits until ``release`` is set (past the link's timeout)."""

    answers: list[int | str] = field(default_factory=list)
    actions: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    notices: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def action(self, request: web.Request) -> web.Response:
        self.actions.append((dict(request.headers), orjson.loads(await request.read())))
        answer = self.answers.pop(0) if self.answers else 202
        if answer == "hang":
            await self.release.wait()
            return web.json_response({}, status=202)
        if answer == "expired":
            return web.json_response({"error": "expired"}, status=409)
        if answer == "engine_error":  # what party-sync engine-http answers when the engine raised
            return web.json_response({"error": "engine_error", "detail": "x"}, status=500)
        if answer == "shutting_down":  # engine-http, a body still arriving at its SIGTERM
            return web.json_response({"error": "shutting_down", "detail": "x"}, status=503)
        if answer == "claimed":  # engine-http, asked to claim: claimed (start), then handled
            return web.json_response({}, status=202, headers={wire.CLAIMED_HEADER: "start"})
        assert isinstance(answer, int)
        return web.json_response({"detail": f"status {answer}"}, status=answer)

    notice_answers: list[int] = field(default_factory=list)

    async def notice(self, request: web.Request) -> web.Response:
        self.notices.append((dict(request.headers), orjson.loads(await request.read())))
        status = self.notice_answers.pop(0) if self.notice_answers else 202
        return web.json_response({"detail": f"status {status}"}, status=status)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/actions", self.action)
        app.router.add_post("/notices", self.notice)
        return app


# --- the link --------------------------------------------------------------------------------


async def test_an_action_carries_its_deadline_and_attempt_number() -> None:
    api, host = ScriptedApi(), RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(make_action("h-1", deadline=1_900_000_000.5))
        await idle(link)
    [(headers, body)] = api.actions
    assert body["deadline"] == 1_900_000_000.5
    assert body["party_id"] == "p1" and body["campaign_run_id"] == "r1"
    assert body["envelope"]["payload"]["action_id"] == "h-1"
    assert headers["X-Action-Deadline"] == "1900000000.5"
    assert headers["X-Delivery-Attempt"] == "1"
    assert headers["Idempotency-Key"] == "h-1"
    assert headers["X-Trace-Id"] == "trace-h-1"
    assert [a.action_id for a in host.claimed] == ["h-1"]  # claimed before the POST


async def test_an_action_without_deadline_has_no_deadline_field() -> None:
    api, host = ScriptedApi(), RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(make_action("h-2"))
        await idle(link)
    [(headers, body)] = api.actions
    assert "deadline" not in body and "X-Action-Deadline" not in headers


@pytest.mark.parametrize("claim", [Claim.EXPIRED, Claim.FINAL])
async def test_an_action_whose_claim_is_not_start_is_never_posted(claim: Claim) -> None:
    api, host = ScriptedApi(), RecordingHost(claims={"no": claim})
    async with serve(api.app()) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(make_action("no"))
        await link.submit(make_action("yes"))
        await idle(link)
    assert [body["envelope"]["payload"]["action_id"] for _, body in api.actions] == ["yes"]
    assert host.failed == []


async def test_a_409_expired_becomes_action_timeout() -> None:
    api, host = ScriptedApi(answers=["expired"]), RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(make_action("x", deadline=PAST))
        await idle(link)
    assert host.failed == [("x", ErrorCode.ACTION_TIMEOUT)]
    assert host.rejected == []


async def test_another_4xx_is_a_rejection() -> None:
    api, host = ScriptedApi(answers=[409]), RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(make_action("r"))
        await idle(link)
    assert host.rejected == [("r", "status 409")]
    assert host.failed == []


@pytest.mark.parametrize(
    ("content_type", "body", "reason"),
    [
        # no charset: read as UTF-8
        ("text/plain", "Aktion ungültig".encode("latin-1"), "Aktion ung\ufffdltig"),
        ("text/plain; charset=no-such-charset", b"bad \xff reason", "bad \ufffd reason"),
        ("application/json", b'{"detail": "bad \xff reason"}', "bad \ufffd reason"),
        ("text/plain; charset=utf-8", b"half a character \xe2\x82", "half a character \ufffd"),
    ],
)
async def test_a_refusal_whose_body_is_not_what_its_charset_says_is_still_a_refusal(
    content_type: str, body: bytes, reason: str
) -> None:
    """Recheck probe: an engine's 400 in Latin-1 (``text/plain``, no charset) made reading the
    body raise ``UnicodeDecodeError``: the delivery ended there, the player never had an
    answer and a resend was ``action_in_flight`` for good. Undecodable bytes are U+FFFD."""
    host = RecordingHost()

    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=400, body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_post("/actions", refuse)
    async with serve(app) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(make_action("u"))
        await idle(link)
    assert host.rejected == [("u", reason)]
    assert host.failed == []


@pytest.mark.parametrize(
    "head",
    [
        # cut short: the connection closes 95 bytes before the body's end
        b"Content-Type: text/plain\r\nContent-Length: 100\r\n\r\nshort",
        # a gzip body that is no gzip
        b"Content-Type: text/plain\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n\r\n"
        b"0123456789",
    ],
)
async def test_a_refusal_whose_body_cannot_be_read_is_still_a_refusal(head: bytes) -> None:
    """Fix-check probe: a 400 whose body was cut short or was a broken gzip raised while it
    was read, so the attempt counted as failed and was tried again; once an attempt may have
    reached the engine only a 422 is final, and the player waited until the record expired.
    The status is the engine's word: the refusal is final, with a reason of its own."""
    host = RecordingHost()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n" + head)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with started_link(host, f"http://127.0.0.1:{port}/actions") as link:
            await link.submit(make_action("c"))
            await idle(link)
    finally:
        server.close()
        await server.wait_closed()
    assert host.rejected == [("c", "the engine refused the action (400)")]
    assert host.failed == []


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ([422], ("rejected", "status 422")),
        (["expired"], ("failed", ErrorCode.ACTION_TIMEOUT)),
        (["engine_error"] * ENGINE_FAILURES, ("failed", ErrorCode.ENGINE_ERROR)),
    ],
)
async def test_a_refusal_that_cannot_be_recorded_yet_is_recorded_once_the_backend_answers(
    answers: list[int | str], expected: tuple[str, object]
) -> None:
    """HTTP probe: the engine refused an action while Redis was stalled; recording the refusal
    raised BackendUnavailable, the delivery task died with it, and the action (claimed: no
    timeout would answer it) stayed in flight for good. Now it is recorded once Redis answers."""
    api, host = ScriptedApi(answers=list(answers)), RecordingHost(refusal_errors=3)
    async with serve(api.app()) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(make_action("s", deadline=PAST if answers == ["expired"] else None))
        await idle(link)
    kind, what = expected
    recorded = host.rejected if kind == "rejected" else host.failed
    assert recorded == [("s", what)] and host.refusal_errors == 0


async def test_a_4xx_after_an_attempt_that_may_have_reached_the_engine_is_not_a_rejection() -> None:
    """Review finding: the first attempt timed out while the engine was applying the action; the
    retry's 409 ("this Idempotency-Key is in progress") must not tell the player "rejected"."""
    api, host = ScriptedApi(answers=["hang", 409, 409]), RecordingHost()
    async with serve(api.app()) as base:
        async with started_link(host, f"{base}/actions", timeout=0.3, retries=2) as link:
            await link.submit(make_action("busy"))
            await wait_until(lambda: len(api.actions) >= 4, timeout=10)  # 409s retried
            assert host.rejected == [] and host.failed == []
            host.claims["busy"] = Claim.FINAL  # the engine's result arrived meanwhile
            await idle(link)
        api.release.set()
    assert host.rejected == [] and host.failed == []


async def test_a_slow_engine_whose_answer_came_is_not_sent_the_action_again() -> None:
    """Outside probe: an engine slower than the link's timeout published its result after the
    second delivery, and was sent the action six more times (the answer was looked for only once
    the retries ran out): each retry after an attempt that may have reached the engine first
    asks whether the action has its answer."""
    api, host = ScriptedApi(answers=["hang"] * 20), RecordingHost()
    async with serve(api.app()) as base:
        async with started_link(host, f"{base}/actions", timeout=0.2, retries=8) as link:
            await link.submit(make_action("slow"))
            await wait_until(lambda: len(api.actions) >= 2, timeout=10)
            host.claims["slow"] = Claim.FINAL  # the engine published its result meanwhile
            sent = len(api.actions)
            await idle(link)
        api.release.set()
    assert len(api.actions) <= sent + 1  # at most the attempt already under way when it came
    assert host.failed == [] and host.rejected == []


async def test_an_answer_that_comes_during_the_pause_before_a_retry_stops_it() -> None:
    """Re-check probe: the link asked whether the action had its answer before its pause, not
    after: a slow engine's result, published during the pause, was followed by a second
    delivery 120 ms later. Asked after the pause too."""
    api, host = ScriptedApi(answers=["hang"] * 5), RecordingHost()
    async with serve(api.app()) as base:
        options = {"timeout": 0.2, "retries": 4, "backoff_base": 1.0, "backoff_max": 1.0}
        async with started_link(host, f"{base}/actions", **options) as link:
            await link.submit(make_action("paused"))
            # claimed to start, then asked after the attempt timed out: it pauses now
            await wait_until(lambda: len(host.claimed) >= 2, timeout=10)
            host.claims["paused"] = Claim.FINAL  # the engine published its result meanwhile
            await idle(link)
        api.release.set()
    assert len(api.actions) == 1
    assert host.failed == [] and host.rejected == []


@pytest.mark.parametrize("status", [408, 425, 429])
async def test_a_later_status_is_retried_even_on_a_first_attempt(status: int) -> None:
    api, host = ScriptedApi(answers=[status]), RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(make_action("later"))
        await idle(link)
    assert [h["X-Delivery-Attempt"] for h, _ in api.actions] == ["1", "2"]
    assert host.rejected == [] and host.failed == []


async def test_an_engine_refusing_every_connection_ends_in_engine_unavailable() -> None:
    host = RecordingHost()
    url = f"http://127.0.0.1:{free_port()}/actions"  # nothing listens: refused at connect
    async with started_link(host, url, retries=2) as link:
        await link.submit(make_action("gone"))
        await idle(link)
    assert host.failed == [("gone", ErrorCode.ENGINE_UNAVAILABLE)]


async def test_an_engine_host_shutting_down_is_not_reached_like_a_refused_connection() -> None:
    """503 ``shutting_down`` is what ``party-sync engine-http`` answers a body still arriving
    when it began to shut down: the engine never saw it. The next POST is still attempt 1, and
    a host that says so to every attempt ends in ``engine_unavailable`` (it was an unknown
    outcome: retried silently until ``give_up_after``, the player told nothing)."""
    api, host = ScriptedApi(answers=["shutting_down"]), RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(make_action("later", deadline=FUTURE))
        await idle(link)
    assert [h["X-Delivery-Attempt"] for h, _ in api.actions] == ["1", "1"]
    assert host.failed == [] and host.rejected == []

    api, host = ScriptedApi(answers=["shutting_down"] * 3), RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions", retries=2) as link:
        await link.submit(make_action("gone", deadline=FUTURE))
        await idle(link)
    assert len(api.actions) == 3
    assert host.failed == [("gone", ErrorCode.ENGINE_UNAVAILABLE)]


async def test_an_engine_that_failed_then_cannot_be_reached_ends_in_engine_error() -> None:
    """Re-check probe: an ``engine_error`` (the engine raised: not applied), then every attempt
    unreached (503 ``shutting_down``): nothing can have been applied, yet the link went silent
    until ``give_up_after`` and logged "it may have been applied". The player is told
    ``engine_error``."""
    answers: list[int | str] = ["engine_error", *["shutting_down"] * 10]
    api, host = ScriptedApi(answers=answers), RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions", retries=2) as link:
        await link.submit(make_action("broken", deadline=FUTURE))
        await idle(link)
    assert host.failed == [("broken", ErrorCode.ENGINE_ERROR)]
    assert len(api.actions) == 4  # the engine_error, then 1 + retries unreached in a row


async def test_one_unreached_attempt_after_engine_errors_is_not_giving_up() -> None:
    """Review: past the retries (engine_error answers count as attempts), one refused attempt
    (a host restarting) ended the action in engine_error at once; the host gets as many
    attempts in a row as a host down gets, and its answer then stands."""
    answers: list[int | str] = [*["engine_error"] * 3, "shutting_down", 202]
    api, host = ScriptedApi(answers=answers), RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions", retries=2) as link:
        await link.submit(make_action("blip", deadline=FUTURE))
        await idle(link)
    assert host.failed == [] and len(api.actions) == 5


async def test_a_party_decision_outlasts_an_engine_outage_longer_than_its_retries() -> None:
    """Votes probe: the HTTP engine down when a vote closed: its decision's action (``vote:<id>``,
    the party's, no deadline) was refused ``engine_unavailable`` after the retries, and the
    decision every member saw in ``vote.finished`` never reached the engine, though
    docs/protocol.md says it is never lost. It is retried with capped backoff until the engine
    answers; a second hand-over of it meanwhile (a sweep) does not deliver it twice."""
    api, host = ScriptedApi(), RecordingHost()
    port = free_port()
    url = f"http://127.0.0.1:{port}/actions"  # nothing listens yet: refused at connect
    decision = make_action("vote:v1", character_id="party")
    async with started_link(host, url, retries=1) as link:
        await link.submit(decision)
        await wait_until(lambda: link.failures > 4)  # far past its retries, still tried
        await link.submit(decision)  # handed over again meanwhile
        assert host.failed == [] and len(link._tasks) == 1
        async with serve(api.app(), port):
            await idle(link)
    [(headers, body)] = api.actions
    assert body["envelope"]["payload"]["action_id"] == "vote:v1"
    assert headers["X-Delivery-Attempt"] == "1" and host.failed == []


async def test_after_an_engine_outage_a_party_decision_goes_before_the_party_s_next_action() -> (
    None
):
    """Chaos probe: the engine back after an outage got a member's choice (sent at once) before
    the party's decision (still in its backoff); the reference engine, which lets members
    choose again once a vote's result is long overdue, applied the member's choice instead of
    the vote's. A party's actions wait for its decision to reach the engine (within their
    deadlines); another party's do not."""
    api, host = ScriptedApi(), RecordingHost()
    port = free_port()
    url = f"http://127.0.0.1:{port}/actions"
    async with started_link(host, url, retries=1, backoff_max=30.0) as link:
        await link.submit(make_action("vote:v1", character_id="party"))
        await wait_until(lambda: link.failures >= 2)  # past its retries: in a long backoff
        await link.submit(make_action("choice-1", deadline=FUTURE))
        await link.submit(make_action("other-1", party_id="p2", deadline=FUTURE))
        async with serve(api.app(), port):
            await wait_until(lambda: len(api.actions) == 3, timeout=10)
            await idle(link)
    order = [body["envelope"]["payload"]["action_id"] for _, body in api.actions]
    assert order.index("vote:v1") < order.index("choice-1")
    assert host.failed == []


async def test_with_the_engine_up_a_slow_decision_holds_back_no_action() -> None:
    """The party's actions wait for its decision only after the decision could not reach the
    engine: one the engine takes long to apply (the engine host answers once it applied it)
    holds nothing back."""
    api, host = ScriptedApi(answers=["hang"]), RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions", timeout=30) as link:
        await link.submit(make_action("vote:v1", character_id="party"))
        await wait_until(lambda: len(api.actions) == 1)
        await link.submit(make_action("skill-1", deadline=FUTURE))
        await wait_until(lambda: len(api.actions) == 2)  # while the decision is being applied
        api.release.set()
        await idle(link)
    assert host.failed == []


async def test_a_taken_over_action_is_never_delivered_as_attempt_one() -> None:
    """An action taken over from a node that died with it (``redelivery``): that node may have
    delivered it, and the engine applied it. ``X-Delivery-Attempt: 1`` promises the engine
    never saw it (docs/engines.md), so the take-over's first POST says 2 (it said 1: HTTP probe,
    a node killed with a delivery in flight)."""
    api, host = ScriptedApi(), RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(replace(make_action("again"), redelivery=True))
        await idle(link)
    [(headers, _)] = api.actions
    assert headers["X-Delivery-Attempt"] == "2"


async def test_a_taken_over_action_is_not_refused_as_unreachable() -> None:
    """Its first delivery (by the dead node) may have reached the engine: an engine unreachable
    now is no proof it was never applied, so no ``engine_unavailable`` (a false answer); it is
    retried until ``give_up_after``, as after any attempt that may have reached the engine."""
    host = RecordingHost()
    url = f"http://127.0.0.1:{free_port()}/actions"  # nothing listens: refused at connect
    async with started_link(host, url, retries=2, give_up_after=0.2) as link:
        await link.submit(replace(make_action("again"), redelivery=True))
        await idle(link)
    assert host.failed == [] and host.rejected == []


@pytest.mark.parametrize("url", ["notaurl", "http:///actions"])
async def test_a_url_no_request_can_leave_for_ends_in_engine_unavailable(url: str) -> None:
    """(config refuses such URLs at start; the link, given one, still answers truthfully instead
    of retrying for action_record_ttl as if the engine might have seen it)"""
    host = RecordingHost()
    async with started_link(host, url, retries=1) as link:
        await link.submit(make_action("nowhere"))
        await idle(link)
    assert host.failed == [("nowhere", ErrorCode.ENGINE_UNAVAILABLE)]


async def test_5xx_is_never_reported_as_a_failure_and_retried_until_the_action_is_final() -> None:
    api, host = ScriptedApi(answers=[503] * 1000), RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions", retries=1) as link:
        await link.submit(make_action("maybe"))
        await wait_until(lambda: len(api.actions) >= 5, timeout=10)  # past the 1 retry
        assert host.failed == []  # it may have been applied: no "failed" for it
        host.claims["maybe"] = Claim.FINAL  # its result arrived through the events API
        await idle(link)
    assert host.failed == [] and host.rejected == []
    attempts = [headers["X-Delivery-Attempt"] for headers, _ in api.actions]
    assert attempts[:3] == ["1", "2", "3"]  # each 503 may have reached the engine
    # The checks for a final answer are made without the deadline (see http_link).
    assert all(a.deadline is None for a in host.claimed[1:])


async def test_an_engine_that_raises_behind_the_host_ends_in_engine_error_like_on_the_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """docs/engines.md: raising means *not applied*, and the player gets ``engine_error`` on
    every transport. ``party-sync engine-http`` answers 500 ``engine_error`` when the engine
    raised; the link retries it (a passing failure) and fails the action after the fifth, as
    the stream worker does after an entry's fifth delivery (it once retried for ten minutes and
    told the player nothing)."""
    engine = ScriptedEngine()
    engine.mode = "crash"
    host = RecordingHost()
    async with (
        serve(build_host_app(engine, ApiPublisher("http://127.0.0.1:9", HOST_KEY))) as base,
        started_link(host, f"{base}/actions") as link,
    ):
        await link.submit(make_action("boom"))
        await idle(link)
    assert host.failed == [("boom", ErrorCode.ENGINE_ERROR)]
    assert host.failed_words == [ENGINE_FAILED]  # the same words on every transport
    assert len(engine.calls) == ENGINE_FAILURES  # more than `retries` (2): its own count
    assert any("giving up" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


async def test_an_engine_that_fails_a_few_times_then_answers_is_not_failed() -> None:
    api = ScriptedApi(answers=["engine_error"] * (ENGINE_FAILURES - 1) + [202])
    host = RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(make_action("flaky"))
        await idle(link)
    assert host.failed == [] and len(api.actions) == ENGINE_FAILURES


async def test_an_engine_error_after_the_engine_published_its_answer_is_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An engine host that published the result, then answered ``engine_error`` (its fifth):
    the player has the answer; the link logged ERROR "engine failed 5 times; giving up" all
    the same (HTTP probe). It looks once more before it gives up."""
    host = RecordingHost()

    @dataclass
    class PublishingOnTheLast(ScriptedApi):
        async def action(self, request: web.Request) -> web.Response:
            if len(self.actions) == ENGINE_FAILURES - 1:  # the fifth: published, then failed
                host.claims["late"] = Claim.FINAL
            return await super().action(request)

    api = PublishingOnTheLast(answers=["engine_error"] * ENGINE_FAILURES)
    async with serve(api.app()) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(make_action("late"))
        await idle(link)
    assert host.failed == [] and len(api.actions) == ENGINE_FAILURES
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_another_5xx_never_counts_as_the_engine_failing() -> None:
    """Only the engine host's own ``engine_error`` says "not applied": a proxy's 500 with another
    body may follow an engine that applied the action, so it is never reported as a failure."""
    api = ScriptedApi(answers=[*[500] * (ENGINE_FAILURES + 3), 503, 202])
    host = RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(make_action("proxied"))
        await idle(link)
    assert host.failed == [] and len(api.actions) == ENGINE_FAILURES + 5


async def test_a_delivery_that_may_have_reached_the_engine_gives_up_silently_after_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api, host = ScriptedApi(answers=[500] * 1000), RecordingHost()
    async with (
        serve(api.app()) as base,
        started_link(host, f"{base}/actions", retries=1, give_up_after=0.0) as link,
    ):
        await link.submit(make_action("lost"))
        await idle(link)
    assert host.failed == []  # never "failed" for something that may be applied
    assert any("abandoned" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


async def test_a_timeout_after_sending_counts_as_reached_and_the_retry_is_attempt_2() -> None:
    api, host = ScriptedApi(answers=["hang"]), RecordingHost()
    async with serve(api.app()) as base:
        async with started_link(host, f"{base}/actions", timeout=0.3) as link:
            await link.submit(make_action("slow"))
            await wait_until(lambda: len(api.actions) == 2, timeout=10)
            await idle(link)
        api.release.set()
    assert [h["X-Delivery-Attempt"] for h, _ in api.actions] == ["1", "2"]
    assert host.failed == []


async def test_refused_attempts_do_not_count(caplog: pytest.LogCaptureFixture) -> None:
    """The engine host comes up only after the link's first attempts were refused: the first
    POST that reaches it is still attempt 1 (``X-Delivery-Attempt``), the engine's promise that
    it has never seen the action."""
    caplog.set_level(logging.DEBUG, "party_sync.engine.http_link")
    port = free_port()
    api, host = ScriptedApi(), RecordingHost()
    url = f"http://127.0.0.1:{port}/actions"
    async with started_link(host, url, retries=1000, backoff_base=0.02, backoff_max=0.05) as link:
        await link.submit(make_action("late", deadline=FUTURE))
        await wait_until(
            lambda: any("retry 2 " in r.getMessage() for r in caplog.records), timeout=10
        )
        async with serve(api.app(), port):
            await idle(link)
    assert [h["X-Delivery-Attempt"] for h, _ in api.actions] == ["1"]
    assert host.failed == []


async def test_an_engine_unreachable_until_the_deadline_is_action_timeout_at_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every attempt refused at connect time, and the action's deadline comes before the retries
    run out: the player gets ``action_timeout`` (true: never started, now too late; what the
    host answers a first delivery after its deadline), at the deadline, not ``engine_unavailable``
    when the retries are spent (an outside probe saw it 1.4-2 s after the deadline, the player
    waiting)."""
    caplog.set_level(logging.DEBUG, "party_sync.engine.http_link")
    port = free_port()
    host = RecordingHost()
    url = f"http://127.0.0.1:{port}/actions"
    deadline = time.time() + 0.3
    # retries that would outlast the test's patience: only the deadline can end this delivery
    async with started_link(
        host, url, retries=100_000, backoff_base=0.02, backoff_max=0.05
    ) as link:
        await link.submit(make_action("doomed", deadline=deadline))
        await idle(link)
        answered = time.time()
        await link.submit(make_action("gone", deadline=PAST))  # refused once, then answered
        await idle(link)
    assert host.failed == [("doomed", ErrorCode.ACTION_TIMEOUT), ("gone", ErrorCode.ACTION_TIMEOUT)]
    assert answered >= deadline  # never before it


async def test_an_engine_that_is_down_is_one_warning_and_one_info_not_lines_per_action(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The HTTP engine down for 20 s with two players acting once a second wrote 55 INFO retry
    lines and a WARNING per action (README: "one WARNING when it begins and one INFO when it is
    over"). Each player still gets engine_unavailable; the details are at DEBUG."""
    caplog.set_level(logging.INFO, "party_sync.engine.http_link")
    port = free_port()
    engine, host = ScriptedEngine(), RecordingHost()
    url = f"http://127.0.0.1:{port}/actions"
    async with started_link(host, url, notice_url=url.replace("actions", "notices")) as link:
        for i in range(5):
            await link.submit(make_action(f"down-{i}"))
        await link.notify_join(JoinNotice("p1", "r1", "aria", "Aria", "trace-j"))
        await wait_until(lambda: len(host.failed) == 5)  # (the join is tried on)
        assert [code for _, code in host.failed] == [ErrorCode.ENGINE_UNAVAILABLE] * 5
        async with serve(host_app(engine), port):
            await link.submit(make_action("back"))
            await idle(link)
    assert [c.action_id for c in engine.calls] == ["back"]
    assert [j.character_id for j in engine.joins] == ["aria"]  # once the engine was back
    lines = [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == "party_sync.engine.http_link"
    ]
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO], lines
    assert "engine_unavailable" in lines[0][1] and "again" in lines[1][1]


async def test_notices_go_to_the_notice_url_never_to_the_action_url() -> None:
    api, host = ScriptedApi(), RecordingHost()
    async with (
        serve(api.app()) as base,
        started_link(host, f"{base}/actions", notice_url=f"{base}/notices") as link,
    ):
        await link.notify_join(JoinNotice("p1", "r1", "aria", "Aria", "trace-j"))
        await link.notify_restate(RestateNotice("p1", "r1", "epoch-9", "trace-r"))
        await wait_until(lambda: len(api.notices) == 2)
        await idle(link)
    assert api.actions == []
    bodies = sorted((body for _, body in api.notices), key=lambda b: str(b["kind"]))
    join, restate = bodies
    assert join["kind"] == "join" and join["party_id"] == "p1" and join["campaign_run_id"] == "r1"
    assert join["envelope"]["type"] == "party.join"
    assert join["envelope"]["payload"] == {"character_id": "aria", "display_name": "Aria"}
    assert restate["kind"] == "restate" and restate["campaign_run_id"] == "r1"
    assert restate["envelope"]["type"] == "party.restate"
    assert restate["envelope"]["trace_id"] == "trace-r"
    assert restate["envelope"]["payload"] == {"epoch": "epoch-9"}
    assert {headers["X-Trace-Id"] for headers, _ in api.notices} == {"trace-j", "trace-r"}
    # party_sync's clock as it sent them (the link's host's), for the engines' leases
    assert all(abs(float(h["X-Party-Sync-Time"]) - time.time()) < 60 for h, _ in api.notices)


async def test_without_a_notice_url_notices_are_not_sent_and_the_start_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "party_sync.engine.http_link")
    api, host = ScriptedApi(), RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions") as link:
        await link.notify_join(JoinNotice("p1", "r1", "aria", "Aria", "trace-j"))
        await link.notify_restate(RestateNotice("p1", "r1", "epoch-9", "trace-r"))
        await link.submit(make_action("a"))
        await idle(link)
    assert api.notices == []
    assert [body["envelope"]["type"] for _, body in api.actions] == ["action.request"]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert sum("not sent over HTTP" in message for message in infos) == 1


async def test_a_restate_notice_is_retried_until_the_engine_takes_it() -> None:
    engine, host = ScriptedEngine(), RecordingHost()
    engine.restate_failures = 2  # the host answers 500 twice
    async with (
        serve(host_app(engine)) as base,
        started_link(host, f"{base}/actions", notice_url=f"{base}/notices", retries=3) as link,
    ):
        notice = RestateNotice("p1", "r1", "epoch-4", "trace-r4")
        await link.notify_restate(notice)
        await wait_until(lambda: engine.restates == [notice])
        await idle(link)


async def test_a_join_notice_outlasts_an_engine_outage_longer_than_its_retries() -> None:
    """Chaos probe: a party formed while the engine host was down never got its opening scene:
    its join notice was dropped after the retries, and the reference engine starts a run with
    its first member's join (the restate notice that came later found no run). A join is tried
    on like a restate, and a newer one of the same character replaces one still tried."""
    api, host = ScriptedApi(), RecordingHost()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with started_link(
        host, f"{base}/actions", notice_url=f"{base}/notices", retries=1, give_up_after=60
    ) as link:
        await link.notify_join(JoinNotice("p1", "r1", "aria", "Aria", "trace-j1"))
        await link.notify_join(JoinNotice("p1", "r1", "aria", "Aria", "trace-j2"))
        await link.notify_join(JoinNotice("p1", "r1", "borin", "Borin", "trace-j3"))
        await wait_until(lambda: link.failures >= 6)  # far past its retries
        async with serve(api.app(), port):
            await wait_until(lambda: len(api.notices) == 2, timeout=10)
            await idle(link)
    traces = sorted(headers["X-Trace-Id"] for headers, _ in api.notices)
    assert traces == ["trace-j2", "trace-j3"]


async def test_a_restate_notice_outlasts_an_engine_outage_longer_than_its_retries() -> None:
    """Redis restarted empty while the engine was down: the notice that brings the parties'
    scenes back is tried on (capped backoff, within give_up_after), not dropped after
    ``retries``; a newer notice for the party replaces one still being tried."""
    engine, host = ScriptedEngine(), RecordingHost()
    engine.restate_failures = 8  # far more than the retries
    async with (
        serve(host_app(engine)) as base,
        started_link(
            host, f"{base}/actions", notice_url=f"{base}/notices", retries=1, give_up_after=60
        ) as link,
    ):
        older = RestateNotice("p1", "r1", "epoch-4", "trace-r4")
        newer = RestateNotice("p1", "r1", "epoch-5", "trace-r5")
        other = RestateNotice("p2", "r2", "epoch-1", "trace-o1")
        await link.notify_restate(older)
        await link.notify_restate(other)
        await link.notify_restate(newer)
        await wait_until(lambda: sorted(n.epoch for n in engine.restates) == ["epoch-1", "epoch-5"])
        await idle(link)
    assert older not in engine.restates and len(link._restates) == 0


@pytest.mark.parametrize(
    ("last", "said", "never"),
    [
        (202, "restate notice delivered after 4 attempts", "refused"),
        (401, "refused party_sync's key", "notice delivered"),
        (422, "the engine refused a restate notice (422) after 4 attempts", "notice delivered"),
    ],
)
async def test_a_notice_retried_past_its_retries_is_logged_as_what_its_last_answer_said(
    caplog: pytest.LogCaptureFixture, last: int, said: str, never: str
) -> None:
    """Three 503s, then the last answer: "delivered" only when the engine took it (an engine
    host that refused the key, or the notice, did not get it delivered)."""
    api, host = ScriptedApi(notice_answers=[503, 503, 503, last]), RecordingHost()
    caplog.set_level(logging.INFO, logger="party_sync")
    async with (
        serve(api.app()) as base,
        started_link(
            host, f"{base}/actions", notice_url=f"{base}/notices", retries=1, give_up_after=30
        ) as link,
    ):
        await link.notify_restate(RestateNotice("p1", "r1", "epoch-4", "trace-r4"))
        await wait_until(lambda: len(api.notices) == 4)
        await idle(link)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("party_sync.engine")]
    assert any(said in m for m in messages), messages
    assert not any(never in m for m in messages), messages


# --- the engine host -------------------------------------------------------------------------


async def post(url: str, body: dict[str, Any], **headers: str) -> tuple[int, Any]:
    """POST to the engine host as party_sync does (with the key), plus ``headers``."""
    headers = {"Authorization": f"Bearer {HOST_KEY}", **headers}
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=orjson.dumps(body), headers=headers) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


def action_body(action_id: str, deadline: float | None = None) -> dict[str, Any]:
    action = make_action(action_id)
    body: dict[str, Any] = {
        "party_id": "p1",
        "campaign_run_id": "r1",
        "envelope": dict(action.envelope),
    }
    if deadline is not None:
        body["deadline"] = deadline
    return body


class PublishFailsEngine(ScriptedEngine):
    """Applies the action, then cannot publish it: party_sync is unreachable under it."""

    async def handle_action(self, action: ActionRequest) -> None:
        self.calls.append(action)
        raise BackendUnavailable("could not publish action.result to party p1")


async def test_the_host_answers_a_publish_that_failed_under_the_engine_as_unknown_not_failed() -> (
    None
):
    """An engine whose publish failed may have applied the action: not 500 ``engine_error``
    (which says "not applied" and ends in engine_error for the player) but 503
    ``backend_unavailable``, retried like any 5xx, as the in-process link retries it."""
    engine = PublishFailsEngine()
    host = RecordingHost()
    async with serve(build_host_app(engine, ApiPublisher("http://127.0.0.1:9", HOST_KEY))) as base:
        status, answer = await post(f"{base}/actions", action_body("applied"))
        assert (status, answer["error"]) == (503, "backend_unavailable")
        async with started_link(host, f"{base}/actions") as link:
            await link.submit(make_action("applied"))
            await wait_until(lambda: len(engine.calls) >= ENGINE_FAILURES + 3, timeout=10)
            host.claims["applied"] = Claim.FINAL  # its result got through at last
            await idle(link)
    assert host.failed == []


async def test_engine_errors_after_an_unknown_outcome_are_never_a_failure() -> None:
    """After a timeout or another 5xx the engine may still be applying the action (a slow first
    attempt): later ``engine_error`` answers (say, the engine's lock held by that attempt) do not
    prove it was not applied."""
    api = ScriptedApi(answers=[503] + ["engine_error"] * (ENGINE_FAILURES + 2) + [202])
    host = RecordingHost()
    async with serve(api.app()) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(make_action("slow"))
        await idle(link)
    assert host.failed == [] and len(api.actions) == ENGINE_FAILURES + 4


async def test_the_host_refuses_a_first_delivery_past_its_deadline_without_the_engine() -> None:
    engine = ScriptedEngine()
    async with serve(host_app(engine)) as base:
        status, answer = await post(
            f"{base}/actions", action_body("old", PAST), **{"X-Delivery-Attempt": "1"}
        )
        assert (status, answer["error"]) == (409, "expired")
        assert engine.calls == []
        # A later attempt may follow one that started it: the engine gets it (and deduplicates)
        # as a redelivery, whose deadline no longer applies.
        status, _ = await post(
            f"{base}/actions", action_body("old", PAST), **{"X-Delivery-Attempt": "2"}
        )
        assert status == 202
        assert [(a.action_id, a.deadline, a.redelivery) for a in engine.calls] == [
            ("old", None, True)
        ]


async def test_the_host_reads_the_deadline_from_the_header_too() -> None:
    engine = ScriptedEngine()
    async with serve(host_app(engine)) as base:
        headers = {"X-Delivery-Attempt": "1", "X-Action-Deadline": repr(PAST)}
        status, _ = await post(f"{base}/actions", action_body("hdr"), **headers)
        assert status == 409
        headers["X-Action-Deadline"] = repr(FUTURE)
        status, _ = await post(f"{base}/actions", action_body("hdr"), **headers)
        assert status == 202
        assert [a.deadline for a in engine.calls] == [FUTURE]
        status, answer = await post(
            f"{base}/actions", action_body("bad"), **{"X-Action-Deadline": "soon"}
        )
        assert (status, answer["error"]) == (422, "invalid")


async def test_the_host_judges_the_deadline_by_the_time_left_not_by_its_own_clock() -> None:
    """Clock skew probe: a host 6 s ahead of the nodes (action timeout 4 s) answered every first
    delivery 409 expired: the deadline came on the nodes' clock and was read on the host's. The
    link says how much time was left when it sent the delivery; the host's deadline is its
    receipt plus that (the engine gets it on the host's clock too)."""
    engine = ScriptedEngine()
    async with serve(host_app(engine)) as base:
        headers = {"X-Delivery-Attempt": "1", "X-Action-Time-Left": "3.000"}
        before = time.time()
        status, _ = await post(f"{base}/actions", action_body("skew", PAST), **headers)
        assert status == 202  # PAST by the host's clock, 3 s left by the sender's
        deadline = engine.calls[0].deadline
        assert deadline is not None and before + 3 <= deadline <= time.time() + 3
        headers["X-Action-Time-Left"] = "0.000"  # none left when it was sent
        status, answer = await post(f"{base}/actions", action_body("late", FUTURE), **headers)
        assert (status, answer["error"]) == (409, "expired")
        headers["X-Action-Time-Left"] = "soon"  # not a number: the deadline as given
        status, _ = await post(f"{base}/actions", action_body("odd", FUTURE), **headers)
        assert status == 202


async def test_a_delivery_read_late_by_a_frozen_host_is_not_started_past_its_deadline() -> None:
    """HTTP probe: an engine host frozen (SIGSTOP) while deliveries waited in its socket read
    each one, when it resumed, as just sent: its deadline was its receipt plus the time left,
    and an action started 10.8 s past its deadline, beside the same character's next one. The
    host knows party_sync's clock from the deliveries that waited least: a late one is judged
    by its deadline on that clock."""
    engine = ScriptedEngine()
    engine.mode = "silent"
    host_clock = [960_000.0]  # 11 h behind the deployment's
    publisher = ApiPublisher("http://127.0.0.1:9", HOST_KEY, local=lambda: host_clock[0])
    app = build_host_app(engine, publisher, clock=lambda: host_clock[0])
    async with serve(app) as base:
        headers = {
            "X-Delivery-Attempt": "1",
            "X-Action-Time-Left": "4.000",
            "X-Party-Sync-Time": "1000000.000",
        }
        status, _ = await post(f"{base}/actions", action_body("fresh", 1_000_004.0), **headers)
        assert status == 202  # read at once
        host_clock[0] += 10.0  # frozen for 10 s; this one was sent 0.1 s after the first
        headers["X-Party-Sync-Time"] = "1000000.100"
        status, answer = await post(f"{base}/actions", action_body("late", 1_000_004.1), **headers)
        assert (status, answer["error"]) == (409, "expired")
        assert [a.action_id for a in engine.calls] == ["fresh"]
        assert publisher.clock() == 1_000_010.0  # the late reading did not move its clock
        headers["X-Party-Sync-Time"] = "1000010.000"  # sent now, 4 s left: started
        status, _ = await post(f"{base}/actions", action_body("now", 1_000_014.0), **headers)
        assert status == 202


async def test_the_host_s_publisher_keeps_party_sync_s_clock_from_the_deliveries() -> None:
    """The engines on an HTTP host compare times across machines (the reference engine's
    narration lease, in the database its hosts share): the publisher's ``clock()`` is
    party_sync's, heard from every delivery (``X-Party-Sync-Time``; from an older sender, an
    action's deadline less its time left), not the host's. Notices too: a host that had handled
    no action yet judged another host's lease by its own clock on a join (lease probe)."""
    engine = ScriptedEngine()
    engine.mode = "silent"
    host_clock = [960_000.0]  # this machine's clock, 11 h from the deployment's
    publisher = ApiPublisher("http://127.0.0.1:9", HOST_KEY, local=lambda: host_clock[0])
    assert publisher.clock() == 960_000.0  # nothing heard yet: its own
    app = build_host_app(engine, publisher, clock=lambda: host_clock[0])
    async with serve(app) as base:
        join = {
            "kind": "join",
            "party_id": "p1",
            "campaign_run_id": "r1",
            "envelope": join_envelope(JoinNotice("p1", "r1", "aria", "Aria", "t-j")),
        }
        status, _ = await post(f"{base}/notices", join, **{"X-Party-Sync-Time": "999000.000"})
        assert status == 202 and publisher.clock() == 999_000.0  # a notice, before any action
        headers = {"X-Delivery-Attempt": "1", "X-Action-Time-Left": "3.000"}
        status, _ = await post(f"{base}/actions", action_body("a", 1_000_003.0), **headers)
        assert status == 202
        assert publisher.clock() == 1_000_000.0  # an older sender: 3 s left of 1_000_003
        host_clock[0] += 2.5
        assert publisher.clock() == 1_000_002.5  # and on, at this machine's pace
        headers["X-Action-Time-Left"] = "soon"  # nothing to hear from
        status, _ = await post(f"{base}/actions", action_body("b", FUTURE), **headers)
        assert status == 202 and publisher.clock() == 1_000_002.5
        headers["X-Party-Sync-Time"] = "1000010.500"  # said outright: taken first
        status, _ = await post(f"{base}/actions", action_body("c", FUTURE), **headers)
        assert status == 202 and publisher.clock() == 1_000_010.5
        # nonsense is not believed (hostile-input probe: 1e308, then every first delivery of
        # the next minute was refused as expired); a day from this machine's clock at most
        for nonsense in ("1e308", "1765000000000", str(host_clock[0] + 86_401 + 40_000)):
            headers["X-Party-Sync-Time"] = nonsense
            status, _ = await post(
                f"{base}/actions", action_body(f"n{nonsense}", FUTURE), **headers
            )
            assert status == 202 and publisher.clock() == 1_000_010.5


async def test_the_link_says_the_time_left_by_its_host_s_clock() -> None:
    api = ScriptedApi()
    host = RecordingHost()
    host.clock = lambda: 1_000.0  # type: ignore[attr-defined]  # the deployment's clock
    async with serve(api.app()) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(make_action("t", deadline=1_004.25))
        await idle(link)
    assert api.actions[0][0]["X-Action-Time-Left"] == "4.250"
    assert api.actions[0][0]["X-Party-Sync-Time"] == "1000.000"


async def test_the_host_serves_notices_on_their_own_path_and_actions_only_on_theirs() -> None:
    engine = ScriptedEngine()
    join_envelope = {
        "type": "party.join",
        "timestamp": "2026-01-01T00:00:00Z",
        "trace_id": "trace-j",
        "payload": {"character_id": "aria", "display_name": "Aria"},
    }
    restate_envelope = {
        "type": "party.restate",
        "timestamp": "2026-01-01T00:00:00Z",
        "trace_id": "trace-r",
        "payload": {"epoch": "epoch-5"},
    }
    async with serve(host_app(engine)) as base:
        join = {"kind": "join", "party_id": "p1", "campaign_run_id": "r1"}
        status, _ = await post(f"{base}/notices", {**join, "envelope": join_envelope})
        assert status == 202
        restate = {"kind": "restate", "party_id": "p1", "campaign_run_id": "r1"}
        status, answer = await post(f"{base}/notices", {**restate, "envelope": restate_envelope})
        assert (status, answer["status"]) == (202, "accepted")
        status, _ = await post(f"{base}/notices", {**restate, "kind": "other", "envelope": {}})
        assert status == 422
        status, _ = await post(  # a notice is not an action
            f"{base}/actions",
            {"party_id": "p1", "campaign_run_id": "r1", "envelope": join_envelope},
        )
        assert status == 422
    assert engine.joins == [JoinNotice("p1", "r1", "aria", "Aria", "trace-j")]
    assert engine.restates == [RestateNotice("p1", "r1", "epoch-5", "trace-r")]
    assert engine.calls == []


def joined(caplog: pytest.LogCaptureFixture) -> int:
    """The deliveries that found their action running on the host and wait for its call."""
    return sum("this host is still running" in r.getMessage() for r in caplog.records)


async def test_a_later_attempt_of_an_action_still_running_joins_its_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """party_sync's HTTP timeout sends attempt 2, 3, … of a slow action: the host called the
    engine again for each while the first call still ran (engines probe: four overlapping calls
    of one action, each past its deadline and none marked a redelivery). A later attempt now
    waits for the running call and answers as it does; once that call is over, a later attempt
    is handed to the engine again as a redelivery (no deadline: it may have been started)."""
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    action = make_action("slow", party_id="p1", deadline=PAST)
    body = {"party_id": "p1", "campaign_run_id": "r1", "envelope": dict(action.envelope)}

    async def deliver(http: aiohttp.ClientSession, base: str, attempt: int) -> int:
        headers = {"Authorization": f"Bearer {HOST_KEY}", "X-Delivery-Attempt": str(attempt)}
        async with http.post(base + "/actions", data=orjson.dumps(body), headers=headers) as resp:
            return resp.status

    async with serve(host_app(engine)) as base, aiohttp.ClientSession() as http:
        # (attempt 2 past the deadline: attempt 1 may have reached the engine, so it runs)
        first = asyncio.create_task(deliver(http, base, 2))
        await wait_until(lambda: len(engine.calls) == 1)
        with caplog.at_level(logging.INFO, logger="party_sync.engine.http_host"):
            later = [asyncio.create_task(deliver(http, base, n)) for n in (3, 4)]
            await wait_until(lambda: joined(caplog) == 2)
        assert len(engine.calls) == 1 and not any(t.done() for t in (first, *later))
        engine.gate.set()
        assert [await t for t in (first, *later)] == [202, 202, 202]
        assert len(engine.calls) == 1
        call = engine.calls[0]
        assert call.redelivery and call.deadline is None
        assert await deliver(http, base, 5) == 202  # over: the engine deduplicates a new call
        assert len(engine.calls) == 2 and engine.calls[1].redelivery


async def test_a_later_attempt_shares_the_running_calls_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()
    action = make_action("no", party_id="p1")
    body = {"party_id": "p1", "campaign_run_id": "r1", "envelope": dict(action.envelope)}

    async def deliver(http: aiohttp.ClientSession, base: str, attempt: int) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {HOST_KEY}", "X-Delivery-Attempt": str(attempt)}
        async with http.post(base + "/actions", data=orjson.dumps(body), headers=headers) as resp:
            return resp.status, await resp.json()

    async with serve(host_app(engine)) as base, aiohttp.ClientSession() as http:
        engine.mode = "reject"
        first = asyncio.create_task(deliver(http, base, 1))
        await wait_until(lambda: len(engine.calls) == 1)
        with caplog.at_level(logging.INFO, logger="party_sync.engine.http_host"):
            second = asyncio.create_task(deliver(http, base, 2))
            await wait_until(lambda: joined(caplog) == 1)
        engine.gate.set()
        answers = [await first, await second]
    assert [status for status, _ in answers] == [422, 422]
    assert answers[0][1] == answers[1][1]
    assert len(engine.calls) == 1 and not engine.calls[0].redelivery


@pytest.mark.parametrize("path", ["/actions", "/notices"])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic aG9zdA==", "Bearer "])
async def test_the_engine_host_refuses_a_delivery_without_the_key(
    path: str, authorization: str | None
) -> None:
    """The engine host answered anyone: a POST with no credentials made the engine apply an
    action for any character, or a party "vote" nobody held (character "party", action_id
    "vote:…"). Every delivery must carry the server API key; without it, 401 before the body is
    read, with a Bearer challenge, and the engine is never called."""
    engine = ScriptedEngine()
    engine.mode = "silent"  # (publishes nothing)
    action = make_action("forged", party_id="p1")
    body: dict[str, Any] = {"party_id": "p1", "campaign_run_id": "r1"}
    if path == "/actions":
        body["envelope"] = dict(action.envelope)
    else:
        body |= {"kind": "restate", "envelope": {"type": "party.restate", "payload": {}}}
    headers = {} if authorization is None else {"Authorization": authorization}
    async with (
        serve(build_host_app(engine, ApiPublisher("http://127.0.0.1:9", HOST_KEY))) as base,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(base + path, data=orjson.dumps(body), headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "unauthorized"
            assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
        assert engine.calls == []
        headers = {"Authorization": f"Bearer {HOST_KEY}"}
        if path == "/actions":  # the same delivery with the key is the engine's
            async with http.post(base + path, data=orjson.dumps(body), headers=headers) as resp:
                assert resp.status == 202, await resp.text()
            assert len(engine.calls) == 1


async def test_the_engine_host_tells_its_operator_of_refused_keys_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A party_sync whose key differs was refused in silence on the host's side: one WARNING
    (with a count, never the key sent), then at most one a minute, however many come."""
    engine = ScriptedEngine()
    async with (
        serve(host_app(engine)) as base,
        aiohttp.ClientSession() as http,
    ):
        with caplog.at_level(logging.INFO, logger="party_sync.engine.http_host"):
            for _ in range(20):
                headers = {"Authorization": "Bearer wrong-key-9876"}
                async with http.post(base + "/actions", data=b"{}", headers=headers) as resp:
                    assert resp.status == 401
    lines = [r for r in caplog.records if "without this host's API key" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "WARNING"
    assert "refused 1 delivery" in lines[0].getMessage()
    assert "wrong-key-9876" not in caplog.text and HOST_KEY not in caplog.text


async def test_a_request_for_no_delivery_route_is_not_counted_as_a_refused_delivery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A load balancer's probe (``GET /``, ``GET /healthz``) or a scanner is no party_sync
    delivery: answered 404/405 without the key, and no WARNING that blames party_sync's key."""
    engine = ScriptedEngine()
    async with (
        serve(host_app(engine)) as base,
        aiohttp.ClientSession() as http,
    ):
        with caplog.at_level(logging.INFO, logger="party_sync.engine.http_host"):
            for method, path, status in (
                ("GET", "/", 404),
                ("GET", "/healthz", 404),
                ("GET", "/actions", 405),
            ):
                async with http.request(method, base + path) as resp:
                    assert resp.status == status, path
                    assert resp.headers["X-Content-Type-Options"] == "nosniff"
            async with http.post(base + "/actions", data=b"{}") as resp:
                assert resp.status == 401  # a delivery route still needs the key
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
    lines = [r for r in caplog.records if "without this host's API key" in r.getMessage()]
    assert len(lines) == 1 and "refused 1 delivery" in lines[0].getMessage()
    assert engine.calls == []


def test_refused_keys_are_counted_between_two_lines(caplog: pytest.LogCaptureFixture) -> None:
    from party_sync.engine.http_host import RefusalLog

    refusals = RefusalLog(every=60)
    with caplog.at_level(logging.INFO, logger="party_sync.engine.http_host"):
        for now in (0.0, 1.0, 30.0, 59.0, 61.0, 62.0, 200.0):
            refusals.refused("10.0.0.7", now)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3
    assert said[0].startswith("refused 1 delivery") and "10.0.0.7" in said[0]
    assert said[1].startswith("refused 4 delivery")  # 1, 30, 59 and 61
    assert said[2].startswith("refused 2 delivery")  # 62 and 200


async def test_a_delivery_refused_for_its_key_tells_the_player_engine_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """party_sync and the engine host disagree on the key: the engine never saw the action, so
    the player gets engine_unavailable (not action_rejected, which would blame the game), and
    one ERROR names the setting to fix."""
    engine = ScriptedEngine()
    host = RecordingHost()
    async with (
        serve(host_app(engine)) as base,
        started_link(host, f"{base}/actions", api_key="another-key") as link,
    ):
        await link.submit(make_action("k1"))
        await idle(link)
    assert host.failed == [("k1", ErrorCode.ENGINE_UNAVAILABLE)]
    assert host.rejected == []
    assert engine.calls == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "PARTY_SYNC_API_KEY" in errors[0]


async def test_an_engine_host_that_answers_nothing_shows_in_readiness(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A frozen engine host (SIGSTOP) still accepts connections (the kernel does), so the TCP
    probe saw it as up: /readyz said ready, engine_link_ok 1, no WARNING, while every delivery
    timed out and the players waited. Now: degraded once no delivery was answered for
    ``stuck_after``, one WARNING, and over at the first answer."""
    caplog.set_level(logging.INFO, "party_sync.engine.health")
    frozen = asyncio.Event()

    async def door(request: web.Request) -> web.Response:
        if not frozen.is_set():
            await asyncio.sleep(30)  # frozen: the request is taken and never answered
        return web.json_response({}, status=202)

    app = web.Application()
    app.router.add_post("/actions", door)
    metrics = Metrics("n1")
    now = [1000.0]
    host = RecordingHost()
    async with (
        serve(app) as base,
        started_link(host, f"{base}/actions", timeout=0.2, retries=50) as link,
    ):
        probe = HttpProbe(
            link.url,
            metrics=metrics,
            clock=lambda: now[0],
            silent_since=lambda: None if link.silent_since is None else now[0] - 11,
            stuck_after=10.0,
        )
        assert await probe.probe_once() and probe.health().ok
        await link.submit(make_action("s1"))
        await wait_until(lambda: link.silent_since is not None, timeout=10)
        assert await probe.probe_once()  # it accepts connections...
        health = probe.health()  # ...and answers nothing
        assert not health.ok and "answered no delivery for 11s" in health.detail
        assert metrics.engine_link_ok._value.get() == 0
        frozen.set()  # SIGCONT: the retry is answered
        await wait_until(lambda: link.silent_since is None, timeout=10)
        assert await probe.probe_once() and probe.health().ok
        assert metrics.engine_link_ok._value.get() == 1
        await idle(link)
    lines = [
        (r.levelno, r.getMessage()) for r in caplog.records if r.name == "party_sync.engine.health"
    ]
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO], lines
    assert "stuck or frozen" in lines[0][1]


def failing(link: HttpEngineLink) -> tuple[float, str] | None:
    """``link.failing``, read afresh (an attribute read would be narrowed by mypy)."""
    return link.failing


async def test_an_engine_host_that_answers_every_delivery_with_an_error_shows_in_readiness(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Outside probe: an engine answering 500 to every delivery for 30 s left /readyz "ready"
    and engine_link_ok 1 while every action waited on the link's retries. Now: degraded once
    every answer for ``stuck_after`` was a 5xx, one WARNING, over at the first other answer; a
    5xx among other answers is not failing."""
    caplog.set_level(logging.INFO, "party_sync.engine.health")
    answers: list[int | str] = [500, 500, 500, 500, "hang", 503, 202]
    api, host = ScriptedApi(answers=answers), RecordingHost()
    metrics = Metrics("n1")
    now = [1000.0]
    async with (
        serve(api.app()) as base,
        started_link(host, f"{base}/actions", retries=50) as link,
    ):
        probe = HttpProbe(
            link.url,
            metrics=metrics,
            clock=lambda: now[0],
            failing=lambda: None if (f := failing(link)) is None else (now[0] - 11, f[1]),
            stuck_after=10.0,
        )
        assert failing(link) is None
        await link.submit(make_action("f1"))
        await wait_until(lambda: len(api.actions) == 5, timeout=10)  # the fifth is held
        assert (f := failing(link)) is not None and f[1] == "HTTP 500"
        assert await probe.probe_once()  # it accepts connections, and answers only errors
        health = probe.health()
        assert not health.ok and "every delivery for 11s with an error (HTTP 500)" in health.detail
        assert metrics.engine_link_ok._value.get() == 0
        api.release.set()
        await idle(link)  # the fifth attempt is taken (202): over
        assert failing(link) is None
        assert await probe.probe_once() and probe.health().ok
        assert metrics.engine_link_ok._value.get() == 1
        await link.submit(make_action("f2"))  # one 503 between two answers: not failing
        await idle(link)
        assert failing(link) is None and probe.health().ok
    lines = [
        (r.levelno, r.getMessage()) for r in caplog.records if r.name == "party_sync.engine.health"
    ]
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO], lines
    assert "with an error (HTTP 500)" in lines[0][1]


async def test_a_failing_streak_that_turns_to_no_answer_says_so() -> None:
    """HTTP probe: an engine host that answered 500 for a while, then was only slow (every
    attempt timed out), was said by /readyz to answer every delivery "with an error (HTTP
    500)" long after its last 500. What the streak met last is said too."""
    api, host = ScriptedApi(answers=[500, 500, "hang", "hang"]), RecordingHost()
    async with (
        serve(api.app()) as base,
        started_link(host, f"{base}/actions", retries=50, timeout=0.2) as link,
    ):
        await link.submit(make_action("slow"))
        await wait_until(lambda: len(api.actions) >= 3)
        await wait_until(lambda: (f := failing(link)) is not None and "then" in f[1])
        assert (f := failing(link)) is not None
        assert f[1] == "HTTP 500, then no answer within 0.2 s"
        api.release.set()
        await idle(link)


async def test_a_refused_key_shows_in_readiness_and_metrics_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The key was the most likely slip (two shells, two hosts) and monitoring showed nothing:
    ``/readyz`` said the engine was ok, ``engine_link_ok`` 1, ``engine_link_failures_total``
    0, and one ERROR per action. Now the link is down for readiness while the host refuses the
    key, each refusal counts as a failure, the ERROR is once per episode, and it is over (INFO)
    when the host takes a delivery again."""
    caplog.set_level(logging.INFO)
    keys = {"accepted": "another-key"}

    async def door(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {keys['accepted']}":
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({}, status=202)

    app = web.Application()
    app.router.add_post("/actions", door)
    app.router.add_post("/notices", door)
    metrics = Metrics("n1")
    host = RecordingHost()
    async with (
        serve(app) as base,
        started_link(
            host, f"{base}/actions", notice_url=f"{base}/notices", api_key=HOST_KEY
        ) as link,
    ):
        probe = HttpProbe(link.url, metrics=metrics, refused=lambda: link.key_refused)
        assert await probe.probe_once() and probe.health().ok
        for action_id in ("k1", "k2", "k3"):
            await link.submit(make_action(action_id))
        await link.notify_join(JoinNotice("p1", "r1", "aria", "Aria", "trace-j"))
        await idle(link)
        assert [code for _, code in host.failed] == [ErrorCode.ENGINE_UNAVAILABLE] * 3
        assert link.failures == 4
        assert await probe.probe_once()  # the URL accepts connections...
        health = probe.health()  # ...but nothing gets through
        assert not health.ok and "PARTY_SYNC_API_KEY" in health.detail
        assert "HTTP 401" in health.detail
        assert metrics.engine_link_ok._value.get() == 0
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "PARTY_SYNC_API_KEY" in errors[0]
        refusal = link.key_refused
        link.host_restarted()  # (the probe saw the URL come back: another host process)
        assert link.key_refused is None
        link._key_refused = refusal  # as it was, for the rest of the test

        keys["accepted"] = HOST_KEY  # the operator gives the host the right key
        await link.submit(make_action("k4"))
        await idle(link)
        assert link.key_refused is None and probe.health().ok
        assert await probe.probe_once() and metrics.engine_link_ok._value.get() == 1
        assert any("takes party_sync's API key again" in r.getMessage() for r in caplog.records)


async def test_a_403_from_an_engine_stays_a_refusal_of_the_action() -> None:
    """Only 401 says "your key": an engine behind its own service may answer 403 for a game
    rule ("not allowed here"); the player gets action_rejected with its detail, not a "retry
    later" about a key that is fine."""

    async def forbid(request: web.Request) -> web.Response:
        return web.json_response({"detail": "not allowed here"}, status=403)

    app = web.Application()
    app.router.add_post("/actions", forbid)
    host = RecordingHost()
    async with serve(app) as base, started_link(host, f"{base}/actions") as link:
        await link.submit(make_action("f1"))
        await idle(link)
    assert host.rejected == [("f1", "not allowed here")]
    assert host.failed == []


def test_the_server_watches_the_links_key() -> None:
    """``/readyz``'s engine health is the probe ``watch_engine`` makes: it reads the link's."""
    settings = config.load(
        None,
        env={"PARTY_SYNC_ENGINE_URL": "http://127.0.0.1:9/actions", "PARTY_SYNC_API_KEY": HOST_KEY},
    )
    link = make_link(settings)
    assert isinstance(link, HttpEngineLink)
    source = watch_engine(settings, link, Metrics("n1"))
    assert source.health().ok
    link._last_attempt = time.monotonic()  # deliveries go on...
    link._silent_since = time.monotonic() - 60  # ...and none was answered for a minute
    assert not source.health().ok and "stuck or frozen" in source.health().detail
    link._silent_since = None
    link._failing_since, link._failing_status = time.monotonic() - 60, 502  # errors only
    assert not source.health().ok and "with an error (HTTP 502)" in source.health().detail
    link._failing_since = None
    link._key_refused = "the engine host refused party_sync's API key (HTTP 401)"
    assert not source.health().ok and "HTTP 401" in source.health().detail
    # nothing delivered for long: what the last attempts met no longer says anything (the
    # operator fixed the key, the host was restarted): ready again, with no traffic needed
    link._last_attempt = time.monotonic() - 120
    link._silent_since = time.monotonic() - 180
    assert source.health().ok


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        (
            {"error": "invalid_action", "message": "target is out of range"},
            "target is out of range",
        ),
        ({"error": "invalid_action", "detail": "too far", "message": "x"}, "too far"),
        ({"error": "invalid_action"}, "invalid_action"),
        ("plain words", "plain words"),
        ({"error": 3}, None),
    ],
)
def test_a_refusal_shows_the_engine_s_sentence_before_its_code(
    body: object, shown: str | None
) -> None:
    """Outside engine probe: ``{"error": "invalid_action", "message": "target is out of
    range"}`` showed the player only ``invalid_action``."""
    from party_sync.engine.http_link import _detail

    assert _detail(body) == shown


async def test_with_the_engine_host_claiming_the_node_does_not_claim_and_names_itself() -> None:
    """``engine_http_claim = engine``: the node asks the host to claim (``X-Party-Sync-Claim``),
    naming itself (``X-Party-Sync-Node``: the host's claim records it, so that another node
    takes the action over if this one dies), and does not claim; between retries it only looks
    at the ledger (``answered``), which ends the delivery once the action has its answer (its
    deadline's ``action_timeout``, say). A taken-over action, started already, is delivered
    unclaimed, as with ``node``."""
    api, host = ScriptedApi(answers=["claimed", *["hang"] * 50]), RecordingHost()
    async with (
        serve(api.app()) as base,
        started_link(
            host, f"{base}/actions", engine_claims=True, node_id="n-1", timeout=0.2
        ) as link,
    ):
        await link.submit(make_action("mine"))
        await wait_until(lambda: len(api.actions) == 1)
        await link.submit(make_action("frozen"))
        await wait_until(lambda: len(api.actions) >= 3)  # retried: no answer in time
        host.answers.add("frozen")  # the deadline refused it meanwhile
        await idle(link)
        assert link.silent_since is not None  # the host still answers nothing (/readyz)
        api.release.set()
        await link.submit(replace(make_action("taken"), redelivery=True))
        await idle(link)
    asked = [(h.get(wire.CLAIM_HEADER), h.get(wire.NODE_HEADER)) for h, _ in api.actions]
    assert asked[:3] == [("engine", "n-1")] * 3
    assert asked[-1] == (None, None)  # the take-over's redelivery
    assert [a.action_id for a in host.claimed] == ["taken"]  # the node claimed only that
    assert host.failed == [] and link.engine_claims  # (the host claims: it said so)
