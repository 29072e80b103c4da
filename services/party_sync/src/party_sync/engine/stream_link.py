"""The Redis Streams engine link: accepted actions are appended to a stream (docs/engines.md).

Entry fields (all strings; never pickle):

- ``kind``: ``action`` | ``join`` | ``restate``;
- ``party_id`` and ``campaign_run_id``;
- ``envelope``: the whole JSON envelope (``action.request``, ``party.join``, or
  ``party.restate`` = ``{"type": "party.restate", "timestamp", "trace_id",
  "payload": {"epoch": …}}``, see ``party_sync.engine.wire``);
- ``deadline`` (actions only, absent when the action has none): decimal Unix seconds after which
  the action must not be *started* (``ActionRequest.deadline``);
- ``traceparent`` (optional; only while tracing is on): the W3C trace context of the append, so
  the worker's spans join the action's trace (``party_sync.tracing``).

Engines consume the stream with a consumer group (``party-sync engine-worker``): delivery is at
least once, an entry stays pending until the engine acknowledges it, and a dead worker's entries
are reclaimed by another. Before starting an action the worker claims it (``LinkHost.claim``), so
an action that waited past its deadline (no worker running) is refused with ``action_timeout``
and never applied later.

Restate notices (``notify_restate``) travel the same stream, so a party's lost state is re-stated
by whichever worker is up, at least once.
"""

from __future__ import annotations

from typing import Any

import orjson
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from party_sync import tracing
from party_sync.backends.redis_connect import RedisTarget, make_client
from party_sync.engine import wire
from party_sync.engine.interface import ActionRequest, JoinNotice, LinkHost, RestateNotice
from party_sync.protocol.errors import BackendUnavailable


def entry(
    kind: str,
    party_id: str,
    campaign_run_id: str,
    envelope: Any,
    deadline: float | None = None,
    traceparent: str | None = None,
) -> dict[str, bytes]:
    """The fields of one stream entry (see the module docstring)."""
    fields = {
        "kind": kind.encode(),
        "party_id": party_id.encode(),
        "campaign_run_id": campaign_run_id.encode(),
        "envelope": orjson.dumps(envelope),
    }
    if deadline is not None:
        fields["deadline"] = wire.format_deadline(deadline).encode()
    if traceparent is not None:
        fields["traceparent"] = traceparent.encode()
    return fields


class StreamEngineLink:
    def __init__(self, redis_url: str | RedisTarget, stream: str, maxlen: int) -> None:
        self.stream = stream
        self.maxlen = maxlen
        # One retry on a fresh connection: after a Redis restart the pooled socket is dead. A
        # retried XADD may append the entry twice: harmless, delivery is at least once anyway.
        self._redis = make_client(
            redis_url,
            socket_timeout=5.0,
            socket_connect_timeout=2.0,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
        )
        self.failures = 0  # appends that failed (party_sync_engine_link_failures_total)

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
            self.failures += 1
            raise BackendUnavailable(f"cannot append to {self.stream}: {exc}") from None

    async def submit(self, action: ActionRequest) -> None:
        attributes = {"party_sync.action_id": action.action_id, "party_sync.transport": "stream"}
        with tracing.span(
            "engine.stream append", kind=tracing.SpanKind.PRODUCER, attributes=attributes
        ):
            await self._append(
                entry(
                    "action",
                    action.party_id,
                    action.campaign_run_id,
                    dict(action.envelope),
                    action.deadline,
                    tracing.traceparent(),
                )
            )

    async def notify_join(self, notice: JoinNotice) -> None:
        envelope = wire.join_envelope(notice)
        await self._append(entry("join", notice.party_id, notice.campaign_run_id, envelope))

    async def notify_restate(self, notice: RestateNotice) -> None:
        envelope = wire.restate_envelope(notice)
        await self._append(entry("restate", notice.party_id, notice.campaign_run_id, envelope))

    async def close(self) -> None:
        await self._redis.aclose()
