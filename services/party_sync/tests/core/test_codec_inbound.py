"""The pure protocol helpers: codec (seq splicing, timestamps, trace ids), inbound.parse, errors."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.errors import (
    BAD_INPUT,
    RETRYABLE,
    AuthError,
    BackendUnavailable,
    ConfigError,
    ErrorCode,
    InvalidEvent,
    PartySyncError,
    ProtocolError,
)
from party_sync.protocol.inbound import Inbound, byte_length, parse
from party_sync.protocol.schemas import Contracts, SchemaViolation, _bounded

REPO_ROOT = Path(__file__).resolve().parents[4]
SCHEMA_DIR = REPO_ROOT / "contracts" / "jsonschema" / "party_sync"
MAX = 2048

# The patterns of common.json, checked against what the codec produces.
_COMMON = json.loads((SCHEMA_DIR / "common.json").read_text(encoding="utf-8"))["$defs"]
TIMESTAMP = re.compile(_COMMON["timestamp"]["pattern"])
TRACE_ID = re.compile(_COMMON["trace_id"]["pattern"])


@cache
def contracts() -> Contracts:
    return Contracts(SCHEMA_DIR)


json_scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)


# -- codec -------------------------------------------------------------------------------------


def test_encode_is_compact_utf8_and_decode_reverses_it() -> None:
    message = {"type": "x", "payload": {"name": "Åria ✓", "n": [1, 2.5, None, True]}}
    data = codec.encode(message)
    assert data == '{"type":"x","payload":{"name":"Åria ✓","n":[1,2.5,null,true]}}'.encode()
    assert codec.decode(data) == message
    assert codec.decode(data.decode()) == message


@pytest.mark.parametrize("bad", [b"", b"{", b"\xff\xfe", b"{'a': 1}", b"[1,]", "\ud800"])
def test_decode_raises_value_error_on_bad_json_or_bad_utf8(bad: bytes | str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (the documented contract is "a ValueError")
        codec.decode(bad)


def test_with_seq_puts_seq_first() -> None:
    assert codec.with_seq(b'{"type":"party.join"}', 12) == b'{"seq":12,"type":"party.join"}'
    assert codec.with_seq(b"{}", 1) == b'{"seq":1}'
    assert codec.decode(codec.with_seq(b"{}", 1)) == {"seq": 1}
    assert codec.has_seq_prefix(codec.with_seq(b'{"a":1}', 3))
    assert not codec.has_seq_prefix(b'{"a":1,"seq":3}')
    assert not codec.has_seq_prefix(b'{ "seq":3}')


#: Encodable JSON objects without a "seq" member, and the seqs a stream can give them.
messages_without_seq = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k != "seq"), json_values, max_size=6
)
seqs = st.integers(min_value=0, max_value=2**53)


@settings(max_examples=200, deadline=None)
@given(message=messages_without_seq, seq=seqs)
def test_seq_of_reads_back_what_with_seq_put_and_nothing_else(
    message: dict[str, Any], seq: int
) -> None:
    body = orjson.dumps(message)
    assert codec.seq_of(codec.with_seq(body, seq)) == seq
    for other in (0, seq // 2, seq + 10**6):  # a repeat's seq: the rest, byte for byte
        assert codec.with_seq_replaced(codec.with_seq(body, seq), other) == codec.with_seq(
            body, other
        )
    assert codec.seq_of(body) is None  # no seq first: a system.error, a hello


@pytest.mark.parametrize(
    "data", [b'{"seq":', b'{"seq":}', b'{"seq":12', b'{"seq":-1,"a":1}', b'{"seq":1x}', b""]
)
def test_seq_of_is_none_for_what_is_not_an_encoded_event(data: bytes) -> None:
    assert codec.seq_of(data) is None


@settings(max_examples=200, deadline=None)
@given(message=messages_without_seq, seq=seqs)
def test_with_seq_of_an_encoded_message_decodes_to_the_message_plus_seq(
    message: dict[str, Any], seq: int
) -> None:
    spliced = codec.with_seq(codec.encode(message), seq)
    decoded = codec.decode(spliced)
    assert decoded == {"seq": seq, **message}
    assert next(iter(decoded)) == "seq"
    assert list(decoded)[1:] == list(message)  # the other members keep their order
    assert codec.has_seq_prefix(spliced)


@pytest.mark.parametrize(
    ("ts", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1764104645.123, "2025-11-25T21:04:05.123Z"),
        (1764104645.9999, "2025-11-25T21:04:05.999Z"),  # truncated, not rounded up
        (1795640645.5, "2026-11-25T21:04:05.500Z"),
    ],
)
def test_rfc3339(ts: float, text: str) -> None:
    assert codec.rfc3339(ts) == text


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0.0, max_value=4_102_444_799.0))  # up to 2099-12-31
def test_rfc3339_matches_the_schema_and_denotes_ts_to_the_millisecond(ts: float) -> None:
    text = codec.rfc3339(ts)
    assert TIMESTAMP.fullmatch(text), text
    assert len(text) == len("2026-11-25T21:04:05.123Z")
    back = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    assert back - 1e-5 <= ts < back + 0.001 + 1e-5


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.floats(min_value=0.0, max_value=4_102_444_799.0),
        # the edges of a second and of a millisecond, where rounding decides
        st.integers(0, 4_102_444_799).flatmap(
            lambda s: st.sampled_from([s + 0.9995, s + 0.9999995, s + 0.0004995, s + 1e-7])
        ),
    )
)
def test_rfc3339_is_exactly_what_datetime_formats(ts: float) -> None:
    # the per-second cache must never change a timestamp: compare with the standard library
    expected = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    assert codec.rfc3339(ts) == expected
    assert codec.rfc3339(ts) == expected  # from the cache this time


def test_rfc3339_of_increasing_times_in_one_second_and_across_it() -> None:
    base = 1795640645.0
    texts = [codec.rfc3339(base + i / 8) for i in range(17)]
    assert texts[0] == "2026-11-25T21:04:05.000Z"
    assert texts[7] == "2026-11-25T21:04:05.875Z"
    assert texts[8] == "2026-11-25T21:04:06.000Z"
    assert texts[16] == "2026-11-25T21:04:07.000Z"
    assert texts == sorted(texts)


def test_trace_ids_are_32_lowercase_hex_and_fresh() -> None:
    ids = {codec.new_trace_id() for _ in range(100)}
    assert len(ids) == 100
    for trace_id in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
        assert TRACE_ID.fullmatch(trace_id)


def test_envelope_has_no_seq_and_keeps_a_given_trace_id() -> None:
    env = codec.envelope(t.PARTY_JOIN, {"character_id": "aria"}, ts=0.0, trace_id="tr-1")
    assert env == {
        "type": t.PARTY_JOIN,
        "timestamp": "1970-01-01T00:00:00.000Z",
        "trace_id": "tr-1",
        "payload": {"character_id": "aria"},
    }
    fresh = codec.envelope(t.HELLO, {}, ts=0.0)
    assert re.fullmatch(r"[0-9a-f]{32}", fresh["trace_id"])
    assert "seq" not in fresh


# -- inbound.parse -----------------------------------------------------------------------------


def action_request(**payload_changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "action_id": "act-1",
        "character_id": "aria",
        "campaign_run_id": "run-42",
        "action_type": "choice",
        "payload": {"option": "open-gate"},
    }
    payload.update(payload_changes)
    return {"type": t.ACTION_REQUEST, "trace_id": "client-1", "payload": payload}


def refusal(data: bytes | str, max_bytes: int = MAX) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(data, contracts(), max_bytes)
    return info.value


def dumps(message: Any) -> bytes:
    return orjson.dumps(message)


def outcome_of(data: bytes, max_bytes: int) -> Inbound | ProtocolError:
    try:
        return parse(data, contracts(), max_bytes)
    except ProtocolError as exc:
        return exc


def test_a_valid_action_request() -> None:
    message = action_request()
    inbound = parse(dumps(message), contracts(), MAX)
    assert inbound == Inbound(t.ACTION_REQUEST, message, message["payload"], "client-1", "client-1")


@pytest.mark.parametrize(
    "message",
    [
        {"type": t.VOTE_CAST, "payload": {"vote_id": "v-3-1", "option": "open-gate"}},
        {"type": t.PARTY_LEAVE, "payload": {"character_id": "aria"}},
        {
            "type": t.ACTION_REQUEST,
            "timestamp": "2026-11-25T21:00:40.870Z",
            "payload": action_request(action_type="combat", payload={})["payload"],
        },
    ],
)
def test_valid_client_messages_without_a_trace_id_get_a_server_one(message: dict[str, Any]) -> None:
    inbound = parse(json.dumps(message), contracts(), MAX)  # str input works as well
    assert inbound.type == message["type"]
    assert inbound.payload == message["payload"]
    assert inbound.client_trace_id is None
    assert re.fullmatch(r"[0-9a-f]{32}", inbound.trace_id)


def test_size_is_checked_first_and_the_limit_is_inclusive() -> None:
    assert refusal(b"x" * (MAX + 1)).code is ErrorCode.MESSAGE_TOO_LARGE  # not bad_json
    message = dumps(action_request())
    padded = message[:-1] + b" " * (MAX - len(message)) + b"}"
    assert len(padded) == MAX
    assert parse(padded, contracts(), MAX).type == t.ACTION_REQUEST
    assert refusal(padded, max_bytes=MAX - 1).code is ErrorCode.MESSAGE_TOO_LARGE


@pytest.mark.parametrize("kind", sorted(t.CLIENT_TYPES))
def test_a_too_large_message_names_its_type_and_trace_when_they_stand_plainly(kind: str) -> None:
    big = b'{"type": "' + kind.encode() + b'", "trace_id": "tr-9", "payload": {"x": "'
    big += b"y" * MAX + b'"}}'
    error = refusal(big)
    assert error.code is ErrorCode.MESSAGE_TOO_LARGE
    assert (error.type, error.trace_id) == (kind, "tr-9")
    assert refusal(b'{"type": "nope", "trace_id": "t"' + b" " * MAX + b"}").type is None


def test_the_size_of_a_str_is_its_utf8_size() -> None:
    text = '"' + "é" * 600 + '"'  # 602 characters, 1202 UTF-8 bytes
    assert refusal(text, max_bytes=1201).code is ErrorCode.MESSAGE_TOO_LARGE
    assert refusal(text, max_bytes=1202).code is ErrorCode.BAD_MESSAGE  # fits; not an object


@pytest.mark.parametrize(
    ("data", "limit", "size"),
    [
        (b"\xc3\xa9" * 10, 5, 20),
        ("abc", 100, 3),
        ("é" * 10, 100, 10),  # cannot exceed 100 bytes: the cheap count is enough
        ("é" * 10, 30, 20),  # could exceed 30: exact
        ("😀" * 10, 30, 40),
        ("\ud800" * 10, 30, 30),  # a lone surrogate is measured, not an error
    ],
)
def test_byte_length(data: bytes | str, limit: int, size: int) -> None:
    assert byte_length(data, limit) == size


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty document"),
        (b"{", "line 1 column"),
        (b'{"type": "vote.cast",}', "line 1 column"),
        (b"\xff{}", "UTF-8"),
        ("\ud800", "surrogates"),
        (b'{"type": "system.ping", "payload": {"n": 1' + b"0" * 400 + b"}}", "infinity"),
        (b'{"type": "system.ping", "payload": {"n": "\\ud800"}}', "surrogate"),
    ],
)
def test_bad_json(data: bytes | str, why: str) -> None:
    error = refusal(data)
    assert error.code is ErrorCode.BAD_JSON
    assert error.trace_id is None and error.type is None
    assert error.message.startswith("message is not valid UTF-8 JSON (") and why in error.message


@pytest.mark.parametrize("value", [[], "vote.cast", 1, None, True])
def test_a_message_must_be_an_object(value: Any) -> None:
    assert refusal(dumps(value)).code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize(
    ("message", "shown_type"),
    [
        ({"payload": {}}, None),
        ({"type": 7, "payload": {}}, None),
        ({"type": "vote.cast"}, "vote.cast"),
        ({"type": "vote.cast", "payload": []}, "vote.cast"),
        ({"type": "no.such_type"}, "no.such_type"),  # shape is checked before the type
    ],
)
def test_a_message_needs_a_string_type_and_an_object_payload(
    message: dict[str, Any], shown_type: str | None
) -> None:
    error = refusal(dumps({**message, "trace_id": "tr-9"}))
    assert error.code is ErrorCode.BAD_MESSAGE
    assert error.type == shown_type
    assert error.trace_id == "tr-9"


def test_an_unknown_type() -> None:
    error = refusal(dumps({"type": "party.dance", "trace_id": "tr-1", "payload": {"x": 1}}))
    assert (error.code, error.type, error.trace_id) == (
        ErrorCode.UNKNOWN_TYPE,
        "party.dance",
        "tr-1",
    )
    long_type = "x" * 65
    error = refusal(dumps({"type": long_type, "payload": {}}))
    assert error.code is ErrorCode.UNKNOWN_TYPE
    assert error.type is None  # not echoed back: too long


@pytest.mark.parametrize("type_", sorted(t.ALL_TYPES - t.CLIENT_TYPES))
def test_server_only_types_are_refused_before_their_schema(type_: str) -> None:
    error = refusal(dumps({"type": type_, "payload": {}}))
    assert error.code is ErrorCode.SERVER_ONLY_TYPE
    assert error.type == type_


@pytest.mark.parametrize(
    "message",
    [
        action_request(action_type="dance"),
        action_request(payload={}),  # a choice needs an option
        action_request(extra=1),
        {**action_request(), "seq": 3},  # clients send no seq
        {**action_request(), "trace_id": "has spaces"},
        {**action_request(), "timestamp": "2026-11-25 21:00:40"},
        {"type": t.PARTY_LEAVE, "payload": {"character_id": "aria", "reason": "left"}},
        {"type": t.VOTE_CAST, "payload": {"vote_id": "v1"}},
        # contract probe: valid by party.leave's schema as the server's copy (seq, reason)
        {
            "type": t.PARTY_LEAVE,
            "seq": 3,
            "timestamp": "2026-01-01T00:00:00Z",
            "trace_id": "t1",
            "payload": {"character_id": "aria", "reason": "left"},
        },
    ],
)
def test_schema_violations(message: dict[str, Any]) -> None:
    error = refusal(dumps(message))
    assert error.code is ErrorCode.SCHEMA_VIOLATION
    assert error.type == message["type"]
    assert error.message.startswith(f"{message['type']} does not match its schema")


def test_a_schema_violation_echoes_valid_looking_ids_and_trace_ids_only() -> None:
    error = refusal(dumps(action_request(action_type="dance")))
    assert (error.action_id, error.trace_id) == ("act-1", "client-1")

    for bad_id in ("a" * 65, "has space", "act-1\n", ""):
        error = refusal(dumps(action_request(action_id=bad_id)))
        assert error.action_id is None, bad_id
    error = refusal(dumps(action_request(action_id=17)))
    assert error.action_id is None

    vote = {"type": t.VOTE_CAST, "trace_id": "x" * 129, "payload": {"vote_id": "v1", "option": 3}}
    error = refusal(dumps(vote))
    assert (error.vote_id, error.action_id, error.trace_id) == ("v1", None, None)


@pytest.mark.parametrize("trace_id", ["tr\n", "has space", "", "x" * 129, 7])
def test_a_malformed_client_trace_id_is_never_echoed(trace_id: Any) -> None:
    error = refusal(dumps({"type": "no.such_type", "trace_id": trace_id, "payload": {}}))
    assert error.code is ErrorCode.UNKNOWN_TYPE
    assert error.trace_id is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_parse_or_are_refused_as_bad_input(data: bytes) -> None:
    outcome = outcome_of(data, 48)
    if isinstance(outcome, ProtocolError):
        assert outcome.code in BAD_INPUT
    else:
        assert outcome.type in t.CLIENT_TYPES


@settings(max_examples=300, deadline=None)
@given(
    type_=st.one_of(st.sampled_from(sorted(t.ALL_TYPES)), st.text(max_size=80)),
    payload=json_values,
    trace_id=st.one_of(st.none(), st.text(max_size=10), st.integers(-1000, 1000)),
)
def test_any_json_message_parses_or_gets_the_code_of_its_first_fault(
    type_: str, payload: Any, trace_id: Any
) -> None:
    message: dict[str, Any] = {"type": type_, "payload": payload}
    if trace_id is not None:
        message["trace_id"] = trace_id
    outcome = outcome_of(dumps(message), 1 << 20)
    if isinstance(outcome, ProtocolError):
        if not isinstance(payload, dict):
            expected = ErrorCode.BAD_MESSAGE
        elif type_ not in t.ALL_TYPES:
            expected = ErrorCode.UNKNOWN_TYPE
        elif type_ not in t.CLIENT_TYPES:
            expected = ErrorCode.SERVER_ONLY_TYPE
        else:
            expected = ErrorCode.SCHEMA_VIOLATION
        assert outcome.code is expected
        assert outcome.trace_id == (
            trace_id if isinstance(trace_id, str) and TRACE_ID.fullmatch(trace_id) else None
        )
    else:
        assert type_ in t.CLIENT_TYPES
        assert contracts().is_valid(type_, message)
        assert outcome.payload == payload


# -- nesting depth (64 levels: too_deep) -------------------------------------------------------


def nested(depth: int, *, kind: str = "object") -> Any:
    """A value ``depth`` levels deep (objects or arrays; the innermost is empty)."""
    value: Any = {} if kind == "object" else []
    for _ in range(depth - 1):
        value = {"k": value} if kind == "object" else [value]
    return value


def deep_text(depth: int) -> bytes:
    """``depth`` nested objects as JSON text (orjson cannot encode that deep itself)."""
    return b'{"k":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


def deep_action(depth: int) -> bytes:
    """An action.request whose whole message nests ``depth`` levels (payload.payload is free)."""
    message = action_request(action_type="skill_check", payload="@@")
    return dumps(message).replace(b'"@@"', deep_text(depth - 2))


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


@pytest.mark.parametrize("kind", ["object", "array"])
def test_decode_bounded_refuses_more_than_max_depth_levels(kind: str) -> None:
    at_limit = dumps(nested(codec.MAX_DEPTH, kind=kind))
    assert depth_of(codec.decode_bounded(at_limit)) == codec.MAX_DEPTH
    for depth in (codec.MAX_DEPTH + 1, 300, 1024, 1025, 5000):
        data = (b"[" * depth + b"]" * depth) if kind == "array" else deep_text(depth)
        with pytest.raises(codec.TooDeep):
            codec.decode_bounded(data)


def test_brackets_inside_strings_do_not_count() -> None:
    data = dumps({"text": "{[" * 5000, "list": [1, 2, 3]})
    assert codec.decode_bounded(data)["list"] == [1, 2, 3]
    assert codec.decode_bounded(data.decode())["list"] == [1, 2, 3]  # str input too


def test_too_deep_is_a_value_error_and_bad_json_stays_bad_json() -> None:
    assert issubclass(codec.TooDeep, ValueError)
    with pytest.raises(ValueError, match=r"unexpected|invalid|expected") as info:
        codec.decode_bounded(b"[[[[}")
    assert not isinstance(info.value, codec.TooDeep)


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(min_value=1, max_value=12))
def test_nesting_exceeds_agrees_with_a_recursive_depth(value: Any, limit: int) -> None:
    assert codec.nesting_exceeds(value, limit) == (depth_of(value) > limit)


def test_an_action_nested_300_deep_is_too_deep_not_a_schema_violation() -> None:
    error = refusal(deep_action(300), max_bytes=65536)
    assert error.code is ErrorCode.TOO_DEEP
    assert error.retryable is False
    assert error.code in BAD_INPUT  # counts towards the policy close like other bad input
    # nothing of it is forwarded, but the refusal names the action it refuses (every error about
    # an action carries its action_id), from well-formed top-level fields only
    assert (error.type, error.action_id, error.trace_id) == (t.ACTION_REQUEST, "act-1", "client-1")


def test_a_frame_past_orjsons_own_limit_is_too_deep_and_names_nothing() -> None:
    error = refusal(deep_action(1100), max_bytes=65536)
    assert error.code is ErrorCode.TOO_DEEP
    assert (error.type, error.action_id, error.trace_id) == (None, None, None)


def test_the_deepest_action_accepted_re_encodes() -> None:
    """What parses can be encoded again for the engine link (orjson encodes only ~254 levels)."""
    inbound = parse(deep_action(codec.MAX_DEPTH), contracts(), 65536)
    assert depth_of(inbound.message) == codec.MAX_DEPTH
    assert codec.decode(codec.encode({"envelope": inbound.message})) == {
        "envelope": inbound.message
    }
    assert refusal(deep_action(codec.MAX_DEPTH + 1), 65536).code is ErrorCode.TOO_DEEP


def test_orjson_limits_that_the_depth_bound_sits_under() -> None:
    """The facts MAX_DEPTH relies on: orjson parses 1,024 levels and encodes fewer than 300."""
    parsed = orjson.loads(b"[" * 1024 + b"]" * 1024)
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(parsed)
    with pytest.raises(orjson.JSONDecodeError, match="depth limit exceeded"):
        orjson.loads(b"[" * 1025 + b"]" * 1025)
    assert codec.MAX_DEPTH < 254


# -- errors ------------------------------------------------------------------------------------


def test_error_codes_are_the_schemas() -> None:
    assert [c.value for c in ErrorCode] == _COMMON["error_code"]["enum"]


def test_retryable_and_bad_input_codes() -> None:
    assert RETRYABLE.isdisjoint(BAD_INPUT)
    assert ErrorCode.CHARACTER_BUSY in RETRYABLE
    assert ErrorCode.ACTION_IN_FLIGHT not in RETRYABLE
    assert ErrorCode.ACTION_REJECTED not in RETRYABLE
    assert {
        ErrorCode.BAD_JSON,
        ErrorCode.BAD_MESSAGE,
        ErrorCode.UNKNOWN_TYPE,
        ErrorCode.SERVER_ONLY_TYPE,
        ErrorCode.SCHEMA_VIOLATION,
        ErrorCode.MESSAGE_TOO_LARGE,
        ErrorCode.TOO_DEEP,
        ErrorCode.FORBIDDEN,
    } == BAD_INPUT


def test_protocol_error_carries_its_code_and_context() -> None:
    error = ProtocolError(ErrorCode.RATE_LIMITED, "slow down", action_id="a1", type="vote.cast")
    assert str(error) == "rate_limited: slow down"
    assert error.retryable is True
    assert (error.action_id, error.vote_id, error.trace_id, error.type) == (
        "a1",
        None,
        None,
        "vote.cast",
    )
    assert ProtocolError(ErrorCode.FORBIDDEN, "no").retryable is False


def test_every_error_is_a_party_sync_error() -> None:
    auth = AuthError(403, "origin not allowed")
    assert (auth.status, auth.reason, str(auth)) == (
        403,
        "origin not allowed",
        "origin not allowed",
    )
    assert InvalidEvent("bad").message == "bad"
    for exc in (
        ProtocolError(ErrorCode.BAD_JSON, "x"),
        InvalidEvent("x"),
        auth,
        BackendUnavailable("x"),
        ConfigError("x"),
    ):
        assert isinstance(exc, PartySyncError)


def test_a_too_large_action_names_its_action_id_when_it_stands_in_its_head() -> None:
    big = action_request(action_id="a-big", payload={"text": "y" * 70_000})
    error = refusal(dumps(big), max_bytes=65536)
    assert error.code is ErrorCode.MESSAGE_TOO_LARGE
    assert (error.type, error.action_id) == (t.ACTION_REQUEST, "a-big")
    # nothing recognisable at the start: nothing is named (and only 4 KiB are looked at)
    junk = b'{"pad":"' + b"x" * 70_000 + b'","type":"action.request"}'
    error = refusal(junk, max_bytes=65536)
    assert (error.type, error.action_id) == (None, None)


# --- explaining a violation costs little, whatever the message holds ----------------------------

_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=80) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=200,
)


@settings(max_examples=150, deadline=None)
@given(
    payload=st.dictionaries(st.sampled_from(["vote_id", "option", "x", "y"]), _JSON_VALUES),
    top=st.dictionaries(st.sampled_from(["trace_id", "seq", "z"]), _JSON_VALUES, max_size=2),
)
def test_the_verdict_is_the_full_validators_and_the_explanation_one_of_its_errors(
    payload: dict[str, Any], top: dict[str, Any]
) -> None:
    """The explanation comes from a bounded copy: where it names a place, the full validator
    finds an error there too."""
    message = {"type": "vote.cast", "payload": payload, **top}
    full = contracts()._validators["vote.cast"]
    if full.is_valid(message):
        contracts().validate("vote.cast", message)
        return
    with pytest.raises(SchemaViolation) as refused:
        contracts().validate("vote.cast", message)
    if refused.value.path:
        paths = {".".join(map(str, e.instance_path)) for e in full.iter_errors(message)}
        assert refused.value.path in paths, (refused.value, paths)


def test_what_is_kept_of_a_message_to_explain_it_is_bounded() -> None:
    big = {"k": list(range(1000)), "s": "x" * 5000, **{f"k{i}": i for i in range(500)}}
    kept = _bounded({"a": [big, big]})
    assert len(kept["a"][0]) == 128 and len(kept["a"][0]["k"]) == 64
    assert len(kept["a"][0]["s"]) == 1024
    assert _bounded({"a": [1, "b", None]}) == {"a": [1, "b", None]}


def test_a_violation_only_past_what_is_kept_is_refused_with_a_plain_explanation(
    tmp_path: Path,
) -> None:
    for name in ("envelope.json", "common.json"):
        (tmp_path / name).write_text((SCHEMA_DIR / name).read_text())
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://schemas.rpg-bot.dev/party_sync/v1/test.list.json",
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"type": "integer"}}},
    }
    (tmp_path / "test.list.json").write_text(json.dumps(schema))
    checked = Contracts(tmp_path)
    checked.validate("test.list", {"items": list(range(100))})
    with pytest.raises(SchemaViolation) as early:
        checked.validate("test.list", {"items": [*range(10), "x"]})
    assert early.value.path == "items.10"
    with pytest.raises(SchemaViolation) as late:  # the 81st item: past the 64 kept
        checked.validate("test.list", {"items": [*range(80), "x"]})
    assert late.value.path == ""
    assert late.value.reason.startswith("does not match its schema: an array or object of more")


def test_a_string_too_long_for_its_schema_is_explained_by_its_field_and_limit(
    tmp_path: Path,
) -> None:
    """A string breaks its ``maxLength`` only past the 1,024 characters kept for the first
    explanation: the 422 said "does not match its schema" and named nothing (HTTP probe: a
    4,001-character ``narration`` of an ``action.result``)."""
    for name in ("envelope.json", "common.json"):
        (tmp_path / name).write_text((SCHEMA_DIR / name).read_text())
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://schemas.rpg-bot.dev/party_sync/v1/test.text.json",
        "type": "object",
        "properties": {"payload": {"properties": {"narration": {"maxLength": 4000}}}},
    }
    (tmp_path / "test.text.json").write_text(json.dumps(schema))
    checked = Contracts(tmp_path)
    checked.validate("test.text", {"payload": {"narration": "n" * 4000}})
    with pytest.raises(SchemaViolation) as refused:
        checked.validate("test.text", {"payload": {"narration": "n" * 4001}})
    assert refused.value.path == "payload.narration"
    assert "longer than 4000" in refused.value.reason


@pytest.mark.parametrize(
    "head",
    [
        # an id nested in the payload, before the real one
        b'{"type":"action.request","payload":{"data":{"action_id":"inner"},"action_id":"outer"',
        # a key-like text inside a string value, before the real one
        b'{"type":"action.request","payload":{"text":"\\"action_id\\":\\"inner\\"",'
        b'"action_id":"outer"',
        # an id in an array, before the real one
        b'{"type":"action.request","payload":{"list":[{"action_id":"inner"}],"action_id":"outer"',
    ],
)
def test_a_too_large_action_is_named_by_its_own_id_not_a_nested_one(head: bytes) -> None:
    big = head + b',"pad":"' + b"y" * MAX + b'"}}'
    error = refusal(big)
    assert (error.type, error.action_id) == (t.ACTION_REQUEST, "outer")


def test_a_too_large_message_is_named_only_by_members_in_their_places() -> None:
    # "type" inside the payload is not the message's type; an id at the top level is not the
    # payload's; a trace id inside the payload is not the message's
    nested = b'{"payload":{"type":"vote.cast","trace_id":"t-in","vote_id":"v"},"pad":"'
    assert refusal(nested + b"y" * MAX + b'"}').type is None
    top = b'{"type":"vote.cast","vote_id":"v-top","payload":{"pad":"'
    error = refusal(top + b"y" * MAX + b'"}}')
    assert (error.type, error.vote_id, error.trace_id) == ("vote.cast", None, None)
