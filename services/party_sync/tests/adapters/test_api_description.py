"""The API descriptions (README, "Operating it"): ``/openapi.json`` lists exactly the app's
routes and is valid OpenAPI 3.1; ``/asyncapi.json`` is valid AsyncAPI 3.0 (checked against the
official JSON Schema of the npm package ``@asyncapi/specs``, a devDependency of clients/js) with
one message per protocol type and every close code; refusals are RFC 9457 problem details."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from aiohttp import web
from openapi_spec_validator import validate
from party_sync.protocol.errors import CloseCode
from party_sync.protocol.schemas import Contracts
from party_sync.protocol.types import CLIENT_TYPES, EVENT_TYPES, SYSTEM_TYPES, TRANSIENT_TYPES
from party_sync.server import build_server
from party_sync.transport import asyncapi, openapi
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import make_settings, serve_in_process

KEY = "api-key-0123456789abcdef0123456789"
METHODS = frozenset({"get", "put", "post", "delete", "patch"})
REPO = Path(__file__).resolve().parents[4]
ASYNCAPI_SCHEMA = REPO / "clients/js/node_modules/@asyncapi/specs/schemas/3.0.0.json"


def served(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route of ``app`` (aiohttp's implicit HEAD left out)."""
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("formatter") or info.get("path")
        if route.method != "HEAD" and isinstance(path, str):
            out.add((route.method, path))
    return out


def documented(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in METHODS
    }


@pytest.mark.parametrize("dev_mode", [False, True])
def test_the_openapi_document_lists_exactly_the_routes_of_the_app(dev_mode: bool) -> None:
    server = build_server(make_settings(api_key=KEY), dev_mode=dev_mode)
    spec = openapi.document(server.gateway.contracts, dev_mode=dev_mode)
    routes, described = served(server.app), documented(spec)
    assert ("POST", "/api/v1/parties/{party_id}/votes") in described
    assert routes - described == set(), "routes missing from /openapi.json"
    assert described - routes == set(), "documented but not served"


def test_the_route_walk_sees_a_route_added_later() -> None:
    """The check above cannot pass by seeing nothing: a new route shows up as undocumented."""
    server = build_server(make_settings(api_key=KEY))

    async def extra(request: web.Request) -> web.Response:
        return web.Response()

    server.app.router.add_post("/api/v1/extra/{thing}", extra)
    spec = openapi.document(server.gateway.contracts)
    assert served(server.app) - documented(spec) >= {("POST", "/api/v1/extra/{thing}")}


def test_the_openapi_document_is_valid_and_every_body_is_described() -> None:
    spec = openapi.document(Contracts(), dev_mode=True)
    validate(spec)
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            where = f"{method.upper()} {path}"
            assert operation.get("operationId"), where
            if method in ("post", "put"):
                assert operation["requestBody"]["content"], where
            for status, response in operation["responses"].items():
                code = int(status)
                if code >= 400 and path.startswith("/api/"):
                    assert list(response["content"]) == ["application/problem+json"], where
                if code in (200, 201, 202) and path != "/demo/":
                    assert response.get("content"), (where, status)


def test_the_narration_route_is_documented_with_its_body_and_answers() -> None:
    contracts = Contracts()
    spec = openapi.document(contracts)
    operation = spec["paths"]["/api/v1/parties/{party_id}/narration"]["post"]
    assert operation["security"] == [{"apiKey": []}]
    assert set(operation["responses"]) == {"202", "400", "401", "408", "409", "413", "422", "503"}
    codes = {
        status: response["content"]["application/problem+json"]["schema"]["allOf"][1]
        for status, response in operation["responses"].items()
        if status != "202"
    }
    assert codes["409"]["properties"]["error"]["enum"] == ["narration_conflict"]
    assert codes["422"]["properties"]["error"]["enum"] == ["invalid_event"]
    # The body is the narration.delta payload (from its contract) plus trace_id, and nothing
    # else: what NarrationPiece.from_json takes.
    body = spec["components"]["schemas"]["NarrationPiece"]
    delta = contracts.documents["narration.delta"]["properties"]["payload"]
    assert set(body["properties"]) == set(delta["properties"]) | {"trace_id"}
    assert body["required"] == ["stream_id", "index", "text"]
    assert body["additionalProperties"] is False
    # (its references, #/components/schemas/..., resolve in a document that carries them)
    validator = jsonschema.Draft202012Validator({**body, "components": spec["components"]})
    good = {"stream_id": "n-1", "index": 0, "text": "The gate ", "done": False, "trace_id": "t"}
    assert list(validator.iter_errors(good)) == []
    for bad in ({**good, "index": -1}, {**good, "extra": 1}, {"stream_id": "n-1", "index": 0}):
        assert list(validator.iter_errors(bad)), bad


def test_bundled_contracts_keep_every_schema_and_no_file_reference() -> None:
    contracts = Contracts()
    schemas = openapi.bundled_schemas(contracts)
    assert set(contracts.types) | {"envelope"} <= set(schemas)
    text = json.dumps(schemas)
    assert "common.json" not in text and "envelope.json" not in text and "$id" not in text


def asyncapi_validator() -> Any:
    assert ASYNCAPI_SCHEMA.is_file(), f"{ASYNCAPI_SCHEMA} is missing: run `make setup`"
    schema = json.loads(ASYNCAPI_SCHEMA.read_text(encoding="utf-8"))
    return jsonschema.Draft7Validator(schema)


def test_the_asyncapi_document_is_valid_asyncapi_3() -> None:
    validator = asyncapi_validator()
    spec = asyncapi.document(Contracts())
    errors = [f"{e.json_path}: {e.message[:200]}" for e in validator.iter_errors(spec)]
    assert errors == []
    # The validator does check: a send/receive typo is refused.
    broken = json.loads(json.dumps(spec))
    broken["operations"]["clientMessages"]["action"] = "publish"
    assert list(validator.iter_errors(broken))


def test_the_asyncapi_document_has_every_message_direction_and_close_code() -> None:
    contracts = Contracts()
    spec = asyncapi.document(contracts)
    names = {m["name"] for m in spec["components"]["messages"].values()}
    assert (
        names == set(contracts.types) == CLIENT_TYPES | EVENT_TYPES | SYSTEM_TYPES | TRANSIENT_TYPES
    )
    ops = spec["operations"]

    def types_of(op: dict[str, Any]) -> set[str]:
        chosen = [r["$ref"].rsplit("/", 1)[1] for r in op["messages"]]
        return {spec["components"]["messages"][n]["name"] for n in chosen}

    assert (ops["clientMessages"]["action"], ops["serverMessages"]["action"]) == ("receive", "send")
    assert types_of(ops["clientMessages"]) == CLIENT_TYPES
    assert types_of(ops["serverMessages"]) == EVENT_TYPES | SYSTEM_TYPES | TRANSIENT_TYPES
    assert {"action.accepted", "action.failed", "narration.delta"} <= TRANSIENT_TYPES
    for type_ in TRANSIENT_TYPES:  # like every server message: its schema, its examples
        message = spec["components"]["messages"][type_.replace(".", "_")]
        assert message["payload"] == {"$ref": f"#/components/schemas/{type_}"}
        assert message["examples"] and type_ in spec["operations"]["serverMessages"]["summary"]
        assert type_ in spec["info"]["description"]  # said to carry no seq
    codes = {int(c) for c in spec["channels"]["party"]["x-close-codes"]}
    assert codes == set(asyncapi.close_codes()) and CloseCode.RESYNC in codes
    for code in codes:
        assert f"| {code} |" in spec["info"]["description"]
    # Every example of the contracts is a payload of its message.
    for message in spec["components"]["messages"].values():
        for example in message.get("examples", []):
            contracts.validate(message["name"], example["payload"])


async def test_both_documents_are_served_and_errors_are_problem_details() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        for path, key in (("/openapi.json", "openapi"), ("/asyncapi.json", "asyncapi")):
            async with srv.http.get(srv.base + path) as resp:
                assert resp.status == 200
                assert (await resp.json())[key] in ("3.1.0", "3.0.0")
        url = srv.base + "/api/v1/parties/p1/votes"
        async with srv.http.post(url, json={}) as resp:
            assert resp.status == 401
            assert resp.content_type == "application/problem+json"
            body = await resp.json()
        assert body == {
            "type": "about:blank",
            "title": "Unauthorized",
            "status": 401,
            "detail": "missing or wrong API key",
            "error": "unauthorized",
            "code": "unauthorized",
        }
