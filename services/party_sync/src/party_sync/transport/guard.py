"""What an anonymous client may hold: a deadline for the request head, and caps on open
connections per client address and open WebSockets per user; and how fast a user may open them.

aiohttp has no request-head timeout (its old ``slow_request_timeout`` is gone) and its idle
``keepalive_timeout`` only bounds the time *between* requests. So every accepted socket gets a
``GuardedConnection``: an ``asyncio.Protocol`` that sits between the event loop's transport and
aiohttp's own protocol (``web.Server`` is a documented protocol factory, so it is wrapped, never
patched). The wrapper

- counts the connection under its peer address and, over ``max_connections_per_ip``, closes it
  at once: accepted then closed, no byte parsed, no aiohttp object made;
- arms a head deadline when the connection opens, and again at the first byte that follows a
  finished request on a keep-alive connection; the server's edge middleware
  (``transport/edge.py``: the first place where aiohttp says "a complete head arrived") disarms
  it through ``request.transport.get_protocol()``. A deadline that passes closes the socket:
  nothing sent, half a request line, half the headers, one header every few seconds all end the
  same way.

An upgraded WebSocket is one request that lasts as long as the socket, so neither deadline can
reach it; its liveness is the heartbeat's job. Once it is upgraded the wrapper steps aside:
``hand_over`` gives the transport straight to aiohttp's protocol (asyncio's ``set_protocol``),
so an open WebSocket costs no wrapper and no extra call per read, and the session's handler
keeps the address counted until it ends (``ConnectionGuard.release_address``). Nothing here reads
aiohttp internals: only the asyncio protocol contract, ``AppRunner.server`` and middlewares.

The address is the socket's peer address (an IPv4 address, or the /64 of an IPv6 one, since one
IPv6 host usually owns a whole /64). Behind a reverse proxy every client has the proxy's address:
there, set ``max_connections_per_ip`` to 0 and limit per client at the proxy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import time
from collections.abc import Callable, Hashable
from typing import Any, Final, cast

from aiohttp import web

from party_sync.auth import Claims
from party_sync.core.limits import KeyedBuckets

#: Body of the 429 that refuses a WebSocket handshake over a cap (stable: clients match on it).
TOO_MANY_CONNECTIONS: Final = json.dumps({"error": "too_many_connections"})
#: Body of the 429 (with ``Retry-After``) that refuses a user's handshakes for ``POLICY_COOLDOWN``
#: seconds after one of its connections was closed for flooding or bad input (1008).
POLICY_COOLDOWN_BODY: Final = json.dumps({"error": "policy_cooldown"})
POLICY_COOLDOWN: Final = 10.0
#: Body of the 429 (with ``Retry-After``) that refuses a user's handshake past its rate
#: (``handshake_rate_per_user``, ``handshake_burst_per_user``).
TOO_MANY_HANDSHAKES: Final = json.dumps({"error": "too_many_handshakes"})


class Tally:
    """Open things per key, at most ``cap`` each (0 = unlimited). Keys with nothing open are
    forgotten, so the table only holds what is open now."""

    __slots__ = ("_open", "cap")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: dict[Hashable, int] = {}

    def acquire(self, key: Hashable) -> bool:
        """Count one more under ``key``; False (and nothing counted) when it is at the cap."""
        held = self._open.get(key, 0)
        if self.cap and held >= self.cap:
            return False
        self._open[key] = held + 1
        return True

    def release(self, key: Hashable) -> None:
        held = self._open.get(key, 0)
        if held <= 1:
            self._open.pop(key, None)
        else:
            self._open[key] = held - 1

    def count(self, key: Hashable) -> int:
        return self._open.get(key, 0)

    @property
    def total(self) -> int:
        return sum(self._open.values())

    def __len__(self) -> int:
        """How many keys hold something (0 once everything has closed)."""
        return len(self._open)


def address_key(peername: Any) -> str:
    """The client address a connection counts under: the IP of ``peername``, an IPv4-mapped IPv6
    address as its IPv4 address, any other IPv6 address as its /64."""
    host = peername[0] if isinstance(peername, tuple) and peername else peername
    try:
        ip = ipaddress.ip_address(str(host))
    except ValueError:
        return str(host or "unknown")  # a Unix socket (""), or something unexpected
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def user_key(claims: Claims) -> tuple[str, ...]:
    """Who a WebSocket counts under: the token's subject, else its character."""
    if claims.sub:
        return ("sub", claims.sub)
    return ("character", claims.party_id, claims.campaign_run_id, claims.character_id)


class ConnectionGuard:
    """The per-server state: settings, the per-address tally, and what to count when a
    connection is turned away (``on_refused(reason)``: ``per_address`` or ``head_timeout``)."""

    def __init__(
        self,
        *,
        head_timeout: float,
        max_per_address: int,
        max_per_user: int,
        handshake_rate: float = 0.0,
        handshake_burst: float = 1.0,
        on_refused: Callable[[str], None] = lambda reason: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.head_timeout = head_timeout
        self.addresses = Tally(max_per_address)
        self.users = Tally(max_per_user)
        #: the sessions each user opened lately (None: no handshake rate)
        self.handshakes = KeyedBuckets(handshake_rate, handshake_burst) if handshake_rate else None
        self.on_refused = on_refused
        self._clock = clock
        #: user key → until when its handshakes are refused (``penalize``); expired ones pruned.
        self._cooldowns: dict[Hashable, float] = {}

    def factory(self, make: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that wraps ``make`` (aiohttp's
        ``runner.server``) in a ``GuardedConnection`` per accepted socket."""

        def build() -> asyncio.Protocol:
            return GuardedConnection(self, make)

        return build

    def take_websocket_slot(self, claims: Claims) -> Hashable:
        """One of the user's WebSocket slots, to be given back with ``release_websocket_slot``
        (in a ``finally``); over the cap, a 429 instead. Not a context manager: a WebSocket's
        handler holds its slot as long as the socket is open, and a suspended generator frame
        per open connection is memory for nothing."""
        key = user_key(claims)
        self._refuse_for("policy_cooldown", POLICY_COOLDOWN_BODY, self.cooldown(key))
        handshakes = self.handshakes
        if handshakes is not None:
            wait = handshakes.wait(key, self._clock())
            self._refuse_for("handshake_rate", TOO_MANY_HANDSHAKES, wait)
        if not self.users.acquire(key):
            self.on_refused("per_user")
            raise web.HTTPTooManyRequests(
                text=TOO_MANY_CONNECTIONS, content_type="application/json"
            )
        return key

    def _refuse_for(self, reason: str, body: str, wait: float) -> None:
        """HTTP 429 with ``body`` and ``Retry-After`` when the user must wait ``wait`` s (> 0)."""
        if wait > 0:
            self.on_refused(reason)
            raise web.HTTPTooManyRequests(
                text=body,
                content_type="application/json",
                headers={"Retry-After": str(math.ceil(wait))},
            )

    def opened(self, key: Hashable) -> None:
        """The user of slot ``key`` opened a session: one of its handshake tokens is spent."""
        if self.handshakes is not None:
            self.handshakes.spend(key, self._clock())

    def release_websocket_slot(self, key: Hashable) -> None:
        self.users.release(key)

    def penalize(self, key: Hashable) -> None:
        """One of the user's connections was closed for flooding or bad input (1008): refuse its
        handshakes on this node for ``POLICY_COOLDOWN`` seconds. A client that reconnects at
        once after each such close would otherwise buy a fresh allowance of bad messages with
        every handshake (the browser and Python clients stop on 1008)."""
        now = self._clock()
        if len(self._cooldowns) >= 1024:  # the expired ones go before the table grows
            self._cooldowns = {k: t for k, t in self._cooldowns.items() if t > now}
        self._cooldowns[key] = now + POLICY_COOLDOWN

    def cooldown(self, key: Hashable) -> float:
        """Seconds the user's handshakes are still refused for (0: none)."""
        until = self._cooldowns.get(key)
        if until is None:
            return 0.0
        wait = until - self._clock()
        if wait <= 0:
            del self._cooldowns[key]
            return 0.0
        return wait

    def release_address(self, address: str) -> None:
        """Give back the address a ``GuardedConnection.hand_over`` left counted."""
        self.addresses.release(address)


class GuardedConnection(asyncio.Protocol):
    """One accepted socket: counted under its address, closed if a request head is late, and
    otherwise a transparent pass-through to aiohttp's protocol."""

    __slots__ = ("_address", "_busy", "_deadline", "_guard", "_inner", "_make", "_transport")

    def __init__(self, guard: ConnectionGuard, make: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._make = make
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._address: str | None = None  # set while counted in guard.addresses
        self._deadline: asyncio.TimerHandle | None = None
        self._busy = False  # a request's handler is running (an upgraded WebSocket: for good)

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport: no isinstance check).
        transport = cast(asyncio.Transport, transport)
        address = address_key(transport.get_extra_info("peername"))
        if not self._guard.addresses.acquire(address):
            self._guard.on_refused("per_address")
            transport.close()  # accepted then closed: nothing parsed, nothing allocated
            return
        self._address = address
        self._transport = transport
        self._arm()
        self._inner = self._make()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if not self._busy and self._deadline is None:
            self._arm()  # the first byte of the next request on a keep-alive connection
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._address is not None:
            self._guard.addresses.release(self._address)
            self._address = None
        inner, self._inner, self._transport = self._inner, None, None
        if inner is not None:
            inner.connection_lost(exc)

    def hand_over(self) -> str | None:
        """The request was upgraded (a WebSocket: one request for the socket's whole life):
        give the transport straight to aiohttp's protocol and leave it. Returns the address the
        connection is still counted under, for the session to give back with
        ``ConnectionGuard.release_address`` when it ends (None: not counted, or already gone)."""
        self._disarm()
        transport, inner = self._transport, self._inner
        if transport is None or inner is None or transport.is_closing():
            return None  # closing: connection_lost comes here and gives the address back
        address, self._address = self._address, None
        self._inner = self._transport = None
        transport.set_protocol(inner)
        return address

    # -- what the edge middleware reports -------------------------------------------------------

    def request_started(self) -> None:
        """A complete head arrived and its handler runs: the head deadline is met."""
        self._busy = True
        self._disarm()

    def request_finished(self) -> None:
        """The handler returned; the next byte starts the next head's deadline."""
        self._busy = False

    # -- the head deadline -----------------------------------------------------------------

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._guard.head_timeout, self._head_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_late(self) -> None:
        self._deadline = None
        if self._busy or self._transport is None:
            return
        self._guard.on_refused("head_timeout")
        self._transport.close()


def guarded_connection(request: web.BaseRequest) -> GuardedConnection | None:
    """The ``GuardedConnection`` a request arrived on (None when served without one, e.g. by
    aiohttp's test server)."""
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, GuardedConnection) else None
