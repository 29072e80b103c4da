"""The start-up log names the backend and the engine transport actually used."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from party_sync.backends.memory import MemoryBackend
from party_sync.config import Settings
from party_sync.engine.health import HttpProbe, StaticHealth, public_url
from party_sync.engine.http_link import HttpEngineLink
from party_sync.engine.inprocess import InProcessLink
from party_sync.engine.interface import start_engine
from party_sync.engine.stream_link import StreamEngineLink
from party_sync.engine.stream_monitor import StreamMonitor
from party_sync.metrics import Metrics
from party_sync.protocol.errors import ConfigError, EngineStartError
from party_sync.server import (
    backend_settings,
    describe_backend,
    describe_engine,
    make_link,
    unused_engine_setting,
    watch_engine,
)
from ps_testkit.engines import ScriptedEngine
from ps_testkit.hosts import RecordingHost

REDIS = "redis://:hunter2@cache.local:6390/2?ssl_cert_reqs=none"


@pytest.mark.parametrize(
    ("url", "public"),
    [
        ("https://bot:s3cret@engine.example/actions?key=abc#x", "https://engine.example/actions"),
        ("http://127.0.0.1:8090/actions", "http://127.0.0.1:8090/actions"),
        (REDIS, "redis://cache.local:6390/2"),
        ("http://[::1]:8090/a", "http://[::1]:8090/a"),
        ("http://host:notaport/a", "<unparsable URL>"),
    ],
)
def test_public_url_drops_credentials_query_and_fragment(url: str, public: str) -> None:
    assert public_url(url) == public


async def test_each_transport_is_named_as_used_never_with_a_credential() -> None:
    settings = Settings(redis_url=REDIS, engine_url="http://u:p@engine.local:8090/actions?k=v")
    stream = StreamEngineLink(REDIS, "party_sync:actions", 1000)
    try:
        assert describe_engine(settings, stream) == (
            "stream",
            "Redis stream party_sync:actions on redis://cache.local:6390/2",
        )
    finally:
        await stream.close()
    http = HttpEngineLink("http://u:p@engine.local:8090/actions?k=v")
    assert describe_engine(settings, http) == (
        "http",
        "http://engine.local:8090/actions (this node claims)",
    )
    http.engine_claims = True  # engine_http_claim = engine
    assert describe_engine(settings, http)[1].endswith("(the engine host claims)")
    inprocess = InProcessLink(ScriptedEngine())
    transport, what = describe_engine(settings, inprocess)
    assert transport == "inprocess"
    assert "ScriptedEngine" in what and "campaign_engine:create_engine" in what
    assert describe_backend(Settings(), MemoryBackend(backend_settings(Settings()))) == "memory"


async def test_each_transport_gets_its_watcher() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0")
    stream = StreamEngineLink("redis://127.0.0.1:1/0", "party_sync:actions", 1000)
    monitor = watch_engine(settings, stream, Metrics("n"))
    try:
        assert isinstance(monitor, StreamMonitor)
    finally:
        await monitor.stop()
        await stream.close()
    probe = watch_engine(settings, HttpEngineLink("http://127.0.0.1:1/a"), Metrics("n"))
    assert isinstance(probe, HttpProbe)
    static = watch_engine(settings, InProcessLink(ScriptedEngine()), Metrics("n"))
    assert isinstance(static, StaticHealth)
    assert static.health().transport == "inprocess" and static.health().ok


def test_an_engine_set_for_a_node_that_does_not_host_one_is_warned_about() -> None:
    assert unused_engine_setting(Settings(), "stream") is None  # the default: nothing was set
    mine = Settings(engine="my_game.engine:create")
    assert unused_engine_setting(mine, "inprocess") is None  # hosted: used
    for transport in ("stream", "http"):
        warning = unused_engine_setting(mine, transport)
        assert warning is not None
        assert "my_game.engine:create is not used" in warning and transport in warning


def test_a_claim_mode_the_transport_does_not_use_is_warned_about() -> None:
    """``--engine-http-claim engine`` without an engine URL (new-user probe: silently ignored)."""
    engine = Settings(engine_http_claim="engine")
    for transport in ("inprocess", "stream"):
        warning = unused_engine_setting(engine, transport)
        assert warning is not None and "engine_http_claim engine is not used" in warning
    assert unused_engine_setting(engine, "http") is None
    assert unused_engine_setting(Settings(), "inprocess") is None  # node, the default


def test_an_engine_url_the_transport_does_not_use_is_warned_about_without_the_url() -> None:
    url = "http://user:s3cret@engine.internal:9000/actions"
    for transport in ("inprocess", "stream"):
        for settings in (Settings(engine_url=url), Settings(engine_notice_url=url)):
            warning = unused_engine_setting(settings, transport)
            assert warning is not None and "is set but not used" in warning
            assert "s3cret" not in warning and "engine.internal" not in warning
    assert unused_engine_setting(Settings(engine_url=url), "http") is None


def test_the_http_transport_needs_the_api_key_it_signs_its_deliveries_with() -> None:
    """Without a key the engine could not publish back, and its host refuses every delivery
    (they carry the key): one configuration error at start, not an engine that never answers."""
    url = "http://127.0.0.1:8090/actions"
    with pytest.raises(ConfigError, match="PARTY_SYNC_API_KEY"):
        make_link(Settings(engine_url=url))
    link = make_link(Settings(engine_url=url, api_key="k" * 24))
    assert isinstance(link, HttpEngineLink) and link._auth == {
        "Authorization": "Bearer " + "k" * 24
    }


async def test_an_engine_that_cannot_start_is_one_line_not_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reference engine with an unreachable database made serve print 55 lines of chained
    tracebacks; what start() raises is EngineStartError, naming it (main: one line, exit 1)."""

    class Unstartable(ScriptedEngine):
        async def start(self, publisher: Any) -> None:
            raise OSError("connection to 127.0.0.1:1 refused")

    with pytest.raises(EngineStartError, match=r"could not start: OSError: connection to"):
        await start_engine(Unstartable(), RecordingHost())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
