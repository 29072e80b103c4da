"""What ``/metrics`` exports: the process, the build, HTTP requests by route, engine link failures
by transport, and no Redis-only family on the embedded backend."""

from __future__ import annotations

import pytest
from party_sync.engine.stream_link import StreamEngineLink
from party_sync.metrics import Metrics, ScrapeGate
from party_sync.protocol.errors import BackendUnavailable
from prometheus_client.parser import text_string_to_metric_families
from ps_testkit.engines import ScriptedEngine
from ps_testkit.hosts import make_action
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import Running, free_port, make_settings, serve_in_process

KEY = "api-key-0123456789abcdef0123456789"

#: Families only the Redis mode has (pub/sub, the Redis connection, the actions stream).
REDIS_ONLY = ("party_sync_redis_", "party_sync_pubsub_", "party_sync_actions_stream_")


async def scrape(srv: Running) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``/metrics`` as {sample name: {sorted labels: value}}."""
    async with srv.http.get(srv.base + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


async def test_embedded_metrics_have_the_process_the_build_and_no_redis_family() -> None:
    async with serve_in_process(make_settings(), engine=ScriptedEngine()) as srv:
        samples = await scrape(srv)
    from party_sync import __version__

    assert samples["party_sync_build_info"] == {(("version", __version__),): 1.0}
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert samples[name][()] > 0, name
    assert "python_info" in samples
    assert samples["party_sync_engine_link_failures_total"] == {(("transport", "inprocess"),): 0}
    redis_only = sorted(name for name in samples if name.startswith(REDIS_ONLY))
    assert not redis_only, f"Redis-only families on the embedded backend: {redis_only}"


async def test_redis_mode_registers_its_families(redis: RedisServer) -> None:
    async with (
        serve_in_process(make_settings(redis_url=redis.url)) as srv,
        srv.http.get(srv.base + "/metrics") as resp,
    ):
        text = await resp.text()
    for family in (
        "party_sync_redis_reconnects_total",
        "party_sync_pubsub_gaps_total",
        "party_sync_pubsub_lag_seconds",
        "party_sync_redis_script_calls_total",
    ):
        assert f"# TYPE {family} " in text, family


async def test_http_requests_are_counted_by_route_template_and_status_with_latency() -> None:
    async with serve_in_process(make_settings(api_key=KEY)) as srv:
        async with srv.http.get(srv.base + "/healthz") as resp:
            assert resp.status == 200
        url = srv.base + "/api/v1/parties/p-secret-17/events"
        async with srv.http.post(url, json={}) as resp:
            assert resp.status == 401  # no key
        async with srv.http.post(url, json={}, headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status == 422
        async with srv.http.get(srv.base + "/no/such/page/42") as resp:
            assert resp.status == 404
        a, _ = await srv.join("aria")  # a WebSocket session is not a request to count
        await a.close()
        assert await srv.handshake_status({"token": "forged"}) == 401  # a refused handshake is
        samples = await scrape(srv)
    requests = samples["party_sync_http_requests_total"]
    events = "/api/v1/parties/{party_id}/events"
    assert requests[(("method", "GET"), ("route", "/healthz"), ("status", "200"))] == 1
    assert requests[(("method", "POST"), ("route", events), ("status", "401"))] == 1
    assert requests[(("method", "POST"), ("route", events), ("status", "422"))] == 1
    assert requests[(("method", "GET"), ("route", "unmatched"), ("status", "404"))] == 1
    routes = {dict(labels)["route"] for labels in requests}
    assert not any("p-secret-17" in r or "/no/such" in r for r in routes), routes  # no raw paths
    assert requests[(("method", "GET"), ("route", "/ws"), ("status", "401"))] == 1
    assert {dict(labels)["status"] for labels in requests if ("route", "/ws") in labels} == {"401"}
    latency = samples["party_sync_http_request_duration_seconds_count"]
    assert latency[(("method", "POST"), ("route", events))] == 2


async def test_http_engine_link_failures_are_counted() -> None:
    url = f"http://127.0.0.1:{free_port()}/actions"  # nothing listens there
    settings = make_settings(api_key=KEY, engine_url=url, engine_http_retries=1)
    async with serve_in_process(settings) as srv:
        a, _ = await srv.join("aria")
        await a.act("lost", "aria", "r1")
        assert (await a.until("system.error"))["payload"]["code"] == "engine_unavailable"
        await a.close()
        samples = await scrape(srv)
    assert samples["party_sync_engine_link_failures_total"] == {(("transport", "http"),): 2}


async def test_stream_link_failures_are_counted() -> None:
    link = StreamEngineLink(f"redis://127.0.0.1:{free_port()}/0", "test:actions", 100)
    try:
        with pytest.raises(BackendUnavailable):
            await link.submit(make_action("a-1"))
        assert link.failures == 1
    finally:
        await link.close()


async def test_invented_methods_cannot_grow_the_exposition() -> None:
    """The HTTP parser takes some thirty methods (WebDAV's, ``PURGE``, ``M-SEARCH``...): 1,428
    anonymous requests with every one of them grew ``/metrics`` from 5.6 to 154 KB (a scrape
    2 → 25 ms of the event loop, for good). Methods outside the standard ones are ``other``."""
    async with serve_in_process(make_settings()) as srv:
        before = len(await (await srv.http.get(srv.base + "/metrics")).read())
        answered = 0
        for method in ODD_METHODS:
            for path in ("/healthz", "/no/such/page", "/api/v1/parties/p1/events"):
                async with srv.http.request(method, srv.base + path) as resp:
                    answered += resp.status in (401, 404, 405)
        samples = await scrape(srv)
        after = len(await (await srv.http.get(srv.base + "/metrics")).read())
    assert answered >= 40  # most of them reached a route
    methods = {dict(labels)["method"] for labels in samples["party_sync_http_requests_total"]}
    assert methods == {"GET", "other"}
    other = [
        value
        for labels, value in samples["party_sync_http_requests_total"].items()
        if ("method", "other") in labels
    ]
    assert sum(other) >= answered
    assert after < before + 8_000  # a handful of new series, not one set per method


#: Methods llhttp (aiohttp's parser) accepts besides the standard ones.
ODD_METHODS = [
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "SEARCH",
    "PURGE",
    "MKACTIVITY",
    "CHECKOUT",
    "MERGE",
    "NOTIFY",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "REPORT",
    "LINK",
    "UNLINK",
    "BIND",
    "REBIND",
    "UNBIND",
    "ACL",
    "MKCALENDAR",
    "TRACE",
    "QUERY",
]


def test_a_flood_of_scrapes_renders_at_most_the_gates_rate() -> None:
    """A scrape renders the whole exposition on the event loop; 50 scrapes a second from one
    address took an honest player's ping from 1 ms to 2 s. Past ``RENDER_BURST`` scrapes (then
    ``RENDERS_PER_SECOND``), a scrape gets the last rendering again."""
    gate = ScrapeGate(rate=4.0, burst=8.0)
    renders = 0
    for tick in range(500):  # 50 scrapes a second for 10 s, virtual time
        if gate.fresh(tick / 50):
            gate.last = b"rendered"
            renders += 1
    assert renders <= 8 + 4 * 10 + 1
    metrics = Metrics("n1")
    first = metrics.render()
    metrics.build_info.labels("x").set(1)  # a change: the next scrapes see it (tokens left)
    assert metrics.render() != first


def _exposition(worker: int, *, stream_lag: float, restarts: int) -> bytes:
    return (
        "# HELP party_sync_connections Open connections\n"
        "# TYPE party_sync_connections gauge\n"
        f"party_sync_connections {10 * worker}\n"
        "# HELP party_sync_actions_stream_lag Stream mode: entries not yet delivered\n"
        "# TYPE party_sync_actions_stream_lag gauge\n"
        f"party_sync_actions_stream_lag {stream_lag}\n"
        "# HELP party_sync_actions_stream_partition_lag Stream mode, partitioned\n"
        "# TYPE party_sync_actions_stream_partition_lag gauge\n"
        f'party_sync_actions_stream_partition_lag{{partition="0"}} {stream_lag}\n'
        "# HELP party_sync_worker_restarts_total serve --workers: restarts\n"
        "# TYPE party_sync_worker_restarts_total counter\n"
        f"party_sync_worker_restarts_total {restarts}\n"
    ).encode()


def _samples(text: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def test_a_worker_group_reports_the_shared_stream_once_and_every_workers_restarts() -> None:
    """serve --workers (probe): every worker reads the one actions stream, so a sum over
    ``worker`` counted it N times; and a dead worker's restart count was absent (each worker
    served its own) until it came back, already counted."""
    from party_sync.metrics import merge_workers

    parts = [
        (1, None),  # down: being restarted
        (2, _exposition(2, stream_lag=7, restarts=0)),
        (3, _exposition(3, stream_lag=8, restarts=4)),
    ]
    samples = _samples(merge_workers(parts, 3, {1: 2, 2: 0, 3: 4}))
    assert samples["party_sync_connections"] == {(("worker", "2"),): 20, (("worker", "3"),): 30}
    assert samples["party_sync_actions_stream_lag"] == {(("worker", "2"),): 7}
    assert samples["party_sync_actions_stream_partition_lag"] == {
        (("partition", "0"), ("worker", "2")): 7
    }
    assert samples["party_sync_worker_restarts_total"] == {
        (("worker", "1"),): 2,
        (("worker", "2"),): 0,
        (("worker", "3"),): 4,
    }
    assert samples["party_sync_worker_up"] == {
        (("worker", "1"),): 0,
        (("worker", "2"),): 1,
        (("worker", "3"),): 1,
    }
    # Without the supervisor's counts (it is gone): each worker's own, as before.
    alone = _samples(merge_workers(parts, 3))
    assert alone["party_sync_worker_restarts_total"] == {
        (("worker", "2"),): 0,
        (("worker", "3"),): 4,
    }
