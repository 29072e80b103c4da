"""The peer: python-socketio with its AsyncRedisManager on uvicorn. A BASELINE, NOT THE PRODUCT.

It plays the benchmark's scenario as faithfully as python-socketio allows, so that party_sync is
compared with what a Python team would otherwise build:

- a connection authenticates with the same JWT (Socket.IO ``auth`` = ``{"token": ...}``, checked by
  party_sync's own ``TokenVerifier``) and joins a room named after its party;
- an ``action.request`` event is validated against the same JSON Schema (jsonschema-rs, compiled
  once), checked against the connection's character and run, and answered by the same engine
  logic (``bench.engine.BenchLogic``) with an ``action.result`` then a ``scene.update``;
- each event gets a per-party ``seq`` (a counter in this process: correct for one process only),
  is validated against its schema, and is emitted to the party's room through the Redis manager
  (every emit is published to Redis, as python-socketio does for every node to see it).

What it does not do, because python-socketio gives no building block for it: idempotency by
``action_id``, one action in flight per character, event history and resume, presence events.

Usage: ``python -m bench.peers.socketio_server --port N --redis-url redis://127.0.0.1:P/0``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import socketio
import uvicorn
from party_sync.auth import Claims, TokenVerifier
from party_sync.protocol import codec
from party_sync.protocol.errors import AuthError
from party_sync.protocol.schemas import Contracts, SchemaViolation

from bench.common import SECRET
from bench.engine import BenchLogic


class PartyRooms:
    """The scenario on a python-socketio server: auth, rooms, validation, engine, seq, emit."""

    def __init__(self, sio: socketio.AsyncServer) -> None:
        self.sio = sio
        self.verifier = TokenVerifier([SECRET])
        self.contracts = Contracts()
        self.logic = BenchLogic()
        self.claims: dict[str, Claims] = {}
        self.seqs: dict[str, int] = {}
        sio.on("connect", self.connect)
        sio.on("disconnect", self.disconnect)
        sio.on("action.request", self.action_request)

    async def connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        token = auth.get("token", "") if isinstance(auth, dict) else ""
        try:
            claims = self.verifier.verify(token)
        except AuthError as exc:
            raise socketio.exceptions.ConnectionRefusedError(exc.reason) from None
        self.claims[sid] = claims
        await self.sio.enter_room(sid, claims.party_id)

    async def disconnect(self, sid: str, reason: Any = None) -> None:
        self.claims.pop(sid, None)

    async def error(self, sid: str, code: str, message: str) -> None:
        payload = {"code": code, "message": message, "retryable": False, "in_reply_to": None}
        await self.sio.emit("system.error", {"type": "system.error", "payload": payload}, to=sid)

    async def action_request(self, sid: str, message: Any) -> None:
        claims = self.claims.get(sid)
        if claims is None:
            return
        try:
            self.contracts.validate("action.request", message)
        except SchemaViolation as exc:
            await self.error(sid, "schema_violation", str(exc))
            return
        p = message["payload"]
        if p["character_id"] != claims.character_id or (
            p["campaign_run_id"] != claims.campaign_run_id
        ):
            await self.error(sid, "forbidden", "this connection cannot act for that character")
            return
        trace_id = message.get("trace_id") or codec.new_trace_id()
        result, scene = self.logic.answer(
            claims.party_id, p["action_id"], claims.character_id, p["action_type"]
        )
        for type_, payload in (("action.result", result), ("scene.update", scene)):
            await self.publish(claims.party_id, type_, payload, trace_id)

    async def publish(
        self, party_id: str, type_: str, payload: dict[str, Any], trace_id: str
    ) -> None:
        seq = self.seqs.get(party_id, 0) + 1
        event = {
            "type": type_,
            "timestamp": codec.rfc3339(time.time()),
            "trace_id": trace_id,
            "seq": seq,
            "payload": payload,
        }
        self.contracts.validate(type_, event)  # the engine's output is checked, as in party_sync
        self.seqs[party_id] = seq
        await self.sio.emit(type_, event, room=party_id)


def build_app(redis_url: str) -> Any:
    manager = socketio.AsyncRedisManager(redis_url)
    sio = socketio.AsyncServer(
        async_mode="asgi",
        client_manager=manager,
        cors_allowed_origins="*",
        transports=["websocket"],
        logger=False,
        engineio_logger=False,
    )
    PartyRooms(sio)
    return socketio.ASGIApp(sio, socketio_path="socket.io")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="python-socketio peer (benchmark baseline)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args(argv)
    uvicorn.run(
        build_app(args.redis_url),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        backlog=4096,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
