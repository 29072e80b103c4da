"""The demo page: ``GET /demo`` plays a party in the browser, on the client library in clients/js.

The page and its assets come from ``clients/js``: the sources in ``demo/`` and the build in
``dist/`` (the library as ES modules and the compiled page script), which ``make setup`` produces
with ``npm ci && npm run build``. An installed wheel carries a copy of them laid out the same way,
``party_sync/_web/`` (put there by the build hook, services/party_sync/hatch_build.py); a checkout
(an editable install) reads the repository's. Without that build ``/demo`` answers 503 and says
how to make it. The page reads its token from ``?token=``, from Telegram's ``initData``
(exchanged at ``POST /api/v1/auth/telegram``) or, in development mode only, from
``POST /api/v1/dev/token``, which this module adds only then: in production mode that path does
not exist (404), so a token can never be minted from a browser.

Routes: ``GET /demo`` (the page), ``/demo/config.json``, ``/demo/app.js``, ``/demo/lib/<module>.js``
(the library), ``/demo/assets/<file>`` (stylesheet), and in development mode
``POST /api/v1/dev/token``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from party_sync.auth import issue_token
from party_sync.problems import CONTINUE_WHEN_READ, InvalidDisplayName, InvalidRequest, read_json
from party_sync.protocol.ids import is_id
from party_sync.protocol.names import name_problem
from party_sync.protocol.types import PARTY_ACTOR
from party_sync.transport.appkeys import GATEWAY

log = logging.getLogger(__name__)

#: The party, run and characters of ``make run`` (``--demo-tokens``) and of the page's picker.
DEMO_PARTY: Final = "demo-party"
DEMO_RUN: Final = "demo-run"
DEMO_CHARACTERS: Final = (("aria", "Aria"), ("borin", "Borin"))
DEV_TOKEN_PATH: Final = "/api/v1/dev/token"  # noqa: S105 (a path, not a secret)
#: The fields of its body; any other is refused (422), naming it.
DEV_TOKEN_FIELDS: Final = frozenset({"party_id", "campaign_run_id", "character_id", "display_name"})
TELEGRAM_AUTH_PATH: Final = "/api/v1/auth/telegram"
#: Lifetime of a token minted by the page (development mode); the page fetches a new one on 4001.
DEV_TOKEN_TTL: Final = 12 * 3600.0
#: Largest body of ``POST /api/v1/dev/token`` ({party_id, campaign_run_id, character_id, name}).
DEV_TOKEN_MAX_BODY: Final = 4096

_LIB_MODULE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,63}\.js$")
_ASSET: Final = re.compile(r"^[a-z][a-z0-9_-]{0,63}\.(css|svg|png)$")
_IMPORTMAP: Final = re.compile(r'<script type="importmap">(.*?)</script>', re.DOTALL)
_TYPES: Final = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
_NOT_BUILT: Final = (
    "The demo page is not built. Run `make setup` (it runs `npm ci && npm run build` in "
    "clients/js), then reload.\n"
)

DEMO_DIR: Final = web.AppKey("demo_dir", Path)
DEMO_DEV_MODE: Final = web.AppKey("demo_dev_mode", bool)


#: The built pages inside an installed wheel (demo/ and dist/, as in clients/js).
PACKAGED_WEB_DIR: Final = Path(__file__).resolve().parents[1] / "_web"


def find_client_dir(start: Path | None = None, packaged: Path = PACKAGED_WEB_DIR) -> Path | None:
    """Where the pages are: the wheel's copy (``packaged``) when installed, else ``clients/js``
    of the checkout this package runs from (an editable install, or ``start``'s), if any."""
    if start is None and (packaged / "dist").is_dir():
        return packaged
    here = (start or Path(__file__)).resolve()
    for parent in here.parents:
        candidate = parent / "clients" / "js"
        if (candidate / "package.json").is_file():
            return candidate
    return None


def _csp(html: str) -> str:
    """The page's Content-Security-Policy: its own scripts, the import map by hash, Telegram's
    optional script; connections to this origin only; framed only by Telegram's web clients."""
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(m.encode()).digest()).decode() + "'"
        for m in _IMPORTMAP.findall(html)
    ]
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self' https://telegram.org " + " ".join(hashes),
            "style-src 'self'",
            "img-src 'self' data:",
            "connect-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'self' https://web.telegram.org",
        ]
    )


_SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    # The page's URL may carry a token: never send it anywhere as a referrer.
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _file(path: Path) -> web.StreamResponse:
    if not path.is_file():
        return web.Response(status=503, text=_NOT_BUILT, headers=_SECURITY_HEADERS)
    headers = dict(_SECURITY_HEADERS)
    content_type = _TYPES.get(path.suffix)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return web.FileResponse(path, headers=headers)


async def page(request: web.Request) -> web.StreamResponse:
    root = request.app[DEMO_DIR]
    index = root / "demo" / "index.html"
    if not (root / "dist" / "demo" / "app.js").is_file() or not index.is_file():
        return web.Response(status=503, text=_NOT_BUILT, headers=_SECURITY_HEADERS)
    html = index.read_text(encoding="utf-8")
    headers = {**_SECURITY_HEADERS, "Content-Security-Policy": _csp(html)}
    return web.Response(text=html, content_type="text/html", headers=headers)


def without_slash(path: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A handler for ``<path>/``: 308 to ``path``, the query kept (a typed trailing slash)."""

    async def redirect(request: web.Request) -> web.StreamResponse:
        query = request.query_string
        raise web.HTTPPermanentRedirect(path + (f"?{query}" if query else ""))

    return redirect


async def config_json(request: web.Request) -> web.Response:
    body = {
        "dev_mode": request.app[DEMO_DEV_MODE],
        "ws_path": "/ws",
        "party_id": DEMO_PARTY,
        "campaign_run_id": DEMO_RUN,
        "characters": [{"character_id": c, "display_name": n} for c, n in DEMO_CHARACTERS],
        "telegram_auth_path": TELEGRAM_AUTH_PATH,
        "dev_token_path": DEV_TOKEN_PATH,
    }
    return web.json_response(body, headers=_SECURITY_HEADERS)


async def app_js(request: web.Request) -> web.StreamResponse:
    return _file(request.app[DEMO_DIR] / "dist" / "demo" / "app.js")


async def lib_module(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if not _LIB_MODULE.match(name):
        raise web.HTTPNotFound()
    path = request.app[DEMO_DIR] / "dist" / name
    if not path.is_file() and (request.app[DEMO_DIR] / "dist" / "index.js").is_file():
        raise web.HTTPNotFound()
    return _file(path)


async def asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = request.app[DEMO_DIR] / "demo" / name
    if not _ASSET.match(name) or not path.is_file():
        raise web.HTTPNotFound()
    return _file(path)


async def dev_token(request: web.Request) -> web.Response:
    """Development mode only: a connection token for any character of any party."""
    secret = request.app[GATEWAY].settings.jwt_secret
    if not secret:
        raise web.HTTPNotFound()
    body: Any = await read_json(request, DEV_TOKEN_MAX_BODY)  # whole body, bounded, depth-checked
    if not isinstance(body, dict):
        raise InvalidRequest("body must be an object")
    unknown = sorted(str(key)[:64] for key in set(body) - DEV_TOKEN_FIELDS)
    if unknown:  # (a typo, "party" for party_id, minted a token for the demo party: new user)
        raise InvalidRequest(
            f"unknown fields {unknown[:8]}: the body holds {sorted(DEV_TOKEN_FIELDS)}"
        )
    ids = {
        "party_id": body.get("party_id", DEMO_PARTY),
        "campaign_run_id": body.get("campaign_run_id", DEMO_RUN),
        "character_id": body.get("character_id"),
    }
    for name, value in ids.items():
        if not is_id(value):
            raise InvalidRequest(f"{name} must be an id ([A-Za-z0-9._:-]{{1,64}})")
    if ids["character_id"] == PARTY_ACTOR:
        raise InvalidRequest(f"character_id {PARTY_ACTOR!r} is reserved")
    known = dict(DEMO_CHARACTERS)
    name = body.get("display_name") or known.get(ids["character_id"]) or ids["character_id"]
    problem = name_problem(name)
    if problem is not None:
        raise InvalidDisplayName(problem)
    token = issue_token(
        secret,
        party_id=ids["party_id"],
        campaign_run_id=ids["campaign_run_id"],
        character_id=ids["character_id"],
        display_name=name,
        now=request.app[GATEWAY].clock(),  # the clock tokens are checked by (Redis's)
        ttl=DEV_TOKEN_TTL,
    )
    log.info(
        "development token minted",
        extra={"party_id": ids["party_id"], "character_id": ids["character_id"]},
    )
    return web.json_response(
        {**ids, "display_name": name, "token": token, "expires_in": int(DEV_TOKEN_TTL)},
        headers={"Cache-Control": "no-store"},
    )


def add_routes(app: web.Application, *, dev_mode: bool, client_dir: Path | None = None) -> None:
    """The demo page's routes; ``POST /api/v1/dev/token`` only when ``dev_mode``."""
    root = client_dir or find_client_dir()
    app[DEMO_DEV_MODE] = dev_mode
    if root is None:

        async def missing(request: web.Request) -> web.Response:
            text = (
                "The demo page is not installed: build the wheel with `make dist` (it puts the "
                "built page inside), or run from a checkout after `make setup`.\n"
            )
            return web.Response(status=404, text=text)

        app.router.add_get("/demo", missing)
    else:
        app[DEMO_DIR] = root
        app.router.add_get("/demo", page)
        app.router.add_get("/demo/", without_slash("/demo"))
        app.router.add_get("/demo/config.json", config_json)
        app.router.add_get("/demo/app.js", app_js)
        app.router.add_get("/demo/lib/{name}", lib_module)
        app.router.add_get("/demo/assets/{name}", asset)
    if dev_mode:
        app.router.add_post(DEV_TOKEN_PATH, dev_token, expect_handler=CONTINUE_WHEN_READ)
