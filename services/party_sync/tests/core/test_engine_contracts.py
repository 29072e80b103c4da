"""The schemas of what an engine receives: ``contracts/jsonschema/party_sync/engine/``.

The protocol's schemas describe what clients and the server exchange; the notices (``party.join``
without ``seq``, ``party.restate``) and the bodies and stream entries that carry actions and
notices to an engine are no client's messages, so they live in a subdirectory the server never
takes a client's message type from. These tests check each file as ``test_contracts`` checks the
protocol's (a valid 2020-12 schema with its metadata, every example valid with both
implementations), that what party_sync's own code makes of a notice conforms, and that the
schemas refuse what an engine must not be sent (the stream worker's and the HTTP links' outputs
are checked against them in ``test_stream_worker`` and ``test_http_engine``).
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import jsonschema_rs
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from party_sync.engine import wire
from party_sync.engine.interface import JoinNotice, RestateNotice
from party_sync.protocol.schemas import ENGINE_DIR, Contracts, SchemaViolation
from referencing import Registry
from referencing.jsonschema import DRAFT202012

SCHEMA_DIR = Path(__file__).resolve().parents[4] / "contracts" / "jsonschema" / "party_sync"
BASE_URI = "https://schemas.rpg-bot.dev/party_sync/v1/"
ENGINE_FILES = (
    "http.action.json",
    "http.notice.json",
    "join.notice.json",
    "restate.notice.json",
    "stream.entry.json",
)
IDS = st.from_regex(r"\A[A-Za-z0-9._:-]{1,64}\Z")
NAMES = st.text(min_size=1, max_size=64).filter(lambda name: name.strip() == name and name != "")


@cache
def _documents() -> dict[str, dict[str, Any]]:
    """Every schema file by its path under the schema directory (``engine/join.notice.json``)."""
    return {
        path.relative_to(SCHEMA_DIR).as_posix(): json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(SCHEMA_DIR.rglob("*.json"))
    }


@cache
def _py_validator(name: str) -> Any:
    registry: Registry[Any] = Registry().with_resources(
        (doc["$id"], DRAFT202012.create_resource(doc)) for doc in _documents().values()
    )
    return jsonschema.Draft202012Validator(
        _documents()[f"{ENGINE_DIR}/{name}"],
        registry=registry,
        format_checker=jsonschema.FormatChecker(),
    )


@cache
def _contracts() -> Contracts:
    return Contracts(SCHEMA_DIR)


def _stem(name: str) -> str:
    return name.removesuffix(".json")


def test_the_engine_directory_holds_exactly_these_files() -> None:
    found = sorted(n.removeprefix(f"{ENGINE_DIR}/") for n in _documents() if "/" in n)
    assert found == sorted(ENGINE_FILES)
    assert sorted(_contracts().engine_documents) == sorted(map(_stem, ENGINE_FILES))


def test_no_engine_schema_is_a_message_type_a_client_may_send() -> None:
    contracts = _contracts()
    assert not any(contracts.has(_stem(name)) for name in ENGINE_FILES)
    with pytest.raises(SchemaViolation, match="no schema for message type"):
        contracts.validate("party.restate", wire.restate_envelope(RestateNotice("p", "r", "", "t")))


@pytest.mark.parametrize("name", ENGINE_FILES)
def test_each_file_is_a_2020_12_schema_with_metadata_and_valid_examples(name: str) -> None:
    schema = _documents()[f"{ENGINE_DIR}/{name}"]
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema_rs.meta.validate(schema)
    assert schema["$id"] == f"{BASE_URI}{ENGINE_DIR}/{name}"
    assert schema["title"].strip() and schema["description"].strip()
    assert schema["examples"]
    for example in schema["examples"]:
        _contracts().validate_engine(_stem(name), example)  # jsonschema-rs, as the host runs it
        assert _py_validator(name).is_valid(example), list(_py_validator(name).iter_errors(example))


def test_each_stream_entry_example_holds_an_envelope_valid_for_its_kind() -> None:
    """``contentSchema`` is an annotation (validators do not apply it): check it here."""
    contracts = _contracts()
    for example in _documents()[f"{ENGINE_DIR}/stream.entry.json"]["examples"]:
        envelope = orjson.loads(example["envelope"])
        if example["kind"] == "action":
            contracts.validate("action.request", envelope)
        else:
            contracts.validate_engine(f"{example['kind']}.notice", envelope)


@given(IDS, IDS, IDS, NAMES, IDS, st.floats(0, 4e9))
def test_a_join_notice_party_sync_makes_conforms(
    party: str, run: str, character: str, name: str, trace: str, at: float
) -> None:
    envelope = wire.join_envelope(JoinNotice(party, run, character, name, trace, at))
    _contracts().validate_engine("join.notice", envelope)
    body = {"kind": "join", "party_id": party, "campaign_run_id": run, "envelope": envelope}
    _contracts().validate_engine("http.notice", body)


@given(IDS, IDS, st.text(max_size=64), IDS, st.floats(0, 4e9))
def test_a_restate_notice_party_sync_makes_conforms(
    party: str, run: str, epoch: str, trace: str, at: float
) -> None:
    envelope = wire.restate_envelope(RestateNotice(party, run, epoch, trace, at))
    _contracts().validate_engine("restate.notice", envelope)
    body = {"kind": "restate", "party_id": party, "campaign_run_id": run, "envelope": envelope}
    _contracts().validate_engine("http.notice", body)


def _example(name: str, index: int = 0) -> dict[str, Any]:
    return copy.deepcopy(_documents()[f"{ENGINE_DIR}/{name}"]["examples"][index])


def _broken() -> list[tuple[str, dict[str, Any]]]:
    join, restate = _example("join.notice.json"), _example("restate.notice.json")
    action, notice = _example("http.action.json"), _example("http.notice.json")
    entry = _example("stream.entry.json")
    return [
        ("join.notice", {**join, "seq": 12}),  # a notice is not the party's event
        ("join.notice", {**join, "payload": {"character_id": "aria"}}),
        ("join.notice", {**join, "type": "party.restate"}),
        ("restate.notice", {**restate, "payload": {"epoch": 7}}),
        ("restate.notice", {**restate, "payload": {"epoch": "e" * 65}}),
        ("restate.notice", {**restate, "payload": {}}),
        ("restate.notice", {k: v for k, v in restate.items() if k != "trace_id"}),
        ("http.action", {**action, "deadline": "soon"}),
        ("http.action", {**action, "party_id": "no spaces"}),
        ("http.action", {**action, "envelope": restate}),
        ("http.action", {k: v for k, v in action.items() if k != "campaign_run_id"}),
        ("http.notice", {**notice, "envelope": restate}),  # kind join, a restate inside
        ("http.notice", {**notice, "kind": "action"}),
        ("stream.entry", {**entry, "kind": "vote"}),
        ("stream.entry", {**entry, "deadline": "-1"}),
        ("stream.entry", {**entry, "envelope": {"type": "action.request"}}),  # JSON text only
    ]


@pytest.mark.parametrize(("name", "value"), _broken())
def test_the_engine_schemas_refuse_what_no_engine_is_sent(name: str, value: dict[str, Any]) -> None:
    with pytest.raises(SchemaViolation):
        _contracts().validate_engine(name, value)
    assert not _py_validator(f"{name}.json").is_valid(value)


def test_an_unknown_engine_schema_is_a_violation_not_a_crash() -> None:
    with pytest.raises(SchemaViolation, match=r"no engine schema 'vote\.notice'"):
        _contracts().validate_engine("vote.notice", {})
