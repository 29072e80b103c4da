"""Prometheus metrics, one registry per server (so tests can run several servers in a process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


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


class Metrics:
    def __init__(self, node: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "party_sync_connections", "Open WebSocket connections on this node", registry=r
        )
        self.parties = Gauge(
            "party_sync_parties", "Parties with connections on this node", registry=r
        )
        self.messages_in = TypeCounter(
            "party_sync_messages_in_total", "Client messages received, by type", r
        )
        self.messages_out = TypeCounter(
            "party_sync_messages_out_total",
            "Messages sent to clients (one per recipient), by type",
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
            "per_user (WebSocket handshake answered 429), head_timeout (no complete request "
            "head in time)",
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
            "Connections closed by the server, by close code",
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
        # Redis mode (backends/redis_*): pub/sub continuity and health (issue 3, "Operable").
        self.pubsub_gaps = Counter(
            "party_sync_pubsub_gaps_total",
            "Party stream gaps on Redis pub/sub, by outcome (repaired: filled from history; "
            "resync: history could not fill it, clients were told to resync)",
            ["outcome"],
            registry=r,
        )
        self.redis_reconnects = Counter(
            "party_sync_redis_reconnects_total",
            "Redis pub/sub connections re-established, by cause (error / probe)",
            ["cause"],
            registry=r,
        )
        self.pubsub_lag = Histogram(
            "party_sync_pubsub_lag_seconds",
            "Round trip of the pub/sub liveness probe: publish on this node's channel → received",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.action_answers = Counter(
            "party_sync_action_answers_total",
            "Final answers the timeout sweep gave itself (timeout: nobody started the action "
            "by its deadline; resent: a final answer lost on the way, sent again)",
            ["outcome"],
            registry=r,
        )
        # Background work (issue 11, "Background work never dies"): a periodic task that meets an
        # error counts it here, logs once per episode and carries on.
        self.background_errors = Counter(
            "party_sync_background_errors_total",
            "Errors met by a periodic background task (which carried on), by task",
            ["task"],
            registry=r,
        )
        # The engine link, as this node sees it (issue 11, "The operator sees a missing or stuck
        # engine"; engine/stream_monitor.py, engine/health.py).
        self.engine_link_ok = Gauge(
            "party_sync_engine_link_ok",
            "1 while the engine link looks able to answer actions (stream: an active consumer "
            "and no stuck backlog; http: the engine URL reachable), else 0",
            registry=r,
        )
        self.engine_link_ok.set(1)
        self.stream_length = Gauge(
            "party_sync_actions_stream_length",
            "Stream mode: entries in the actions stream (acknowledged ones included, up to "
            "actions_stream_maxlen)",
            registry=r,
        )
        self.stream_pending = Gauge(
            "party_sync_actions_stream_pending",
            "Stream mode: entries delivered to an engine worker and not yet acknowledged",
            registry=r,
        )
        self.stream_lag = Gauge(
            "party_sync_actions_stream_lag",
            "Stream mode: entries not yet delivered to any engine worker (the whole stream "
            "while no consumer group exists)",
            registry=r,
        )
        self.stream_oldest_pending = Gauge(
            "party_sync_actions_stream_oldest_pending_seconds",
            "Stream mode: age of the oldest entry delivered and not yet acknowledged (0: none)",
            registry=r,
        )
        self.stream_oldest_undelivered = Gauge(
            "party_sync_actions_stream_oldest_undelivered_seconds",
            "Stream mode: age of the oldest entry no engine worker has received yet (0: none)",
            registry=r,
        )
        self.stream_consumers = Gauge(
            "party_sync_actions_stream_consumers",
            "Stream mode: consumers (engine workers, live or dead) in the engine's group",
            registry=r,
        )
        self.stream_consumers_active = Gauge(
            "party_sync_actions_stream_consumers_active",
            "Stream mode: consumers of the engine's group seen reading recently",
            registry=r,
        )
        self.info = Gauge("party_sync_node_info", "This node", ["node"], registry=r)
        self.info.labels(node).set(1)

    def received(self, type_: str) -> None:
        """One client message of ``type_`` (per message: a dict increment)."""
        self.messages_in.inc(type_)

    def sent(self, type_: str, recipients: int = 1) -> None:
        """A message of ``type_`` sent to ``recipients`` connections (counted once per event)."""
        self.messages_out.inc(type_, recipients)

    def render(self) -> bytes:
        return generate_latest(self.registry)
