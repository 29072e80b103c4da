"""The AsyncAPI 3.0 document of the WebSocket (``/ws``), served at ``/asyncapi.json``.

Generated from the protocol's JSON Schemas (``contracts/jsonschema/party_sync/``, bundled into
``components.schemas`` as in the OpenAPI document): one message per type, each with its full
envelope schema as payload and the contract's examples; one channel, ``/ws``; two operations,
``receive`` (what a client sends: ``protocol.types.CLIENT_TYPES``) and ``send`` (what the server
sends: system messages, party events, and the messages to every member that carry no ``seq``,
``TRANSIENT_TYPES``: action.accepted, action.failed, narration.delta). The AsyncAPI ``action`` is
from the server's side, as AsyncAPI documents an application: the server *receives*
``action.request``. ``party.leave`` flows both ways (a voluntary leave; the broadcast), so it is
in both operations. The close codes (``protocol.errors.CloseCode``) are listed in the channel's
WebSocket binding description and as ``x-close-codes``.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from party_sync import __version__
from party_sync.protocol.errors import CloseCode
from party_sync.protocol.schemas import Contracts
from party_sync.protocol.types import CLIENT_TYPES, EVENT_TYPES, SYSTEM_TYPES, TRANSIENT_TYPES
from party_sync.transport.admin import CLOSE_DISCONNECTED
from party_sync.transport.openapi import SCHEMAS, bundled_schemas

#: Every close code the server uses: (meaning, what the client does). Same as docs/protocol.md.
CLOSE_CODES: Final[dict[int, tuple[str, str]]] = {
    CloseCode.NORMAL: ("Normal closure, after a voluntary party.leave", "Do not reconnect"),
    CloseCode.GOING_AWAY: (
        "Server going away (shutdown, deploy)",
        "Reconnect and resume (epoch, last_seq)",
    ),
    CloseCode.PROTOCOL_ERROR: (
        "The frame breaks the WebSocket protocol (RFC 6455: a bad opcode or reserved bit, an "
        "oversized control frame)",
        "Fix the client; reconnect",
    ),
    CloseCode.INVALID_DATA: (
        "A text frame that is not UTF-8 (the transport may refuse it with this instead of "
        "bad_json)",
        "Fix the client; reconnect",
    ),
    CloseCode.POLICY_VIOLATION: (
        "Policy violation: flooding or too much bad input",
        "Do not reconnect at once; back off, fix the client",
    ),
    CloseCode.MESSAGE_TOO_BIG: (
        "A frame far over the size limit",
        "Reconnect; do not resend that message",
    ),
    CloseCode.ABNORMAL_CLOSURE: (
        "No close frame: the heartbeat's pong did not come in time and the server dropped the "
        "connection (a link gone silent, or a client that reads nothing)",
        "Reconnect and resume",
    ),
    CloseCode.INTERNAL_ERROR: ("Internal error", "Reconnect with backoff and resume"),
    CloseCode.TOKEN_EXPIRED: ("Token expired", "Fetch a new token, reconnect (and resume)"),
    CloseCode.SLOW_CONSUMER: (
        "Slow consumer: the client did not read its events fast enough",
        "Reconnect and resume",
    ),
    CloseCode.RESYNC: (
        "Resync required",
        "Reconnect without epoch/last_seq and take the full snapshot",
    ),
    CLOSE_DISCONNECTED: (
        "Disconnected by an operator (the admin API)",
        "Do not reconnect at once: a handshake refused with 403 disconnected_by_operator "
        "says until when (Retry-After)",
    ),
}


def close_codes() -> dict[int, str]:
    """Every close code the server uses, by value (what the document must list): the
    ``CloseCode`` constants and the admin API's."""
    codes = {
        value: name
        for name, value in vars(CloseCode).items()
        if name.isupper() and isinstance(value, int)
    }
    return {**codes, CLOSE_DISCONNECTED: "CLOSE_DISCONNECTED"}


def _message_name(type_: str) -> str:
    return type_.replace(".", "_")


def _message(type_: str, schema: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": type_,
        "title": schema.get("title", type_),
        "contentType": "application/json",
        "payload": {"$ref": SCHEMAS + type_},
    }
    if "description" in schema:
        message["summary"] = schema["description"]
    examples = schema.get("examples")
    if examples:
        message["examples"] = [{"payload": example} for example in examples]
    return message


def _close_code_text() -> str:
    rows = "\n".join(
        f"| {code} | {meaning}. | {then}. |" for code, (meaning, then) in CLOSE_CODES.items()
    )
    return "Close codes:\n\n| Code | Meaning | What the client does |\n|---|---|---|\n" + rows


def document(contracts: Contracts) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``/ws``."""
    server_types = EVENT_TYPES | SYSTEM_TYPES | TRANSIENT_TYPES
    types = sorted(t for t in contracts.types if t in CLIENT_TYPES | server_types)
    schemas = bundled_schemas(contracts)
    messages = {_message_name(t): _message(t, contracts.documents[t]) for t in types}
    to_client = sorted(t for t in types if t in server_types)
    from_client = sorted(t for t in types if t in CLIENT_TYPES)

    def refs(chosen: list[str], prefix: str) -> list[dict[str, str]]:
        return [{"$ref": f"{prefix}{_message_name(t)}"} for t in chosen]

    return {
        "asyncapi": "3.0.0",
        "id": "urn:rpg-bot:party-sync:ws",
        "info": {
            "title": "party_sync WebSocket protocol",
            "version": __version__,
            "description": (
                "One JSON object per text frame, both ways (docs/protocol.md). The first "
                "message of every connection is system.hello; party events (with seq) follow. "
                + ", ".join(sorted(TRANSIENT_TYPES))
                + " go to every member without seq and are never replayed: system.hello "
                "restates what they tell (actions_in_flight, narration). "
                "Schemas are the contracts in contracts/jsonschema/party_sync/.\n\n"
                + _close_code_text()
            ),
            "license": {"name": "MIT"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "party_sync": {
                "host": "localhost:8080",
                "protocol": "ws",
                "description": "A party_sync node (wss behind TLS)",
                "security": [{"$ref": "#/components/securitySchemes/token"}],
            }
        },
        "channels": {
            "party": {
                "address": "/ws",
                "title": "A party connection",
                "description": (
                    "A connection bound by its token to one party, campaign run and character."
                ),
                "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
                "bindings": {
                    "ws": {
                        "method": "GET",
                        "query": {
                            "type": "object",
                            "properties": {
                                "token": {"type": "string", "description": "The JWT"},
                                "epoch": {"type": "string", "description": "Resume: epoch"},
                                "last_seq": {
                                    "type": "integer",
                                    "minimum": 0,
                                    "description": "Resume: the last seq applied",
                                },
                            },
                        },
                        "bindingVersion": "0.1.0",
                    }
                },
                "x-close-codes": {
                    str(code): {"meaning": meaning, "client": then}
                    for code, (meaning, then) in CLOSE_CODES.items()
                },
            }
        },
        "operations": {
            "clientMessages": {
                "action": "receive",
                "title": "What a client sends",
                "summary": ", ".join(from_client),
                "channel": {"$ref": "#/channels/party"},
                "messages": refs(from_client, "#/channels/party/messages/"),
            },
            "serverMessages": {
                "action": "send",
                "title": "What the server sends",
                "summary": ", ".join(to_client),
                "channel": {"$ref": "#/channels/party"},
                "messages": refs(to_client, "#/channels/party/messages/"),
            },
        },
        "components": {
            "securitySchemes": {
                "token": {
                    "type": "httpApiKey",
                    "name": "token",
                    "in": "query",
                    "description": (
                        "A party_sync connection token (JWT), as ?token= or as an "
                        "Authorization: Bearer header"
                    ),
                }
            },
            "messages": messages,
            "schemas": schemas,
        },
    }


def add_routes(app: web.Application, contracts: Contracts) -> None:
    """``GET /asyncapi.json``."""
    spec = document(contracts)

    async def asyncapi_json(request: web.Request) -> web.Response:
        return web.json_response(spec)

    app.router.add_get("/asyncapi.json", asyncapi_json)
