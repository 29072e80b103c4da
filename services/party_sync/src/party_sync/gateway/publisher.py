"""The gateway's ``EventPublisher``: how engine events enter the sequenced path."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from party_sync.core import votes
from party_sync.engine.interface import ENGINE_EVENT_TYPES, ActionRequest
from party_sync.protocol import codec
from party_sync.protocol.errors import ErrorCode, InvalidEvent
from party_sync.protocol.schemas import SchemaViolation

if TYPE_CHECKING:
    from party_sync.gateway.gateway import Gateway

log = logging.getLogger(__name__)


class GatewayPublisher:
    """Validates an engine's events against the schemas, then publishes them through the backend."""

    def __init__(self, gateway: Gateway, clock: Callable[[], float]) -> None:
        self._gateway = gateway
        self._clock = clock

    def build(
        self,
        type_: str,
        payload: Mapping[str, Any],
        trace_id: str | None,
        *,
        allowed: frozenset[str] = ENGINE_EVENT_TYPES,
        timestamp: str | None = None,
    ) -> dict[str, Any]:
        """The checked envelope (without seq) of an event; raises ``InvalidEvent``."""
        if type_ not in allowed:
            raise InvalidEvent(f"{type_!r} may not be published here (allowed: {sorted(allowed)})")
        message = codec.envelope(type_, dict(payload), ts=self._clock(), trace_id=trace_id)
        if timestamp is not None:
            message["timestamp"] = timestamp
        try:
            # seq is required by event schemas; the real one is allocated by the backend.
            self._gateway.contracts.validate(type_, {**message, "seq": 1})
        except SchemaViolation as exc:
            raise InvalidEvent(f"{type_} does not match its schema: {exc}") from None
        return message

    async def publish(
        self,
        party_id: str,
        type: str,
        payload: Mapping[str, Any],
        *,
        trace_id: str | None = None,
    ) -> int:
        message = self.build(type, payload, trace_id)
        event = await self._gateway.backend.publish(party_id, message, self._clock())
        return event.seq

    async def start_vote(
        self,
        party_id: str,
        question: str,
        options: Sequence[Mapping[str, str]],
        timeout_s: float,
        *,
        vote_id: str | None = None,
        tie_rule: str = "first_listed",
        default_option: str | None = None,
        campaign_run_id: str | None = None,
        trace_id: str | None = None,
    ) -> Mapping[str, Any]:
        request: dict[str, Any] = {
            "question": question,
            "options": list(options),
            "timeout_s": timeout_s,
            "tie_rule": tie_rule,
            "default_option": default_option,
        }
        try:
            spec = votes.spec_from_json(request, vote_id or "v-" + uuid.uuid4().hex[:12])
        except votes.SpecError as exc:
            raise InvalidEvent(str(exc)) from None
        event = await self._gateway.start_vote(
            party_id, spec, campaign_run_id=campaign_run_id, trace_id=trace_id
        )
        return event.payload

    async def reject(self, action: ActionRequest, message: str) -> None:
        await self.fail(action, ErrorCode.ACTION_REJECTED, message)

    async def fail(self, action: ActionRequest, code: ErrorCode, message: str) -> None:
        """The action will not produce a result: free it and tell the acting character."""
        log.info(
            "action refused",
            extra={"trace_id": action.trace_id, "party_id": action.party_id, "code": code.value},
        )
        await self._gateway.fail_action(action, code, message)
