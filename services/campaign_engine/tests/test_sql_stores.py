"""The SQL stores' own duties: choosing a store from a URL, the versioned schema, clear failures."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from contextlib import closing
from pathlib import Path

import psycopg
import pytest
from campaign_engine.engine import create_engine
from campaign_engine.sql_drivers import PostgresRunStore, SqliteRunStore
from campaign_engine.sql_store import LATEST_VERSION, SqlRunStore
from campaign_engine.store import (
    DEFAULT_DATABASE_URL,
    InMemoryRunStore,
    StoreUnavailable,
    open_store,
    redact,
    scrub,
)
from campaign_engine.testing import RecordingPublisher


def execute(url: str, statement: str) -> list[tuple[object, ...]]:
    """Run one statement on the database at ``url`` behind the store's back; its rows."""
    if url.startswith("sqlite:///"):
        with closing(sqlite3.connect(url[len("sqlite:///") :])) as conn, conn:
            return list(conn.execute(statement).fetchall())
    with psycopg.connect(url, autocommit=True) as pg:
        cursor = pg.execute(statement.encode())
        return list(cursor.fetchall()) if cursor.description else []


def test_create_engine_picks_the_store_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    default = create_engine({}).store
    assert isinstance(default, SqliteRunStore)
    assert default.url == DEFAULT_DATABASE_URL == "sqlite:///campaign_engine.sqlite3"
    assert list(tmp_path.iterdir()) == []  # nothing is created before the engine starts
    url = "CAMPAIGN_ENGINE_DATABASE_URL"
    assert isinstance(create_engine({url: "memory://"}).store, InMemoryRunStore)
    sqlite = create_engine({url: "sqlite:////var/lib/ce/runs.db"}).store
    assert isinstance(sqlite, SqliteRunStore) and sqlite.path == Path("/var/lib/ce/runs.db")
    pg = create_engine({url: "postgresql://ce:s3cret@db:5432/ce"}).store
    assert isinstance(pg, PostgresRunStore) and pg.url == "postgresql://ce:***@db:5432/ce"
    assert isinstance(create_engine({url: "postgres://db/ce"}).store, PostgresRunStore)
    with pytest.raises(ValueError, match="unsupported database URL 'redis://x:\\*\\*\\*@h/0'"):
        create_engine({url: "redis://x:pw@h/0"})
    with pytest.raises(ValueError, match="sqlite:///PATH"):
        open_store("sqlite://relative.db")


def test_redact_hides_only_the_password() -> None:
    assert (
        redact("postgresql://u:p@h:5/d?sslmode=require")
        == "postgresql://u:***@h:5/d?sslmode=require"
    )
    assert redact("postgresql://u@h/d") == "postgresql://u@h/d"
    assert redact("sqlite:///a.db") == "sqlite:///a.db"


@pytest.mark.parametrize("password", ["Secr3tA/xx", "Secr3t#B", "Secr3t?C=1", "Se@cr3tD:99"])
def test_a_password_not_encoded_is_hidden_whole(password: str) -> None:
    """Outside probe: ``postgresql://u:Secr3tA/xx@host/db`` was shown whole in the engine's
    start error (urlsplit takes the '/' for the end of the host part); a driver's message may
    quote a piece of it (as a host or port) too."""
    url = f"postgresql://u:{password}@127.0.0.1:1/db"
    assert redact(url) == "postgresql://u:***@127.0.0.1:1/db"
    said = scrub(f"failed to resolve host 'u': invalid port {password.split('/')[0]}", url)
    assert "Secr3t" not in said and "cr3t" not in said


async def test_the_schema_is_versioned_and_reopening_migrates_nothing(durable_url: str) -> None:
    stores = [open_store(durable_url), open_store(durable_url)]
    await asyncio.gather(*(s.open() for s in stores))  # two processes starting at once
    for store in stores:
        assert isinstance(store, SqlRunStore)
        assert await store.schema_version() == LATEST_VERSION == 1
        await store.close()
    again = open_store(durable_url)
    await again.open()
    assert isinstance(again, SqlRunStore) and await again.schema_version() == 1
    await again.close()
    # exactly one row per migration, whoever applied it
    assert execute(durable_url, "SELECT version FROM ce_schema_version") == [(1,)]


async def test_a_database_of_a_newer_engine_is_refused(durable_url: str) -> None:
    store = open_store(durable_url)
    await store.open()
    await store.close()
    execute(durable_url, "INSERT INTO ce_schema_version VALUES (99, 'later')")
    with pytest.raises(StoreUnavailable, match="schema version 99 is newer"):
        await store.open()


async def test_a_store_must_be_opened(durable_url: str) -> None:
    store = open_store(durable_url)
    with pytest.raises(RuntimeError, match="not open"):
        await store.load("run-1")
    await store.open()
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(RuntimeError, match="not open"):
        await store.load("run-1")


async def test_a_missing_sqlite_file_is_created_only_when_asked(tmp_path: Path) -> None:
    reader = SqliteRunStore(tmp_path / "nope.sqlite3", create=False)
    with pytest.raises(StoreUnavailable, match="no such database file"):
        await reader.open()
    writer = SqliteRunStore(tmp_path / "deep" / "er" / "runs.sqlite3")
    await writer.open()
    assert (tmp_path / "deep" / "er" / "runs.sqlite3").is_file()
    await writer.close()


async def test_an_engine_whose_database_is_unreachable_fails_to_start() -> None:
    url = "postgresql://postgres@127.0.0.1:1/postgres"
    engine = create_engine({"CAMPAIGN_ENGINE_DATABASE_URL": url})
    with pytest.raises(StoreUnavailable, match=re.escape(f"{url}: cannot connect")):
        await engine.start(RecordingPublisher())


async def test_a_postgres_database_that_does_not_exist_is_named(postgres_database: str) -> None:
    missing = postgres_database.rsplit("/", 1)[0] + "/no_such_database_here"
    with pytest.raises(StoreUnavailable, match="no_such_database_here"):
        await PostgresRunStore(missing).open()
