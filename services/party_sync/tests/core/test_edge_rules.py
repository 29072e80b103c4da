"""The id rule and the display-name rule (docs/security.md, "What is checked at the edge"), as
pure functions, and the token side of the name rule: issued names are refused, accepted names are
normalised."""

from __future__ import annotations

import json
import re
import time
import unicodedata
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from party_sync.auth import TokenVerifier, issue_token
from party_sync.protocol.ids import ID_PATTERN, TRACE_ID_PATTERN, is_id, is_trace_id
from party_sync.protocol.names import MAX_NAME_CHARS, clean_name, name_problem

REPO_ROOT = Path(__file__).resolve().parents[4]
COMMON = json.loads(
    (REPO_ROOT / "contracts" / "jsonschema" / "party_sync" / "common.json").read_text("utf-8")
)["$defs"]
SECRET = "s" * 64
SCHEMA_ID = jsonschema_rs.validator_for({"type": "string", "pattern": ID_PATTERN})

# -- ids ---------------------------------------------------------------------------------------

ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"
good_ids = st.text(alphabet=ID_CHARS, min_size=1, max_size=64)
#: Ids that break the rule: a forbidden character somewhere, empty, or too long.
bad_ids = st.one_of(
    st.just(""),
    st.text(alphabet=ID_CHARS, min_size=65, max_size=3000),
    st.tuples(
        st.text(alphabet=ID_CHARS, max_size=30),
        st.sampled_from(
            ["*", "?", " ", "\n", "\r", "\x00", "/", "{", "á", "\u202e", "\t", "\ud800"]
        )
        | st.characters(blacklist_characters=ID_CHARS),
        st.text(alphabet=ID_CHARS, max_size=30),
    ).map("".join),
)


def test_the_patterns_are_the_schemas() -> None:
    assert COMMON["id"]["pattern"] == ID_PATTERN
    assert COMMON["trace_id"]["pattern"] == TRACE_ID_PATTERN


@settings(max_examples=300, deadline=None)
@given(good_ids)
def test_every_id_of_the_alphabet_is_an_id(value: str) -> None:
    assert is_id(value)
    assert is_trace_id(value)


@settings(max_examples=500, deadline=None)
@given(bad_ids)
def test_ids_that_break_the_rule_are_refused(value: str) -> None:
    assert not is_id(value)
    if not any("\ud800" <= c <= "\udfff" for c in value):  # not a str Rust can take
        # the documented pattern agrees, with JSON Schema's (ECMA) "$": no final-newline escape
        assert not SCHEMA_ID.is_valid(value)
    assert re.search(ID_PATTERN, value) is None or value.endswith("\n")  # Python's "$" would


@pytest.mark.parametrize("value", ["aria\n", "x" * 65, 7, None, b"aria", ["aria"], "ária"])
def test_not_ids(value: Any) -> None:
    assert not is_id(value)  # "aria\n" passes re.match("^...$"): fullmatch is what counts


# -- display names -----------------------------------------------------------------------------

REFUSED = (
    [chr(c) for c in range(0x20)]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + ["\u2028", "\u2029", "\u061c", "\u200e", "\u200f"]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
    + ["\u200b", "\u2060", "\ufeff", "\ud800", "\udfff"]
)


@pytest.mark.parametrize("char", REFUSED, ids=lambda c: f"U+{ord(c):04X}")
def test_control_bidi_and_invisible_characters_are_refused(char: str) -> None:
    assert name_problem(f"Ari{char}a") is not None
    cleaned = clean_name(f"Ari{char}a", "aria")
    assert cleaned in {"Aria", "Ari a"}


@pytest.mark.parametrize(
    "name",
    ["Aria", "Åria ✓", "Бо́рин", "<b>Borin</b>", "👨\u200d👩\u200d👧 family", "مرحبا", "x" * 64],
)
def test_ordinary_names_html_and_emoji_sequences_are_accepted_unchanged(name: str) -> None:
    assert name_problem(name) is None
    assert clean_name(name, "fallback") == name


@pytest.mark.parametrize("name", ["", " ", "\u3000", "x" * 65, 7, None, ["Aria"]])
def test_blank_long_or_non_string_names_are_refused_and_fall_back(name: Any) -> None:
    assert name_problem(name) is not None
    assert clean_name(name, "aria") == "aria"


def test_what_normalising_does() -> None:
    assert clean_name("Aria\r\nthe\tBold", "a") == "Aria  the Bold"
    assert clean_name("\u202eairA\u202c", "a") == "airA"  # the override is gone, not applied
    assert clean_name("Evil\x1b[2J\x00", "a") == "Evil[2J"  # no terminal escape survives
    assert clean_name("\u200b\u200b", "aria") == "aria"  # nothing visible left
    assert clean_name("\n\n", "aria") == "aria"


def _forbidden(char: str) -> bool:
    return unicodedata.category(char) in {"Cc", "Cs", "Zl", "Zp"} or char in "".join(REFUSED)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_a_normalised_name_follows_the_rule_and_a_valid_name_is_kept(raw: str) -> None:
    cleaned = clean_name(raw, "fallback")
    assert name_problem(cleaned) is None
    assert not any(_forbidden(c) for c in cleaned)
    assert 1 <= len(cleaned) <= MAX_NAME_CHARS
    if name_problem(raw) is None:
        assert cleaned == raw


# -- tokens: issued names are refused, accepted names normalised --------------------------------


def _issue(name: str, **ids: str) -> str:
    fields = {"party_id": "p1", "campaign_run_id": "r1", "character_id": "aria", **ids}
    return issue_token(
        SECRET,
        party_id=fields["party_id"],
        campaign_run_id=fields["campaign_run_id"],
        character_id=fields["character_id"],
        display_name=name,
        now=time.time(),
    )


@pytest.mark.parametrize("name", ["Aria\n", "A\u202eB", "\x00", "", " ", "x" * 65])
def test_issue_token_refuses_a_name_that_breaks_the_rule(name: str) -> None:
    with pytest.raises(ValueError, match="display_name"):
        _issue(name)


@pytest.mark.parametrize(
    "ids",
    [{"party_id": "has space"}, {"campaign_run_id": "a\n"}, {"character_id": "party"}],
)
def test_issue_token_refuses_bad_ids(ids: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"party_id|campaign_run_id|character_id"):
        _issue("Aria", **ids)


def test_a_signed_token_with_a_hostile_name_is_accepted_with_the_name_cleaned() -> None:
    import jwt

    claims = {
        "party_id": "p1",
        "campaign_run_id": "r1",
        "character_id": "aria",
        "display_name": "Ar\u202eia\r\n<script>\x00",
        "aud": "party_sync",
        "exp": int(time.time()) + 600,
    }
    verified = TokenVerifier([SECRET]).verify(jwt.encode(claims, SECRET, algorithm="HS256"))
    assert verified.display_name == "Aria  <script>"


# -- clients render names as text -----------------------------------------------------------------

HTML_SINKS = re.compile(
    r"\.innerHTML\b|\.outerHTML\b|insertAdjacentHTML|document\.write|createContextualFragment"
    r"|\.srcdoc\b|DOMParser"
)


def test_the_browser_client_and_demo_never_parse_strings_as_html() -> None:
    """Names (and every other server string) reach the DOM as text nodes (textContent, append
    of a string), never through an HTML parser: a name like ``<img onerror=...>`` stays text."""
    sources = [
        *sorted((REPO_ROOT / "clients" / "js" / "src").glob("*.ts")),
        *sorted((REPO_ROOT / "clients" / "js" / "demo").glob("*.ts")),
    ]
    assert len(sources) >= 5
    offenders = [
        f"{path.name}:{n}"
        for path in sources
        for n, line in enumerate(path.read_text("utf-8").splitlines(), 1)
        if HTML_SINKS.search(line)
    ]
    assert offenders == []
