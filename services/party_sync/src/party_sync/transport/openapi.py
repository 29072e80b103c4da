"""The OpenAPI 3.1 document served at ``/openapi.json``.

Message bodies are described by the protocol's JSON Schemas, named by their ``$id`` (the files in
``contracts/jsonschema/party_sync/``), so this document cannot drift from the contracts.
"""

from __future__ import annotations

from typing import Any

from party_sync import __version__
from party_sync.engine.interface import ENGINE_EVENT_TYPES
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
            "trace_id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
            "payload": {"type": "object"},
        },
    }


def _publish(summary: str, param: str, accepted: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": [{"apiKey": []}],
            "parameters": [
                {"name": param, "in": "path", "required": True, "schema": {"type": "string"}}
            ],
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
                "400": _problem("The body is not JSON"),
                "401": _problem("Missing or wrong API key (checked before anything else)"),
                "413": _problem("The body is too large"),
                "422": _problem("Not a valid event of a publishable type (the detail says why)"),
                "503": _problem("The backend is unreachable; retry"),
            },
        }
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
            "schemas": {"Problem": _PROBLEM, "EventBody": _event_body(contracts)},
        },
    }
