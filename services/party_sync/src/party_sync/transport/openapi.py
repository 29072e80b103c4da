"""The OpenAPI 3.1 document served at ``/openapi.json``: every HTTP route of the app.

Message schemas come from the protocol's JSON Schemas (``contracts/jsonschema/party_sync/``),
bundled into ``components.schemas`` (``bundled_schemas``: ``<type>`` per message, ``envelope``,
``common.<name>`` per shared definition), so bodies that carry protocol messages cannot drift
from the contracts. Every refusal is an RFC 9457 problem (``application/problem+json``,
``party_sync/problems.py``), listed per status with its stable codes (the ``error`` enum):
``tests/adapters/test_http_errors.py`` holds every documented (status, code) equal to the one table
the middleware answers by (``problems.PROBLEMS``).

``tests/core/test_openapi.py`` compares the documented operations with ``app.router``: a route
that is not documented, or documented but not served, fails it.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from party_sync import __version__
from party_sync.backends.directory import MAX_TELEGRAM_ID
from party_sync.core.votes import MAX_TIMEOUT_S
from party_sync.engine.interface import (
    ENGINE_EVENT_TYPES,
    MAX_BATCH_EVENTS,
    MAX_NARRATION_CHARS,
)
from party_sync.problems import UNAVAILABLE
from party_sync.protocol.codec import MAX_DEPTH
from party_sync.protocol.ids import ID_PATTERN, TRACE_ID_PATTERN
from party_sync.protocol.names import NAME_PATTERN
from party_sync.protocol.schemas import Contracts
from party_sync.transport.admin import MAX_AFTER_SEQ

#: Where bundled schemas live in both documents (OpenAPI and AsyncAPI use the same place).
SCHEMAS: Final = "#/components/schemas/"
PROBLEM_JSON: Final = "application/problem+json"

_ID: Final = {"type": "string", "pattern": ID_PATTERN}
#: A body's optional ``trace_id``: absent or null, party_sync makes one; else the id alphabet.
TRACE_ID_FIELD: Final = {
    "type": ["string", "null"],
    "pattern": TRACE_ID_PATTERN,
    "description": "The trace this call belongs to; absent or null: party_sync makes one.",
}
_KEY: Final[list[dict[str, list[str]]]] = [{"apiKey": []}]


# -- the contracts, bundled ------------------------------------------------------------------


def _rewrite(node: Any) -> Any:
    """``node`` with the contracts' file references pointed at ``components.schemas``."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in ("$schema", "$id"):
                continue
            if key == "$ref" and isinstance(value, str):
                out[key] = _target(value)
            else:
                out[key] = _rewrite(value)
        return out
    if isinstance(node, list):
        return [_rewrite(item) for item in node]
    return node


def _target(ref: str) -> str:
    document, _, pointer = ref.partition("#")
    if document == "common.json" and pointer.startswith("/$defs/"):
        return SCHEMAS + "common." + pointer.removeprefix("/$defs/")
    if document.endswith(".json") and not pointer:
        return SCHEMAS + document.removesuffix(".json")
    raise ValueError(f"unexpected reference in the contracts: {ref}")


def bundled_schemas(contracts: Contracts) -> dict[str, Any]:
    """Every contract schema as a component: ``envelope``, ``<type>``, ``common.<name>``."""
    out: dict[str, Any] = {}
    for name, definition in contracts.documents["common"].get("$defs", {}).items():
        out["common." + name] = _rewrite(definition)
    for name, document in contracts.documents.items():
        if name != "common":
            out[name] = _rewrite(document)
    return out


def payload_ref(type_: str) -> dict[str, str]:
    """A reference to the payload schema of message type ``type_``."""
    return {"$ref": f"{SCHEMAS}{type_}/properties/payload"}


# -- building blocks -------------------------------------------------------------------------


def problem_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": (
            "RFC 9457 problem details. `error` is the stable, machine-readable code (match on "
            "it); `code` carries the same value; `type` is about:blank (the status and the code "
            "say everything); `title` is the status phrase; `detail` a sentence for people that "
            "never echoes the input."
        ),
        "required": ["type", "title", "status", "detail", "error", "code"],
        "properties": {
            "type": {"type": "string", "const": "about:blank"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "error": {"type": "string", "pattern": "^[a-z_]+$"},
            "code": {"type": "string", "pattern": "^[a-z_]+$"},
        },
    }


def _problem(
    description: str, *codes: str, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A refusal: problem details whose ``error`` (and ``code``) is one of ``codes``."""
    enum = {"type": "string", "enum": sorted(set(codes))}
    schema = {
        "allOf": [
            {"$ref": SCHEMAS + "Problem"},
            {"type": "object", "properties": {"error": enum, "code": enum}},
        ]
    }
    response: dict[str, Any] = {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _path_params(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "path", "required": True, "schema": _ID} for n in names]


def _object(properties: dict[str, Any], *, required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(properties) if required is None else required,
        "properties": properties,
    }


_UNAUTHORIZED: Final = _problem(
    "Missing or wrong API key (checked before anything else)", "unauthorized"
)
_BAD_ID: Final = f"invalid_id: a path id breaks {ID_PATTERN} (checked right after the key)"
_BODY_CODES: Final = ("bad_json", "too_deep", "invalid_id")
_BAD_BODY: Final = (
    f"bad_json (not UTF-8 JSON), too_deep (nested deeper than {MAX_DEPTH} levels), or "
    "invalid_id (a path id, or an Idempotency-Key, breaks its rule)"
)
_SLOW_BODY: Final = _problem(
    "body_timeout: the body did not arrive within request_body_timeout (then closed)",
    "body_timeout",
)
_UNAVAILABLE: Final = _problem("The backend is unreachable; retry", "backend_unavailable")
_SHUTTING_DOWN: Final = (
    "shutting_down (with Retry-After): the server began to shut down while the body was still "
    "arriving; nothing was applied: send it again (another node takes it)"
)


def _too_large(limit: str) -> dict[str, Any]:
    return _problem(f"too_large: the body exceeds {limit}", "too_large")


def _with_body(responses: dict[str, Any], limit: str) -> dict[str, Any]:
    """``responses`` plus the refusals of ``problems.read_json`` (after the key and the path
    ids); 503 is ``backend_unavailable`` or ``shutting_down``."""
    return {
        **responses,
        "400": _problem(_BAD_BODY, *_BODY_CODES),
        "401": _UNAUTHORIZED,
        "408": _SLOW_BODY,
        "413": _too_large(limit),
        "503": _problem(
            f"backend_unavailable ({UNAVAILABLE}), or {_SHUTTING_DOWN}",
            "backend_unavailable",
            "shutting_down",
        ),
    }


# -- the server API: publishing, votes and narration (transport/api.py) ---------------------


def event_body(but: frozenset[str] = frozenset()) -> dict[str, Any]:
    """What an engine publishes: an envelope of an engine event type (not one of ``but``),
    without ``seq``."""
    variants = []
    for type_ in sorted(ENGINE_EVENT_TYPES - but):
        variants.append(
            {
                "title": type_,
                "type": "object",
                "required": ["type", "payload"],
                "additionalProperties": False,
                "properties": {
                    "type": {"type": "string", "const": type_},
                    "timestamp": {
                        "anyOf": [{"$ref": SCHEMAS + "common.timestamp"}, {"type": "null"}],
                        "description": "When it happened; absent or null: party_sync's clock.",
                    },
                    "trace_id": TRACE_ID_FIELD,
                    "payload": payload_ref(type_),
                },
            }
        )
    return {
        "description": (
            "A full envelope without `seq` (party_sync allocates it); the payload of its type's "
            "contract schema (components `<type>`). party_sync fills in `timestamp` and "
            "`trace_id` when they are missing."
        ),
        "oneOf": variants,
        "discriminator": {"propertyName": "type"},
    }


_IDEMPOTENCY_KEY: Final = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": TRACE_ID_PATTERN},
    "description": (
        "Makes the request safe to send again (a dropped connection, a timeout, a 5xx): the "
        "first event published under this key in a party is kept for action_record_ttl, and a "
        "request with the same key in that time publishes nothing there and is answered 202 "
        "with the first one's seq (an action.result is kept by its action_id instead). A key "
        "that breaks the pattern is 400 invalid_id."
    ),
}


def _publish(
    summary: str, param: str, accepted: dict[str, Any], body: str = "EventBody"
) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "operationId": f"publish_{param.removesuffix('_id')}_event",
            "tags": ["events"],
            "security": _KEY,
            "parameters": [*_path_params(param), _IDEMPOTENCY_KEY],
            "requestBody": _body({"$ref": SCHEMAS + body}),
            "responses": _with_body(
                {
                    "202": _json(accepted, "Published"),
                    "422": _problem(
                        "invalid_event: not a valid event of a publishable type (the detail "
                        "says why); idempotency_key_reused: the Idempotency-Key was used, within "
                        "action_record_ttl, for a batch of several events (nothing published)",
                        "invalid_event",
                        "idempotency_key_reused",
                    ),
                    "503": _UNAVAILABLE,
                },
                "api_max_body_bytes",
            ),
        }
    }


def _publish_batch() -> dict[str, Any]:
    return {
        "post": {
            "summary": (
                "Publish several events of one party in one atomic step (an engine's whole "
                "answer: its action.result and scene.update, say)"
            ),
            "description": (
                "Every event is checked before any is published (one invalid: 422, none "
                "published); they get consecutive seqs and reach the members together. A batch "
                "whose every action.result was published already is a late copy of an answer "
                "that went out whole: none of it is published (seq 0 for each event but the "
                "results, which give their first seq). Under an Idempotency-Key, a call whose key "
                "has a call already publishes nothing and answers the seqs that call's events "
                "got: a batch is safe to send again (with as many events: a call of another "
                "number under the key is refused, 422 idempotency_key_reused)."
            ),
            "operationId": "publish_party_events",
            "tags": ["events"],
            "security": _KEY,
            "parameters": [*_path_params("party_id"), _IDEMPOTENCY_KEY],
            "requestBody": _body(
                {
                    "type": "object",
                    "required": ["events"],
                    "additionalProperties": False,
                    "properties": {
                        "events": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_BATCH_EVENTS,
                            "items": {"$ref": SCHEMAS + "EventBody"},
                        }
                    },
                }
            ),
            "responses": _with_body(
                {
                    "202": _json(
                        _object(
                            {
                                "seqs": {
                                    "type": "array",
                                    "items": {"type": "integer", "minimum": 0},
                                    "description": "each event's seq, in order (0: not "
                                    "published, a late copy)",
                                }
                            }
                        ),
                        "Published",
                    ),
                    "422": _problem(
                        f"invalid_event: a body that is not a list of 1 to {MAX_BATCH_EVENTS} "
                        "valid events of publishable types (the detail says why); "
                        "idempotency_key_reused: the Idempotency-Key was used, within "
                        "action_record_ttl, for a call of another number of events (nothing "
                        "published: its seqs could not be this call's)",
                        "invalid_event",
                        "idempotency_key_reused",
                    ),
                    "503": _UNAVAILABLE,
                },
                "api_max_body_bytes",
            ),
        }
    }


def vote_request(contracts: Contracts) -> dict[str, Any]:
    started = contracts.documents["vote.started"]["properties"]["payload"]["properties"]
    return {
        "type": "object",
        "description": (
            "A vote to open. `vote_id` defaults to a fresh one; `tie_rule` to first_listed "
            "(default_option needs `default_option`, one of the option ids, and nothing else "
            "takes it); `timeout_s` is at most 86400 (a day); the options' ids are unique. "
            "Fields not listed are ignored; an option holds only `id` and `label` (any other "
            "field of an option is refused, 422 invalid_vote: the players would never see it)."
        ),
        "required": ["question", "options", "timeout_s"],
        "properties": {
            "vote_id": {
                "anyOf": [
                    {**_ID, "maxLength": 59},
                    {"type": "string", "maxLength": 0},
                    {"type": "null"},
                ],
                "description": (
                    "At most 59 characters: the vote is applied as `vote:<vote_id>`. Absent, "
                    "null or empty: a fresh one is made."
                ),
            },
            "question": _rewrite(started["question"]),
            "options": _rewrite(started["options"]),
            "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_S},
            "tie_rule": _rewrite(started["tie_rule"]),
            "default_option": _ID,
            "campaign_run_id": _ID,
            "trace_id": TRACE_ID_FIELD,
        },
    }


def vote_started(contracts: Contracts) -> dict[str, Any]:
    """The ``vote.started`` payload and the ``seq`` the event got."""
    payload: dict[str, Any] = _rewrite(
        copy.deepcopy(contracts.documents["vote.started"]["properties"]["payload"])
    )
    payload["properties"]["seq"] = {"$ref": SCHEMAS + "common.seq"}
    payload["required"] = [*payload["required"], "seq"]
    payload["description"] = "The vote.started payload, and the seq of that event"
    return payload


def _vote(contracts: Contracts) -> dict[str, Any]:
    return {
        "post": {
            "summary": "Open a party vote on an engine's behalf",
            "description": "The party gets vote.started (docs/protocol.md, Votes).",
            "operationId": "start_vote",
            "tags": ["votes"],
            "security": _KEY,
            "parameters": _path_params("party_id"),
            "requestBody": _body({"$ref": SCHEMAS + "VoteRequest"}),
            "responses": _with_body(
                {
                    "201": _json({"$ref": SCHEMAS + "VoteStarted"}, "The vote is open"),
                    "409": _problem(
                        "vote_open: the party already has an open vote, or already voted "
                        "under this vote_id",
                        "vote_open",
                    ),
                    "422": _problem("invalid_vote: the detail says why", "invalid_vote"),
                    "503": _UNAVAILABLE,
                },
                "api_max_body_bytes",
            ),
        }
    }


def narration_piece(contracts: Contracts) -> dict[str, Any]:
    """The body of ``POST .../narration``: a ``narration.delta`` payload (its contract's fields)
    and an optional ``trace_id`` (``NarrationPiece.from_json``)."""
    payload = contracts.documents["narration.delta"]["properties"]["payload"]
    properties: dict[str, Any] = _rewrite(copy.deepcopy(payload["properties"]))
    properties["done"] = {**properties["done"], "default": False}
    properties["action_id"] = {
        "anyOf": [properties["action_id"], {"type": "null"}],
        "description": "The action this narration answers; absent or null: none (a scene's).",
    }
    properties["trace_id"] = TRACE_ID_FIELD
    return {
        "type": "object",
        "description": (
            "The next piece of a live narration stream: pieces of a stream are numbered 0, 1, "
            "2, … (`index`); `done: true` marks the last (its `text` may be empty). The text of "
            f"a stream is at most {MAX_NARRATION_CHARS} characters in all. Sent to every member as "
            "narration.delta (not sequenced; the final text still goes out in scene.update or "
            "action.result)."
        ),
        "required": ["stream_id", "index", "text"],
        "additionalProperties": False,
        "properties": properties,
    }


def _narration() -> dict[str, Any]:
    return {
        "post": {
            "summary": "Stream the next piece of a live narration to every member of a party",
            "description": (
                "The party's members get narration.delta (docs/protocol.md, Live narration). "
                "A piece already taken (same stream_id and index) is answered 202 again and "
                "changes nothing, so a retry is safe. A stream with no piece for "
                "narration_idle is closed by party_sync."
            ),
            "operationId": "narrate",
            "tags": ["narration"],
            "security": _KEY,
            "parameters": _path_params("party_id"),
            "requestBody": _body({"$ref": SCHEMAS + "NarrationPiece"}),
            "responses": _with_body(
                {
                    "202": _json(
                        _object(
                            {
                                "stream_id": _ID,
                                "index": {"type": "integer", "minimum": 0, "maximum": 2**53 - 1},
                            }
                        ),
                        "Taken (or taken before)",
                    ),
                    "409": _problem(
                        "narration_conflict: the piece cannot follow its stream (a gap in the "
                        "indexes, a piece after the last, the stream over "
                        f"{MAX_NARRATION_CHARS} characters, or too many open streams in the "
                        "party)",
                        "narration_conflict",
                    ),
                    "422": _problem(
                        "invalid_event: not a valid narration piece (the detail says why)",
                        "invalid_event",
                    ),
                    "503": _UNAVAILABLE,
                },
                "api_max_body_bytes",
            ),
        }
    }


def _handed_envelope() -> dict[str, Any]:
    return {
        "description": (
            "The action.request envelope the engine was handed: the actions stream entry's "
            "`envelope` field as it is (its JSON text), or that JSON as an object."
        ),
        "oneOf": [
            # (the JSON text of an object: "{}" at the least)
            {"type": "string", "minLength": 2, "contentMediaType": "application/json"},
            # (the entry's envelope always has the trace_id party_sync gave the action)
            {"allOf": [{"$ref": SCHEMAS + "action.request"}, {"required": ["trace_id"]}]},
        ],
    }


def _entry_deadline() -> dict[str, Any]:
    return {
        "description": "The entry's `deadline` field (decimal Unix seconds), as text or a number; "
        "absent, null or empty only for an entry that has none (a finished vote's party action, "
        "character_id party); required for every other claim.",
        "oneOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}],
    }


def _engine_action(
    summary: str, description: str, op: str, body: dict[str, Any], answer: dict[str, Any]
) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "description": description,
            "operationId": op,
            "tags": ["engines"],
            "security": _KEY,
            "parameters": _path_params("party_id", "action_id"),
            "requestBody": _body(body),
            "responses": _with_body(
                {
                    "200": answer,
                    "422": _problem(
                        "invalid_request: not the action.request the engine was handed, an "
                        "action_id other than the path's, or a field missing or of another kind",
                        "invalid_request",
                    ),
                    "503": _UNAVAILABLE,
                },
                "api_max_body_bytes",
            ),
        }
    }


def _claim() -> dict[str, Any]:
    return _engine_action(
        "Claim an action an engine read from the actions stream, or an HTTP engine host was "
        "asked to claim, right before starting it",
        "Atomic with party_sync's own timeout, as party-sync engine-worker claims (docs/"
        "engines.md, A stream worker in another language), and party-sync engine-http when a "
        "delivery carries X-Party-Sync-Claim: engine (its X-Party-Sync-Node goes in `node`): "
        "start runs it (a claim of an action "
        "already started starts it again: a redelivery, deduplicated by action_id); expired: "
        "its deadline passed before anyone started it, and it is refused now with "
        "action_timeout; final: it has its answer already. On expired and final, acknowledge "
        "the entry without running it.",
        "claimAction",
        {
            **_object(
                {
                    "envelope": _handed_envelope(),
                    "deadline": _entry_deadline(),
                    "node": {
                        **_ID,
                        "description": "HTTP engine hosts: the delivery's X-Party-Sync-Node, the "
                        "serving node that sent it (another node takes the action over if that "
                        "one dies); absent for a stream worker",
                    },
                },
                required=["envelope"],
            ),
            "additionalProperties": False,
        },
        _json(
            _object({"claim": {"type": "string", "enum": ["start", "expired", "final"]}}),
            "What to do with the action",
        ),
    )


def _refusal() -> dict[str, Any]:
    return _engine_action(
        "Refuse an action an engine was handed: its final answer",
        "action_rejected (the game's rules refuse it) or engine_error (the engine failed); "
        "`detail` is shown to the player with either (its first 500 characters: keep internal "
        "errors out of it). The refusal becomes the action's "
        "final answer: its sender gets system.error with that code and every member "
        "action.failed; a resend of the action_id gets it again. A retried refusal is safe.",
        "refuseAction",
        {
            **_object(
                {
                    "envelope": _handed_envelope(),
                    "deadline": _entry_deadline(),
                    "code": {"type": "string", "enum": ["action_rejected", "engine_error"]},
                    "detail": {"type": "string"},
                },
                required=["envelope", "code"],
            ),
            "additionalProperties": False,
        },
        _json(
            _object({"recorded": {"type": "boolean"}}),
            "recorded: true when the refusal became the action's answer, false when the action "
            "had its answer already (nothing was sent)",
        ),
    )


# -- memberships (transport/members.py) and Telegram sign-in (transport/telegram.py) ----------

_MEMBERSHIP_FIELDS: Final[dict[str, Any]] = {
    "telegram_user_id": {"type": "integer", "minimum": 1, "maximum": MAX_TELEGRAM_ID},
    "display_name": {
        "type": "string",
        "minLength": 1,
        "maxLength": 64,
        "pattern": NAME_PATTERN,
        "description": (
            "Plain text on one line: no control, line-break, bidi or invisible characters, and "
            "not blank (invalid_display_name)."
        ),
    },
    "campaign_run_id": _ID,
}


def _members() -> dict[str, Any]:
    refusals = {
        "400": _problem(_BAD_ID, "invalid_id"),
        "401": _UNAUTHORIZED,
        "503": _UNAVAILABLE,
    }
    reserved = _problem(
        "invalid_membership: the character id is the reserved one", "invalid_membership"
    )
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
    token = _object(
        {
            "token": {"type": "string", "description": "A party_sync connection token (JWT)"},
            "expires_at": {"type": "integer", "description": "Unix seconds"},
        }
    )
    no_store = {"Cache-Control": {"schema": {"type": "string", "const": "no-store"}}}
    return {
        "/api/v1/parties/{party_id}/members": {
            "get": {
                "summary": "List a party's memberships",
                "operationId": "list_members",
                "tags": ["members"],
                "security": _KEY,
                "parameters": _path_params("party_id"),
                "responses": {
                    "200": _json(
                        _object(
                            {
                                "members": {
                                    "type": "array",
                                    "items": {"$ref": SCHEMAS + "Membership"},
                                }
                            }
                        ),
                        "The memberships, by character_id",
                    ),
                    **refusals,
                },
            }
        },
        "/api/v1/parties/{party_id}/members/{character_id}": {
            "parameters": _path_params("party_id", "character_id"),
            "put": {
                "summary": "Register (or replace) which Telegram user may play this character",
                "operationId": "put_member",
                "tags": ["members"],
                "security": _KEY,
                "requestBody": _body({"$ref": SCHEMAS + "MembershipBody"}),
                "responses": _with_body(
                    {
                        "204": {"description": "Registered"},
                        "422": _problem(
                            "invalid_membership (the reserved character id, or a bad body: the "
                            "detail says why), or invalid_display_name (the name breaks the "
                            "display-name rule)",
                            "invalid_membership",
                            "invalid_display_name",
                        ),
                        "503": _UNAVAILABLE,
                    },
                    "4096 bytes",
                ),
            },
            "delete": {
                "summary": "Remove a membership (idempotent)",
                "operationId": "delete_member",
                "tags": ["members"],
                "security": _KEY,
                "responses": {
                    "204": {"description": "Removed (or there was none)"},
                    "422": reserved,
                    **refusals,
                },
            },
            "get": {
                "summary": "Read a membership",
                "operationId": "get_member",
                "tags": ["members"],
                "security": _KEY,
                "responses": {
                    "200": _json({"$ref": SCHEMAS + "Membership"}, "The membership"),
                    "404": _problem("not_found: no such membership", "not_found"),
                    "422": reserved,
                    **refusals,
                },
            },
        },
        "/api/v1/auth/telegram": {
            "post": {
                "summary": "Telegram Mini App sign-in: trade initData for a connection token",
                "description": (
                    "Checks initData's HMAC with the bot token and/or its Ed25519 signature "
                    "with Telegram's key for the configured bot id, and the freshness of "
                    "auth_date, then that the membership directory binds the character in the "
                    "party to that Telegram user. Refusals carry a stable error code and a "
                    "fixed detail only."
                ),
                "operationId": "telegram_sign_in",
                "tags": ["auth"],
                "security": [],
                "requestBody": _body(sign_in_body),
                "responses": {
                    "200": {
                        **_json(token, "A token bound to the party, run and character"),
                        "headers": no_store,
                    },
                    "400": _problem(
                        "bad_request, too_deep, or malformed_init_data",
                        "bad_request",
                        "too_deep",
                        "malformed_init_data",
                        headers=no_store,
                    ),
                    "401": _problem(
                        "invalid_init_data (bad hash or signature), or init_data_expired",
                        "invalid_init_data",
                        "init_data_expired",
                        headers=no_store,
                    ),
                    "403": _problem(
                        "not_a_member, or origin_not_allowed",
                        "not_a_member",
                        "origin_not_allowed",
                        headers=no_store,
                    ),
                    "408": _SLOW_BODY,
                    "413": _too_large("16384 bytes"),
                    "503": _problem(
                        f"telegram_not_configured, backend_unavailable, or {_SHUTTING_DOWN}",
                        "telegram_not_configured",
                        "backend_unavailable",
                        "shutting_down",
                        headers=no_store,
                    ),
                },
            }
        },
    }


# -- the admin API (transport/admin.py) --------------------------------------------------------


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


def _admin() -> dict[str, Any]:
    ids = {
        "400": _problem(
            _BAD_ID + "; invalid_query: a query parameter", "invalid_id", "invalid_query"
        )
    }
    refusals = {**ids, "401": _UNAUTHORIZED, "503": _UNAVAILABLE}
    no_party = _problem("not_found: no such party (or its state expired)", "not_found")

    def get(summary: str, op: str, schema: str, params: list[Any], **more: Any) -> Any:
        return {
            "get": {
                "summary": summary,
                "operationId": op,
                "tags": ["admin"],
                "security": _KEY,
                "parameters": params,
                "responses": {
                    "200": _json({"$ref": SCHEMAS + schema}, summary),
                    **more,
                    **refusals,
                },
            }
        }

    return {
        "/api/v1/parties": get(
            "The parties of the whole service, by party_id (paginated)",
            "admin_list_parties",
            "PartyPage",
            [
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "Default 50"),
                _query(
                    "cursor",
                    {"anyOf": [_ID, {"type": "string", "maxLength": 0}]},
                    "The next_cursor of the previous page (empty or absent: the first page)",
                ),
            ],
        ),
        "/api/v1/parties/{party_id}": get(
            "One party: presence per character with its connections and nodes, the "
            "system.hello projection, the actions in flight",
            "admin_get_party",
            "PartyDetail",
            _path_params("party_id"),
            **{"404": no_party},
        ),
        "/api/v1/parties/{party_id}/events": get(
            "A party's history as held",
            "admin_party_events",
            "EventPage",
            [
                *_path_params("party_id"),
                _query(
                    "after_seq",
                    {"type": "integer", "minimum": 0, "maximum": MAX_AFTER_SEQ},
                    "Events after it",
                ),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "Default 100"),
            ],
            **{"404": no_party},
        ),
        "/api/v1/parties/{party_id}/members/{character_id}/connections": {
            "delete": {
                "summary": "Close a character's connections on every node",
                "description": (
                    "Each of its WebSockets is closed with close code 4004 (see /asyncapi.json); "
                    "with `until`, its handshakes are refused (403 disconnected_by_operator) "
                    "until then; `until=0` lifts such a block."
                ),
                "operationId": "admin_disconnect",
                "tags": ["admin"],
                "security": _KEY,
                "parameters": [
                    *_path_params("party_id", "character_id"),
                    _query(
                        "until", {"type": "number", "minimum": 0}, "Unix seconds, ≤ 1 year ahead"
                    ),
                ],
                "responses": {
                    "202": _json({"$ref": SCHEMAS + "Disconnected"}, "Asked every node to close"),
                    **refusals,
                },
            }
        },
        "/api/v1/nodes": get(
            "The live nodes, their connection counts and versions", "admin_nodes", "NodeList", []
        ),
        "/admin": _plain(
            "The admin page (the API key is typed once, kept for the session)",
            "admin_page",
            {
                "200": _text("The page", "text/html"),
                "404": _text("Not installed"),
                "503": _text("Not built (make setup)"),
            },
        ),
        "/admin/": _plain(
            "Redirects to /admin (query kept)",
            "admin_page_slash",
            {"308": {"description": "To /admin"}},
        ),
        "/admin/app.js": _plain(
            "The admin page's script",
            "admin_app",
            {"200": _text("The script", "text/javascript"), "503": _text("Not built")},
        ),
        "/admin/admin.css": _plain(
            "The admin page's stylesheet",
            "admin_css",
            {"200": _text("The stylesheet", "text/css"), "503": _text("Not built")},
        ),
    }


def _admin_schemas() -> dict[str, Any]:
    number = {"type": "number"}
    text_or_null = {"type": ["string", "null"]}
    summary = _object(
        {
            "party_id": _ID,
            "campaign_run_id": text_or_null,
            "epoch": text_or_null,
            "last_seq": {"type": "integer", "minimum": 0},
            "members": _object(
                {
                    "online": {"type": "integer", "minimum": 0},
                    "total": {"type": "integer", "minimum": 0},
                }
            ),
            "vote": {"type": ["object", "null"], "description": "The open vote, if any"},
            "actions_in_flight": {"type": "integer", "minimum": 0},
        }
    )
    connection = _object(
        {"connection_id": {"type": "string"}, "node_id": text_or_null, "expires_at": number}
    )
    presence = _object(
        {
            "character_id": _ID,
            "display_name": text_or_null,
            "online": {"type": "boolean"},
            "connections": {"type": "array", "items": connection},
            "nodes": {"type": "array", "items": {"type": "string"}},
        }
    )
    action = _object(
        {
            "action_id": {"type": "string"},
            "character_id": {"type": "string"},
            "deadline": number,
            "age_seconds": {"type": "number", "minimum": 0},
        }
    )
    return {
        "PartySummary": summary,
        "PartyPage": _object(
            {
                "parties": {"type": "array", "items": {"$ref": SCHEMAS + "PartySummary"}},
                "next_cursor": {"type": ["string", "null"]},
            }
        ),
        "PartyDetail": _object(
            {
                "party_id": _ID,
                "campaign_run_id": text_or_null,
                "epoch": text_or_null,
                "last_seq": {"type": "integer", "minimum": 0},
                "presence": {"type": "array", "items": presence},
                "hello": {
                    "type": "object",
                    "description": "The system.hello projection (its payload's fields)",
                    "required": ["party_id", "members", "seq", "epoch"],
                },
                "actions_in_flight": {"type": "array", "items": action},
            }
        ),
        "EventPage": _object(
            {
                "party_id": _ID,
                "epoch": text_or_null,
                "last_seq": {"type": "integer", "minimum": 0},
                "oldest_seq": {"type": ["integer", "null"]},
                "next_after_seq": {"type": "integer", "minimum": 0},
                "events": {
                    "type": "array",
                    "description": "Party events as clients received them, in seq order",
                    "items": {"$ref": SCHEMAS + "envelope"},
                },
            }
        ),
        "Disconnected": _object(
            {
                "party_id": _ID,
                "character_id": _ID,
                "close_code": {"type": "integer", "const": 4004},
                "blocked_until": {
                    "type": ["number", "null"],
                    "description": "The block in force after this request (Unix seconds), or "
                    "null: until=0 lifts it, no until keeps an earlier one",
                },
            }
        ),
        "NodeList": _object(
            {
                "nodes": {
                    "type": "array",
                    "items": _object(
                        {
                            "node_id": {"type": "string"},
                            "version": {"type": "string"},
                            "connections": {"type": "integer", "minimum": 0},
                            "started_at": number,
                            "seen_at": number,
                            "self": {"type": "boolean"},
                            "settings": {
                                "type": "object",
                                "description": "The settings every node should share "
                                "(presence_ttl, presence_grace, action_timeout, "
                                "action_record_ttl, party_ttl, history_size, history_max_bytes, "
                                "history_max_age, max_replay, narration_idle, "
                                "max_message_bytes), as this node's heartbeat says; empty "
                                "from a node of an earlier release",
                                "additionalProperties": {"type": "number"},
                            },
                        }
                    ),
                }
            }
        ),
    }


# -- operations: health, metrics, the documents, the demo page, the WebSocket ------------------


def _plain(summary: str, operation_id: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "operationId": operation_id, "responses": responses}}


def _text(description: str, media: str = "text/plain") -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


def _operations() -> dict[str, Any]:
    readiness = {"$ref": SCHEMAS + "Readiness"}
    return {
        "/healthz": _plain(
            "Liveness",
            "healthz",
            {"200": _json(_object({"status": {"type": "string", "const": "ok"}}), "Alive")},
        ),
        "/readyz": _plain(
            "Readiness (the backend is usable and the node is not draining)",
            "readyz",
            {
                "200": _json(readiness, "ready, or degraded (the engine link is unhealthy)"),
                "503": _json(readiness, "unavailable: the backend is unusable or draining"),
            },
        ),
        "/metrics": _plain(
            "Prometheus metrics",
            "metrics",
            {"200": _text("The exposition format, version 0.0.4")},
        ),
        "/openapi.json": _plain(
            "This document", "openapi", {"200": _json({"type": "object"}, "OpenAPI 3.1")}
        ),
        "/asyncapi.json": _plain(
            "The WebSocket protocol (/ws) as an AsyncAPI 3 document",
            "asyncapi",
            {"200": _json({"type": "object"}, "AsyncAPI 3.0")},
        ),
        "/ws": {
            "get": {
                "summary": "The WebSocket (the protocol: /asyncapi.json and docs/protocol.md)",
                "operationId": "websocket",
                "tags": ["websocket"],
                "parameters": [
                    {"name": n, "in": "query", "required": False, "schema": s, "description": d}
                    for n, s, d in (
                        ("token", {"type": "string"}, "The JWT (or Authorization: Bearer)"),
                        ("epoch", {"type": "string"}, "Resume: the epoch of the last hello"),
                        ("last_seq", {"type": "integer", "minimum": 0}, "Resume: the last seq"),
                    )
                ],
                "responses": {
                    "101": {"description": "Switching protocols"},
                    "401": _text("Missing, invalid or expired token"),
                    "403": {
                        "description": (
                            "Origin not allowed (text), or disconnected_by_operator (a problem "
                            "with Retry-After): an operator blocked this character for a while"
                        ),
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            PROBLEM_JSON: {"schema": {"$ref": SCHEMAS + "Problem"}},
                        },
                    },
                    "429": _json(
                        _object(
                            {
                                "error": {
                                    "type": "string",
                                    "enum": [
                                        "too_many_connections",
                                        "policy_cooldown",
                                        "too_many_handshakes",
                                    ],
                                }
                            }
                        ),
                        "too_many_connections: max_connections_per_user WebSockets already open "
                        "on this node; policy_cooldown (with Retry-After): one of this user's "
                        "connections was closed with 1008 less than 10 s ago; too_many_handshakes "
                        "(with Retry-After): the user opened sessions on this node faster than "
                        "handshake_rate_per_user past handshake_burst_per_user",
                    ),
                },
            }
        },
    }


def _demo(dev_mode: bool) -> dict[str, Any]:
    not_built = _text("The page is not built (make setup)")
    missing = {"404": {"description": "No such file"}}
    paths: dict[str, Any] = {
        "/demo": _plain(
            "The demo page (plays a party in the browser)",
            "demo_page",
            {"200": _text("The page", "text/html"), "503": not_built},
        ),
        "/demo/": _plain(
            "Redirects to /demo (query kept)",
            "demo_page_slash",
            {"308": {"description": "To /demo"}},
        ),
        "/demo/config.json": _plain(
            "The demo page's settings",
            "demo_config",
            {"200": _json({"$ref": SCHEMAS + "DemoConfig"}, "The settings")},
        ),
        "/demo/app.js": _plain(
            "The page's script",
            "demo_app",
            {"200": _text("The script", "text/javascript"), "503": not_built},
        ),
        "/demo/lib/{name}": {
            "get": {
                "summary": "A module of the client library",
                "operationId": "demo_lib",
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": _text("The module", "text/javascript"),
                    "503": not_built,
                    **missing,
                },
            }
        },
        "/demo/assets/{name}": {
            "get": {
                "summary": "A stylesheet or image of the page",
                "operationId": "demo_asset",
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {
                        "description": "The file",
                        "content": {
                            m: {"schema": {"type": "string"}}
                            for m in ("text/css", "image/svg+xml", "image/png")
                        },
                    },
                    **missing,
                },
            }
        },
    }
    if dev_mode:
        paths["/api/v1/dev/token"] = {
            "post": {
                "summary": "Development mode only: a connection token for any character",
                "description": "Absent (404) in production mode.",
                "operationId": "dev_token",
                "tags": ["auth"],
                "security": [],
                "requestBody": _body({"$ref": SCHEMAS + "DevTokenRequest"}),
                "responses": {
                    "200": _json({"$ref": SCHEMAS + "DevToken"}, "A token"),
                    "400": _problem("bad_json, or too_deep", "bad_json", "too_deep"),
                    "408": _SLOW_BODY,
                    "413": _too_large("4096 bytes"),
                    "503": _problem(_SHUTTING_DOWN, "shutting_down"),
                    "422": _problem(
                        "invalid_request (the detail says which field), or invalid_display_name",
                        "invalid_request",
                        "invalid_display_name",
                    ),
                },
            }
        }
    return paths


def _other_schemas() -> dict[str, Any]:
    name = {"type": "string", "minLength": 1, "maxLength": 64}
    return {
        "Readiness": _object(
            {
                "status": {"type": "string", "enum": ["ready", "degraded", "unavailable"]},
                "draining": {"type": "boolean"},
                "backend": _object({"name": {"type": "string"}, "ok": {"type": "boolean"}}),
                "engine": _object(
                    {
                        "transport": {"type": "string"},
                        "ok": {"type": "boolean"},
                        "detail": {"type": "string"},
                    }
                ),
            }
        ),
        "DemoConfig": _object(
            {
                "dev_mode": {"type": "boolean"},
                "ws_path": {"type": "string"},
                "party_id": _ID,
                "campaign_run_id": _ID,
                "characters": {
                    "type": "array",
                    "items": _object({"character_id": _ID, "display_name": name}),
                },
                "telegram_auth_path": {"type": "string"},
                "dev_token_path": {"type": "string"},
            }
        ),
        "DevTokenRequest": {
            "type": "object",
            "required": ["character_id"],
            "additionalProperties": False,
            "description": "party_id and campaign_run_id default to the demo party's; any other "
            "field is refused (422 invalid_request, naming it)",
            "properties": {
                "party_id": _ID,
                "campaign_run_id": _ID,
                "character_id": _ID,
                "display_name": name,
            },
        },
        "DevToken": _object(
            {
                "party_id": _ID,
                "campaign_run_id": _ID,
                "character_id": _ID,
                "display_name": name,
                "token": {"type": "string"},
                "expires_in": {"type": "integer", "description": "Seconds"},
            }
        ),
    }


def document(contracts: Contracts, *, dev_mode: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of an app built with ``dev_mode``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "party_sync",
            "version": __version__,
            "description": (
                "Realtime party layer of RPG-Bot. The WebSocket protocol is described in "
                "/asyncapi.json and docs/protocol.md; its JSON Schemas are bundled here as "
                "components (from contracts/jsonschema/party_sync/). Errors are RFC 9457 "
                "problem details with a stable `error` code."
            ),
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "paths": {
            "/api/v1/parties/{party_id}/events": {
                **_publish(
                    "Publish an engine event to a party (sequenced, recorded, broadcast)",
                    "party_id",
                    _object({"seq": {"$ref": SCHEMAS + "common.seq"}}),
                ),
                **_admin().pop("/api/v1/parties/{party_id}/events"),
            },
            "/api/v1/parties/{party_id}/events/batch": _publish_batch(),
            "/api/v1/runs/{campaign_run_id}/events": _publish(
                "Publish an event to every party of a campaign run (any engine event but "
                "action.result, which is its action's party's: 422 invalid_event)",
                "campaign_run_id",
                _object(
                    {
                        "parties": {
                            "type": "object",
                            "additionalProperties": {"$ref": SCHEMAS + "common.seq"},
                            "description": "party_id → the seq the event got in that party",
                        }
                    }
                ),
                body="RunEventBody",
            ),
            "/api/v1/parties/{party_id}/votes": _vote(contracts),
            "/api/v1/parties/{party_id}/narration": _narration(),
            "/api/v1/parties/{party_id}/actions/{action_id}/claim": _claim(),
            "/api/v1/parties/{party_id}/actions/{action_id}/refusal": _refusal(),
            **_members(),
            **{k: v for k, v in _admin().items() if k != "/api/v1/parties/{party_id}/events"},
            **_operations(),
            **_demo(dev_mode),
        },
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The server API key (PARTY_SYNC_API_KEY)",
                }
            },
            "schemas": {
                "Problem": problem_schema(),
                "EventBody": event_body(),
                "RunEventBody": event_body(but=frozenset({"action.result"})),
                "VoteRequest": vote_request(contracts),
                "VoteStarted": vote_started(contracts),
                "NarrationPiece": narration_piece(contracts),
                "Membership": _object({"party_id": _ID, "character_id": _ID, **_MEMBERSHIP_FIELDS}),
                "MembershipBody": {
                    **_object(dict(_MEMBERSHIP_FIELDS)),
                    "additionalProperties": False,
                },
                **_admin_schemas(),
                **_other_schemas(),
                **bundled_schemas(contracts),
            },
        },
    }
