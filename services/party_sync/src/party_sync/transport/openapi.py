"""The OpenAPI 3.1 document served at ``/openapi.json``.

Message bodies are described by the protocol's JSON Schemas, named by their ``$id`` (the files in
``contracts/jsonschema/party_sync/``), so this document cannot drift from the contracts.
"""

from __future__ import annotations

from typing import Any

from party_sync import __version__
from party_sync.engine.interface import ENGINE_EVENT_TYPES
from party_sync.protocol.codec import MAX_DEPTH
from party_sync.protocol.ids import ID_PATTERN, TRACE_ID_PATTERN
from party_sync.protocol.schemas import Contracts

_PROBLEM = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _event_body(contracts: Contracts) -> dict[str, Any]:
    links = ", ".join(f"`{t}`: {contracts.documents[t]['$id']}" for t in sorted(ENGINE_EVENT_TYPES))
    return {
        "type": "object",
        "description": (
            "A full envelope without `seq` (party_sync allocates it). The whole message, with "
            f"`seq` added, must validate against the schema of its type: {links}."
        ),
        "required": ["type", "payload"],
        "additionalProperties": False,
        "properties": {
            "type": {"type": "string", "enum": sorted(ENGINE_EVENT_TYPES)},
            "timestamp": {"type": "string", "format": "date-time"},
            "trace_id": {"type": "string", "pattern": TRACE_ID_PATTERN},
            "payload": {"type": "object"},
        },
    }


_BAD_REQUEST = (
    "bad_json (not UTF-8 JSON), too_deep (nested deeper than "
    f"{MAX_DEPTH} levels), or invalid_id (a path id breaks {ID_PATTERN})"
)
_SLOW_BODY = "body_timeout: the body did not arrive within request_body_timeout (then closed)"
_BAD_PATH = f"invalid_id: a path id breaks {ID_PATTERN} (checked right after the key)"


def _publish(summary: str, param: str, accepted: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": [{"apiKey": []}],
            "parameters": _path_params(param),
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/EventBody"}}
                },
            },
            "responses": {
                "202": {
                    "description": "Published",
                    "content": {"application/json": {"schema": accepted}},
                },
                "400": _problem(_BAD_REQUEST),
                "401": _problem("Missing or wrong API key (checked before anything else)"),
                "408": _problem(_SLOW_BODY),
                "413": _problem("too_large: the body exceeds api_max_body_bytes"),
                "422": _problem("Not a valid event of a publishable type (the detail says why)"),
                "503": _problem("The backend is unreachable; retry"),
            },
        }
    }


_ID = {"type": "string", "pattern": ID_PATTERN}

_MEMBERSHIP_FIELDS: dict[str, Any] = {
    "telegram_user_id": {"type": "integer", "minimum": 1},
    "display_name": {"type": "string", "minLength": 1, "maxLength": 64},
    "campaign_run_id": _ID,
}

_MEMBERSHIP_BODY = {
    "type": "object",
    "required": list(_MEMBERSHIP_FIELDS),
    "additionalProperties": False,
    "properties": _MEMBERSHIP_FIELDS,
}

_MEMBERSHIP = {
    "type": "object",
    "required": [
        "party_id",
        "character_id",
        "telegram_user_id",
        "display_name",
        "campaign_run_id",
    ],
    "properties": {
        "party_id": _ID,
        "character_id": _ID,
        **_MEMBERSHIP_FIELDS,
    },
}


def _path_params(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "path", "required": True, "schema": _ID} for n in names]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _members() -> dict[str, Any]:
    """The membership API (transport/members.py) and Telegram sign-in (transport/telegram.py)."""
    common = {
        "400": _problem(_BAD_PATH),
        "401": _problem("Missing or wrong API key (checked before anything else)"),
        "422": _problem(
            "invalid_membership (the reserved character id, or a bad body: the detail says "
            "why), or invalid_display_name (the name breaks the display-name rule)"
        ),
        "503": _problem("The backend is unreachable; retry"),
    }
    membership = _json({"$ref": "#/components/schemas/Membership"}, "The membership")
    sign_in_body = {
        "type": "object",
        "required": ["init_data", "party_id", "character_id"],
        "additionalProperties": False,
        "properties": {
            "init_data": {"type": "string", "description": "Telegram.WebApp.initData, raw"},
            "party_id": _ID,
            "character_id": _ID,
        },
    }
    token = {
        "type": "object",
        "required": ["token", "expires_at"],
        "properties": {
            "token": {"type": "string", "description": "A party_sync connection token (JWT)"},
            "expires_at": {"type": "integer", "description": "Unix seconds"},
        },
    }
    return {
        "/api/v1/parties/{party_id}/members": {
            "get": {
                "summary": "List a party's memberships",
                "security": [{"apiKey": []}],
                "parameters": _path_params("party_id"),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["members"],
                            "properties": {
                                "members": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/Membership"},
                                }
                            },
                        },
                        "The memberships, by character_id",
                    ),
                    **common,
                },
            }
        },
        "/api/v1/parties/{party_id}/members/{character_id}": {
            "parameters": _path_params("party_id", "character_id"),
            "put": {
                "summary": "Register (or replace) which Telegram user may play this character",
                "security": [{"apiKey": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/MembershipBody"}
                        }
                    },
                },
                "responses": {
                    "204": {"description": "Registered"},
                    **common,
                    "400": _problem(_BAD_REQUEST),
                    "408": _problem(_SLOW_BODY),
                    "413": _problem("too_large: the body exceeds 4096 bytes"),
                },
            },
            "delete": {
                "summary": "Remove a membership (idempotent)",
                "security": [{"apiKey": []}],
                "responses": {"204": {"description": "Removed (or there was none)"}, **common},
            },
            "get": {
                "summary": "Read a membership",
                "security": [{"apiKey": []}],
                "responses": {
                    "200": membership,
                    "404": _problem("No such membership"),
                    **common,
                },
            },
        },
        "/api/v1/auth/telegram": {
            "post": {
                "summary": "Telegram Mini App sign-in: trade initData for a connection token",
                "description": (
                    "Checks initData's HMAC with the bot token and/or its Ed25519 signature "
                    "with Telegram's key for the configured bot id, and the freshness of "
                    "auth_date, "
                    "then that the membership directory binds the character in the party to "
                    "that Telegram user. Refusals carry a stable error code only."
                ),
                "security": [],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": sign_in_body}},
                },
                "responses": {
                    "200": _json(token, "A token bound to the party, run and character"),
                    "400": _problem("bad_request, too_deep, or malformed_init_data"),
                    "401": _problem("invalid_init_data (bad hash or signature), init_data_expired"),
                    "403": _problem("not_a_member, or origin_not_allowed"),
                    "408": _problem(_SLOW_BODY),
                    "413": _problem("The body is too large"),
                    "503": _problem("telegram_not_configured, or backend_unavailable"),
                },
            }
        },
    }


def document(contracts: Contracts) -> dict[str, Any]:
    plain = {"200": {"description": "OK"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "party_sync",
            "version": __version__,
            "description": (
                "Realtime party layer of RPG-Bot. The WebSocket protocol is described in "
                "docs/protocol.md and the JSON Schemas in contracts/jsonschema/party_sync/."
            ),
        },
        "paths": {
            "/api/v1/parties/{party_id}/events": _publish(
                "Publish an engine event to a party (sequenced, recorded, broadcast)",
                "party_id",
                {"type": "object", "required": ["seq"], "properties": {"seq": {"type": "integer"}}},
            ),
            "/api/v1/runs/{campaign_run_id}/events": _publish(
                "Publish an event to every party of a campaign run",
                "campaign_run_id",
                {
                    "type": "object",
                    "required": ["parties"],
                    "properties": {
                        "parties": {
                            "type": "object",
                            "additionalProperties": {"type": "integer"},
                            "description": "party_id → the seq the event got in that party",
                        }
                    },
                },
            ),
            **_members(),
            "/ws": {
                "get": {
                    "summary": "The WebSocket (see docs/protocol.md)",
                    "parameters": [
                        {"name": n, "in": "query", "required": False, "schema": {"type": t}}
                        for n, t in (
                            ("token", "string"),
                            ("epoch", "string"),
                            ("last_seq", "integer"),
                        )
                    ],
                    "responses": {
                        "101": {"description": "Switching protocols"},
                        "401": {"description": "Missing, invalid or expired token"},
                        "403": {"description": "Origin not allowed"},
                    },
                }
            },
            "/healthz": {"get": {"summary": "Liveness", "responses": plain}},
            "/readyz": {
                "get": {
                    "summary": "Readiness (the backend is usable)",
                    "responses": {**plain, "503": {"description": "Not ready"}},
                }
            },
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": plain}},
            "/openapi.json": {"get": {"summary": "This document", "responses": plain}},
        },
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "PARTY_SYNC_API_KEY",
                }
            },
            "schemas": {
                "Problem": _PROBLEM,
                "EventBody": _event_body(contracts),
                "Membership": _MEMBERSHIP,
                "MembershipBody": _MEMBERSHIP_BODY,
            },
        },
    }
