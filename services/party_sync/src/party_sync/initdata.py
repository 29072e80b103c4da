"""Telegram Mini App ``initData``: validation as a pure function (no I/O; ``now`` is passed in).

The algorithm (core.telegram.org/bots/webapps, "Validating data received via the Mini App"):

1. parse the raw query string **once** (``parse_qsl(..., strict_parsing=True)``) and refuse
   duplicate keys, so no second parser can see different fields than the one that was checked;
2. remove ``hash``; sort the remaining ``key=value`` pairs by key and join them with ``"\\n"``:
   the *data-check string* (``signature``, when present, stays in it: the HMAC covers it);
3. ``secret_key = HMAC-SHA256(key=b"WebAppData", msg=bot_token)`` (the raw 32 bytes);
4. valid if ``hex(HMAC-SHA256(key=secret_key, msg=data_check_string)) == hash``, compared in
   constant time;
5. then ``auth_date`` must be recent (``max_age``) and not in the future (``max_skew``), because
   initData is a bearer credential that Telegram renews only when the Mini App is reopened.

A valid initData proves *who* the user is, never which party or character they may play: that
binding comes from party_sync's membership directory (``party_sync.directory``).

The Ed25519 third-party check (the ``signature`` field) is not implemented: it needs an Ed25519
library (``cryptography`` or PyNaCl), which is not a dependency of party_sync.

Errors carry a stable ``code`` and an HTTP ``status`` and nothing about the inputs, so a response
never reveals more than which *kind* of check failed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode

import orjson

from party_sync.protocol.errors import PartySyncError

#: Largest raw initData accepted (Telegram's are well under 2 KiB; a photo_url adds a few hundred).
MAX_INIT_DATA_BYTES: Final = 8192
#: Seconds ``auth_date`` may lie ahead of our clock (clock skew between Telegram and us).
MAX_CLOCK_SKEW: Final = 30.0
#: Most fields accepted; Telegram sends about ten.
MAX_FIELDS: Final = 32

_KEY = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")
_DIGITS = re.compile(r"^[0-9]{1,12}$")
_WEB_APP_DATA: Final = b"WebAppData"

MALFORMED: Final = "malformed_init_data"
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


def sign_init_data(fields: Mapping[str, str], bot_token: str) -> str:
    """A raw initData query string signed like Telegram signs it (for tests and local tooling)."""
    if "hash" in fields:
        raise ValueError("fields must not contain hash")
    return urlencode({**fields, "hash": _sign(fields, bot_token)})


def parse_fields(raw: str) -> dict[str, str]:
    """Parse the query string strictly, once; refuse duplicates and ambiguous keys or values."""
    if len(raw.encode()) > MAX_INIT_DATA_BYTES:
        raise InitDataError(400, MALFORMED, "too long")
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
    bot_token: str,
    *,
    now: float,
    max_age: float,
    max_skew: float = MAX_CLOCK_SKEW,
) -> InitData:
    """Check ``raw`` (``Telegram.WebApp.initData``) against ``bot_token`` at time ``now``.

    Returns the verified data, or raises ``InitDataError``. The hash is checked before any field
    is interpreted, so nothing unsigned is ever trusted.
    """
    if not bot_token:
        raise ValueError("bot_token must not be empty")
    fields = parse_fields(raw)
    given = fields.pop("hash", None)
    if given is None or not _HASH.fullmatch(given):
        raise InitDataError(401, INVALID, "missing or malformed hash")
    expected = _sign(fields, bot_token)
    if not hmac.compare_digest(expected.encode(), given.encode()):
        raise InitDataError(401, INVALID, "hash mismatch")
    auth_date = fields.get("auth_date", "")
    if not _DIGITS.fullmatch(auth_date):
        raise InitDataError(400, MALFORMED, "auth_date is not a Unix time")
    signed_at = int(auth_date)
    if now - signed_at > max_age:
        raise InitDataError(401, EXPIRED, "auth_date too old")
    if signed_at - now > max_skew:
        raise InitDataError(401, EXPIRED, "auth_date in the future")
    return InitData(_user(fields.get("user")), signed_at, fields)


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
