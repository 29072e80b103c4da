"""OpenTelemetry tracing: one trace per player action, end to end. Off unless configured.

**Off by default.** Nothing is traced or exported until ``configure_from_env`` finds an exporter
in the standard ``OTEL_*`` variables (``OTEL_TRACES_EXPORTER=console`` or ``otlp``, or an
``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``: then ``otlp``), or a test calls ``install``. While it is
off, every helper here returns a shared do-nothing context manager after one ``is None`` check:
the hot path pays a function call, not a span (bench/hotpath.py measures it).

**One trace per action.** The gateway opens the root span (``action_span``) when it receives an
``action.request`` frame; its trace id *is* the envelope's ``trace_id`` when that is a valid W3C
trace id (32 lowercase hex characters, not all zero: what ``codec.new_trace_id`` makes when the
client sends none), so the id a player, a log line and an event carry finds the trace. A client
``trace_id`` of another shape is kept as the span attribute ``party_sync.trace_id`` and the trace
gets a random id. (The seed reaches the SDK through ``SeededIdGenerator``, which the provider
made here uses: a context variable set only while the root span is created.)

The context then travels with the action, as a W3C ``traceparent``:

- in-process: the engine's task inherits it (``contextvars``);
- Redis Streams: in the entry's ``traceparent`` field (``engine/stream_link.py``), read by the
  worker (``engine/stream_worker.py``), whose spans and publishes join the trace;
- HTTP: in the ``traceparent`` header of each delivery (``engine/http_link.py``), read by the
  engine host (``engine/http_host.py``), whose ``ApiPublisher`` sends it back on every call to
  the events API (``transport/api.py``), which continues the trace.

So every event the engine publishes for the action (``action.result``, ``scene.update`` …) is a
span of the action's trace. Spans are exported in batches (``BatchSpanProcessor``, tuned by the
standard ``OTEL_BSP_*`` variables); the sampler is the SDK's (``OTEL_TRACES_SAMPLER``, default:
parent-based, always on).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from party_sync import __version__
from party_sync.protocol.errors import ConfigError

__all__ = [
    "TRACEPARENT",
    "Attributes",
    "SeededIdGenerator",
    "SpanKind",
    "action_span",
    "configure_from_env",
    "exporter_names",
    "incoming",
    "inject",
    "install",
    "is_on",
    "make_provider",
    "span",
    "trace_id_of",
    "traceparent",
    "uninstall",
    "with_traceparent",
]

log = logging.getLogger(__name__)

Attributes = Mapping[str, AttributeValue]

#: The W3C header (and stream field) that carries the context.
TRACEPARENT: Final = "traceparent"

#: A W3C trace-id: 32 lowercase hex characters (all zero is invalid, checked apart).
_W3C_TRACE_ID = re.compile(r"[0-9a-f]{32}")

#: Where the exporters of ``OTEL_TRACES_EXPORTER`` are found (the SDK's entry point group).
EXPORTER_GROUP: Final = "opentelemetry_traces_exporter"

#: ``otlp`` by protocol (``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``; http/protobuf by default, as
#: the OpenTelemetry specification says) → (entry point, the package that provides it).
OTLP_BY_PROTOCOL: Final = {
    "http/protobuf": ("otlp_proto_http", "opentelemetry-exporter-otlp-proto-http"),
    "grpc": ("otlp_proto_grpc", "opentelemetry-exporter-otlp-proto-grpc"),
}

_SEED: contextvars.ContextVar[int | None] = contextvars.ContextVar("party_sync_trace_seed")
_NO_SPAN: Final[AbstractContextManager[None]] = contextlib.nullcontext()
_ROOT: Final = Context()  # no parent: a new trace
_PROPAGATOR: Final = TraceContextTextMapPropagator()


@dataclass
class _State:
    tracer: Tracer | None = None
    provider: TracerProvider | None = None


_state = _State()


class SeededIdGenerator(RandomIdGenerator):
    """Random ids, except a new trace's id while ``action_span`` seeds it (the envelope's)."""

    def generate_trace_id(self) -> int:
        seed = _SEED.get(None)
        return seed if seed is not None else super().generate_trace_id()

    def is_trace_id_random(self) -> bool:
        return False  # a client's trace_id need not be random (W3C trace-context level 2)


def trace_id_of(trace_id: str | None) -> int | None:
    """The OpenTelemetry trace id of an envelope's ``trace_id``, if it is a valid W3C one."""
    if trace_id is None or _W3C_TRACE_ID.fullmatch(trace_id) is None:
        return None
    value = int(trace_id, 16)
    return value or None


def is_on() -> bool:
    """True while spans are recorded (``configure_from_env`` found an exporter, or ``install``)."""
    return _state.tracer is not None


# -- spans --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _current(span: Span) -> Iterator[Span]:
    """``span`` as the current span until the block ends; a refusal (an exception with an
    ``ErrorCode`` ``code``, e.g. ``ProtocolError``) is recorded as its code, anything else with
    its exception."""
    with trace.use_span(span, end_on_exit=True, record_exception=False):
        try:
            yield span
        except BaseException as exc:
            code = getattr(getattr(exc, "code", None), "value", None)
            if isinstance(code, str):
                span.set_attribute("party_sync.error_code", code)
                span.set_status(Status(StatusCode.ERROR, code))
            else:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise


def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes | None = None,
) -> AbstractContextManager[Span | None]:
    """A span, child of the current one, current until the block ends (None while off)."""
    tracer = _state.tracer
    if tracer is None:
        return _NO_SPAN
    return _current(tracer.start_span(name, kind=kind, attributes=attributes))


def _root(
    tracer: Tracer, name: str, kind: SpanKind, trace_id: str | None, attributes: Attributes | None
) -> Span:
    token = _SEED.set(trace_id_of(trace_id))
    try:
        return tracer.start_span(name, context=_ROOT, kind=kind, attributes=attributes)
    finally:
        _SEED.reset(token)


def action_span(
    trace_id: str, *, attributes: Attributes | None = None
) -> AbstractContextManager[Span | None]:
    """The root span of a player's action (``action.request`` received): a new trace whose id is
    ``trace_id`` when that is a valid W3C trace id."""
    tracer = _state.tracer
    if tracer is None:
        return _NO_SPAN
    attributes = {**(attributes or {}), "party_sync.trace_id": trace_id}
    return _current(_root(tracer, "action.request", SpanKind.SERVER, trace_id, attributes))


def incoming(
    name: str,
    carrier: Mapping[str, str] | str | bytes | None,
    *,
    trace_id: str | None = None,
    kind: SpanKind = SpanKind.SERVER,
    attributes: Attributes | None = None,
) -> AbstractContextManager[Span | None]:
    """A span continuing the context that came with a request or a stream entry.

    ``carrier``: headers (a mapping with ``traceparent``), or the ``traceparent`` value itself.
    Without a valid one: a new trace, with ``trace_id``'s id when that is a W3C one (what arrives
    from a sender that does not trace still lands in the action's trace).
    """
    tracer = _state.tracer
    if tracer is None:
        return _NO_SPAN
    parent = _context_of(carrier)
    if parent is None:
        return _current(_root(tracer, name, kind, trace_id, attributes))
    return _current(tracer.start_span(name, context=parent, kind=kind, attributes=attributes))


def _context_of(carrier: Mapping[str, str] | str | bytes | None) -> Context | None:
    if isinstance(carrier, bytes):
        carrier = carrier.decode("ascii", "replace")
    if isinstance(carrier, str):
        carrier = {TRACEPARENT: carrier}
    if carrier is None or carrier.get(TRACEPARENT) is None:
        return None
    context = _PROPAGATOR.extract({TRACEPARENT: str(carrier[TRACEPARENT])})
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


# -- propagation --------------------------------------------------------------------------------


def inject(carrier: MutableMapping[str, str]) -> None:
    """Add the current span's ``traceparent`` to ``carrier`` (headers); nothing while off."""
    if _state.tracer is not None:
        _PROPAGATOR.inject(carrier)


def with_traceparent(headers: Mapping[str, str]) -> Mapping[str, str]:
    """``headers``, plus the current ``traceparent`` (a copy) while tracing is on."""
    if _state.tracer is None:
        return headers
    copy = dict(headers)
    _PROPAGATOR.inject(copy)
    return copy


def traceparent() -> str | None:
    """The current span's ``traceparent`` (for a stream entry), None while off or outside one."""
    if _state.tracer is None:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT)


# -- set-up -------------------------------------------------------------------------------------


def make_provider(
    *processors: SpanProcessor, service_name: str = "party-sync", shutdown_on_exit: bool = False
) -> TracerProvider:
    """A TracerProvider with ``SeededIdGenerator`` and the resource of ``OTEL_SERVICE_NAME`` /
    ``OTEL_RESOURCE_ATTRIBUTES`` (``service_name`` when they name no service)."""
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    attributes: dict[str, Any] = {"service.version": __version__}
    if not named:
        attributes["service.name"] = service_name
    provider = TracerProvider(
        resource=Resource.create(attributes),
        id_generator=SeededIdGenerator(),
        shutdown_on_exit=shutdown_on_exit,
    )
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


def install(provider: TracerProvider) -> None:
    """Trace into ``provider`` from now on (made by ``make_provider``, so that an action's trace
    id is its envelope's)."""
    _state.provider = provider
    _state.tracer = provider.get_tracer("party_sync", __version__)


def uninstall() -> None:
    """Stop tracing: flush and shut the provider down (tests; the end of a process)."""
    provider = _state.provider
    _state.tracer = None
    _state.provider = None
    if provider is not None:
        provider.shutdown()


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The exporters the ``OTEL_*`` variables ask for; [] = tracing off.

    Off unless ``OTEL_TRACES_EXPORTER`` names one (``none`` names none) or an OTLP endpoint is
    set (then ``otlp``); ``OTEL_SDK_DISABLED=true`` turns everything off. (The specification's
    default exporter is ``otlp``: party_sync's is none, so a server that nobody configured for
    tracing never tries to send spans anywhere.)
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not raw:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    return [] if "none" in names else names


def _exporter(name: str, environ: Mapping[str, str]) -> SpanExporter:
    package = None
    if name == "otlp":
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        ).strip()
        if protocol not in OTLP_BY_PROTOCOL:
            raise ConfigError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r}: use one of {sorted(OTLP_BY_PROTOCOL)}"
            )
        name, package = OTLP_BY_PROTOCOL[protocol]
    found = entry_points(group=EXPORTER_GROUP, name=name)
    if not found:
        hint = f" (install {package})" if package else ""
        raise ConfigError(f"OTEL_TRACES_EXPORTER: no trace exporter named {name!r}{hint}")
    exporter_class = next(iter(found)).load()
    exporter: SpanExporter = exporter_class()
    return exporter


def configure_from_env(service_name: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """Turn tracing on if the ``OTEL_*`` variables ask for it (see ``exporter_names``), as the
    process's global tracer provider too (an engine's own spans join the action's trace).

    Returns the exporters used ([]: off). Once per process; raises ``ConfigError`` for an
    exporter that does not exist.
    """
    env = os.environ if environ is None else environ
    names = exporter_names(env)
    if not names or _state.tracer is not None:  # off, or already on
        return names
    exporters = [_exporter(name, env) for name in names]
    provider = make_provider(
        *(BatchSpanProcessor(exporter) for exporter in exporters),
        service_name=service_name,
        shutdown_on_exit=True,
    )
    install(provider)
    trace.set_tracer_provider(provider)
    log.info("tracing on: spans exported to %s", ", ".join(names), extra={"exporters": names})
    return names
