"""``party-sync engine-http``, ``engine-worker`` and ``token``: what they refuse at start (one line
on stderr, exit 2 for a setting, 1 for a port that cannot be listened on, never a traceback),
when ``engine-http`` says it is ready (once it listens), and what ``token`` signs with."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from party_sync import cli
from party_sync.auth import MAX_TIMESTAMP
from party_sync.cli import main
from ps_testkit import servers
from ps_testkit.servers import free_port

KEY = "api-key-0123456789abcdef0123456789"
SECRET = "s" * 64  # (long enough for HS512: PyJWT warns below)
ENGINE = "ps_testkit.engines:node_engine"
MINT = ["token", "--party", "p", "--run", "r", "--character", "c"]


def one_line(err: str) -> str:
    """``err`` is one line, no traceback: that line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def host_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from party_sync import logs, server

    monkeypatch.setenv("PS_ENGINE_DIR", str(tmp_path))  # (node_engine's)
    monkeypatch.setenv("PARTY_SYNC_API_KEY", KEY)
    monkeypatch.delenv("PARTY_SYNC_URL", raising=False)
    monkeypatch.delenv("PARTY_SYNC_SHUTDOWN_TIMEOUT", raising=False)
    # never a watchdog that ends the test process (os._exit) after a stop in process, nor the
    # process's logging replaced (the other tests' caplog) or secrets added to its redaction
    monkeypatch.setattr(server, "arm_exit_watchdog", lambda budget: None)
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
    monkeypatch.setattr(logs, "protect", lambda *secrets: None)


@pytest.fixture
def taken() -> Iterator[str]:
    """A port something listens on: a command refused before it binds never finds out (one that
    got as far as binding would fail there instead of serving for ever)."""
    port = servers.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield str(port)


# --- engine-http --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--path", "nolead"], "--path must start with '/'"),
        (["--notice-path", "notices"], "--notice-path must start with '/'"),
        (["--path", "/a", "--notice-path", "/a"], "--path and --notice-path must differ"),
        (["--path", "/{bad"], "--path '/{bad' cannot be a route"),
        (["--host", ""], "--host must not be empty"),
    ],
)
@pytest.mark.usefixtures("host_env")
def test_engine_http_refuses_routes_it_cannot_serve_up_front(
    flags: list[str], said: str, taken: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["engine-http", ENGINE, "--port", taken, *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and said in one_line(err)


@pytest.mark.parametrize("by", ["env", "flag"])
@pytest.mark.usefixtures("host_env")
def test_engine_http_refuses_a_party_sync_url_with_credentials(
    by: str, taken: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp cannot send the API key's Authorization header with credentials in the URL: every
    publish failed, after the engine applied the action. Refused at start, and never printed."""
    url = "http://127.0.0.1:9,http://user:hunter2@127.0.0.1:8080"
    argv = ["engine-http", ENGINE, "--port", taken]
    if by == "env":
        monkeypatch.setenv("PARTY_SYNC_URL", url)
    else:
        argv += ["--party-sync-url", url]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    line = one_line(err)
    assert "must not carry a user or password" in line and "API key" in line
    assert "hunter2" not in out + err


@pytest.mark.usefixtures("host_env")
def test_an_engine_error_with_line_breaks_of_its_own_is_printed_on_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database driver's message carries its hint on a second, tab-indented line."""
    from party_sync.engine import loader
    from party_sync.protocol.errors import EngineStartError

    def refuse(spec: str) -> None:
        raise EngineStartError(
            "the engine could not start: OperationalError: connection refused\n"
            "\tIs the server running on that host and accepting TCP/IP connections?"
        )

    monkeypatch.setattr(loader, "load_engine", refuse)
    assert main(["engine-http", ENGINE, "--port", str(free_port())]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.endswith(
        "connection refused Is the server running on that host and accepting TCP/IP connections?"
    ), line


@pytest.mark.parametrize("command", ["engine-http", "engine-worker"])
def test_the_engine_hosts_take_log_level_and_format_as_serve_does(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli._parser().parse_args(
        [command, "x:y", "--log-level", "debug", "--log-format", "text"]
    )
    assert (args.engine, args.log_level, args.log_format) == ("x:y", "DEBUG", "text")
    with pytest.raises(SystemExit) as stopped:
        main([command, "x:y", "--log-level", "LOUD"])
    assert stopped.value.code == 2
    assert "argument --log-level: must be one of DEBUG" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1e308", "inf", "-1", "soon"])
@pytest.mark.usefixtures("host_env")
def test_engine_http_refuses_a_shutdown_timeout_beyond_the_settings_bound(
    value: str, taken: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARTY_SYNC_SHUTDOWN_TIMEOUT", value)
    assert main(["engine-http", ENGINE, "--port", taken]) == 2
    assert "PARTY_SYNC_SHUTDOWN_TIMEOUT" in one_line(capsys.readouterr().err)


@pytest.mark.usefixtures("host_env")
def test_engine_http_on_a_port_in_use_is_one_line_and_exit_1(
    taken: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["engine-http", ENGINE, "--port", taken]) == 1
    out, err = capsys.readouterr()
    assert out == ""  # no ready line: it is not ready
    assert f"cannot listen on 127.0.0.1:{taken}" in one_line(err)


@pytest.mark.usefixtures("host_env")
def test_engine_http_on_a_port_in_use_writes_nothing_and_says_it_as_serve_does(
    taken: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The reference engine's factory creates its database in the working directory: a start
    refused for its port left a new campaign_engine.sqlite3 there, and said the error twice
    over ("cannot listen on …: error while attempting to bind on address …: address already
    in use"; new user probe). The port is checked first, as serve checks it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAMPAIGN_ENGINE_DATABASE_URL", raising=False)
    assert main(["engine-http", "campaign_engine:create_engine", "--port", taken]) == 1
    err = one_line(capsys.readouterr().err)
    assert err.endswith(f"cannot listen on 127.0.0.1:{taken}: Address already in use"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("host_env")
def test_engine_http_on_a_host_that_is_no_address_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["engine-http", ENGINE, "--host", "bad host", "--port", "1"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "cannot listen on bad host:1" in one_line(err)


class Ready(Exception):
    """Raised by the stand-in for the ready line's print, to end the command there."""


@pytest.mark.usefixtures("host_env")
def test_engine_http_prints_its_ready_line_once_it_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    """A script that waits for the ready line then connects must find the port open."""
    port = servers.free_port()
    seen: list[tuple[str, bool]] = []

    def ready(*values: Any, **_: Any) -> None:
        line = " ".join(map(str, values))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            listening = True
        except OSError:
            listening = False
        seen.append((line, listening))
        raise Ready

    monkeypatch.setattr(cli, "print", ready, raising=False)
    url = "http://127.0.0.1:9/?k=v"
    with pytest.raises(Ready):
        main(["engine-http", ENGINE, "--port", str(port), "--party-sync-url", url])
    [(line, listening)] = seen
    assert line.startswith(f"engine {ENGINE} on http://127.0.0.1:{port}/actions"), line
    assert listening, "the ready line came before the port listened"
    assert line.endswith("publishing to http://127.0.0.1:9/")  # (no query: it may hold a secret)


# --- engine-worker ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "option"),
    [
        (["--claim-idle", "1e308"], "--claim-idle"),
        (["--claim-idle", "1000000001"], "--claim-idle"),
        (["--stream", ""], "--stream"),
        (["--stream", "  "], "--stream"),
        (["--group", ""], "--group"),
        (["--consumer", ""], "--consumer"),
        (["--actions-stream-partitions", "0"], "--actions-stream-partitions"),
        (["--actions-stream-partitions", "99999999999999999999"], "--actions-stream-partitions"),
    ],
)
def test_engine_worker_refuses_an_option_out_of_bounds_naming_it(
    flags: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["engine-worker", "x:y", "--redis-url", "redis://127.0.0.1:9/0", *flags])
    assert stopped.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err


def test_engine_worker_refuses_an_empty_stream_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARTY_SYNC_ACTIONS_STREAM", "")
    with pytest.raises(SystemExit) as stopped:
        main(["engine-worker", "x:y", "--redis-url", "redis://127.0.0.1:9/0"])
    assert stopped.value.code == 2
    assert "argument --stream: must not be empty" in capsys.readouterr().err


def test_a_claim_idle_up_to_the_settings_bound_is_still_taken() -> None:
    args = cli._parser().parse_args(["engine-worker", "x:y", "--claim-idle", "1e9"])
    assert args.claim_idle == 1e9


# --- token --------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithms", ["HS512", "HS384,HS256", " HS512 , HS256"])
def test_token_signs_with_the_first_configured_algorithm(
    algorithms: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server configured with HS512 only refuses an HS256 token."""
    monkeypatch.setenv("PARTY_SYNC_JWT_ALGORITHMS", algorithms)
    first = algorithms.split(",")[0].strip()
    assert main([*MINT, "--secret", SECRET]) == 0
    token = capsys.readouterr().out.strip()
    assert jwt.get_unverified_header(token)["alg"] == first
    jwt.decode(token, SECRET, algorithms=[first], audience="party_sync")


def test_token_without_configured_algorithms_signs_hs256(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PARTY_SYNC_JWT_ALGORITHMS", raising=False)
    assert main([*MINT, "--secret", SECRET]) == 0
    assert jwt.get_unverified_header(capsys.readouterr().out.strip())["alg"] == "HS256"


@pytest.mark.parametrize("algorithms", ["RS256", "HS256,none", "ES256"])
def test_token_refuses_algorithms_a_server_would_refuse(
    algorithms: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARTY_SYNC_JWT_ALGORITHMS", algorithms)
    assert main([*MINT, "--secret", SECRET]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "PARTY_SYNC_JWT_ALGORITHMS" in one_line(err)


@pytest.mark.parametrize("ttl", ["1e308", "1e12", str(MAX_TIMESTAMP)])
def test_token_refuses_a_lifetime_past_the_latest_exp_a_server_takes(
    ttl: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/security.md: exp at most 253402300799 (year 9999); a later one is refused (401)."""
    assert main([*MINT, "--secret", SECRET, "--ttl", ttl]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--ttl is too long" in one_line(err)


def test_token_takes_a_lifetime_up_to_the_latest_exp(capsys: pytest.CaptureFixture[str]) -> None:
    ttl = MAX_TIMESTAMP - time.time() - 3600
    assert main([*MINT, "--secret", SECRET, "--ttl", str(ttl)]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert claims["exp"] <= MAX_TIMESTAMP


def test_token_refuses_an_empty_secret_rather_than_the_environments(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARTY_SYNC_JWT_SECRET", SECRET)
    assert main([*MINT, "--secret", ""]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--secret is empty" in one_line(err)


def test_token_with_the_development_secret_says_so_only_for_a_token_it_made(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A refused id is one line: no "signed with the development secret" before it."""
    from party_sync import devmode

    monkeypatch.delenv("PARTY_SYNC_JWT_SECRET", raising=False)
    monkeypatch.delenv("PARTY_SYNC_JWT_ALGORITHMS", raising=False)
    monkeypatch.chdir(tmp_path)
    kept = devmode.load_or_create(tmp_path / devmode.DEV_SECRET_FILE)
    assert main(["token", "--party", "p", "--run", "r", "--character", "not an id"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "signed with" not in one_line(err)
    assert main(MINT) == 0
    out, err = capsys.readouterr()
    assert jwt.decode(out.strip(), kept.jwt_secret, algorithms=["HS256"], audience="party_sync")
    assert f"signed with the development secret in {kept.path}" in one_line(err)


class Published(Exception):
    """What the stand-in publisher raises once it has its key."""


@pytest.mark.usefixtures("host_env")
def test_engine_http_beside_a_development_server_takes_its_api_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No key given, in the directory of a development ``serve``: the key that server keeps (a
    development server prints it only with --demo-tokens)."""
    from party_sync import devmode
    from party_sync.engine import http_host

    monkeypatch.delenv("PARTY_SYNC_API_KEY")
    monkeypatch.chdir(tmp_path)
    kept = devmode.load_or_create(tmp_path / devmode.DEV_SECRET_FILE)
    keys: list[str] = []

    def publisher(urls: Any, api_key: str) -> None:
        keys.append(api_key)
        raise Published

    monkeypatch.setattr(http_host, "ApiPublisher", publisher)
    argv = ["engine-http", ENGINE, "--port", str(servers.free_port())]
    with pytest.raises(Published):
        main([*argv, "--party-sync-url", "http://127.0.0.1:9"])
    assert keys == [kept.api_key]
    monkeypatch.setenv("PARTY_SYNC_API_KEY", KEY)  # a key given wins
    with pytest.raises(Published):
        main([*argv, "--party-sync-url", "http://127.0.0.1:9"])
    assert keys == [kept.api_key, KEY]


@pytest.mark.usefixtures("host_env")
def test_engine_http_without_a_key_says_where_a_development_server_keeps_its_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PARTY_SYNC_API_KEY")
    monkeypatch.chdir(tmp_path)
    argv = ["engine-http", ENGINE, "--party-sync-url", "http://127.0.0.1:9"]
    assert main([*argv, "--port", str(servers.free_port())]) == 2
    said = one_line(capsys.readouterr().err)
    assert "--api-key or PARTY_SYNC_API_KEY" in said and ".party_sync_dev_secret" in said


@pytest.mark.usefixtures("host_env")
def test_engine_http_beside_a_configured_server_never_takes_a_development_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With PARTY_SYNC_JWT_SECRET set the server is no development server: a stale dev file
    beside it is not its key (it would be refused: 401 on every publish)."""
    from party_sync import devmode

    monkeypatch.delenv("PARTY_SYNC_API_KEY")
    monkeypatch.setenv("PARTY_SYNC_JWT_SECRET", SECRET)
    monkeypatch.chdir(tmp_path)
    devmode.load_or_create(tmp_path / devmode.DEV_SECRET_FILE)
    argv = ["engine-http", ENGINE, "--party-sync-url", "http://127.0.0.1:9"]
    assert main([*argv, "--port", str(servers.free_port())]) == 2
    said = one_line(capsys.readouterr().err)
    assert "--api-key or PARTY_SYNC_API_KEY" in said and "PARTY_SYNC_JWT_SECRET is set" in said
