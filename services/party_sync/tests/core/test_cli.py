"""``party-sync`` subcommands' argument errors, in process (the e2e tier runs the real commands)."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from party_sync.cli import main

#: ``party-sync token`` with every required flag (the claims' values do not matter here)
MINT = [
    "token",
    *["--party", "p", "--run", "r", "--character", "c", "--name", "C"],
    "--secret",
    "s" * 32,
]


@pytest.mark.parametrize("ttl", ["-5", "0", "nan", "inf"])
def test_token_refuses_a_lifetime_that_is_already_over(
    ttl: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*MINT, "--ttl", ttl]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--ttl must be a finite number > 0" in err


def test_token_mints_with_a_positive_lifetime(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*MINT, "--ttl", "60"]) == 0
    assert capsys.readouterr().out.count(".") == 2  # header.claims.signature


def test_token_display_name_defaults_to_the_character_id(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """README, Tokens: display_name is optional and defaults to the character id."""
    import jwt

    assert (
        main(["token", "--party", "p", "--run", "r", "--character", "aria", "--secret", "s" * 32])
        == 0
    )
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert claims["display_name"] == "aria"
    assert main([*MINT, "--ttl", "60"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert claims["display_name"] == "C"


def test_one_character_id_in_two_parties_is_two_users() -> None:
    """The per-user connection limit and the 1008 cooldown count by ``sub``: a player flooding
    as aria in one party must not lock out aria of another party."""
    import jwt
    from party_sync.auth import issue_token

    subs = {
        jwt.decode(
            issue_token(
                "s" * 32,
                party_id=party,
                campaign_run_id="r",
                character_id="aria",
                display_name="Aria",
                now=0.0,
                ttl=60.0,
            ),
            options={"verify_signature": False},
        )["sub"]
        for party in ("p1", "p2")
    }
    assert subs == {"character:p1/aria", "character:p2/aria"}


@pytest.mark.parametrize(
    ("flag", "most", "value"),
    [
        *[("--batch", 1000, v) for v in ["0", "-1", "1001", "2.5", "many", "1_000", "\u0663", ""]],
        *[("--actions-stream-partitions", 1024, v) for v in ["0", "1025", "1_000", "\u0663"]],
        *[("--concurrency", 256, v) for v in ["0", "-2", "257", "1.5", "\u0663"]],
    ],
)
def test_engine_worker_counts_are_whole_numbers_in_their_range(
    flag: str, most: int, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["engine-worker", "x:y", "--redis-url", "redis://h/0", flag, value])
    assert stopped.value.code == 2
    assert f"{flag}: must be a whole number 1..{most}" in capsys.readouterr().err


@pytest.mark.parametrize("by_flag", [True, False])
def test_engine_worker_names_the_flag_or_the_variable_that_gave_a_refused_value(
    by_flag: bool, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fix-check probe: ``engine-worker --redis-url redis://h/x`` said "(set by
    PARTY_SYNC_REDIS_URL)", a variable nobody had set (the worker passes its flags on as the
    environment)."""
    monkeypatch.delenv("PARTY_SYNC_REDIS_URL", raising=False)
    flags = ["--redis-url", "redis://h/x"] if by_flag else []
    if not by_flag:
        monkeypatch.setenv("PARTY_SYNC_REDIS_URL", "redis://h/x")
    assert main(["engine-worker", "x:y", *flags]) == 2
    said = "--redis-url" if by_flag else "PARTY_SYNC_REDIS_URL"
    assert capsys.readouterr().err.rstrip().endswith(f"(set by {said})")


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf", "soon"])
def test_engine_worker_claim_idle_must_be_a_finite_positive_number(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # 0 would take a live worker's entries at once; inf and nan failed later, in the loop
    with pytest.raises(SystemExit) as stopped:
        main(["engine-worker", "x:y", "--redis-url", "redis://h/0", "--claim-idle", value])
    assert stopped.value.code == 2
    assert "--claim-idle: must be a finite number > 0 seconds" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "65536", "-1", "http"])
def test_engine_http_port_must_be_a_port(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["engine-http", "x:y", "--port", value])
    assert stopped.value.code == 2
    assert "--port: must be a port 1..65535" in capsys.readouterr().err


@pytest.mark.parametrize(
    "urls", ["http://a:1,ftp://b", ",", "http://a:1, nohost", "http://a:1,http://[b"]
)
def test_engine_http_checks_every_party_sync_url(
    urls: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARTY_SYNC_API_KEY", "k" * 32)
    assert main(["engine-http", "x:y", "--party-sync-url", urls]) == 2
    assert "--party-sync-url" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "lan", "link"),
    [
        ("0.0.0.0", "192.168.1.20", "http://192.168.1.20:8080/demo?token="),  # noqa: S104
        ("0.0.0.0", None, "http://127.0.0.1:8080/demo?token="),  # noqa: S104
        ("::", "10.0.0.7", "http://10.0.0.7:8080/demo?token="),
        ("127.0.0.1", "192.168.1.20", "http://127.0.0.1:8080/demo?token="),
    ],
)
def test_a_server_on_every_address_prints_links_another_device_can_open(
    host: str, lan: str | None, link: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make run HOST=0.0.0.0`` is how two phones play: its links name this machine's address on
    the network, not 127.0.0.1 (which a phone cannot reach)."""
    from party_sync import cli, config

    monkeypatch.setattr(cli, "lan_address", lambda: lan)
    settings = config.Settings(host=host, port=8080, jwt_secret="s" * 32, api_key="k" * 32)
    lines = cli._demo_banner(settings, "memory", dev_mode=True)
    links = [line for line in lines if "/demo?token=" in line]
    assert len(links) == 2 and all(link in line for line in links)
    assert ("this machine can use 127.0.0.1" in lines[1]) == (
        lan is not None and host != "127.0.0.1"
    )


def test_the_banners_tokens_carry_no_iat_that_a_node_ahead_of_redis_would_date_ahead() -> None:
    """Clock probe: minted on the node's own clock before it read Redis's, a banner token of a
    node 2 min ahead was "not yet valid" at that very node for its first minutes. No ``iat``;
    ``exp`` 12 hours on, room for any skew."""
    import time

    import jwt
    from party_sync import cli, config

    settings = config.Settings(port=8080, jwt_secret="s" * 32)
    links = [line for line in cli._demo_banner(settings, "redis", False) if "/demo?token=" in line]
    assert len(links) == 2
    for link in links:
        token = link.rsplit("token=", 1)[1]
        found = jwt.decode(token, "s" * 32, algorithms=["HS256"], audience="party_sync")
        assert "iat" not in found and found["exp"] > time.time() + 11 * 3600


def test_the_lan_address_is_an_address_or_none() -> None:
    import ipaddress

    from party_sync.cli import lan_address

    found = lan_address()
    assert found is None or not ipaddress.ip_address(found).is_loopback


def test_token_with_a_short_secret_warns_in_its_own_words(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyJWT's InsecureKeyLengthWarning would raise here
        assert (
            main(["token", "--secret", "x", "--party", "p", "--run", "r", "--character", "c"]) == 0
        )
    out, err = capsys.readouterr()
    assert out.count(".") == 2  # the token
    assert "shorter than 32 bytes" in err and "InsecureKeyLength" not in err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = {"PARTY_SYNC_JWT_ALGORITHMS": "HS512"}
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            args = ["token", "--secret", "q" * 40, "--party", "p", "--run", "r", "--character", "c"]
            assert main(args) == 0
    assert "shorter than 64 bytes, HS512's hash size" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["serve"], ["token"], ["engine-http"], ["engine-worker"]])
def test_every_help_prints(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` of the command and of each subcommand prints its flags (a help text with a
    literal ``%`` once made ``serve --help`` a traceback: argparse formats help with %)."""
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--help" in out
    if command == ["serve"]:
        out = " ".join(out.split())  # argparse wraps the lines
        assert "11-23 % CPU" in out and "[env PARTY_SYNC_CLIENT_WRITE_DELAY]" in out


@pytest.mark.parametrize(
    ("argv", "prog"),
    [
        (["serve", "--port", "abc"], "party-sync serve"),
        (["bogus"], "party-sync"),
        (["engine-worker", "--no-such-flag"], "party-sync engine-worker"),
        (["serve", "--no-such-flag"], "party-sync serve"),
        ([*MINT, "--no-such-flag"], "party-sync token"),
        (["--no-such-flag", "serve"], "party-sync"),
    ],
)
def test_a_bad_flag_is_two_lines_not_the_whole_usage(
    argv: list[str], prog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped flag says what is wrong and where the options are, exit 2; argparse's default
    put ``serve``'s 57-line usage above the one line that matters."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(f"{prog}: error: ")
    assert lines[1] == f"(see {prog} --help)"


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"CAMPAIGN_ENGINE_SEED": "abc"}, "CAMPAIGN_ENGINE_SEED must be an integer"),
        ({"CAMPAIGN_ENGINE_VOTE_TIMEOUT": "-1"}, "CAMPAIGN_ENGINE_VOTE_TIMEOUT must be"),
        ({"PARTY_SYNC_ENGINE": "bogus"}, "engine must be MODULE:ATTR"),
        ({"PARTY_SYNC_ENGINE": "no_such_module_x:make"}, "cannot import engine module"),
        ({"PARTY_SYNC_JWT_ALGORITHMS": "RS256"}, "jwt_algorithms must be among"),
    ],
)
def test_serve_refuses_a_late_checked_setting_with_one_line_and_nothing_written(
    env: dict[str, str],
    said: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Development mode (no secret): a setting the engine or the verifier checks stops the start
    before the development secret is written (its WARNING was a second line; the file stayed)."""
    import os

    from party_sync import logs

    for name in list(os.environ):
        if name.startswith(("PARTY_SYNC_", "CAMPAIGN_ENGINE_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
    monkeypatch.setattr(logs, "protect", lambda *secrets: None)
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--port", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_serve_new_game_refused_for_a_setting_discards_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``--new-game`` with a setting that stops the start: the old game (its secret, its
    database) is still there, and the refusal is the one line (re-probe: both were gone)."""
    import os

    from party_sync import devmode, logs

    for name in list(os.environ):
        if name.startswith(("PARTY_SYNC_", "CAMPAIGN_ENGINE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CAMPAIGN_ENGINE_SEED", "abc")
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
    monkeypatch.setattr(logs, "protect", lambda *secrets: None)
    monkeypatch.chdir(tmp_path)
    devmode.load_or_create(tmp_path / devmode.DEV_SECRET_FILE)
    (tmp_path / "campaign_engine.sqlite3").write_bytes(b"the old game")
    before = sorted(path.name for path in tmp_path.iterdir())
    assert main(["serve", "--port", "9", "--new-game"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CAMPAIGN_ENGINE_SEED" in err[0], err
    assert sorted(path.name for path in tmp_path.iterdir()) == before


_URLSAFE = string.ascii_letters + string.digits + "-_"


@given(st.text(alphabet=_URLSAFE, min_size=1, max_size=43).filter(lambda s: s[0] != "-"))
def test_a_value_that_begins_with_a_dash_is_its_options(rest: str) -> None:
    """New-user probe: docs/engines.md's ``--api-key "$PARTY_SYNC_API_KEY"`` with a key from
    ``secrets.token_urlsafe`` failed once in 64 ("argument --api-key: expected one argument"):
    argparse read a key that begins with ``-`` as an option. Every command takes it as the
    value (a key beginning with ``--`` too, unless it names one of the command's options)."""
    from party_sync.cli import _parser

    for value in ("-" + rest, "--" + rest + "Z"):
        if value == "-h" or any(o.startswith(value) for o in ("--help", "--host", "--port")):
            continue
        serve = _parser().parse_command(["serve", "--api-key", value, "--port", "1234"])
        assert serve.api_key == value and serve.port == 1234
        serve = _parser().parse_command(["serve", "--jwt-secret", value])
        assert serve.jwt_secret == value
        host = _parser().parse_command(["engine-http", "x:y", "--api-key", value])
        assert host.api_key == value
        mint = _parser().parse_command([*MINT[:-1], value])
        assert mint.secret == value


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--api-key", "--port", "1"],  # the value forgotten: still refused
        ["serve", "--api-key", "--po", "1"],  # (an abbreviation of an option is one)
        ["serve", "--api-key"],
    ],
)
def test_an_option_after_an_option_that_wants_a_value_is_still_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "argument --api-key: expected one argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--bogus"], "--bogus"),
        (["--bogus=1", "-x"], "--bogus=1 -x"),
        (["--port", "1"], "--port"),  # (serve's, not party-sync's own)
        (["token", "--bogus"], "--bogus"),  # (it said which flags token requires instead)
        (["engine-worker", "--bogus"], "--bogus"),
        (["serve", "--port", "1", "--bogus=2"], "--bogus=2"),
    ],
)
def test_an_unknown_option_is_named_before_what_is_missing(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """New user probe: ``party-sync --bogus`` said only "the following arguments are required:
    command", never naming ``--bogus`` (re-check probe: ``token --bogus`` neither)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert f"unrecognized arguments: {named}\n" in capsys.readouterr().err
