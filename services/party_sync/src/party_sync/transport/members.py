"""The membership API (``/api/v1/parties/{party_id}/members``): who may sign in as which character.

The engine or gateway_api registers each (party, character) → Telegram user binding here, with the
server API key (``api.authorized``, checked before anything else). Telegram sign-in
(``transport/telegram.py``) reads it. A deleted membership stops new sign-ins at once; tokens
already issued stay valid until they expire (``PARTY_SYNC_TELEGRAM_TOKEN_TTL``).

    PUT    /api/v1/parties/{party_id}/members/{character_id}   {telegram_user_id, display_name,
                                                                campaign_run_id}       → 204
    DELETE /api/v1/parties/{party_id}/members/{character_id}                          → 204
    GET    /api/v1/parties/{party_id}/members/{character_id}                          → 200 | 404
    GET    /api/v1/parties/{party_id}/members                                         → 200
"""

from __future__ import annotations

import logging
from typing import Final

from aiohttp import web

from party_sync.directory import Directory, InvalidMembership, check_ids, parse_membership
from party_sync.protocol import codec
from party_sync.protocol.errors import BackendUnavailable
from party_sync.transport.api import authorized
from party_sync.transport.appkeys import DIRECTORY

log = logging.getLogger(__name__)

MAX_BODY: Final = 4096
PATH: Final = "/api/v1/parties/{party_id}/members"


def _problem(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


_UNAUTHORIZED = ("unauthorized", "missing or wrong API key")
_UNAVAILABLE = ("backend_unavailable", "the backend is unreachable; retry")


def _ids(request: web.Request) -> tuple[str, str] | web.Response:
    party_id = request.match_info["party_id"]
    character_id = request.match_info["character_id"]
    try:
        check_ids(party_id, character_id)
    except InvalidMembership as exc:
        return _problem(422, "invalid_membership", str(exc))
    return party_id, character_id


async def put_member(request: web.Request) -> web.Response:
    if not authorized(request):
        return _problem(401, *_UNAUTHORIZED)
    body = await request.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        return _problem(413, "too_large", f"body exceeds {MAX_BODY} bytes")
    try:
        data = codec.decode(body)
    except ValueError:
        return _problem(400, "bad_json", "body is not valid UTF-8 JSON")
    party_id = request.match_info["party_id"]
    character_id = request.match_info["character_id"]
    try:
        membership = parse_membership(party_id, character_id, data)
        await request.app[DIRECTORY].put(membership)
    except InvalidMembership as exc:
        return _problem(422, "invalid_membership", str(exc))
    except BackendUnavailable:
        return _problem(503, *_UNAVAILABLE)
    log.info("membership registered", extra={"party_id": party_id, "character_id": character_id})
    return web.Response(status=204)


async def delete_member(request: web.Request) -> web.Response:
    if not authorized(request):
        return _problem(401, *_UNAUTHORIZED)
    ids = _ids(request)
    if isinstance(ids, web.Response):
        return ids
    try:
        await request.app[DIRECTORY].delete(*ids)
    except BackendUnavailable:
        return _problem(503, *_UNAVAILABLE)
    log.info("membership deleted", extra={"party_id": ids[0], "character_id": ids[1]})
    return web.Response(status=204)  # idempotent: deleting an absent membership is fine


async def get_member(request: web.Request) -> web.Response:
    if not authorized(request):
        return _problem(401, *_UNAUTHORIZED)
    ids = _ids(request)
    if isinstance(ids, web.Response):
        return ids
    try:
        membership = await request.app[DIRECTORY].get(*ids)
    except BackendUnavailable:
        return _problem(503, *_UNAVAILABLE)
    if membership is None:
        return _problem(404, "not_found", "no such membership")
    return web.json_response(membership.to_json())


async def list_members(request: web.Request) -> web.Response:
    if not authorized(request):
        return _problem(401, *_UNAUTHORIZED)
    party_id = request.match_info["party_id"]
    try:
        check_ids(party_id, "x")
        members = await request.app[DIRECTORY].list(party_id)
    except InvalidMembership as exc:
        return _problem(422, "invalid_membership", str(exc))
    except BackendUnavailable:
        return _problem(503, *_UNAVAILABLE)
    return web.json_response({"members": [m.to_json() for m in members]})


def add_routes(app: web.Application, directory: Directory) -> None:
    """Register the membership API; the directory is closed with the app."""
    app[DIRECTORY] = directory
    app.router.add_get(PATH, list_members)
    member = PATH + "/{character_id}"
    app.router.add_put(member, put_member)
    app.router.add_delete(member, delete_member)
    app.router.add_get(member, get_member)

    async def close_directory(app: web.Application) -> None:
        await app[DIRECTORY].close()

    app.on_cleanup.append(close_directory)
