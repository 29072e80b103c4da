"""``RecordingHost``: a ``LinkHost`` for engine-link tests, recording what a link asks of it.

``claims`` decides each ``claim`` (by action_id; default START); ``claim_errors`` makes the next
N claims raise ``BackendUnavailable`` (a stalled backend). Published events, refusals, claims and
narration pieces (``narrated``, as ``NarrationPiece``) are recorded in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from party_sync.engine.interface import (
    ActionRequest,
    Claim,
    NarrationPiece,
    NarrationSender,
    VoteRequest,
    VoteStarter,
    action_envelope,
)
from party_sync.protocol.errors import BackendUnavailable, ErrorCode

#: When ``make_action``'s actions were accepted (2026-01-01T00:00:00Z): a fixed envelope timestamp.
ACCEPTED_AT = 1_767_225_600.0


@dataclass
class RecordingHost(VoteStarter, NarrationSender):
    claims: dict[str, Claim] = field(default_factory=dict)
    claim_errors: int = 0
    refusal_errors: int = 0  # reject/fail raise BackendUnavailable this many times first
    claimed: list[ActionRequest] = field(default_factory=list)
    published: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, ErrorCode]] = field(default_factory=list)
    failed_words: list[str] = field(default_factory=list)  # each failure's message
    narrated: list[NarrationPiece] = field(default_factory=list)
    answers: set[str] = field(default_factory=set)  # action_ids ``answered`` says True for

    async def claim(self, action: ActionRequest) -> Claim:
        if self.claim_errors > 0:
            self.claim_errors -= 1
            raise BackendUnavailable("the backend is stalled")
        self.claimed.append(action)
        return self.claims.get(action.action_id, Claim.START)

    async def answered(self, action: ActionRequest) -> bool:
        return action.action_id in self.answers

    async def publish(
        self,
        party_id: str,
        type: str,
        payload: Mapping[str, Any],
        *,
        trace_id: str | None = None,
    ) -> int:
        self.published.append((party_id, type, dict(payload)))
        return len(self.published)

    async def send_piece(self, piece: NarrationPiece) -> None:
        self.narrated.append(piece)

    def _stalled(self) -> None:
        if self.refusal_errors > 0:
            self.refusal_errors -= 1
            raise BackendUnavailable("the backend is stalled")

    async def reject(self, action: ActionRequest, message: str) -> None:
        self._stalled()
        self.rejected.append((action.action_id, message))

    async def fail(self, action: ActionRequest, code: ErrorCode, message: str) -> None:
        self._stalled()
        self.failed.append((action.action_id, code))
        self.failed_words.append(message)

    async def request_vote(self, request: VoteRequest) -> Mapping[str, Any]:
        raise NotImplementedError("no votes in link tests")

    def results(self) -> list[str]:
        """The action_ids of every published ``action.result``."""
        return [p["action_id"] for _, type_, p in self.published if type_ == "action.result"]


def make_action(
    action_id: str,
    *,
    deadline: float | None = None,
    party_id: str = "p1",
    run_id: str = "r1",
    character_id: str = "aria",
    trace_id: str | None = None,
    payload: Mapping[str, Any] | None = None,
) -> ActionRequest:
    """A valid accepted ``action.request`` as a link receives it (``payload``: the action's)."""
    trace = trace_id or f"trace-{action_id}"
    request = {
        "action_id": action_id,
        "character_id": character_id,
        "campaign_run_id": run_id,
        "action_type": "skill_check",
        "payload": dict(payload or {}),
    }
    envelope = action_envelope(request, trace, ACCEPTED_AT)
    return ActionRequest.from_envelope(party_id, envelope, deadline)


@contextlib.asynccontextmanager
async def serving(app: web.Application, shutdown_timeout: float = 0.5) -> AsyncIterator[str]:
    """``app`` on a loopback port of its own: its base URL (``http://127.0.0.1:<port>``).
    ``shutdown_timeout``: how long requests still running at the end may take."""
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def result_for(envelope: Mapping[str, Any], outcome: str = "success") -> dict[str, Any]:
    """The ``action.result`` an engine answers an ``action.request`` envelope with (a fixed
    character state), as a fake engine service publishes it through the events API."""
    p = envelope["payload"]
    return {
        "type": "action.result",
        "trace_id": envelope["trace_id"],
        "payload": {
            "action_id": p["action_id"],
            "character_id": p["character_id"],
            "action_type": p["action_type"],
            "outcome": outcome,
            "state": {"hp": 7, "max_hp": 10, "effects": [], "scene_flags": {}},
        },
    }


async def post_event(base: str, key: str, party_id: str, event: Mapping[str, Any]) -> None:
    """``POST /api/v1/parties/{party_id}/events`` on ``base`` with the API key; must be taken."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/api/v1/parties/{party_id}/events",
            json=event,
            headers={"Authorization": f"Bearer {key}"},
        ) as resp,
    ):
        assert resp.status == 202, await resp.text()
