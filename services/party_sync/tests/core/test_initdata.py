"""Telegram Mini App initData validation (``party_sync.initdata``), as a pure function of ``now``.

initData is built here independently of the module under test, straight from Telegram's
description (core.telegram.org/bots/webapps): percent-encoded pairs, a hash over the sorted
``key=value`` lines, keyed by ``HMAC-SHA256("WebAppData", bot_token)``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st
from party_sync.initdata import (
    EXPIRED,
    INVALID,
    MALFORMED,
    MAX_CLOCK_SKEW,
    TELEGRAM_PUBLIC_KEY,
    TELEGRAM_TEST_PUBLIC_KEY,
    InitDataError,
    data_check_string,
    public_key,
    sign_init_data,
    validate_init_data,
)
from ps_testkit import telegram_vector

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


@pytest.mark.parametrize("escape", ["%zz", "%", "%4", "%4g", "%%41"])
def test_an_invalid_percent_escape_is_refused_even_when_signed_as_written(escape: str) -> None:
    """``parse_qsl`` keeps an invalid escape as literal text: signed that way it verified (a
    second parser may decode it otherwise), and added to signed data it was a bad hash (401)
    rather than malformed (400)."""
    pairs = fields()
    signed = {**pairs, "x": escape}
    raw = encode([*signed.items(), ("hash", telegram_hash(signed))]).replace(
        quote(escape, safe=""), escape
    )
    assert escape in raw
    refused(raw, 400, MALFORMED)
    refused(init_data(pairs) + "&x=" + escape, 400, MALFORMED)


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


# --- Third-party validation: Telegram's Ed25519 ``signature`` -----------------------------------
#
# The message is built here from Telegram's description ("Validating data for Third-Party Use"),
# not via the module under test: "<bot_id>:WebAppData\n" + the sorted key=value lines without
# hash and signature; the signature is base64url without padding. Telegram's private key is not
# ours, so these tests sign with a generated key injected as ``telegram_key``; the published
# vector below checks Telegram's real production key.

BOT_ID = 7000000001
_PRIVATE = Ed25519PrivateKey.generate()
TEST_KEY = _PRIVATE.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def ed25519_signature(pairs: dict[str, str], bot_id: int = BOT_ID) -> str:
    lines = "\n".join(
        f"{k}={v}" for k, v in sorted(pairs.items()) if k not in ("hash", "signature")
    )
    signed = _PRIVATE.sign(f"{bot_id}:WebAppData\n{lines}".encode())
    return base64.urlsafe_b64encode(signed).decode().rstrip("=")


def third_party_fields(
    bot_id: int = BOT_ID, auth_date: float | str = NOW - 60, **extra: str
) -> dict[str, str]:
    pairs = {k: v for k, v in fields(auth_date, **extra).items() if k != "signature"}
    return {**pairs, "signature": ed25519_signature(pairs, bot_id)}


def check_3p(
    raw: str, *, bot_token: str | None = None, bot_id: int = BOT_ID, key: bytes = TEST_KEY
) -> None:
    validate_init_data(raw, bot_token, now=NOW, max_age=MAX_AGE, bot_id=bot_id, telegram_key=key)


def refused_3p(raw: str, status: int, code: str, **kwargs: Any) -> None:
    with pytest.raises(InitDataError) as caught:
        check_3p(raw, **kwargs)
    assert (caught.value.status, caught.value.code) == (status, code), caught.value.reason


def test_a_signature_alone_authenticates_when_only_the_bot_id_is_configured() -> None:
    pairs = third_party_fields()
    # The hash cannot be checked without the bot token: any (or none) is accepted.
    data = validate_init_data(
        encode([*pairs.items(), ("hash", "0" * 64)]),
        None,
        now=NOW,
        max_age=MAX_AGE,
        bot_id=BOT_ID,
        telegram_key=TEST_KEY,
    )
    assert data.user.id == USER["id"]
    check_3p(encode(list(pairs.items())))


@pytest.mark.parametrize("key", ["query_id", "user", "auth_date", "added"])
def test_a_tampered_field_breaks_the_signature(key: str) -> None:
    pairs = third_party_fields()
    if key == "added":
        pairs["start_param"] = "x"
    else:
        pairs[key] = {"user": json.dumps({**USER, "id": 1}), "auth_date": str(int(NOW))}.get(
            key, pairs[key] + "x"
        )
    refused_3p(encode(list(pairs.items())), 401, INVALID)


def test_the_signature_of_another_bot_is_refused() -> None:
    refused_3p(encode(list(third_party_fields(bot_id=BOT_ID + 1).items())), 401, INVALID)
    refused_3p(encode(list(third_party_fields().items())), 401, INVALID, bot_id=BOT_ID + 1)


def test_a_signature_by_another_key_is_refused() -> None:
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    refused_3p(encode(list(third_party_fields().items())), 401, INVALID, key=other)


def test_a_missing_signature_is_refused_when_it_is_the_only_check() -> None:
    pairs = {k: v for k, v in third_party_fields().items() if k != "signature"}
    refused_3p(encode([*pairs.items(), ("hash", telegram_hash(pairs))]), 401, INVALID)


@pytest.mark.parametrize(
    "bad",
    ["", "x", "A" * 85, "A" * 87, "+" * 86, "/" * 86, "=" * 86, "sig", "A" * 84 + "=="],
    ids=["empty", "short", "85", "87", "plus", "slash", "pad", "word", "padded"],
)
def test_a_malformed_signature_is_refused(bad: str) -> None:
    pairs = {**third_party_fields(), "signature": bad}
    refused_3p(encode(list(pairs.items())), 401, INVALID)


def test_a_padded_or_standard_base64_signature_is_not_the_wire_format() -> None:
    pairs = third_party_fields()
    raw_sig = base64.urlsafe_b64decode(pairs["signature"] + "==")
    for other in (base64.urlsafe_b64encode(raw_sig).decode(), base64.b64encode(raw_sig).decode()):
        if other != pairs["signature"]:
            refused_3p(encode(list({**pairs, "signature": other}.items())), 401, INVALID)


def test_with_the_bot_token_too_a_present_signature_must_verify_as_well() -> None:
    pairs = third_party_fields()
    both = encode([*pairs.items(), ("hash", telegram_hash(pairs))])
    check_3p(both, bot_token=BOT_TOKEN)
    # A good hash does not excuse a bad signature (the hash covers the forged signature).
    forged = {**pairs, "signature": third_party_fields(bot_id=BOT_ID + 1)["signature"]}
    refused_3p(
        encode([*forged.items(), ("hash", telegram_hash(forged))]),
        401,
        INVALID,
        bot_token=BOT_TOKEN,
    )
    # A good signature does not excuse a bad hash.
    refused_3p(encode([*pairs.items(), ("hash", "0" * 64)]), 401, INVALID, bot_token=BOT_TOKEN)
    refused_3p(encode(list(pairs.items())), 401, INVALID, bot_token=BOT_TOKEN)


def test_with_the_bot_token_too_initdata_without_signature_needs_the_hash_only() -> None:
    # Telegram clients before Bot API 8.0 send no signature: the HMAC alone authenticates them.
    pairs = {k: v for k, v in fields().items() if k != "signature"}
    check_3p(encode([*pairs.items(), ("hash", telegram_hash(pairs))]), bot_token=BOT_TOKEN)


def test_the_signature_is_checked_before_anything_is_interpreted() -> None:
    pairs = {**fields(user="not json", auth_date="zzz"), "signature": "A" * 86}
    refused_3p(encode(list(pairs.items())), 401, INVALID)


def test_freshness_applies_to_signed_init_data_too() -> None:
    refused_3p(encode(list(third_party_fields(auth_date=NOW - MAX_AGE - 1).items())), 401, EXPIRED)


def test_neither_bot_token_nor_bot_id_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="bot_id"):
        validate_init_data(init_data(), None, now=NOW, max_age=MAX_AGE)


PUBLISHED = telegram_vector.INIT_DATA
PUBLISHED_BOT_ID = telegram_vector.BOT_ID


def test_telegram_published_keys() -> None:
    # The hex strings of "Validating data for Third-Party Use" (core.telegram.org/bots/webapps).
    assert TELEGRAM_PUBLIC_KEY.hex() == (
        "e7bf03a2fa4602af4580703d88dda5bb59f32ed8b02a56c187fe7d34caed242d"
    )
    assert TELEGRAM_TEST_PUBLIC_KEY.hex() == (
        "40055058a4ee38156a06562e52eece92a771bcd8346a8c4615cb7376eddf72ec"
    )
    assert public_key(test_env=False) == TELEGRAM_PUBLIC_KEY
    assert public_key(test_env=True) == TELEGRAM_TEST_PUBLIC_KEY


def published(raw: str = PUBLISHED, bot_id: int = PUBLISHED_BOT_ID, test_env: bool = False) -> int:
    """initData signed by Telegram (``ps_testkit.telegram_vector``), checked with its real key."""
    data = validate_init_data(
        raw,
        None,
        now=telegram_vector.AUTH_DATE + 60,
        max_age=MAX_AGE,
        bot_id=bot_id,
        test_env=test_env,
    )
    return data.user.id


def test_initdata_signed_by_telegram_verifies_with_the_production_key() -> None:
    assert published() == telegram_vector.USER_ID


@pytest.mark.parametrize(
    ("raw", "bot_id", "test_env"),
    [
        (PUBLISHED.replace("chat_type=private", "chat_type=sender"), PUBLISHED_BOT_ID, False),
        (PUBLISHED, PUBLISHED_BOT_ID + 1, False),
        (PUBLISHED, PUBLISHED_BOT_ID, True),
    ],
    ids=["tampered", "other-bot", "test-environment-key"],
)
def test_initdata_signed_by_telegram_is_refused_when_anything_differs(
    raw: str, bot_id: int, test_env: bool
) -> None:
    with pytest.raises(InitDataError) as caught:
        published(raw, bot_id, test_env)
    assert (caught.value.status, caught.value.code) == (401, INVALID)
