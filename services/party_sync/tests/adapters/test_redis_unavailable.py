"""``unavailable``: every failure of Redis becomes ``BackendUnavailable``, anything else passes,
with ``with`` and ``async with`` alike (no Redis needed: the errors are made here)."""

from __future__ import annotations

import logging

import pytest
from party_sync.backends.redis_scripts import unavailable
from party_sync.protocol.errors import BackendUnavailable
from redis.exceptions import ClusterDownError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

REDIS_FAILURES = [
    RedisConnectionError("connection reset"),
    RedisTimeoutError("timed out"),
    ClusterDownError("CLUSTERDOWN"),
    TryAgainError("TRYAGAIN"),
    ResponseError("ERR refused"),
    OSError("no route"),
    TimeoutError(),
]


@pytest.mark.parametrize("failure", REDIS_FAILURES, ids=lambda e: type(e).__name__)
async def test_a_redis_failure_becomes_backend_unavailable_with_either_with(
    failure: BaseException,
) -> None:
    with pytest.raises(BackendUnavailable) as sync, unavailable("publish"):
        raise failure
    assert sync.value.__cause__ is failure
    with pytest.raises(BackendUnavailable) as async_:
        async with unavailable("publish"):
            raise failure
    assert async_.value.__cause__ is failure


async def test_other_errors_and_success_pass_through() -> None:
    with pytest.raises(KeyError), unavailable("publish"):
        raise KeyError("a bug stays a bug")
    with unavailable("publish"):
        value = 1
    async with unavailable("publish"):
        value += 1
    assert value == 2


def test_a_refused_command_is_logged_as_a_bug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    refused = pytest.raises(BackendUnavailable, match="redis refused begin_action")
    with refused, unavailable("begin_action"):
        raise ResponseError("ERR wrong number of arguments")
    assert "redis refused begin_action" in caplog.text
