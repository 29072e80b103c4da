"""config.load: flag > PARTY_SYNC_* environment variable > default; a bad value is a ConfigError."""

from __future__ import annotations

import argparse
import re
import string
from dataclasses import fields

import pytest
from hypothesis import given
from hypothesis import strategies as st
from party_sync.config import ENV_PREFIX, Settings, add_arguments, load, options, validate
from party_sync.protocol.errors import ConfigError


def parse_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults() -> None:
    settings = load(parse_flags(), env={})
    assert settings == Settings()
    assert (settings.host, settings.port, settings.redis_url) == ("127.0.0.1", 8080, None)
    assert settings.jwt_algorithms == ("HS256",)
    assert settings.allowed_origins == ()
    assert settings.dev_mode is True
    assert load(None, env={}) == Settings()


def test_environment_variables_are_parsed_to_their_types() -> None:
    env = {
        "PARTY_SYNC_PORT": "9000",
        "PARTY_SYNC_PRESENCE_GRACE": "2.5",
        "PARTY_SYNC_REDIS_URL": "redis://localhost:6379/0",
        "PARTY_SYNC_JWT_SECRET": "k" * 32,
        "PARTY_SYNC_JWT_ALGORITHMS": " HS256 , HS512,, ",
        "PARTY_SYNC_ALLOWED_ORIGINS": "https://a.example,https://b.example",
        "PARTY_SYNC_LOG_FORMAT": "text",
        "UNRELATED": "x",
        "port": "1",  # not prefixed: ignored
    }
    settings = load(parse_flags(), env=env)
    assert settings.port == 9000
    assert settings.presence_grace == 2.5
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.jwt_algorithms == ("HS256", "HS512")
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.log_format == "text"
    assert settings.dev_mode is False


def test_a_flag_beats_the_environment_which_beats_the_default() -> None:
    env = {
        "PARTY_SYNC_PORT": "9000",
        "PARTY_SYNC_HOST": "0.0.0.0",  # noqa: S104 (a value under test, nothing listens)
        "PARTY_SYNC_HEARTBEAT": "5",
        "PARTY_SYNC_ALLOWED_ORIGINS": "https://env.example",
    }
    flags = parse_flags("--port", "9100", "--allowed-origins", "https://flag.example")
    settings = load(flags, env=env)
    assert settings.port == 9100  # flag
    assert settings.allowed_origins == ("https://flag.example",)  # flag
    assert settings.host == "0.0.0.0"  # noqa: S104 (env)
    assert settings.heartbeat == 5.0  # env
    assert settings.max_replay == 300  # default


def test_an_empty_flag_value_still_overrides_the_environment() -> None:
    env = {"PARTY_SYNC_ALLOWED_ORIGINS": "https://env.example"}
    assert load(parse_flags("--allowed-origins", ""), env=env).allowed_origins == ()


def test_the_process_environment_is_the_default_source(monkeypatch: pytest.MonkeyPatch) -> None:
    for _, env_var, _, _ in options():
        monkeypatch.delenv(env_var, raising=False)
    monkeypatch.setenv("PARTY_SYNC_MAX_REPLAY", "12")
    assert load().max_replay == 12


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", ""),
        ("PORT", "80.5"),
        ("HISTORY_SIZE", "1e3"),
        ("PRESENCE_TTL", "soon"),
        ("RATE_BURST", "1,5"),
    ],
)
def test_an_unparsable_environment_value_is_a_config_error_naming_the_variable(
    var: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=f"{ENV_PREFIX}{var}"):
        load(parse_flags(), env={ENV_PREFIX + var: value})


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("PORT", "0", "port"),
        ("PORT", "65536", "port"),
        ("MAX_MESSAGE_BYTES", "1023", "max_message_bytes"),
        ("SEND_BUFFER_BYTES", "1000", "send_buffer_bytes"),
        ("PRESENCE_GRACE", "-1", "presence_grace"),
        ("PRESENCE_TTL", "0", "presence_ttl"),
        ("PRESENCE_TTL", "nan", "presence_ttl"),
        ("ACTION_TIMEOUT", "0", "action_timeout"),
        ("HISTORY_SIZE", "0", "history_size"),
        ("HISTORY_MAX_BYTES", "-1", "history_max_bytes"),
        ("HISTORY_MAX_AGE", "-0.5", "history_max_age"),
        ("HISTORY_MAX_AGE", "inf", "history_max_age"),
        ("HISTORY_MAX_AGE", "nan", "history_max_age"),
        ("MAX_REPLAY", "-1", "max_replay"),
        ("HEARTBEAT", "0", "heartbeat"),
        ("RATE_LIMIT", "0", "rate_limit must be > 0"),
        ("RATE_BURST", "0.5", "rate_burst must be >= 1"),  # (0.5 is positive: named, probe)
        ("LOG_FORMAT", "xml", "log_format"),
        ("ACTIONS_STREAM_PARTITIONS", "0", "actions_stream_partitions"),
        ("ACTIONS_STREAM_PARTITIONS", "1025", "actions_stream_partitions"),
        ("REDIS_WRITE_DELAY", "-0.001", "redis_write_delay"),
        ("REDIS_WRITE_DELAY", "0.05", "redis_write_delay"),
        ("REDIS_WRITE_DELAY", "nan", "redis_write_delay"),
        ("CLIENT_WRITE_DELAY", "-0.001", "client_write_delay"),
        ("CLIENT_WRITE_DELAY", "0.05", "client_write_delay"),
        ("CLIENT_WRITE_DELAY", "nan", "client_write_delay"),
        ("HANDSHAKE_RATE_PER_USER", "-1", "handshake_rate_per_user"),
        ("HANDSHAKE_BURST_PER_USER", "0.5", "handshake_burst_per_user"),
        ("LOG_LEVEL", "LOUD", "log_level must be one of DEBUG"),
        ("ALLOWED_ORIGINS", "*", "'\\*' is not a wildcard here"),
        ("ALLOWED_ORIGINS", "https://a.example,https://b.example/", "not an origin"),
        ("ALLOWED_ORIGINS", "a.example", "not an origin"),
        ("REDIS_URL", "notaurl", "redis_url: Redis URL must specify"),
        ("REDIS_URL", "redis://h:notaport/0", "redis_url: Port could not be cast"),
        # no resolver finds such a host: said at start, not as "Redis unavailable" for ever
        ("REDIS_URL", "redis://red is:6379/0", "redis_url: the host is neither a name"),
        ("REDIS_URL", "redis://u:p@ho%5Dst:6379/0", "redis_url: the host is neither a name"),
        ("ENGINE_URL", "notaurl", "engine_url must be an http:// or https:// URL with a host"),
        ("ENGINE_URL", "ftp://h/x", r"engine_url must be .* \(got ftp://\.\.\.\)"),
        ("ENGINE_URL", "http:///actions", "engine_url must be"),
        ("ENGINE_NOTICE_URL", "localhost:8000", "engine_notice_url must be"),
        ("ENGINE_URL", "http://[::1/x", "engine_url is not a URL"),
        ("ENGINE_URL", "http://host:99999/x", "engine_url is not a URL"),
        ("ALLOWED_ORIGINS", "http://[x", "not an origin"),
        # no browser sends these (RFC 6454): a silent 403 for the page that was meant
        ("ALLOWED_ORIGINS", "HTTPS://App.Example", "it sends 'https://app.example'"),
        ("ALLOWED_ORIGINS", "https://app.example:443", "it sends 'https://app.example'"),
        ("ALLOWED_ORIGINS", "http://a.example:80", "it sends 'http://a.example'"),
        ("ALLOWED_ORIGINS", "http://user:pw@app.example", "an origin has no user or password"),
        ("ALLOWED_ORIGINS", "https://bücher.example", r"in ASCII \(punycode, xn--\.\.\.\)"),
        ("ALLOWED_ORIGINS", "https://faß.de", r"in ASCII \(punycode"),
        ("ALLOWED_ORIGINS", "https://*.example.com", "no wildcard or space"),
        ("ALLOWED_ORIGINS", "https://ex ample.com", "no wildcard or space"),
        ("ALLOWED_ORIGINS", "https://BÜCHER.example", r"in ASCII \(punycode"),
        (
            "ALLOWED_ORIGINS",
            "https://[0:0:0:0:0:0:0:1]",
            r"browsers send 'https://\[::1\]'|browsers send https://\[::1\]",
        ),
        ("ALLOWED_ORIGINS", "http://[0:0::1]:8080", r"browsers send http://\[::1\]:8080"),
        (
            "ALLOWED_ORIGINS",
            "http://127.000.0.1:8080",
            r"browsers send http://127\.0\.0\.1:8080|four decimal",
        ),
        ("ALLOWED_ORIGINS", "https://[::ffff:127.0.0.1]", r"\[::ffff:7f00:1\]"),
        ("ALLOWED_ORIGINS", "https://127.1", "four decimal numbers"),
        ("ALLOWED_ORIGINS", "https://0x7f.0.0.1", "four decimal numbers"),
        ("ALLOWED_ORIGINS", "https://%41pp.example", "no percent-encoding"),
        ("ALLOWED_ORIGINS", "wss://app.example", "http:// or https://"),
        ("JWT_ALGORITHMS", "RS256", "jwt_algorithms must be among HS256, HS384, HS512"),
        ("JWT_ALGORITHMS", "HS256,none", "jwt_algorithms must be among"),
        ("JWT_ALGORITHMS", ",", "jwt_algorithms must be among"),
        ("ENGINE", "bogus", "engine must be MODULE:ATTR, got 'bogus'"),
        ("ENGINE", "module:", "engine must be MODULE:ATTR"),
        ("TELEGRAM_BOT_TOKEN", "bogus", "telegram_bot_token must be a bot token"),
        ("TELEGRAM_BOT_TOKEN", "abc:def", "telegram_bot_token must be a bot token"),
        ("TELEGRAM_BOT_TOKEN", "123:", "telegram_bot_token must be a bot token"),
        ("WORKER_TIMEOUT", "2", "worker_timeout must be 0 \\(no watch\\) or at least 3"),
    ],
)
def test_an_out_of_range_environment_value_is_a_config_error(
    var: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load(parse_flags(), env={ENV_PREFIX + var: value})


@pytest.mark.parametrize(
    "origins",
    [
        "https://app.example",
        "http://localhost:8080",
        "https://app.example:8443",
        "http://[::1]:3000",
        "http://127.0.0.1:8080",
        "https://xn--bcher-kva.example",
        "https://v2.example.com",
    ],
)
def test_origins_as_browsers_send_them_are_accepted(origins: str) -> None:
    assert load(parse_flags(), env={ENV_PREFIX + "ALLOWED_ORIGINS": origins}).allowed_origins


def test_an_action_record_must_outlive_the_actions_deadline() -> None:
    env = {ENV_PREFIX + "ACTION_RECORD_TTL": "5", ENV_PREFIX + "ACTION_TIMEOUT": "10"}
    with pytest.raises(ConfigError, match="action_record_ttl must be at least action_timeout"):
        load(parse_flags(), env=env)
    assert load(parse_flags(), env={**env, ENV_PREFIX + "ACTION_TIMEOUT": "5"}).action_timeout == 5


def test_settings_a_deployment_leaves_empty_or_unused_are_not_refused() -> None:
    """An empty bot token is no bot token (sign-in answers 503), as before; the engine spec is
    checked only where an engine is hosted in-process; the watchdog can be turned off."""
    env = {
        ENV_PREFIX + "TELEGRAM_BOT_TOKEN": "",
        ENV_PREFIX + "ENGINE": "",
        ENV_PREFIX + "ENGINE_URL": "http://engine.test/actions",
        ENV_PREFIX + "WORKER_TIMEOUT": "0",
    }
    settings = load(parse_flags(), env=env)
    assert not settings.telegram_bot_token and settings.worker_timeout == 0
    with pytest.raises(ConfigError, match="engine must be MODULE:ATTR"):
        load(parse_flags(), env={ENV_PREFIX + "ENGINE": ""})  # in-process: it is the engine


def test_a_refused_bot_token_is_never_quoted() -> None:
    with pytest.raises(ConfigError) as raised:
        load(parse_flags(), env={ENV_PREFIX + "TELEGRAM_BOT_TOKEN": "not-a-token-SECRETPART"})
    assert "SECRETPART" not in str(raised.value)


def test_a_bad_url_error_never_repeats_the_url() -> None:
    """A URL may carry a password: the error names the setting and the scheme only."""
    for var in ("ENGINE_URL", "REDIS_URL"):
        with pytest.raises(ConfigError) as refused:
            load(parse_flags(), env={ENV_PREFIX + var: "mailto://user:hunter2@host/"})
        assert "hunter2" not in str(refused.value)


def test_a_lower_case_log_level_is_taken() -> None:
    assert load(parse_flags(), env={ENV_PREFIX + "LOG_LEVEL": "debug"}).log_level == "debug"


@pytest.mark.parametrize(
    ("env", "flags", "says"),
    [
        ({"RATE_LIMIT": "0"}, (), "rate_limit must be > 0 (set by PARTY_SYNC_RATE_LIMIT)"),
        ({}, ("--rate-limit", "0"), "rate_limit must be > 0 (set by --rate-limit)"),
        ({}, ("--port", "0"), "port must be 1..65535 (set by --port)"),
        ({"PRESENCE_GRACE": "nan"}, (), "(set by PARTY_SYNC_PRESENCE_GRACE)"),
        # two settings named, both given, one way each
        (
            {"ACTION_RECORD_TTL": "5"},
            ("--action-timeout", "10"),
            "(set by PARTY_SYNC_ACTION_RECORD_TTL, --action-timeout)",
        ),
        # one given, one by default: only the given one is named
        ({"ACTION_RECORD_TTL": "5"}, (), "run again) (set by PARTY_SYNC_ACTION_RECORD_TTL)"),
        # the message's prose ("--workers 1", "PARTY_SYNC_REDIS_URL") is not a setting's name
        ({"WORKERS": "2"}, (), "PARTY_SYNC_REDIS_URL) (set by PARTY_SYNC_WORKERS)"),
    ],
)
def test_a_refused_value_is_named_by_the_flag_or_variable_that_gave_it(
    env: dict[str, str], flags: tuple[str, ...], says: str
) -> None:
    """New-user probe: ``PARTY_SYNC_RATE_LIMIT=0`` was refused as "rate_limit must be > 0", in
    no words the user had typed; the flag or variable is named now (never its value)."""
    with pytest.raises(ConfigError) as refused:
        load(parse_flags(*flags), env={ENV_PREFIX + k: v for k, v in env.items()})
    assert str(refused.value).endswith(says)


@pytest.mark.parametrize(
    "url",
    [
        "mailto://user:hunter2@host/",
        # urlsplit's ValueError was a traceback, not a configuration error (fix-check probe)
        "rediss://user:hunter2@[::1/0",
        "redis://:hunter2@[::1",
    ],
)
def test_a_refused_url_names_its_variable_and_never_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(parse_flags(), env={ENV_PREFIX + "REDIS_URL": url})
    assert "hunter2" not in str(refused.value)
    assert str(refused.value).endswith("(set by PARTY_SYNC_REDIS_URL)")


def test_an_out_of_range_flag_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="port"):
        load(parse_flags("--port", "0"), env={})


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--redis-cluster", "maybe", "not a boolean: 'maybe'"),
        ("--telegram-test-env", "maybe", "not a boolean: 'maybe'"),
        ("--workers", "abc", "not a number of workers or auto: 'abc'"),
        ("--port", "eighty", "not a whole number: 'eighty'"),
        ("--action-timeout", "soon", "not a number: 'soon'"),
    ],
)
def test_an_unparsable_flag_value_says_what_the_environment_variable_says(
    flag: str, value: str, says: str
) -> None:
    """Deployment probe: ``--redis-cluster maybe`` said "invalid _bool value: 'maybe'" (the
    parse function's name), ``--workers abc`` "invalid workers_count value", where the same
    value in the environment said what is wrong."""
    with pytest.raises(argparse.ArgumentError) as refused:
        parse_flags(flag, value)
    assert str(refused.value) == f"argument {flag}: {says}"
    env = ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()
    with pytest.raises(ConfigError, match=f"^{env}: {says}$"):
        load(parse_flags(), env={env: value})


@pytest.mark.parametrize(
    ("port", "ok"), [(1, True), (65535, True), (0, False), (65536, False), (-5, False)]
)
def test_validate_port_bounds(port: int, ok: bool) -> None:
    if ok:
        validate(Settings(port=port))
    else:
        with pytest.raises(ConfigError):
            validate(Settings(port=port))


def test_every_setting_has_a_flag_an_env_var_and_help() -> None:
    rows = options()
    assert len(rows) == len(fields(Settings))
    for (flag, env_var, help_text, default), f in zip(rows, fields(Settings), strict=True):
        assert flag == "--" + f.name.replace("_", "-")
        assert env_var == "PARTY_SYNC_" + f.name.upper()
        assert help_text.strip()
        assert default == getattr(Settings(), f.name)
    assert ("--jwt-previous-secret", "PARTY_SYNC_JWT_PREVIOUS_SECRET") in {
        (flag, env_var) for flag, env_var, _, _ in rows
    }


def test_the_event_loop_setting_picks_uvloop_or_the_stock_loop() -> None:
    import asyncio
    import sys

    import uvloop
    from party_sync.server import event_loop_factory

    assert load(None, env={}).event_loop == "auto"
    assert load(parse_flags("--event-loop", "asyncio"), env={}).event_loop == "asyncio"
    with pytest.raises(ConfigError, match="event_loop"):
        load(None, env={"PARTY_SYNC_EVENT_LOOP": "tokio"})
    assert event_loop_factory("auto") is uvloop.new_event_loop
    assert event_loop_factory("uvloop") is uvloop.new_event_loop
    assert event_loop_factory("asyncio") is asyncio.new_event_loop
    modules = dict(sys.modules)
    try:
        sys.modules["uvloop"] = None  # type: ignore[assignment]  # as if it were not installed
        assert event_loop_factory("auto") is asyncio.new_event_loop
        with pytest.raises(ConfigError, match="not installed"):
            event_loop_factory("uvloop")
    finally:
        sys.modules.clear()
        sys.modules.update(modules)


def test_history_bounds_come_from_flags_and_environment_and_reach_the_backend() -> None:
    from party_sync.server import backend_settings

    defaults = load(parse_flags(), env={})
    assert (defaults.history_size, defaults.history_max_bytes, defaults.history_max_age) == (
        300,
        262_144,
        1800.0,
    )
    env = {ENV_PREFIX + "HISTORY_MAX_BYTES": "0", ENV_PREFIX + "HISTORY_MAX_AGE": "0"}
    unbounded = load(parse_flags("--history-size", "50"), env=env)  # 0 = no bound
    limits = backend_settings(unbounded)
    assert (limits.history_size, limits.history_max_bytes, limits.history_max_age) == (50, 0, 0.0)
    given = load(parse_flags("--history-max-bytes", "4096", "--history-max-age", "90"), env=env)
    assert (given.history_max_bytes, given.history_max_age) == (4096, 90.0)


def test_redis_cluster_is_a_flag_alone_or_with_a_value_or_the_environment() -> None:
    url = ("--redis-url", "redis://127.0.0.1:7000")
    assert load(parse_flags(*url, "--redis-cluster"), env={}).redis_cluster is True
    assert load(parse_flags(*url, "--redis-cluster", "false"), env={}).redis_cluster is False
    env = {"PARTY_SYNC_REDIS_URL": "redis://h:7000", "PARTY_SYNC_REDIS_CLUSTER": "true"}
    assert load(parse_flags(), env=env).redis_cluster is True
    assert load(parse_flags(), env={}).redis_cluster is False  # the default


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"PARTY_SYNC_REDIS_SENTINELS": "h:26379", "PARTY_SYNC_REDIS_SENTINEL_MASTER": "m"},
            "exclude each other",
        ),
        ({}, "redis_cluster needs redis_url"),
        ({"PARTY_SYNC_REDIS_URL": "redis://h:7000/2"}, "only database 0"),
        ({"PARTY_SYNC_REDIS_URL": "unix:///tmp/redis.sock"}, "not unix://"),
    ],
)
def test_redis_cluster_refuses_sentinel_no_url_another_db_and_unix_sockets(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load(parse_flags(), env={"PARTY_SYNC_REDIS_CLUSTER": "true", **env})


def test_more_cluster_nodes_reach_every_cluster_client() -> None:
    from party_sync.backends.redis_backend import RedisBackend
    from party_sync.backends.redis_connect import RedisTarget
    from party_sync.server import make_backend

    env = {
        ENV_PREFIX + "REDIS_URL": "redis://:pw@10.0.0.1:7000",
        ENV_PREFIX + "REDIS_CLUSTER": "true",
        ENV_PREFIX + "REDIS_CLUSTER_NODES": "10.0.0.2:7001, [::1]:7002",
        ENV_PREFIX + "JWT_SECRET": "x" * 32,
    }
    settings = load(parse_flags(), env=env)
    assert RedisTarget.of(settings).seeds == (("10.0.0.2", 7001), ("::1", 7002))
    backend = make_backend(settings)  # nothing connects before start()
    assert isinstance(backend, RedisBackend)
    startup = backend.client.nodes_manager.startup_nodes  # type: ignore[union-attr]
    assert sorted(startup) == ["10.0.0.1:7000", "10.0.0.2:7001", "::1:7002"]
    assert {n.connection_kwargs.get("password") for n in startup.values()} == {"pw"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({ENV_PREFIX + "REDIS_URL": "redis://h:1"}, "redis_cluster_nodes needs redis_cluster"),
        (
            {ENV_PREFIX + "REDIS_URL": "redis://h:1", ENV_PREFIX + "REDIS_CLUSTER": "true"},
            "redis_cluster_nodes: not host:port",
        ),
    ],
)
def test_more_cluster_nodes_need_a_cluster_and_addresses(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(parse_flags(), env={ENV_PREFIX + "REDIS_CLUSTER_NODES": "h:1,nope", **env})


def test_the_redis_write_delay_is_off_by_default_and_reaches_the_script_batcher() -> None:
    from party_sync.backends.redis_backend import RedisBackend
    from party_sync.server import make_backend

    assert load(parse_flags(), env={}).redis_write_delay == 0.0
    env = {ENV_PREFIX + "REDIS_URL": "redis://127.0.0.1:1/0", ENV_PREFIX + "JWT_SECRET": "x" * 32}
    settings = load(parse_flags("--redis-write-delay", "0.002"), env=env)
    backend = make_backend(settings)  # nothing connects before start()
    assert isinstance(backend, RedisBackend)
    assert backend.options.write_delay == 0.002
    assert backend.scripts.batcher._delay == 0.002


def test_a_max_replay_above_the_history_is_warned_about() -> None:
    """Deployment probe: ``--max-replay 1000`` beside ``history_size`` 300 was taken without a
    word; a resume can replay only what the history holds."""
    from party_sync.server import capped_replay

    assert capped_replay(Settings()) is None  # the defaults: 300 and 300
    assert capped_replay(Settings(max_replay=10, history_size=50)) is None
    warning = capped_replay(Settings(max_replay=1000))
    assert warning is not None
    assert warning.startswith("max_replay (1000) is above history_size (300)")


def test_short_secrets_are_warned_about_and_generated_ones_are_not() -> None:
    from party_sync.server import weak_secrets

    weak = weak_secrets(Settings(jwt_secret="abc", api_key="k", jwt_previous_secret="x" * 31))
    assert [w.split(" ", 1)[0] for w in weak] == [
        "PARTY_SYNC_JWT_SECRET",
        "PARTY_SYNC_JWT_PREVIOUS_SECRET",
        "PARTY_SYNC_API_KEY",
    ]
    assert all("abc" not in w for w in weak)  # a warning never shows the secret
    assert "(1 character)" in weak[2] and "(3 bytes)" in weak[0]
    import secrets

    strong = Settings(jwt_secret=secrets.token_urlsafe(32), api_key=secrets.token_urlsafe(24))
    assert weak_secrets(strong) == [] and weak_secrets(Settings()) == []
    # by the configured algorithms' hash sizes (RFC 7518 §3.2): 40 bytes are short for HS512
    for algorithms, least in ((("HS384",), 48), (("HS256", "HS512"), 64)):
        [short] = weak_secrets(Settings(jwt_secret="q" * 40, jwt_algorithms=algorithms))
        assert f"use at least {least} random bytes" in short and "(40 bytes)" in short
        assert weak_secrets(Settings(jwt_secret="q" * least, jwt_algorithms=algorithms)) == []


FLOAT_SETTINGS = [env for _, env, _, default in options() if isinstance(default, float)]


@pytest.mark.parametrize("env_var", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_no_duration_or_rate_setting_takes_infinity_or_nan(env_var: str, value: str) -> None:
    # "inf" of redis_probe_interval or party_ttl once started a server that never probed
    # again or handed Redis an expiry it refuses; every float setting is checked alike.
    name = env_var.removeprefix(ENV_PREFIX).lower()
    with pytest.raises(ConfigError, match=name):
        load(parse_flags(), env={env_var: value})


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("PORT", "abc", "not a whole number: 'abc'"),
        ("HEARTBEAT", "soon", "not a number: 'soon'"),
        ("TELEGRAM_BOT_ID", "bogus", "not a whole number: 'bogus'"),
    ],
)
def test_a_setting_that_is_not_a_number_says_so_in_plain_words(
    name: str, value: str, said: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load(parse_flags(), env={ENV_PREFIX + name: value})
    assert str(raised.value) == f"{ENV_PREFIX}{name}: {said}"


NUMBER_SETTINGS = [
    env
    for _, env, _, default in options()
    if isinstance(default, int | float) and not isinstance(default, bool)
]


@pytest.mark.parametrize("env_var", NUMBER_SETTINGS)
@pytest.mark.parametrize("value", ["1e308", "99999999999999999999999"])
def test_no_setting_takes_a_number_too_large_to_use(env_var: str, value: str) -> None:
    """A huge value passed the lower bounds, then overflowed where it was used: every connection
    failed (aiohttp's reader, the history's age in ms), a TTL for Redis, a timer thread, while
    /readyz said ready. Each is a configuration error, naming the setting."""
    name = env_var.removeprefix(ENV_PREFIX).lower()
    if isinstance(Settings.__dataclass_fields__[name].default, int) and "e" in value:
        value = str(10**30)  # an int setting refuses the float notation as it is
    with pytest.raises(ConfigError, match=name):
        load(parse_flags(), env={env_var: value})


@pytest.mark.parametrize(
    "name", ["party_ttl", "presence_ttl", "action_record_ttl", "history_max_age", "action_timeout"]
)
def test_a_duration_kept_in_milliseconds_is_not_rounded_to_nothing(name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be at least 0.001"):
        load(parse_flags(), env={ENV_PREFIX + name.upper(): "0.0001"})
    # a millisecond is taken (an action's record outliving its deadline: action_timeout too)
    also = {ENV_PREFIX + "ACTION_TIMEOUT": "0.001"} if name == "action_record_ttl" else {}
    load(parse_flags(), env={ENV_PREFIX + name.upper(): "0.001", **also})


def test_an_empty_host_is_refused_not_every_interface() -> None:
    with pytest.raises(ConfigError, match="host must not be empty"):
        load(parse_flags(), env={ENV_PREFIX + "HOST": ""})
    with pytest.raises(ConfigError, match="host must not be empty"):
        load(parse_flags("--host", " "), env={})


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("redis://127.0.0.1:6379/abc", False),
        ("redis://127.0.0.1:6379/0/x", False),
        ("redis://127.0.0.1:6379/3", True),
        ("redis://127.0.0.1:6379", True),
        ("redis://127.0.0.1:6379/", True),
        ("unix:///run/redis.sock?db=2", True),
        ("unix://:se#cret@/run/redis.sock", False),  # the '#' ends the URL: no path left
    ],
)
def test_a_redis_url_whose_path_is_not_a_db_number_is_refused(url: str, ok: bool) -> None:
    """redis-py ignores such a path and writes to db 0 while the log names the path."""
    if ok:
        validate(Settings(redis_url=url))
    else:
        with pytest.raises(ConfigError, match=r"database number|percent-encoded") as raised:
            validate(Settings(redis_url=url))
        assert url not in str(raised.value) and "cret" not in str(raised.value)


@pytest.mark.parametrize(
    "origin",
    [
        "https://user:s3cr3t@app.example",
        "https://user:s3cr3t@app.example/",  # another mistake in it too
        "https://user:s3cr3t@app.example:99999",
        "https://user:s3cr3t@app.example/path",
        "HTTPS://user:s3cr3t@App.Example",
        "user:s3cr3t@app.example",  # no scheme (re-check probe)
        "https://user:s3/cr3t@app.example",  # a "/" in the password
        "https://user:s3#cr3t@app.example",
        "https:/user:s3cr3t@app.example",
    ],
)
def test_an_origin_with_a_password_is_refused_without_quoting_it(origin: str) -> None:
    with pytest.raises(ConfigError, match="no user or password") as raised:
        load(parse_flags(), env={ENV_PREFIX + "ALLOWED_ORIGINS": f"https://ok.example,{origin}"})
    assert "cr3t" not in str(raised.value) and "pp.example" in str(raised.value).lower()


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_jwt_secret_is_refused_not_development_mode(value: str) -> None:
    """``PARTY_SYNC_JWT_SECRET=`` (a production secret that expanded to nothing) started a
    development server, whose ``/api/v1/dev/token`` hands anyone a token (deploy probe)."""
    with pytest.raises(ConfigError, match="jwt_secret must not be empty") as raised:
        load(parse_flags(), env={ENV_PREFIX + "JWT_SECRET": value})
    assert "PARTY_SYNC_JWT_SECRET" in str(raised.value)
    assert load(parse_flags(), env={}).dev_mode  # unset: development mode, as documented


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_actions_stream_is_refused(value: str) -> None:
    """The nodes would append to a stream no ``engine-worker`` can be told to read (its
    ``--stream`` refuses an empty name): every action would end in ``action_timeout``."""
    with pytest.raises(ConfigError, match="actions_stream must not be empty"):
        load(parse_flags(), env={ENV_PREFIX + "ACTIONS_STREAM": value})
    with pytest.raises(ConfigError, match="actions_stream must not be empty"):
        load(parse_flags("--actions-stream", value), env={})


@given(
    st.text(alphabet=string.ascii_letters + string.digits + "+=", min_size=8, max_size=12),
    st.sampled_from("/#?@:% "),
    st.text(alphabet=string.ascii_letters + string.digits + "+=", min_size=8, max_size=12),
    st.sampled_from(["", "user:"]),
)
def test_a_redis_url_refused_never_repeats_its_password(
    head: str, odd: str, tail: str, user: str
) -> None:
    """A password with a character that must be percent-encoded, not encoded (a base64 one holds
    ``/``): redis-py's parse error quoted the part before it ("Port could not be cast to integer
    value as '<head>'"; redis variants probe). Refused or not, no part of it is said."""

    def said(head: str, tail: str) -> str:
        try:
            validate(Settings(redis_url=f"redis://{user}:{head}{odd}{tail}@127.0.0.1:6379/0"))
        except ConfigError as exc:
            return str(exc)
        return ""

    # The answer does not depend on the password's letters: it is the same for another password
    # of the same shape. (Not "no piece of it is in the answer": hypothesis draws from the
    # module's own words, and a password "password" is in every hint about passwords.)
    assert said(head, tail) == said("x" * len(head), "y" * len(tail))


@pytest.mark.parametrize(
    "url",
    [
        "redis://:#Secr3tA@127.0.0.1:6379/0",  # no host left: localhost:6379, no password
        "redis://:?Secr3tB@127.0.0.1:6379/0",
        "redis://user:#Secr3tC@127.0.0.1:6379/0",  # host "user"
        "redis://u:23555#Secr3tD@127.0.0.1:6379/0",  # host "u", port 23555: logged
        "redis://:23555?abc=Secr3tE@127.0.0.1:6379/0",  # an option "abc": named
        "unix://:pa/Secr3tF@/run/redis.sock",  # the socket path "/Secr3tF@/run/...": logged
    ],
)
def test_a_password_not_encoded_is_refused_whole(url: str) -> None:
    """Redis variants probe: a password beginning with # or ? left no host (redis-py used
    localhost:6379 without a password), and other positions turned parts of it into the host,
    the port, an option or the socket path, each then printed."""
    with pytest.raises(ConfigError, match="percent-encoded") as raised:
        validate(Settings(redis_url=url))
    assert "Secr3t" not in str(raised.value) and "23555" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("rediss://:pw@h:1/0?ssl_min_version=TLSv1_2", "Invalid value for 'ssl_min_version'"),
        ("rediss://:pw@h:1/0?ssl_ca_certs=/nonexistent/ca.pem", "ssl_ca_certs names no readable"),
        ("unix://:pw@/run/redis@1/redis.sock?db=2", None),  # an '@' in a socket path
    ],
)
def test_an_option_s_value_is_named_with_credentials_too(url: str, said: str | None) -> None:
    if said is None:
        validate(Settings(redis_url=url))
        return
    with pytest.raises(ConfigError, match=re.escape(said)):
        validate(Settings(redis_url=url))
