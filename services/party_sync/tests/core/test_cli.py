"""``party-sync`` subcommands' argument errors, in process (the e2e tier runs the real commands)."""

from __future__ import annotations

import pytest
from party_sync.cli import main

MINT = [
    "token",
    "--party",
    "p",
    "--run",
    "r",
    "--character",
    "c",
    "--name",
    "C",
    "--secret",
    "s" * 32,
]


@pytest.mark.parametrize("ttl", ["-5", "0", "nan"])
def test_token_refuses_a_lifetime_that_is_already_over(
    ttl: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*MINT, "--ttl", ttl]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--ttl must be > 0" in err


def test_token_mints_with_a_positive_lifetime(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*MINT, "--ttl", "60"]) == 0
    assert capsys.readouterr().out.count(".") == 2  # header.claims.signature
