"""pytest fixtures of the party_sync suite (registered by the root conftest as a plugin).

- ``redis_server``: one private redis-server for the session; never the shared one on 6379.
- ``backend_kind``: runs a test once per backend (``memory``, ``redis``). With ``redis``, every
  in-process server the test starts (``servers.serve_in_process``) uses ``redis_server``, flushed
  before the test, so the embedded default and production cannot drift apart (one behaviour,
  two backends).
- ``redis`` and ``cluster``: the Redis tier's private server per test (tests flush, restart and
  kill it) and real ``party-sync serve`` nodes on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ps_testkit import servers
from ps_testkit.cluster import Cluster
from ps_testkit.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    kind: str = request.param
    if kind == "memory":
        yield kind
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
