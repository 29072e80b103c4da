"""What the out-of-process engine transports put on the wire, shared by both ends (no I/O).

The Redis Streams link and worker, and the HTTP link and host, carry the same three things:

- an **action**: the ``action.request`` envelope as validated, plus its deadline
  (``format_deadline``: decimal Unix seconds; absent when the action has none);
- a **join notice**: a ``party.join`` envelope (``join_envelope``), a hint;
- a **restate notice**: ``{"type": "party.restate", "timestamp", "trace_id",
  "payload": {"epoch": <the party's new epoch>}}`` (``restate_envelope``), at least once.

A notice's ``timestamp`` is the time party_sync announced it (``JoinNotice.at``,
``RestateNotice.at``), given by whoever made the notice: a link never reads the clock for it, so
both transports stamp one notice alike, and the parsing end gets the same ``at`` back.

Notices are no client's messages (no client ever sees one): their schemas, and those of the HTTP
bodies and the stream entry that carry them, are under ``contracts/jsonschema/party_sync/engine/``
(``Contracts.validate_engine``), which the engine host checks a notice against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

from party_sync.engine.interface import ActionRequest, JoinNotice, RestateNotice
from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.schemas import Contracts

#: The envelope type of a restate notice (engine transports only; never sent to clients).
PARTY_RESTATE: Final = "party.restate"


#: The HTTP link's header: seconds left before the action's deadline when the delivery was sent
#: (decimal), so that the engine host judges the deadline by its own receipt time, whatever its
#: clock (``http_host._rebased``).
TIME_LEFT_HEADER: Final = "X-Action-Time-Left"
#: The HTTP link's header on every delivery (actions and notices): party_sync's clock when it was
#: sent (Unix seconds, decimal), for an engine host whose engines compare times across processes
#: (``ApiPublisher.clock``: the reference engine's narration lease).
CLOCK_HEADER: Final = "X-Party-Sync-Time"
#: The HTTP link's header on an action's delivery when the engine host claims for itself
#: (``engine_http_claim = engine``): ``engine``, "party_sync has not claimed this action: claim
#: it (``POST /api/v1/parties/{party_id}/actions/{action_id}/claim``) right before the engine
#: starts it". Absent: the node claimed it before its first POST.
CLAIM_HEADER: Final = "X-Party-Sync-Claim"
#: The engine host's answer header to a delivery that asked it to claim: the claim's answer
#: (``start``, ``expired``, ``final``). A 2xx without it tells the node the host did not claim.
CLAIMED_HEADER: Final = "X-Party-Sync-Claimed"
#: ``CLAIM_HEADER``'s value.
CLAIM_BY_ENGINE: Final = "engine"
#: With ``CLAIM_HEADER``: the id of the serving node that sends the delivery, which the host's
#: claim names (its ``node``), so that another node takes the action over if this one dies
#: (its answer to the delivery would go nowhere).
NODE_HEADER: Final = "X-Party-Sync-Node"


def format_deadline(deadline: float) -> str:
    """A deadline as decimal Unix seconds (``repr`` keeps every digit of the float)."""
    return repr(float(deadline))


def parse_deadline(raw: object) -> float | None:
    """A deadline from a stream field, a JSON number or a header; None if absent.

    Raises ``ValueError`` for something that is not a finite number.
    """
    if raw is None or raw in ("", b""):
        return None
    if isinstance(raw, bool):
        raise ValueError("a deadline is a number of seconds")
    if isinstance(raw, bytes):
        raw = raw.decode()
    if not isinstance(raw, (str, int, float)):
        raise ValueError("a deadline is a number of seconds")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("a deadline is a number of seconds (Unix time)") from None
    if not math.isfinite(value):
        raise ValueError("a deadline must be finite")
    return value


def join_envelope(notice: JoinNotice) -> dict[str, Any]:
    """The ``party.join`` envelope of a join notice, stamped with the time it was announced."""
    return {
        "type": t.PARTY_JOIN,
        "timestamp": codec.rfc3339(notice.at),
        "trace_id": notice.trace_id,
        "payload": {"character_id": notice.character_id, "display_name": notice.display_name},
    }


def restate_envelope(notice: RestateNotice) -> dict[str, Any]:
    """The ``party.restate`` envelope of a restate notice, stamped with the time it was sent."""
    return {
        "type": PARTY_RESTATE,
        "timestamp": codec.rfc3339(notice.at),
        "trace_id": notice.trace_id,
        "payload": {"epoch": notice.epoch},
    }


def _unix(timestamp: object) -> float:
    """An envelope's RFC 3339 ``timestamp`` as Unix seconds; raises ``ValueError``/``TypeError``."""
    if not isinstance(timestamp, str):
        raise TypeError("timestamp must be an RFC 3339 string")
    seconds = codec.parse_time(timestamp)
    if seconds is None:
        raise ValueError(
            "timestamp must be an RFC 3339 time with its offset (2026-11-25T21:04:05Z)"
        )
    return seconds


def parse_join(party_id: str, run_id: str, envelope: Mapping[str, Any]) -> JoinNotice:
    """Raises ``KeyError``/``TypeError``/``ValueError`` for a malformed envelope."""
    if envelope.get("type") != t.PARTY_JOIN:
        raise ValueError("not a party.join")
    p = envelope["payload"]
    return JoinNotice(
        party_id,
        run_id,
        str(p["character_id"]),
        str(p["display_name"]),
        str(envelope["trace_id"]),
        _unix(envelope["timestamp"]),
    )


def parse_restate(party_id: str, run_id: str, envelope: Mapping[str, Any]) -> RestateNotice:
    """Raises ``KeyError``/``TypeError``/``ValueError`` for a malformed envelope."""
    if envelope.get("type") != PARTY_RESTATE:
        raise ValueError("not a party.restate")
    epoch, trace_id = envelope["payload"]["epoch"], envelope["trace_id"]
    if not isinstance(epoch, str) or not isinstance(trace_id, str) or not run_id:
        raise ValueError("party.restate needs a string epoch, trace_id and campaign_run_id")
    return RestateNotice(party_id, run_id, epoch, trace_id, _unix(envelope["timestamp"]))


def parse_action(
    party_id: str,
    envelope: Any,
    deadline: float | None,
    contracts: Contracts | None = None,
) -> ActionRequest:
    """The ``ActionRequest`` of an ``action.request`` envelope, checked against its schema
    first when ``contracts`` are given (an envelope from outside: a delivery to the engine
    host, a claim through the server API). Raises ``KeyError``/``TypeError``/``ValueError``
    (``SchemaViolation`` with ``contracts``) for anything else."""
    if not isinstance(envelope, Mapping) or envelope.get("type") != t.ACTION_REQUEST:
        raise ValueError("expected an action.request envelope")
    if contracts is not None:
        contracts.validate(t.ACTION_REQUEST, envelope)
    return ActionRequest.from_envelope(party_id, envelope, deadline)
