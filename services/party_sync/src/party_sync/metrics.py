"""Prometheus metrics, one registry per server (so tests can run several servers in a process).

Families of the Redis mode (``party_sync_redis_*``, ``party_sync_pubsub_*``, the actions stream's
``party_sync_actions_stream_*``) are registered only when something of that mode uses them (the
Redis backend calls ``register_redis``; the stream monitor's first reading registers the stream
gauges): an embedded server's ``/metrics`` has none of them.

With ``serve --workers N`` (``party_sync.workers``) each worker keeps this registry exactly as a
single server does (the hot path's counters stay plain integers), and ``/metrics`` on any worker
reports the whole group: the worker asks every other worker for its own exposition (over a Unix
socket in the group's private directory) and ``merge_workers`` puts them side by side, every
sample labelled with its ``worker`` (1..N), plus ``party_sync_workers`` and
``party_sync_worker_up{worker}``. The families that describe what the group shares (the actions
stream's, ``GROUP_WIDE``: every worker reads the same stream) come from one worker only, so that
a sum over ``worker`` is the stream's figure, not N times it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import Final

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from party_sync import __version__
from party_sync.core.limits import TokenBucket

#: The Content-Type of ``/metrics``, one process's or a ``--workers`` group's merged one: the
#: Prometheus text format 0.0.4 (docs/metrics.md), which ``generate_latest`` writes.
EXPOSITION_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: The ``route`` label of a request that matched no route (never the raw path: unbounded).
UNMATCHED = "unmatched"

#: The ``method`` label's values; any other method a client sends (the HTTP parser takes any
#: token: ``PROPFIND``, ``BREW``...) is counted as ``other``, so no client can grow the exposition
#: (and the cost of each scrape) by inventing methods.
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"

#: Fresh renders of ``/metrics`` a second (and the burst) beyond which a scrape is answered with
#: the last rendering: a render is milliseconds of the event loop, so a flood of scrapes from
#: anyone who can reach the port must not take the loop from the players. A scraper every few
#: seconds, or a test that scrapes after each step, always gets a fresh one.
RENDERS_PER_SECOND: Final = 4.0
RENDER_BURST: Final = 8.0


class ScrapeGate:
    """Whether a scrape gets a fresh rendering (``fresh``; then ``last`` is set to it) or the
    last one again, by a token bucket of renders (time passed in)."""

    def __init__(self, rate: float = RENDERS_PER_SECOND, burst: float = RENDER_BURST) -> None:
        self._bucket = TokenBucket(rate, burst)
        self.last: bytes | None = None

    def fresh(self, now: float) -> bool:
        return self.last is None or self._bucket.take(now)


class ReadCounter(Collector):
    """A counter whose value is read from elsewhere at scrape time (an adapter's own integer)."""

    def __init__(
        self, name: str, documentation: str, read: Callable[[], int], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.read = read
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=float(self.read()))


class TypeCounter(Collector):
    """A counter by message ``type`` kept as plain integers, turned into metrics at scrape time.

    It is bumped for every message in and every event out, where a ``prometheus_client``
    counter child costs a lock and a float box per call (~0.8 µs, measured in bench/hotpath.py);
    a dict increment costs a tenth of that. The exposition is the same counter family.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.counts: dict[str, int] = {}
        registry.register(self)

    def inc(self, type_: str, amount: int = 1) -> None:
        counts = self.counts
        counts[type_] = counts.get(type_, 0) + amount

    def value(self, type_: str) -> int:
        return self.counts.get(type_, 0)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=["type"])
        for type_, count in sorted(self.counts.items()):
            family.add_metric([type_], float(count))
        yield family


class LinkFailures(Collector):
    """``party_sync_engine_link_failures_total{transport}``, read from the link's ``failures``
    (an integer the HTTP and stream links keep; a link without one has none)."""

    def __init__(self, transport: str, link: object, registry: CollectorRegistry) -> None:
        self.transport = transport
        self.link = link
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "party_sync_engine_link_failures",
            "Failed attempts to hand something to the engine, by transport (http: a delivery "
            "refused, timed out, answered 5xx, or its key refused (401); stream: an append to "
            "the actions stream that failed)",
            labels=["transport"],
        )
        family.add_metric([self.transport], float(getattr(self.link, "failures", 0)))
        yield family


class Metrics:
    def __init__(self, node: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.scrapes = ScrapeGate()
        r = self.registry
        # The process (CPU seconds, resident memory, open and maximum descriptors, start time;
        # where /proc exists) and the Python runtime (python_info).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge(
            "party_sync_build_info",
            "The party_sync version this node runs",
            ["version"],
            registry=r,
        )
        self.build_info.labels(__version__).set(1)
        self.http_requests = Counter(
            "party_sync_http_requests_total",
            "HTTP requests answered (WebSocket sessions excepted), by method, route (the route's "
            "template, e.g. /api/v1/parties/{party_id}/events; unmatched: no route) and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "party_sync_http_request_duration_seconds",
            "Time to answer an HTTP request (WebSocket sessions excepted), by method and route",
            ["method", "route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.connections = Gauge(
            "party_sync_connections", "Open WebSocket connections on this node", registry=r
        )
        self.parties = Gauge(
            "party_sync_parties", "Parties with connections on this node", registry=r
        )
        self.messages_in = TypeCounter(
            "party_sync_messages_in_total",
            "Client messages received that passed the schema check, by type (one refused is "
            "counted in party_sync_errors_total by its code)",
            r,
        )
        self.messages_out = TypeCounter(
            "party_sync_messages_out_total",
            "Messages sent to clients (one per recipient), by type, system.error and "
            "system.pong included; the events of a resume's replay, and those a connection "
            "got while its hello was being made, are not counted by type",
            r,
        )
        self.errors = Counter(
            "party_sync_errors_total", "system.error sent, by code", ["code"], registry=r
        )
        self.handshakes_refused = Counter(
            "party_sync_handshakes_refused_total",
            "WebSocket handshakes refused, by HTTP status",
            ["status"],
            registry=r,
        )
        self.connections_refused = Counter(
            "party_sync_connections_refused_total",
            "Connections turned away by a limit, by reason: per_address (closed at accept), "
            "per_user (WebSocket handshake answered 429), policy_cooldown (handshake answered "
            "429 for a while after a 1008 close), handshake_rate (429: the user opened sessions "
            "too fast), head_timeout (no complete request head in time)",
            ["reason"],
            registry=r,
        )
        self.resumes = Counter(
            "party_sync_resumes_total",
            "Reconnects that asked to resume, by outcome (resumed / snapshot)",
            ["outcome"],
            registry=r,
        )
        self.closes = Counter(
            "party_sync_closes_total",
            "Connections closed by the server, by close code (1006: dropped by the heartbeat)",
            ["code"],
            registry=r,
        )
        self.engine_latency = Histogram(
            "party_sync_engine_latency_seconds",
            "From an accepted action.request to its action.result on this node",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.settles = Counter(
            "party_sync_presence_settles_total",
            "Grace periods that ended, by outcome (left: party.leave sent; stayed: reconnected)",
            ["outcome"],
            registry=r,
        )
        self.action_answers = Counter(
            "party_sync_action_answers_total",
            "Final answers the timeout sweep gave itself (timeout: nobody started the action "
            "by its deadline; resent: a final answer lost on the way, sent again)",
            ["outcome"],
            registry=r,
        )
        self.actions_overdue = Counter(
            "party_sync_actions_overdue_total",
            "Actions an engine started that had no answer at their deadline (each counted once "
            "by the node that accepted it, whether or not its player stayed, and once by a node "
            "its player resent it to; the engine is slower than action_timeout, or ended without "
            "publishing the result)",
            registry=r,
        )
        self.actions_forgotten = Counter(
            "party_sync_actions_forgotten_total",
            "Actions an engine started that still had no answer when their record expired "
            "(action_record_ttl after acceptance): the engine ended without publishing the "
            "result; party_sync stopped waiting for them and told their player nothing",
            registry=r,
        )
        # Background work (docs/architecture.md, "Recovery"): a periodic task that meets an
        # error counts it here, logs once per episode and carries on.
        self.background_errors = Counter(
            "party_sync_background_errors_total",
            "Errors met by a periodic background task (which carried on), by task",
            ["task"],
            registry=r,
        )
        # The engine link, as this node sees it, so the operator sees a missing or stuck engine
        # (docs/engines.md; engine/stream_monitor.py, engine/health.py).
        self.engine_link_ok = Gauge(
            "party_sync_engine_link_ok",
            "1 while the engine link looks able to answer actions (stream: an active consumer "
            "and no stuck backlog; http: the engine URL reachable), else 0",
            registry=r,
        )
        self.engine_link_ok.set(1)
        # The backend, as /readyz asks it (transport/http.py BackendWatch), every few seconds
        self.backend_ok = Gauge(
            "party_sync_backend_ok",
            "1 while the backend answers as /readyz asks it (Redis: the pub/sub connection up, "
            "a PING answered, no write refused for Redis's state (OOM, READONLY...) in the last "
            "5 s; embedded: always), else 0; looked at every 5 s",
            registry=r,
        )
        self.backend_ok.set(1)
        self.info = Gauge("party_sync_node_info", "This node", ["node"], registry=r)
        self.info.labels(node).set(1)

    # -- Redis mode only (registered on first use; ``register_redis`` registers them all) --------
    def register_redis(self) -> None:
        """The Redis backend's families, at 0 until something happens (called by the backend)."""
        _ = (self.pubsub_gaps, self.redis_reconnects, self.pubsub_lag)  # a first read registers

    def register_script_counts(self, batches: Callable[[], int], calls: Callable[[], int]) -> None:
        """The Redis backend's pipelined script writes and calls, read from its batcher."""
        ReadCounter(
            "party_sync_redis_script_batches_total",
            "Writes of pipelined script calls to Redis (calls / batches = calls per write)",
            batches,
            self.registry,
        )
        ReadCounter(
            "party_sync_redis_script_calls_total",
            "Lua script calls sent to Redis",
            calls,
            self.registry,
        )

    @cached_property
    def pubsub_gaps(self) -> Counter:
        # Redis mode (backends/redis_*): pub/sub continuity and health (docs/redis.md).
        return Counter(
            "party_sync_pubsub_gaps_total",
            "Party stream gaps on Redis pub/sub, by outcome (repaired: filled from history; "
            "resync: history could not fill it, clients were told to resync)",
            ["outcome"],
            registry=self.registry,
        )

    @cached_property
    def redis_reconnects(self) -> Counter:
        return Counter(
            "party_sync_redis_reconnects_total",
            "Redis pub/sub connections re-established, by cause (error / probe)",
            ["cause"],
            registry=self.registry,
        )

    @cached_property
    def cluster_masters(self) -> Gauge:
        # Redis Cluster only (backends/redis_backend.py _watch_masters): /readyz stays 200 while
        # one master answers, so a shard down shows here, not to a load balancer.
        return Gauge(
            "party_sync_redis_cluster_masters",
            "Redis Cluster masters in this node's slot map (state=known) and those of them that "
            "answered a PING within 1 s (state=answering); looked at every 5 s. answering < known: "
            "the parties of the masters that do not answer get backend_unavailable",
            ["state"],
            registry=self.registry,
        )

    @cached_property
    def pubsub_lag(self) -> Histogram:
        return Histogram(
            "party_sync_pubsub_lag_seconds",
            "Round trip of the pub/sub liveness probe: publish on this node's channel → received",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )

    # The actions stream as this node sees it (stream mode: engine/stream_monitor.py).
    @cached_property
    def stream_length(self) -> Gauge:
        return Gauge(
            "party_sync_actions_stream_length",
            "Stream mode: entries in the actions stream (workers delete what they handled, "
            "unless --keep-handled; up to actions_stream_maxlen)",
            registry=self.registry,
        )

    @cached_property
    def stream_pending(self) -> Gauge:
        return Gauge(
            "party_sync_actions_stream_pending",
            "Stream mode: entries delivered to an engine worker and not yet acknowledged",
            registry=self.registry,
        )

    @cached_property
    def stream_lag(self) -> Gauge:
        return Gauge(
            "party_sync_actions_stream_lag",
            "Stream mode: entries not yet delivered to any engine worker (the whole stream "
            "while no consumer group exists)",
            registry=self.registry,
        )

    @cached_property
    def stream_oldest_pending(self) -> Gauge:
        return Gauge(
            "party_sync_actions_stream_oldest_pending_seconds",
            "Stream mode: age of the oldest entry delivered and not yet acknowledged (0: none)",
            registry=self.registry,
        )

    @cached_property
    def stream_oldest_undelivered(self) -> Gauge:
        return Gauge(
            "party_sync_actions_stream_oldest_undelivered_seconds",
            "Stream mode: age of the oldest entry no engine worker has received yet (0: none)",
            registry=self.registry,
        )

    @cached_property
    def stream_consumers(self) -> Gauge:
        return Gauge(
            "party_sync_actions_stream_consumers",
            "Stream mode: consumers (engine workers, live or dead) in the engine's group",
            registry=self.registry,
        )

    @cached_property
    def stream_consumers_active(self) -> Gauge:
        return Gauge(
            "party_sync_actions_stream_consumers_active",
            "Stream mode: consumers of the engine's group seen reading recently",
            registry=self.registry,
        )

    # Each partition of a partitioned actions stream (actions_stream_partitions > 1).
    @cached_property
    def stream_partition_length(self) -> Gauge:
        return Gauge(
            "party_sync_actions_stream_partition_length",
            "Stream mode, partitioned: entries in one partition stream (<actions_stream>:<i>)",
            ["partition"],
            registry=self.registry,
        )

    @cached_property
    def stream_partition_pending(self) -> Gauge:
        return Gauge(
            "party_sync_actions_stream_partition_pending",
            "Stream mode, partitioned: entries of one partition delivered and not yet acknowledged",
            ["partition"],
            registry=self.registry,
        )

    @cached_property
    def stream_partition_lag(self) -> Gauge:
        return Gauge(
            "party_sync_actions_stream_partition_lag",
            "Stream mode, partitioned: entries of one partition not yet delivered to any worker",
            ["partition"],
            registry=self.registry,
        )

    @cached_property
    def stream_partition_consumers_active(self) -> Gauge:
        return Gauge(
            "party_sync_actions_stream_partition_consumers_active",
            "Stream mode, partitioned: consumers of the engine's group on one partition seen "
            "reading recently (0 while actions wait there: no worker reads that partition)",
            ["partition"],
            registry=self.registry,
        )

    # -- the engine link and the HTTP API --------------------------------------------------------
    def watch_link(self, transport: str, link: object) -> None:
        """Export ``link.failures`` as ``party_sync_engine_link_failures_total{transport}``."""
        LinkFailures(transport, link, self.registry)

    def count_request(self, request: web.Request, status: int, started: float) -> None:
        """One answered request (``status``, begun at ``time.perf_counter()`` ``started``) by
        method, route and status, with its latency. The route is the matched resource's template
        (``canonical``), never the raw path. Called by the server's edge middleware
        (``transport/edge.py``), which leaves upgraded WebSockets (sessions) uncounted."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else UNMATCHED
        method = request.method if request.method in METHODS else OTHER_METHOD
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_latency.labels(method, route).observe(time.perf_counter() - started)

    def received(self, type_: str) -> None:
        """One client message of ``type_`` (per message: a dict increment)."""
        self.messages_in.inc(type_)

    def sent(self, type_: str, recipients: int = 1) -> None:
        """A message of ``type_`` sent to ``recipients`` connections (counted once per event)."""
        self.messages_out.inc(type_, recipients)

    def render(self) -> bytes:
        """The exposition; under a flood of scrapes, the last one again (``ScrapeGate``)."""
        gate = self.scrapes
        if gate.fresh(time.monotonic()) or gate.last is None:
            gate.last = generate_latest(self.registry)
        return gate.last


# -- serve --workers N: one exposition for the whole group ----------------------------------------
#: The label that tells the workers of one ``serve --workers N`` group apart.
WORKER_LABEL = "worker"

#: Families that describe what every worker of a group sees alike (the actions stream, read from
#: Redis by each worker's monitor): given by one worker, the lowest-numbered that answered.
GROUP_WIDE: Final = ("party_sync_actions_stream_",)

#: The family the supervisor's counts replace (``merge_workers``' ``restarts``).
RESTARTS_FAMILY: Final = "party_sync_worker_restarts"


class WorkerRestarts(Collector):
    """``party_sync_worker_restarts_total``: how many times the supervisor restarted this worker
    (its slot: a restarted worker takes the same ``worker`` number)."""

    def __init__(self, restarts: int, registry: CollectorRegistry) -> None:
        self.restarts = restarts
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "party_sync_worker_restarts",
            "serve --workers: times the supervisor restarted this worker after it died",
            value=float(self.restarts),
        )


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge_workers(
    expositions: Sequence[tuple[int, bytes | None]],
    count: int,
    restarts: Mapping[int, int] | None = None,
) -> bytes:
    """One exposition of a ``serve --workers`` group from each worker's own (``None``: that
    worker did not answer, e.g. while it is restarted): every sample of every family gets the
    label ``worker``, and ``party_sync_workers`` (N) and ``party_sync_worker_up{worker}`` say
    which workers are in it; a ``GROUP_WIDE`` family is taken from the first worker that has it
    (by number). ``restarts``: the supervisor's restart count of each worker, reported for every
    worker, a dead one too (else each worker's own count, absent while it is down). Run at
    scrape time only (a parse of a few hundred lines each)."""
    families: dict[str, Metric] = {}
    given: dict[str, int] = {}  # a GROUP_WIDE family: the worker whose samples it has
    up = GaugeMetricFamily(
        "party_sync_worker_up",
        "serve --workers: 1 if this worker's metrics are in this scrape, 0 if it did not answer "
        "(dead, being restarted)",
        labels=[WORKER_LABEL],
    )
    for worker, text in expositions:
        up.add_metric([str(worker)], 0.0 if text is None else 1.0)
        if text is None:
            continue
        for family in text_string_to_metric_families(text.decode()):
            if restarts is not None and family.name == RESTARTS_FAMILY:
                continue
            shared = family.name.startswith(GROUP_WIDE)
            if shared and given.setdefault(family.name, worker) != worker:
                continue
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            for sample in family.samples:
                merged.samples.append(
                    Sample(
                        sample.name,
                        {**sample.labels, WORKER_LABEL: str(worker)},
                        sample.value,
                        sample.timestamp,
                        sample.exemplar,
                    )
                )
    extra: list[Metric] = []
    if restarts is not None:
        counted = CounterMetricFamily(
            RESTARTS_FAMILY,
            "serve --workers: times the supervisor restarted this worker after it died",
            labels=[WORKER_LABEL],
        )
        for worker in range(1, count + 1):
            counted.add_metric([str(worker)], float(restarts.get(worker, 0)))
        extra.append(counted)
    group = GaugeMetricFamily(
        "party_sync_workers", "serve --workers: serving processes of this group", value=count
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), *extra, group, up]))
    return generate_latest(registry)
