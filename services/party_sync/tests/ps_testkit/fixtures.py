"""pytest fixtures of the party_sync suite (registered by the root conftest as a plugin).

- ``redis_server``: one private redis-server for the session; never the shared one on 6379.
- ``backend_kind``: runs a test once per backend (``memory``, ``redis``). With ``redis``, every
  in-process server the test starts (``servers.serve_in_process``) uses ``redis_server``, flushed
  before the test, so the embedded default and production cannot drift apart (one behaviour,
  two backends).
- ``redis_cluster_kit``: one private Redis Cluster (three masters, no replicas) for the session,
  started only by the tests that use it. With ``PS_TEST_REDIS_CLUSTER=1``, ``backend_kind`` has a
  third kind, ``cluster``: the same tests on it (``make test-cluster``; every master flushed
  before each test). ``make test`` runs a representative subset on a cluster instead
  (tests/redis/test_cluster_backend.py).
- ``redis`` and ``cluster``: the Redis tier's private server per test (tests flush, restart and
  kill it) and real ``party-sync serve`` nodes on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ps_testkit import servers
from ps_testkit.cluster import Cluster
from ps_testkit.redis_cluster import RedisCluster
from ps_testkit.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_cluster_kit() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3, replicas=0) as running:
        yield running


#: ``PS_TEST_REDIS_CLUSTER=1``: every ``backend_kind`` test on a Redis Cluster too.
_KINDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]
if os.environ.get("PS_TEST_REDIS_CLUSTER") == "1":
    _KINDS.append(pytest.param("cluster", marks=pytest.mark.redis))


@pytest.fixture(params=_KINDS)
def backend_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    kind: str = request.param
    if kind == "memory":
        yield kind
        return
    if kind == "cluster":
        kit: RedisCluster = request.getfixturevalue("redis_cluster_kit")
        for master in kit.masters():
            master.call("FLUSHALL")
        servers.redis_url_for_tests, servers.redis_cluster_for_tests = kit.url, True
        try:
            yield kind
        finally:
            servers.redis_url_for_tests, servers.redis_cluster_for_tests = None, False
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    server.command("FLUSHALL")
    servers.redis_url_for_tests = server.url
    try:
        yield kind
    finally:
        servers.redis_url_for_tests = None


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def cluster(redis: RedisServer, tmp_path: Path) -> Cluster:
    return Cluster(redis, tmp_path)
