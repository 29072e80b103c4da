"""The Redis Streams engine link: accepted actions are appended to a stream (issue 4).

Entry fields: ``kind`` (``action`` | ``join``), ``party_id``, ``campaign_run_id`` and ``envelope``
(the whole JSON envelope; never pickle). Engines consume the stream with a consumer group
(``party-sync engine-worker``): delivery is at least once, an entry stays pending until the
engine acknowledges it, and a dead worker's entries are reclaimed by another.

If no engine is running, actions wait in the stream; the acting player gets ``action_timeout``
(retryable) while the action stays in flight, and a resend is answered ``action_in_flight`` until
the engine comes back and its result is broadcast.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from party_sync.engine.interface import ActionRequest, JoinNotice, LinkHost
from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.errors import BackendUnavailable


def entry(kind: str, party_id: str, campaign_run_id: str, envelope: Any) -> dict[str, bytes]:
    return {
        "kind": kind.encode(),
        "party_id": party_id.encode(),
        "campaign_run_id": campaign_run_id.encode(),
        "envelope": orjson.dumps(envelope),
    }


class StreamEngineLink:
    def __init__(self, redis_url: str, stream: str, maxlen: int) -> None:
        self.stream = stream
        self.maxlen = maxlen
        self._redis = Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)

    async def start(self, host: LinkHost) -> None:
        return None

    async def _append(self, fields: dict[str, bytes]) -> None:
        try:
            await self._redis.xadd(
                self.stream,
                fields,  # type: ignore[arg-type]
                maxlen=self.maxlen,
                approximate=True,
            )
        except RedisError as exc:
            raise BackendUnavailable(f"cannot append to {self.stream}: {exc}") from None

    async def submit(self, action: ActionRequest) -> None:
        await self._append(
            entry("action", action.party_id, action.campaign_run_id, dict(action.envelope))
        )

    async def notify_join(self, notice: JoinNotice) -> None:
        envelope = {
            "type": t.PARTY_JOIN,
            "timestamp": codec.rfc3339(time.time()),
            "trace_id": notice.trace_id,
            "payload": {"character_id": notice.character_id, "display_name": notice.display_name},
        }
        await self._append(entry("join", notice.party_id, notice.campaign_run_id, envelope))

    async def close(self) -> None:
        await self._redis.aclose()
