"""Redis settings that can never work stop the start with one line (exit 2), instead of a node
that starts and retries for ever: credentials Redis refuses, a database it does not have, a
Cluster node without ``redis_cluster`` (every party it does not hold refused with MOVED, and
``/readyz`` said ready) or ``redis_cluster`` on a Redis that is not one. A Redis that does not
answer yet is an outage, not a setting: the node starts and waits for it, as before."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from party_sync.backends.keys import ACTIONS_STREAM
from party_sync.backends.redis_connect import RedisTarget, refuse_misconfiguration
from party_sync.engine.stream_link import StreamEngineLink
from party_sync.protocol.errors import BackendUnavailable, ConfigError
from ps_testkit.engines import ScriptedEngine
from ps_testkit.hosts import make_action
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import free_port, make_settings, run_serve, serve_in_process

pytestmark = pytest.mark.redis

USER, PASSWORD = "probe", "right-password-0123"
#: docs/redis.md, "Credentials and ACL": the least a user needs.
LEAST_COMMANDS = (
    "+@read",
    "+@write",
    "+@scripting",
    "+@transaction",
    "+@pubsub",
    "+@stream",
    "+@connection",
    "+info",
    "+time",
    "+cluster|slots",
    "+cluster|nodes",
)
LEAST_KEYS = ("~party_sync:*",)
LEAST_CHANNELS = ("&party:*", "&run:*", "&party_sync:*")


@pytest.fixture
def with_user(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The shared private server with an ACL user of its own (the default user untouched)."""
    redis_server.command("ACL", "SETUSER", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all")
    for name, denied in (
        ("noscript", "-@scripting"),
        ("noinfo", "-info"),
        ("notime", "-time"),  # docs probe: the one clock silently off
        ("nomulti", "-@transaction"),  # docs probe: votes and the admin listing 503
        ("noexec", "-exec"),  # re-check: an EXECABORT hid the refusal
        ("nomultionly", "-multi"),  # re-check: "EXEC without MULTI" hid it
    ):
        redis_server.command(
            "ACL", "SETUSER", name, "on", f">{PASSWORD}", "~*", "&*", "+@all", denied
        )
    # no channels at all; no key under the prefix (it timed out for ever: redis variants probe)
    redis_server.command("ACL", "SETUSER", "nochan", "on", f">{PASSWORD}", "~*", "+@all")
    redis_server.command(
        "ACL", "SETUSER", "nokeys", "on", f">{PASSWORD}", "~other:*", "&*", "+@all"
    )
    # the prefix's keys but not the actions stream's; no stream commands (redis variants probe:
    # serve said ready and every action got backend_unavailable, the worker retried for ever)
    redis_server.command(
        "ACL", "SETUSER", "gameonly", "on", f">{PASSWORD}", "~game:*", "&*", "+@all"
    )
    redis_server.command(
        "ACL", "SETUSER", "nostream", "on", f">{PASSWORD}", "~*", "&*", "+@all", "-@stream"
    )
    # what docs/redis.md gives as the least a user needs
    redis_server.command(
        "ACL",
        "SETUSER",
        "least",
        "on",
        f">{PASSWORD}",
        *LEAST_KEYS,
        *LEAST_CHANNELS,
        *LEAST_COMMANDS,
    )
    try:
        yield redis_server
    finally:
        redis_server.command(
            "ACL",
            "DELUSER",
            USER,
            "noscript",
            "noinfo",
            "notime",
            "nomulti",
            "noexec",
            "nomultionly",
            "nochan",
            "nokeys",
            "least",
            "gameonly",
            "nostream",
        )


@pytest.fixture(scope="module")
def cluster_server() -> Iterator[RedisServer]:
    """One redis-server in cluster mode (no slots needed: only INFO and the CLUSTER reads are
    asked)."""
    node = RedisServer(extra=("--cluster-enabled", "yes"))
    node.start()
    try:
        yield node
    finally:
        node.close()


@pytest.fixture(scope="module")
def cluster_node(cluster_server: RedisServer) -> int:
    return cluster_server.port


async def refused_or_not(target: RedisTarget, refused: str | None) -> None:
    """``target`` passes (``refused`` None) or is a ``ConfigError`` matching ``refused`` that
    names no password."""
    if refused is None:
        await refuse_misconfiguration(target)
        return
    with pytest.raises(ConfigError, match=refused) as raised:
        await refuse_misconfiguration(target)
    assert "wrong-password" not in str(raised.value) and PASSWORD not in str(raised.value)


def url(server: RedisServer, credentials: str = "", db: int = 0) -> str:
    return f"redis://{credentials}127.0.0.1:{server.port}/{db}"


@pytest.mark.parametrize(
    ("credentials", "db", "refused"),
    [
        (f"{USER}:wrong-password@", 0, "refused redis_url's credentials"),
        ("nobody:whatever@", 0, "refused redis_url's credentials"),
        (f"{USER}:{PASSWORD}@", 99, "redis_url names database 99"),
        ("", 16, "redis_url names database 16"),
        (f"noscript:{PASSWORD}@", 0, "may not run what party_sync needs"),
        (f"noinfo:{PASSWORD}@", 0, "may not run what party_sync needs"),
        (f"notime:{PASSWORD}@", 0, "may not run what party_sync needs .*'time'"),
        (f"nomulti:{PASSWORD}@", 0, "may not run what party_sync needs .*'(watch|multi)'"),
        (f"noexec:{PASSWORD}@", 0, "may not run what party_sync needs .*'exec'"),
        (f"nomultionly:{PASSWORD}@", 0, "may not run what party_sync needs .*'multi'"),
        (f"nochan:{PASSWORD}@", 0, "may not run what party_sync needs .*channels &party"),
        (f"nokeys:{PASSWORD}@", 0, "may not run what party_sync needs .*keys ~party_sync"),
        (f"least:{PASSWORD}@", 0, None),
        (f"{USER}:{PASSWORD}@", 0, None),
        ("", 3, None),
    ],
)
async def test_settings_redis_says_can_never_work_are_a_configuration_error(
    with_user: RedisServer, credentials: str, db: int, refused: str | None
) -> None:
    target = RedisTarget(url(with_user, credentials, db))
    await refused_or_not(target, refused)


async def test_a_node_whose_user_has_the_least_acl_serves_every_route(
    with_user: RedisServer,
) -> None:
    """The least ACL docs/redis.md gives is enough for all a node does, not only for its start
    (docs probe: with it, votes and the admin listing were 503, the transactions refused): an
    action and its answer, a vote to its end, narration, the admin listing and a party."""
    key = "api-key-0123456789abcdef0123456789"
    auth = {"Authorization": f"Bearer {key}"}
    settings = make_settings(
        redis_url=url(with_user, f"least:{PASSWORD}@"), engine_transport="inprocess", api_key=key
    )
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        await a.until("party.join")
        await a.act("x1", "aria", "r1")
        assert (await a.until("action.result"))["payload"]["action_id"] == "x1"
        options = [{"id": "A", "label": "Left"}, {"id": "B", "label": "Right"}]
        vote = {"question": "Which way?", "options": options, "timeout_s": 30, "vote_id": "v1"}
        async with srv.http.post(
            f"{srv.base}/api/v1/parties/p1/votes", json=vote, headers=auth
        ) as r:
            assert r.status == 201, await r.text()
        for client in (a, b):
            await client.until("vote.started")
            await client.send({"type": "vote.cast", "payload": {"vote_id": "v1", "option": "B"}})
        assert (await a.until("vote.finished"))["payload"]["winner"] == "B"
        piece = {"stream_id": "s1", "index": 0, "text": "The gate", "done": True}
        async with srv.http.post(
            f"{srv.base}/api/v1/parties/p1/narration", json=piece, headers=auth
        ) as r:
            assert r.status == 202, await r.text()
        for path in ("/api/v1/parties", "/api/v1/parties/p1"):
            async with srv.http.get(srv.base + path, headers=auth) as r:
                assert r.status == 200, (path, await r.text())
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    ("credentials", "prefix", "refused"),
    [
        (f"gameonly:{PASSWORD}@", "game", r"keys ~game:\* and the actions stream's"),
        (f"nostream:{PASSWORD}@", "party_sync", "may not run what party_sync needs"),
        (f"least:{PASSWORD}@", "party_sync", None),
    ],
)
async def test_in_stream_mode_the_actions_stream_is_asked_too(
    with_user: RedisServer, credentials: str, prefix: str, refused: str | None
) -> None:
    target = RedisTarget(url(with_user, credentials), prefix=prefix)
    await refuse_misconfiguration(target)  # without the stream: these pass
    if refused is None:
        await refuse_misconfiguration(target, streams=("party_sync:actions",))
        return
    with pytest.raises(ConfigError, match=refused):
        await refuse_misconfiguration(target, streams=("party_sync:actions",))


@pytest.fixture(scope="module")
def unix_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, str]]:
    """A redis-server with a password, on a Unix socket too."""
    path = str(tmp_path_factory.mktemp("unix") / "redis.sock")
    server = RedisServer(extra=("--unixsocket", path))
    server.start()
    server.command("CONFIG", "SET", "requirepass", PASSWORD)  # (start() checks with a PING)
    try:
        yield server, path
    finally:
        server.close()


@pytest.mark.parametrize(
    ("credentials", "query", "refused"),
    [
        (":wrong-password@", "", "refused redis_url's credentials"),
        (f":{PASSWORD}@", "?db=99", "redis_url names database 99"),
        ("", "", "refused redis_url's credentials"),
        (f":{PASSWORD}@", "?db=3", None),
    ],
)
async def test_a_unix_socket_is_asked_the_same(
    unix_server: tuple[RedisServer, str], credentials: str, query: str, refused: str | None
) -> None:
    """Over a Unix socket redis-py wraps AUTH's and SELECT's refusals in a ConnectionError: they
    were taken for an outage, and the node retried for ever (redis variants probe)."""
    target = RedisTarget(f"unix://{credentials}{unix_server[1]}{query}")
    await refused_or_not(target, refused)


async def test_cluster_mode_must_match_the_redis(
    redis_server: RedisServer, cluster_node: int
) -> None:
    node = f"redis://127.0.0.1:{cluster_node}/0"
    with pytest.raises(ConfigError, match="names a node of a Redis Cluster: set redis_cluster"):
        await refuse_misconfiguration(RedisTarget(node))
    await refuse_misconfiguration(RedisTarget(node, cluster=True))
    with pytest.raises(ConfigError, match="redis_cluster is set, but"):
        await refuse_misconfiguration(RedisTarget(redis_server.url, cluster=True))


@pytest.mark.parametrize(
    ("denied", "refused"),
    [
        ((), None),
        (("-cluster|slots",), "may not run .*'cluster\\|slots'.*\\+cluster\\|slots"),
        (("-cluster|nodes",), "may not run .*'cluster\\|nodes'.*\\+cluster\\|nodes"),
    ],
)
async def test_on_a_cluster_the_least_acl_includes_its_slot_map_and_fence_reads(
    cluster_server: RedisServer, denied: tuple[str, ...], refused: str | None
) -> None:
    """The documented least ACL once lacked ``cluster|slots`` and ``cluster|nodes``: on a Cluster
    the node started, /readyz was 503 for ever and redis-py said "Cluster mode is not enabled on
    this node" (cluster probe). Now it is in the line, and a user without either is refused at
    start, naming what to grant."""
    cluster_server.command(
        "ACL", "SETUSER", "leastc", "reset", "on", f">{PASSWORD}", *LEAST_KEYS,
        *LEAST_CHANNELS, *LEAST_COMMANDS, *denied,
    )  # fmt: skip
    try:
        target = RedisTarget(
            f"redis://leastc:{PASSWORD}@127.0.0.1:{cluster_server.port}/0", cluster=True
        )
        await refused_or_not(target, refused)
    finally:
        cluster_server.command("ACL", "DELUSER", "leastc")


async def test_a_redis_that_does_not_answer_is_an_outage_not_a_setting() -> None:
    await refuse_misconfiguration(RedisTarget(f"redis://127.0.0.1:{free_port()}/0"), 0.5)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_with_a_password_redis_refuses_stops_with_one_line(
    with_user: RedisServer, workers: str
) -> None:
    proc = run_serve(
        env={
            "PARTY_SYNC_REDIS_URL": url(with_user, f"{USER}:not-it-0123@"),
            "PARTY_SYNC_WORKERS": workers,
        }
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "configuration error" in line]
    assert len(errors) == 1, proc.stderr  # with two workers too: the first starts alone
    assert errors[0].startswith(
        "party-sync: configuration error: Redis refused redis_url's credentials"
    )
    assert "Traceback" not in proc.stderr and "not-it-0123" not in proc.stderr


def test_serve_pointed_at_a_cluster_node_without_redis_cluster_stops(cluster_node: int) -> None:
    proc = run_serve(env={"PARTY_SYNC_REDIS_URL": f"redis://127.0.0.1:{cluster_node}/0"})
    assert proc.returncode == 2, proc.stderr
    assert "set redis_cluster (PARTY_SYNC_REDIS_CLUSTER=true" in proc.stderr.splitlines()[-1]


def test_engine_worker_asks_redis_before_it_loads_its_engine(
    with_user: RedisServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine (which may open its store, say a SQLite file) is not loaded for a worker that
    can never serve: the Redis error, not the engine's."""
    from party_sync import logs
    from party_sync.cli import main

    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
    bad = url(with_user, f"{USER}:not-it-0123@")
    assert main(["engine-worker", "nonexistent_module:thing", "--redis-url", bad]) == 2
    err = capsys.readouterr().err
    assert "Redis refused redis_url's credentials" in err and "nonexistent_module" not in err
    assert "not-it-0123" not in err


async def test_an_append_redis_refuses_is_one_warning_with_its_reply(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """XADD taken from a running node's user: players got backend_unavailable and the node
    logged only INFO lines (recheck probe; docs/redis.md: a refused command is "logged with
    Redis's reply"). Now one WARNING names the reply, and one INFO its end."""
    redis_server.command(
        "ACL", "SETUSER", "noxadd", "on", f">{PASSWORD}", "~*", "&*", "+@all", "-xadd"
    )
    link = StreamEngineLink(url(redis_server, f"noxadd:{PASSWORD}@"), ACTIONS_STREAM, 1000)
    caplog.set_level(logging.INFO, logger="party_sync.engine.stream_link")
    try:
        for action_id in ("x1", "x2"):
            with pytest.raises(BackendUnavailable):
                await link.submit(make_action(action_id))
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "NoPermissionError" in warnings[0] and "'xadd'" in warnings[0], warnings[0]
        assert PASSWORD not in warnings[0]
        redis_server.command("ACL", "SETUSER", "noxadd", "+xadd")
        await link.submit(make_action("x3"))
        assert any("takes appends" in r.getMessage() for r in caplog.records)
    finally:
        await link.close()
        redis_server.command("ACL", "DELUSER", "noxadd")
