"""Fixtures for the campaign_engine suite: a recording publisher that also checks every event,
and the three stores every storage test runs against.

Every event an engine publishes in these tests is validated against the JSON Schemas in
``contracts/jsonschema/party_sync/`` (protocol-v1; one schema per message type, whole messages,
``$ref``s resolved through a registry of every file's ``$id``). If the schema files are not there,
only that validation is skipped — ``test_event_schemas.py`` then reports a clear skip — and the
behaviour tests still run.

Stores: ``store_url`` is parametrised over ``memory``, ``sqlite`` (a file in ``tmp_path``) and
``postgres``. For PostgreSQL the session creates a database of its own on the server at
``CAMPAIGN_ENGINE_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``),
each test gets a fresh schema in it, and the database is dropped at the end; if the server cannot
be reached, the PostgreSQL cases are skipped and say why.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jsonschema_rs
import psycopg
import pytest
from campaign_engine.campaign import Campaign, builtin_campaign, parse_campaign
from campaign_engine.engine import ReferenceEngine
from campaign_engine.store import RunStore, open_store, redact
from campaign_engine.testing import Published, RecordingPublisher, ScriptedRandom
from party_sync.engine import ENGINE_EVENT_TYPES, NarrationPiece
from psycopg import sql

CONTRACTS_DIR = Path(__file__).resolve().parents[3] / "contracts" / "jsonschema" / "party_sync"
#: What party_sync adds around a payload when it broadcasts an event.
TIMESTAMP = "2026-11-25T21:04:05.123Z"

EventCheck = Callable[[Published], None]


#: What an engine sends besides its events: live narration pieces (``EventPublisher.narrate``).
NARRATION_DELTA = "narration.delta"


class SchemaBook:
    """Compiled validators for the four event types an engine publishes, and narration.delta."""

    def __init__(self, directory: Path) -> None:
        documents: dict[str, dict[str, Any]] = {
            path.stem: json.loads(path.read_text(encoding="utf-8"))
            for path in sorted(directory.rglob("*.json"))
        }
        registry = jsonschema_rs.Registry(
            [(doc["$id"], doc) for doc in documents.values() if "$id" in doc]
        )
        self.validators = {
            name: jsonschema_rs.validator_for(documents[name], registry=registry)
            for name in [*ENGINE_EVENT_TYPES, NARRATION_DELTA]
        }

    def check(self, event: Published) -> None:
        """Validate ``event`` as the whole message clients receive; AssertionError if invalid."""
        message = {
            "type": event.type,
            "timestamp": TIMESTAMP,
            "trace_id": event.trace_id,
            "seq": event.seq,
            "payload": event.payload,
        }
        errors = [
            f"/{'/'.join(map(str, error.instance_path))}: {error.message}"
            for error in self.validators[event.type].iter_errors(message)
        ]
        assert not errors, f"{event.type} breaks its schema: {errors} in {event.payload}"

    def check_piece(self, piece: NarrationPiece) -> None:
        """Validate the ``narration.delta`` party_sync makes of a piece; AssertionError if not."""
        payload = {k: v for k, v in piece.to_json().items() if k != "trace_id"}
        message = {
            "type": NARRATION_DELTA,
            "timestamp": TIMESTAMP,
            "trace_id": piece.trace_id or "made-by-party-sync",  # the server always sets one
            "payload": payload,
        }
        errors = [
            f"/{'/'.join(map(str, error.instance_path))}: {error.message}"
            for error in self.validators[NARRATION_DELTA].iter_errors(message)
        ]
        assert not errors, f"narration.delta breaks its schema: {errors} in {payload}"


def missing_schemas() -> list[str]:
    """The schema files this suite needs but cannot find (empty: validation is on)."""
    types = [*sorted(ENGINE_EVENT_TYPES), NARRATION_DELTA]
    needed = [f"{name}.json" for name in types] + ["common.json"]
    return [name for name in needed if not (CONTRACTS_DIR / name).is_file()]


@pytest.fixture(scope="session")
def schema_book() -> SchemaBook | None:
    """The protocol's schemas, compiled, or None if they are absent."""
    if missing_schemas():
        return None
    return SchemaBook(CONTRACTS_DIR)


@pytest.fixture(scope="session")
def schema_check(schema_book: SchemaBook | None) -> EventCheck | None:
    """Validates one published event against its schema, or None if the schemas are absent."""
    return schema_book.check if schema_book is not None else None


@pytest.fixture
def live_check(schema_check: EventCheck | None) -> EventCheck:
    """The schema check; the schemas live in this repository, so their absence is a failure."""
    if schema_check is None:
        pytest.fail(
            f"{', '.join(missing_schemas())} not found in {CONTRACTS_DIR} (the protocol's JSON "
            "Schemas, which every published event must match)"
        )
    return schema_check


@pytest.fixture
def publisher(schema_check: EventCheck | None) -> RecordingPublisher:
    return RecordingPublisher(check=schema_check)


@pytest.fixture
async def engine(publisher: RecordingPublisher) -> ReferenceEngine:
    """The built-in campaign with seeded dice, started with the recording publisher."""
    engine = ReferenceEngine(builtin_campaign(), seed=7)
    await engine.start(publisher)
    return engine


def arena() -> dict[str, Any]:
    """A tiny campaign whose every die the tests script: a gate, a pit fight, two endings."""
    return {
        "id": "arena",
        "title": "The Arena",
        "start": "gate",
        "character": {"max_hp": 20, "attack": 4, "defense": 12, "damage": "1d8+2"},
        "scenes": [
            {
                "id": "gate",
                "number": 1,
                "title": "The Gate",
                "kind": "story",
                "difficulty": 12,
                "narration": "A gate, a pit beyond it.",
                "check": {"skill": "wits", "flag": "key", "success": "A key!"},
                "options": [
                    {"id": "enter", "label": "Enter the pit", "next": "pit"},
                    {
                        "id": "secret",
                        "label": "Unlock the side door",
                        "requires": "key",
                        "next": "won",
                    },
                    {
                        "id": "leap",
                        "label": "Leap the wall",
                        "check": {
                            "skill": "agility",
                            "difficulty": 10,
                            "on_success": "pit",
                            "on_partial": "pit",
                            "on_failure": "gate",
                            "harm_on_partial": 5,
                            "harm_on_failure": 50,
                        },
                    },
                ],
            },
            {
                "id": "pit",
                "number": 2,
                "title": "The Pit",
                "kind": "combat",
                "difficulty": 12,
                "narration": "A rat and an ogre.",
                "enemies": [
                    {
                        "id": "rat",
                        "name": "Rat",
                        "hp": 3,
                        "armor_class": 5,
                        "attack": 0,
                        "damage": "1d4",
                    },
                    {
                        "id": "ogre",
                        "name": "Ogre",
                        "hp": 30,
                        "armor_class": 15,
                        "attack": 5,
                        "damage": "1d10",
                    },
                ],
                "options": [{"id": "run", "label": "Run for the gate", "next": "gate"}],
                "on_victory": "won",
                "on_defeat": "lost",
            },
            {"id": "won", "number": 3, "title": "Won", "kind": "ending", "narration": "Cheers."},
            {"id": "lost", "number": 4, "title": "Lost", "kind": "ending", "narration": "Dust."},
        ],
    }


@pytest.fixture
def arena_campaign() -> Campaign:
    return parse_campaign(arena())


@pytest.fixture
def dice() -> ScriptedRandom:
    return ScriptedRandom()


@pytest.fixture
async def arena_engine(publisher: RecordingPublisher, dice: ScriptedRandom) -> ReferenceEngine:
    """The arena campaign with scripted dice (push the values each test needs)."""
    engine = ReferenceEngine(parse_campaign(arena()), rng=dice)
    await engine.start(publisher)
    return engine


# --- stores -------------------------------------------------------------------------------------

POSTGRES_ADMIN_URL = os.environ.get(
    "CAMPAIGN_ENGINE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def with_database(url: str, database: str, schema: str | None = None) -> str:
    """``url`` pointing at another database (and, if given, with ``schema`` as search_path)."""
    parts = urlsplit(url)._replace(path=f"/{database}")
    if schema is not None:
        parts = parts._replace(query=f"options=-csearch_path%3D{schema}")
    return urlunsplit(parts)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A database of this test session's own on the local PostgreSQL, dropped at the end."""
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        pytest.skip(
            f"PostgreSQL store tests skipped: cannot connect to {redact(POSTGRES_ADMIN_URL)} "
            f"(set CAMPAIGN_ENGINE_TEST_POSTGRES_URL to a server where the tests may create a "
            f"database): {' '.join(str(exc).split())}"
        )
    name = f"campaign_engine_test_{os.getpid()}_{secrets.token_hex(4)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield with_database(POSTGRES_ADMIN_URL, name)
        finally:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def postgres_url(postgres_database: str) -> str:
    """A fresh, empty schema in the session's database, as the URL's search_path."""
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    database = urlsplit(postgres_database).path.lstrip("/")
    return with_database(postgres_database, database, schema)


def _url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'engine.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database URL of each store in turn."""
    return _url(request.param, request, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database URL of each store that outlives its process."""
    return _url(request.param, request, tmp_path)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[RunStore]:
    """An open store of each kind (closed afterwards)."""
    opened = open_store(store_url)
    await opened.open()
    yield opened
    await opened.close()
