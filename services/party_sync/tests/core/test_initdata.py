"""Telegram Mini App initData validation (``party_sync.initdata``), as a pure function of ``now``.

initData is built here independently of the module under test, straight from Telegram's
description (core.telegram.org/bots/webapps): percent-encoded pairs, a hash over the sorted
``key=value`` lines, keyed by ``HMAC-SHA256("WebAppData", bot_token)``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from party_sync.initdata import (
    EXPIRED,
    INVALID,
    MALFORMED,
    MAX_CLOCK_SKEW,
    InitDataError,
    data_check_string,
    sign_init_data,
    validate_init_data,
)

BOT_TOKEN = "123456789:AAH-test-bot-token-for-party-sync-tests"
NOW = 1_750_000_000.0
MAX_AGE = 3600.0
USER = {"id": 279058397, "first_name": "Aria", "username": "aria_plays", "language_code": "en"}


def telegram_hash(pairs: dict[str, str], bot_token: str = BOT_TOKEN) -> str:
    """The hash exactly as the documentation describes it (not via the module under test)."""
    check = "\n".join(f"{k}={v}" for k, v in sorted(pairs.items()))
    key = hmac.new(b"WebAppData", bot_token.encode(), hashlib.sha256).digest()
    return hmac.new(key, check.encode(), hashlib.sha256).hexdigest()


def encode(pairs: list[tuple[str, str]]) -> str:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)


def fields(auth_date: float | str = NOW - 60, **extra: str) -> dict[str, str]:
    base = {
        "query_id": "AAHdF6IQAAAAAN0XohDhrOrc",
        "user": json.dumps(USER, separators=(",", ":")),
        "auth_date": auth_date if isinstance(auth_date, str) else str(int(auth_date)),
        "signature": "SGVsbG8td29ybGQtc2lnbmF0dXJl_x",
    }
    base.update(extra)
    return base


def init_data(pairs: dict[str, str] | None = None, bot_token: str = BOT_TOKEN) -> str:
    pairs = fields() if pairs is None else pairs
    return encode([*pairs.items(), ("hash", telegram_hash(pairs, bot_token))])


def check(raw: str, now: float = NOW, bot_token: str = BOT_TOKEN) -> None:
    validate_init_data(raw, bot_token, now=now, max_age=MAX_AGE)


def refused(raw: str, status: int, code: str, now: float = NOW, bot: str = BOT_TOKEN) -> None:
    with pytest.raises(InitDataError) as caught:
        validate_init_data(raw, bot, now=now, max_age=MAX_AGE)
    assert (caught.value.status, caught.value.code) == (status, code), caught.value.reason


def test_a_valid_init_data_gives_the_user_and_the_fields() -> None:
    data = validate_init_data(init_data(), BOT_TOKEN, now=NOW, max_age=MAX_AGE)
    assert data.user.id == USER["id"]
    assert data.user.first_name == "Aria" and data.user.username == "aria_plays"
    assert data.auth_date == int(NOW - 60)
    assert "hash" not in data.fields and data.fields["signature"]  # signature is HMAC-covered


def test_field_order_in_the_query_string_does_not_matter() -> None:
    pairs = fields()
    items = [*reversed(pairs.items()), ("hash", telegram_hash(pairs))]
    check(encode(items))
    check(encode([items[-1], *items[:-1]]))  # hash first


def test_sign_init_data_matches_the_documented_algorithm() -> None:
    pairs = fields()
    check(sign_init_data(pairs, BOT_TOKEN))
    assert data_check_string(pairs).split("\n")[0].startswith("auth_date=")
    assert f"hash={telegram_hash(pairs)}" in sign_init_data(pairs, BOT_TOKEN)


@pytest.mark.parametrize("key", ["query_id", "user", "auth_date", "signature"])
def test_a_tampered_field_is_refused(key: str) -> None:
    pairs = fields()
    digest = telegram_hash(pairs)
    tampered = dict(pairs)
    tampered[key] = {
        "user": json.dumps({**USER, "id": 1}),
        "auth_date": str(int(NOW)),
    }.get(key, pairs[key] + "x")
    refused(encode([*tampered.items(), ("hash", digest)]), 401, INVALID)


def test_an_added_or_removed_field_is_refused() -> None:
    pairs = fields()
    digest = telegram_hash(pairs)
    refused(encode([*pairs.items(), ("start_param", "x"), ("hash", digest)]), 401, INVALID)
    fewer = {k: v for k, v in pairs.items() if k != "query_id"}
    refused(encode([*fewer.items(), ("hash", digest)]), 401, INVALID)


def test_another_bot_token_is_refused() -> None:
    refused(init_data(bot_token="987654321:another-bot"), 401, INVALID)
    refused(init_data(), 401, INVALID, bot="987654321:another-bot")


def test_the_hash_itself_must_be_64_lowercase_hex() -> None:
    pairs = fields()
    digest = telegram_hash(pairs)
    for bad in (digest.upper(), digest[:-1], digest + "0", "", "é" * 64):
        refused(encode([*pairs.items(), ("hash", bad)]), 401, INVALID)


def test_a_missing_hash_is_refused() -> None:
    refused(encode(list(fields().items())), 401, INVALID)


def test_a_duplicate_key_is_refused_even_with_a_valid_hash() -> None:
    pairs = fields()
    digest = telegram_hash(pairs)
    items = list(pairs.items())
    refused(encode([*items, ("user", pairs["user"]), ("hash", digest)]), 400, MALFORMED)
    refused(encode([*items, ("hash", digest), ("hash", digest)]), 400, MALFORMED)


@pytest.mark.parametrize(
    "raw",
    ["user", "a=1&&b=2", "&a=1", "a=1&", "a=%FF", "a%3Db=1", "a%0Ab=1", "a=1%0Ab%3D2", "x" * 9000],
)
def test_malformed_query_strings_are_refused(raw: str) -> None:
    refused(raw, 400, MALFORMED)


def test_an_empty_string_has_no_hash() -> None:
    refused("", 401, INVALID)


def test_too_many_fields_are_refused() -> None:
    refused("&".join(f"k{i}=v" for i in range(40)), 400, MALFORMED)


def test_auth_date_at_the_edge_of_max_age() -> None:
    check(init_data(fields(auth_date=NOW - MAX_AGE)))
    refused(init_data(fields(auth_date=NOW - MAX_AGE - 1)), 401, EXPIRED)


def test_auth_date_in_the_future_is_refused_beyond_the_skew() -> None:
    check(init_data(fields(auth_date=NOW + MAX_CLOCK_SKEW)))
    refused(init_data(fields(auth_date=NOW + MAX_CLOCK_SKEW + 1)), 401, EXPIRED)


@pytest.mark.parametrize("auth_date", ["", "abc", "-5", "+17", "1_700", " 17", "1.5", "9" * 13])
def test_auth_date_must_be_plain_digits(auth_date: str) -> None:
    refused(init_data(fields(auth_date=auth_date)), 400, MALFORMED)


@pytest.mark.parametrize(
    "user",
    [None, "not json", "[1]", '{"first_name":"A"}', '{"id":"5"}', '{"id":true}', '{"id":0}'],
)
def test_the_user_must_be_an_object_with_a_positive_integer_id(user: str | None) -> None:
    pairs = fields()
    if user is None:
        del pairs["user"]
    else:
        pairs["user"] = user
    refused(init_data(pairs), 400, MALFORMED)


def test_the_hash_is_checked_before_anything_is_interpreted() -> None:
    pairs = fields(user="not json", auth_date="zzz")
    refused(encode([*pairs.items(), ("hash", "0" * 64)]), 401, INVALID)


def test_an_empty_bot_token_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="bot_token"):
        validate_init_data(init_data(), "", now=NOW, max_age=MAX_AGE)


_keys = st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(lambda k: k not in {"hash", "user"})
_values = st.text(st.characters(exclude_characters="\n", codec="utf-8"), max_size=40)


@given(extra=st.dictionaries(_keys, _values, max_size=6), age=st.integers(0, int(MAX_AGE)))
def test_any_field_set_signed_by_the_bot_is_valid(extra: dict[str, str], age: int) -> None:
    pairs = {**extra, **fields(auth_date=NOW - age)}
    data = validate_init_data(init_data(pairs), BOT_TOKEN, now=NOW, max_age=MAX_AGE)
    assert dict(data.fields) == pairs


@given(
    extra=st.dictionaries(_keys, _values, max_size=4),
    victim=st.sampled_from(["query_id", "user", "auth_date", "signature"]),
    change=st.text(st.characters(exclude_characters="\n", codec="utf-8"), min_size=1, max_size=8),
)
def test_any_change_to_a_signed_value_is_refused(
    extra: dict[str, str], victim: str, change: str
) -> None:
    pairs = {**extra, **fields()}
    digest = telegram_hash(pairs)
    pairs[victim] = pairs[victim] + change
    with pytest.raises(InitDataError) as caught:
        validate_init_data(
            encode([*pairs.items(), ("hash", digest)]), BOT_TOKEN, now=NOW, max_age=MAX_AGE
        )
    assert caught.value.status == 401 and caught.value.code == INVALID
