"""``party-sync engine-worker``: hosts an engine on the actions stream (Redis Streams, issue 4).

Each worker is a consumer of one consumer group. An entry is acknowledged (XACK) only after the
engine has handled it: applied and published, or refused. A worker that dies holding entries
leaves them pending; any worker reclaims them with XAUTOCLAIM once they have been idle for
``claim_idle`` seconds. Delivery is therefore *at least once*; the engine must deduplicate by
``action_id`` (the reference engine records it in the same transaction as the state change), and
party_sync refuses to broadcast a second ``action.result`` for one action, so a result is
broadcast once.

An entry that keeps failing is retried until ``max_deliveries``, then the player gets
``engine_error`` and the entry is acknowledged (dead-lettered in the log with its trace_id).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from party_sync.backends.keys import ACTIONS_STREAM
from party_sync.engine.interface import ActionRequest, Engine, EngineRejected, JoinNotice
from party_sync.protocol import types as t
from party_sync.protocol.errors import ErrorCode
from party_sync.publishing import BackendPublisher

log = logging.getLogger(__name__)


def default_consumer() -> str:
    """A consumer name unique per worker process: ``<host>-<pid>``."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    stream: str = ACTIONS_STREAM
    group: str = "campaign-engine"
    consumer: str = field(default_factory=lambda: default_consumer())
    claim_idle: float = 30.0  # seconds before another worker may take over a pending entry
    batch: int = 16
    block: float = 1.0  # seconds one XREADGROUP may wait
    max_deliveries: int = 5
    burst: bool = False  # stop once the stream has nothing left for this worker (tests, cron)


class StreamWorker:
    def __init__(
        self, engine: Engine, publisher: BackendPublisher, redis: Redis, options: WorkerOptions
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.redis = redis
        self.options = options
        self.handled = 0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        o = self.options
        try:
            await self.redis.xgroup_create(o.stream, o.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self.engine.start(self.publisher)
        log.info("engine worker consuming", extra={"stream": o.stream, "group": o.group})
        try:
            while not self._stop.is_set():
                try:
                    busy = await self._round()
                except RedisError as exc:  # Redis blips: wait a moment, then carry on
                    log.warning("actions stream unavailable: %s", exc)
                    await asyncio.sleep(min(1.0, o.block))
                    continue
                if o.burst and not busy:
                    return
        finally:
            await self.engine.close()

    async def _round(self) -> bool:
        """One round: reclaim idle entries, then read new ones. True if anything was handled."""
        o = self.options
        claimed = await self.redis.xautoclaim(
            o.stream, o.group, o.consumer, int(o.claim_idle * 1000), "0-0", count=o.batch
        )
        entries: list[tuple[bytes, dict[bytes, bytes]]] = [e for e in claimed[1] if e and e[1]]
        if not entries:
            block = None if o.burst else int(o.block * 1000)
            read: Any = await self.redis.xreadgroup(
                o.group, o.consumer, {o.stream: ">"}, count=o.batch, block=block
            )
            entries = [e for _, items in read or () for e in items]
        for entry_id, fields in entries:
            await self._handle(entry_id, fields)
        return bool(entries)

    async def _handle(self, entry_id: bytes, fields: Mapping[bytes, bytes]) -> None:
        o = self.options
        try:
            kind = fields[b"kind"].decode()
            party_id = fields[b"party_id"].decode()
            run_id = fields.get(b"campaign_run_id", b"").decode()
            envelope: dict[str, Any] = orjson.loads(fields[b"envelope"])
        except (KeyError, ValueError):
            log.error("malformed entry on the actions stream; acknowledged and dropped")
            await self.redis.xack(o.stream, o.group, entry_id)
            return
        trace_id = str(envelope.get("trace_id", ""))
        action: ActionRequest | None = None
        try:
            if kind == "action":
                action = _action(party_id, envelope)
                try:
                    await self.engine.handle_action(action)
                except EngineRejected as exc:
                    await self.publisher.reject(action, exc.message)
            elif kind == "join":
                p = envelope["payload"]
                notice = JoinNotice(
                    party_id, run_id, p["character_id"], p["display_name"], trace_id
                )
                await self.engine.handle_join(notice)
        except Exception:
            if await self._give_up(entry_id):
                log.exception("engine failed; giving up", extra={"trace_id": trace_id})
                if action is not None:
                    await self.publisher.fail(action, ErrorCode.ENGINE_ERROR, "the engine failed")
                await self.redis.xack(o.stream, o.group, entry_id)
            else:
                log.exception(
                    "engine failed; the entry stays pending", extra={"trace_id": trace_id}
                )
            return
        await self.redis.xack(o.stream, o.group, entry_id)
        self.handled += 1

    async def _give_up(self, entry_id: bytes) -> bool:
        o = self.options
        pending = await self.redis.xpending_range(
            o.stream, o.group, min=entry_id, max=entry_id, count=1
        )
        deliveries = int(pending[0]["times_delivered"]) if pending else o.max_deliveries
        return deliveries >= o.max_deliveries


def _action(party_id: str, envelope: Mapping[str, Any]) -> ActionRequest:
    if envelope.get("type") != t.ACTION_REQUEST:
        raise ValueError("not an action.request")
    p = envelope["payload"]
    return ActionRequest(
        party_id=party_id,
        campaign_run_id=p["campaign_run_id"],
        character_id=p["character_id"],
        action_id=p["action_id"],
        action_type=p["action_type"],
        payload=p["payload"],
        trace_id=envelope["trace_id"],
        envelope=envelope,
    )
