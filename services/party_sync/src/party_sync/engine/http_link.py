"""The HTTP engine link: each accepted action is POSTed to ``PARTY_SYNC_ENGINE_URL``.

Body: ``{"party_id": …, "campaign_run_id": …, "envelope": <the action.request envelope>}``; the
``trace_id`` is also in ``X-Trace-Id`` and the ``action_id`` in ``Idempotency-Key``. Delivery:

- 2xx: delivered; the engine publishes its events through ``POST /api/v1/parties/{id}/events``;
- 4xx: final; the player gets ``action_rejected`` with the engine's ``detail`` (or the status);
- connection error, timeout or 5xx: retried with exponential backoff and full jitter, up to
  ``engine_http_retries`` times, then ``engine_unavailable`` (retryable).

An engine may therefore receive an action more than once (a timeout does not prove it was not
applied): it must deduplicate by ``action_id``. party_sync never forwards an action twice on its
own: a client's repeat is answered from the ledger.

Join notices go to the same URL with a ``party.join`` envelope; engines that do not care answer
2xx and ignore them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from party_sync.engine.interface import ActionRequest, JoinNotice, LinkHost
from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.errors import ErrorCode

log = logging.getLogger(__name__)


class _Retryable(Exception):
    pass


class HttpEngineLink:
    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        retries: int = 8,
        backoff_base: float = 0.1,
        backoff_max: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._rng = rng or random.Random()
        self._host: LinkHost | None = None
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, host: LinkHost) -> None:
        self._host = host
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def submit(self, action: ActionRequest) -> None:
        self._spawn(self._deliver_action(action))

    async def notify_join(self, notice: JoinNotice) -> None:
        envelope = {
            "type": t.PARTY_JOIN,
            "timestamp": codec.rfc3339(time.time()),
            "trace_id": notice.trace_id,
            "payload": {"character_id": notice.character_id, "display_name": notice.display_name},
        }
        body = {
            "party_id": notice.party_id,
            "campaign_run_id": notice.campaign_run_id,
            "envelope": envelope,
        }
        self._spawn(self._post_quietly(body, notice.trace_id))

    async def _post_quietly(self, body: Mapping[str, Any], trace_id: str) -> None:
        try:
            await self._post(body, trace_id, idempotency_key=None)
        except Exception as exc:  # a join notice is a hint: log and move on
            log.warning("join notice not delivered: %s", exc, extra={"trace_id": trace_id})

    async def _deliver_action(self, action: ActionRequest) -> None:
        assert self._host is not None, "submit() before start()"
        body = {
            "party_id": action.party_id,
            "campaign_run_id": action.campaign_run_id,
            "envelope": dict(action.envelope),
        }
        for attempt in range(self.retries + 1):
            try:
                status, detail = await self._post(body, action.trace_id, action.action_id)
            except _Retryable as exc:
                if attempt == self.retries:
                    log.warning(
                        "engine unreachable, giving up: %s",
                        exc,
                        extra={"trace_id": action.trace_id, "action_id": action.action_id},
                    )
                    await self._host.fail(
                        action, ErrorCode.ENGINE_UNAVAILABLE, "the engine is unreachable: retry"
                    )
                    return
                delay = self._rng.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))
                log.info(
                    "engine delivery failed (%s); retry %d in %.2fs",
                    exc,
                    attempt + 1,
                    delay,
                    extra={"trace_id": action.trace_id, "action_id": action.action_id},
                )
                await asyncio.sleep(delay)
                continue
            if 400 <= status < 500:
                await self._host.reject(
                    action, detail or f"the engine refused the action ({status})"
                )
            return

    async def _post(
        self, body: Mapping[str, Any], trace_id: str, idempotency_key: str | None
    ) -> tuple[int, str | None]:
        assert self._http is not None
        headers = {"X-Trace-Id": trace_id, "Content-Type": "application/json"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        try:
            async with self._http.post(self.url, data=orjson.dumps(body), headers=headers) as resp:
                text = await resp.text()
                if resp.status >= 500:
                    raise _Retryable(f"HTTP {resp.status}")
                return resp.status, _detail(text) if resp.status >= 400 else None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retryable(type(exc).__name__) from None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()


def _detail(text: str) -> str | None:
    """The human reason in an engine's error body (``detail`` or ``error``), if any."""
    try:
        body = orjson.loads(text)
    except ValueError:
        return text[:300] or None
    if isinstance(body, dict):
        for key in ("detail", "error", "message"):
            if isinstance(body.get(key), str):
                return str(body[key])[:300]
    return None
