"""Helpers to test an engine without party_sync running: a recording publisher, scripted dice.

Shipped in the package (not hidden in ``tests/``) because anyone writing an engine against
``party_sync.engine`` needs the same three things: an ``EventPublisher`` that records what was
published (and can fail on demand), ``ActionRequest``/``JoinNotice`` built the way party_sync
builds them, and dice whose every roll the test decides.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from party_sync.engine import ENGINE_EVENT_TYPES, ActionRequest, JoinNotice

_counter = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Published:
    """One event as an engine published it, with the ``seq`` the publisher gave it."""

    party_id: str
    type: str
    payload: Mapping[str, Any]
    trace_id: str | None
    seq: int


class PublishFailed(ConnectionError):
    """Raised by :class:`RecordingPublisher` when told to fail (a backend outage)."""


class RecordingPublisher:
    """An in-memory ``EventPublisher`` that records every event (and every rejection).

    ``check`` is called with each event before it is recorded (e.g. a JSON Schema validation that
    raises); ``fail_next`` makes the next *n* publishes raise :class:`PublishFailed` instead.
    Like party_sync's, ``seq`` counts per party from 1.
    """

    def __init__(self, check: Callable[[Published], None] | None = None) -> None:
        self.check = check
        self.published: list[Published] = []
        self.rejected: list[tuple[ActionRequest, str]] = []
        self.fail_next = 0
        self._seq: dict[str, int] = {}

    async def publish(
        self,
        party_id: str,
        type: str,
        payload: Mapping[str, Any],
        *,
        trace_id: str | None = None,
    ) -> int:
        if type not in ENGINE_EVENT_TYPES:
            raise ValueError(f"an engine may not publish {type!r}")
        if self.fail_next > 0:
            self.fail_next -= 1
            raise PublishFailed(f"publish of {type} failed (scripted)")
        seq = self._seq.get(party_id, 0) + 1
        event = Published(party_id, type, payload, trace_id, seq)
        if self.check is not None:
            self.check(event)
        self._seq[party_id] = seq
        self.published.append(event)
        return seq

    async def reject(self, action: ActionRequest, message: str) -> None:
        self.rejected.append((action, message))

    def types(self) -> list[str]:
        return [e.type for e in self.published]

    def last(self, type: str) -> Mapping[str, Any]:
        """The payload of the latest event of ``type`` (AssertionError if there is none)."""
        for event in reversed(self.published):
            if event.type == type:
                return event.payload
        raise AssertionError(f"no {type} was published")

    def clear(self) -> None:
        self.published.clear()
        self.rejected.clear()


class ScriptedRandom(random.Random):
    """A ``random.Random`` whose ``randint`` returns the scripted values, in order.

    Every value must lie in the requested range, and running out is an error: a test then knows
    exactly which dice the engine rolled.
    """

    def __init__(self, values: Iterable[int] = ()) -> None:
        super().__init__(0)
        self.values: deque[int] = deque(values)

    def push(self, *values: int) -> None:
        self.values.extend(values)

    def randint(self, a: int, b: int) -> int:
        if not self.values:
            raise AssertionError(f"ScriptedRandom ran out of values (wanted {a}..{b})")
        value = self.values.popleft()
        if not a <= value <= b:
            raise AssertionError(f"scripted value {value} is outside {a}..{b}")
        return value


def action_request(
    action_type: str,
    payload: Mapping[str, Any] | None = None,
    *,
    character_id: str = "aria",
    party_id: str = "party-1",
    run_id: str = "run-1",
    action_id: str | None = None,
    trace_id: str | None = None,
    timestamp: str = "2026-11-25T21:04:05.123Z",
) -> ActionRequest:
    """An ``ActionRequest`` as party_sync hands it to an engine (ids are made up if omitted)."""
    n = next(_counter)
    action_id = action_id or f"act-{n}"
    trace_id = trace_id or f"trace-{n}"
    inner = {
        "action_id": action_id,
        "character_id": character_id,
        "campaign_run_id": run_id,
        "action_type": action_type,
        "payload": dict(payload or {}),
    }
    envelope = {
        "type": "action.request",
        "timestamp": timestamp,
        "trace_id": trace_id,
        "payload": inner,
    }
    return ActionRequest(
        party_id=party_id,
        campaign_run_id=run_id,
        character_id=character_id,
        action_id=action_id,
        action_type=action_type,
        payload=dict(payload or {}),
        trace_id=trace_id,
        envelope=envelope,
    )


def join_notice(
    character_id: str = "aria",
    display_name: str | None = None,
    *,
    party_id: str = "party-1",
    run_id: str = "run-1",
    trace_id: str | None = None,
) -> JoinNotice:
    return JoinNotice(
        party_id=party_id,
        campaign_run_id=run_id,
        character_id=character_id,
        display_name=display_name or character_id.capitalize(),
        trace_id=trace_id or f"join-{next(_counter)}",
    )
