"""Telegram Mini App ``initData``: validation as a pure function (no I/O; ``now`` is passed in).

Two checks exist (core.telegram.org/bots/webapps); party_sync runs the ones it is configured for.

**First-party** ("Validating data received via the Mini App"), with the bot token:

1. parse the raw query string **once** (``parse_qsl(..., strict_parsing=True)``) and refuse
   duplicate keys and invalid percent escapes (``%`` not followed by two hex digits), so no
   second parser can see different fields than the one that was checked;
2. remove ``hash``; sort the remaining ``key=value`` pairs by key and join them with ``"\\n"``:
   the *data-check string* (``signature``, when present, stays in it: the HMAC covers it);
3. ``secret_key = HMAC-SHA256(key=b"WebAppData", msg=bot_token)`` (the raw 32 bytes);
4. valid if ``hex(HMAC-SHA256(key=secret_key, msg=data_check_string)) == hash``, compared in
   constant time.

**Third-party** ("Validating data for Third-Party Use"), with the bot id (no bot token needed):

5. remove ``hash`` **and** ``signature``; the signed message is
   ``"<bot_id>:WebAppData\\n"`` followed by the sorted ``key=value`` lines;
6. ``signature`` is the base64url (unpadded) Ed25519 signature of that message by Telegram's key
   (one for production, one for the test environment); verified with pyca/cryptography, never
   by hand. The bot id is part of the message, so initData of another bot never verifies.

Which checks run: with a bot token, the HMAC is required; with a bot id, ``signature`` is
required when there is no bot token and, when there is one, checked whenever present (Telegram
clients before Bot API 8.0 send none). Then, for every mode:

7. ``auth_date`` must be recent (``max_age``) and not in the future (``max_skew``), because
   initData is a bearer credential that Telegram renews only when the Mini App is reopened.

A valid initData proves *who* the user is, never which party or character they may play: that
binding comes from party_sync's membership directory (``party_sync.backends.directory``).

Errors carry a stable ``code`` and an HTTP ``status`` and nothing about the inputs, so a response
never reveals more than which *kind* of check failed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from party_sync.protocol.errors import PartySyncError

#: Largest raw initData accepted (Telegram's are well under 2 KiB; a photo_url adds a few hundred).
MAX_INIT_DATA_BYTES: Final = 8192
#: Seconds ``auth_date`` may lie ahead of our clock (clock skew between Telegram and us).
MAX_CLOCK_SKEW: Final = 30.0
#: Most fields accepted; Telegram sends about ten.
MAX_FIELDS: Final = 32

_KEY = re.compile(r"^[A-Za-z0-9_]{1,64}$")
#: A ``%`` that does not start an escape of two hex digits: ``parse_qsl`` keeps it as text,
#: where another parser may not (refused: one reading only)
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HASH = re.compile(r"^[0-9a-f]{64}$")
_DIGITS = re.compile(r"^[0-9]{1,12}$")
#: An Ed25519 signature is 64 bytes: 86 base64url characters without padding.
_SIGNATURE = re.compile(r"^[A-Za-z0-9_-]{86}$")
_WEB_APP_DATA: Final = b"WebAppData"

#: Telegram's Ed25519 public keys for third-party validation, as published in "Validating data
#: for Third-Party Use" (core.telegram.org/bots/webapps). Production:
TELEGRAM_PUBLIC_KEY: Final = bytes.fromhex(
    "e7bf03a2fa4602af4580703d88dda5bb59f32ed8b02a56c187fe7d34caed242d"
)
#: ... and Telegram's test environment (test.telegram.org accounts and bots).
TELEGRAM_TEST_PUBLIC_KEY: Final = bytes.fromhex(
    "40055058a4ee38156a06562e52eece92a771bcd8346a8c4615cb7376eddf72ec"
)

MALFORMED: Final = "malformed_init_data"
#: The ``reason`` of a ``MALFORMED`` refusal for an initData over ``MAX_INIT_DATA_BYTES``.
TOO_LONG: Final = "too long"
INVALID: Final = "invalid_init_data"
EXPIRED: Final = "init_data_expired"


class InitDataError(PartySyncError):
    """initData refused: ``status`` 400 (``malformed_init_data``) or 401 (``invalid_init_data``,
    ``init_data_expired``). ``reason`` is for tests and debug logs, never for the response."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.status = status
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TelegramUser:
    id: int
    first_name: str
    username: str | None


@dataclass(frozen=True, slots=True)
class InitData:
    """A verified initData: the user, when it was signed, and every field (without ``hash``)."""

    user: TelegramUser
    auth_date: int
    fields: Mapping[str, str]


def secret_key(bot_token: str) -> bytes:
    """``HMAC-SHA256(key="WebAppData", msg=bot_token)``: the key that signs a bot's initData."""
    return hmac.new(_WEB_APP_DATA, bot_token.encode(), hashlib.sha256).digest()


def data_check_string(fields: Mapping[str, str]) -> str:
    """The sorted ``key=value`` lines, ``hash`` excluded (the caller removes it)."""
    return "\n".join(f"{key}={fields[key]}" for key in sorted(fields))


def _sign(fields: Mapping[str, str], bot_token: str) -> str:
    message = data_check_string(fields).encode()
    return hmac.new(secret_key(bot_token), message, hashlib.sha256).hexdigest()


def third_party_check_string(fields: Mapping[str, str], bot_id: int) -> str:
    """``"<bot_id>:WebAppData\\n"`` + the sorted lines, ``hash`` and ``signature`` excluded."""
    signed = {key: value for key, value in fields.items() if key not in ("hash", "signature")}
    return f"{bot_id}:WebAppData\n" + data_check_string(signed)


def public_key(test_env: bool) -> bytes:
    """Telegram's third-party key: the test environment's or production's."""
    return TELEGRAM_TEST_PUBLIC_KEY if test_env else TELEGRAM_PUBLIC_KEY


def sign_init_data(fields: Mapping[str, str], bot_token: str) -> str:
    """A raw initData query string signed like Telegram signs it (for tests and local tooling)."""
    if "hash" in fields:
        raise ValueError("fields must not contain hash")
    return urlencode({**fields, "hash": _sign(fields, bot_token)})


def parse_fields(raw: str) -> dict[str, str]:
    """Parse the query string strictly, once; refuse duplicates and ambiguous keys or values."""
    if len(raw.encode()) > MAX_INIT_DATA_BYTES:
        raise InitDataError(400, MALFORMED, TOO_LONG)
    if _BAD_ESCAPE.search(raw):
        raise InitDataError(400, MALFORMED, "bad percent escape")
    try:
        pairs = parse_qsl(
            raw,
            keep_blank_values=True,
            strict_parsing=True,
            errors="strict",  # invalid UTF-8 is refused, not silently replaced
            max_num_fields=MAX_FIELDS,
        )
    except ValueError:  # also UnicodeDecodeError
        raise InitDataError(400, MALFORMED, "not a query string") from None
    fields: dict[str, str] = {}
    for key, value in pairs:
        if key in fields:
            raise InitDataError(400, MALFORMED, "duplicate key")
        # A key with "=" or a value with "\n" could move a line boundary of the data-check
        # string: two different field sets would then share one valid hash.
        if not _KEY.fullmatch(key) or "\n" in value:
            raise InitDataError(400, MALFORMED, "bad key or value")
        fields[key] = value
    return fields


def validate_init_data(
    raw: str,
    bot_token: str | None,
    *,
    now: float,
    max_age: float,
    max_skew: float = MAX_CLOCK_SKEW,
    bot_id: int | None = None,
    test_env: bool = False,
    telegram_key: bytes | None = None,
) -> InitData:
    """Check ``raw`` (``Telegram.WebApp.initData``) at time ``now``.

    ``bot_token`` (first-party HMAC) and ``bot_id`` (third-party Ed25519 ``signature``, with
    Telegram's production key, or its test-environment key when ``test_env``) select the
    checks; at least one must be given. ``telegram_key`` replaces Telegram's key (raw 32 bytes):
    for tests only, which cannot sign with Telegram's private key.

    Returns the verified data, or raises ``InitDataError``. Every signature is checked before
    any field is interpreted, so nothing unsigned is ever trusted.
    """
    if not bot_token and bot_id is None:
        raise ValueError("bot_token or bot_id is required")
    fields = parse_fields(raw)
    given = fields.pop("hash", None)
    if bot_token:
        if given is None or not _HASH.fullmatch(given):
            raise InitDataError(401, INVALID, "missing or malformed hash")
        expected = _sign(fields, bot_token)
        if not hmac.compare_digest(expected.encode(), given.encode()):
            raise InitDataError(401, INVALID, "hash mismatch")
    if bot_id is not None and (not bot_token or "signature" in fields):
        key = telegram_key if telegram_key is not None else public_key(test_env)
        _verify_signature(fields, bot_id, key)
    auth_date = fields.get("auth_date", "")
    if not _DIGITS.fullmatch(auth_date):
        raise InitDataError(400, MALFORMED, "auth_date is not a Unix time")
    signed_at = int(auth_date)
    if now - signed_at > max_age:
        raise InitDataError(401, EXPIRED, "auth_date too old")
    if signed_at - now > max_skew:
        raise InitDataError(401, EXPIRED, "auth_date in the future")
    return InitData(_user(fields.get("user")), signed_at, fields)


def _verify_signature(fields: Mapping[str, str], bot_id: int, key: bytes) -> None:
    """Telegram's Ed25519 ``signature`` over the third-party check string, or 401."""
    encoded = fields.get("signature")
    if encoded is None or not _SIGNATURE.fullmatch(encoded):
        raise InitDataError(401, INVALID, "missing or malformed signature")
    signature = base64.urlsafe_b64decode(encoded + "==")  # 86 checked characters: 64 bytes
    message = third_party_check_string(fields, bot_id).encode()
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(signature, message)
    except InvalidSignature:
        raise InitDataError(401, INVALID, "signature mismatch") from None


def _user(raw: str | None) -> TelegramUser:
    if raw is None:
        raise InitDataError(400, MALFORMED, "no user")
    try:
        user: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InitDataError(400, MALFORMED, "user is not JSON") from None
    if not isinstance(user, dict):
        raise InitDataError(400, MALFORMED, "user is not an object")
    user_id = user.get("id")
    # bool is an int subclass: {"id": true} must not become user 1.
    if not isinstance(user_id, int) or isinstance(user_id, bool) or not 0 < user_id < 2**63:
        raise InitDataError(400, MALFORMED, "user.id is not a positive integer")
    first_name = user.get("first_name")
    username = user.get("username")
    return TelegramUser(
        id=user_id,
        first_name=first_name if isinstance(first_name, str) else "",
        username=username if isinstance(username, str) else None,
    )
