"""Publishes made idempotent by the caller's key (the events API's ``Idempotency-Key``).

An engine that publishes over HTTP cannot tell, when its connection drops after the request was
sent, whether party_sync published the event: the node may have sequenced it and died before
answering. Sending the request again with the same key is then safe: the first publish under a
key is recorded (its seq: the answer, and all a retry needs; not the event, which history
bounds by bytes and a record would not) for ``record_ttl``, and a second one under that key in
that time publishes nothing and answers with the first one's seq. The same rule as an action's
result, which is kept per ``action_id`` (``core/actions.py``); Redis mode keeps the record in the
party's slot and decides in the publish script (``lua/publish.lua``), atomically with the publish.

A key follows the trace id rule (``protocol/ids.py is_trace_id``: the id alphabet, up to 128
characters), checked where it comes in. Pure: time is passed in. Keys are collected oldest
first, when they expire or more than ``max_keys`` are held.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from party_sync.core.events import Event
from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.errors import IdempotencyKeyReused

#: ``IdempotencyKeyReused``'s words.
REUSED = (
    "the Idempotency-Key was used within action_record_ttl for a request of another number of "
    "events: nothing of this one was published"
)


def shape(messages: Sequence[Mapping[str, Any]]) -> str:
    """What a request under a key is compared by with a later request under that key: its
    number of events. A retry answered the first request's seqs must have as many events (the
    key names the publish, not its bodies, which a retry may make anew); one with another number
    is another request (``IdempotencyKeyReused``): its seqs would not be its events'."""
    return str(len(messages))


def repeated(party_id: str, first: int, message: dict[str, Any], body: bytes) -> Event:
    """A publish under a key that already has an event: the answer, as that event (its seq
    ``first``) in this request's words (``body``: ``message`` encoded). Nothing is sequenced."""
    data = codec.with_seq(body, first)
    return Event(
        party_id, first, message["type"], message["payload"], message["trace_id"], data, True
    )


def replayed(
    messages: Sequence[Mapping[str, Any]], result_of: Callable[[str], bytes | None]
) -> list[bytes | None] | None:
    """Whether an engine's answer (``Backend.publish_many``'s events) is a late copy of one
    published already: it holds action results and every one of their actions already has its
    result (``result_of``: the recorded result of an ``action_id``, or None). Then, per event,
    the earlier result (None for the other events: none of them is published again); else None.

    The first answer was one atomic step, so its other events went out with its result; a copy
    (a worker frozen while another took its action over, woken after) is at best the same and at
    worst out of date: its ``scene.update`` would take the party back. ``lua/publish_many.lua``
    decides the same in Redis."""
    earlier: list[bytes | None] = []
    results = 0
    for message in messages:
        if message["type"] != t.ACTION_RESULT:
            earlier.append(None)
            continue
        first = result_of(message["payload"]["action_id"])
        if first is None:
            return None
        earlier.append(first)
        results += 1
    return earlier if results else None


def unpublished(party_id: str, message: Mapping[str, Any], body: bytes) -> Event:
    """An event of a replayed answer, which was not published: seq 0, ``body`` (no seq)."""
    return Event(party_id, 0, message["type"], message["payload"], message["trace_id"], body)


class PublishedKeys:
    """Per party: key → the seq of the (first) event published under it and the request's
    ``shape``, until ``record_ttl`` after that publish."""

    __slots__ = ("_events", "_expires", "max_keys", "record_ttl")

    def __init__(self, record_ttl: float, max_keys: int = 10_000) -> None:
        self.record_ttl = record_ttl
        self.max_keys = max_keys
        #: seq and shape, in publish order, like the expiries
        self._events: dict[str, tuple[int, str]] = {}
        self._expires: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._events)

    def first(self, key: str, now: float, request: str = "") -> int | None:
        """The seq of the event published under ``key``, if that was less than ``record_ttl``
        ago. ``request``: this request's ``shape``; another request's under the key raises
        ``IdempotencyKeyReused``."""
        expires = self._expires.get(key)
        if expires is None or expires <= now:
            return None
        seq, published = self._events[key]
        if request and published and request != published:
            raise IdempotencyKeyReused(REUSED)
        return seq

    def record(self, key: str, seq: int, now: float, request: str = "") -> None:
        """The event ``seq`` (the first of the request ``request``) was published under ``key``
        at ``now``."""
        self._events.pop(key, None)  # an expired record of the key: now the newest
        self._expires.pop(key, None)
        self._events[key] = (seq, request)
        self._expires[key] = now + self.record_ttl
        self.collect(now)

    def collect(self, now: float) -> None:
        """Forget expired keys, oldest first, and all but the newest ``max_keys``."""
        expires = self._expires
        while expires:
            oldest = next(iter(expires))
            if expires[oldest] > now and len(expires) <= self.max_keys:
                return
            del expires[oldest]
            del self._events[oldest]
