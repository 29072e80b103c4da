"""Telegram Mini App sign-in: ``POST /api/v1/auth/telegram`` trades initData for a token.

Request ``{"init_data": "<Telegram.WebApp.initData>", "party_id": "...", "character_id": "..."}``;
answer 200 ``{"token": "<party_sync JWT>", "expires_at": <unix seconds>}``.

1. initData is checked (``party_sync.initdata``: HMAC with the bot token and/or Telegram's
   Ed25519 ``signature`` for ``telegram_bot_id``, freshness of ``auth_date``): 400
   ``malformed_init_data``, 401 ``invalid_init_data`` /
   ``init_data_expired``;
2. the membership directory must bind (party_id, character_id) to that Telegram user: else 403
   ``not_a_member`` (also when no such membership exists, so the answer reveals nothing more);
3. the token is bound to the party, the membership's campaign run and the character, with the
   registered display name (checked by the name rule when it was registered; initData's
   ``first_name``, ``last_name`` and ``username`` are never shown to anyone) and ``sub`` =
   ``telegram:<user id>``.

Each refusal is raised and answered by ``problems.PROBLEMS``: a stable ``error`` code with a fixed
``detail``, nothing about which field or value failed. initData is a bearer credential until it
expires: it is never logged, and neither is the token.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from aiohttp import web

from party_sync.auth import issue_token
from party_sync.config import Settings
from party_sync.initdata import (
    EXPIRED,
    INVALID,
    MALFORMED,
    TOO_LONG,
    InitDataError,
    validate_init_data,
)
from party_sync.problems import (
    CONTINUE_WHEN_READ,
    REFUSAL_HEADERS,
    BadJson,
    BadSignInRequest,
    ExpiredInitData,
    InitDataTooLong,
    InvalidInitData,
    MalformedInitData,
    NotAMember,
    OriginNotAllowed,
    Refused,
    TelegramNotConfigured,
    decode_body,
    read_body,
)
from party_sync.protocol.ids import is_id
from party_sync.protocol.names import clean_name
from party_sync.protocol.types import PARTY_ACTOR
from party_sync.transport.appkeys import DIRECTORY, GATEWAY

log = logging.getLogger(__name__)

PATH: Final = "/api/v1/auth/telegram"
MAX_BODY: Final = 16 * 1024
_FIELDS: Final = frozenset({"init_data", "party_id", "character_id"})

#: The sign-in's answers, refusals included, are never cached (they carry tokens or say why not).
NO_STORE: Final = {"Cache-Control": "no-store"}

#: ``InitDataError.code`` → the refusal that answers it.
_INIT_DATA_REFUSALS: Final[dict[str, type[Refused]]] = {
    MALFORMED: MalformedInitData,
    INVALID: InvalidInitData,
    EXPIRED: ExpiredInitData,
}


def _request_fields(body: Any) -> tuple[str, str, str] | None:
    if not isinstance(body, dict) or set(body) != _FIELDS:
        return None
    init_data, party_id, character_id = (body[k] for k in ("init_data", "party_id", "character_id"))
    if not isinstance(init_data, str) or not isinstance(party_id, str):
        return None
    if not isinstance(character_id, str) or character_id == PARTY_ACTOR:
        return None
    if not is_id(party_id) or not is_id(character_id):
        return None
    return init_data, party_id, character_id


async def sign_in(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    settings: Settings = gateway.settings
    bot_token = settings.telegram_bot_token
    if not bot_token and settings.telegram_bot_id is None:
        raise TelegramNotConfigured(headers=NO_STORE)
    origin = request.headers.get("Origin")
    if settings.allowed_origins and origin is not None and origin not in settings.allowed_origins:
        raise OriginNotAllowed(headers=NO_STORE)
    # The whole body, however it was segmented: 413 too_large and 408 body_timeout are answered
    # as on every route (without no-store); every refusal from here on carries it.
    raw = await read_body(request, MAX_BODY)
    request[REFUSAL_HEADERS] = NO_STORE
    try:
        parsed = _request_fields(decode_body(raw))  # too deep: 400 too_deep
    except BadJson:
        parsed = None
    if parsed is None:
        raise BadSignInRequest()
    init_data, party_id, character_id = parsed
    now = gateway.clock()
    try:
        # HMAC with the bot token and/or Telegram's Ed25519 signature for the bot id: the
        # combination is decided in one place (party_sync.initdata).
        verified = validate_init_data(
            init_data,
            bot_token,
            now=now,
            max_age=settings.telegram_max_age,
            bot_id=settings.telegram_bot_id,
            test_env=settings.telegram_test_env,
        )
    except InitDataError as exc:
        # The reason goes to the debug log only; never the initData itself.
        log.info("telegram sign-in refused", extra={"code": exc.code, "party_id": party_id})
        log.debug("telegram sign-in refusal reason", extra={"reason": exc.reason})
        if exc.reason == TOO_LONG:
            raise InitDataTooLong() from None
        raise _INIT_DATA_REFUSALS[exc.code]() from None
    membership = await request.app[DIRECTORY].get(party_id, character_id)  # 503 when unreachable
    if membership is None or membership.telegram_user_id != verified.user.id:
        log.info(
            "telegram sign-in refused",
            extra={"code": "not_a_member", "party_id": party_id, "character_id": character_id},
        )
        raise NotAMember()
    assert settings.jwt_secret is not None  # build_server refuses to run without one
    ttl = settings.telegram_token_ttl
    token = issue_token(
        settings.jwt_secret,
        party_id=membership.party_id,
        campaign_run_id=membership.campaign_run_id,
        character_id=membership.character_id,
        # A name registered before the name rule existed is cleaned, not a failed sign-in.
        display_name=clean_name(membership.display_name, membership.character_id),
        now=now,
        ttl=ttl,
        sub=(sub := f"telegram:{verified.user.id}"),
        algorithm=settings.jwt_algorithms[0],
    )
    # the user as the token names it (security probe: the bare number, another form than every
    # other line that names a user by its ``sub``)
    log.info(
        "telegram sign-in", extra={"party_id": party_id, "character_id": character_id, "sub": sub}
    )
    return web.json_response({"token": token, "expires_at": int(now + ttl)}, headers=NO_STORE)


def add_routes(app: web.Application) -> None:
    """Register the sign-in endpoint (it reads the directory the membership API registered)."""
    app.router.add_post(PATH, sign_in, expect_handler=CONTINUE_WHEN_READ)
