"""The admin API and page: what operators see of parties and nodes, and how they act on them.

Every route is behind the server API key and the path-id rule (``transport/edge.py guarded``) and
answers for the whole service, whichever node is asked (``AdminView``: in Redis mode it reads the
shared state, and a disconnect reaches every node through the admin channel)::

    GET    /api/v1/parties?limit=&cursor=                       parties, by party_id, paginated
    GET    /api/v1/parties/{party_id}                           presence, projection, actions
    GET    /api/v1/parties/{party_id}/events?after_seq=&limit=  the history as held
    DELETE /api/v1/parties/{party_id}/members/{character_id}/connections?until=
                                  close the character's connections everywhere (close code 4004)
                                  and, with ``until`` (Unix seconds), refuse its handshakes until
                                  then (403 ``disconnected_by_operator``); ``until=0`` lifts that
    GET    /api/v1/nodes                                        live nodes

``GET /admin`` is the page (clients/js/admin, built like the demo page): the key is typed once and
kept in ``sessionStorage``; it lists parties and nodes, follows one party's events by polling the
events route, and disconnects a character.

Each node keeps itself on the node list with a heartbeat every ``presence_ttl / 3`` (its id,
version, connection count, start time and the parties it serves), which expires after
``NODE_TTL_PERIODS`` heartbeats: a node that dies leaves the list within that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Final

import orjson
from aiohttp import web

from party_sync import __version__
from party_sync.auth import Claims
from party_sync.backends import shared_settings
from party_sync.backends.base import AdminView, NodeInfo, PartyDetail, PartySummary, Subscription
from party_sync.gateway import Gateway
from party_sync.problems import InvalidQuery, NotFound, OperatorBlocked, answer
from party_sync.protocol.errors import BackendUnavailable, CloseCode
from party_sync.protocol.ids import is_id
from party_sync.tasks import bounded, cancel_and_wait
from party_sync.transport import demo
from party_sync.transport.appkeys import GATEWAY
from party_sync.transport.edge import guarded

log = logging.getLogger(__name__)

#: The close code of a connection an operator disconnected (docs/protocol.md): do not reconnect
#: at once; a handshake refused with 403 ``disconnected_by_operator`` says until when.
CLOSE_DISCONNECTED: Final = CloseCode.DISCONNECTED
CLOSE_REASON: Final = "disconnected by an operator"
DEFAULT_PARTIES: Final = 50
MAX_PARTIES: Final = 500
DEFAULT_EVENTS: Final = 100
MAX_EVENTS: Final = 1000
#: The longest a handshake block may last (``until`` further away is refused with 400).
MAX_BLOCK: Final = 366 * 86400.0
#: A node's heartbeat lives this many heartbeat periods.
NODE_TTL_PERIODS: Final = 4
#: Seconds between two heartbeats of a node; None: ``presence_ttl / 3`` (the presence refresh's
#: period). Tests set a short one.
HEARTBEAT_INTERVAL: float | None = None

ADMIN: Final = web.AppKey[AdminView]("admin_view")
STARTED_AT: Final = web.AppKey("admin_started_at", float)
_TASK: Final = web.AppKey[asyncio.Task[None]]("admin_task")
#: Set at shutdown: the heartbeat loop ends at its next turn even if a Redis call swallowed the
#: cancellation meant for it (it would otherwise beat for ever and hang the shutdown).
_STOP: Final = web.AppKey[asyncio.Event]("admin_stop")
ADMIN_DIR: Final = web.AppKey("admin_dir", Path)


def admin_view(gateway: Gateway) -> AdminView:
    """The backend's ``AdminView`` (``Backend.admin``: both backends carry one)."""
    return gateway.backend.admin


# -- JSON shapes -----------------------------------------------------------------------------------
def summary_json(p: PartySummary) -> dict[str, Any]:
    return {
        "party_id": p.party_id,
        "campaign_run_id": p.campaign_run_id,
        "epoch": p.epoch,
        "last_seq": p.seq,
        "members": {"online": p.members_online, "total": p.members_total},
        "vote": dict(p.vote) if p.vote is not None else None,
        "actions_in_flight": p.actions_in_flight,
    }


def detail_json(party_id: str, d: PartyDetail, now: float, action_timeout: float) -> dict[str, Any]:
    """``GET /api/v1/parties/{party_id}``: presence per character, the hello projection, actions."""
    s = d.snapshot
    by_character: dict[str, list[dict[str, Any]]] = {}
    for c in d.connections:
        by_character.setdefault(c.character_id, []).append(
            {"connection_id": c.connection_id, "node_id": c.node_id, "expires_at": c.expires_at}
        )
    roster = {m["character_id"]: m for m in s.members}
    presence = [
        {
            "character_id": cid,
            "display_name": roster[cid]["display_name"] if cid in roster else None,
            "online": bool(roster[cid]["online"]) if cid in roster else False,
            "connections": by_character.get(cid, []),
            "nodes": sorted({c["node_id"] for c in by_character.get(cid, []) if c["node_id"]}),
        }
        for cid in [*roster, *sorted(set(by_character) - set(roster))]
    ]
    hello = {
        "party_id": party_id,
        "campaign_run_id": d.campaign_run_id,
        "status": s.status,
        "run_status": s.run_status,
        "members": s.members,
        "scene_number": s.scene_number,
        "seq": s.seq,
        "epoch": s.epoch,
        "scene": s.scene,
        "combat": s.combat,
        "party_state": s.party_state,
        "vote": dict(s.vote) if s.vote is not None else None,
    }
    actions = [
        {
            "action_id": a.action_id,
            "character_id": a.character_id,
            "deadline": a.deadline,
            "age_seconds": round(max(0.0, now - (a.deadline - action_timeout)), 3),
        }
        for a in d.actions
    ]
    return {
        "party_id": party_id,
        "campaign_run_id": d.campaign_run_id,
        "epoch": s.epoch,
        "last_seq": s.seq,
        "presence": presence,
        "hello": hello,
        "actions_in_flight": actions,
    }


def node_json(n: NodeInfo, this_node: str) -> dict[str, Any]:
    return {
        "node_id": n.node_id,
        "version": n.version,
        "connections": n.connections,
        "started_at": n.started_at,
        "seen_at": n.seen_at,
        "self": n.node_id == this_node,
        "settings": dict(n.settings),
    }


# -- query parameters ------------------------------------------------------------------------------
def _int_query(
    request: web.Request, name: str, default: int, low: int, high: int, rule: str
) -> int:
    """The query parameter ``name`` (``default`` when absent); ``InvalidQuery`` out of range."""
    raw = request.query.get(name)
    if raw is None:
        return default
    # ASCII digits only: str.isdigit and int() also take other scripts' digits ("１" is 1)
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18 or not low <= int(raw) <= high:
        raise InvalidQuery(f"{name}: {rule}")
    return int(raw)


_NO_PARTY: Final = "no such party (or its state expired)"
#: The largest ``after_seq`` (its OpenAPI maximum): far beyond any party's history.
MAX_AFTER_SEQ: Final = 10**15


# -- routes ----------------------------------------------------------------------------------------
async def list_parties(request: web.Request) -> web.Response:
    limit = _int_query(
        request, "limit", DEFAULT_PARTIES, 1, MAX_PARTIES, f"an integer from 1 to {MAX_PARTIES}"
    )
    cursor = request.query.get("cursor") or None
    if cursor is not None and not is_id(cursor):
        raise InvalidQuery("cursor: the next_cursor of the previous page")
    gateway = request.app[GATEWAY]
    page = await request.app[ADMIN].parties(cursor, limit + 1, gateway.clock())
    more = len(page) > limit
    page = page[:limit]
    return web.json_response(
        {
            "parties": [summary_json(p) for p in page],
            "next_cursor": page[-1].party_id if more else None,
        }
    )


async def get_party(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    party_id = request.match_info["party_id"]
    now = gateway.clock()
    detail = await request.app[ADMIN].party(party_id, now)
    if detail is None:
        raise NotFound(_NO_PARTY)
    return web.json_response(detail_json(party_id, detail, now, gateway.settings.action_timeout))


async def get_events(request: web.Request) -> web.StreamResponse:
    after = _int_query(
        request, "after_seq", 0, 0, MAX_AFTER_SEQ, f"an integer from 0 to {MAX_AFTER_SEQ}"
    )
    limit = _int_query(
        request, "limit", DEFAULT_EVENTS, 1, MAX_EVENTS, f"an integer from 1 to {MAX_EVENTS}"
    )
    party_id = request.match_info["party_id"]
    held = await request.app[ADMIN].events(party_id, after, limit)
    if held is None:
        raise NotFound(_NO_PARTY)
    last = after if not held.events else orjson.loads(held.events[-1])["seq"]
    head = orjson.dumps(
        {
            "party_id": party_id,
            "epoch": held.epoch,
            "last_seq": held.last_seq,
            "oldest_seq": held.oldest_seq,
            "next_after_seq": max(last, after),
        }
    )
    # The events as held, byte for byte (each is the envelope clients received): no re-encoding.
    body = head[:-1] + b',"events":[' + b",".join(held.events) + b"]}"
    return web.Response(body=body, content_type="application/json")


async def disconnect(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    party_id = request.match_info["party_id"]
    character_id = request.match_info["character_id"]
    now = gateway.clock()
    until: float | None = None
    raw = request.query.get("until")
    if raw is not None:
        try:
            until = float(raw)
        except ValueError:
            until = math.nan
        if not math.isfinite(until) or until < 0 or until > now + MAX_BLOCK:
            raise InvalidQuery("until: Unix seconds, at most a year ahead (0 lifts a block)")
    view = request.app[ADMIN]
    if until is not None:  # first: a client that reconnects at once is refused already
        await view.block(party_id, character_id, until, now)
    await view.request_close(party_id, character_id, CLOSE_DISCONNECTED, CLOSE_REASON)
    if until is not None:
        blocked = until if until > now else None
    else:  # the block in force, if an earlier request set one (operator probe: it said null)
        blocked = await view.blocked_until(party_id, character_id, now)
    log.info(
        "character disconnected by an operator",
        extra={"party_id": party_id, "character_id": character_id, "until": blocked},
    )
    return web.json_response(
        {
            "party_id": party_id,
            "character_id": character_id,
            "close_code": CLOSE_DISCONNECTED,
            "blocked_until": blocked,
        },
        status=202,
    )


async def list_nodes(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    now = gateway.clock()
    nodes = await request.app[ADMIN].nodes(now)
    # the answering node tells itself as it is now, not as of its last heartbeat (the others',
    # in Redis mode, are as of theirs: every presence_ttl / 3); listed even before its next
    # heartbeat when Redis lost the list (an empty restart: operator probe, it was missing)
    own = own_node(request.app)
    nodes = sorted(
        [n for n in nodes if n.node_id != gateway.node_id] + [own], key=lambda n: n.node_id
    )
    return web.json_response({"nodes": [node_json(n, gateway.node_id) for n in nodes]})


# -- the handshake check ---------------------------------------------------------------------------
async def handshake_refusal(request: web.Request, claims: Claims) -> web.Response | None:
    """403 ``disconnected_by_operator`` while an operator's block on the character holds.

    Raises ``BackendUnavailable`` when Redis cannot tell: the caller must not open the
    connection then (it would admit a blocked character whenever Redis came back between this
    check and the connection's registration)."""
    view = request.app.get(ADMIN)
    if view is None:
        return None
    gateway = request.app[GATEWAY]
    now = gateway.clock()
    until = await view.blocked_until(claims.party_id, claims.character_id, now)
    if until is None:
        return None
    gateway.metrics.handshakes_refused.labels("403").inc()
    blocked = OperatorBlocked(
        f"an operator disconnected this character until {until:.0f} (Unix seconds)",
        headers={"Retry-After": str(math.ceil(until - now))},
    )
    return answer(request, blocked)  # in the table: never None


# -- the node's heartbeat and its close requests ---------------------------------------------------
def own_node(app: web.Application) -> NodeInfo:
    """This node as it is now."""
    gateway = app[GATEWAY]
    return NodeInfo(
        gateway.node_id,
        __version__,
        len(gateway.sessions),
        app[STARTED_AT],
        gateway.clock(),
        shared_settings.values_of(gateway.settings, shared_settings.NODES),
    )


async def beat(app: web.Application, ttl: float) -> None:
    """One heartbeat of this node: itself, and the parties it served since the last one (its
    connections' and ``gateway.touched``), for ``ttl`` seconds. Raises ``BackendUnavailable``
    (the parties are kept for the next one)."""
    gateway, view = app[GATEWAY], app[ADMIN]
    node = own_node(app)
    touched, gateway.touched = gateway.touched, set()
    parties = sorted({s.party_id for s in gateway.sessions} | touched)
    try:
        await view.heartbeat(node, parties, ttl)
    except BaseException:
        gateway.touched |= touched
        raise


async def _last_words(app: web.Application) -> None:
    """A stopping node's last heartbeat, if it served parties since the one before (operator
    probe: a party whose only node stopped within its first heartbeat period was never listed),
    then it leaves the list of nodes, whatever that beat did."""
    gateway = app[GATEWAY]
    if gateway.touched:
        with contextlib.suppress(BackendUnavailable):
            await beat(app, HEARTBEAT_INTERVAL or gateway.settings.presence_ttl)
    await app[ADMIN].forget_node(gateway.node_id)


class SettingsCompared:
    """The other nodes' settings (``shared_settings.NODES``, from their heartbeats) compared
    with this node's: one WARNING per node and set of differences (pure: the nodes are passed
    in)."""

    def __init__(self, node_id: str, own: dict[str, float]) -> None:
        self.node_id, self.own = node_id, own
        self._told: dict[str, str] = {}  # node → the differences last told (the live nodes')

    def differences(self, nodes: list[NodeInfo]) -> list[tuple[str, str]]:
        """``(node_id, what differs)`` for each node whose differences changed since they were
        last told (a node that agrees again is forgotten: told again if it differs again)."""
        found = []
        told: dict[str, str] = {}
        for node in nodes:
            if node.node_id == self.node_id:
                continue
            what = "; ".join(
                shared_settings.differences(
                    self.own, node.settings, "this node", shared_settings.NODES
                )
            )
            if what:
                told[node.node_id] = what
                if self._told.get(node.node_id) != what:
                    found.append((node.node_id, what))
        self._told = told  # (nodes gone are forgotten with it)
        return found


async def _compare_settings(app: web.Application, compared: SettingsCompared) -> None:
    gateway = app[GATEWAY]
    for node_id, what in compared.differences(await app[ADMIN].nodes(gateway.clock())):
        log.warning(
            "node %s runs with other settings than this node: %s; give every node the same "
            "values (what a player meets must not depend on the node it lands on)",
            node_id,
            what,
        )


async def _keep_alive(app: web.Application) -> None:
    gateway, view = app[GATEWAY], app[ADMIN]
    interval = HEARTBEAT_INTERVAL or max(0.1, gateway.settings.presence_ttl / 3)
    watch: Subscription | None = None
    stop = app[_STOP]
    compared = SettingsCompared(
        gateway.node_id, shared_settings.values_of(gateway.settings, shared_settings.NODES)
    )
    try:
        while not stop.is_set():
            if watch is None:
                with contextlib.suppress(BackendUnavailable):
                    watch = await view.watch_closes(gateway.close_character)
            try:
                await beat(app, interval * NODE_TTL_PERIODS)
                await _compare_settings(app, compared)
            except BackendUnavailable:
                pass  # the next beat; the node's entry outlives a few missed ones
            except Exception:
                log.exception("node heartbeat failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
    finally:
        if watch is not None:
            with contextlib.suppress(Exception):
                await watch.close()


# -- the page --------------------------------------------------------------------------------------
_NOT_BUILT: Final = (
    "The admin page is not built. Run `make setup` (it runs `npm ci && npm run build` in "
    "clients/js), then reload.\n"
)
_PAGE_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            "connect-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    ),
}


def _page_file(path: Path, content_type: str) -> web.StreamResponse:
    if not path.is_file():
        return web.Response(status=503, text=_NOT_BUILT, headers=_PAGE_HEADERS)
    return web.FileResponse(path, headers={**_PAGE_HEADERS, "Content-Type": content_type})


async def page(request: web.Request) -> web.StreamResponse:
    root = request.app[ADMIN_DIR]
    if not (root / "dist" / "admin" / "app.js").is_file():
        return web.Response(status=503, text=_NOT_BUILT, headers=_PAGE_HEADERS)
    return _page_file(root / "admin" / "index.html", "text/html; charset=utf-8")


async def app_js(request: web.Request) -> web.StreamResponse:
    return _page_file(request.app[ADMIN_DIR] / "dist" / "admin" / "app.js", "text/javascript")


async def stylesheet(request: web.Request) -> web.StreamResponse:
    return _page_file(request.app[ADMIN_DIR] / "admin" / "admin.css", "text/css")


def add_routes(app: web.Application, gateway: Gateway, client_dir: Path | None = None) -> None:
    """The admin API and page. Call after the gateway's own start-up hook is registered: the
    heartbeat starts once the backend is up, and stops (the node leaves the list) on shutdown,
    before the backend closes."""
    app[ADMIN] = admin_view(gateway)
    app.router.add_get("/api/v1/parties", guarded(list_parties))
    app.router.add_get("/api/v1/parties/{party_id}", guarded(get_party))
    app.router.add_get("/api/v1/parties/{party_id}/events", guarded(get_events))
    app.router.add_delete(
        "/api/v1/parties/{party_id}/members/{character_id}/connections", guarded(disconnect)
    )
    app.router.add_get("/api/v1/nodes", guarded(list_nodes))
    root = client_dir or demo.find_client_dir()
    if root is not None:
        app[ADMIN_DIR] = root
        app.router.add_get("/admin", page)
        app.router.add_get("/admin/", demo.without_slash("/admin"))
        app.router.add_get("/admin/app.js", app_js)
        app.router.add_get("/admin/admin.css", stylesheet)
    else:

        async def missing(request: web.Request) -> web.Response:
            return web.Response(status=404, text="The admin page is not installed.\n")

        app.router.add_get("/admin", missing)

    async def start(app: web.Application) -> None:
        app[STARTED_AT] = time.time()
        app[_STOP] = asyncio.Event()
        app[_TASK] = asyncio.get_running_loop().create_task(_keep_alive(app), name="node heartbeat")

    async def stop(app: web.Application) -> None:
        task = app.get(_TASK)
        if task is None:
            return
        app[_STOP].set()
        await cancel_and_wait([task], what="the node heartbeat")
        # within what is left of shutdown_timeout (a stalled Redis must not hold the exit: tasks.
        # bounded, not asyncio.timeout): if it cannot be said, the node's entry expires by
        # itself (NODE_TTL_PERIODS heartbeats)
        with contextlib.suppress(Exception):
            await bounded(_last_words(app), gateway.shutdown_left(), what="the node's last beat")

    app.on_startup.append(start)
    app.on_shutdown.append(stop)


__all__ = ["CLOSE_DISCONNECTED", "add_routes", "handshake_refusal"]
