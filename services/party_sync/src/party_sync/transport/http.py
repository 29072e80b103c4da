"""The aiohttp application: ``/ws``, ``/healthz``, ``/readyz``, ``/metrics``, and the routes of
the other transport modules; what any handler raises is answered by the edge middleware
(``transport/edge.py``, by the table of ``problems``)."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Final, NamedTuple
from urllib.parse import parse_qsl

from aiohttp import WebSocketError, WSMsgType, web
from aiohttp.abc import AbstractAccessLogger

from party_sync import problems
from party_sync.auth import Claims, TokenVerifier
from party_sync.backends.directory import Directory, MemoryDirectory
from party_sync.core.history import ResumePoint
from party_sync.core.limits import ConnectionLimits
from party_sync.engine.health import EngineHealth, Periodic
from party_sync.gateway import Gateway, Session
from party_sync.metrics import EXPOSITION_TYPE
from party_sync.protocol.errors import AuthError, BackendUnavailable, CloseCode
from party_sync.transport import admin, api, asyncapi, demo, members, openapi, telegram
from party_sync.transport.appkeys import BATCHER, GATEWAY, VERIFIER
from party_sync.transport.edge import Edge, edge_middleware, session_handler
from party_sync.transport.guard import ConnectionGuard, guarded_connection
from party_sync.transport.sink import (
    CLOSE_PATIENCE,
    CLOSE_TIMEOUT,
    DroppingWebSocketResponse,
    FrameBatcher,
    WebSocketSink,
    meter_reading,
)

if TYPE_CHECKING:  # (aiohttp's request headers; multidict comes with aiohttp)
    from multidict import CIMultiDictProxy

#: ``party_sync_closes_total``'s code for a connection its heartbeat dropped (no pong in time: a
#: peer gone, or one that reads nothing): RFC 6455's 1006, no close frame (it would not be read).
HEARTBEAT_CLOSE = str(CloseCode.ABNORMAL_CLOSURE)

log = logging.getLogger(__name__)


class RedactingAccessLogger(AbstractAccessLogger):
    """Access log without query strings: tokens passed as ``?token=`` never reach the logs."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s",
            request.method,
            request.path,
            response.status,
            extra={"duration_ms": round(time * 1000, 2), "status": response.status},
        )


def _query(request: web.BaseRequest) -> dict[str, str]:
    """The handshake's query parameters (the first value of each name), parsed here rather than
    through ``request.query``: yarl keeps that parse on the request's URL for as long as the
    request lasts, which for a WebSocket is the socket's whole life (about 0.5 KiB per open
    connection, bench/analysis.md section 19). The same decoding (percent escapes, ``+``)."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True):
        params.setdefault(name, value)
    return params


def _token(request: web.Request, query: dict[str, str]) -> str:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return query.get("token", "")


def _resume_point(query: dict[str, str]) -> ResumePoint | None:
    epoch = query.get("epoch")
    last_seq = query.get("last_seq")
    if (
        not epoch
        or last_seq is None
        or not (last_seq.isascii() and last_seq.isdigit())  # "١" is a digit too, to str
        or len(last_seq) > 18
    ):
        return None
    return ResumePoint(epoch, int(last_seq))


def bearer_challenge(reason: str | None) -> str:
    """RFC 6750 §3: the 401's ``WWW-Authenticate``. No token: the bare challenge; a refused one:
    ``invalid_token`` with the reason the body gives (a WebSocket client cannot read the body of
    a failed handshake, but its library usually keeps the headers)."""
    if reason is None:
        return 'Bearer realm="party_sync"'
    quoted = reason.encode("ascii", "replace").decode().replace("\\", "\\\\").replace('"', '\\"')
    return f'Bearer realm="party_sync", error="invalid_token", error_description="{quoted}"'


#: The refused origins already logged (a browser cannot read a refused handshake's status, so
#: the server's log is where a wrong ``allowed_origins`` shows): each once, at most this many.
_ORIGINS_TOLD: set[str] = set()
MAX_ORIGINS_TOLD = 64


def _tell_refused_origin(origin: str, headers: int = 1) -> None:
    """Log a refused ``Origin`` the first time it is seen (WARNING: a page is being kept out,
    most often the operator's own, e.g. ``http://localhost:8080`` where ``http://127.0.0.1:8080``
    is listed). Later refusals of it, and origins past ``MAX_ORIGINS_TOLD``, only count.
    ``headers``: how many ``Origin`` headers the handshake had (more than one is refused
    whatever they say, and said so: docs probe, a refused origin "" with no reason)."""
    if headers > 1:
        origin = "(several Origin headers)"
    if origin in _ORIGINS_TOLD or len(_ORIGINS_TOLD) >= MAX_ORIGINS_TOLD:
        return
    _ORIGINS_TOLD.add(origin)
    reason = "several Origin headers" if headers > 1 else "origin not in allowed_origins"
    log.warning(
        f"WebSocket handshake refused: {reason} (logged once per origin); "
        "a browser cannot tell the page why, so it keeps reconnecting",
        extra={"origin": origin[:200], "status": 403},
    )


class _Admitted(NamedTuple):
    claims: Claims
    #: False when the backend could not say whether an operator blocked the character: the
    #: connection is then upgraded and closed with 1011 (retry), as when opening it fails.
    checked: bool


async def _admit(
    request: web.Request, gateway: Gateway, query: dict[str, str]
) -> _Admitted | web.StreamResponse:
    """The handshake's checks: the origin (403), the token (401), an operator's block (403)."""
    settings = gateway.settings
    origins = request.headers.getall("Origin", ())
    origin = origins[0] if len(origins) == 1 else None if not origins else ""  # two: no origin
    if settings.allowed_origins and origin is not None and origin not in settings.allowed_origins:
        gateway.metrics.handshakes_refused.labels("403").inc()
        _tell_refused_origin(origin, len(origins))
        raise web.HTTPForbidden(text="origin not allowed")
    try:
        claims = request.app[VERIFIER].verify(_token(request, query))
    except AuthError as exc:
        gateway.metrics.handshakes_refused.labels(str(exc.status)).inc()
        log.info("handshake refused", extra={"reason": exc.reason, "status": exc.status})
        if exc.status == 503:  # not judged yet (auth.CLOCK_UNKNOWN): a client tries again
            raise web.HTTPServiceUnavailable(
                text=exc.reason, headers={"Retry-After": "1"}
            ) from None
        challenge = bearer_challenge(exc.reason if _token(request, query) else None)
        raise web.HTTPUnauthorized(
            text=exc.reason, headers={"WWW-Authenticate": challenge}
        ) from None
    try:
        refusal = await admin.handshake_refusal(request, claims)
    except BackendUnavailable:
        return _Admitted(claims, checked=False)
    return _Admitted(claims, checked=True) if refusal is None else refusal


class _Opened(NamedTuple):
    """What a handshake that opened a session hands to the session's loop."""

    ws: web.WebSocketResponse
    sink: WebSocketSink
    session: Session
    slot: Hashable


#: What a WebSocket upgrade that is not a valid RFC 6455 handshake is told (never its headers).
NOT_VERSION_13: Final = "unsupported WebSocket version: this server speaks version 13 (RFC 6455)"
NO_CONNECTION_UPGRADE: Final = (
    "not a WebSocket handshake: the Connection header must name Upgrade (RFC 6455 §4.2.1)"
)
BAD_KEY: Final = (
    "not a WebSocket handshake: Sec-WebSocket-Key must be sent once, the base64 of 16 bytes "
    "(RFC 6455 §4.2.1)"
)


def _is_key(value: str) -> bool:
    """aiohttp's own test of a key (``base64.b64decode``, 16 bytes), which would otherwise
    refuse it after the token was read."""
    try:
        return len(base64.b64decode(value)) == 16
    except ValueError:  # not base64, or not ASCII (binascii.Error is a ValueError)
        return False


def handshake_refusal(headers: CIMultiDictProxy[str]) -> tuple[int, str] | None:
    """Pure: the status and text a WebSocket upgrade is refused with before its token is read,
    or None (a plain GET, or a valid RFC 6455 handshake).

    RFC 6455 §4.2.2: an upgrade asking for a version other than 13 is answered 426 with the
    version spoken here (aiohttp alone would upgrade drafts 7 and 8 as if 13); one that names
    none, or names it twice with another (``13`` then ``8`` was upgraded, ``8`` then ``13``
    refused: aiohttp reads the first), too, and one that sends the header more than once, even
    twice 13 (§11.3.5: not more than once in a request). An upgrade whose ``Connection`` does not
    name ``Upgrade``, or without one valid ``Sec-WebSocket-Key`` (§4.2.1, §11.3.1) is 400 here
    too (security probe: it was aiohttp's 400 after the token was checked, so a client without a
    token was told 401 instead, and its text repeated the client's key)."""
    if "websocket" not in headers.get("Upgrade", "").lower():
        return None  # a plain GET: aiohttp's own 400 says what is missing
    versions = headers.getall("Sec-WebSocket-Version", ())
    if len(versions) != 1 or versions[0].strip() != "13":
        return 426, NOT_VERSION_13
    connection = ",".join(headers.getall("Connection", ())).lower().split(",")
    if "upgrade" not in (token.strip() for token in connection):
        return 400, NO_CONNECTION_UPGRADE
    keys = headers.getall("Sec-WebSocket-Key", ())
    if len(keys) != 1 or not _is_key(keys[0]):
        return 400, BAD_KEY
    return None


async def _handshake(request: web.Request) -> _Opened | web.StreamResponse:
    """Check the version, admit, take the user's slot, upgrade, open the session (run under
    the edge)."""
    gateway = request.app[GATEWAY]
    refusal = handshake_refusal(request.headers)
    if refusal is not None:
        status, text = refusal
        gateway.metrics.handshakes_refused.labels(str(status)).inc()
        spoken = {"Sec-WebSocket-Version": "13"} if status == 426 else None
        return web.Response(status=status, text=text, headers=spoken)
    query = _query(request)
    admission = await _admit(request, gateway, query)
    if not isinstance(admission, _Admitted):
        return admission
    admitted = admission.claims
    peer = request.transport
    if peer is None or peer.is_closing():
        # the client left while the checks ran (a Redis stall held them): nothing to open, and
        # registering it now would announce a player who is not there
        return web.Response(status=499, text="client closed the request")
    guard = request.app[GUARD]
    slot = guard.take_websocket_slot(admitted)  # over max_connections_per_user: 429
    try:
        settings = gateway.settings
        ws = DroppingWebSocketResponse(  # a heartbeat without pong: dropped with a reset
            heartbeat=settings.heartbeat,
            max_msg_size=settings.max_message_bytes * 4,  # 1×–4×: system.error, kept open
            compress=False,  # no permessage-deflate: no decompression bombs, less CPU per frame
            autoping=False,  # the client's pings and pongs count against its message rate
            decode_text=False,
            # the close handshake's wait for the peer's close frame: bounded by the sink, which
            # aborts a close that makes no progress for CLOSE_TIMEOUT (or past CLOSE_PATIENCE)
            timeout=CLOSE_PATIENCE + CLOSE_TIMEOUT,
        )
        try:
            await ws.prepare(request)
        except web.HTTPException as exc:  # not a WebSocket handshake (no key, say): aiohttp's
            gateway.metrics.handshakes_refused.labels(str(exc.status)).inc()
            raise
        transport = request.transport
        if transport is None:  # the client went away during the handshake
            guard.release_websocket_slot(slot)
            return ws
        # every byte the client sends from its upgrade on is counted before aiohttp parses it
        # (its control and continuation frames never reach the receive loop)
        limits = gateway.connection_limits()
        meter = ReadMeter(gateway, limits)
        meter_reading(request, meter.admit)
        sink = WebSocketSink(
            ws,
            transport,
            settings.send_buffer_bytes,
            request.app[BATCHER],
            guard,
            slot,
            close_by=lambda: gateway.shutdown_deadline,
        )
        session = await gateway.open(
            admitted, sink, _resume_point(query), available=admission.checked, limits=limits
        )
        meter.bind(session)
    except BaseException:
        guard.release_websocket_slot(slot)
        raise
    if not session.closed:  # opened (a 1011 in an outage costs no handshake token)
        guard.opened(slot)  # one of the user's handshakes (handshake_rate_per_user)
    return _Opened(ws, sink, session, slot)


class ReadMeter:
    """The bytes a WebSocket's client sends, from its upgrade on: on the connection's own limits
    while its session opens (a handshake can wait seconds for Redis), then through the gateway,
    which closes a connection past its byte rate (1008)."""

    __slots__ = ("_gateway", "_limits", "_refused", "_session")

    def __init__(self, gateway: Gateway, limits: ConnectionLimits) -> None:
        self._gateway = gateway
        self._limits = limits
        self._session: Session | None = None
        self._refused = False

    def admit(self, size: int) -> bool:
        """Whether to parse ``size`` more bytes; once not, never again (the connection closes:
        before its session opened, as soon as it is, ``bind``)."""
        if self._refused:
            return False
        if self._session is not None:
            admitted = self._gateway.received_bytes(self._session, size)
        else:
            admitted = self._limits.admit_bytes(size, self._gateway.clock())
        self._refused = not admitted
        return admitted

    def bind(self, session: Session) -> None:
        self._session = session
        if self._refused:  # refused before its session opened
            self._gateway.flooded(session)


@session_handler
async def websocket(request: web.Request) -> web.StreamResponse:
    """``GET /ws``: the handshake under the edge (``_handshake``), then the session's receive
    loop until the socket closes.

    One frame for the whole life of the socket: the edge middleware calls this handler straight
    through (``session_handler``), the handshake's frames have returned by the time the session
    runs, the connection guard has stepped aside (``hand_over``), and the user's slot and the
    address count are given back without a context manager. Every frame or object that stays
    while a WebSocket is open is memory per connection."""
    opened = await request.app[EDGE].around(request, _handshake)
    if not isinstance(opened, _Opened):
        return opened
    ws, sink, session, slot = opened
    del opened
    connection = guarded_connection(request)
    address = connection.hand_over() if connection is not None else None
    del connection
    gateway, guard = request.app[GATEWAY], request.app[GUARD]
    sink.reading = True  # a close decided from now on is started when this loop ends
    try:
        # A close decided while it opened (an outage's 1011) is under way already: a read now
        # would cut its handshake short (aiohttp's close, finding a receive() waiting, wakes it
        # and closes the socket at once: a client that then sent its close frame met a reset,
        # 1006; churn probe). Not read: stop() lets that close read the client's frame.
        if sink.close_code is None:
            async for msg in ws:
                if session.closed:  # (a close wakes receive() with sink.STOP_READING)
                    break
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):  # binary: refused (bad_json)
                    sink.handling = True  # a close decided meanwhile waits for stop() (sink.close)
                    try:
                        await gateway.receive(session, msg.data, msg.type is WSMsgType.BINARY)
                    finally:
                        sink.handling = False
                    if sink.closing:  # it closed the connection (or the peer went): stop() closes
                        break
                elif msg.type in (WSMsgType.PING, WSMsgType.PONG):
                    # answered here, not by aiohttp (autoping): counted as messages, so that a
                    # flood of them is refused and closed like any flood (security probe)
                    if gateway.control_frame(session) and msg.type is WSMsgType.PING:
                        await ws.pong(msg.data)
                    if sink.closing:
                        break
                elif msg.type is WSMsgType.ERROR:
                    if isinstance(msg.data, WebSocketError):  # aiohttp closed it: a frame over
                        gateway.metrics.closes.labels(str(msg.data.code)).inc()  # the limit (1009)
                    elif isinstance(msg.data, TimeoutError):  # its heartbeat: no pong in time,
                        gateway.metrics.closes.labels(HEARTBEAT_CLOSE).inc()  # dropped (no frame)
                    break
    except ConnectionError:
        pass  # lost while a ping was answered (the pong's drain): the peer is gone
    finally:
        sink.reading_stopped()  # a close decided while a message was handled: its frame now
        try:
            try:
                await gateway.connection_lost(session)
            finally:
                await sink.stop()
        finally:
            guard.release_websocket_slot(slot)
            # (a 1008 was penalized by the sink, before its close frame left)
            if sink.close_code == CloseCode.SLOW_CONSUMER:  # the session's own (the core
                gateway.metrics.closes.labels(str(CloseCode.SLOW_CONSUMER)).inc()  # counts its)
            if address is not None:
                guard.release_address(address)
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


#: What ``/readyz`` reports about the engine link (set by ``server.build_server``; without it the
#: engine part says only that nothing watches it).
ENGINE_HEALTH: web.AppKey[Callable[[], EngineHealth]] = web.AppKey("engine_health")


def readiness(
    backend: str, backend_ok: bool, draining: bool, engine: EngineHealth
) -> tuple[int, dict[str, Any]]:
    """``/readyz``'s status code and body. 503 only when this node cannot serve (its backend is
    unusable, or it is draining); a degraded engine link is 200 with ``status: degraded``, since
    connections, presence and votes still work and the node must stay in its load balancer."""
    if not backend_ok or draining:
        status = "unavailable"
    elif not engine.ok:
        status = "degraded"
    else:
        status = "ready"
    body = {
        "status": status,
        "draining": draining,
        "backend": {"name": backend, "ok": backend_ok},
        "engine": engine.as_json(),
    }
    return (503 if status == "unavailable" else 200), body


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    source = request.app.get(ENGINE_HEALTH)
    engine = source() if source is not None else EngineHealth("unknown", True, "not watched")
    status, body = readiness(
        gateway.backend.name, await gateway.backend.ready(), gateway.stopping, engine
    )
    return web.json_response(body, status=status)


async def metrics(request: web.Request) -> web.Response:
    source = request.app.get(ENGINE_HEALTH)
    if source is not None:
        source()  # (a gauge it keeps, engine_link_ok, brought up to date as /readyz sees it)
    body = request.app[GATEWAY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": EXPOSITION_TYPE})


#: The connection limits of this server (``server.start_serving`` wraps every socket with it).
GUARD: web.AppKey[ConnectionGuard] = web.AppKey("connection_guard")

#: The server's one middleware, which ``/ws`` runs its handshake through (``transport/edge.py``).
EDGE: web.AppKey[Edge] = web.AppKey("edge")


def connection_guard(gateway: Gateway) -> ConnectionGuard:
    settings, counters = gateway.settings, gateway.metrics

    def refused(reason: str) -> None:
        counters.connections_refused.labels(reason).inc()
        if reason in ("per_user", "policy_cooldown", "handshake_rate"):
            counters.handshakes_refused.labels("429").inc()

    return ConnectionGuard(
        head_timeout=settings.request_head_timeout,
        max_per_address=settings.max_connections_per_ip,
        max_per_user=settings.max_connections_per_user,
        handshake_rate=settings.handshake_rate_per_user,
        handshake_burst=settings.handshake_burst_per_user,
        on_refused=refused,
    )


#: Seconds between two looks at every connection's write buffer (``ReaderWatch``).
READER_WATCH_EVERY = 5.0
#: The least patience with a peer that takes nothing (seconds; else the heartbeat's period).
READER_PATIENCE_MIN = 10.0


class _Watch:
    """A look every ``every`` seconds (``_look``), from start to stop (``Periodic``)."""

    def __init__(self, every: float) -> None:
        self._periodic = Periodic(self._look, every)

    async def _look(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()


class ReaderWatch(_Watch):
    """Every ``READER_WATCH_EVERY`` seconds: each open WebSocket whose peer has taken nothing of
    what it is written for ``patience`` seconds (``WebSocketSink.not_reading``) is closed with
    4002, like a slow consumer, and its socket aborted if the close frame is not taken either.
    A peer that flooded pings and never read held its socket, its slot and megabytes of kernel
    buffers for ever: aiohttp's heartbeat was stuck behind the pongs' drain."""

    def __init__(self, gateway: Gateway, patience: float) -> None:
        super().__init__(READER_WATCH_EVERY)
        self.gateway = gateway
        self.patience = patience

    async def _look(self) -> None:
        try:
            now = time.monotonic()
            for session in self.gateway.sessions:
                sink = session.sink
                if isinstance(sink, WebSocketSink) and sink.not_reading(now, self.patience):
                    log.info(
                        "closing a connection whose client took nothing for %.0f s",
                        self.patience,
                        extra={"connection_id": session.id},
                    )
                    if sink.closing:  # a close began (ours, or aiohttp's heartbeat): it waits
                        sink.abort()  # for a drain that never comes
                    else:
                        session.close(CloseCode.SLOW_CONSUMER, "not reading: reconnect and resume")
        except Exception:  # never die: the next look tries again
            self.gateway.metrics.background_errors.labels("reader_watch").inc()
            log.exception("looking for connections that do not read failed")


#: Seconds between two looks at the backend for ``party_sync_backend_ok`` (``BackendWatch``).
BACKEND_WATCH_EVERY = 5.0


class BackendWatch(_Watch):
    """Every ``BACKEND_WATCH_EVERY`` seconds: ``party_sync_backend_ok`` set from the backend's
    readiness (what ``/readyz`` asks), so a dashboard sees an outage from ``/metrics`` alone;
    a stall reads as 0 within a look plus the backend's connect timeout."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__(BACKEND_WATCH_EVERY)
        self.gateway = gateway

    async def _look(self) -> None:
        try:
            ok = await self.gateway.backend.ready()
        except Exception:  # ready() says False for a Redis error; anything else is a bug
            self.gateway.metrics.background_errors.labels("backend_watch").inc()
            log.exception("looking at the backend failed")
            ok = False
        self.gateway.metrics.backend_ok.set(1 if ok else 0)


async def _never_sniffed(request: web.Request, response: web.StreamResponse) -> None:
    """nosniff on every answer of the app (the API's JSON and problems, the probes, /metrics,
    aiohttp's own 404 and 405), as the demo and /admin pages had it (``problems.never_sniffed``)."""
    problems.never_sniffed(response)


def build_app(
    gateway: Gateway,
    verifier: TokenVerifier,
    directory: Directory | None = None,
    *,
    dev_mode: bool = False,
) -> web.Application:
    app = web.Application()
    app[GATEWAY] = gateway
    app[VERIFIER] = verifier
    # one flush per loop tick (or per client_write_delay) for all connections
    app[BATCHER] = FrameBatcher(gateway.settings.client_write_delay)
    app[GUARD] = connection_guard(gateway)
    # Head deadlines, answers to what handlers raise, requests by route and status: one frame.
    app[EDGE] = edge_middleware(gateway.metrics.count_request)
    app.middlewares.append(app[EDGE])
    app.on_response_prepare.append(_never_sniffed)
    app[problems.BODY_TIMEOUT] = gateway.settings.request_body_timeout
    problems.answer_bodies_at_shutdown(app)  # a body still arriving at SIGTERM: 503 at once
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    api.add_routes(app, gateway.settings.api_key)
    demo.add_routes(app, dev_mode=dev_mode)
    members.add_routes(app, directory or MemoryDirectory())  # who may sign in as what
    telegram.add_routes(app)  # POST /api/v1/auth/telegram
    spec = openapi.document(gateway.contracts, dev_mode=dev_mode)

    async def openapi_json(request: web.Request) -> web.Response:
        return web.json_response(spec)

    app.router.add_get("/openapi.json", openapi_json)
    asyncapi.add_routes(app, gateway.contracts)  # GET /asyncapi.json: the /ws protocol

    watch = ReaderWatch(gateway, patience=max(gateway.settings.heartbeat, READER_PATIENCE_MIN))
    backend_watch = BackendWatch(gateway)

    async def on_startup(app: web.Application) -> None:
        await gateway.start()
        watch.start()
        backend_watch.start()

    async def on_shutdown(app: web.Application) -> None:
        await watch.stop()
        await backend_watch.stop()
        await gateway.drain()

    async def on_cleanup(app: web.Application) -> None:
        await gateway.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    admin.add_routes(app, gateway)  # after the gateway's hooks: its heartbeat needs the backend
    return app
