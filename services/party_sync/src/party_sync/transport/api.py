"""The server API (``/api/v1``): how engines and gateway_api publish into parties.

Every call is authenticated by ``Authorization: Bearer <PARTY_SYNC_API_KEY>``, compared in
constant time and checked before anything else is read (a bad key → 401); then every path id must
follow the id rule (400 ``invalid_id``); then the whole body is read, up to
``api_max_body_bytes`` (413 ``too_large``), and parsed at most ``codec.MAX_DEPTH`` levels deep
(400 ``too_deep`` / ``bad_json``): ``transport/edge.py`` and ``party_sync/problems.py`` do all
of that, for every route, and answer what a handler raises (``problems.PROBLEMS``: 422
``invalid_event`` / ``invalid_vote``, 409 ``vote_open`` / ``narration_conflict``, 503
``backend_unavailable``). Published events go through the same validated, sequenced path as
in-process engines' events, so they are ordered, recorded in history and resumable like every
other event. A publish sent with an ``Idempotency-Key`` header (the id alphabet, up to 128
characters; 400 ``invalid_id`` otherwise) is safe to send again: the first event published under
that key in the party is kept for ``action_record_ttl``, and a request with the same key in that
time publishes nothing and is answered 202 with the first one's seq (``core/published.py``).
Narration pieces (``POST .../narration``) go through the same ``EventPublisher.narrate`` as an
in-process engine's: not sequenced, but ordered per stream.

A ``traceparent`` header (W3C trace context; ``party-sync engine-http`` sends it) makes the
publish a span of the caller's trace, i.e. of the action's (``party_sync.tracing``); without one,
an envelope ``trace_id`` that is a W3C trace id names the trace.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from aiohttp import web

from party_sync import tracing
from party_sync.core import votes
from party_sync.engine import wire
from party_sync.engine.interface import (
    ENGINE_EVENT_TYPES,
    ENGINE_FAILED,
    MAX_BATCH_EVENTS,
    ActionRequest,
    NarrationPiece,
    VoteRequest,
)
from party_sync.gateway import Gateway
from party_sync.problems import CONTINUE_WHEN_READ, InvalidId, InvalidRequest
from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.errors import ErrorCode, InvalidEvent
from party_sync.protocol.ids import ID_RULE, TRACE_ID_RULE, is_id, is_trace_id
from party_sync.protocol.schemas import SchemaViolation
from party_sync.transport.appkeys import API_KEY, GATEWAY
from party_sync.transport.edge import guarded, read_json

__all__ = ["add_routes"]

log = logging.getLogger(__name__)


async def _read_json(request: web.Request) -> Any:
    return await read_json(request, request.app[GATEWAY].settings.api_max_body_bytes)


async def _read_envelope(request: web.Request) -> dict[str, Any]:
    return _envelope(await _read_json(request))


def _envelope(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise InvalidEvent("body must be an envelope object with a type")
    if "seq" in message:
        raise InvalidEvent("seq is allocated by party_sync; omit it")
    if not isinstance(message.get("payload"), dict):
        raise InvalidEvent("payload must be an object")
    return message


def _build(gateway: Gateway, message: dict[str, Any]) -> dict[str, Any]:
    timestamp = message.get("timestamp")
    trace_id = message.get("trace_id")
    unknown = set(message) - {"type", "timestamp", "trace_id", "payload"}
    if unknown:
        raise InvalidEvent(f"unknown envelope fields: {sorted(unknown)}")
    # absent or null: party_sync fills it in (as the narration and vote bodies); anything else
    # is checked (an empty trace_id was taken for a missing one, a number dropped)
    if trace_id is not None and not is_trace_id(trace_id):
        raise InvalidEvent(TRACE_ID_RULE)
    if timestamp is not None and not isinstance(timestamp, str):
        raise InvalidEvent("timestamp must be an RFC 3339 string")
    return gateway.publisher.build(
        message["type"],
        message["payload"],
        trace_id,
        allowed=ENGINE_EVENT_TYPES,
        timestamp=timestamp,
    )


#: The header that makes a publish safe to send again (``core/published.py``).
IDEMPOTENCY_KEY = "Idempotency-Key"


def _key(request: web.Request) -> str | None:
    """The request's ``Idempotency-Key``, if it has one; 400 ``invalid_id`` if it breaks the
    rule (the id alphabet, up to 128 characters: it becomes part of a Redis key name)."""
    key = request.headers.get(IDEMPOTENCY_KEY)
    if key is None:
        return None
    if not is_trace_id(key):
        raise InvalidId(f"{IDEMPOTENCY_KEY} must match [A-Za-z0-9._:-]{{1,128}}")
    return key


async def publish_party_event(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    party_id = request.match_info["party_id"]
    key = _key(request)
    message = _build(gateway, await _read_envelope(request))
    with tracing.incoming(
        "publish " + message["type"],
        request.headers,
        trace_id=message["trace_id"],
        attributes={"party_sync.party_id": party_id},
    ):
        event = await gateway.publisher.publish_built(party_id, message, key=key)
    gateway.touched.add(party_id)
    log.debug(
        "event published via API",
        extra={"trace_id": event.trace_id, "party_id": party_id, "seq": event.seq},
    )
    return web.json_response({"seq": event.seq}, status=202)


async def publish_party_events(request: web.Request) -> web.Response:
    """Several events of one party in one atomic step (``BatchPublisher.publish_many``): an
    engine's whole answer, e.g. ``action.result`` then ``scene.update``. Every event is checked
    before any is published (one invalid: 422, none published); they get consecutive seqs and
    reach the members together. 202 ``{"seqs": [...]}`` (0 for an event not published because
    the call is a late copy of an answer already published whole: every ``action.result`` in it
    was published already). With an ``Idempotency-Key``, a call under a key that already has
    one publishes nothing and answers the seqs its events got, as the single route does."""
    gateway = request.app[GATEWAY]
    party_id = request.match_info["party_id"]
    key = _key(request)
    body = await _read_json(request)
    if not isinstance(body, dict) or set(body) != {"events"}:
        raise InvalidEvent('body must be {"events": [<envelope>, ...]}')
    events = body["events"]
    if not isinstance(events, list) or not 1 <= len(events) <= MAX_BATCH_EVENTS:
        raise InvalidEvent(f"events must be a list of 1 to {MAX_BATCH_EVENTS} envelopes")
    messages = [_build(gateway, _envelope(event)) for event in events]
    with tracing.incoming(
        "publish batch",
        request.headers,
        trace_id=messages[0]["trace_id"],
        attributes={"party_sync.party_id": party_id, "party_sync.batch": len(messages)},
    ):
        seqs = await gateway.publisher.publish_many_built(party_id, messages, key)
    gateway.touched.add(party_id)
    return web.json_response({"seqs": seqs}, status=202)


async def publish_run_event(request: web.Request) -> web.Response:
    """A run-wide event: sequenced into the stream of every party playing the run."""
    gateway = request.app[GATEWAY]
    run_id = request.match_info["campaign_run_id"]
    key = _key(request)
    message = _build(gateway, await _read_envelope(request))
    if message["type"] == t.ACTION_RESULT:
        # An action is one party's: run-wide its result became a pre-published answer in every
        # other party of the run (a later action of that id there answered by it, or refused
        # forbidden), and a refusal met in one party (another character's action) left the
        # parties before it published under a 422 (re-check probe).
        raise InvalidEvent(
            "an action.result belongs to its action's party: publish it with "
            "POST /api/v1/parties/{party_id}/events"
        )
    with tracing.incoming(
        "publish " + message["type"],
        request.headers,
        trace_id=message["trace_id"],
        attributes={"party_sync.campaign_run_id": run_id},
    ):
        seqs = await gateway.publish_to_run(run_id, message, key=key)
    gateway.touched.update(seqs)
    return web.json_response({"parties": seqs}, status=202)


async def start_vote(request: web.Request) -> web.Response:
    """Open a party vote on an engine's behalf; 201 with the ``vote.started`` payload."""
    gateway = request.app[GATEWAY]
    vote = VoteRequest.from_json(request.match_info["party_id"], await _read_json(request))
    try:
        with tracing.incoming("vote.start", request.headers, trace_id=vote.trace_id):
            event = await gateway.publisher.open_vote(vote)
        gateway.touched.add(vote.party_id)
    except InvalidEvent as exc:  # the vote asked for, not an event the caller sent: invalid_vote
        raise votes.SpecError(str(exc)) from exc
    return web.json_response({**event.payload, "seq": event.seq}, status=201)


async def narrate(request: web.Request) -> web.Response:
    """The next piece of a live narration stream (``narration.delta`` to every member); 202
    ``{"stream_id", "index"}``. A piece already taken is answered 202 again (a retry is safe);
    one that cannot follow its stream is 409 ``narration_conflict``, a malformed body 422."""
    gateway = request.app[GATEWAY]
    piece = NarrationPiece.from_json(request.match_info["party_id"], await _read_json(request))
    with tracing.incoming(
        "narrate",
        request.headers,
        trace_id=piece.trace_id,
        attributes={"party_sync.party_id": piece.party_id},
    ):
        await gateway.publisher.narrate(
            piece.party_id,
            piece.stream_id,
            piece.index,
            piece.text,
            done=piece.done,
            action_id=piece.action_id,
            trace_id=piece.trace_id,
        )
    return web.json_response({"stream_id": piece.stream_id, "index": piece.index}, status=202)


#: The refusals an engine makes of an action it was handed (``POST .../refusal``).
ENGINE_REFUSALS: Final = {
    code.value: code for code in (ErrorCode.ACTION_REJECTED, ErrorCode.ENGINE_ERROR)
}
#: The most characters of a refusal's ``detail`` its player is shown.
MAX_DETAIL = 500


def _handed_action(request: web.Request, body: Any, fields: frozenset[str]) -> ActionRequest:
    """The action an engine was handed, from the body's ``envelope`` (the stream entry's field:
    the ``action.request`` as an object, or its JSON text as the entry holds it) and
    ``deadline`` (the entry's: decimal Unix seconds, as text or a number); its party and
    ``action_id`` are the path's. 422 ``invalid_request`` for anything else, naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"body must be a JSON object with {sorted(fields)}")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise InvalidRequest(f"unknown fields {unknown[:8]}: the body holds {sorted(fields)}")
    if "envelope" not in body:
        raise InvalidRequest("envelope is required: the entry's envelope field")
    party_id, action_id = request.match_info["party_id"], request.match_info["action_id"]
    try:
        deadline = wire.parse_deadline(body.get("deadline"))
    except ValueError as exc:
        raise InvalidRequest(f"deadline: {exc}") from None
    try:
        envelope = body["envelope"]
        if isinstance(envelope, str):
            envelope = codec.decode_bounded(envelope.encode())
        action = wire.parse_action(party_id, envelope, deadline, request.app[GATEWAY].contracts)
    except KeyError as exc:  # (its text is the bare name: "envelope: 'trace_id'", docs probe)
        raise InvalidRequest(
            f"envelope: no {str(exc)[:100]} field (copy the entry's, or the delivery's)"
        ) from None
    except (ValueError, TypeError, SchemaViolation) as exc:
        raise InvalidRequest(f"envelope: {str(exc)[:200]}") from None
    if action.action_id != action_id:
        raise InvalidRequest("the envelope's action_id is not the one in the path")
    return action


async def claim_action(request: web.Request) -> web.Response:
    """An engine is about to start an action it read from the actions stream, or an HTTP engine
    host one whose delivery asked it to claim (``engine_http_claim = engine``): may it? 200
    ``{"claim": "start" | "expired" | "final"}``, atomic with party_sync's own timeout, as
    ``party-sync engine-worker`` claims (``LinkHost.claim``): ``start`` runs it (a second claim
    of a started action starts it again: a redelivery, the engine deduplicates by
    ``action_id``); ``expired``: its deadline passed before anyone started it, and it is refused
    now with ``action_timeout``; ``final``: it has its answer already. Skip it on either."""
    gateway = request.app[GATEWAY]
    body = await _read_json(request)
    action = _handed_action(request, body, frozenset({"envelope", "deadline", "node"}))
    node = body.get("node")
    if node is not None and (not isinstance(node, str) or not is_id(node)):
        raise InvalidRequest(f"node: {ID_RULE}")
    if action.deadline is None and action.character_id != t.PARTY_ACTOR:
        # Only a party action (a finished vote's decision, ``vote:<vote_id>``) has no deadline
        # (a worker in another language could not claim one: the party's decision was never
        # applied; engine developer probe). Another's entry has one, and it decides when the
        # action's record is gone (an emptied Redis): a claim without it could start an action
        # long past its deadline.
        raise InvalidRequest(
            "deadline is required: the entry's (or the HTTP delivery's) deadline field (only a "
            "party action, character_id 'party', has none)"
        )
    with tracing.incoming("claim", request.headers, trace_id=action.trace_id):
        claim = await gateway.publisher.claim(action, trusted=False, claimer=node)
    return web.json_response({"claim": claim.value})


async def refuse_action(request: web.Request) -> web.Response:
    """An engine will not apply an action it was handed: ``action_rejected`` (the game's rules
    refuse it; ``detail`` is shown to its player) or ``engine_error`` (it failed). The refusal
    becomes the action's final answer, told to its sender (and ``action.failed`` to the party);
    200 ``{"recorded": true}``, or ``false`` when the action had its answer already (nothing is
    sent: a retried refusal is safe)."""
    gateway = request.app[GATEWAY]
    body = await _read_json(request)
    action = _handed_action(request, body, frozenset({"envelope", "deadline", "code", "detail"}))
    code, detail = body.get("code"), body.get("detail", "")
    if not isinstance(code, str) or code not in ENGINE_REFUSALS:  # (a list is unhashable)
        raise InvalidRequest(f"code must be one of {sorted(ENGINE_REFUSALS)}")
    if not isinstance(detail, str):
        raise InvalidRequest("detail must be a string")
    text = detail[:MAX_DETAIL] or (
        "the engine refused the action" if code == "action_rejected" else ENGINE_FAILED
    )
    with tracing.incoming("refuse", request.headers, trace_id=action.trace_id):
        recorded = await gateway.publisher.refuse(action, ENGINE_REFUSALS[code], text)
    return web.json_response({"recorded": recorded})


def add_routes(app: web.Application, api_key: str | None) -> None:
    if api_key:
        app[API_KEY] = api_key
    for path, handler in (
        ("/api/v1/parties/{party_id}/events", publish_party_event),
        ("/api/v1/parties/{party_id}/events/batch", publish_party_events),
        ("/api/v1/runs/{campaign_run_id}/events", publish_run_event),
        ("/api/v1/parties/{party_id}/votes", start_vote),
        ("/api/v1/parties/{party_id}/narration", narrate),
        ("/api/v1/parties/{party_id}/actions/{action_id}/claim", claim_action),
        ("/api/v1/parties/{party_id}/actions/{action_id}/refusal", refuse_action),
    ):
        app.router.add_post(path, guarded(handler), expect_handler=CONTINUE_WHEN_READ)
