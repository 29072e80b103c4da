"""Development mode survives its own restart: the kept secret, and ``--new-game``."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from campaign_engine.engine import ENV_DATABASE_URL
from campaign_engine.store import DEFAULT_DATABASE_URL
from party_sync import devmode
from party_sync.config import Settings
from party_sync.server import with_dev_secret


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_secret_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / devmode.DEV_SECRET_FILE
    first = devmode.load_or_create(path)
    assert first.created
    assert mode(path) == 0o600
    assert len(first.jwt_secret) >= 32 and first.api_key
    again = devmode.load_or_create(path)
    assert not again.created
    assert (again.jwt_secret, again.api_key) == (first.jwt_secret, first.api_key)
    assert devmode.read_existing(path) == again


def test_a_readable_file_is_made_private_and_a_damaged_one_replaced(tmp_path: Path) -> None:
    path = tmp_path / devmode.DEV_SECRET_FILE
    first = devmode.load_or_create(path)
    path.chmod(0o644)
    assert devmode.load_or_create(path).jwt_secret == first.jwt_secret
    assert mode(path) == 0o600
    path.write_text("not json")
    assert devmode.read_existing(path) is None
    replaced = devmode.load_or_create(path)
    assert replaced.created and replaced.jwt_secret != first.jwt_secret
    assert mode(path) == 0o600


def test_settings_use_the_kept_secret_only_without_a_configured_one(tmp_path: Path) -> None:
    kept = devmode.load_or_create(tmp_path / devmode.DEV_SECRET_FILE)
    dev = with_dev_secret(Settings(), kept)
    assert (dev.jwt_secret, dev.api_key) == (kept.jwt_secret, kept.api_key)
    explicit_key = with_dev_secret(Settings(api_key="mine"), kept)
    assert explicit_key.api_key == "mine"
    production = Settings(jwt_secret="s" * 32)
    assert with_dev_secret(production, kept) is production
    assert with_dev_secret(Settings()).jwt_secret != kept.jwt_secret  # none kept: random


def test_party_sync_agrees_with_the_reference_engine_on_its_database() -> None:
    assert devmode.ENGINE_DATABASE_ENV == ENV_DATABASE_URL
    assert devmode.ENGINE_DEFAULT_DATABASE_URL == DEFAULT_DATABASE_URL


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("", Path("campaign_engine.sqlite3")),
        ("sqlite:///games/run.db", Path("games/run.db")),
        ("sqlite:////var/lib/ce.sqlite3", Path("/var/lib/ce.sqlite3")),
        ("memory://", None),
        ("postgresql://ce@db/ce", None),
    ],
)
def test_sqlite_path(url: str, path: Path | None) -> None:
    assert devmode.sqlite_path(url) == path


def test_new_game_discards_the_secret_and_the_reference_engines_database(tmp_path: Path) -> None:
    devmode.load_or_create(tmp_path / devmode.DEV_SECRET_FILE)
    for name in ("campaign_engine.sqlite3", "campaign_engine.sqlite3-wal", "keep.txt"):
        (tmp_path / name).write_text("x")
    removed = devmode.new_game(
        tmp_path, engine_in_process=True, engine_spec="campaign_engine:create_engine", environ={}
    )
    assert {p.name for p in removed} == {
        devmode.DEV_SECRET_FILE,
        "campaign_engine.sqlite3",
        "campaign_engine.sqlite3-wal",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_new_game_leaves_other_engines_data_alone(tmp_path: Path) -> None:
    (tmp_path / "campaign_engine.sqlite3").write_text("x")
    (tmp_path / "other.db").write_text("x")
    env = {ENV_DATABASE_URL: "sqlite:///other.db"}
    devmode.new_game(
        tmp_path, engine_in_process=False, engine_spec="campaign_engine:x", environ=env
    )
    devmode.new_game(tmp_path, engine_in_process=True, engine_spec="my_engine:make", environ=env)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["campaign_engine.sqlite3", "other.db"]
    devmode.new_game(tmp_path, engine_in_process=True, engine_spec="campaign_engine:x", environ=env)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["campaign_engine.sqlite3"]
