"""Repository-wide test fixtures.

``validate_outgoing`` checks every message any in-process server sends during the test suite
against the schemas; a single invalid message fails the test that caused it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import orjson
import pytest
from hypothesis import settings

# No time limit per generated example: a test's example built four argument parsers in 27 ms
# alone and 257 ms under the suite's load on two cores, and failed as "unreliable timings"
# (a fresh-clone run). Tests never assert on time (their own timeouts bound a hang).
settings.register_profile("party_sync", deadline=None)
settings.load_profile("party_sync")

# The reference engine defaults to a SQLite file in the working directory; tests (and the server
# processes they start, which inherit this) keep engine state in memory unless a test names a
# database itself, so no test leaves files behind or sees another test's campaign runs.
os.environ["CAMPAIGN_ENGINE_DATABASE_URL"] = "memory://"

#: The party_sync fixtures (private redis-server, the memory/redis backend matrix, the Redis tier);
#: ``hangs``: every asyncio task's stack printed just before a test times out.
pytest_plugins = ["ps_testkit.fixtures", "ps_testkit.hangs", "ps_testkit.leaks"]


@pytest.fixture(autouse=True)
def validate_outgoing(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    if request.node.get_closest_marker("raw_frames"):  # a transport test sending non-protocol bytes
        yield
        return
    try:
        from party_sync.transport.sink import WebSocketSink
        from ps_testkit.client import check_server_message
    except ImportError:  # the campaign_engine suite does not need it
        yield
        return
    failures: list[str] = []
    original = WebSocketSink.send

    def checked_send(self: WebSocketSink, data: bytes) -> bool:
        try:
            check_server_message(orjson.loads(data))
        except Exception as exc:  # record, never break the server under test
            failures.append(f"{exc!r}: {data[:300]!r}")
        return original(self, data)

    monkeypatch.setattr(WebSocketSink, "send", checked_send)
    yield
    assert not failures, "the server sent invalid messages:\n" + "\n".join(failures)
