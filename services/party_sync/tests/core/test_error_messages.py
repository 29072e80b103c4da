"""The ``message`` of a ``system.error`` (``party_sync.protocol.replies``): whatever an engine
writes in a refusal (its own words reach the player), the message sent is valid by the schema
(1 to 500 characters), one line, with no control or bidirectional characters and encodable."""

from __future__ import annotations

import unicodedata

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from party_sync.protocol import codec, replies
from party_sync.protocol.errors import RETRYABLE, ErrorCode
from party_sync.protocol.schemas import Contracts

CONTRACTS = Contracts()
BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def refusal(message: str, code: ErrorCode = ErrorCode.ACTION_REJECTED) -> dict[str, object]:
    return replies.error(
        code, message, now=1.0, trace_id="t-1", in_reply_type="action.request", action_id="a-1"
    )


@given(st.text(), st.sampled_from(list(ErrorCode)))
def test_any_message_makes_a_valid_encodable_error(message: str, code: ErrorCode) -> None:
    error = refusal(message, code)
    CONTRACTS.validate("system.error", error)
    said = error["payload"]["message"]  # type: ignore[index]
    assert isinstance(said, str)
    assert orjson.loads(codec.encode(error))["payload"]["message"] == said
    assert not any(unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") for char in said)
    assert not set(said) & set(BIDI)
    assert said == said.strip()
    assert any(unicodedata.category(char)[0] not in "CMZ" for char in said)  # something to see
    assert error["payload"]["retryable"] is (code in RETRYABLE)  # type: ignore[index]


@given(st.from_regex(r"[!-~]([ -~]{0,498}[!-~])?", fullmatch=True).filter(lambda s: "  " not in s))
def test_a_plain_message_is_sent_as_written(message: str) -> None:
    assert refusal(message)["payload"]["message"] == message  # type: ignore[index]


@pytest.mark.parametrize(
    ("written", "sent"),
    [
        ("out of\nrange", "out of range"),
        ("\x1b[31mred\x1b[0m", "[31mred [0m"),
        ("abc\u202edef", "abcdef"),
        ("nul\x00here", "nul here"),
        ("lone \ud800 surrogate", "lone \ufffd surrogate"),
        ("", "action rejected"),
        (" \t\n ", "action rejected"),
        ("\u00a0\u200b\ufeff", "action rejected"),  # nothing to see (recheck probe)
        ("\u200b\u0301\u2060 ok", "\u200b\u0301\u2060 ok"),  # something to see: kept
        ("x" * 501, "x" * 499 + "…"),
        ("é" * 500, "é" * 500),
    ],
)
def test_what_an_engine_writes_becomes_what_is_sent(written: str, sent: str) -> None:
    assert refusal(written)["payload"]["message"] == sent  # type: ignore[index]
