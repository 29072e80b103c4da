"""OpenTelemetry tracing: one connected trace per action over each engine transport.

Spans go to the SDK's in-memory exporter (``tracing.install``). For each transport an action is
sent over a real WebSocket and answered by a real engine; the trace must be *one* tree: a single
root (the gateway's ``action.request``) whose trace id is the action's ``trace_id``, every other
span a descendant of it, and a span for each event the engine published.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from party_sync import tracing
from party_sync.engine.http_host import ApiPublisher, build_host_app
from party_sync.engine.interface import JoinNotice
from party_sync.engine.stream_link import entry
from party_sync.engine.stream_worker import StreamWorker, WorkerOptions
from party_sync.protocol import codec
from party_sync.protocol.errors import ConfigError
from party_sync.protocol.schemas import Contracts
from party_sync.publishing import BackendPublisher
from party_sync.server import make_backend
from ps_testkit.client import Client, wait_until
from ps_testkit.engines import ScriptedEngine
from ps_testkit.hosts import serving
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import make_settings, serve_in_process, serve_process
from redis.asyncio import Redis

KEY = "api-key-0123456789abcdef0123456789"

#: The spans every engine answer has: one per published event.
EVENTS = {"publish action.result", "publish scene.update"}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    tracing.install(tracing.make_provider(SimpleSpanProcessor(spans)))
    try:
        yield spans
    finally:
        tracing.uninstall()


def trace_of(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def names(spans: Sequence[ReadableSpan]) -> set[str]:
    return {s.name for s in spans}


async def wait_for_spans(
    exporter: InMemorySpanExporter, trace_id: int, expected: set[str]
) -> list[ReadableSpan]:
    """The finished spans of the trace, once all of ``expected`` have ended (spans end a little
    after the client sees the event they produced)."""
    await wait_until(lambda: expected <= names(trace_of(exporter, trace_id)))
    return trace_of(exporter, trace_id)


def assert_one_tree(spans: Sequence[ReadableSpan]) -> ReadableSpan:
    """One root (the gateway's ``action.request``), every other span its descendant."""
    roots = [s for s in spans if s.parent is None]
    assert [r.name for r in roots] == ["action.request"], [(s.name, s.parent) for s in spans]
    ids = {s.context.span_id for s in spans}
    orphans = [s.name for s in spans if s.parent is not None and s.parent.span_id not in ids]
    assert not orphans, f"spans whose parent is not in the trace: {orphans}"
    return roots[0]


async def act(client: Client, action_id: str, trace_id: str) -> None:
    await client.act(action_id, "aria", "r1", trace_id=trace_id)
    result = await client.until("action.result")
    assert result["trace_id"] == trace_id
    await client.until("scene.update")


# -- one trace per action, over each transport --------------------------------------------------


async def test_an_in_process_action_is_one_trace_with_the_actions_trace_id(
    exporter: InMemorySpanExporter,
) -> None:
    trace_id = codec.new_trace_id()
    async with serve_in_process(make_settings(), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        await act(a, "t-in-1", trace_id)
        spans = await wait_for_spans(
            exporter, int(trace_id, 16), {"action.request", "engine handle_action", *EVENTS}
        )
        await a.close()
    root = assert_one_tree(spans)
    assert root.kind is tracing.SpanKind.SERVER
    assert root.attributes is not None
    assert root.attributes["party_sync.trace_id"] == trace_id
    assert root.attributes["party_sync.action_id"] == "t-in-1"
    # the in-process link's claim rides on the acceptance (EngineLink.claims_on_accept)
    assert "claim" not in names(spans)


async def test_an_action_through_the_redis_stream_and_a_worker_is_one_trace(
    exporter: InMemorySpanExporter, redis: RedisServer
) -> None:
    settings = make_settings(redis_url=redis.url, engine_transport="stream")
    trace_id = codec.new_trace_id()
    backend = make_backend(settings)
    await backend.start()
    client = Redis.from_url(redis.url, socket_timeout=3.0)
    worker = StreamWorker(
        ScriptedEngine(),
        BackendPublisher(backend, Contracts(), time.time),
        client,
        WorkerOptions(stream=settings.actions_stream, consumer="w1", block=0.1),
    )
    task = asyncio.get_running_loop().create_task(worker.run())
    try:
        async with serve_in_process(settings) as srv:
            a, _ = await srv.join("aria")
            await act(a, "t-stream-1", trace_id)
            expected = {"action.request", "engine.stream append", "engine.stream handle", *EVENTS}
            spans = await wait_for_spans(exporter, int(trace_id, 16), expected)
            await a.close()
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        await client.aclose()
        await backend.close()
    assert_one_tree(spans)
    by_name = {s.name: s for s in spans}
    assert by_name["engine.stream handle"].kind is tracing.SpanKind.CONSUMER
    # the worker's span continues the append's context (the entry's traceparent)
    append = by_name["engine.stream append"]
    handle = by_name["engine.stream handle"]
    assert handle.parent is not None
    assert handle.parent.span_id == append.context.span_id


@contextlib.asynccontextmanager
async def engine_host(publisher: ApiPublisher) -> AsyncIterator[str]:
    """``party-sync engine-http``'s app, in this loop on a loopback port; yields its action URL."""
    app = build_host_app(ScriptedEngine(), publisher)
    async with serving(app, shutdown_timeout=60.0) as base:
        yield f"{base}/actions"


async def test_an_action_over_http_and_back_through_the_events_api_is_one_trace(
    exporter: InMemorySpanExporter,
) -> None:
    trace_id = codec.new_trace_id()
    publisher = ApiPublisher("http://127.0.0.1:1", KEY)  # party_sync's URL is known below
    async with (
        engine_host(publisher) as url,
        serve_in_process(make_settings(api_key=KEY, engine_url=url)) as srv,
    ):
        publisher.base_url = srv.base
        a, _ = await srv.join("aria")
        await act(a, "t-http-1", trace_id)
        expected = {"action.request", "engine.http deliver", "POST /actions", *EVENTS}
        spans = await wait_for_spans(exporter, int(trace_id, 16), expected)
        await a.close()
    assert_one_tree(spans)
    by_id = {s.context.span_id: s for s in spans}
    # each event came back through the events API as a child of the engine host's request span
    for published in (s for s in spans if s.name in EVENTS):
        assert published.parent is not None
        assert by_id[published.parent.span_id].name == "POST /actions"
    host = next(s for s in spans if s.name == "POST /actions")
    assert host.parent is not None
    assert by_id[host.parent.span_id].name == "engine.http deliver"


async def test_a_client_trace_id_that_is_not_a_w3c_one_is_kept_as_an_attribute(
    exporter: InMemorySpanExporter,
) -> None:
    async with serve_in_process(make_settings(), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        await act(a, "t-odd-1", "trace-not-hex-1")
        await wait_until(
            lambda: any(s.name == "publish scene.update" for s in exporter.get_finished_spans())
        )
        await a.close()
    root = next(s for s in exporter.get_finished_spans() if s.name == "action.request")
    assert root.attributes is not None
    assert root.attributes["party_sync.trace_id"] == "trace-not-hex-1"
    assert_one_tree(trace_of(exporter, root.context.trace_id))


async def test_a_refused_action_ends_its_span_with_the_refusals_code(
    exporter: InMemorySpanExporter,
) -> None:
    trace_id = codec.new_trace_id()
    async with serve_in_process(make_settings(), engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        await a.act("t-forbidden", "borin", "r1", trace_id=trace_id)  # not this connection's
        error = await a.until("system.error")
        assert error["payload"]["code"] == "forbidden"
        await a.close()
    (root,) = trace_of(exporter, int(trace_id, 16))
    assert root.attributes is not None
    assert root.attributes["party_sync.error_code"] == "forbidden"
    assert not root.events  # a refusal is not an exception with a stack trace


# -- off by default -----------------------------------------------------------------------------


async def test_off_nothing_is_traced_and_nothing_is_added_to_the_wire() -> None:
    assert not tracing.is_on()
    assert tracing.traceparent() is None
    headers = {"X-Trace-Id": "t"}
    assert tracing.with_traceparent(headers) is headers
    with tracing.action_span(codec.new_trace_id()) as root, tracing.span("x") as child:
        assert root is None and child is None
        assert tracing.traceparent() is None
    assert "traceparent" not in entry("action", "p1", "r1", {}, None, tracing.traceparent())


def test_a_root_span_takes_the_trace_id_of_a_valid_w3c_trace_id_only() -> None:
    hex_id = codec.new_trace_id()
    assert tracing.trace_id_of(hex_id) == int(hex_id, 16)
    assert tracing.trace_id_of("0" * 32) is None  # invalid in W3C
    assert tracing.trace_id_of(hex_id.upper()) is None  # W3C ids are lowercase
    assert tracing.trace_id_of("0x" + hex_id[2:]) is None  # int() would take it: we do not
    assert tracing.trace_id_of("trace-http-1") is None
    assert tracing.trace_id_of(None) is None


def test_the_otel_variables_decide_whether_anything_is_exported() -> None:
    names = tracing.exporter_names
    assert names({}) == []  # off by default (the specification's default would be otlp)
    assert names({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]
    assert names({"OTEL_TRACES_EXPORTER": "console,otlp"}) == ["console", "otlp"]
    assert names({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == ["otlp"]
    assert names({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}) == ["otlp"]
    disabled = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}
    assert names(disabled) == []


def test_exporters_are_found_by_name_and_a_missing_one_is_a_clear_error() -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    assert isinstance(tracing._exporter("console", {}), ConsoleSpanExporter)
    assert isinstance(tracing._exporter("otlp", {}), OTLPSpanExporter)  # http/protobuf default
    with pytest.raises(ConfigError, match="opentelemetry-exporter-otlp-proto-grpc"):
        tracing._exporter("otlp", {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        tracing._exporter("otlp", {"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})
    with pytest.raises(ConfigError, match="no trace exporter named 'zipkin-ish'"):
        tracing._exporter("zipkin-ish", {})
    assert tracing.configure_from_env("party-sync", {}) == []
    assert not tracing.is_on()


@pytest.mark.e2e
async def test_party_sync_serve_prints_an_actions_trace_with_the_console_exporter() -> None:
    """What a new user does: ``OTEL_TRACES_EXPORTER=console party-sync serve``, one action."""
    trace_id = codec.new_trace_id()
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "50"}
    async with serve_process(env=env) as srv:
        a, _ = await srv.join("aria")
        await a.act("t-console", "aria", "r1", trace_id=trace_id)
        await a.until("action.result", timeout=10)
        await a.close()
        assert srv.process is not None and srv.process.stdout is not None
        stdout = srv.process.stdout
        printed: list[str] = []

        def saw(name: str) -> bool:
            text = "".join(printed)
            return f'"trace_id": "0x{trace_id}"' in text and f'"name": "{name}"' in text

        async with asyncio.timeout(10):
            while not (saw("action.request") and saw("publish action.result")):
                line = await asyncio.to_thread(stdout.readline)
                assert line, "the server closed its output before printing the trace"
                printed.append(line.decode())


def test_a_provider_names_the_service_unless_the_environment_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    provider = tracing.make_provider(service_name="party-sync-engine-worker")
    assert provider.resource.attributes["service.name"] == "party-sync-engine-worker"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-gateway")
    assert tracing.make_provider().resource.attributes["service.name"] == "my-gateway"


class OpeningEngine(ScriptedEngine):
    """Publishes a party's opening scene when its first member joins (as the reference engine
    does), under the join's trace id."""

    async def handle_join(self, notice: JoinNotice) -> None:
        await super().handle_join(notice)
        scene = {
            "scene_number": 1,
            "scene_id": "opening",
            "title": "The opening",
            "narration": "It begins.",
            "options": [{"id": "A", "label": "Go on"}],
            "kind": "story",
        }
        await self.started.publish(notice.party_id, "scene.update", scene, trace_id=notice.trace_id)


async def test_what_the_engine_publishes_for_a_join_is_traced_under_the_joins_trace_id(
    exporter: InMemorySpanExporter,
) -> None:
    """Docs probe: a party's opening scene carried the join's trace id, and the spans of its
    publishing were in a trace of random id that no event or log line named. They are in the
    join's trace now (a root ``party.join``), so the trace id a client sees finds them."""
    engine = OpeningEngine()
    async with serve_in_process(make_settings(), engine=engine) as srv:
        a, _ = await srv.join("aria")
        scene = await a.until("scene.update")
        await a.close()
    trace_id = scene["trace_id"]
    assert engine.joins and engine.joins[0].trace_id == trace_id
    spans = await wait_for_spans(
        exporter, int(trace_id, 16), {"party.join", "publish scene.update"}
    )
    roots = [s for s in spans if s.parent is None]
    assert [r.name for r in roots] == ["party.join"]
