"""Telegram sign-in with third-party validation: ``telegram_bot_id`` checks initData's Ed25519
``signature`` with Telegram's published key, alone or beside the bot token's HMAC. Driven with
initData that Telegram itself signed (``ps_testkit.telegram_vector``), so the server's real
production key is what verifies it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from party_sync import config
from party_sync.protocol.errors import ConfigError
from ps_testkit import telegram_vector
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import Running, make_settings, serve_in_process

KEY = "api-key-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: The vector was signed in December 2024: a max age that still accepts it.
OLD_ENOUGH = 1e10


@asynccontextmanager
async def server(**overrides: Any) -> AsyncIterator[Running]:
    settings = make_settings(api_key=KEY, telegram_max_age=OLD_ENOUGH, **overrides)
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        body = {
            "telegram_user_id": telegram_vector.USER_ID,
            "display_name": "Vlad",
            "campaign_run_id": "run-7",
        }
        async with srv.http.put(
            f"{srv.base}/api/v1/parties/p1/members/vlad", json=body, headers=AUTH
        ) as resp:
            assert resp.status == 204
        yield srv


async def sign_in(srv: Running, raw: str) -> tuple[int, dict[str, Any]]:
    body = {"init_data": raw, "party_id": "p1", "character_id": "vlad"}
    async with srv.http.post(srv.base + "/api/v1/auth/telegram", json=body) as resp:
        return resp.status, await resp.json()


async def test_the_bot_id_alone_enables_sign_in_with_telegrams_signature() -> None:
    async with server(telegram_bot_id=telegram_vector.BOT_ID) as srv:
        status, body = await sign_in(srv, telegram_vector.INIT_DATA)
        assert status == 200, body
        assert srv.server is not None
        claims = srv.server.verifier.verify(body["token"])
        assert claims.sub == f"telegram:{telegram_vector.USER_ID}"
        tampered = telegram_vector.INIT_DATA.replace("chat_type=private", "chat_type=group")
        status, body = await sign_in(srv, tampered)
        assert (status, body["error"], body["detail"]) == (
            401,
            "invalid_init_data",
            "init_data is not signed for this bot",
        )
        unsigned = telegram_vector.INIT_DATA.replace("&signature=", "&not_signature=")
        assert (await sign_in(srv, unsigned))[0] == 401


@pytest.mark.parametrize(
    "overrides",
    [
        {"telegram_bot_id": telegram_vector.BOT_ID + 1},
        {"telegram_bot_id": telegram_vector.BOT_ID, "telegram_test_env": True},
        # With the bot token too, both checks must pass: this token did not make the hash.
        {
            "telegram_bot_id": telegram_vector.BOT_ID,
            "telegram_bot_token": f"{telegram_vector.BOT_ID}:not-the-real-token",
        },
    ],
    ids=["another-bot", "test-environment-key", "bot-token-too"],
)
async def test_telegrams_signature_is_refused_for_another_configuration(
    overrides: dict[str, Any],
) -> None:
    async with server(**overrides) as srv:
        status, body = await sign_in(srv, telegram_vector.INIT_DATA)
        assert (status, body["error"]) == (401, "invalid_init_data")


def test_the_settings_come_from_flags_and_environment() -> None:
    settings = config.load(
        None, {"PARTY_SYNC_TELEGRAM_BOT_ID": "7342037359", "PARTY_SYNC_TELEGRAM_TEST_ENV": "true"}
    )
    assert (settings.telegram_bot_id, settings.telegram_test_env) == (7342037359, True)
    defaults = config.load(None, {})
    assert (defaults.telegram_bot_id, defaults.telegram_test_env) == (None, False)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PARTY_SYNC_TELEGRAM_BOT_ID": "0"}, "positive"),
        ({"PARTY_SYNC_TELEGRAM_BOT_ID": "abc"}, "PARTY_SYNC_TELEGRAM_BOT_ID"),
        ({"PARTY_SYNC_TELEGRAM_TEST_ENV": "1"}, "needs telegram_bot_id"),
        (
            {"PARTY_SYNC_TELEGRAM_BOT_ID": "5", "PARTY_SYNC_TELEGRAM_BOT_TOKEN": "6:secret"},
            "differs",
        ),
    ],
)
def test_inconsistent_telegram_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(None, env)
