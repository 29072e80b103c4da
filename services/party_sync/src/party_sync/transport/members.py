"""The membership API (``/api/v1/parties/{party_id}/members``): who may sign in as which character.

The engine or gateway_api registers each (party, character) → Telegram user binding here, with the
server API key (checked before anything else), path ids that follow the id rule (400
``invalid_id``) and a body read whole (``transport/edge.py``); what a handler raises is answered
by ``problems.PROBLEMS`` (422 ``invalid_membership``, 404 ``not_found``, 503
``backend_unavailable``). A display name must follow the name rule (``protocol/names.py``: no
control, line-break, bidi or invisible characters): 422 ``invalid_display_name``, since it is
broadcast to the party as given. Telegram sign-in
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

from party_sync.backends.directory import Directory, check_ids, parse_membership
from party_sync.problems import CONTINUE_WHEN_READ, InvalidDisplayName, NotFound
from party_sync.protocol.names import name_problem
from party_sync.transport.appkeys import DIRECTORY
from party_sync.transport.edge import guarded, read_json

log = logging.getLogger(__name__)

MAX_BODY: Final = 4096
PATH: Final = "/api/v1/parties/{party_id}/members"


def _ids(request: web.Request) -> tuple[str, str]:
    """The path's ids (``guarded`` has checked their form); the reserved actor is refused
    (``InvalidMembership``)."""
    party_id = request.match_info["party_id"]
    character_id = request.match_info["character_id"]
    check_ids(party_id, character_id)
    return party_id, character_id


async def put_member(request: web.Request) -> web.Response:
    data = await read_json(request, MAX_BODY)
    party_id = request.match_info["party_id"]
    character_id = request.match_info["character_id"]
    membership = parse_membership(party_id, character_id, data)
    problem = name_problem(membership.display_name)
    if problem is not None:
        raise InvalidDisplayName(problem)
    await request.app[DIRECTORY].put(membership)
    log.info("membership registered", extra={"party_id": party_id, "character_id": character_id})
    return web.Response(status=204)


async def delete_member(request: web.Request) -> web.Response:
    party_id, character_id = _ids(request)
    await request.app[DIRECTORY].delete(party_id, character_id)
    log.info("membership deleted", extra={"party_id": party_id, "character_id": character_id})
    return web.Response(status=204)  # idempotent: deleting an absent membership is fine


async def get_member(request: web.Request) -> web.Response:
    membership = await request.app[DIRECTORY].get(*_ids(request))
    if membership is None:
        raise NotFound("no such membership")
    return web.json_response(membership.to_json())


async def list_members(request: web.Request) -> web.Response:
    members = await request.app[DIRECTORY].list(request.match_info["party_id"])
    return web.json_response({"members": [m.to_json() for m in members]})


def add_routes(app: web.Application, directory: Directory) -> None:
    """Register the membership API; the directory is closed with the app."""
    app[DIRECTORY] = directory
    app.router.add_get(PATH, guarded(list_members))
    member = PATH + "/{character_id}"
    app.router.add_put(member, guarded(put_member), expect_handler=CONTINUE_WHEN_READ)
    app.router.add_delete(member, guarded(delete_member))
    app.router.add_get(member, guarded(get_member))

    async def close_directory(app: web.Application) -> None:
        await app[DIRECTORY].close()

    app.on_cleanup.append(close_directory)
