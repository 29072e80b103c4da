"""Contract tests: the party_sync v1 JSON Schemas, their examples and docs/protocol.md agree.

The schemas in ``contracts/jsonschema/party_sync/`` are the source of truth. These tests check that

* every schema file is a valid draft 2020-12 schema with ``$id`` (base URI + file name), title,
  description and examples, and that jsonschema_rs loads all of them the way the server does
  (one ``jsonschema_rs.Registry`` of every file, ``validator_for(schema, registry=reg)``);
* every example validates against its own schema, with jsonschema_rs (as the server runs it, and
  with format validation on) and with the pure-Python ``jsonschema`` (``referencing`` registry,
  format checking on): the implementations agree;
* every ``json`` block of docs/protocol.md is a valid message, each message type has exactly one
  example right under its ``### <type>`` heading, and the error-code table matches the schema;
* the schemas bite: a set of invalid messages is rejected by every implementation.

``common.json`` validates no message: its examples are member objects and are validated against
``common.json#/$defs/member``.

The pure-Python ``jsonschema`` checks ``date-time`` only if ``rfc3339-validator`` is installed,
which it is not here, so the test registers its own strict RFC 3339 checker (below).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import jsonschema_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from party_sync.protocol.errors import CloseCode
from referencing import Registry
from referencing.jsonschema import DRAFT202012

REPO_ROOT = Path(__file__).resolve().parents[4]
SCHEMA_DIR = REPO_ROOT / "contracts" / "jsonschema" / "party_sync"
PROTOCOL_DOC = REPO_ROOT / "docs" / "protocol.md"
BASE_URI = "https://schemas.rpg-bot.dev/party_sync/v1/"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"

#: Server → client, per connection: never a ``seq``.
SYSTEM_TYPES = ("system.hello", "system.error", "system.pong")
#: Server → client party events: always ``seq``, ``timestamp`` and ``trace_id``.
EVENT_TYPES = (
    "party.join",
    "party.state",
    "action.result",
    "scene.update",
    "combat.update",
    "vote.started",
    "vote.update",
    "vote.finished",
)
#: Server → client, to every member outside the sequenced stream: never a ``seq``.
TRANSIENT_TYPES = ("action.accepted", "action.failed", "narration.delta")
#: Client → server only: never a ``seq``.
CLIENT_TYPES = ("action.request", "vote.cast", "system.ping")
#: Both directions (client: leave request without seq; server: event with seq and reason).
BOTH_DIRECTIONS_TYPES = ("party.leave",)
MESSAGE_TYPES = SYSTEM_TYPES + TRANSIENT_TYPES + EVENT_TYPES + CLIENT_TYPES + BOTH_DIRECTIONS_TYPES
SCHEMA_FILES = ("envelope.json", "common.json", *(f"{t}.json" for t in MESSAGE_TYPES))

ERROR_CODES_HEADING = "## Error codes"
CLOSE_CODES_HEADING = "## Close codes"
# every close code party_sync uses, from its one list (protocol/errors.py CloseCode)
CLOSE_CODES = {v for k, v in vars(CloseCode).items() if k.isupper() and isinstance(v, int)}

JsonObject = dict[str, Any]

# --- validators ---

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})",
    re.ASCII,
)


def _is_rfc3339_date_time(instance: object) -> bool:
    """RFC 3339 ``date-time`` (what format checking means), leap second 60 allowed."""
    if not isinstance(instance, str):
        return True
    match = _RFC3339.fullmatch(instance)
    if match is None:
        return False
    year, month, day, hour, minute, second = (int(g) for g in match.groups())
    try:
        datetime(year, month, day, hour, minute, min(second, 59))
    except ValueError:
        return False
    return second <= 60


FORMAT_CHECKER = jsonschema.FormatChecker()
FORMAT_CHECKER.checks("date-time")(_is_rfc3339_date_time)


@cache
def _schemas() -> dict[str, JsonObject]:
    """Every schema file by file name."""
    loaded: dict[str, JsonObject] = {}
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(schema, dict), path
        loaded[path.name] = schema
    return loaded


def _schema(name: str) -> JsonObject:
    return _schemas()[name]


def _examples(message_type: str) -> list[JsonObject]:
    examples = _schema(f"{message_type}.json").get("examples", [])
    assert isinstance(examples, list)
    return examples


def _example(message_type: str, index: int = 0) -> JsonObject:
    return copy.deepcopy(_examples(message_type)[index])


@cache
def _rs_registry() -> jsonschema_rs.Registry:
    # Exactly how the server loads them.
    return jsonschema_rs.Registry([(s["$id"], s) for s in _schemas().values()])


@cache
def _rs_validator(target: str, validate_formats: bool) -> jsonschema_rs.Validator:
    """``target``: a file name, or an absolute URI (e.g. a ``$defs`` pointer)."""
    schema: JsonObject = _schema(target) if target in _schemas() else {"$ref": target}
    if validate_formats:
        return jsonschema_rs.validator_for(schema, registry=_rs_registry(), validate_formats=True)
    return jsonschema_rs.validator_for(schema, registry=_rs_registry())


@cache
def _py_registry() -> Registry[Any]:
    registry: Registry[Any] = Registry().with_resources(
        (s["$id"], DRAFT202012.create_resource(s)) for s in _schemas().values()
    )
    return registry


@cache
def _py_validator(target: str) -> Any:
    schema: JsonObject = _schema(target) if target in _schemas() else {"$ref": target}
    return jsonschema.Draft202012Validator(
        schema, registry=_py_registry(), format_checker=FORMAT_CHECKER
    )


def _verdicts(target: str, instance: object) -> dict[str, bool]:
    return {
        "jsonschema_rs": _rs_validator(target, False).is_valid(instance),
        "jsonschema_rs(validate_formats)": _rs_validator(target, True).is_valid(instance),
        "jsonschema": bool(_py_validator(target).is_valid(instance)),
    }


def _assert_valid(target: str, instance: object) -> None:
    verdicts = _verdicts(target, instance)
    if not all(verdicts.values()):
        rs_errors = [
            f"{'/'.join(map(str, e.instance_path))}: {e.message}"
            for e in _rs_validator(target, True).iter_errors(instance)
        ]
        py_errors = [
            f"{e.json_path}: {e.message}" for e in _py_validator(target).iter_errors(instance)
        ]
        pytest.fail(
            f"{target}: expected valid, got {verdicts}\n"
            f"jsonschema_rs: {rs_errors}\njsonschema: {py_errors}\n"
            f"instance: {json.dumps(instance, indent=2)}"
        )


def _assert_invalid(target: str, instance: object) -> None:
    verdicts = _verdicts(target, instance)
    accepted = [name for name, valid in verdicts.items() if valid]
    assert not accepted, f"{target}: accepted by {accepted}: {json.dumps(instance, indent=2)}"


# --- schema files ---


def test_schema_directory_holds_exactly_the_protocol_files() -> None:
    assert sorted(_schemas()) == sorted(SCHEMA_FILES)


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_schema_file_is_a_valid_2020_12_schema_with_metadata(name: str) -> None:
    text = (SCHEMA_DIR / name).read_text(encoding="utf-8")
    assert text.endswith("}\n"), "end the file with a single newline"
    assert "\t" not in text
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, f"2-space indentation: {line!r}"

    schema = _schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema_rs.meta.validate(schema)
    assert schema["$schema"] == DRAFT_2020_12
    assert schema["$id"] == BASE_URI + name
    for key in ("title", "description"):
        assert isinstance(schema.get(key), str), key
        assert schema[key].strip(), key
    examples = schema.get("examples")
    assert isinstance(examples, list), "examples"
    assert examples, "examples must not be empty"


#: The largest integer every client can hold exactly (JavaScript's Number.MAX_SAFE_INTEGER).
SAFE_INTEGER = 2**53 - 1


def _integer_schemas(value: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(value, list):
        return [s for i, item in enumerate(value) for s in _integer_schemas(item, f"{where}/{i}")]
    if not isinstance(value, dict):
        return []
    found = [(where, value)] if value.get("type") == "integer" else []
    for key, item in value.items():
        found += _integer_schemas(item, f"{where}/{key}")
    return found


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_every_integer_is_bounded_to_the_safe_range(name: str) -> None:
    """An integer field with no bound let an engine publish scene_number 1e20 (JSON Schema
    counts an integral float as an integer): the server could not encode the party's snapshot
    again, and every handshake of that party failed. Every integer is within ±(2^53 - 1)."""
    for where, schema in _integer_schemas(_schema(name), name):
        assert -SAFE_INTEGER <= schema.get("minimum", -(2**64)) <= SAFE_INTEGER, where
        assert schema.get("maximum", 2**64) <= SAFE_INTEGER, where
    if name == "scene.update.json":
        example = copy.deepcopy(_schema(name)["examples"][0])
        example["payload"]["scene_number"] = 1e20
        validator = jsonschema_rs.validator_for(
            _schema(name),
            registry=jsonschema_rs.Registry(
                [(_schema(n)["$id"], _schema(n)) for n in SCHEMA_FILES]
            ),
        )
        assert not validator.is_valid(example)


def test_jsonschema_rs_loads_every_file_with_one_registry() -> None:
    # The server's loading code, verbatim: one registry of all files, one validator per file.
    all_files = [_schema(name) for name in SCHEMA_FILES]
    reg = jsonschema_rs.Registry([(schema["$id"], schema) for schema in all_files])
    for schema in all_files:
        validator = jsonschema_rs.validator_for(schema, registry=reg)
        if schema["$id"] != BASE_URI + "common.json":  # common.json's examples are members
            assert all(validator.is_valid(example) for example in schema["examples"])


@pytest.mark.parametrize("message_type", MESSAGE_TYPES)
def test_message_schema_wraps_the_envelope(message_type: str) -> None:
    schema = _schema(f"{message_type}.json")
    assert {"$ref": "envelope.json"} in schema["allOf"]
    assert schema["properties"]["type"] == {"const": message_type}
    assert "payload" in schema["properties"]
    required = set(schema["required"])
    assert {"type", "payload"} <= required
    if message_type in EVENT_TYPES:
        assert {"timestamp", "trace_id", "seq"} <= required
    if message_type in SYSTEM_TYPES + TRANSIENT_TYPES:
        assert {"timestamp", "trace_id"} <= required
    if message_type in SYSTEM_TYPES + TRANSIENT_TYPES + CLIENT_TYPES:
        assert schema["properties"]["seq"] is False


# --- examples ---

_MESSAGE_EXAMPLES = [
    pytest.param(t, i, id=f"{t}[{i}]") for t in MESSAGE_TYPES for i in range(len(_examples(t)))
]


@pytest.mark.parametrize(("message_type", "index"), _MESSAGE_EXAMPLES)
def test_example_validates_against_its_own_schema(message_type: str, index: int) -> None:
    example = _example(message_type, index)
    assert example["type"] == message_type
    _assert_valid(f"{message_type}.json", example)
    _assert_valid("envelope.json", example)


@pytest.mark.parametrize("index", range(len(_schema("envelope.json")["examples"])))
def test_envelope_example_is_a_valid_message(index: int) -> None:
    example = _schema("envelope.json")["examples"][index]
    _assert_valid("envelope.json", example)
    _assert_valid(f"{example['type']}.json", example)


def test_common_examples_are_members() -> None:
    # common.json validates no message; its examples are member objects.
    for member in _schema("common.json")["examples"]:
        _assert_valid(BASE_URI + "common.json#/$defs/member", member)


def test_examples_tell_one_consistent_story() -> None:
    def walk(node: object) -> list[tuple[str, object]]:
        if isinstance(node, dict):
            return [(k, v) for k, v in node.items()] + [
                pair for v in node.values() for pair in walk(v)
            ]
        if isinstance(node, list):
            return [pair for v in node for pair in walk(v)]
        return []

    pairs = [pair for name in SCHEMA_FILES for pair in walk(_schema(name)["examples"])]
    assert {v for k, v in pairs if k == "party_id"} == {"p-7"}
    assert {v for k, v in pairs if k == "campaign_run_id"} == {"run-42"}
    assert {v for k, v in pairs if k in ("character_id", "you")} == {"aria", "borin", "party"}


# --- the doc ---


@dataclass(frozen=True, slots=True)
class DocBlock:
    heading: str  # the nearest heading above the block, e.g. "### action.result"
    line: int  # 1-based line of the opening fence
    language: str
    text: str


@cache
def _doc_lines() -> tuple[str, ...]:
    return tuple(PROTOCOL_DOC.read_text(encoding="utf-8").splitlines())


@cache
def _doc_blocks() -> tuple[DocBlock, ...]:
    blocks: list[DocBlock] = []
    heading = ""
    fence: tuple[int, str] | None = None
    body: list[str] = []
    for number, line in enumerate(_doc_lines(), start=1):
        if fence is not None:
            if line.strip() == "```":
                blocks.append(DocBlock(heading, fence[0], fence[1], "\n".join(body)))
                fence, body = None, []
            else:
                body.append(line)
        elif line.startswith("```"):
            fence = (number, line[3:].strip())
        elif re.match(r"#{1,6} ", line):
            heading = line.strip()
    assert fence is None, f"unclosed code fence at line {fence[0] if fence else 0}"
    return tuple(blocks)


def _doc_json_blocks() -> list[DocBlock]:
    return [b for b in _doc_blocks() if b.language == "json"]


def _doc_section(heading: str) -> list[str]:
    lines = _doc_lines()
    assert lines.count(heading) == 1, f"exactly one {heading!r} heading"
    start = lines.index(heading) + 1
    level = len(heading) - len(heading.lstrip("#"))
    end = next(
        (
            i
            for i in range(start, len(lines))
            if re.match(rf"#{{1,{level}}} ", lines[i])  # the next heading of this level or above
        ),
        len(lines),
    )
    return list(lines[start:end])


@pytest.mark.parametrize("message_type", MESSAGE_TYPES)
def test_doc_has_one_valid_example_under_the_type_heading(message_type: str) -> None:
    heading = f"### {message_type}"
    assert _doc_lines().count(heading) == 1, f"docs/protocol.md needs one {heading!r}"
    blocks = [b for b in _doc_blocks() if b.heading == heading]
    assert [b.language for b in blocks] == ["json"], f"{heading}: exactly one ```json block"
    example = json.loads(blocks[0].text)
    assert example["type"] == message_type
    _assert_valid(f"{message_type}.json", example)


@pytest.mark.parametrize("block", _doc_json_blocks(), ids=lambda b: f"line-{b.line}")
def test_every_json_block_in_the_doc_is_a_valid_message(block: DocBlock) -> None:
    message = json.loads(block.text)
    assert isinstance(message, dict)
    assert message.get("type") in MESSAGE_TYPES, f"line {block.line}: not a message"
    _assert_valid(f"{message['type']}.json", message)


def test_doc_error_code_table_matches_the_schema() -> None:
    rows = {}
    for line in _doc_section(ERROR_CODES_HEADING):
        match = re.fullmatch(r"\| `([a-z_]+)` \|(.+)\| (yes|no) \|", line.strip())
        if match:
            rows[match.group(1)] = match.group(3) == "yes"
    assert sorted(rows) == sorted(_schema("common.json")["$defs"]["error_code"]["enum"])

    for code, retryable in rows.items():
        error = _example("system.error")
        error["payload"]["code"] = code
        error["payload"]["retryable"] = retryable
        _assert_valid("system.error.json", error)
        error["payload"]["retryable"] = not retryable
        _assert_invalid("system.error.json", error)


def test_doc_close_code_table_lists_the_close_codes() -> None:
    codes = {
        int(match.group(1))
        for line in _doc_section(CLOSE_CODES_HEADING)
        if (match := re.match(r"\| (\d{4}) \|", line))
    }
    assert codes == CLOSE_CODES


# --- the schemas bite ---


@pytest.mark.parametrize("message_type", EVENT_TYPES + BOTH_DIRECTIONS_TYPES)
def test_server_event_without_seq_is_rejected(message_type: str) -> None:
    event = _example(message_type)
    assert "seq" in event
    del event["seq"]
    # party.leave without seq is the client form, which allows no reason.
    _assert_invalid(f"{message_type}.json", event)


@pytest.mark.parametrize("message_type", SYSTEM_TYPES + TRANSIENT_TYPES + CLIENT_TYPES)
def test_seq_is_rejected_on_system_and_client_messages(message_type: str) -> None:
    message = _example(message_type)
    message["seq"] = 19
    _assert_invalid(f"{message_type}.json", message)


def test_party_leave_with_seq_must_be_a_complete_event() -> None:
    leave = next(e for e in _examples("party.leave") if "seq" not in e)
    _assert_valid("party.leave.json", leave)
    leave = copy.deepcopy(leave)
    leave["seq"] = 27
    _assert_invalid("party.leave.json", leave)  # no timestamp, no reason
    leave["timestamp"] = "2026-11-25T21:06:40.000Z"
    _assert_invalid("party.leave.json", leave)  # still no reason
    leave["payload"]["reason"] = "left"
    _assert_valid("party.leave.json", leave)


@pytest.mark.parametrize("message_type", MESSAGE_TYPES)
def test_unknown_top_level_field_is_rejected(message_type: str) -> None:
    message = _example(message_type)
    message["party_id"] = "p-7"
    _assert_invalid(f"{message_type}.json", message)
    _assert_invalid("envelope.json", message)


@pytest.mark.parametrize("message_type", MESSAGE_TYPES)
def test_unknown_payload_field_is_rejected(message_type: str) -> None:
    message = _example(message_type)
    message["payload"]["comment"] = "hello"
    _assert_invalid(f"{message_type}.json", message)


@pytest.mark.parametrize("message_type", MESSAGE_TYPES)
def test_another_type_is_rejected(message_type: str) -> None:
    message = _example(message_type)
    message["type"] = "party.join" if message_type != "party.join" else "party.leave"
    _assert_invalid(f"{message_type}.json", message)


def test_action_request_with_unknown_action_type_is_rejected() -> None:
    request = _example("action.request", 1)
    request["payload"]["action_type"] = "dance"
    _assert_invalid("action.request.json", request)


def test_choice_without_option_is_rejected() -> None:
    request = _example("action.request")
    assert request["payload"]["action_type"] == "choice"
    request["payload"]["payload"] = {}
    _assert_invalid("action.request.json", request)
    request["payload"]["payload"] = {"option": "not an id"}
    _assert_invalid("action.request.json", request)
    # combat and skill_check payloads are free-form and may be empty
    request["payload"]["action_type"] = "skill_check"
    request["payload"]["payload"] = {}
    _assert_valid("action.request.json", request)


@pytest.mark.parametrize(
    "timestamp",
    [
        "2026-11-25T23:04:05.123+02:00",
        "2026-11-25T21:04:05.123+00:00",
        "2026-11-25 21:04:05Z",
        "2026-11-25T21:04:05.1234567890Z",
        "2026-13-25T21:04:05Z",
        "2026-11-25T24:00:00Z",
        "٢٠٢٦-11-25T21:04:05Z",
    ],
)
def test_timestamp_must_be_utc_with_z(timestamp: str) -> None:
    event = _example("party.join")
    event["timestamp"] = timestamp
    _assert_invalid("party.join.json", event)


@pytest.mark.parametrize(
    "timestamp",
    [
        "2026-02-30T21:04:05Z",
        "2026-11-31T10:00:00Z",
        "2023-02-29T00:00:00Z",
        "1900-02-29T00:00:00Z",
        "2026-11-25T21:39:60Z",
        "2026-11-25T23:58:60Z",
    ],
)
def test_the_timestamp_pattern_alone_refuses_a_day_or_second_that_does_not_exist(
    timestamp: str,
) -> None:
    """The server checks ``format: date-time``; a client that validates with the schemas only
    (2020-12 treats ``format`` as an annotation) must refuse the same: the pattern does it, so
    the schemas win with any validator. (The pattern used to allow November 31 and second 60 of
    any minute, which the server refused as ``schema_violation``.)"""
    event = _example("party.join")
    event["timestamp"] = timestamp
    _assert_invalid("party.join.json", event)


@pytest.mark.parametrize(
    "timestamp",
    ["2024-02-29T00:00:00Z", "2000-02-29T23:59:60.5Z", "2026-11-30T23:59:60Z"],
)
def test_the_timestamp_pattern_takes_leap_days_and_the_leap_second(timestamp: str) -> None:
    event = _example("party.join")
    event["timestamp"] = timestamp
    _assert_valid("party.join.json", event)


TIMESTAMP = BASE_URI + "common.json#/$defs/timestamp"


@settings(max_examples=2000, deadline=None)
@given(
    year=st.integers(0, 9999),
    month=st.integers(0, 13),
    day=st.integers(0, 32),
    hour=st.integers(0, 24),
    minute=st.integers(0, 60),
    second=st.integers(0, 61),
    fraction=st.sampled_from(["", ".5", ".123456789"]),
)
def test_the_timestamp_pattern_accepts_exactly_what_format_checking_accepts(
    year: int, month: int, day: int, hour: int, minute: int, second: int, fraction: str
) -> None:
    """Of strings in the shape ``YYYY-MM-DDTHH:MM:SS[.f]Z``, the pattern (every validator) and
    ``format: date-time`` checking (the server's jsonschema_rs) agree on every one."""
    stamp = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}{fraction}Z"
    pattern_says = _rs_validator(TIMESTAMP, False).is_valid(stamp)
    format_says = jsonschema_rs.validator_for(
        {"type": "string", "format": "date-time"}, validate_formats=True
    ).is_valid(stamp)
    assert pattern_says == format_says, stamp
    assert _rs_validator(TIMESTAMP, True).is_valid(stamp) == format_says, stamp


@pytest.mark.parametrize("action_id", ["act aria 7", "", "a" * 65, "act/aria", "act-ariá"])
def test_bad_action_id_is_rejected(action_id: str) -> None:
    request = _example("action.request")
    request["payload"]["action_id"] = action_id
    _assert_invalid("action.request.json", request)


def test_id_with_trailing_newline_is_rejected_by_the_server_validator() -> None:
    # Python's re.search lets "$" match before a final newline, so pure-Python jsonschema accepts
    # this; jsonschema_rs (ECMA-262 semantics, what the server runs) does not.
    request = _example("action.request")
    request["payload"]["action_id"] = "act-aria-0007\n"
    assert not _rs_validator("action.request.json", False).is_valid(request)


def test_system_error_retryable_is_fixed_per_code() -> None:
    error = _example("system.error")
    assert error["payload"]["code"] == "action_in_flight"
    error["payload"]["retryable"] = True
    _assert_invalid("system.error.json", error)


def test_hello_resumed_needs_resumed_from_and_only_then() -> None:
    hello = _example("system.hello")
    assert hello["payload"]["resumed"] is False
    hello["payload"]["resumed_from"] = 12
    _assert_invalid("system.hello.json", hello)
    hello["payload"]["resumed"] = True
    _assert_valid("system.hello.json", hello)
    del hello["payload"]["resumed_from"]
    _assert_invalid("system.hello.json", hello)


def test_vote_started_default_option_tie_rule_needs_default_option() -> None:
    started = next(
        e for e in _examples("vote.started") if e["payload"]["tie_rule"] == "default_option"
    )
    started = copy.deepcopy(started)
    _assert_valid("vote.started.json", started)
    del started["payload"]["default_option"]
    _assert_invalid("vote.started.json", started)


def test_vote_needs_two_to_ten_options() -> None:
    started = _example("vote.started")
    options = started["payload"]["options"]
    started["payload"]["options"] = options[:1]
    _assert_invalid("vote.started.json", started)
    started["payload"]["options"] = [{"id": f"o{i}", "label": f"Option {i}"} for i in range(11)]
    _assert_invalid("vote.started.json", started)


def test_vote_applied_action_is_made_by_the_party() -> None:
    finished = _example("vote.finished")
    finished["payload"]["applied"]["character_id"] = "aria"
    _assert_invalid("vote.finished.json", finished)


def test_action_result_state_depends_on_the_actor() -> None:
    party_result = next(
        e for e in _examples("action.result") if e["payload"]["character_id"] == "party"
    )
    character_result = next(
        e for e in _examples("action.result") if e["payload"]["character_id"] != "party"
    )
    # a character's state needs hp
    result = copy.deepcopy(character_result)
    del result["payload"]["state"]["hp"]
    _assert_invalid("action.result.json", result)
    # the party has no hp
    result = copy.deepcopy(party_result)
    result["payload"]["state"]["hp"] = 10
    _assert_invalid("action.result.json", result)
    # a d20 shows 1..20
    result = copy.deepcopy(character_result)
    result["payload"]["roll"]["value"] = 21
    _assert_invalid("action.result.json", result)
