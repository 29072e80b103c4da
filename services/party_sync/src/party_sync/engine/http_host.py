"""Hosting an engine behind HTTP: the other end of ``HttpEngineLink`` (``party-sync engine-http``).

It receives party_sync's POSTs, checks each envelope against the schemas, calls the engine, and
gives the engine an ``EventPublisher`` that publishes through party_sync's server API. The engine
code is the same object that runs in-process; nothing in it knows about HTTP.

Answers: 202 delivered; 422 the engine refused the action (``EngineRejected``) or the envelope is
invalid (final for party_sync); 500 the engine failed (party_sync retries, and the engine's
deduplication by ``action_id`` keeps the retry from applying twice).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web

from party_sync.engine.interface import (
    ActionRequest,
    Engine,
    EngineRejected,
    JoinNotice,
)
from party_sync.protocol import types as t
from party_sync.protocol.errors import BackendUnavailable, InvalidEvent, VoteConflict
from party_sync.protocol.schemas import Contracts, SchemaViolation

log = logging.getLogger(__name__)

ENGINE: Final = web.AppKey("engine", Engine)
CONTRACTS: Final = web.AppKey("contracts", Contracts)


class ApiPublisher:
    """``EventPublisher`` over party_sync's ``POST /api/v1/parties/{party_id}/events``."""

    def __init__(self, base_url: str, api_key: str, *, retries: int = 3) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._retries = retries
        self._http: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def publish(
        self,
        party_id: str,
        type: str,
        payload: Mapping[str, Any],
        *,
        trace_id: str | None = None,
    ) -> int:
        assert self._http is not None, "open() first"
        envelope: dict[str, Any] = {"type": type, "payload": dict(payload)}
        if trace_id:
            envelope["trace_id"] = trace_id
        url = f"{self.base_url}/api/v1/parties/{party_id}/events"
        for attempt in range(self._retries + 1):
            try:
                async with self._http.post(
                    url, data=orjson.dumps(envelope), headers=self._headers
                ) as resp:
                    body = await resp.read()
                    if resp.status == 202:
                        return int(orjson.loads(body)["seq"])
                    if resp.status < 500:
                        raise InvalidEvent(
                            f"party_sync refused the event ({resp.status}): {body[:300]!r}"
                        )
            except aiohttp.ClientError:
                pass
            if attempt < self._retries:
                await asyncio.sleep(0.1 * 2**attempt)
        raise BackendUnavailable(f"could not publish {type} to party {party_id}")

    async def start_vote(
        self,
        party_id: str,
        question: str,
        options: Sequence[Mapping[str, str]],
        timeout_s: float,
        *,
        vote_id: str | None = None,
        tie_rule: str = "first_listed",
        default_option: str | None = None,
        campaign_run_id: str | None = None,
        trace_id: str | None = None,
    ) -> Mapping[str, Any]:
        assert self._http is not None, "open() first"
        body: dict[str, Any] = {
            "question": question,
            "options": [dict(o) for o in options],
            "timeout_s": timeout_s,
            "tie_rule": tie_rule,
        }
        for key, value in (
            ("vote_id", vote_id),
            ("default_option", default_option),
            ("campaign_run_id", campaign_run_id),
            ("trace_id", trace_id),
        ):
            if value is not None:
                body[key] = value
        url = f"{self.base_url}/api/v1/parties/{party_id}/votes"
        async with self._http.post(url, data=orjson.dumps(body), headers=self._headers) as resp:
            answer = orjson.loads(await resp.read())
            if resp.status == 201:
                return answer  # type: ignore[no-any-return]
            if resp.status == 409:
                raise VoteConflict(answer.get("detail", "a vote is already open"))
            raise InvalidEvent(f"vote refused ({resp.status}): {answer.get('detail')}")

    async def reject(self, action: ActionRequest, message: str) -> None:
        # Over HTTP a refusal is the answer to the delivery itself (422).
        raise EngineRejected(message)


def _action(body: Mapping[str, Any], envelope: Mapping[str, Any]) -> ActionRequest:
    p = envelope["payload"]
    return ActionRequest(
        party_id=str(body["party_id"]),
        campaign_run_id=p["campaign_run_id"],
        character_id=p["character_id"],
        action_id=p["action_id"],
        action_type=p["action_type"],
        payload=p["payload"],
        trace_id=envelope["trace_id"],
        envelope=envelope,
    )


async def receive(request: web.Request) -> web.Response:
    engine, contracts = request.app[ENGINE], request.app[CONTRACTS]
    try:
        body = orjson.loads(await request.read())
        envelope = body["envelope"]
        type_ = envelope["type"]
        if not isinstance(body.get("party_id"), str) or type_ not in (
            t.ACTION_REQUEST,
            t.PARTY_JOIN,
        ):
            raise ValueError("expected an action.request or party.join envelope and a party_id")
        check = {**envelope, "seq": 1} if type_ == t.PARTY_JOIN else envelope
        contracts.validate(type_, check)
    except (ValueError, KeyError, TypeError, SchemaViolation) as exc:
        return web.json_response({"error": "invalid", "detail": str(exc)[:300]}, status=422)
    try:
        if type_ == t.ACTION_REQUEST:
            await engine.handle_action(_action(body, envelope))
        else:
            p = envelope["payload"]
            await engine.handle_join(
                JoinNotice(
                    body["party_id"],
                    str(body.get("campaign_run_id", "")),
                    p["character_id"],
                    p["display_name"],
                    envelope["trace_id"],
                )
            )
    except EngineRejected as exc:
        return web.json_response({"error": "rejected", "detail": exc.message}, status=422)
    except Exception:
        log.exception("engine failed", extra={"trace_id": envelope.get("trace_id")})
        return web.json_response({"error": "engine_error", "detail": "engine failed"}, status=500)
    return web.json_response({"status": "accepted"}, status=202)


def build_host_app(
    engine: Engine, publisher: ApiPublisher, path: str = "/actions"
) -> web.Application:
    app = web.Application()
    app[ENGINE] = engine
    app[CONTRACTS] = Contracts()
    app.router.add_post(path, receive)

    async def on_startup(app: web.Application) -> None:
        await publisher.open()
        await engine.start(publisher)

    async def on_cleanup(app: web.Application) -> None:
        await engine.close()
        await publisher.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
