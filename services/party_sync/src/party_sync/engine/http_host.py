"""Hosting an engine behind HTTP: the other end of ``HttpEngineLink`` (``party-sync engine-http``).

It receives party_sync's POSTs, checks each envelope against the schemas, calls the engine, and
gives the engine an ``EventPublisher`` that publishes through party_sync's server API. The engine
code is the same object that runs in-process; nothing in it knows about HTTP.

Every delivery carries ``Authorization: Bearer <PARTY_SYNC_API_KEY>``, the key the host publishes
with (``keyed``): one without it is answered 401 ``unauthorized`` and never reaches the engine.

``POST /actions`` (``--path``): ``{"party_id", "campaign_run_id", "envelope": <action.request>,
"deadline"?}`` with headers ``X-Action-Deadline`` (used when the body has no ``deadline``) and
``X-Delivery-Attempt``. Answers:

- 202: delivered (the engine handled it and published through the API);
With ``X-Party-Sync-Claim: engine`` (party_sync's ``engine_http_claim = engine``) the host claims
the action through the server API right before the engine starts it (``ApiPublisher.claim``), on
every attempt, naming the node in ``X-Party-Sync-Node``: ``start`` runs it, ``expired`` is 409
``expired``, ``final`` 200 ``answered``; these three answers carry ``X-Party-Sync-Claimed: <the
claim>`` (the engine's own 422 and 500 do not). Without the header:

- 409 ``{"error": "expired"}``: the deadline has passed and this is attempt 1 (no earlier
  delivery can have reached the engine), so the engine is not called: party_sync tells the player
  ``action_timeout``, which is then true. A later attempt past its deadline *is* handed to the
  engine: an earlier one may have started it, and the engine deduplicates by ``action_id``;
- 422: the engine refused the action (``EngineRejected``) or the body is invalid (final); a
  refusal made after the sender's request was cut short (its HTTP timeout) is also recorded
  through the API's refusal route (``_refused_meanwhile``): the 422 would go nowhere;
- 500 ``{"error": "engine_error"}``: the engine itself raised, so it did not apply the action
  (the engine contract); party_sync retries it (deduplication keeps a retry from applying twice)
  and after the fifth such answer tells the player ``engine_error``. The host counts its engine's
  failures of each action too (``FailureCount``): at the fifth it records ``engine_error`` as
  the action's final answer through the API's refusal route itself, since answers cut short by
  party_sync's HTTP timeout (an engine slower than it that fails) never reach the link's count;
- 503 ``{"error": "backend_unavailable"}``: party_sync was unreachable under the engine (a
  publish failed with ``BackendUnavailable`` — which the publisher also raises for a request
  its HTTP client cannot make —, an ``OSError`` or a timeout; also as the ``__cause__`` /
  ``__context__`` of what the engine raised, or inside an ``ExceptionGroup``), so the engine
  may have applied the action; retried like any 5xx (the engine deduplicates by ``action_id``
  and publishes again), never reported as a failure. A refusal that would be the same on every
  attempt (an invalid event, a vote or narration conflict) is the engine's failure (500).

Handlers raise; ``problems.answer_errors`` answers by the one table (``problems.PROBLEMS``),
rendered as this host's ``{"error": <code>, "detail"}`` JSON. The body is read by
``problems.read_body``, like every party_sync route (at most ``MAX_BODY`` bytes: 413 beyond).

A ``traceparent`` header (W3C trace context, sent by ``HttpEngineLink`` while tracing is on)
makes the request's span a child of party_sync's delivery, and ``ApiPublisher`` sends the current
context back on every call to the events API: the action's trace runs through the engine
(``party_sync.tracing``; without one, ``X-Trace-Id`` seeds the trace id). The engine streams live
narration through the same ``ApiPublisher`` (``narrate``, or a ``Narration`` writer over it:
``POST /api/v1/parties/{party_id}/narration``).

``POST /notices`` (``--notice-path``): ``{"kind": "join" | "restate", "party_id",
"campaign_run_id", "envelope"}`` (``party_sync.engine.wire``): a join goes to
``Engine.handle_join``, a restate to the engine's optional ``handle_restate``. 202 ``accepted``
(or ``ignored``: the engine has no ``handle_restate``), 422 invalid, 500 the engine failed
(party_sync retries: re-stating is idempotent).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from party_sync import problems, tracing
from party_sync.engine import wire
from party_sync.engine.health import public_url
from party_sync.engine.inprocess import INFRA_ERRORS
from party_sync.engine.interface import (
    ENGINE_FAILED,
    ENGINE_FAILURES,
    MAX_BATCH_EVENTS,
    ActionRequest,
    Claim,
    Engine,
    EngineRejected,
    NarrationPiece,
    NarrationSender,
    VoteRequest,
    VoteStarter,
    restate_engine,
    start_engine,
)
from party_sync.problems import (
    RAW_BODIES,
    DeadlinePassed,
    EngineFailed,
    InvalidDelivery,
    Unauthorized,
    bearer_matches,
    listen,
    read_body,
)
from party_sync.protocol import codec
from party_sync.protocol.errors import (
    BackendUnavailable,
    InvalidEvent,
    NarrationConflict,
    VoteConflict,
)
from party_sync.protocol.ids import ID_RULE, is_id
from party_sync.protocol.schemas import Contracts, SchemaViolation
from party_sync.tasks import STOP_SIGNALS, cancel_and_wait

log = logging.getLogger(__name__)

ENGINE: Final = web.AppKey("engine", Engine)
CONTRACTS: Final = web.AppKey("contracts", Contracts)
CLOCK: Final[web.AppKey[Callable[[], float]]] = web.AppKey("clock")
PUBLISHER: Final[web.AppKey[ApiPublisher]] = web.AppKey("publisher")
#: The engine calls running now, by ``(party_id, action_id)``: a delivery of an action still
#: running here joins its call (``receive_action``).
RUNNING: Final[web.AppKey[dict[tuple[str, str], asyncio.Task[None]]]] = web.AppKey("running")
#: The engine's failures of the actions it failed last (``FailureCount``).
FAILURES: Final[web.AppKey[FailureCount]] = web.AppKey("failures")
#: The ``WWW-Authenticate`` challenge of a delivery refused for its key (RFC 6750 §3).
CHALLENGE: Final = 'Bearer realm="party_sync engine host"'

#: The largest delivery body read (aiohttp's own default request size, which bounded it before).
MAX_BODY: Final = 1024**2

#: Seconds of deliveries whose readings of party_sync's clock make this host's estimate of it
#: (``ApiPublisher.heard``): the one that waited least wins.
CLOCK_WINDOW = 60.0
#: The largest gap between party_sync's clock as a delivery tells it and this host's own that is
#: believed (seconds): one reading is the estimate for a minute (``ApiPublisher.heard``), so a
#: delivery whose ``X-Party-Sync-Time`` said 1e308 (or milliseconds) made every first delivery of
#: that minute expired (hostile-input probe). A day: any machine's clock, however badly kept
#: (a wrong time zone is hours), is believed; nonsense is not.
MAX_HEARD_GAP: Final = 86_400.0
#: Seconds ``ApiPublisher`` gives a TCP connect to a party_sync node before trying the next one.
CONNECT_TIMEOUT: Final = 2.0

DEADLINE_HEADER: Final = "X-Action-Deadline"
#: What makes a publish safe to send again (``transport/api.py``, ``core/published.py``).
IDEMPOTENCY_KEY: Final = "Idempotency-Key"
ATTEMPT_HEADER: Final = "X-Delivery-Attempt"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its ``__cause__`` / ``__context__`` chain and the members of exception groups."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
        if isinstance(current, BaseExceptionGroup):
            todo += current.exceptions


def _publish_failed(exc: BaseException) -> bool:
    """Does ``exc`` (what the engine raised) stem from party_sync unreachable under it
    (``INFRA_ERRORS``: a publish that may succeed if tried again; also as the cause or context
    of what the engine raised, or in an exception group)? A refusal that would be the same on
    every attempt (an invalid event, a vote or narration conflict, a payload that cannot be
    encoded) is the engine's failure: retrying it for ``action_record_ttl`` would only delay the
    player's answer."""
    return any(isinstance(e, INFRA_ERRORS) for e in _chain(exc))


def credentials_problem(name: str, url: str) -> str | None:
    """Why ``url`` (setting ``name``) cannot be a party_sync URL to publish to: one with a user
    or password in it (the API key authenticates: aiohttp refuses both at once, on every
    publish). None when it has none. The URL itself is not repeated."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None  # (config.http_url_problem says what is wrong with it)
    if parts.username is None and parts.password is None:
        return None
    return (
        f"{name} must not carry a user or password (user:password@): publishing authenticates "
        "with party_sync's API key (--api-key or PARTY_SYNC_API_KEY)"
    )


#: Seconds before ``ApiPublisher`` tries the batch route again after a 404/405.
NO_BATCH_RETRY: Final = 60.0


def _envelope(type_: str, payload: Mapping[str, Any], trace_id: str | None) -> dict[str, Any]:
    """An event as the events API takes it (party_sync fills in the timestamp, and the trace id
    when there is none)."""
    envelope: dict[str, Any] = {"type": type_, "payload": dict(payload)}
    if trace_id:
        envelope["trace_id"] = trace_id
    return envelope


class ApiPublisher(VoteStarter, NarrationSender):
    """``EventPublisher`` over party_sync's server API: ``POST /api/v1/parties/{party_id}/events``
    (``publish``), ``.../votes`` (``start_vote``) and ``.../narration`` (``narrate``).

    ``publish`` and ``narrate`` retry a 5xx, a failed or dropped connection and a request that
    timed out ``retries`` times (backoff 0.1, 0.2, 0.4 s, …), then raise ``BackendUnavailable``.
    A retry cannot publish twice: each ``publish`` sends an ``Idempotency-Key`` of its own (the
    same on every attempt), so a node that published the event before the answer was lost answers
    the retry with the first seq and publishes nothing; a narration piece party_sync already has
    is taken again and changes nothing.

    ``base_url`` may name several party_sync nodes (a sequence, or one string with commas): a
    request goes to the node that answered last; what a retry would send again (a 5xx, a failed
    or dropped connection, a timeout) goes to the next node at once, each node once before
    the backoff starts, then ``retries`` more attempts around them. So an engine whose node died
    publishes through another one instead of losing the answer with it. A vote request, which
    is not retried, moves on only when a node could not be reached at all. A URL with a user or
    password in it is refused (``ValueError``): the API key authenticates.

    ``clock()`` is party_sync's clock as this host last heard it (``heard``: every delivery's
    ``X-Party-Sync-Time``, or an older sender's action deadline less its time left), ``local``
    (Unix seconds) before the first: the time engines compare across processes (the reference
    engine's narration lease).
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        api_key: str,
        *,
        retries: int = 3,
        timeout: float = 5.0,
        local: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url  # the setter takes one URL, a list, or commas
        self.api_key = api_key  # also what party_sync's deliveries to this host must carry
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._retries = retries
        self._timeout = timeout  # of each request (seconds)
        self._http: aiohttp.ClientSession | None = None
        #: Until when (``time.monotonic()``) batches go one by one: a node answered the batch
        #: route 404/405 (an earlier version)
        self._no_batch = float("-inf")
        self._local = local
        self._offset = 0.0  # party_sync's clock less ``local``, as best heard (``heard``)
        #: (local time, reading) of the last ``CLOCK_WINDOW`` s, readings decreasing: the first
        #: is the highest, the delivery that waited least
        self._readings: deque[tuple[float, float]] = deque()
        self._gap_said = float("-inf")  # when (``local``) the last unbelieved reading was said

    def clock(self) -> float:
        """Now on party_sync's clock (Unix seconds), as far as this host has heard it."""
        return self._local() + self._offset

    def heard(self, sender_now: float, local_now: float) -> None:
        """party_sync's clock read ``sender_now`` when ``local`` read ``local_now`` (a delivery's
        sending time, at its receipt). A delivery read late (a host frozen, its requests
        waiting in the socket meanwhile) reads party_sync's clock as behind by that wait: the
        estimate is the highest reading of the last ``CLOCK_WINDOW`` s, the delivery that
        waited least (HTTP probe: a host resumed after a freeze took party_sync's clock for 10 s
        behind, and so every deadline as 10 s later)."""
        reading = sender_now - local_now
        if not math.isfinite(reading):
            return
        if abs(reading) > MAX_HEARD_GAP:  # this host keeps its own clock's reading instead
            if local_now >= self._gap_said + CLOCK_WINDOW:
                self._gap_said = local_now
                log.warning(
                    "a delivery says party_sync's clock is %.0f s from this host's, more than "
                    "%.0f s: not believed (set up NTP here, or look for a sender of bad "
                    "X-Party-Sync-Time headers)",
                    reading,
                    MAX_HEARD_GAP,
                )
            return
        readings = self._readings
        while readings and readings[0][0] < local_now - CLOCK_WINDOW:
            readings.popleft()
        while readings and readings[-1][1] <= reading:
            readings.pop()
        readings.append((local_now, reading))
        self._offset = readings[0][1]

    @property
    def offset(self) -> float | None:
        """party_sync's clock less this host's (``heard``), or None before any delivery."""
        return self._offset if self._readings else None

    @property
    def base_url(self) -> str:
        """The node requests go to now (the one that answered last)."""
        return self._bases[self._current]

    @base_url.setter
    def base_url(self, value: str | Sequence[str]) -> None:
        urls = base_urls(value) if isinstance(value, str) else [u.rstrip("/") for u in value]
        if not urls:
            raise ValueError("ApiPublisher needs at least one party_sync URL")
        for url in urls:
            problem = credentials_problem("a party_sync URL", url)
            if problem is not None:
                raise ValueError(problem)
        self._bases, self._current = urls, 0

    @property
    def base_urls(self) -> list[str]:
        return list(self._bases)

    async def open(self) -> None:
        # A connect that hangs (a host gone without refusing: dropped SYNs) times out as
        # aiohttp's ConnectionTimeoutError, a ClientError sent nothing, so it moves on to the next
        # node like a refused one. No read timeout of aiohttp's own: past the connect, only
        # ``total`` (a plain TimeoutError), sent again under the same Idempotency-Key.
        timeout = aiohttp.ClientTimeout(
            total=self._timeout, sock_connect=min(self._timeout / 2, CONNECT_TIMEOUT)
        )
        self._http = aiohttp.ClientSession(timeout=timeout)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def publish(
        self,
        party_id: str,
        type: str,
        payload: Mapping[str, Any],
        *,
        trace_id: str | None = None,
    ) -> int:
        path = f"/api/v1/parties/{party_id}/events"
        status, body = await self._post(
            path,
            _envelope(type, payload, trace_id),
            retry_on=(aiohttp.ClientError, TimeoutError),
            key=uuid.uuid4().hex,  # one per event, the same on each attempt
        )
        if status == 202:
            return int(orjson.loads(body)["seq"])
        if status is None:
            raise BackendUnavailable(f"could not publish {type} to party {party_id}")
        raise InvalidEvent(f"party_sync refused the event ({status}): {body[:300]!r}")

    async def publish_many(
        self,
        party_id: str,
        events: Sequence[tuple[str, Mapping[str, Any]]],
        *,
        trace_id: str | None = None,
        key: str | None = None,
    ) -> list[int]:
        """``BatchPublisher.publish_many`` over ``POST /api/v1/parties/{party_id}/events/batch``:
        the events in one atomic step and one request, under ``key`` (else a fresh one, the same
        on every attempt: a retry of a batch whose answer was lost publishes nothing). More than
        ``MAX_BATCH_EVENTS`` events, or a party_sync without the route (404 or 405; asked again
        after ``NO_BATCH_RETRY`` seconds): one ``publish`` each, in order, each under a key of
        its own."""
        if events and len(events) <= MAX_BATCH_EVENTS and time.monotonic() >= self._no_batch:
            status, body = await self._post(
                f"/api/v1/parties/{party_id}/events/batch",
                {"events": [_envelope(type_, payload, trace_id) for type_, payload in events]},
                retry_on=(aiohttp.ClientError, TimeoutError),
                key=key or uuid.uuid4().hex,
            )
            if status == 202:
                return [int(seq) for seq in orjson.loads(body)["seqs"]]
            if status is None:
                raise BackendUnavailable(f"could not publish {len(events)} events to {party_id}")
            if status not in (404, 405):
                raise InvalidEvent(f"party_sync refused the events ({status}): {body[:300]!r}")
            # an earlier party_sync (or a node of one, mid-upgrade): one by one for a while
            self._no_batch = time.monotonic() + NO_BATCH_RETRY
            log.info("party_sync has no batch route (HTTP %d): publishing one by one", status)
        return [
            await self.publish(party_id, type_, payload, trace_id=trace_id)
            for type_, payload in events
        ]

    async def send_piece(self, piece: NarrationPiece) -> None:
        """``POST /api/v1/parties/{party_id}/narration`` (``EventPublisher.narrate``, checked by
        ``NarrationSender`` before anything is sent): 409 is ``NarrationConflict``, another 4xx
        ``InvalidEvent``."""
        party_id, stream_id, index = piece.party_id, piece.stream_id, piece.index
        path = f"/api/v1/parties/{party_id}/narration"
        status, body = await self._post(
            path, piece.to_json(), retry_on=(aiohttp.ClientError, TimeoutError)
        )
        if status == 202:
            return
        if status is None:
            raise BackendUnavailable(f"could not narrate {stream_id} to party {party_id}")
        detail = _detail(body)
        if status == 409:
            raise NarrationConflict(detail or f"narration {stream_id} piece {index} cannot follow")
        raise InvalidEvent(f"party_sync refused the narration piece ({status}): {detail}")

    async def _post(
        self,
        path: str,
        body: Mapping[str, Any],
        *,
        retry_on: tuple[type[Exception], ...],
        key: str | None = None,
    ) -> tuple[int | None, bytes]:
        """POST ``body`` to ``path`` (with ``key`` as its ``Idempotency-Key``); the first answer
        below 500 (status, body), retrying a 5xx and the errors ``retry_on`` lists (on the next
        node, if there are several: class docstring); (None, b"") once the retries are spent."""
        assert self._http is not None, "open() first"
        data = orjson.dumps(body)
        base = self._headers if key is None else {**self._headers, IDEMPOTENCY_KEY: key}
        nodes = len(self._bases)
        attempts = self._retries + nodes  # each node once, then the retries
        first = self._current
        for attempt in range(attempts):
            node = (first + attempt) % nodes  # this request's own way round the nodes
            try:
                headers = tracing.with_traceparent(base)
                url = self._bases[node] + path
                async with self._http.post(url, data=data, headers=headers) as resp:
                    answer = await resp.read()
                    if resp.status < 500:
                        self._current = node  # the node that answered is kept
                        return resp.status, answer
            except retry_on:
                pass
            except Exception as exc:  # a request the client cannot make: no retry would help
                raise BackendUnavailable(
                    f"cannot send to {public_url(self._bases[node])}: "
                    f"{type(exc).__name__}: {str(exc)[:200]}"
                ) from exc
            self._failed(node)
            if attempt + 1 >= nodes and attempt + 1 < attempts:  # every node tried: back off
                await asyncio.sleep(0.1 * 2 ** (attempt + 1 - nodes))
        return None, b""

    def _failed(self, node: int) -> None:
        """``node`` failed a request: the next requests start at the one after it, unless
        another request (running at the same time) has already moved them elsewhere."""
        if self._current == node:
            self._current = (node + 1) % len(self._bases)

    async def request_vote(self, request: VoteRequest) -> Mapping[str, Any]:
        """``POST /api/v1/parties/{party_id}/votes`` (party_sync checks the request)."""
        assert self._http is not None, "open() first"
        body = request.to_json()
        path = f"/api/v1/parties/{request.party_id}/votes"
        headers = tracing.with_traceparent(self._headers)
        first, nodes = self._current, len(self._bases)
        for attempt in range(nodes):  # a node that cannot be reached (nothing sent): the next
            node = (first + attempt) % nodes
            try:
                answer = await self._request_vote(self._bases[node] + path, body, headers)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                self._failed(node)
                if attempt + 1 == nodes:
                    raise
                continue
            self._current = node
            return answer
        raise AssertionError("unreachable")  # (the last attempt returned or raised)

    async def _request_vote(
        self, url: str, body: Mapping[str, Any], headers: Mapping[str, str]
    ) -> Mapping[str, Any]:
        assert self._http is not None, "open() first"
        async with self._http.post(url, data=orjson.dumps(body), headers=headers) as resp:
            answer = orjson.loads(await resp.read())
            if resp.status == 201:
                return answer  # type: ignore[no-any-return]
            if resp.status == 409:
                raise VoteConflict(answer.get("detail", "a vote is already open"))
            raise InvalidEvent(f"vote refused ({resp.status}): {answer.get('detail')}")

    async def claim(
        self,
        party_id: str,
        action_id: str,
        envelope: Mapping[str, Any],
        deadline: float | None,
        node: str | None = None,
    ) -> Claim:
        """``POST /api/v1/parties/{party_id}/actions/{action_id}/claim`` for a delivery that asks
        this host to claim (``wire.CLAIM_HEADER``): may the engine start the action? ``deadline``
        as party_sync sent it (its clock: the ledger judges it). Retried like a publish (a claim
        asked again answers the same, or START again for a started action); party_sync
        unreachable is ``BackendUnavailable``; a refused claim (a key or a body party_sync does
        not take) is ``EngineFailed``: the engine was not called."""
        body: dict[str, Any] = {"envelope": envelope}
        if deadline is not None:
            body["deadline"] = deadline
        if node is not None:  # the delivering node (``wire.NODE_HEADER``)
            body["node"] = node
        status, answer = await self._action_route(party_id, action_id, "claim", body)
        if status == 200:
            try:
                return Claim(orjson.loads(answer)["claim"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                pass
        log.error(
            "party_sync refused this host's claim of an action (%s): %s", status, _detail(answer)
        )
        raise EngineFailed(f"party_sync refused the claim ({status})")

    async def refuse(
        self,
        party_id: str,
        action_id: str,
        envelope: Mapping[str, Any],
        detail: str,
        code: str = "action_rejected",
    ) -> None:
        """``POST /api/v1/parties/{party_id}/actions/{action_id}/refusal`` with ``code``
        (``action_rejected`` or ``engine_error``) and ``detail``: the engine's refusal, or its
        last failure, made the action's final answer through the API, for a delivery whose
        sender no longer waits for the 422 or counts the 500s (``receive_action``). Retried like
        a publish (a refusal sent again records nothing); raises ``BackendUnavailable`` when
        party_sync cannot be reached."""
        body = {"envelope": envelope, "code": code, "detail": detail}
        status, answer = await self._action_route(party_id, action_id, "refusal", body)
        if status != 200:
            log.warning("party_sync refused the engine's refusal (%s): %s", status, _detail(answer))

    async def _action_route(
        self, party_id: str, action_id: str, route: str, body: Mapping[str, Any]
    ) -> tuple[int, bytes]:
        """POST ``body`` to an action's ``claim`` or ``refusal`` route, retried like a publish
        (both answer the same when asked again); ``BackendUnavailable`` once the retries are
        spent."""
        status, answer = await self._post(
            f"/api/v1/parties/{party_id}/actions/{action_id}/{route}",
            body,
            retry_on=(aiohttp.ClientError, TimeoutError),
        )
        if status is None:
            raise BackendUnavailable(f"no {route} of action {action_id} of party {party_id} made")
        return status, answer

    async def reject(self, action: ActionRequest, message: str) -> None:
        # Over HTTP a refusal is the answer to the delivery itself (422).
        raise EngineRejected(message)


def base_urls(value: str) -> list[str]:
    """The party_sync URLs of ``--party-sync-url`` / ``PARTY_SYNC_URL``: one, or several
    separated by commas (blanks around them ignored), each without a trailing slash."""
    return [part.strip().rstrip("/") for part in value.split(",") if part.strip()]


def _detail(body: bytes) -> str:
    """The ``detail`` of a party_sync refusal (problem details), else the start of the body."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    detail = answer.get("detail") if isinstance(answer, dict) else None
    return detail[:300] if isinstance(detail, str) else repr(body[:300])


def _deadline(request: web.Request, body: Mapping[str, Any]) -> float | None:
    """The action's deadline: the body's ``deadline``, else the ``X-Action-Deadline`` header."""
    raw = body.get("deadline")
    return wire.parse_deadline(raw if raw is not None else request.headers.get(DEADLINE_HEADER))


def _seconds(request: web.Request, header: str) -> float | None:
    """A header's decimal seconds (finite, not negative), or None."""
    raw = request.headers.get(header)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _rebased(request: web.Request, body: Mapping[str, Any], now: float) -> float | None:
    """The action's deadline on this host's clock: now (its receipt) plus the seconds the
    sender says were left (``X-Action-Time-Left``), so that a host whose clock is ahead of the
    deployment's does not take every action for expired (clock skew probe: a host 6 s ahead
    answered every first delivery 409 with a 4-s timeout); and no later than the deadline on
    party_sync's clock as this host knows it (``ApiPublisher.offset``): a delivery that waited
    in the socket while the host was frozen was read as just sent, and its action started
    10.8 s past its deadline, beside the same character's next one (HTTP probe). Without the
    header (an older sender), the deadline as given."""
    deadline = _deadline(request, body)
    left = _seconds(request, wire.TIME_LEFT_HEADER)
    if deadline is None or left is None:
        return deadline
    offset = request.app[PUBLISHER].offset
    if offset is None:
        return now + left
    return min(now + left, deadline - offset)


def _hear_clock(request: web.Request, body: Mapping[str, Any] | None, now: float) -> None:
    """Tell the host's publisher party_sync's clock, as this delivery says it: its
    ``X-Party-Sync-Time``, else (an action from an older sender) its deadline less the time
    it says was left. Every delivery, notices too: a host that had handled no action yet
    judged another host's narration lease by its own clock on a join notice (lease probe: a
    host 5 s ahead cut a live narration short)."""
    publisher = request.app[PUBLISHER]
    sent = _seconds(request, wire.CLOCK_HEADER)
    if sent is None and body is not None:
        left = _seconds(request, wire.TIME_LEFT_HEADER)
        try:
            deadline = _deadline(request, body)
        except ValueError:
            deadline = None
        if deadline is not None and left is not None:
            sent = deadline - left
    if sent is not None:
        publisher.heard(sent, now)


def _first_attempt(request: web.Request) -> bool:
    """``X-Delivery-Attempt: 1``: no earlier delivery of this action can have reached us."""
    return request.headers.get(ATTEMPT_HEADER, "").strip() == "1"


@web.middleware
async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Each request in a SERVER span continuing its ``traceparent`` (while tracing is on)."""
    if not tracing.is_on():
        return await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    attributes = {"http.request.method": request.method, "http.route": route}
    with tracing.incoming(
        f"{request.method} {route}",
        request.headers,
        trace_id=request.headers.get("X-Trace-Id"),
        attributes=attributes,
    ) as span:
        response = await handler(request)
        if span is not None:
            span.set_attribute("http.response.status_code", response.status)
        return response


def keyed(api_key: str) -> Middleware:
    """Every delivery must carry ``Authorization: Bearer <api_key>`` (the server API key, which
    party_sync sends with each action and notice): without it, 401 ``unauthorized`` before the
    body is read. Else anyone who can reach the host could make the engine apply an action for
    any character, or a party "vote" nobody held."""

    refusals = RefusalLog()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.http_exception is not None:
            # No delivery: a path or method the host does not serve (a load balancer's probe,
            # a scanner) is answered 404/405 as it is, and not counted as a refused delivery.
            return await handler(request)
        if not bearer_matches(request, api_key):
            refusals.refused(request.remote, time.monotonic())
            raise Unauthorized(headers={"WWW-Authenticate": CHALLENGE})
        return await handler(request)

    return check


#: Seconds between two WARNINGs about deliveries refused for their key (``RefusalLog``).
REFUSAL_LOG_EVERY: Final = 60.0


class RefusalLog:
    """The deliveries the host refused for their key, told to its operator: a WARNING at the
    first, then at most one a minute with the count since (a party_sync whose key differs sends
    every action and notice; anyone else's requests must not flood the log either). Never the
    key a request carried."""

    def __init__(self, every: float = REFUSAL_LOG_EVERY) -> None:
        self.every = every
        self._next = 0.0
        self._count = 0

    def refused(self, remote: str | None, now: float) -> None:
        self._count += 1
        if now < self._next:
            return
        log.warning(
            "refused %d delivery(ies) without this host's API key (the latest from %s): "
            "party_sync must send the PARTY_SYNC_API_KEY this host was given (at most one line "
            "a minute)",
            self._count,
            remote or "an unknown address",
            extra={"refused": self._count, "remote": remote},
        )
        self._count, self._next = 0, now + self.every


#: What a delivery that cannot be read as one raises (answered 422 ``invalid``).
_UNREADABLE: Final = (ValueError, KeyError, TypeError, IndexError, SchemaViolation)


def _unreadable(exc: Exception, shape: str) -> InvalidDelivery:
    """The 422 for a body that is no delivery, in words of the delivery (``shape``: what it must
    be), not of the Python error that found out (``'envelope'``, ``list indices must be …``)."""
    if isinstance(exc, orjson.JSONDecodeError):  # (its text quotes the body's bytes)
        return InvalidDelivery("the body is not JSON (UTF-8)")
    if isinstance(exc, SchemaViolation | ValueError):
        return InvalidDelivery(str(exc)[:300])
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        return InvalidDelivery(f"missing field {exc.args[0][:64]!r}: expected {shape}")
    return InvalidDelivery(f"expected {shape}")


_ACTION_SHAPE: Final = 'a JSON object {"party_id": id, "envelope": an action.request envelope}'
_NOTICE_SHAPE: Final = (
    'a JSON object {"kind": "join" | "restate", "party_id": id, "campaign_run_id", "envelope"}'
)


def _party_id(body: Mapping[str, Any]) -> str:
    """The delivery's ``party_id``, an id by the protocol's rule."""
    party_id = body["party_id"]
    if not isinstance(party_id, str) or not is_id(party_id):
        raise ValueError(f"party_id: {ID_RULE}")
    return party_id


async def receive_action(request: web.Request) -> web.Response:
    """``POST /actions``: one ``action.request`` (see the module docstring for the answers)."""
    engine, contracts, clock = request.app[ENGINE], request.app[CONTRACTS], request.app[CLOCK]
    raw = await read_body(request, MAX_BODY)
    try:
        body = codec.decode_bounded(raw)  # nesting bounded, as every body party_sync reads
        envelope = body["envelope"]
        party_id = _party_id(body)
        now = clock()
        _hear_clock(request, body, now)
        action = wire.parse_action(party_id, envelope, _rebased(request, body, now), contracts)
    except _UNREADABLE as exc:
        raise _unreadable(exc, _ACTION_SHAPE) from exc
    first = _first_attempt(request)
    # party_sync asks this host to claim the action (``engine_http_claim = engine``): the
    # ledger, not this host's reading of the deadline, says whether it may start
    asks_claim = request.headers.get(wire.CLAIM_HEADER, "").strip().lower() == wire.CLAIM_BY_ENGINE
    if not asks_claim and action.deadline is not None and clock() > action.deadline and first:
        log.info(
            "action not started: past its deadline",
            extra={"trace_id": action.trace_id, "action_id": action.action_id},
        )
        raise DeadlinePassed()
    # A later attempt (party_sync's HTTP timeout, a lost answer, a node taking over) may find the
    # action still running here: it waits for that call and answers as it does, instead of
    # handing the engine the same action again while it works on it (engines probe: four
    # overlapping calls of one slow action). Otherwise it is a redelivery: an earlier attempt
    # may have reached the engine, which deduplicates by action_id, and no deadline applies.
    running = request.app[RUNNING]
    key = (action.party_id, action.action_id)
    call = running.get(key)
    claimed = ""
    if call is None and asks_claim:
        claim = await _claim(request, body, envelope, action)
        claimed = claim.value
        if claim is Claim.FINAL:
            return web.json_response(
                {"status": "answered"}, status=200, headers={wire.CLAIMED_HEADER: claimed}
            )
        # started now (or again: a redelivery), so no deadline applies to the engine any more
        action = replace(action, deadline=None, redelivery=not first)
        call = running.get(key)  # (a delivery of it may have begun a call while we claimed)
    if call is None:
        if not first:
            action = replace(action, deadline=None, redelivery=True)
        call = asyncio.get_running_loop().create_task(
            _run_action(engine, action, envelope, request.app)
        )
        running[key] = call
        call.add_done_callback(lambda done: _forget(running, key, done))
    else:
        log.info(
            "a delivery of an action this host is still running: it waits for that call",
            extra={"trace_id": action.trace_id, "action_id": action.action_id},
        )
    # (shielded: a request cut short, say by party_sync's timeout, never cancels the engine)
    try:
        await asyncio.shield(call)
    except EngineRejected as exc:
        if request.transport is None or request.transport.is_closing():
            await _refused_meanwhile(request, envelope, action, str(exc))
        raise
    headers = {wire.CLAIMED_HEADER: claimed or Claim.START.value} if asks_claim else None
    return web.json_response({"status": "accepted"}, status=202, headers=headers)


async def _refused_meanwhile(
    request: web.Request, envelope: Any, action: ActionRequest, detail: str
) -> None:
    """The engine refused an action after its sender stopped waiting (party_sync's HTTP timeout
    cut the request short): the 422 would go nowhere, and each delivery sent again would run
    the engine again and be cut short again, as long as the engine is slower than that timeout
    (a taken-over action's refusal never reached its player: fault test). The refusal is made
    the action's final answer through the API instead (the link, between its retries, finds it
    answered)."""
    try:
        await request.app[PUBLISHER].refuse(action.party_id, action.action_id, envelope, detail)
    except BackendUnavailable as exc:
        log.warning(
            "the engine's refusal could not be recorded (%s): party_sync delivers the action again",
            exc,
            extra={"trace_id": action.trace_id, "action_id": action.action_id},
        )


async def _claim(
    request: web.Request, body: Mapping[str, Any], envelope: Any, action: ActionRequest
) -> Claim:
    """This host's claim of ``action`` (``ApiPublisher.claim``) for a delivery that asked for
    one. EXPIRED is answered 409 ``expired`` here (party_sync refused the action now, or had
    at its deadline: the engine is not called); START and FINAL are returned."""
    try:
        deadline = _deadline(request, body)  # party_sync's own, on its clock (not rebased)
    except ValueError:
        deadline = None
    node = request.headers.get(wire.NODE_HEADER, "").strip()
    claim = await request.app[PUBLISHER].claim(
        action.party_id, action.action_id, envelope, deadline, node if is_id(node) else None
    )
    if claim is Claim.EXPIRED:
        log.info(
            "action not started: its claim says its deadline passed",
            extra={"trace_id": action.trace_id, "action_id": action.action_id},
        )
        raise DeadlinePassed(headers={wire.CLAIMED_HEADER: claim.value})
    return claim


def _forget(
    running: dict[tuple[str, str], asyncio.Task[None]],
    key: tuple[str, str],
    done: asyncio.Task[None],
) -> None:
    if running.get(key) is done:
        del running[key]
    if not done.cancelled():
        done.exception()  # (retrieved: every request waiting on it has re-raised it)


class FailureCount:
    """How many times running the engine failed each action it failed last (at most ``LIMIT``
    actions, the oldest forgotten first; an action applied or refused is forgotten). At the
    ``ENGINE_FAILURES``-th failure of one action the host makes ``engine_error`` its final
    answer itself, through the API's refusal route: party_sync's link counts the 500s it is
    answered, but an engine that fails more slowly than the link's HTTP timeout has its answers
    cut short, and the link, which must then assume the engine may still be applying the
    action, would deliver it again until the action's record expired while its player waited
    (the failures the host counts are its own calls, each of which raised: not applied, by the
    engine contract; a delivery of an action still running here joins its call, not counted
    twice)."""

    LIMIT: Final = 10_000

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}

    def forget(self, action: ActionRequest) -> None:
        self._counts.pop((action.party_id, action.action_id), None)

    def failed(self, action: ActionRequest) -> int:
        """Count one failure of ``action``; its failures so far."""
        key = (action.party_id, action.action_id)
        count = self._counts.pop(key, 0) + 1
        self._counts[key] = count  # (last in the order: the oldest is forgotten first)
        while len(self._counts) > self.LIMIT:
            del self._counts[next(iter(self._counts))]
        return count

    async def engine_failed(
        self, publisher: ApiPublisher, action: ActionRequest, envelope: Any
    ) -> None:
        """The engine raised on ``action``: count it, and at the limit record ``engine_error``
        (``envelope``: the delivery's, which the refusal route reads)."""
        failures = self.failed(action)
        if failures < ENGINE_FAILURES:
            return
        extra = {"trace_id": action.trace_id, "action_id": action.action_id}
        log.error(
            "engine failed %d times on this action: engine_error is its final answer",
            failures,
            extra=extra,
        )
        try:
            await publisher.refuse(
                action.party_id, action.action_id, envelope, ENGINE_FAILED, "engine_error"
            )
        except BackendUnavailable as exc:
            log.warning(
                "engine_error could not be recorded (%s): party_sync delivers the action again",
                exc,
                extra=extra,
            )
        else:
            self.forget(action)


async def _run_action(
    engine: Engine, action: ActionRequest, envelope: Any, app: web.Application
) -> None:
    """The engine's call of one action, its failures as this host answers them (and counts:
    ``FailureCount``; ``envelope``: the delivery's)."""
    failures = app[FAILURES]
    try:
        await engine.handle_action(action)
    except EngineRejected:
        failures.forget(action)
        raise  # 422 rejected, with the engine's reason
    except Exception as exc:
        if not _publish_failed(exc):
            log.exception("engine failed", extra={"trace_id": action.trace_id})
            await failures.engine_failed(app[PUBLISHER], action, envelope)
            raise EngineFailed() from exc
        # A publish failed under the engine (party_sync unreachable, or the request not even
        # made): the engine may have applied the action, so this is no engine_error (which
        # says "not applied") but 503 backend_unavailable, retried like any 5xx (the engine
        # deduplicates by action_id and publishes again; the in-process link does the same)
        # (or the engine's own I/O: an OSError or TimeoutError says "outcome not known yet")
        log.warning(
            "the engine could not tell whether it applied the action (%s: %s): answered 503, "
            "party_sync delivers it again",
            type(exc).__name__,
            str(exc)[:300],
            extra={"trace_id": action.trace_id},
        )
        raise BackendUnavailable(f"outcome not known yet: {str(exc)[:300]}") from exc
    failures.forget(action)  # applied


async def receive_notice(request: web.Request) -> web.Response:
    """``POST /notices``: ``{"kind": "join" | "restate", "party_id", "campaign_run_id",
    "envelope"}``; 202 handled (or ignored: an engine without ``handle_restate``)."""
    engine, contracts = request.app[ENGINE], request.app[CONTRACTS]
    _hear_clock(request, None, request.app[CLOCK]())
    raw = await read_body(request, MAX_BODY)
    try:
        body = codec.decode_bounded(raw)  # nesting bounded, as every body party_sync reads
        kind, party_id, envelope = body["kind"], _party_id(body), body["envelope"]
        run_id = str(body.get("campaign_run_id") or "")
        if kind not in ("join", "restate") or not isinstance(envelope, dict):
            raise ValueError("expected kind join or restate, a party_id and an envelope")
        # the whole body (engine/http.notice.json: its campaign_run_id an id, its envelope the
        # notice of its kind): a run id that broke the id rule reached the engine (hostile probe)
        if "http.notice" in contracts.engine_documents:
            contracts.validate_engine("http.notice", body)
        if kind == "join":
            join = wire.parse_join(party_id, run_id, envelope)
        else:
            restate = wire.parse_restate(party_id, run_id, envelope)
    except _UNREADABLE as exc:
        raise _unreadable(exc, _NOTICE_SHAPE) from exc
    try:
        if kind == "join":
            await engine.handle_join(join)
            handled = True
        else:
            handled = await restate_engine(engine, restate)
    except Exception as exc:
        if not _publish_failed(exc):
            log.exception(
                "engine failed on a %s notice", kind, extra={"trace_id": envelope["trace_id"]}
            )
            raise EngineFailed() from exc
        # party_sync unreachable under the engine (Redis down, say): an outage, not a bug, so
        # no traceback; 503, which the link retries for a re-statement (a join is a hint)
        log.warning(
            "publishing failed under the engine on a %s notice: %s: %s",
            kind,
            type(exc).__name__,
            str(exc)[:300],
            extra={"trace_id": envelope["trace_id"]},
        )
        raise BackendUnavailable(f"publishing failed under the engine: {str(exc)[:300]}") from exc
    return web.json_response({"status": "accepted" if handled else "ignored"}, status=202)


async def _never_sniffed(request: web.Request, response: web.StreamResponse) -> None:
    problems.never_sniffed(response)  # its 401, 404 and 405 too (security probe)


def build_host_app(
    engine: Engine,
    publisher: ApiPublisher,
    path: str = "/actions",
    *,
    notice_path: str = "/notices",
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The engine host: actions on ``path``, notices on ``notice_path``; ``clock`` (Unix
    seconds) decides whether a first delivery is past its deadline."""
    # Inside the span: a refusal is answered (problems.PROBLEMS, in this host's {"error", "detail"}
    # JSON) before the span records its status.
    app = web.Application(
        middlewares=[
            traced,
            problems.answer_errors(problems.error_json, routing=True),  # 404/405 as JSON too
            keyed(publisher.api_key),
        ]
    )
    app[ENGINE] = engine
    app[CONTRACTS] = contracts = Contracts()
    if "http.notice" not in contracts.engine_documents:
        # a copy of the schemas older than engine/ (PARTY_SYNC_CONTRACTS_DIR): notices go on
        # unchecked rather than all refused (a lost restate leaves a party without its scene)
        log.warning(
            "no engine schemas in %s/engine: notices are taken without their schema check",
            contracts.directory,
        )
    app[CLOCK] = clock
    app[PUBLISHER] = publisher
    app[RUNNING] = {}
    app[FAILURES] = FailureCount()
    expect = problems.continue_when_read(problems.error_json)  # (the body asked for when read)
    app.router.add_post(path, receive_action, expect_handler=expect)
    app.router.add_post(notice_path, receive_notice, expect_handler=expect)
    problems.answer_bodies_at_shutdown(app)  # a body still arriving at SIGTERM: 503 at once
    app.on_response_prepare.append(_never_sniffed)  # every answer, as party_sync's own

    async def on_startup(app: web.Application) -> None:
        await publisher.open()
        try:
            await start_engine(engine, publisher)
        except BaseException:
            await publisher.close()  # no cleanup follows a failed start-up
            raise

    async def on_cleanup(app: web.Application) -> None:
        # engine calls no request waits for any more (their requests were cancelled at the
        # stop): cancelled and waited for, before the engine closes under them
        await cancel_and_wait(list(app[RUNNING].values()), what="an engine call")
        await engine.close()
        await publisher.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def run_host(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float,
    on_ready: Callable[[], None],
    on_stop: Callable[[float], None],
) -> None:
    """Serve ``app`` on ``host:port`` until SIGTERM/SIGINT/SIGHUP (``party-sync engine-http``).

    ``on_ready`` is called once the socket listens (never before: a script waiting for the ready
    line can connect at once); a bind that fails (the port in use, a host that is no address of
    this machine) is ``ListenError``, after the app was cleaned up. At the stop, ``on_stop`` gets
    ``shutdown_timeout``; the requests still running get that long, then are cancelled."""
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        keepalive_timeout=75.0,  # web.run_app's
        shutdown_timeout=shutdown_timeout,
        **RAW_BODIES,  # bodies are inflated by problems.read_body, bounded, or not at all
    )
    await runner.setup()
    await listen(runner, host, port, problems.QuietTCPSite(runner, host, port).start)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = STOP_SIGNALS
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    try:
        on_ready()
        await stopping.wait()
        on_stop(shutdown_timeout)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
